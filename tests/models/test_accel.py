"""The UNet fast path (models/accel.py) computes the same function as the plain UNet call.

On the CPU the bucketed path runs eagerly (no capture): padding rows up to a bucket, static input
buffers reused across calls, least-recently-used eviction, attention backends and channels_last
are all checked against the plain call. The CUDA tests (graph capture and replay, bounded memory,
capture failures) run on a GPU machine (bench/gpu_run.sh runs them there).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from models.accel import (
    FAST_CUDA,
    AccelConfig,
    UNetRunner,
    VAEDecoder,
    apply_backend_flags,
    fuse_attention_projections,
    fuse_projections_in,
    prepare,
    prepare_vae,
    set_memory_format,
)
from models.configs import UNetConfig
from models.loading import load_model
from models.pipeline import Pipeline, generate
from models.random_model import random_weights, randomize_, write_diffusers_folder
from models.tiny_configs import tiny_config
from models.transfer import to_device
from models.unet import UNet2DConditionModel
from schemas.generation import Generation

BUCKETS = (1, 2, 4, 8)
CONTEXT_DIM = 32  # tiny SD1's cross_attention_dim
LONG_PROMPT = " ".join(["a very long prompt about a lighthouse at dusk"] * 12)  # > 75 tokens: 2 chunks
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet(device: str = "cpu", dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(UNetConfig.from_dict(tiny_config("sd1")["unet"]))
    randomize_(unet, torch.Generator().manual_seed(0))
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return tiny_unet()


def unet_inputs(
    rows: int, length: int = 77, masked: bool = False, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random (sample, per-row timesteps, context, key mask); masked rows have random lengths."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn((rows, 4, 8, 8), generator=g)
    timesteps = torch.randint(0, 1000, (rows,), generator=g)
    context = torch.randn((rows, length, CONTEXT_DIM), generator=g)
    mask = None
    if masked:
        lengths = torch.randint(1, length + 1, (rows,), generator=g)
        mask = torch.arange(length)[None, :] < lengths[:, None]  # (rows, L)
    moved = [t.to(device) if t is not None else None for t in (sample, timesteps, context, mask)]
    return moved[0], moved[1], moved[2], moved[3]  # type: ignore[return-value]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sample_together(pipeline: Pipeline, requests: list[Generation]) -> tuple[torch.Tensor, list]:
    """All requests in one batch to the end, as the engine drives the Pipeline: final latents, pixels."""
    started = pipeline.start(list(enumerate(requests)))
    images = [image for group in started for image in group]
    while any(not image.done for image in images):
        pipeline.step([image for image in images if not image.done])
    return torch.cat([image.latent for image in images]), pipeline.decode(images)


# --- configuration ---------------------------------------------------------------------------------


def test_bucket_is_the_smallest_that_holds_the_rows() -> None:
    config = AccelConfig(buckets=(1, 2, 4, 8, 16, 24))
    assert [config.bucket(r) for r in (1, 2, 3, 5, 8, 9, 17, 24, 25)] == [1, 2, 4, 8, 8, 16, 24, 24, None]
    assert not AccelConfig().bucketed
    assert AccelConfig(cuda_graphs=True).bucketed and AccelConfig(pad_to_bucket=True).bucketed
    assert AccelConfig(compile_mode="default").bucketed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sdpa_backend": "fast"}, "sdpa_backend"),
        ({"compile_mode": "turbo"}, "compile_mode"),
        ({"compile_mode": "reduce-overhead", "cuda_graphs": True}, "reduce-overhead"),
        ({"compile_latents": ((4, 8),)}, "compile_latents"),
        ({"compile_latents": ((4, 0, 8),)}, "compile_latents"),
        ({"buckets": (4, 2)}, "buckets"),
        ({"buckets": ()}, "buckets"),
        ({"max_graphs": 0}, "max_graphs"),
    ],
)
def test_invalid_configs_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AccelConfig(**kwargs)


def test_to_device_on_cpu_is_a_plain_move() -> None:
    values = torch.arange(5)
    assert to_device(values, "cpu") is values.to("cpu")


# --- the bucketed path equals the plain call ---------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize(("length", "masked"), [(77, False), (154, True)])
def test_padded_rows_change_nothing(unet: UNet2DConditionModel, rows: int, length: int, masked: bool) -> None:
    runner = UNetRunner(unet, AccelConfig(cuda_graphs=True, buckets=BUCKETS))
    args = unet_inputs(rows, length, masked, seed=rows)
    assert max_diff(runner(*args), unet(*args)) <= 1e-5
    stats = runner.stats()
    padded = {1: 0, 2: 0, 3: 1, 5: 3, 8: 0, 9: 0}[rows]  # 9 rows: beyond the largest bucket, unpadded
    assert stats.padded_rows == padded
    assert len(stats.keys) == (0 if rows > BUCKETS[-1] else 1)


def test_stale_padding_rows_from_earlier_calls_change_nothing(unet: UNet2DConditionModel) -> None:
    runner = UNetRunner(unet, AccelConfig(cuda_graphs=True, buckets=BUCKETS))
    for rows, seed in ((7, 1), (5, 2), (6, 3), (8, 4), (5, 5)):  # one bucket (8), reused every time
        args = unet_inputs(rows, 154, masked=True, seed=seed)
        assert max_diff(runner(*args), unet(*args)) <= 1e-5
    assert len(runner.stats().keys) == 1


def test_one_timestep_for_all_rows_is_broadcast(unet: UNet2DConditionModel) -> None:
    runner = UNetRunner(unet, AccelConfig(cuda_graphs=True, buckets=BUCKETS))
    sample, _, context, _ = unet_inputs(3)
    t = torch.tensor(500)
    assert max_diff(runner(sample, t, context), unet(sample, t, context)) <= 1e-5


def test_buckets_are_keyed_by_shape_and_mask_and_evicted_least_recently_used(
    unet: UNet2DConditionModel,
) -> None:
    runner = UNetRunner(unet, AccelConfig(cuda_graphs=True, buckets=BUCKETS, max_graphs=2))
    runner(*unet_inputs(2))  # A: 2 rows, 77 tokens
    runner(*unet_inputs(2, 154, masked=True))  # B: same rows, another context and a mask
    runner(*unet_inputs(2))  # A again: now the most recent
    assert runner.stats().evictions == 0
    runner(*unet_inputs(3))  # C: 4 rows; B, the least recently used, goes
    stats = runner.stats()
    assert stats.evictions == 1 and len(stats.keys) == 2
    assert stats.keys == ["2 rows x 4x8x8, context 77x32", "4 rows x 4x8x8, context 77x32"]
    args = unet_inputs(2, 154, masked=True, seed=9)  # B comes back, built anew, still right
    assert max_diff(runner(*args), unet(*args)) <= 1e-5


def test_warm_up_runs_every_bucket_up_to_max_rows(unet: UNet2DConditionModel) -> None:
    runner = UNetRunner(unet, AccelConfig(cuda_graphs=True, buckets=(1, 2, 4, 8, 16)))
    assert runner.warm_up((4, 8, 8), (77, CONTEXT_DIM), max_rows=6) == 4  # 1, 2, 4 and 8 (holds 6)
    assert len(runner.stats().keys) == 4
    assert UNetRunner(unet).warm_up((4, 8, 8), (77, CONTEXT_DIM), max_rows=6) == 0  # nothing to prepare


def lcm_unet(cond_dim: int = 8) -> UNet2DConditionModel:
    """A tiny UNet that takes a guidance embedding, as LCM-distilled ones do (time_cond_proj_dim)."""
    unet = UNet2DConditionModel(
        UNetConfig.from_dict({**tiny_config("sd1")["unet"], "time_cond_proj_dim": cond_dim})
    )
    randomize_(unet, torch.Generator().manual_seed(1))
    return unet.eval().requires_grad_(False)


def test_timestep_cond_goes_through_the_buckets() -> None:
    """An LCM-distilled UNet's guidance embeddings: a static buffer per bucket (stale padding rows
    change nothing), the width in the bucket's key, and the warm-up runs the buckets it will use."""
    unet = lcm_unet()
    runner = UNetRunner(unet, AccelConfig(cuda_graphs=True, buckets=BUCKETS))
    for rows, seed in ((4, 1), (3, 2), (9, 3)):  # a full bucket, a stale padding row, beyond the largest
        args = unet_inputs(rows, seed=seed)
        cond = {"timestep_cond": torch.randn((rows, 8), generator=torch.Generator().manual_seed(seed))}
        expected = unet(*args, cond)
        assert max_diff(runner(*args, cond), expected) <= 1e-5
        assert max_diff(unet(*args), expected) > 1e-3  # the condition is not ignored
    assert runner.stats().keys == ["4 rows x 4x8x8, context 77x32, timestep_cond 8"]
    runner(*unet_inputs(4))  # no condition: a bucket of its own
    assert len(runner.stats().keys) == 2
    warm = UNetRunner(unet, AccelConfig(cuda_graphs=True, buckets=BUCKETS))
    assert warm.warm_up((4, 8, 8), (77, CONTEXT_DIM), max_rows=2) == 2
    assert all(key.endswith("timestep_cond 8") for key in warm.stats().keys)


def test_distilled_unet_with_runner_gives_the_same_pixels(tmp_path: Path) -> None:
    """The Pipeline hands an LCM-distilled UNet's guidance embeddings to the runner."""
    configs = tiny_config("sd1")
    configs["unet"]["time_cond_proj_dim"] = 8
    folder = write_diffusers_folder(
        tmp_path / "lcm", configs, random_weights(configs, seed=2), "<|endoftext|>"
    )
    model = load_model(folder)
    runner = UNetRunner(model.unet, AccelConfig(cuda_graphs=True, buckets=BUCKETS))
    request = Generation(
        prompt="a lighthouse", width=32, height=32, steps=3, guidance_scale=4.0, sampler="lcm", num_images=3
    )
    expected, got = generate(model, request), generate(model, request, unet_runner=runner)
    for a, b in zip(expected, got, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert runner.stats().keys == ["4 rows x 4x4x4, context 77x32, timestep_cond 8"]  # 3 rows: no CFG


# --- each option on or off keeps the outputs ---------------------------------------------------------


@pytest.mark.parametrize("graphs", [False, True])
def test_channels_last_changes_nothing(unet: UNet2DConditionModel, graphs: bool) -> None:
    fast = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    runner = UNetRunner(fast, AccelConfig(channels_last=True, cuda_graphs=graphs, buckets=BUCKETS))
    for rows, masked in ((3, False), (2, True)):
        args = unet_inputs(rows, 154 if masked else 77, masked, seed=rows)
        assert max_diff(runner(*args), unet(*args)) <= 1e-5


@pytest.mark.parametrize("backend", ["auto", "math", "flash"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_backends_on_cpu_change_nothing(
    unet: UNet2DConditionModel, backend: str, masked: bool
) -> None:
    runner = UNetRunner(unet, AccelConfig(sdpa_backend=backend))
    args = unet_inputs(3, 154 if masked else 77, masked)
    assert max_diff(runner(*args), unet(*args)) <= 1e-5


def test_compile_only_the_chosen_latent_shapes(unet: UNet2DConditionModel) -> None:
    """compile_latents: buckets of those latent shapes run the compiled UNet, other shapes (and calls
    beyond the largest bucket) the plain one, which gives the same outputs and never compiles."""
    torch._dynamo.reset()
    config = AccelConfig(
        compile_mode="default", compile_backend="eager", buckets=BUCKETS, compile_latents=((4, 8, 8),)
    )
    runner = UNetRunner(unet, config)
    assert runner.forward_for((4, 8, 8)) is runner.compiled is not None
    assert runner.forward_for((4, 8, 16)) is unet
    assert runner.forward_for((4, 8, 8), masked=True) is unet  # not warmed up: no mid-batch compile
    one_chunk = UNetRunner(unet, dataclasses.replace(config, compile_context_lengths=(77,)))
    assert one_chunk.forward_for((4, 8, 8), context_length=77) is one_chunk.compiled
    assert one_chunk.forward_for((4, 8, 8), context_length=154) is unet  # long prompts, unmasked
    g = torch.Generator().manual_seed(3)
    for sample in (torch.randn((3, 4, 8, 8), generator=g), torch.randn((3, 4, 8, 16), generator=g)):
        timesteps = torch.randint(0, 1000, (3,), generator=g)
        context = torch.randn((3, 77, CONTEXT_DIM), generator=g)
        assert max_diff(runner(sample, timesteps, context), unet(sample, timesteps, context)) <= 1e-5
    beyond = unet_inputs(BUCKETS[-1] + 1)  # past the largest bucket: never compiled
    assert max_diff(runner(*beyond), unet(*beyond)) <= 1e-5
    # every shape compiled when none is named (the default)
    everything = UNetRunner(unet, AccelConfig(compile_mode="default", compile_backend="eager"))
    assert everything.forward_for((4, 8, 16)) is everything.compiled is not None
    assert everything.forward_for((4, 8, 8), masked=True) is everything.compiled
    torch._dynamo.reset()


def test_compiled_runner_plumbing(unet: UNet2DConditionModel) -> None:
    """torch.compile per bucket (the "eager" backend: checks the wiring, not the code generation)."""
    torch._dynamo.reset()
    runner = UNetRunner(unet, AccelConfig(compile_mode="default", compile_backend="eager", buckets=BUCKETS))
    for rows in (3, 4):  # one bucket (4), compiled once
        args = unet_inputs(rows, seed=rows)
        assert max_diff(runner(*args), unet(*args)) <= 1e-5
    torch._dynamo.reset()


def test_inductor_options_go_with_the_compile_mode(unet: UNet2DConditionModel) -> None:
    """torch.compile takes a mode or options, not both: with options of ours, the mode's own inductor
    settings go in with them. Other backends get the mode alone (inductor's options mean nothing to
    them)."""
    from torch._inductor import list_mode_options

    from models.accel import _compile_mode

    plain = AccelConfig(compile_mode="default")
    assert _compile_mode(plain) == {"mode": None}
    assert _compile_mode(dataclasses.replace(plain, compile_mode="max-autotune")) == {"mode": "max-autotune"}
    fused = dataclasses.replace(plain, compile_conv_1x1_as_mm=True)
    assert _compile_mode(fused) == {"options": {"conv_1x1_as_mm": True}}
    tuned = dataclasses.replace(fused, compile_mode="max-autotune-no-cudagraphs")
    assert _compile_mode(tuned) == {
        "options": {**list_mode_options("max-autotune-no-cudagraphs"), "conv_1x1_as_mm": True}
    }
    assert _compile_mode(tuned)["options"]["max_autotune"] is True
    tuned_matmuls = dataclasses.replace(plain, compile_autotune_matmuls=True)
    matmuls_only = {"max_autotune_gemm": True, "max_autotune_conv_backends": "ATEN"}  # cuDNN's convs
    assert _compile_mode(tuned_matmuls) == {"options": matmuls_only}
    both = dataclasses.replace(fused, compile_autotune_matmuls=True)
    assert _compile_mode(both) == {"options": {"conv_1x1_as_mm": True, **matmuls_only}}
    assert _compile_mode(dataclasses.replace(fused, compile_backend="eager")) == {"mode": None}
    for config in (fused, tuned, both):  # torch.compile accepts them (it compiles at the first call)
        assert UNetRunner(unet, config).compiled is not None
    torch._dynamo.reset()


def test_dynamic_batch_compiles_one_graph_for_every_bucket_above_one(unet: UNet2DConditionModel) -> None:
    """compile_dynamic_batch: buckets 16, 24 and 64 share one compiled graph (the batch size
    symbolic), bucket 1 gets its own (torch specialises size 1); outputs stay those of the plain
    UNet. Without it, every bucket compiles its own graph."""

    def graphs_compiled(config: AccelConfig) -> int:
        compiled: list[str] = []

        def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
            compiled.append(str([getattr(x, "shape", x) for x in example_inputs][:1]))
            return graph.forward  # run the captured graph as it is

        torch._dynamo.reset()
        runner = UNetRunner(unet, dataclasses.replace(config, compile_backend=counting_backend))
        # buckets 16, 24, 64 and 1, largest first (automatic dynamic shapes would make the second
        # compile dynamic anyway; the first must be), 64: where Upsample2D's eager-only copy would
        # add a guard; CPU convolutions add guards of their own below 16 rows
        for rows in (16, 20, 64, 1, 16):
            args = unet_inputs(rows, seed=rows)
            assert max_diff(runner(*args), unet(*args)) <= 1e-5, rows
        torch._dynamo.reset()
        return len(compiled)

    static = AccelConfig(compile_mode="default")
    assert graphs_compiled(static) == 4
    assert graphs_compiled(dataclasses.replace(static, compile_dynamic_batch=True)) == 2


def test_prepare_sets_the_memory_format_and_leaves_the_cpu_flags(random_models: dict[str, Path]) -> None:
    model = load_model(random_models["sd1"])
    benchmark = torch.backends.cudnn.benchmark
    runner = prepare(model, AccelConfig(channels_last=True, cudnn_benchmark=not benchmark))
    conv = model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert torch.backends.cudnn.benchmark == benchmark  # CPU model: process flags untouched
    assert runner.unet is model.unet
    set_memory_format(model, False)
    assert model.unet.conv_in.weight.is_contiguous()


def test_the_vae_may_take_its_own_layout(random_models: dict[str, Path]) -> None:
    model = load_model(random_models["sd1"], vae_dtype=torch.float16, vae_fallback=True)
    prepare(model, AccelConfig(channels_last=True, vae_channels_last=False))
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.unet.conv_in.weight.is_contiguous()
    for vae in (model.vae, model.vae_fallback):
        assert vae.decoder.conv_in.weight.is_contiguous()
    prepare(model, AccelConfig(channels_last=False, vae_channels_last=True))
    assert model.unet.conv_in.weight.is_contiguous()
    for vae in (model.vae, model.vae_fallback):
        assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert not vae.decoder.conv_in.weight.is_contiguous()
    prepare(model, AccelConfig(channels_last=True))  # None: the VAE follows the UNet
    assert model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_vae_decoder_compiles_the_chosen_shape_once_for_every_count_above_one(
    random_models: dict[str, Path],
) -> None:
    """compile_vae: the decoder compiled for the chosen latent shape, one graph for 2+ latents (batch
    dimension dynamic) and one for a single latent; another shape decodes uncompiled. Pictures as
    `vae.decode` gives them."""
    model = load_model(random_models["sd1"])
    assert prepare_vae(model, AccelConfig()) is None  # off: the Pipeline calls vae.decode
    compiled: list[object] = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        compiled.append(example_inputs[0].shape if example_inputs else None)
        return graph.forward

    torch._dynamo.reset()
    config = AccelConfig(compile_vae=True, compile_backend=counting_backend, compile_latents=((4, 8, 8),))
    decoder = prepare_vae(model, config)
    assert isinstance(decoder, VAEDecoder)
    g = torch.Generator().manual_seed(3)
    for count, shape in ((3, (4, 8, 8)), (5, (4, 8, 8)), (1, (4, 8, 8)), (2, (4, 8, 8)), (2, (4, 8, 16))):
        z = torch.randn((count, *shape), generator=g)
        assert max_diff(decoder(z), model.vae.decode(z)) <= 1e-5, (count, shape)
    assert len(compiled) == 2  # 3 (dynamic: 5 and 2 reuse it) and 1; (4, 8, 16) not compiled
    sampler = Pipeline(model, vae_decoder=decoder)
    z = torch.randn((2, 4, 8, 8), generator=g)
    np.testing.assert_array_equal(sampler.decode_latents(z), Pipeline(model).decode_latents(z))
    torch._dynamo.reset()


def test_fused_attention_projections_give_the_same_pictures_and_split_back_exactly(
    random_models: dict[str, Path],
) -> None:
    """fuse_projections: one q/k/v matmul in every attention of the UNet, the VAE and its float32
    fallback; the same latents and pixels as the plain model, through the bucketed runner; split
    back, the state dict is the original one, key for key and bit for bit."""
    plain = load_model(random_models["sd1"])
    fused = load_model(random_models["sd1"])
    fused.keep_float32_decoder()
    original = {name: copy.deepcopy(getattr(fused, name).state_dict()) for name in ("unet", "vae")}
    runner = prepare(fused, AccelConfig(fuse_projections=True, cuda_graphs=True, buckets=BUCKETS))
    unet_keys, vae_keys = fused.unet.state_dict().keys(), fused.vae.state_dict().keys()
    assert not any(".to_q." in key or ".to_k." in key or ".to_v." in key for key in vae_keys)
    assert any(key.endswith("attn1.to_qkv.weight") for key in unet_keys)
    assert any(key.endswith("attn2.to_kv.weight") for key in unet_keys)
    assert any(key.endswith("attn2.to_q.weight") for key in unet_keys)  # the query reads the image
    assert not any(key.endswith(("attn1.to_q.weight", "attn2.to_k.weight")) for key in unet_keys)
    assert "decoder.mid_block.attentions.0.to_qkv.bias" in fused.vae_fallback.state_dict()
    assert not any(p.requires_grad for p in fused.unet.parameters())  # still frozen

    requests = [
        Generation(prompt="a red circle", width=64, height=48, steps=4, seed=1, num_images=2),
        Generation(prompt=LONG_PROMPT, negative_prompt="blurry", width=64, height=48, steps=3, seed=7),
    ]  # a long prompt: cross-attention with a key mask
    plain_latents, plain_pixels = sample_together(Pipeline(plain), requests)
    fused_latents, fused_pixels = sample_together(Pipeline(fused, unet_runner=runner), requests)
    assert relative_error(fused_latents, plain_latents) <= 1e-5
    for a, b in zip(plain_pixels, fused_pixels, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    z = torch.randn((2, 4, 6, 8), generator=torch.Generator().manual_seed(2))
    assert max_diff(fused.vae_fallback.decode(z), plain.vae.decode(z)) <= 1e-4

    fuse_attention_projections(fused, fuse=False)
    fuse_attention_projections(fused, fuse=False)  # idempotent
    for name, state in original.items():
        split = getattr(fused, name).state_dict()
        assert list(split) == list(state), name  # diffusers' keys, in their order
        assert all(torch.equal(split[key], state[key]) for key in state), name


# --- the sampler with a runner gives the same pictures ----------------------------------------------


def test_sampler_with_runner_gives_the_same_pixels(random_models: dict[str, Path]) -> None:
    plain = load_model(random_models["sd1"])
    fast = load_model(random_models["sd1"])
    runner = prepare(fast, AccelConfig(channels_last=True, cuda_graphs=True, buckets=BUCKETS))
    requests = [
        Generation(prompt="a red circle", width=64, height=48, steps=4, seed=1, num_images=2),
        Generation(prompt=LONG_PROMPT, negative_prompt="blurry", width=64, height=48, steps=3, seed=7),
        Generation(prompt="unguided", width=64, height=48, steps=4, guidance_scale=1.0, seed=3),
    ]  # 2 + 1 guided images and 1 unguided: 7 rows, padded to 8; a long prompt: L 154 with a mask
    plain_latents, plain_pixels = sample_together(Pipeline(plain), requests)
    fast_latents, fast_pixels = sample_together(Pipeline(fast, unet_runner=runner), requests)
    # 3-4 steps of CFG (x7.5) amplify float32 rounding (other conv algorithms, other batch size)
    assert relative_error(fast_latents, plain_latents) <= 1e-5
    for a, b in zip(plain_pixels, fast_pixels, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert runner.stats().padded_rows > 0 and runner.stats().keys


def test_generate_takes_a_runner(random_models: dict[str, Path]) -> None:
    model = load_model(random_models["sd1"])
    request = Generation(prompt="a lighthouse", width=32, height=32, steps=2, seed=5)
    runner = UNetRunner(model.unet, AccelConfig(cuda_graphs=True, buckets=BUCKETS))
    (expected,), (got,) = generate(model, request), generate(model, request, unet_runner=runner)
    assert np.abs(expected.astype(int) - got.astype(int)).max() <= 1
    assert runner.stats().calls == 2


# --- CUDA: capture, replay, bounded memory, fallbacks (run on a GPU machine) --------------------------


@pytest.fixture
def strict_fp32():
    """Plain float32 matmuls/convs (no TF32), so graph and eager agree to rounding."""
    apply_backend_flags(AccelConfig(tf32=False, cudnn_benchmark=False))
    yield


@cuda_only
@pytest.mark.parametrize(("length", "masked"), [(77, False), (154, True)])
def test_cuda_graph_replay_equals_eager(strict_fp32: None, length: int, masked: bool) -> None:
    unet = tiny_unet("cuda")
    runner = UNetRunner(unet, AccelConfig(cuda_graphs=True, buckets=BUCKETS))
    for rows in (3, 1, 4, 2, 3):
        args = unet_inputs(rows, length, masked, seed=rows, device="cuda")
        expected = unet(*args)
        assert max_diff(runner(*args), expected) <= 1e-4 * expected.abs().max().item()
    stats = runner.stats()
    assert stats.captures == 3 and stats.replays == 5 and stats.failed_captures == 0


@cuda_only
@pytest.mark.parametrize(
    ("dtype", "fused"), [(torch.float16, False), (torch.bfloat16, False), (torch.float16, True)]
)
def test_cuda_graph_half_precision_fast_config(dtype: torch.dtype, fused: bool) -> None:
    unet = tiny_unet("cuda", dtype).to(memory_format=torch.channels_last)
    reference = tiny_unet("cuda", dtype)
    if fused:  # SD_FUSE_PROJECTIONS: one q/k/v matmul, strided q/k/v views into SDPA
        fuse_projections_in(unet)
    # the worker's default: graphs of the compiled UNet with a dynamic batch, channels_last (the
    # "eager" backend: the wiring on CUDA; inductor's own code is checked by bench/gpu.py's precision)
    fast = dataclasses.replace(FAST_CUDA, compile_backend="eager")
    torch._dynamo.reset()
    runner = UNetRunner(unet, fast)
    apply_backend_flags(fast)
    for rows in (1, 5, 16):
        sample, t, context, mask = unet_inputs(rows, seed=rows, device="cuda")
        args = (sample.to(dtype), t, context.to(dtype), mask)
        expected = reference(*args).float()
        # two kernel orders in half precision; bfloat16 keeps 3 fewer mantissa bits
        assert relative_error(runner(*args), expected) <= (1e-2 if dtype == torch.float16 else 3e-2)
    apply_backend_flags(AccelConfig())
    torch._dynamo.reset()


@cuda_only
def test_cuda_graph_memory_is_bounded(strict_fp32: None) -> None:
    unet = tiny_unet("cuda")
    runner = UNetRunner(unet, AccelConfig(cuda_graphs=True, buckets=(1, 2, 4, 8, 16, 32), max_graphs=2))
    shapes = [(1, 77, False), (4, 77, False), (8, 154, True), (16, 77, False), (32, 231, True)]

    def cycle() -> None:
        for rows, length, masked in shapes:
            runner(*unet_inputs(rows, length, masked, device="cuda"))
        torch.cuda.synchronize()

    cycle()  # first-time allocations (cuBLAS workspaces of the side and capture streams...)
    cycle()
    steady = torch.cuda.memory_allocated()
    for _ in range(3):
        cycle()
    assert torch.cuda.memory_allocated() <= steady * 1.01 + 8 * 2**20
    stats = runner.stats()
    assert len(stats.keys) == 2 and stats.evictions == 5 * len(shapes) - 2


@cuda_only
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "math"])
def test_cuda_attention_backends_agree(backend: str, fused: bool) -> None:
    """Every SDPA kernel, with q/k/v as they come or as strided views of one fused projection."""
    unet = tiny_unet("cuda", torch.float16)
    reference = UNetRunner(unet, AccelConfig(sdpa_backend="math"))
    tested = tiny_unet("cuda", torch.float16)
    if fused:
        fuse_projections_in(tested)
    runner = UNetRunner(tested, AccelConfig(sdpa_backend=backend, cuda_graphs=True, buckets=BUCKETS))
    for masked in (False, True):
        sample, t, context, mask = unet_inputs(3, 154 if masked else 77, masked, device="cuda")
        args = (sample.half(), t, context.half(), mask)
        expected = reference(*args).float()
        error = relative_error(runner(*args), expected)
        assert error <= 1e-2, (backend, fused, masked, error)


@cuda_only
def test_cuda_fused_vae_attention_decodes_the_same_pixels(random_models: dict[str, Path]) -> None:
    plain = load_model(random_models["sd1"], "cuda", vae_dtype=torch.float16)
    fused = load_model(random_models["sd1"], "cuda", vae_dtype=torch.float16)
    fuse_projections_in(fused.vae)
    z = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(4)).cuda()
    a, b = Pipeline(plain).decode_latents(z), Pipeline(fused).decode_latents(z)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@cuda_only
def test_cuda_sampler_with_fast_runner_gives_the_same_pixels(
    random_models: dict[str, Path], strict_fp32: None
) -> None:
    plain = load_model(random_models["sd1"], "cuda")
    fast = load_model(random_models["sd1"], "cuda")
    runner = prepare(fast, AccelConfig(channels_last=True, sdpa_backend="flash", cuda_graphs=True))
    apply_backend_flags(AccelConfig())  # keep float32 strict for the comparison
    requests = [
        Generation(prompt="a red circle", width=64, height=48, steps=5, seed=1, num_images=3),
        Generation(prompt=LONG_PROMPT, width=64, height=48, steps=5, seed=2, eta=0.5),
    ]
    for request in requests:
        expected, got = generate(plain, request), generate(fast, request, unet_runner=runner)
        for a, b in zip(expected, got, strict=True):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert runner.stats().replays > 0


# last: a failed capture is the one CUDA test that could leave the device in a bad state
@cuda_only
def test_a_failed_capture_falls_back_to_eager(strict_fp32: None) -> None:
    unet = tiny_unet("cuda")

    class Syncing(torch.nn.Module):
        """Reads a value on the host mid-forward: not capturable."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = unet

        def forward(self, sample, timesteps, context, mask=None):
            if sample.abs().max().item() < 0:  # a host sync; never true
                raise AssertionError
            return self.inner(sample, timesteps, context, mask)

    runner = UNetRunner(Syncing(), AccelConfig(cuda_graphs=True, buckets=BUCKETS))
    for _ in range(2):
        args = unet_inputs(3, device="cuda")
        assert max_diff(runner(*args), unet(*args)) <= 1e-4
    assert runner.stats().failed_captures == 1 and runner.stats().replays == 0


@cuda_only
def test_cuda_graphs_with_compile_for_one_latent_shape() -> None:
    """The worker's SD_COMPILE: graphs of the compiled UNet for the chosen latent shape, graphs of
    the plain UNet for another, both as the eager UNet computes them."""
    torch._dynamo.reset()
    unet = tiny_unet("cuda", torch.float16)
    config = AccelConfig(
        cuda_graphs=True,
        buckets=BUCKETS,
        compile_mode="default",
        compile_backend="eager",  # the wiring, not inductor's code generation
        compile_latents=((4, 8, 8),),
    )
    runner = UNetRunner(unet, config)
    g = torch.Generator().manual_seed(5)
    for latent in ((4, 8, 8), (4, 8, 16)):
        sample = torch.randn((3, *latent), generator=g).to("cuda", torch.float16)
        t = torch.randint(0, 1000, (3,), generator=g).cuda()
        context = torch.randn((3, 77, CONTEXT_DIM), generator=g).to("cuda", torch.float16)
        expected = unet(sample, t, context).float()
        assert relative_error(runner(sample, t, context), expected) <= 1e-2, latent
    assert runner.stats().captures == 2 and runner.stats().failed_captures == 0
    torch._dynamo.reset()
