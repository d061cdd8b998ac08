"""workers/main.py's start-up helpers: the VAE decoder compiled on the main thread before the engine
starts, the warm-up decoding through it, and the plain path when the fast one fails."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from models.accel import AccelConfig, VAEDecoder
from models.loading import load_model
from workers.device import resolve_runtime
from workers.main import (
    FastPath,
    WorkerProcess,
    native_latent,
    prepare_fast_path,
    prepare_vae_decoder,
    warm_up,
)
from workers.settings import load_settings


def test_the_vae_decoder_is_compiled_at_start_up_for_one_and_for_more_latents(
    tiny_model_dir: Path,
) -> None:
    model = load_model(tiny_model_dir)
    compiled: list[tuple[int, ...]] = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        compiled.append(tuple(example_inputs[0].shape))
        return graph.forward

    torch._dynamo.reset()
    config = AccelConfig(
        compile_vae=True, compile_backend=counting_backend, compile_latents=(native_latent(model),)
    )
    decoder = VAEDecoder(model.vae, config)
    prepare_vae_decoder(model, None)  # nothing to prepare
    prepare_vae_decoder(model, VAEDecoder(model.vae, AccelConfig()))  # not compiled: nothing either
    assert compiled == []
    prepare_vae_decoder(model, decoder)
    assert len(compiled) == 2  # 1 latent, then the graph for 2 and more
    calls: list[int] = []

    def counting(z: torch.Tensor) -> torch.Tensor:
        calls.append(z.shape[0])
        return decoder(z)

    warm_up(model, None, vae_batch=4, vae_decoder=counting)  # the CPU: one generation, decoded
    assert calls == [1] and len(compiled) == 2  # through the decoder, no compile on the engine thread
    torch._dynamo.reset()


def test_a_fast_path_whose_compile_fails_falls_back_to_the_plain_path(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No C compiler for Triton (or any compile failure) must not send the worker into a restart
    loop: it serves on the plain path, says so once, and publishes it (sd_worker_fast_path_fallback)."""
    model = load_model(tiny_model_dir)

    def no_compiler(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        raise RuntimeError("simulated: Triton found no C compiler")

    torch._dynamo.reset()
    accel = AccelConfig(compile_mode="default", compile_backend=no_compiler, buckets=(1, 2, 4))
    settings = load_settings(device="cpu")
    caplog.set_level(logging.WARNING, logger="workers.main")
    fast = prepare_fast_path(model, accel, settings, resolve_runtime(settings))
    torch._dynamo.reset()
    assert fast.plain and "Triton found no C compiler" in (fast.fallback or "")
    assert caplog.text.count("the fast path failed") == 1
    assert fast.describe().startswith("plain (fell back")


def test_a_fast_path_whose_warm_up_fails_starts_the_engine_on_the_plain_path(
    tiny_model_dir: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_model(tiny_model_dir)

    def broken_runner(*args: object) -> torch.Tensor:
        raise RuntimeError("simulated: the compiled graph fails on its first call")

    settings = load_settings(device="cpu", redis_url=redis_url, worker_name="fallback-test")
    worker = WorkerProcess(settings, resolve_runtime(settings), model, "tiny", FastPath(runner=broken_runner))
    caplog.set_level(logging.WARNING, logger="workers.main")
    try:
        assert worker._start_engine()
        assert worker.engine.alive and worker.fast.plain
        assert "warming up" in (worker.fast.fallback or "")
        assert "fell back" in worker.heartbeat.info.fast_path
        assert caplog.text.count("the fast path failed") == 1
    finally:
        worker.engine.drain(0)
        worker.engine.join(30)
