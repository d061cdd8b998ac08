"""Our UNet against diffusers' `UNet2DConditionModel` (the reference), on the tiny SD1/SD2 configs."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from models.blocks import guidance_embedding, multihead_attention
from models.configs import UNetConfig
from models.tiny_configs import tiny_config
from models.unet import UNet2DConditionModel

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
    """Overwrite every parameter with seeded noise: diffusers zero-initialises some layers
    (proj_out, conv_out...), which would hide bugs in whatever comes before them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:  # biases and norm scales: around 0 and 1
                param.copy_(0.1 * noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
            else:  # fan-in scaling keeps activations O(1) through the network
                param.copy_(noise / param[0].numel() ** 0.5)


def diffusers_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def models(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, UNet2DConditionModel, dict]:
    """(diffusers UNet, our UNet with the same random weights, config dict) in eval mode."""
    config = tiny_config(request.param)["unet"]
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**diffusers_kwargs(config)).eval()
    randomize_(reference, seed=1)
    ours = UNet2DConditionModel(UNetConfig.from_dict(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours, config


def inputs(config: dict, shape: tuple[int, ...], context_len: int = 7, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    batch = shape[0]
    sample = torch.randn(shape, generator=generator)
    timesteps = torch.tensor([1, 999, 500, 250][:batch])  # one timestep per row, all different
    context = torch.randn(batch, context_len, config["cross_attention_dim"], generator=generator)
    return sample, timesteps, context


@pytest.mark.parametrize(
    "shape",
    [(2, 4, 8, 8), (3, 4, 8, 12), (2, 4, 9, 7), (1, 4, 5, 6)],
    ids=["square", "non-square", "not-divisible-9x7", "batch1-5x6"],
)
def test_matches_diffusers(models, shape):
    reference, ours, config = models
    sample, timesteps, context = inputs(config, shape)
    with torch.no_grad():
        expected = reference(sample, timesteps, context).sample
        got = ours(sample, timesteps, context)
    assert got.shape == expected.shape == shape
    assert expected.abs().mean() > 0.1  # a real signal, not all zeros
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_other_supported_options_match_diffusers():
    """Options SD does not use but the config accepts: input centring, 2 transformer layers in one
    block, 2 resnets per block, sin-first embedding with a frequency shift, another norm eps."""
    config = {
        **tiny_config("sd1")["unet"],
        "center_input_sample": True,
        "transformer_layers_per_block": [1, 2, 1],
        "layers_per_block": 2,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "norm_eps": 1e-6,
    }
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**diffusers_kwargs(config)).eval()
    randomize_(reference, seed=4)
    ours = UNet2DConditionModel(UNetConfig.from_dict(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    sample, timesteps, context = inputs(config, (2, 4, 9, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(sample, timesteps, context), reference(sample, timesteps, context).sample, rtol=0, atol=ATOL
        )


def test_float_timesteps_match_diffusers(models):
    reference, ours, config = models
    sample, _, context = inputs(config, (2, 4, 8, 8))
    timesteps = torch.tensor([0.5, 731.25])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(sample, timesteps, context), reference(sample, timesteps, context).sample, rtol=0, atol=ATOL
        )


def test_rows_are_independent(models):
    """A row's output does not depend on the other rows of the batch (each has its own timestep)."""
    _, ours, config = models
    sample, timesteps, context = inputs(config, (3, 4, 9, 7))
    with torch.no_grad():
        batched = ours(sample, timesteps, context)
        for i in range(3):
            alone = ours(sample[i : i + 1], timesteps[i : i + 1], context[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)


def test_all_true_mask_equals_no_mask(models):
    _, ours, config = models
    sample, timesteps, context = inputs(config, (2, 4, 8, 8))
    mask = torch.ones(context.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(sample, timesteps, context, mask), ours(sample, timesteps, context), rtol=0, atol=1e-6
        )


def test_padded_context_with_mask_equals_unpadded(models):
    """Row 0 has a 4-token context padded with garbage to 7 tokens; masking the padding gives the
    output of the unpadded 4-token context."""
    reference, ours, config = models
    sample, timesteps, context = inputs(config, (2, 4, 9, 7))
    mask = torch.ones(context.shape[:2], dtype=torch.bool)
    mask[0, 4:] = False
    padded = context.clone()
    padded[0, 4:] = 1e3 * torch.randn(3, context.shape[-1])  # garbage that would dominate if attended
    with torch.no_grad():
        got = ours(sample, timesteps, padded, mask)
        row0 = ours(sample[:1], timesteps[:1], context[:1, :4])
        row1 = ours(sample[1:], timesteps[1:], context[1:])
        torch.testing.assert_close(got[:1], row0, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1:], row1, rtol=0, atol=1e-5)
        expected = reference(sample, timesteps, padded, encoder_attention_mask=mask).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_mask_shape_is_checked(models):
    _, ours, config = models
    sample, timesteps, context = inputs(config, (2, 4, 8, 8))
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        ours(sample, timesteps, context, torch.ones(2, 3, dtype=torch.bool))


def test_channels_last_matches_contiguous(models):
    _, ours, config = models
    sample, timesteps, context = inputs(config, (2, 4, 9, 7))
    with torch.no_grad():
        expected = ours(sample, timesteps, context)
        ours_cl = UNet2DConditionModel(ours.config).eval().to(memory_format=torch.channels_last)
        ours_cl.load_state_dict(ours.state_dict())
        got = ours_cl(sample.to(memory_format=torch.channels_last), timesteps, context)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_bfloat16_close_to_float32(models):
    _, ours, config = models
    sample, timesteps, context = inputs(config, (2, 4, 9, 7))
    ours_bf16 = UNet2DConditionModel(ours.config).eval()
    ours_bf16.load_state_dict(ours.state_dict())
    ours_bf16 = ours_bf16.to(torch.bfloat16)
    with torch.no_grad():
        expected = ours(sample, timesteps, context)
        got = ours_bf16(sample.bfloat16(), timesteps, context.bfloat16())
    assert got.dtype == torch.bfloat16
    error = (got.float() - expected).abs()
    assert error.mean() < 0.02 * expected.abs().mean(), (error.mean(), expected.abs().mean())
    assert error.max() < 0.1 * expected.abs().max(), (error.max(), expected.abs().max())


@pytest.fixture(scope="module")
def lcm_models() -> tuple[torch.nn.Module, UNet2DConditionModel, dict]:
    """(diffusers UNet, ours) of an LCM-distilled UNet: a guidance embedding (time_cond_proj_dim)
    projected (cond_proj, no bias) into the timestep embedding."""
    config = {**tiny_config("sd1")["unet"], "time_cond_proj_dim": 16}
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**diffusers_kwargs(config)).eval()
    randomize_(reference, seed=6)
    ours = UNet2DConditionModel(UNetConfig.from_dict(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours, config


def test_guidance_embedding_equals_diffusers():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.5, 7.0, 0.0, -0.25]) - 1  # guidance scale - 1
    for dim in (16, 256, 7):
        expected = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_embedding(w, dim), expected, rtol=0, atol=0)


def test_timestep_cond_matches_diffusers(lcm_models):
    reference, ours, config = lcm_models
    assert list(ours.state_dict()) == list(reference.state_dict())  # cond_proj where diffusers has it
    sample, timesteps, context = inputs(config, (3, 4, 8, 8))
    cond = guidance_embedding(torch.tensor([0.0, 1.0, 7.0]), 16)
    with torch.no_grad():
        expected = reference(sample, timesteps, context, timestep_cond=cond).sample
        got = ours(sample, timesteps, context, conditioning={"timestep_cond": cond})
        unconditioned = ours(sample, timesteps, context)
        torch.testing.assert_close(
            unconditioned, reference(sample, timesteps, context).sample, rtol=0, atol=ATOL
        )
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert (got - unconditioned).abs().max() > 0.01  # the condition is not ignored


def test_timestep_cond_is_checked(models, lcm_models):
    _, plain, config = models
    _, ours, _ = lcm_models
    sample, timesteps, context = inputs(config, (2, 4, 8, 8))
    with pytest.raises(ValueError, match="no time_cond_proj_dim"):
        plain(sample, timesteps, context, conditioning={"timestep_cond": torch.zeros(2, 16)})
    sample, timesteps, context = inputs(lcm_models[2], (2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"timestep_cond has shape \(2, 8\), expected .* \(2, 16\)"):
        ours(sample, timesteps, context, conditioning={"timestep_cond": torch.zeros(2, 8)})


def test_upcast_attention_runs_float16_in_float32():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 8, generator=generator).half() * 4 for _ in range(3))
    expected = multihead_attention(q.float(), k.float(), v.float(), heads=2).half()
    got = multihead_attention(q, k, v, heads=2, upcast=True)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_models_do_not_import_diffusers():
    """diffusers is a test-only dependency."""
    models_dir = pathlib.Path(__file__).resolve().parents[2] / "models"
    for name in ("blocks.py", "configs.py", "unet.py", "vae.py"):
        tree = ast.parse((models_dir / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] == "diffusers" for m in imported), (name, imported)


def test_compiles_as_one_graph():
    """No graph breaks (no data-dependent Python control flow): fit for torch.compile / CUDA graphs.
    The "eager" backend only traces, so this stays fast; SD2 (linear projections, per-block heads,
    upcast) and SD1 share every code path that matters here."""
    config = tiny_config("sd2")["unet"]
    ours = UNet2DConditionModel(UNetConfig.from_dict(config)).eval()
    sample, timesteps, context = inputs(config, (2, 4, 9, 7))
    mask = torch.ones(context.shape[:2], dtype=torch.bool)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(sample, timesteps, context, mask), ours(sample, timesteps, context, mask), rtol=0, atol=0
        )
