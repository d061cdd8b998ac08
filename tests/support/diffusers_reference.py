"""diffusers as the numerical reference: its StableDiffusionPipeline on the same weights, with the
scheduler that each of our (sampler, scheduler) pairs stands for, and a list of CPU generators.

The table below is the claim "equal to diffusers" spelled out: our sampler `name` following our
`scheduler` is diffusers' `class` built by `from_config(model's scheduler config, **kwargs)`.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=4)
def _pipeline(folder: str):
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
    """(num_images, H, W, 3) uint8: diffusers' StableDiffusionPipeline on the folder's weights with
    the request's sampler and scheduler and one CPU generator per image (seed + i)."""
    pipe, config = _pipeline(str(folder))
    pipe.scheduler = diffusers_scheduler(config, request.sampler, request.scheduler)
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
    )
    return np.stack([np.asarray(image) for image in result.images])


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
