"""bench/gpu.py's SDXL stage: SDXL base's architecture at 1024x1024, 30 Euler steps, CFG 7.5, float16,
seeded random weights built on the device (the 2.6 B-parameter UNet is never downloaded), batches of
1, 4 and 8 one-image requests: images/s and peak GPU memory, ours (the worker's fast path, float16
VAE with its float32 fallback) against diffusers' StableDiffusionXLPipeline (float16, its VAE
upcast to float32 for the decode as SDXL's config asks) on the same weights, prompts and seeds, in
the same run. With --quick: the tiny SDXL config on the CPU, the same code paths.

    python bench/gpu.py --only sdxl                         # SDXL alone (after the SD 1.5 build)
    python bench/gpu.py --only sdxl --sdxl-accel graphs     # CUDA graphs, no compile: minutes less
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import gpu_runs as runs
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models.accel import GRAPHS_ONLY_CUDA, AccelConfig, prepare, prepare_vae
from models.configs import UNetConfig, VAEConfig
from models.loading import SINGLE_FILE_CONFIGS, TOKENIZER_ASSETS, load_tokenizer, read_component_configs
from models.noise_schedule import NoiseSchedule
from models.stable_diffusion import StableDiffusion
from models.tiny_configs import tiny_config
from models.unet import UNet2DConditionModel
from models.vae import AutoencoderKL

if TYPE_CHECKING:
    from gpu import Bench

SAMPLER = "euler"  # SDXL base's own scheduler (EulerDiscreteScheduler), both sides


def sdxl_configs(name: str) -> dict[str, dict[str, Any]]:
    if name == "tiny":
        return tiny_config("sdxl")
    if name == "sdxl":
        return read_component_configs(SINGLE_FILE_CONFIGS["sdxl"])
    raise ValueError(f"SDXL config must be sdxl or tiny, got {name!r}")


def build_sdxl(config: str, device: str, seed: int = 0) -> StableDiffusion:
    """Our SDXL model with seeded random weights (PyTorch's and transformers' default init), built in
    float32 directly on `device`."""
    configs = sdxl_configs(config)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(UNetConfig.from_dict(configs["unet"]))
        vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"]))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
    return StableDiffusion(
        f"{config}-random",
        unet,
        vae,
        text_encoder,
        load_tokenizer(TOKENIZER_ASSETS),
        NoiseSchedule.from_config(configs["scheduler"]),
        text_encoder_2=text_encoder_2,
        tokenizer_2=load_tokenizer(SINGLE_FILE_CONFIGS["sdxl"] / "tokenizer_2"),
        force_zeros_for_empty_prompt=True,
    ).eval()


def build_diffusers_sdxl(model: StableDiffusion, config: str, dtype: torch.dtype) -> Any:
    """diffusers' StableDiffusionXLPipeline (Euler, its default SDPA attention) on the same device with
    copies of `model`'s UNet and VAE weights (built on the meta device: no float32 detour) and its
    text encoders."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel as DiffusersUNet

    configs = sdxl_configs(config)
    public = {
        name: {k: v for k, v in configs[name].items() if not k.startswith("_")} for name in ("unet", "vae")
    }
    with torch.device("meta"):
        unet, vae = DiffusersUNet(**public["unet"]), DiffusersVAE(**public["vae"])
    for theirs, ours in ((unet, model.unet), (vae, model.vae)):
        theirs.load_state_dict({k: v.clone().to(dtype) for k, v in ours.state_dict().items()}, assign=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=model.text_encoder,
        text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer,
        tokenizer_2=model.tokenizer_2,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"]),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def accel_for(bench: Bench) -> AccelConfig:
    """The worker's default fast path (compiled in CUDA graphs), or CUDA graphs alone (--sdxl-accel
    graphs: starts in seconds instead of minutes of compile)."""
    if bench.args.sdxl_accel == "graphs":
        return dataclasses.replace(GRAPHS_ONLY_CUDA, compile_backend=bench.args.compile_backend)
    return bench.default.accel


def stage(bench: Bench) -> None:
    """Ours, then diffusers, at each of --sdxl-batches; their final latents compared at batch 1."""
    # gpu.py's helpers (imported here: gpu.py imports this module)
    from gpu import PeakMemory, free_memory, relative_error, weight_bytes

    args = bench.args
    size, steps, half = args.sdxl_size, args.sdxl_steps, bench.half
    model = build_sdxl(args.sdxl_config, args.device)
    model.keep_float32_decoder()  # as the worker keeps it beside a float16 VAE
    model.to(dtype=half, vae_dtype=bench.default.vae_dtype)
    accel = accel_for(bench)
    bench.before_compile(accel)
    runner = prepare(model, accel)
    decoder = prepare_vae(model, accel)
    result: dict[str, Any] = {
        "config": args.sdxl_config,
        "size": size,
        "steps": steps,
        "sampler": SAMPLER,
        "dtype": str(half).removeprefix("torch."),
        "accel": args.sdxl_accel,
        "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
        "ours": [],
        "diffusers": [],
    }
    bench.results["sdxl"] = result

    def ours_run(batch: int, run_steps: int, m: StableDiffusion = model) -> tuple[runs.Timing, torch.Tensor]:
        return runs.run_ours(m, runner, batch, size, run_steps, vae_decoder=decoder, sampler_name=SAMPLER)

    weights = weight_bytes(
        model.unet, model.vae, model.text_encoder, model.text_encoder_2, model.vae_fallback
    )
    reference = None
    for batch in args.sdxl_batches:
        ours_run(batch, min(2, steps))  # warm-up: capture, compile, autotune
        with PeakMemory(weights) as peak:
            timing, totals = runs.repeat(lambda b=batch: ours_run(b, steps)[0], args.repeats)
        if batch == 1:
            reference = ours_run(1, steps)[1]
        result["ours"].append({**_row(batch, timing, totals), "peak_gb": peak.gb})
        bench.log(
            f"sdxl ours batch {batch}: {batch / timing.total_s:.3f} images/s, {timing.step_s * 1e3:.1f} ms/step"
        )
    result["ours_runner"] = dataclasses.asdict(runner.stats())
    runner.release()
    prepare(model, AccelConfig())  # diffusers gets plain contiguous weights
    free_memory()

    pipe = build_diffusers_sdxl(model, args.sdxl_config, half)
    weights = weight_bytes(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    for batch in args.sdxl_batches:
        runs.run_diffusers(pipe, batch, size, min(2, steps))  # warm-up, not measured
        with PeakMemory(weights) as peak:
            timing, totals = runs.repeat(
                lambda b=batch, p=pipe: runs.run_diffusers(p, b, size, steps)[0], args.diffusers_repeats
            )
        result["diffusers"].append({**_row(batch, timing, totals), "peak_gb": peak.gb})
        bench.log(
            f"sdxl diffusers batch {batch}: {batch / timing.total_s:.3f} images/s, {timing.step_s * 1e3:.1f} ms/step"
        )
    if reference is not None:
        _, latents = runs.run_diffusers(pipe, 1, size, steps, output_type="latent")
        result["latents_relative_error"] = relative_error(latents, reference)
        bench.log(f"sdxl: final latents of ours and diffusers {result['latents_relative_error']:.2e} apart")
    result["speedup"] = {
        str(a["batch"]): a["images_per_s"] / b["images_per_s"]
        for a, b in zip(result["ours"], result["diffusers"], strict=True)
    }
    del pipe, model
    free_memory()


def _row(batch: int, timing: runs.Timing, totals: list[float]) -> dict[str, Any]:
    return {
        "batch": batch,
        "images_per_s": batch / timing.total_s,
        "ms_per_step": timing.step_s * 1000,
        **timing.as_dict(),
        "totals_s": totals,
    }
