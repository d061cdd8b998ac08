"""One job as the engine sees it: the request, its images on their way, and the ticket its slot waits on.

Created by the job function (slot thread), advanced by the engine thread, completed once by whoever
ends it first (engine, result writer): the slot then wakes with the result or the exception.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from models.pipeline import ActiveImage
from schemas.generation import Generation
from schemas.queue import JobResult
from workers.errors import JobEnded


@dataclass(eq=False)  # identity semantics: a Submission is the sampler's key for its images
class Submission:
    job_id: str
    params: Generation
    timeout_s: float | None = None  # None: no limit
    enqueued_at: float | None = None  # unix s the job entered the RQ queue (queue-wait timing)
    submitted_at: float = field(default_factory=time.time)  # unix s the slot handed it to the engine
    admitted_at: float | None = None  # unix s it joined the batch
    images: list[ActiveImage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._started_mono = time.monotonic()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._result: JobResult | None = None
        self._error: JobEnded | None = None

    # --- scheduling -------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """UNet rows per step: 2 per image with classifier-free guidance, else 1."""
        return self.params.num_images * (2 if self.params.guided else 1)

    @property
    def step(self) -> int:
        """Denoising steps done (all images of a request advance together)."""
        return min((image.step_index for image in self.images), default=0)

    @property
    def total_steps(self) -> int:
        return self.params.steps

    @property
    def denoised(self) -> bool:
        return bool(self.images) and all(image.done for image in self.images)

    def timed_out(self, now_mono: float) -> bool:
        """The job's time limit counts from the moment its worker started it (as RQ's job_timeout)."""
        return self.timeout_s is not None and now_mono - self._started_mono >= self.timeout_s

    # --- the ticket -------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def complete(self, result: JobResult) -> bool:
        """End with images; False if it had already ended (the first ending wins)."""
        return self._end(result, None)

    def fail(self, error: JobEnded) -> bool:
        """End without images; False if it had already ended."""
        return self._end(None, error)

    def _end(self, result: JobResult | None, error: JobEnded | None) -> bool:
        with self._lock:
            if self._done.is_set():
                return False
            self._result, self._error = result, error
            self.images = []  # free the latents at once
            self._done.set()
            return True

    def wait(self, timeout_s: float | None) -> bool:
        return self._done.wait(timeout_s)

    def outcome(self) -> JobResult:
        """The result, or raise the error the job ended with. Only once finished."""
        if not self._done.is_set():
            raise RuntimeError(f"job {self.job_id} has not ended yet")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    @property
    def error(self) -> JobEnded | None:
        return self._error
