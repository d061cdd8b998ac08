"""Batched, step-wise generation (text-to-image, img2img, inpainting): the API the worker's engine drives.

Several requests advance together. Requests whose latents have the same shape share every UNet
call even when they are at different steps (one timestep, eta and guidance scale per row), and a
request can join or leave between steps. A picture never depends on what else is in the batch:
image i of a request with seed s draws its initial latent and its per-step eta noise from its own
CPU generator seeded s + i, exactly as diffusers does when called with a list of CPU generators. An img2img or inpainting image
is one that starts later in its schedule, from its init image's latent (models/img2img.py), so it
shares UNet calls with text-to-image images; the VAE encodes input images in batches, as it decodes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from models.blocks import guidance_embedding
from models.families import Conditioning, family_of
from models.image_inputs import ImageInputs
from models.img2img import Blend, EncodedInputs, InputEncoder, blended, start_image
from models.lora.library import LoraLibrary, RowLoras
from models.lora.text import TextLora, text_adapters_applied
from models.samplers import RowState, Sampler, get_sampler
from models.samplers.base import NoiseSource
from models.stable_diffusion import StableDiffusion
from models.text import CHUNK_TOKENS, MAX_CHUNKS, MAX_PROMPT_TOKENS
from models.transfer import to_device
from schemas.generation import Generation

log = logging.getLogger(__name__)

# (sample (B, C, h, w), timesteps (B,), context (B, L, D), mask (B, L) bool or None, per-row inputs by
# name (each (B, ...)) or None) -> (B, C', h, w):
# the UNet's call signature, so a faster runner of the same function (models/accel.py) can stand in
UNetCall = Callable[..., torch.Tensor]
# unscaled latents (B, C, h, w) in the VAE's dtype -> images (B, 3, H, W): `vae.decode`'s signature
VAEDecode = Callable[[torch.Tensor], torch.Tensor]


def check_generation(model: StableDiffusion, generation: Generation) -> None:
    """Raise ValueError naming the first field outside what this model can do (the bounds every model
    shares are Generation's own, checked when it was built)."""
    multiple = model.vae_scale_factor
    for name, value in (("width", generation.width), ("height", generation.height)):
        if value < multiple or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} for this model, got {value}")
    if generation.steps > model.schedule.max_steps:
        raise ValueError(
            f"steps must be between 1 and {model.schedule.max_steps} for this model, got {generation.steps}"
        )
    for name, text in (("prompt", generation.prompt), ("negative_prompt", generation.negative_prompt)):
        tokens = len(
            model.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        )
        if tokens > MAX_PROMPT_TOKENS:
            raise ValueError(
                f"{name} is {tokens} CLIP tokens long; at most {MAX_PROMPT_TOKENS} "
                f"({MAX_CHUNKS} chunks of {CHUNK_TOKENS}) are allowed"
            )
    # the sampler's plan: what its schedule refuses on this model (e.g. lcm's longest run)
    get_sampler(generation.sampler).plan(model.schedule, generation)
    # what the model's family refuses (SDXL's size fields on an SD 1.x/2.x model)
    family_of(model).check_generation(model, generation)


def classifier_free(model: StableDiffusion) -> bool:
    """Whether guidance takes an unconditional pass: not for LCM-distilled UNets, which take the
    guidance scale as an embedding instead (time_cond_proj_dim)."""
    return model.unet.config.time_cond_proj_dim is None


@dataclass(frozen=True)
class Picture:
    """A decoded image and the seed it was generated with (what its PNG records)."""

    pixels: np.ndarray  # (H, W, 3) uint8
    seed: int


@dataclass(eq=False)
class ActiveImage:
    """One image of a request on its way: its latent and where it is in its sampler's plan.

    Images, not requests, are the unit of batching, so a big request can be split over several
    UNet calls (row limit, out-of-memory retries) and its images paused and resumed between steps
    without changing any pixel.
    """

    key: Hashable  # the caller's id of the request this image belongs to
    seed: int
    request: Generation
    latent: torch.Tensor  # (1, C, h, w) float32 on the model's device, in its sampler's scale
    generator: torch.Generator  # CPU generator seeded `seed`: initial latent, then any step noise
    cond: torch.Tensor  # (L, D) prompt embedding, shared by the request's images
    uncond: torch.Tensor | None  # (L, D) negative-prompt embedding; None without guidance
    sampler: Sampler
    state: RowState  # plan, step index and history; replaced (never changed) by each step
    # the UNet's per-row inputs beyond the text (models/unet.py: ROW_INPUTS), (1, ...) each: for the
    # prompt's row, and for the negative prompt's row (guided images)
    row_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    uncond_row_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    denoised: torch.Tensor | None = None  # (1, C, h, w): the last step's estimate of the clean latent
    blend: Blend | None = None  # inpainting with a 4-channel UNet: the init image blended in after steps
    # its request's UNet LoRAs (pool slots and weights; the leases keep the slots while it lives)
    loras: RowLoras | None = None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latent.shape[1:])

    @property
    def rows(self) -> int:
        """UNet rows this image adds to a step (2 with classifier-free guidance)."""
        return 2 if self.uncond is not None else 1

    @property
    def step_index(self) -> int:
        """Its place in the whole schedule (an img2img image starts at its plan's `start`)."""
        return self.state.step_index

    @property
    def steps_done(self) -> int:
        return self.state.step_index - self.state.plan.start

    @property
    def total_steps(self) -> int:
        """The steps it runs (img2img: the end of the schedule only)."""
        return self.state.plan.steps_to_run

    @property
    def done(self) -> bool:
        return self.state.done


class Pipeline:
    """Guided sampling over batches of images, one step at a time, on one loaded model: input images
    encoded (img2img, inpainting), prompt encoding, initial latents, steps (each image with its own
    sampler), VAE decode."""

    def __init__(
        self,
        model: StableDiffusion,
        max_text_batch: int = 64,
        unet_runner: UNetCall | None = None,
        vae_decoder: VAEDecode | None = None,
        loras: LoraLibrary | None = None,
    ) -> None:
        """`max_text_batch`: prompt chunks per text-encoder call. `unet_runner`: called instead of
        `model.unet` for every denoising step (e.g. models.accel.UNetRunner: CUDA graphs).
        `vae_decoder`: called instead of `model.vae.decode` (e.g. models.accel.VAEDecoder). `loras`:
        the LoRAs requests may name (None: a request naming one is refused)."""
        self.model = model
        self.loras = loras
        # how prompts become the UNet's conditioning: the model family's business (models/families)
        self.prompts = family_of(model).prompt_encoder(model, max_text_batch)
        self.unet: UNetCall = unet_runner if unet_runner is not None else model.unet
        self.vae_decode: VAEDecode = vae_decoder if vae_decoder is not None else model.vae.decode
        self.input_encoder = InputEncoder(model)

    def encode_inputs(
        self, requests: Sequence[tuple[Generation, ImageInputs | None]], max_batch: int = 8
    ) -> list[EncodedInputs | None]:
        """Each request's input images through the VAE encoder, at most `max_batch` per VAE call (None:
        a request that needs none); see models/img2img.py: InputEncoder."""
        return self.input_encoder.encode(requests, max_batch)

    @torch.no_grad()
    def start(
        self,
        items: Sequence[tuple[Hashable, Generation]],
        inputs: Sequence[EncodedInputs | None] | None = None,
    ) -> list[list[ActiveImage]]:
        """Validate and admit requests: place their LoRAs (pool slots; LoraSlotsBusy when they cannot be
        now), encode all their prompts in one batch (one per set of text-encoder LoRAs), draw their
        first latents
        (from `inputs`, each request's encoded input images, `encode_inputs`; None: encoded here, which
        only requests without input images can be).

        Returns the images of each request, in order.
        """
        for _, request in items:
            check_generation(self.model, request)
        if inputs is None:
            inputs = self.input_encoder.encode([(request, None) for _, request in items])
        if len(inputs) != len(items):
            raise ValueError(f"{len(items)} requests but {len(inputs)} encoded inputs")
        # every request's LoRAs placed first: one that cannot be (slots busy, a bad file) changes nothing
        loras = [self._lease_loras(request) for _, request in items]
        pairs = self._encode_prompts([request for _, request in items], [text for _, text in loras])
        model, f = self.model, self.model.vae_scale_factor
        result = []
        for (key, request), (cond, uncond), encoded, (row_loras, _) in zip(
            items, pairs, inputs, loras, strict=True
        ):
            shape = (1, model.latent_channels, request.height // f, request.width // f)
            sampler = get_sampler(request.sampler)
            plan = sampler.plan(model.schedule, request)
            images = []
            # the request's own inputs are the same for its prompt's and negative prompt's rows
            row_inputs = request_row_inputs(model, request)
            prompt_row_inputs = {**row_inputs, **cond.row_inputs}
            negative_row_inputs = {**row_inputs, **(uncond.row_inputs if uncond is not None else {})}
            for seed in request.image_seeds():
                generator = torch.Generator("cpu").manual_seed(seed)
                # the first latent: noise, or the init image noised (its draws in diffusers' order)
                begun = start_image(model, sampler, plan, request, encoded, generator, shape)
                image = ActiveImage(
                    key,
                    seed,
                    request,
                    begun.latent,
                    generator,
                    cond.context,
                    None if uncond is None else uncond.context,
                    sampler,
                    RowState.first(plan),
                    blend=begun.blend,
                    loras=row_loras,
                )
                image.row_inputs = prompt_row_inputs
                image.uncond_row_inputs = negative_row_inputs
                if begun.image_cond is not None:  # an inpainting UNet's, the same for both rows
                    image.row_inputs = {**prompt_row_inputs, "image_cond": begun.image_cond}
                    image.uncond_row_inputs = {**negative_row_inputs, "image_cond": begun.image_cond}
                images.append(image)
            result.append(images)
        return result

    def _lease_loras(self, request: Generation) -> tuple[RowLoras | None, list[TextLora]]:
        if not request.loras:
            return None, []
        if self.loras is None:
            raise ValueError("this worker serves no LoRAs (SD_LORA_DIR is not set)")
        return self.loras.lease(request.loras)

    def _encode_prompts(
        self, requests: Sequence[Generation], texts: Sequence[list[TextLora]]
    ) -> list[tuple[Conditioning, Conditioning | None]]:
        """Every request's (cond, uncond), in one batch per set of text-encoder LoRAs (most requests:
        one batch), each set's adapters applied while its prompts are encoded."""
        # LCM-distilled UNets (time_cond_proj_dim): no unconditional pass, see request_row_inputs
        unconditional = classifier_free(self.model)
        groups: dict[tuple, list[int]] = {}
        for position, (request, text) in enumerate(zip(requests, texts, strict=True)):
            key = tuple((ref.name, ref.weight) for ref in request.loras) if text else ()
            groups.setdefault(key, []).append(position)
        pairs: list = [None] * len(requests)
        for positions in groups.values():
            text = texts[positions[0]]
            chosen = [requests[p] for p in positions]
            applied = (
                text_adapters_applied(self.loras.text_encoders, text)
                if text and self.loras is not None
                else contextlib.nullcontext()
            )
            with applied:
                encoded = self.prompts.encode_pairs(
                    [r.prompt for r in chosen],
                    [r.negative_prompt if r.guided and unconditional else None for r in chosen],
                )
            for p, pair in zip(positions, encoded, strict=True):
                pairs[p] = pair
        return pairs

    @torch.no_grad()
    def step(self, images: Sequence[ActiveImage]) -> None:
        """Advance every image by one step of its own sampler, with ONE UNet call.

        All must have the same latent shape and none may be done. Rows: every image with its prompt
        context, then the guided images again with their negative-prompt context. After the call
        the rows are grouped by sampler, each group stepped in one vectorised call. If anything
        raises (e.g. out of memory), no image has changed, generators included: the step can be
        retried as it was.
        """
        if not images:
            return
        if len({i.latent_shape for i in images}) > 1:
            raise ValueError("images in one UNet call must have the same latent shape")
        if any(i.done for i in images):
            raise ValueError("a finished image cannot take another step")
        model = self.model
        groups = _group_by_sampler(images)

        sample = torch.cat([i.latent for i in images])  # (R, C, h, w) float32, each in its sampler's scale
        model_input = sample
        for sampler, rows in groups:
            if type(sampler).scale_input is not Sampler.scale_input:
                scaled = sampler.scale_input(sample[rows.device_index], [images[r].state for r in rows.rows])
                model_input = model_input.index_copy(0, rows.device_index, scaled)
        timesteps = torch.stack([i.state.plan.timesteps[i.step_index] for i in images])  # (R,) float32
        guidance = torch.tensor([i.request.guidance_scale for i in images], dtype=torch.float32)
        guided_rows = torch.tensor(
            [r for r, i in enumerate(images) if i.uncond is not None], dtype=torch.long
        )

        contexts = [i.cond for i in images] + [i.uncond for i in images if i.uncond is not None]
        context, mask = _stack_contexts(contexts)
        # host-to-device copies without a host sync: the host queues this step behind the last one
        index = to_device(guided_rows, sample.device)
        unet_input = torch.cat([model_input, model_input[index]]).to(model.dtype)
        unet_t = to_device(torch.cat([timesteps, timesteps[guided_rows]]), model.device)
        row_inputs = _stack_row_inputs(images, model.device)
        lora_inputs = _lora_row_inputs(images, model.device, model.dtype)
        if lora_inputs:
            row_inputs = {**(row_inputs or {}), **lora_inputs}
        output = self.unet(unet_input, unet_t, context, mask, row_inputs).float()

        count = len(images)
        noise_pred = output[:count]
        if len(guided_rows):
            noise_pred = noise_pred.index_put(
                (index,), guided_noise(noise_pred[index], output[count:], guidance[guided_rows])
            )

        # every image's noise from its own generator, as diffusers' schedulers draw it; saved states
        # let a failed step be retried with the same noise
        states = [i.generator.get_state() for i in images]
        try:
            results = [
                (rows, sampler, sampler.step(
                    model.schedule,
                    noise_pred[rows.device_index],
                    sample[rows.device_index],
                    [images[r].state for r in rows.rows],
                    _noise_source([images[r] for r in rows.rows], sample.device),
                ))
                for sampler, rows in groups
            ]  # fmt: skip
            # inpainting with a 4-channel UNet: the init image blended back in where the mask keeps it
            latents = [
                blended(sampler, model, result.samples, result.states, [images[r].blend for r in rows.rows])
                for rows, sampler, result in results
            ]
        except BaseException:
            for image, state in zip(images, states, strict=True):
                image.generator.set_state(state)
            raise
        for (rows, _, result), samples in zip(results, latents, strict=True):
            for position, r in enumerate(rows.rows):
                image = images[r]
                image.latent = samples[position : position + 1]
                image.state = result.states[position]
                if result.denoised is not None:
                    image.denoised = result.denoised[position : position + 1]

    @torch.no_grad()
    def decode(self, images: Sequence[ActiveImage], max_batch: int = 8) -> list[np.ndarray]:
        """Decode finished images to (H, W, 3) uint8 arrays, in order; at most `max_batch` latents
        per VAE call, so memory stays bounded."""
        result: list[np.ndarray | None] = [None] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for position, image in enumerate(images):
            by_shape.setdefault(image.latent_shape, []).append(position)
        for positions in by_shape.values():
            for start in range(0, len(positions), max_batch):
                chunk = positions[start : start + max_batch]
                decoded = self.decode_latents(torch.cat([images[p].latent for p in chunk]))
                for p, array in zip(chunk, decoded, strict=True):
                    result[p] = array
        return result  # type: ignore[return-value]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """(N, C, h, w) latents -> (N, H, W, 3) uint8, as diffusers' pipeline post-processes them.

        Latents whose decode gives inf/NaN (a float16 VAE can overflow) are decoded again by the
        float32 fallback decoder when the model keeps one; NaN never becomes a silently black
        picture: what cannot be decoded to finite values raises FloatingPointError."""
        model = self.model
        scaled = latents / model.vae.config.scaling_factor
        decoded = self.vae_decode(scaled.to(model.vae_dtype))
        overflowed = ~decoded.isfinite().flatten(1).all(dim=1)
        if bool(overflowed.any()):
            decoded = decoded.float()
            decoded[overflowed] = self._decode_again(scaled[overflowed])
        image = (decoded.float() / 2 + 0.5).clamp(0, 1)
        return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def _decode_again(self, scaled: torch.Tensor) -> torch.Tensor:
        """These latents' decode overflowed: decode them in float32 if they are finite and a float32
        decoder is kept, else raise."""
        model = self.model
        if not bool(scaled.isfinite().all()):
            raise FloatingPointError(
                f"the denoised latents hold inf/NaN: the UNet overflowed in {model.dtype} "
                "(a float32 or bfloat16 UNet avoids it)"
            )
        if model.vae_dtype == torch.float32:
            raise FloatingPointError("the float32 VAE decode gives inf/NaN")
        if model.vae_fallback is None:
            raise FloatingPointError(
                f"the {model.vae_dtype} VAE decode overflowed to inf/NaN and no float32 decoder is "
                "kept (decode in float32, or keep the float32 fallback)"
            )
        log.warning(
            "the %s VAE decode of %d latents overflowed: decoding them again in float32",
            model.vae_dtype,
            scaled.shape[0],
        )
        decoded = model.vae_fallback.decode(scaled.float())
        if not bool(decoded.isfinite().all()):
            raise FloatingPointError("the VAE decode gives inf/NaN even in float32")
        return decoded


@dataclass(frozen=True)
class _Rows:
    rows: list[int]  # positions in the call
    device_index: torch.Tensor  # the same, as an index tensor on the latents' device


def _group_by_sampler(images: Sequence[ActiveImage]) -> list[tuple[Sampler, _Rows]]:
    """The call's rows grouped by sampler, in order of first appearance."""
    groups: dict[str, tuple[Sampler, list[int]]] = {}
    for position, image in enumerate(images):
        groups.setdefault(image.sampler.name, (image.sampler, []))[1].append(position)
    device = images[0].latent.device
    return [
        (sampler, _Rows(rows, to_device(torch.tensor(rows, dtype=torch.long), device)))
        for sampler, rows in groups.values()
    ]


def _noise_source(images: Sequence[ActiveImage], device: torch.device) -> NoiseSource:
    """Noise for a sampler's rows: a standard normal (1, C, h, w) draw from each marked image's own
    CPU generator (as diffusers draws it from the image's generator), zeros for the others."""

    def draw(marks: Sequence[bool]) -> torch.Tensor:
        noise = [
            torch.randn((1, *i.latent_shape), generator=i.generator)
            if mark
            else torch.zeros((1, *i.latent_shape))
            for i, mark in zip(images, marks, strict=True)
        ]
        return to_device(torch.cat(noise), device)

    return draw


def request_row_inputs(model: StableDiffusion, request: Generation) -> dict[str, torch.Tensor]:
    """The UNet's per-row inputs a request's rows carry beyond its prompts' (the same for its prompt
    and negative-prompt rows), (1, ...) each on the model's device.

    LCM-distilled UNets (time_cond_proj_dim) take the guidance scale as an input instead of an
    unconditional pass: the embedding of w = guidance_scale - 1 in the UNet's dtype, as diffusers'
    StableDiffusionPipeline computes it (there `do_classifier_free_guidance` is then False). The
    model's family adds its own (SDXL: the size/crop numbers `time_ids`)."""
    inputs: dict[str, torch.Tensor] = {}
    dim = model.unet.config.time_cond_proj_dim
    if dim is not None:
        w = torch.tensor([request.guidance_scale - 1], dtype=torch.float32)
        inputs["timestep_cond"] = to_device(guidance_embedding(w, dim).to(model.dtype), model.device)
    inputs.update(family_of(model).request_row_inputs(model, request))
    return inputs


def _stack_row_inputs(images: Sequence[ActiveImage], device: torch.device) -> dict[str, torch.Tensor] | None:
    """The call's per-row inputs, in its row order: every image's prompt row, then the guided
    images' negative-prompt rows."""
    names = images[0].row_inputs.keys()
    if not names:
        return None
    guided = [i for i in images if i.uncond is not None]
    return {
        name: torch.cat(
            [i.row_inputs[name] for i in images] + [i.uncond_row_inputs[name] for i in guided]
        ).to(device)
        for name in names
    }


def _lora_row_inputs(
    images: Sequence[ActiveImage], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The call's LoRA row inputs (models/unet.py: lora_slots, lora_scales, lora_conv_scales) in its
    row order; none when no row has a LoRA. A negative-prompt row carries its image's LoRAs, as
    diffusers applies them to the whole call."""
    rows = [i.loras for i in images] + [i.loras for i in images if i.uncond is not None]
    if all(r is None for r in rows):
        return {}
    width = max(len(r.slots) for r in rows if r is not None)  # K: the most LoRAs on one row
    slots = torch.zeros((len(rows), width), dtype=torch.long)
    scales = torch.zeros((len(rows), width), dtype=torch.float32)
    for position, r in enumerate(rows):
        if r is not None:
            slots[position, : len(r.slots)] = torch.tensor(r.slots)
            scales[position, : len(r.weights)] = torch.tensor(r.weights)
    inputs = {"lora_slots": to_device(slots, device), "lora_scales": to_device(scales.to(dtype), device)}
    if any(r is not None and r.adapts_resnets for r in rows):
        inputs["lora_conv_scales"] = inputs["lora_scales"]
    return inputs


def guided_noise(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + g * (cond - uncond)``, one g per row ((B,) float32)."""
    g = to_device(guidance_scale.to(cond.dtype), cond.device).view(-1, *([1] * (cond.dim() - 1)))
    return uncond + g * (cond - uncond)


def _stack_contexts(contexts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack (L_i, D) contexts into (B, L, D). Shorter ones (fewer prompt chunks) are zero-padded and
    masked out of the cross-attention, so padding changes nothing; no mask when all lengths agree."""
    lengths = [c.shape[0] for c in contexts]
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return torch.stack(contexts), None
    context = contexts[0].new_zeros((len(contexts), longest, contexts[0].shape[1]))
    mask = torch.zeros((len(contexts), longest), dtype=torch.bool, device=context.device)
    for i, c in enumerate(contexts):
        context[i, : c.shape[0]] = c
        mask[i, : c.shape[0]] = True
    return context, mask


def generate(
    model: StableDiffusion,
    request: Generation,
    unet_runner: UNetCall | None = None,
    vae_decoder: VAEDecode | None = None,
    inputs: ImageInputs | None = None,
    loras: LoraLibrary | None = None,
) -> list[np.ndarray]:
    """Run one request alone to the end: its images as (H, W, 3) uint8 arrays. `inputs`: its input
    images (img2img, inpainting), fitted to its size (models/image_inputs.py); `loras`: the LoRAs it
    may name."""
    pipeline = Pipeline(model, unet_runner=unet_runner, vae_decoder=vae_decoder, loras=loras)
    (images,) = pipeline.start([(0, request)], pipeline.encode_inputs([(request, inputs)]))
    while not images[0].done:
        pipeline.step(images)
    return pipeline.decode(images)
