"""A cheap look at a latent while it is being denoised: an affine map from latent channels to RGB.

No VAE call per preview: one small matrix product per pixel of the latent (8x smaller than the
picture on each side for SD). The map that fits a model is fitted once, against its own VAE
(`fit_rgb_map`): a few synthetic pictures (flat blocks and smooth gradients of random colours) are
encoded, so the latents are ones the decoder knows, decoded again, and the decoded pictures,
averaged over each latent cell, regressed on the latent channels and a bias by least squares.
What the live previews show is the sampler's current estimate of the clean latent (`ActiveImage.
denoised`), on the same scale as the latents the map was fitted on.

Without a fitted map: for the 4-channel KL autoencoder of SD 1.x and 2.x, the well-known fixed
least-squares factors (the "cheap approximation" of A1111's web UI; fitted by keturn, "Decoding
latents to RGB without upscaling"); other channel counts get a generic map: channel c feeds colour
c mod 3, then the result is stretched to the full range.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from models.stable_diffusion import StableDiffusion

log = logging.getLogger(__name__)

# (4, 3): rows are latent channels, columns R, G, B.
SD_LATENT_RGB_FACTORS = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)

FIT_PICTURES = 4  # synthetic pictures encoded and decoded once per model
FIT_LATENT_SIDE = 12  # latent cells a side of each (96 px for SD's VAE, 48 px for the embedded one)
FIT_COLOUR_CELLS = 4  # random colours a side of each picture, blown up to blocks or gradients
FIT_SEED = 0  # the fit is a function of the model alone
FIT_MIN_CELLS_PER_WEIGHT = 8  # latent cells with finite values the fit needs per weight of a colour


def generic_factors(channels: int) -> torch.Tensor:
    """(C, 3): channel c adds to colour c mod 3, each colour the mean of its channels."""
    if channels < 1:
        raise ValueError(f"a latent needs at least 1 channel, got {channels}")
    factors = torch.zeros(channels, 3)
    for c in range(channels):
        factors[c, c % 3] = 1.0
    counts = factors.sum(dim=0).clamp(min=1.0)
    return factors / counts


def fit_pictures(count: int, side_px: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 3, side_px, side_px) float32 in [-1, 1]: random colours on a coarse grid, blown up to
    flat blocks (even indexes) or smooth gradients (odd ones): the flat areas and soft edges that a
    partly denoised estimate is made of."""
    colours = torch.rand((count, 3, FIT_COLOUR_CELLS, FIT_COLOUR_CELLS), generator=generator) * 2 - 1
    blocks = F.interpolate(colours, size=(side_px, side_px), mode="nearest")
    gradients = F.interpolate(colours, size=(side_px, side_px), mode="bilinear", align_corners=True)
    flat = (torch.arange(count) % 2 == 0).view(-1, 1, 1, 1)
    return torch.where(flat, blocks, gradients)


@torch.no_grad()
def fit_rgb_map(model: StableDiffusion) -> torch.Tensor:
    """(C + 1, 3) float32 CPU: latent channels and a bias -> RGB in [-1, 1], the least-squares fit of
    this model's VAE decodes averaged over each latent cell (see the module docstring)."""
    started = time.perf_counter()
    f, scaling = model.vae_scale_factor, model.vae.config.scaling_factor
    generator = torch.Generator("cpu").manual_seed(FIT_SEED)
    pictures = fit_pictures(FIT_PICTURES, FIT_LATENT_SIDE * f, generator)
    vae = model.vae
    mean, _ = vae.encode(pictures.to(model.device, model.vae_dtype))
    latents = mean.float() * scaling  # the scale the sampler works in
    decoded = vae.decode((latents / scaling).to(model.vae_dtype)).float().clamp(-1, 1)
    targets = F.avg_pool2d(decoded, f)  # (N, 3, h, w): each latent cell's mean colour
    channels = latents.shape[1]
    inputs = torch.cat([latents, torch.ones_like(latents[:, :1])], dim=1)  # (N, C + 1, h, w)
    a = inputs.permute(0, 2, 3, 1).reshape(-1, channels + 1).cpu()
    b = targets.permute(0, 2, 3, 1).reshape(-1, 3).cpu()
    # a float16 VAE can overflow on a cell or two: fit on the rest, refuse when too little is left
    finite = a.isfinite().all(dim=1) & b.isfinite().all(dim=1)
    if int(finite.sum()) < FIT_MIN_CELLS_PER_WEIGHT * (channels + 1):
        raise FloatingPointError(f"the VAE gave finite values on {int(finite.sum())} of {len(a)} cells only")
    weights = torch.linalg.lstsq(a[finite], b[finite]).solution  # (C + 1, 3)
    log.info("live previews: latent -> RGB map fitted to the VAE in %.2f s", time.perf_counter() - started)
    return weights


def rgb_map(model: StableDiffusion) -> torch.Tensor:
    """The model's fitted map (`fit_rgb_map`), fitted at the first call and kept on the model."""
    if model.preview_rgb_map is None:
        model.preview_rgb_map = fit_rgb_map(model)
    return model.preview_rgb_map


@torch.no_grad()
def latent_to_rgb(latent: torch.Tensor, rgb_map: torch.Tensor | None = None) -> torch.Tensor:
    """(C, h, w) or (1, C, h, w) latent on any device -> (h, w, 3) uint8 image on the CPU, through
    `rgb_map` ((C + 1, 3), `fit_rgb_map`), else the fixed SD factors or the generic map."""
    if latent.ndim == 4:
        if latent.shape[0] != 1:
            raise ValueError(f"expected one latent, got a batch of {latent.shape[0]}")
        latent = latent[0]
    if latent.ndim != 3:
        raise ValueError(f"expected a (C, h, w) or (1, C, h, w) latent, got shape {tuple(latent.shape)}")
    channels = latent.shape[0]
    x = latent.float()
    if rgb_map is not None:
        if rgb_map.shape != (channels + 1, 3):
            raise ValueError(
                f"a {channels}-channel latent needs a ({channels + 1}, 3) map, got {tuple(rgb_map.shape)}"
            )
        weights = rgb_map.to(x.device, torch.float32)
        rgb = torch.einsum("chw,cr->hwr", x, weights[:-1]) + weights[-1]  # (h, w, 3), about [-1, 1]
        unit = (rgb + 1.0) / 2.0
    elif channels == len(SD_LATENT_RGB_FACTORS):
        factors = torch.tensor(SD_LATENT_RGB_FACTORS, device=x.device)
        rgb = torch.einsum("chw,cr->hwr", x, factors)  # (h, w, 3), about [-1, 1]
        unit = (rgb + 1.0) / 2.0
    else:
        rgb = torch.einsum("chw,cr->hwr", x, generic_factors(channels).to(x.device))
        low, high = rgb.amin(), rgb.amax()
        unit = (rgb - low) / (high - low).clamp(min=1e-3)  # a flat latent stays flat, no NaN
    return (unit.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu()
