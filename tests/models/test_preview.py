"""models/preview.py: the fixed latent -> RGB map used for live previews."""

from __future__ import annotations

import pytest
import torch

from models.preview import SD_LATENT_RGB_FACTORS, generic_factors, latent_to_rgb


def test_shape_dtype_and_device() -> None:
    latent = torch.randn(1, 4, 8, 12)
    image = latent_to_rgb(latent)
    assert image.shape == (8, 12, 3) and image.dtype == torch.uint8 and image.device.type == "cpu"
    assert torch.equal(image, latent_to_rgb(latent[0]))  # (C, h, w) too


def test_sd_factors_map_each_channel_to_its_colour() -> None:
    for channel, factors in enumerate(SD_LATENT_RGB_FACTORS):
        latent = torch.zeros(4, 1, 1)
        latent[channel] = 1.0
        expected = [round((f + 1) / 2 * 255) for f in factors]
        assert latent_to_rgb(latent)[0, 0].tolist() == expected
    assert latent_to_rgb(torch.zeros(4, 2, 2)).unique().tolist() == [128]  # zero latent: mid grey


def test_out_of_range_values_are_clipped() -> None:
    latent = torch.zeros(4, 1, 2)
    latent[3, 0, 0], latent[3, 0, 1] = 10.0, -10.0  # channel 4 pulls every colour strongly
    assert latent_to_rgb(latent)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


@pytest.mark.parametrize("channels", [1, 3, 8, 16])
def test_other_channel_counts_use_the_generic_map(channels: int) -> None:
    factors = generic_factors(channels)
    assert factors.shape == (channels, 3)
    assert torch.allclose(factors.sum(dim=0)[: min(channels, 3)], torch.ones(min(channels, 3)))
    image = latent_to_rgb(torch.linspace(-3, 3, channels * 16).reshape(channels, 4, 4))
    assert image.shape == (4, 4, 3)
    assert image.min() == 0 and image.max() == 255  # stretched to the full range
    flat = latent_to_rgb(torch.full((channels, 2, 2), 5.0))
    assert (flat == flat[0, 0]).all()  # a flat latent gives a flat picture (no NaN, no noise blown up)


def test_rejects_batches_and_wrong_ranks() -> None:
    with pytest.raises(ValueError, match="batch of 2"):
        latent_to_rgb(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        latent_to_rgb(torch.zeros(4, 8))
