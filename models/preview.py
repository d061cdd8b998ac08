"""A cheap look at a latent while it is being denoised: a fixed linear map from latent channels to RGB.

No VAE call: one small matrix product per pixel of the latent (8x smaller than the picture on each
side). For the 4-channel KL autoencoder of SD 1.x and 2.x, the factors below are the well-known
least-squares fit of decoded RGB on latent channels (the "cheap approximation" of A1111's web UI;
fitted by keturn, "Decoding latents to RGB without upscaling"); applied to the scaled latent the
sampler works on, they give roughly [-1, 1]. Other channel counts get a generic map: channel c
feeds colour c mod 3, then the result is stretched to the full range.
"""

from __future__ import annotations

import torch

# (4, 3): rows are latent channels, columns R, G, B.
SD_LATENT_RGB_FACTORS = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


def generic_factors(channels: int) -> torch.Tensor:
    """(C, 3): channel c adds to colour c mod 3, each colour the mean of its channels."""
    if channels < 1:
        raise ValueError(f"a latent needs at least 1 channel, got {channels}")
    factors = torch.zeros(channels, 3)
    for c in range(channels):
        factors[c, c % 3] = 1.0
    counts = factors.sum(dim=0).clamp(min=1.0)
    return factors / counts


@torch.no_grad()
def latent_to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """(C, h, w) or (1, C, h, w) latent on any device -> (h, w, 3) uint8 image on the CPU."""
    if latent.ndim == 4:
        if latent.shape[0] != 1:
            raise ValueError(f"expected one latent, got a batch of {latent.shape[0]}")
        latent = latent[0]
    if latent.ndim != 3:
        raise ValueError(f"expected a (C, h, w) or (1, C, h, w) latent, got shape {tuple(latent.shape)}")
    channels = latent.shape[0]
    x = latent.float()
    if channels == len(SD_LATENT_RGB_FACTORS):
        factors = torch.tensor(SD_LATENT_RGB_FACTORS, device=x.device)
        rgb = torch.einsum("chw,cr->hwr", x, factors)  # (h, w, 3), about [-1, 1]
        unit = (rgb + 1.0) / 2.0
    else:
        rgb = torch.einsum("chw,cr->hwr", x, generic_factors(channels).to(x.device))
        low, high = rgb.amin(), rgb.amax()
        unit = (rgb - low) / (high - low).clamp(min=1e-3)  # a flat latent stays flat, no NaN
    return (unit.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu()
