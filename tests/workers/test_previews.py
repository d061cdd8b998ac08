"""workers/previews.py: which running jobs get a preview PNG, and how often."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from models.preview import latent_to_rgb
from schemas.generation import Generation
from workers.errors import JobCanceled
from workers.previews import PreviewMaker
from workers.submission import Submission


def submission(preview: bool, job_id: str = "a" * 32) -> Submission:
    params = Generation(
        prompt="x",
        width=96,
        height=64,
        steps=10,
        guidance_scale=7.5,
        eta=0.0,
        seed=1,
        num_images=1,
        preview=preview,
    )
    job = Submission(job_id, params)
    latent = torch.randn(1, 4, 8, 12)
    # what the maker reads: the latent and, once it stepped, the sampler's estimate of the clean one
    job.images = [SimpleNamespace(latent=latent, denoised=None, steps_done=0, done=False)]
    return job


def at_step(job: Submission, step: int) -> Submission:
    job.images[0].steps_done = step
    job.images[0].denoised = torch.randn(1, 4, 8, 12)
    return job


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_only_jobs_that_asked_get_previews() -> None:
    maker = PreviewMaker(interval_s=0)
    wanted, other = submission(True, "a" * 32), submission(False, "b" * 32)
    assert maker.collect([wanted, other]) == {}  # step 0: nothing to show yet
    previews = maker.collect([at_step(wanted, 1), at_step(other, 1)])
    assert list(previews) == [wanted.job_id]
    image = Image.open(io.BytesIO(previews[wanted.job_id]))
    assert image.format == "PNG" and image.size == (12, 8)  # the latent's size: 1/8 of the picture


def test_one_preview_per_step_and_per_interval() -> None:
    job = submission(True)
    fast = PreviewMaker(interval_s=0)
    assert fast.collect([at_step(job, 1)])
    assert fast.collect([job]) == {}  # same step: unchanged
    assert fast.collect([at_step(job, 2)])
    slow = PreviewMaker(interval_s=3600)
    assert slow.collect([at_step(job, 3)])
    assert slow.collect([at_step(job, 4)]) == {}  # too soon after the last one


def test_ended_jobs_get_none_and_are_forgotten() -> None:
    maker = PreviewMaker(interval_s=0)
    job = at_step(submission(True), 1)
    assert maker.collect([job])
    job.fail(JobCanceled("canceled"))
    assert maker.collect([job]) == {}
    assert maker._last == {}


def test_the_preview_shows_the_estimate_of_the_clean_latent_through_the_models_map() -> None:
    job = at_step(submission(True), 1)
    fixed = PreviewMaker(interval_s=0).collect([job])[job.job_id]
    # the estimate of the clean latent, not the noisy latent
    assert np.array_equal(pixels(fixed), latent_to_rgb(job.images[0].denoised).numpy())
    weights = torch.randn(5, 3)
    model = SimpleNamespace(preview_rgb_map=weights)  # a map already fitted to the model's VAE
    fitted = PreviewMaker(model, interval_s=0).collect([at_step(job, 2)])[job.job_id]  # type: ignore[arg-type]
    assert np.array_equal(pixels(fitted), latent_to_rgb(job.images[0].denoised, weights).numpy())
