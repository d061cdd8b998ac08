"""Our KL autoencoder against diffusers' `AutoencoderKL` (the reference), on the tiny config."""

from __future__ import annotations

import pytest
import torch

from models.configs import VAEConfig
from models.tiny_configs import tiny_config
from models.vae import AutoencoderKL, convert_deprecated_vae_attention_keys

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-4  # max abs error allowed against diffusers in float32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than several, and immune to a shared,
    oversubscribed CPU, where OpenMP threads waiting on each other made tests 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded noise, so no zero-initialised layer hides a bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:  # biases and norm scales: around 0 and 1
                param.copy_(0.1 * noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
            else:  # fan-in scaling keeps activations O(1) through the network
                param.copy_(noise / param[0].numel() ** 0.5)


def build_pair(overrides: dict | None = None) -> tuple[torch.nn.Module, AutoencoderKL]:
    """(diffusers VAE, our VAE) with the same random weights, from the tiny config + overrides."""
    config = {**tiny_config("sd1")["vae"], **(overrides or {})}
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    randomize_(reference, seed=1)
    ours = AutoencoderKL(VAEConfig.from_dict(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, AutoencoderKL]:
    return build_pair()


def randn(*shape: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(2, 3, 24, 40), (1, 3, 30, 18)], ids=["non-square", "not-multiple-of-8"])
def test_encode_matches_diffusers(models, shape):
    reference, ours = models
    image = randn(*shape)
    with torch.no_grad():
        posterior = reference.encode(image).latent_dist
        mean, logvar = ours.encode(image)
    assert mean.shape == posterior.mean.shape
    assert mean.abs().mean() > 0.05 and logvar.abs().mean() > 0.05
    torch.testing.assert_close(mean, posterior.mean, rtol=0, atol=ATOL)
    torch.testing.assert_close(logvar, posterior.logvar, rtol=0, atol=ATOL)


def test_decode_matches_diffusers(models):
    reference, ours = models
    latent = randn(2, 4, 5, 3)
    with torch.no_grad():
        expected = reference.decode(latent).sample
        got = ours.decode(latent)
    assert got.shape == (2, 3, 40, 24)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_logvar_is_clamped_like_diffusers():
    reference, ours = build_pair()
    with torch.no_grad():
        for model in (reference, ours):
            model.quant_conv.bias[4:] += 100.0  # push logvar far above the clamp
        image = randn(1, 3, 16, 16)
        _, logvar = ours.encode(image)
        expected = reference.encode(image).latent_dist.logvar
    assert torch.all(logvar == 20.0)
    torch.testing.assert_close(logvar, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [{"use_quant_conv": False, "use_post_quant_conv": False}, {"mid_block_add_attention": False}],
    ids=["no-quant-convs", "no-mid-attention"],
)
def test_variants_match_diffusers(overrides):
    reference, ours = build_pair(overrides)
    image, latent = randn(1, 3, 16, 24), randn(1, 4, 3, 2)
    with torch.no_grad():
        mean, logvar = ours.encode(image)
        posterior = reference.encode(image).latent_dist
        torch.testing.assert_close(mean, posterior.mean, rtol=0, atol=ATOL)
        torch.testing.assert_close(logvar, posterior.logvar, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.decode(latent), reference.decode(latent).sample, rtol=0, atol=ATOL)


def test_bfloat16_close_to_float32(models):
    _, ours = models
    ours_bf16 = AutoencoderKL(ours.config).eval()
    ours_bf16.load_state_dict(ours.state_dict())
    ours_bf16 = ours_bf16.to(torch.bfloat16)
    latent, image = randn(1, 4, 5, 3), randn(1, 3, 24, 16)
    with torch.no_grad():
        pairs = [(ours_bf16.decode(latent.bfloat16()), ours.decode(latent))]
        pairs += list(zip(ours_bf16.encode(image.bfloat16()), ours.encode(image), strict=True))
    for got, expected in pairs:
        assert got.dtype == torch.bfloat16
        error = (got.float() - expected).abs()
        assert error.mean() < 0.02 * expected.abs().mean(), (error.mean(), expected.abs().mean())
        assert error.max() < 0.1 * expected.abs().max(), (error.max(), expected.abs().max())


def test_channels_last_matches_contiguous(models):
    _, ours = models
    ours_cl = AutoencoderKL(ours.config).eval().to(memory_format=torch.channels_last)
    ours_cl.load_state_dict(ours.state_dict())
    latent = randn(1, 4, 5, 3).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(ours_cl.decode(latent), ours.decode(latent), rtol=0, atol=1e-5)


def test_scaling_factor_from_config():
    assert AutoencoderKL(VAEConfig.from_dict(tiny_config("sd1")["vae"])).config.scaling_factor == 0.18215
    assert (
        AutoencoderKL(VAEConfig(block_out_channels=(32,), scaling_factor=0.13025)).config.scaling_factor
        == 0.13025
    )


def test_convert_deprecated_attention_keys(models):
    """Old diffusers folders name the mid-block attention query/key/value/proj_attn."""
    _, ours = models
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old_state = {}
    for key, value in ours.state_dict().items():
        for new, old in new_to_old.items():
            key = key.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{old}.")
        old_state[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old_state
    assert "encoder.mid_block.attentions.0.query.bias" in old_state

    converted = convert_deprecated_vae_attention_keys(old_state)
    assert converted.keys() == ours.state_dict().keys()
    fresh = AutoencoderKL(ours.config)
    fresh.load_state_dict(converted, strict=True)
    # already-converted dicts pass through unchanged; other "query" keys are not touched
    assert convert_deprecated_vae_attention_keys(converted).keys() == converted.keys()
    untouched = {"decoder.up_blocks.0.attentions.0.query.weight": torch.zeros(1)}
    assert convert_deprecated_vae_attention_keys(untouched).keys() == untouched.keys()


def test_compiles_as_one_graph(models):
    """No graph breaks: fit for torch.compile / CUDA graphs (the "eager" backend only traces)."""
    _, ours = models
    latent, image = randn(1, 4, 5, 3), randn(1, 3, 16, 24)
    torch._dynamo.reset()
    with torch.no_grad():
        decoded = torch.compile(ours.decode, fullgraph=True, backend="eager")(latent)
        mean, logvar = torch.compile(ours.encode, fullgraph=True, backend="eager")(image)
        torch.testing.assert_close(decoded, ours.decode(latent), rtol=0, atol=0)
        torch.testing.assert_close(mean, ours.encode(image)[0], rtol=0, atol=0)
