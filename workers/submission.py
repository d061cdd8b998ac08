"""One job as the engine sees it: the request, its images on their way, and the ticket its slot waits on.

Created by the job function (slot thread), advanced by the engine thread. Three kinds of thread may
end it, and the first ending wins (`complete`/`fail` are atomic; later ones are no-ops):
- the engine thread: invalid for the model, a failure of its own, canceled, timed out, drained;
- a result-writer thread: its PNGs stored (complete), or storing them failed;
- its slot thread: the engine died, or gave no answer in time.
Ending a job drops its images at once (the latents are freed). Threads other than the engine's
read them through `image_snapshot()`, never the list itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from models.image_inputs import ImageInputs
from models.img2img import EncodedInputs
from models.pipeline import ActiveImage
from schemas.generation import Generation
from schemas.queue import JobResult
from workers.errors import JobEnded


@dataclass(eq=False)  # identity semantics: a Submission is the pipeline's key for its images
class Submission:
    job_id: str
    params: Generation
    timeout_s: float | None = None  # None: no limit
    enqueued_at: float | None = None  # unix s the job entered the RQ queue (queue-wait timing)
    attempt: str = ""  # the RQ worker running this attempt: progress is published under it
    submitted_at: float = field(default_factory=time.time)  # unix s the slot handed it to the engine
    admitted_at: float | None = None  # unix s of its first step
    images: list[ActiveImage] = field(default_factory=list)  # engine thread; others: image_snapshot()
    # img2img and inpainting: its input images, fitted to its size (the job function decodes them), and,
    # once the engine has run them through the VAE, their encodings; both dropped when it starts
    inputs: ImageInputs | None = None
    encoded: EncodedInputs | None = None
    # what its result will tell the user (JobResult.warnings), known before it starts
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._started_mono = time.monotonic()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._result: JobResult | None = None
        self._error: JobEnded | None = None

    # --- scheduling (engine thread) -----------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Its prompt is encoded and its images drawn."""
        return bool(self.images)

    @property
    def stepped(self) -> bool:
        """It has taken its first step: from then on a client sees it running."""
        return self.admitted_at is not None

    @property
    def images_left(self) -> int:
        """Images not denoised yet (all of them before it started)."""
        if not self.images:
            return 0 if self.finished else self.params.num_images
        return sum(not image.done for image in self.images)

    @property
    def step(self) -> int:
        """Denoising steps done, averaged over its images (they may advance apart)."""
        images = self.image_snapshot()
        return sum(image.steps_done for image in images) // len(images) if images else 0

    @property
    def total_steps(self) -> int:
        """The steps it runs (img2img: int(steps * strength))."""
        return self.params.steps_to_run

    @property
    def denoised(self) -> bool:
        return bool(self.images) and all(image.done for image in self.images)

    def timed_out(self, now_mono: float) -> bool:
        """The job's time limit counts from the moment its worker started it (as RQ's job_timeout)."""
        return self.timeout_s is not None and now_mono - self._started_mono >= self.timeout_s

    def attach_images(self, images: list[ActiveImage]) -> bool:
        """Give it its images once started; False (and nothing kept) if it ended meanwhile."""
        with self._lock:
            if self._done.is_set():
                return False
            self.images = images
            return True

    def image_snapshot(self) -> tuple[ActiveImage, ...]:
        """Its images as they are now (empty once it ended): safe to read from any thread."""
        with self._lock:
            return tuple(self.images)

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
            self.inputs = self.encoded = None
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
