"""diffusers as the numerical reference: its StableDiffusionPipeline (StableDiffusionXLPipeline for an
SDXL folder) on the same weights, with the scheduler that each of our (sampler, scheduler) pairs
stands for, and a list of CPU generators.

The table below is the claim "equal to diffusers" spelled out: our sampler `name` following our
`scheduler` is diffusers' `class` built by `from_config(model's scheduler config, **kwargs)`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from schemas.generation import Generation

# (sampler, scheduler) -> (diffusers scheduler class name, from_config overrides)
_SCHEDULE_KWARGS = {
    "normal": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}
_SAMPLER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "uni_pc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def diffusers_scheduler(config: dict[str, Any], sampler: str, scheduler: str):
    """The diffusers scheduler our (sampler, scheduler) stands for, on a model's scheduler config."""
    import diffusers

    class_name, kwargs = _SAMPLER_CLASSES[sampler]
    cls = getattr(diffusers, class_name)
    return cls.from_config(config, **kwargs, **_SCHEDULE_KWARGS[scheduler])


def is_sdxl_folder(folder: str | Path) -> bool:
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return index.get("_class_name") == "StableDiffusionXLPipeline"


@functools.lru_cache(maxsize=4)
def _pipeline(folder: str):
    if is_sdxl_folder(folder):
        from diffusers import StableDiffusionXLPipeline

        # no invisible watermark: it would change the pixels (diffusers adds it when installed)
        pipe = StableDiffusionXLPipeline.from_pretrained(
            folder, torch_dtype=torch.float32, add_watermarker=False
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            folder,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            torch_dtype=torch.float32,  # the embedded model is stored in float16
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)  # the folder's own config: every case starts from it


def diffusers_images(folder: Path, request: Generation) -> np.ndarray:
    """(num_images, H, W, 3) uint8: diffusers' StableDiffusionPipeline (SDXL's for an SDXL folder, with
    the request's size conditioning) on the folder's weights with the request's sampler and scheduler
    and one CPU generator per image (seed + i)."""
    pipe, config = _pipeline(str(folder))
    pipe.scheduler = diffusers_scheduler(config, request.sampler, request.scheduler)
    sdxl = {}
    if is_sdxl_folder(folder):
        sdxl = {
            name: getattr(request, name)
            for name in ("original_size", "crops_coords_top_left", "target_size")
            if getattr(request, name) is not None
        }
    result = pipe(
        request.prompt,
        negative_prompt=request.negative_prompt or None,
        width=request.width,
        height=request.height,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        eta=request.eta,
        num_images_per_prompt=request.num_images,
        generator=[torch.Generator("cpu").manual_seed(s) for s in request.image_seeds()],
        **sdxl,
    )
    return np.stack([np.asarray(image) for image in result.images])


@functools.lru_cache(maxsize=4)
def _edit_pipeline(folder: str, inpainting: bool):
    """The folder's txt2img pipeline's components as its img2img (SDXL's for an SDXL folder) or
    inpainting pipeline."""
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )

    pipe, _ = _pipeline(folder)
    sdxl = is_sdxl_folder(folder)
    if inpainting and sdxl:
        raise ValueError("no SDXL inpainting reference here")
    if inpainting:
        edit = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
    elif sdxl:
        # no invisible watermark (it would change the pixels); the txt2img pipeline's empty-prompt zeros
        edit = StableDiffusionXLImg2ImgPipeline(
            **pipe.components,
            add_watermarker=False,
            force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
        )
    else:
        edit = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    edit.set_progress_bar_config(disable=True)
    return edit


def diffusers_edit_images(
    folder: Path, request: Generation, init: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """(num_images, H, W, 3) uint8: diffusers' StableDiffusionImg2ImgPipeline (no mask; SDXL's for an
    SDXL folder) or StableDiffusionInpaintPipeline (with `mask`, and for an inpainting checkpoint: a
    white mask when none is given) on the folder's weights, from `init` ((H, W, 3) uint8, the request's
    size) and `mask` ((H, W) uint8, white = repaint), with the request's strength, sampler and
    scheduler. Each image is diffusers' picture of its seed alone (one call per seed with one CPU
    generator), which is what ours is (models/img2img.py: diffusers' inpainting pipeline draws the
    posterior samples of several images from the first image's generator)."""
    from PIL import Image

    pipe, config = _pipeline(str(folder))
    inpainting = mask is not None or pipe.unet.config.in_channels == 9
    edit = _edit_pipeline(str(folder), inpainting)
    edit.scheduler = diffusers_scheduler(config, request.sampler, request.scheduler)
    extra: dict[str, Any] = {}
    if inpainting:
        white = np.full(init.shape[:2], 255, dtype=np.uint8)
        extra = {
            "mask_image": Image.fromarray(mask if mask is not None else white),
            "width": request.width,
            "height": request.height,
        }
    pictures = []
    for seed in request.image_seeds():
        result = edit(
            request.prompt,
            image=Image.fromarray(init),
            strength=request.strength,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            eta=request.eta,
            generator=[torch.Generator("cpu").manual_seed(seed)],
            **extra,
        )
        pictures.append(np.asarray(result.images[0]))
    return np.stack(pictures)


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
