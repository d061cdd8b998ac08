"""Finished pictures to Redis: one PNG per image (A1111 `parameters` chunk inside) under its own key
with a TTL, and the small JobResult document that RQ keeps as the job's return value."""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis

from models.pipeline import Picture
from models.png import encode_png, parameters_of
from schemas.queue import ImageRef, JobResult
from schemas.redis_keys import image_key
from workers.submission import Submission

STORE_RETRY_WAITS_S = (0.5, 1.0, 2.0, 4.0)  # between attempts to store a job's PNGs


class ResultWriter:
    def __init__(self, client: redis.Redis, model_name: str, ttl_s: int) -> None:
        self.client = client
        self.model_name = model_name
        self.ttl_s = ttl_s

    def store(self, submission: Submission, pictures: Sequence[Picture]) -> JobResult:
        """PNGs of the job's pictures, each with the seed it was generated with, and the result."""
        refs, pngs = [], []
        for index, picture in enumerate(pictures):
            pngs.append(
                encode_png(picture.pixels, parameters_of(submission.params, picture.seed, self.model_name))
            )
            refs.append(ImageRef(index=index, seed=picture.seed, key=image_key(submission.job_id, index)))
        self._set_all({ref.key: png for ref, png in zip(refs, pngs, strict=True)})
        return JobResult(model=self.model_name, images=refs, timings=timings(submission, time.time()))

    def _set_all(self, values: dict[str, bytes]) -> None:
        """SET every key with the TTL; a short Redis outage is waited out (the pictures cost far more
        than a few seconds), a long one fails the job, which RQ then retries."""
        for wait_s in (*STORE_RETRY_WAITS_S, None):
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    for key, value in values.items():
                        pipe.set(key, value, ex=self.ttl_s)
                    pipe.execute()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if wait_s is None:
                    raise
                time.sleep(wait_s)


def timings(submission: Submission, stored_at: float) -> dict[str, float]:
    """queue_wait_s: enqueued (or handed to the engine) -> joined the batch; run_s: joined the batch ->
    last PNG stored; total_s: enqueued -> stored."""
    admitted = submission.admitted_at or submission.submitted_at
    queued = submission.enqueued_at if submission.enqueued_at is not None else submission.submitted_at
    return {
        "queue_wait_s": round(max(0.0, admitted - queued), 4),
        "run_s": round(max(0.0, stored_at - admitted), 4),
        "total_s": round(max(0.0, stored_at - queued), 4),
    }
