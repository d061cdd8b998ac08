"""Live previews: a small PNG of a running job's first latent, for jobs submitted with `preview: true`.

Made on the engine thread between steps (a (C, h, w) -> (h, w, 3) matrix product and a tiny PNG:
no VAE), at most once per PREVIEW_INTERVAL_S per job, and written to Redis by the progress sink in
the same pipelined round trip as the progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from models.png import encode_png
from models.preview import latent_to_rgb
from workers.submission import Submission

log = logging.getLogger(__name__)

PREVIEW_INTERVAL_S = 0.25  # about what a client polling the job's status can show
PREVIEW_TTL_S = 60  # a preview outlives its job only briefly
PREVIEW_COMPRESS_LEVEL = 1  # a few KB at most: speed over size


class PreviewMaker:
    def __init__(self, interval_s: float = PREVIEW_INTERVAL_S) -> None:
        self.interval_s = interval_s
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
            try:
                previews[submission.job_id] = encode_png(
                    latent_to_rgb(images[0].latent).numpy(), compress_level=PREVIEW_COMPRESS_LEVEL
                )
            except Exception:  # a preview is a nicety: never let it hurt the job
                log.warning("job %s: could not make a preview", submission.job_id, exc_info=True)
                continue
            self._last[submission.job_id] = (now, step)
        self._last = {job_id: last for job_id, last in self._last.items() if job_id in live}
        return previews
