"""Live previews: a small PNG of a running job's first image, for jobs submitted with `preview: true`.

What it shows is the sampler's current estimate of the final picture (the predicted clean latent,
`ActiveImage.denoised`), not the noisy latent, through the latent -> RGB map fitted to the model's
own VAE (models/preview.py: the fit runs once, at warm-up or at the first preview). Made on the
engine thread between steps (a (C, h, w) -> (h, w, 3) matrix product and a tiny PNG: no VAE call),
at most once per PREVIEW_INTERVAL_S per job, and written to Redis by the progress sink in the same
pipelined round trip as the progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch

from models.image_files import encode_png
from models.preview import latent_to_rgb, rgb_map
from models.stable_diffusion import StableDiffusion
from workers.submission import Submission

log = logging.getLogger(__name__)

PREVIEW_INTERVAL_S = 0.25  # about what a client polling the job's status can show
PREVIEW_TTL_S = 60  # a preview outlives its job only briefly
PREVIEW_COMPRESS_LEVEL = 1  # a few KB at most: speed over size


class PreviewMaker:
    def __init__(self, model: StableDiffusion | None = None, interval_s: float = PREVIEW_INTERVAL_S) -> None:
        """`model`: whose VAE the colours are fitted to (None: the fixed map of models/preview.py)."""
        self.model = model
        self.interval_s = interval_s
        self._map_failed = False  # the fit raised once: the fixed map from then on, no retry per preview
        self._last: dict[str, tuple[float, int]] = {}  # job id -> (monotonic s, step) of its last preview

    def collect(self, submissions: Iterable[Submission]) -> dict[str, bytes]:
        """{job id: PNG} for the running jobs that asked for previews and are due one."""
        now = time.monotonic()
        previews: dict[str, bytes] = {}
        live: set[str] = set()
        for submission in submissions:
            images = submission.image_snapshot()
            if not submission.params.preview or not images or submission.finished:
                continue
            live.add(submission.job_id)
            step = submission.step
            last_at, last_step = self._last.get(submission.job_id, (-float("inf"), 0))
            if step == 0 or step == last_step or now - last_at < self.interval_s:
                continue
            image = images[0]
            estimate = image.denoised if image.denoised is not None else image.latent
            try:
                previews[submission.job_id] = encode_png(
                    latent_to_rgb(estimate, self._rgb_map()).numpy(), compress_level=PREVIEW_COMPRESS_LEVEL
                )
            except Exception:  # a preview is a nicety: never let it hurt the job
                log.warning("job %s: could not make a preview", submission.job_id, exc_info=True)
                continue
            self._last[submission.job_id] = (now, step)
        self._last = {job_id: last for job_id, last in self._last.items() if job_id in live}
        return previews

    def _rgb_map(self) -> torch.Tensor | None:
        if self.model is None or self._map_failed:
            return None
        try:
            return rgb_map(self.model)
        except Exception:  # a preview is a nicety: the fixed map is still a picture
            log.warning("could not fit the previews' colours to the VAE: fixed map instead", exc_info=True)
            self._map_failed = True
            return None
