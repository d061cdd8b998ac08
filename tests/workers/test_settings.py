"""The worker's settings: defaults, device-dependent defaults, and errors that name the variable."""

from __future__ import annotations

import pytest
import torch

from workers.device import resolve_runtime
from workers.settings import ConfigurationError, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "SD_MODEL", "SD_DEVICE", "SD_SLOTS", "SD_MAX_BATCH_ROWS", "SD_RESULT_TTL_S"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.result_ttl_s == 3600
    assert settings.device == "auto" and settings.model is None


def test_cpu_runtime_defaults() -> None:
    runtime = resolve_runtime(load_settings(device="cpu"))
    assert runtime.device == torch.device("cpu")
    assert runtime.dtype == torch.float32 and runtime.vae_dtype == torch.float32
    assert (runtime.max_batch_rows, runtime.vae_batch, runtime.slots) == (8, 4, 4)


def test_explicit_values_win() -> None:
    runtime = resolve_runtime(
        load_settings(device="cpu", max_batch_rows=6, slots=2, vae_batch=1, dtype="bfloat16")
    )
    assert (runtime.max_batch_rows, runtime.slots, runtime.vae_batch) == (6, 2, 1)
    assert runtime.dtype == torch.bfloat16


def test_env_vars_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("SD_MAX_BATCH_ROWS", "12")
    monkeypatch.setenv("SD_TEST_OOM_ABOVE_ROWS", "4")
    settings = load_settings()
    assert settings.redis_url == "redis://example:6380/2"
    assert settings.max_batch_rows == 12 and settings.test_oom_above_rows == 4


def test_compile_is_for_the_native_size_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.default_model import default_model_path
    from models.loading import load_model
    from workers.device import accel_config
    from workers.main import fast_path

    model = load_model(default_model_path())
    c = model.latent_channels
    h, w = (n // model.vae_scale_factor for n in reversed(model.native_size))
    assert fast_path(None, load_settings(), model) is None  # the CPU: no fast path at all
    # compiled by default on CUDA, the native size only
    assert fast_path(accel_config(load_settings()), load_settings(), model).compile_latents == ((c, h, w),)
    monkeypatch.setenv("SD_COMPILE", "off")
    assert fast_path(accel_config(load_settings()), load_settings(), model).compile_latents == ()
    monkeypatch.setenv("SD_COMPILE_VAE", "true")  # the VAE compiled alone: the native size too
    assert fast_path(accel_config(load_settings()), load_settings(), model).compile_latents == ((c, h, w),)
    monkeypatch.delenv("SD_COMPILE_VAE")
    monkeypatch.setenv("SD_COMPILE", "default")
    monkeypatch.setenv("SD_COMPILE_SIZES", "all")
    assert fast_path(accel_config(load_settings()), load_settings(), model).compile_latents == ()
    monkeypatch.setenv("SD_COMPILE_SIZES", "some")
    with pytest.raises(ConfigurationError, match="SD_COMPILE_SIZES"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SD_MAX_BATCH_ROWS": "0"}, "SD_MAX_BATCH_ROWS"),
        ({"SD_DEVICE": "tpu"}, "SD_DEVICE"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"SD_DTYPE": "float8"}, "SD_DTYPE"),
        (
            {"SD_HEARTBEAT_INTERVAL_S": "20"},
            "SD_JOB_HEARTBEAT_TTL_S=30 must be at least 3 x SD_HEARTBEAT_INTERVAL_S",
        ),
        (
            {"SD_HEARTBEAT_INTERVAL_S": "5", "SD_WORKER_STALE_S": "10"},
            "SD_WORKER_STALE_S=10 must be at least",
        ),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, env: dict, named: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigurationError, match=named):
        load_settings()


def test_cuda_decodes_in_float16_with_a_float32_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolving touches no device
    runtime = resolve_runtime(load_settings(device="cuda"))
    assert (runtime.dtype, runtime.vae_dtype, runtime.vae_fallback) == (torch.float16, torch.float16, True)
    assert not resolve_runtime(load_settings(device="cuda", vae_float32_fallback=False)).vae_fallback
    for unet_dtype in ("float32", "bfloat16"):  # auto: float16 only beside a float16 UNet
        runtime = resolve_runtime(load_settings(device="cuda", dtype=unet_dtype))
        assert (runtime.vae_dtype, runtime.vae_fallback) == (torch.float32, False), unet_dtype
    runtime = resolve_runtime(load_settings(device="cuda", vae_dtype="float32"))
    assert (runtime.vae_dtype, runtime.vae_fallback) == (torch.float32, False)
    runtime = resolve_runtime(load_settings(device="cpu", vae_dtype="float16"))  # asked for: kept
    assert (runtime.vae_dtype, runtime.vae_fallback) == (torch.float16, True)


def test_fast_path_is_for_cuda_only() -> None:
    runtime = resolve_runtime(load_settings(device="cpu"))
    assert runtime.accel is None and runtime.text_batch == 64  # the plain UNet call, as before


def test_fast_path_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.accel import FAST_CUDA, GRAPHS_ONLY_CUDA
    from workers.device import accel_config

    assert accel_config(load_settings()) == FAST_CUDA  # the defaults are the fast path
    assert FAST_CUDA.vae_channels_last is None and not FAST_CUDA.compile_vae  # the VAE as the UNet
    monkeypatch.setenv("SD_VAE_CHANNELS_LAST", "off")
    monkeypatch.setenv("SD_COMPILE_VAE", "yes")
    config = accel_config(load_settings())
    assert config.vae_channels_last is False and config.compile_vae and config.channels_last
    monkeypatch.setenv("SD_VAE_CHANNELS_LAST", "sometimes")
    with pytest.raises(ConfigurationError, match="SD_VAE_CHANNELS_LAST"):
        load_settings()
    monkeypatch.delenv("SD_VAE_CHANNELS_LAST")
    monkeypatch.delenv("SD_COMPILE_VAE")
    monkeypatch.setenv("SD_COMPILE_CONV_1X1_AS_MM", "true")
    assert accel_config(load_settings()).compile_conv_1x1_as_mm and not FAST_CUDA.compile_conv_1x1_as_mm
    monkeypatch.delenv("SD_COMPILE_CONV_1X1_AS_MM")
    monkeypatch.setenv("SD_FUSE_PROJECTIONS", "true")
    assert accel_config(load_settings()).fuse_projections and not FAST_CUDA.fuse_projections
    monkeypatch.delenv("SD_FUSE_PROJECTIONS")
    monkeypatch.setenv("SD_COMPILE", "off")  # channels_last (auto) goes with compile
    assert accel_config(load_settings()) == GRAPHS_ONLY_CUDA
    for yes in ("True", "y", "1", "on"):
        monkeypatch.setenv("SD_CHANNELS_LAST", yes)
        assert accel_config(load_settings()).channels_last, yes
    monkeypatch.setenv("SD_CHANNELS_LAST", "maybe")
    with pytest.raises(ConfigurationError, match="SD_CHANNELS_LAST"):
        load_settings()
    monkeypatch.setenv("SD_CUDA_GRAPHS", "false")
    monkeypatch.setenv("SD_CUDA_GRAPH_BUCKETS", "1, 2,4,8")
    monkeypatch.setenv("SD_SDPA_BACKEND", "efficient")
    monkeypatch.setenv("SD_CHANNELS_LAST", "0")
    monkeypatch.setenv("SD_COMPILE", "max-autotune-no-cudagraphs")
    config = accel_config(load_settings())
    assert not config.cuda_graphs and not config.channels_last
    assert config.buckets == (1, 2, 4, 8) and config.sdpa_backend == "efficient"
    assert config.compile_mode == "max-autotune-no-cudagraphs" and config.bucketed
    monkeypatch.setenv("SD_CUDA_GRAPHS", "true")
    monkeypatch.setenv("SD_COMPILE", "reduce-overhead")  # its own graphs: ours step aside
    assert not accel_config(load_settings()).cuda_graphs


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SD_CUDA_GRAPH_BUCKETS": "8,4"}, "SD_CUDA_GRAPH_BUCKETS"),
        ({"SD_CUDA_GRAPH_BUCKETS": "1,two"}, "SD_CUDA_GRAPH_BUCKETS"),
        ({"SD_SDPA_BACKEND": "fastest"}, "SD_SDPA_BACKEND"),
        ({"SD_COMPILE": "yes"}, "SD_COMPILE"),
        ({"SD_CUDA_GRAPH_MAX": "0"}, "SD_CUDA_GRAPH_MAX"),
    ],
)
def test_invalid_fast_path_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict, named: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigurationError, match=named):
        load_settings()
