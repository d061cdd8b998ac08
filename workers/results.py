"""Finished pictures to Redis: one file per image, in the job's output format (PNG, JPEG or WebP, the
A1111 parameters inside), under its own key with a TTL, and the small JobResult document that RQ keeps
as the job's return value.

While Redis is unavailable (down, or full with `noeviction`), finished results wait here, files
encoded, and are stored as soon as it answers: the pictures cost far more than the wait. The
waiting results are bounded in bytes (`buffer_bytes`) and in time (`wait_s`); past either bound the
job goes back to the queue (WorkerShuttingDown: another attempt, not a retry used up) instead of
the worker running out of memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

import redis

from models.image_files import encode_image, parameters_of
from models.pipeline import Picture
from schemas.queue import ImageRef, JobResult
from schemas.redis_keys import image_key
from workers.errors import WorkerShuttingDown
from workers.redis_outage import GaveUp, retry_while_unavailable
from workers.submission import Submission


class ResultWriter:
    def __init__(
        self,
        client: redis.Redis,
        model_name: str,
        ttl_s: int,
        wait_s: float = 600.0,
        buffer_bytes: int = 512 * 2**20,
        lora_hashes: Callable[[Sequence[str]], Mapping[str, str]] | None = None,
    ) -> None:
        """`lora_hashes`: A1111's short hash of each named LoRA, for the PNGs' parameters."""
        self.client = client
        self.lora_hashes = lora_hashes
        self.model_name = model_name
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.buffer_bytes = buffer_bytes
        self._lock = threading.Lock()
        self._held_bytes = 0  # image bytes of results waiting for Redis, all writer threads together

    def store(self, submission: Submission, pictures: Sequence[Picture]) -> JobResult:
        """Files of the job's pictures, each with the seed it was generated with, and the result."""
        params = submission.params
        refs, files = [], []
        hashes = None
        if params.loras and self.lora_hashes is not None:
            hashes = self.lora_hashes([ref.name for ref in params.loras])
        for index, picture in enumerate(pictures):
            parameters = parameters_of(params, picture.seed, self.model_name, hashes)
            files.append(encode_image(picture.pixels, params.output_format, parameters, params.image_quality))
            key = image_key(submission.job_id, index)
            refs.append(ImageRef(index=index, seed=picture.seed, key=key, format=params.output_format))
        self._store_all({ref.key: data for ref, data in zip(refs, files, strict=True)}, submission)
        return JobResult(
            model=self.model_name,
            images=refs,
            timings=timings(submission, time.time()),
            warnings=submission.warnings,
        )

    def _store_all(self, values: dict[str, bytes], submission: Submission) -> None:
        size = sum(len(value) for value in values.values())
        held = False

        def set_all() -> None:
            with self.client.pipeline(transaction=False) as pipe:
                for key, value in values.items():
                    pipe.set(key, value, ex=self.ttl_s)
                pipe.execute()

        def keep_waiting() -> bool:
            nonlocal held
            if submission.finished:  # its slot gave up on it: nobody would read the result
                return False
            if not held:
                with self._lock:
                    if self._held_bytes + size > self.buffer_bytes:
                        return False
                    self._held_bytes += size
                    held = True
            return True

        try:
            retry_while_unavailable(set_all, self.wait_s, keep_waiting)
        except GaveUp as error:
            raise WorkerShuttingDown(
                f"the pictures could not be stored ({error}; {self._held_bytes // 2**20} MB of results "
                "already waiting); the job goes back to the queue"
            ) from error
        finally:
            if held:
                with self._lock:
                    self._held_bytes -= size


def timings(submission: Submission, stored_at: float) -> dict[str, float]:
    """queue_wait_s: enqueued (or handed to the engine) -> first step; run_s: first step -> last PNG
    stored; total_s: enqueued -> stored."""
    admitted = submission.admitted_at or submission.submitted_at
    queued = submission.enqueued_at if submission.enqueued_at is not None else submission.submitted_at
    return {
        "queue_wait_s": round(max(0.0, admitted - queued), 4),
        "run_s": round(max(0.0, stored_at - admitted), 4),
        "total_s": round(max(0.0, stored_at - queued), 4),
    }
