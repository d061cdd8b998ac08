"""img2img and inpainting in the pipeline: how a request's input images (models/image_inputs.py) become
each of its images' first latent and, when it inpaints, the latent blend after each step or the UNet's
image conditioning, as diffusers' StableDiffusionImg2ImgPipeline (SDXL: StableDiffusionXLImg2ImgPipeline)
and StableDiffusionInpaintPipeline compute them. The run itself starts later in the schedule (a plan's
`start`, models/samplers/base.py) and shares every UNet call with text-to-image rows.

A request is run in one of three modes (`mode_of`):
- txt2img (no init image): noise times the plan's init_noise_sigma.
- img2img (an init image, no mask, an ordinary 4-channel UNet), as StableDiffusionImg2ImgPipeline: the
  init image's latent (the VAE posterior sampled with the image's generator, times the scaling factor)
  noised to the level of the plan's first step by the sampler's own `add_noise`, at any strength (1
  too: a zero-terminal-SNR schedule's first level is then pure noise).
- inpaint (an init image and a mask; and every request on an inpainting checkpoint), as
  StableDiffusionInpaintPipeline: at strength 1 (diffusers' `is_strength_max`) the first latent is
  noise times init_noise_sigma, below it the init image's latent noised as img2img's. The mask is
  binarized at 0.5 and resized (nearest) to the latent's size. With a 4-channel UNet, after every step
  the latent outside the mask is replaced by the init image's latent noised to the next step's level
  with the image's first noise (after the last step: the clean latent). With a 9-channel inpainting
  UNet, every call's input is [latent, mask, masked image's latent], the masked image being the init
  image whose white (repainted) part is zeroed, i.e. gray. On such a checkpoint a request without a
  mask has a white mask (all repainted), and without an init image a zero image too: diffusers'
  inpainting pipeline given a white mask, and what AUTOMATIC1111 gives an inpainting model for txt2img.

What each image draws from its own CPU generator, in this order (what diffusers draws from the
generator of an image generated alone):
  1. the init image's posterior sample: img2img; inpaint with a 4-channel UNet, or below strength 1;
  2. its noise (1, C, h, w);
  3. the masked image's posterior sample: inpaint. A 4-channel UNet does not use it, but diffusers
     encodes the masked image whatever the UNet: the draw is made and dropped (no VAE call), which
     keeps the generator's stream, and so every later step's noise, the same as diffusers'.
Then the steps' own noise (ancestral and SDE samplers, DDIM with eta), as for txt2img.

A deliberate difference: diffusers' inpainting pipeline asked for several images of one init image
draws the posterior samples (1 and 3) once, from the first image's generator, for all of them. Here
every image draws its own, so image i is diffusers' picture for seed s + i alone, and a picture never
depends on its batch-mates (diffusers' img2img pipeline draws them per image too).

An all-black mask (nothing to repaint) is allowed. With a 4-channel UNet every step blends the whole
latent back to the init image's, so the picture is the init image through the VAE and back (its
posterior sample decoded). An inpainting UNet is told to repaint nothing and conditioned on the whole
init image: it gives back about the init image, as diffusers does, not exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from models.image_inputs import ImageInputs
from models.samplers import Plan, RowState, Sampler
from models.stable_diffusion import StableDiffusion
from models.transfer import to_device
from schemas.generation import Generation

Mode = Literal["txt2img", "img2img", "inpaint"]


def mode_of(model: StableDiffusion, request: Generation) -> Mode:
    """How a request runs on this model (module docstring)."""
    if model.inpainting:
        return "inpaint"
    if request.init_image is None:
        return "txt2img"
    return "img2img" if request.mask_image is None else "inpaint"


def check_inputs(request: Generation, inputs: ImageInputs | None) -> None:
    """ValueError unless `inputs` are the images the request names, at its size."""
    if request.init_image is None:
        if inputs is not None:
            raise ValueError("input images were given for a request without init_image")
        return
    if inputs is None:
        raise ValueError("init_image is set but its image was not given")
    if inputs.size != (request.width, request.height):
        raise ValueError(
            f"the init image is {inputs.size[0]}x{inputs.size[1]}, the request {request.width}x{request.height}: "
            "fit it to the request's size first (models/image_inputs.py)"
        )
    if (request.mask_image is None) != (inputs.mask is None):
        raise ValueError("mask_image and the mask given disagree: both or neither")


def pixels(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor.preprocess."""
    scaled = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * scaled - 1.0


def mask_condition(mask: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 -> (1, 1, H, W) float32 of 0 (keep) and 1 (repaint): diffusers' mask processor,
    which binarizes at 0.5."""
    condition = torch.from_numpy(mask.astype(np.float32) / 255.0)[None, None]
    condition[condition < 0.5] = 0
    condition[condition >= 0.5] = 1
    return condition


@dataclass(frozen=True)
class Posterior:
    """The VAE encoder's diagonal Gaussian over one image's latents, (1, C, h, w) each, in the VAE's
    dtype on its device; unscaled (the latent is a sample times the VAE's scaling factor)."""

    mean: torch.Tensor
    logvar: torch.Tensor  # clamped to [-30, 20] (models/vae.py)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """mean + std * z, z standard normal from `generator` (drawn on the CPU in float32, as diffusers'
        `DiagonalGaussianDistribution.sample` with a CPU generator), as float32."""
        std = torch.exp(0.5 * self.logvar)
        z = to_device(torch.randn(self.mean.shape, generator=generator), self.mean.device)
        return (self.mean + std * z.to(self.mean.dtype)).float()


@dataclass(frozen=True)
class Prepared:
    """What a request needs from the VAE before it starts: the images to encode, (1, 3, H, W) float32 in
    [-1, 1] each (None: not drawn), and the mask at the latent's size."""

    mode: Mode
    init: torch.Tensor | None  # the init image, when its posterior is drawn from (draw 1)
    masked: torch.Tensor | None  # an inpainting UNet's masked image (draw 3)
    mask: torch.Tensor | None  # (1, 1, h, w) float32 0/1: inpaint
    blank_masked: bool = False  # the masked image is all zeros (no init image): its encoding is cached


def prepare(model: StableDiffusion, request: Generation, inputs: ImageInputs | None) -> Prepared | None:
    """What `request` needs encoded (None: nothing, a text-to-image request on an ordinary UNet)."""
    check_inputs(request, inputs)
    mode = mode_of(model, request)
    if mode == "txt2img":
        return None
    init = pixels(inputs.init) if inputs is not None else None
    if mode == "img2img":
        return Prepared(mode, init, None, None)
    height, width = request.height, request.width
    if inputs is not None and inputs.mask is not None:
        condition = mask_condition(inputs.mask)
    else:  # an inpainting checkpoint without a mask: all repainted
        condition = torch.ones((1, 1, height, width))
    f = model.vae_scale_factor
    latent_mask = F.interpolate(condition, size=(height // f, width // f))  # nearest, as diffusers
    if not model.inpainting:
        return Prepared(mode, init, None, latent_mask)
    masked = (init if init is not None else torch.zeros((1, 3, height, width))) * (condition < 0.5)
    strength_max = request.init_image is None or request.strength == 1.0
    return Prepared(mode, None if strength_max else init, masked, latent_mask, blank_masked=init is None)


@dataclass(frozen=True)
class EncodedInputs:
    """A request's input images as its images need them to start, on the model's device."""

    mode: Mode
    init: Posterior | None  # draw 1
    masked: Posterior | None  # draw 3 (an inpainting UNet)
    mask: torch.Tensor | None  # (1, 1, h, w) float32 0/1: inpaint


class InputEncoder:
    """The VAE encodes of requests' input images, batched: images of one size share calls."""

    def __init__(self, model: StableDiffusion) -> None:
        self.model = model
        # an inpainting UNet's masked image for requests without an init image is all zeros: its
        # posterior, per (H, W), is encoded once
        self._blank_posteriors: dict[tuple[int, int], Posterior] = {}

    @torch.no_grad()
    def encode(
        self, requests: Sequence[tuple[Generation, ImageInputs | None]], max_batch: int = 8
    ) -> list[EncodedInputs | None]:
        """Each request's input images (fitted to its size) through the VAE encoder, as its images need
        them to start (None: a request that needs none), at most `max_batch` images per VAE call.
        Deterministic (nothing is drawn from the images' generators): a failed call can be retried."""
        prepared = [prepare(self.model, request, inputs) for request, inputs in requests]
        wanted = [
            (k, name, image)
            for k, ready in enumerate(prepared)
            if ready is not None
            for name, image in (("init", ready.init), ("masked", ready.masked))
            if image is not None and not (name == "masked" and ready.blank_masked)
        ]
        posteriors = self.encode_pixels([image for _, _, image in wanted], max_batch)
        found = {(k, name): posterior for (k, name, _), posterior in zip(wanted, posteriors, strict=True)}
        result: list[EncodedInputs | None] = []
        for k, ready in enumerate(prepared):
            if ready is None:
                result.append(None)
                continue
            masked = found.get((k, "masked"))
            if ready.blank_masked and ready.masked is not None:
                masked = self._blank_posterior(ready.masked)
            mask = to_device(ready.mask, self.model.device) if ready.mask is not None else None
            result.append(EncodedInputs(ready.mode, found.get((k, "init")), masked, mask))
        return result

    @torch.no_grad()
    def encode_pixels(self, images: Sequence[torch.Tensor], max_batch: int = 8) -> list[Posterior]:
        """(1, 3, H, W) float32 images in [-1, 1] -> their VAE posteriors, in order; images of one size
        together, at most `max_batch` per VAE call. FloatingPointError when the encoder overflows (a
        float16 VAE can: SDXL's original VAE; run it in float32)."""
        model = self.model
        result: list[Posterior | None] = [None] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for position, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(position)
        for positions in by_shape.values():
            for start in range(0, len(positions), max_batch):
                chunk = positions[start : start + max_batch]
                batch = to_device(torch.cat([images[p] for p in chunk]), model.device).to(model.vae_dtype)
                mean, logvar = model.vae.encode(batch)
                if not bool(mean.isfinite().all()) or not bool(logvar.isfinite().all()):
                    raise FloatingPointError(
                        f"the {model.vae_dtype} VAE encode gives inf/NaN (a float32 VAE avoids it)"
                    )
                for i, p in enumerate(chunk):
                    result[p] = Posterior(mean[i : i + 1], logvar[i : i + 1])
        return result  # type: ignore[return-value]

    def _blank_posterior(self, image: torch.Tensor) -> Posterior:
        size = (image.shape[-2], image.shape[-1])
        if size not in self._blank_posteriors:
            (self._blank_posteriors[size],) = self.encode_pixels([image])
        return self._blank_posteriors[size]


@dataclass(frozen=True)
class Blend:
    """An image inpainted with a 4-channel UNet: what its latent is blended with after each step."""

    image_latent: torch.Tensor  # (1, C, h, w) float32: the init image's scaled latent
    noise: torch.Tensor  # (1, C, h, w) float32: the image's first noise
    mask: torch.Tensor  # (1, 1, h, w) float32: 1 where repainted


@dataclass(frozen=True)
class ImageStart:
    latent: torch.Tensor  # (1, C, h, w) float32 on the model's device, in the sampler's scale
    blend: Blend | None = None
    image_cond: torch.Tensor | None = None  # (1, 1 + C, h, w) in the UNet's dtype: an inpainting UNet's


def start_image(
    model: StableDiffusion,
    sampler: Sampler,
    plan: Plan,
    request: Generation,
    encoded: EncodedInputs | None,
    generator: torch.Generator,
    shape: tuple[int, ...],
) -> ImageStart:
    """One image's first latent and what its steps need, drawing from its generator in diffusers' order
    (module docstring)."""
    device = model.device
    scaling = model.vae.config.scaling_factor
    mode = encoded.mode if encoded is not None else "txt2img"
    image_latent = None
    if encoded is not None and encoded.init is not None:
        image_latent = encoded.init.sample(generator) * scaling  # draw 1
    noise = torch.randn(shape, generator=generator)  # draw 2
    from_image = mode == "img2img" or (
        mode == "inpaint" and request.init_image is not None and request.strength != 1.0
    )
    if from_image:
        assert image_latent is not None
        noise = to_device(noise, device)
        latent = sampler.add_noise(model.schedule, image_latent, noise, [plan], [plan.start])
    else:
        latent = to_device(noise * plan.init_noise_sigma, device)
    if mode != "inpaint":
        return ImageStart(latent)
    assert encoded is not None and encoded.mask is not None
    if encoded.masked is None:  # a 4-channel UNet: diffusers' masked-image draw, unused
        torch.randn(shape, generator=generator)  # draw 3
        assert image_latent is not None
        return ImageStart(latent, blend=Blend(image_latent, to_device(noise, device), encoded.mask))
    masked_latent = encoded.masked.sample(generator) * scaling  # draw 3
    image_cond = torch.cat([encoded.mask, masked_latent], dim=1).to(model.dtype)
    return ImageStart(latent, image_cond=image_cond)


def blended(
    sampler: Sampler,
    model: StableDiffusion,
    samples: torch.Tensor,
    states: Sequence[RowState],
    blends: Sequence[Blend | None],
) -> torch.Tensor:
    """Rows (R, C, h, w) after a step of `sampler` (their new `states`), those inpainted with a 4-channel
    UNet blended with their init image's latent as diffusers' inpainting pipeline does: noised to the
    level of the next step with the first noise (clean after the last step) where the mask keeps it."""
    rows = [r for r, blend in enumerate(blends) if blend is not None]
    if not rows:
        return samples
    chosen: list[Blend] = [blends[r] for r in rows]  # type: ignore[misc]
    proper = torch.cat([blend.image_latent for blend in chosen])
    noisy = [i for i, r in enumerate(rows) if not states[r].done]
    if noisy:
        levels = [states[rows[i]].step_index for i in noisy]
        plans = [states[rows[i]].plan for i in noisy]
        noise = torch.cat([chosen[i].noise for i in noisy])
        noised = sampler.add_noise(model.schedule, proper[noisy], noise, plans, levels)
        proper = proper.index_copy(0, to_device(torch.tensor(noisy), proper.device), noised)
    mask = torch.cat([blend.mask for blend in chosen])
    index = to_device(torch.tensor(rows), samples.device)
    result = (1 - mask) * proper + mask * samples[index]
    return samples.index_copy(0, index, result)
