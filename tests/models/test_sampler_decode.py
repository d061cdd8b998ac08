"""The Pipeline's decode: a float16 VAE against float32, the float32 fallback decoder taking over a
float16 decode that overflows, and non-finite results failing loudly instead of black pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.loading import load_model
from models.pipeline import Pipeline
from models.stable_diffusion import StableDiffusion

# x10,000 puts the unscaled latents past float16's largest value (65504): a float16 decode gives
# inf/NaN, a float32 one finite pixels
OVERFLOWING = 1e4


@pytest.fixture(scope="module")
def float32_model(random_models: dict[str, Path]) -> StableDiffusion:
    return load_model(random_models["sd1"])


@pytest.fixture(scope="module")
def float16_vae_model(random_models: dict[str, Path]) -> StableDiffusion:
    return load_model(random_models["sd1"], vae_dtype=torch.float16, vae_fallback=True)


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))


def pixels(model: StableDiffusion, latents: torch.Tensor) -> np.ndarray:
    return Pipeline(model).decode_latents(latents).astype(np.int16)


def test_fallback_is_a_float32_decoder_without_the_encoder(float16_vae_model: StableDiffusion) -> None:
    fallback = float16_vae_model.vae_fallback
    assert fallback is not None and fallback.encoder is None and fallback.quant_conv is None
    assert {p.dtype for p in fallback.parameters()} == {torch.float32}
    assert float16_vae_model.vae_dtype == torch.float16


def test_fallback_weights_are_the_checkpoint_s_not_float16_rounded(
    float32_model: StableDiffusion, float16_vae_model: StableDiffusion
) -> None:
    fallback = float16_vae_model.vae_fallback.state_dict()
    original = float32_model.vae.state_dict()
    assert fallback.keys() <= original.keys() and any(k.startswith("decoder.") for k in fallback)
    for key, value in fallback.items():
        assert torch.equal(value, original[key]), key


def test_float16_decode_is_within_one_level_of_float32(
    float32_model: StableDiffusion, float16_vae_model: StableDiffusion, latents: torch.Tensor
) -> None:
    difference = np.abs(pixels(float16_vae_model, latents) - pixels(float32_model, latents))
    assert difference.max() <= 1 and difference.mean() < 0.2


def test_an_overflowing_float16_decode_is_done_again_in_float32(
    float32_model: StableDiffusion,
    float16_vae_model: StableDiffusion,
    latents: torch.Tensor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    huge = latents * OVERFLOWING
    scaled = (huge / float16_vae_model.vae.config.scaling_factor).half()
    assert not float16_vae_model.vae.decode(scaled).isfinite().all()  # the case this is about
    with caplog.at_level("WARNING", logger="models.pipeline"):
        got = pixels(float16_vae_model, huge)
    np.testing.assert_array_equal(got, pixels(float32_model, huge))  # the float32 decode, exactly
    assert "overflowed: decoding them again in float32" in caplog.text


def test_only_the_latents_that_overflow_are_decoded_again(
    float32_model: StableDiffusion,
    float16_vae_model: StableDiffusion,
    latents: torch.Tensor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mixed = torch.cat([latents[:1], latents[1:] * OVERFLOWING])  # row 0 fine, row 1 overflows
    with caplog.at_level("WARNING", logger="models.pipeline"):
        got = pixels(float16_vae_model, mixed)
    assert "decode of 1 latents overflowed" in caplog.text
    np.testing.assert_array_equal(got[1], pixels(float32_model, mixed[1:])[0])  # float32's, exactly
    np.testing.assert_array_equal(got[0], pixels(float16_vae_model, mixed[:1])[0])  # float16's


def test_without_a_fallback_an_overflow_fails_loudly(
    random_models: dict[str, Path], latents: torch.Tensor
) -> None:
    model = load_model(random_models["sd1"], vae_dtype=torch.float16)
    assert model.vae_fallback is None
    with pytest.raises(FloatingPointError, match="torch.float16 VAE decode overflowed"):
        Pipeline(model).decode_latents(latents * OVERFLOWING)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_latents_fail_instead_of_black_pictures(
    float16_vae_model: StableDiffusion, float32_model: StableDiffusion, latents: torch.Tensor, bad: float
) -> None:
    broken = latents.clone()
    broken[1, 0, 3, 3] = bad
    for model in (float16_vae_model, float32_model):
        with pytest.raises(FloatingPointError, match="latents hold inf/NaN"):
            Pipeline(model).decode_latents(broken)


def test_the_fallback_is_kept_only_for_a_float16_vae(random_models: dict[str, Path]) -> None:
    assert load_model(random_models["sd1"], vae_fallback=True).vae_fallback is None  # float32
    bf16 = load_model(random_models["sd1"], vae_dtype=torch.bfloat16, vae_fallback=True)
    assert bf16.vae_fallback is None  # bfloat16 has float32's range: it does not overflow


def test_the_fallback_must_be_copied_from_float32_weights(random_models: dict[str, Path]) -> None:
    model = load_model(random_models["sd1"], vae_dtype=torch.float16)
    with pytest.raises(ValueError, match="from a float32 VAE"):
        model.keep_float32_decoder()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float16_decode_and_its_fallback(random_models: dict[str, Path], latents: torch.Tensor) -> None:
    """On the GPU, as the worker runs it: float16 VAE in channels_last within a level of float32, and
    the float32 fallback giving the float32 decode of latents that overflow float16."""
    from models.accel import AccelConfig, apply_backend_flags, set_memory_format

    apply_backend_flags(AccelConfig())  # float32 without TF32: the reference is exact float32
    reference = load_model(random_models["sd1"], "cuda")
    model = load_model(random_models["sd1"], "cuda", vae_dtype=torch.float16, vae_fallback=True)
    set_memory_format(model, True)
    z = latents.cuda()
    difference = np.abs(pixels(model, z) - pixels(reference, z))
    assert difference.max() <= 1
    huge = z * OVERFLOWING
    assert np.abs(pixels(model, huge) - pixels(reference, huge)).max() <= 1  # the layouts differ
