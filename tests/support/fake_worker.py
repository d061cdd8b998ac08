"""Real RQ, stand-in generation: RQ's own SimpleWorker runs queued jobs with `fake_txt2img`.

This exercises the API's reading of what RQ records (statuses, results, failures, cancellation,
timestamps) without a GPU or a model. `serve` publishes a live worker of FAKE_MODEL (as a heartbeat
would), so the API queues jobs on that model's queue, which `run_queued_jobs` runs. It is not the worker: the end-to-end lifecycle test with the
real worker lives with workers/. What it relies on is the contract the real worker follows:
- progress: HSET progress_key(job_id) step/total_steps/attempt (the RQ worker's name) once per step;
- PNG bytes at image_key(job_id, index) with a TTL, and the JobResult document as return value;
- cancel: the engine checks cancel_key(job_id) between steps; on cancel the job function raises
  workers.errors.JobCanceled, and the worker's own endings (workers/slots.py: EngineEndings)
  record the job as canceled, as in the real worker.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import redis
from PIL import Image
from rq import Queue, SimpleWorker, get_current_job
from rq.serializers import JSONSerializer

from schemas.generation import Generation
from schemas.queue import JOB_FUNCTION, WARNINGS_META, ImageRef, JobResult, queue_name
from schemas.redis_keys import cancel_key, image_key, progress_key
from workers.errors import JobCanceled
from workers.rq_internals import AllowlistedJob
from workers.slots import EngineEndings

FAKE_MODEL = "fake-model"
FAKE_WORKER = "fake-worker"
IMAGE_TTL_S = 600
FAIL_PREFIX = "fail:"  # a prompt starting with this makes the job raise ValueError(rest of prompt)
META_ERROR_PREFIX = "meta-error:"  # ... this sets job.meta["error"] = {type, message}, then raises
WARN_PREFIX = "warn:"  # ... this warns FAKE_WARNING, early (job.meta) and in the result, as the worker does
FAKE_WARNING = "the fake model knows nothing; ignored: everything"

# Called as on_step(job_id, step) after each step's progress is written (tests look at the API then).
on_step: Callable[[str, int], None] | None = None


def png_bytes(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color=(seed % 256, 64, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def fake_txt2img(params: dict) -> dict:
    job = get_current_job()
    assert job is not None
    request = Generation.model_validate(params)
    if request.prompt.startswith(FAIL_PREFIX):
        raise ValueError(request.prompt.removeprefix(FAIL_PREFIX).strip())
    if request.prompt.startswith(META_ERROR_PREFIX):
        job.meta["error"] = {
            "type": "PromptRejected",
            "message": request.prompt.removeprefix(META_ERROR_PREFIX),
        }
        job.save_meta()
        raise RuntimeError("an internal detail the client should not see")
    warnings = [FAKE_WARNING] if request.prompt.startswith(WARN_PREFIX) else []
    if warnings:
        job.meta[WARNINGS_META] = warnings
        job.save_meta()
    conn = job.connection
    for step in range(1, request.steps + 1):
        if conn.exists(cancel_key(job.id)):
            raise JobCanceled(f"canceled at step {step} of {request.steps}")
        progress = {"step": step, "total_steps": request.steps, "attempt": job.worker_name}
        conn.hset(progress_key(job.id), mapping=progress)
        conn.expire(progress_key(job.id), IMAGE_TTL_S)
        if on_step is not None:
            on_step(job.id, step)
    images = []
    for index, seed in enumerate(request.image_seeds()):
        key = image_key(job.id, index)
        conn.set(key, png_bytes(request.width, request.height, seed), ex=IMAGE_TTL_S)
        images.append(ImageRef(index=index, seed=seed, key=key))
    return JobResult(model=FAKE_MODEL, images=images, timings={"run_s": 0.0}, warnings=warnings).model_dump()


class FakeJob(AllowlistedJob):
    """Resolves the contract's job function to fake_txt2img (the real one needs torch)."""

    @property
    def func(self):  # type: ignore[override]
        if self.func_name == JOB_FUNCTION:
            return fake_txt2img
        return super().func


class BurstWorker(EngineEndings, SimpleWorker):
    """SimpleWorker with the real worker's job endings, without the command channel (its pubsub
    thread costs up to 1 s to join on exit)."""

    def subscribe(self) -> None:
        pass

    def unsubscribe(self) -> None:
        pass


def serve(redis_url: str, **fields: object) -> None:
    """Publish a live worker of FAKE_MODEL (native size 512x512 unless `fields` say otherwise) that
    stays alive for an hour without beating: the API routes requests to FAKE_MODEL's queue."""
    from tests.support.api import publish_worker

    conn = redis.Redis.from_url(redis_url)
    values: dict[str, object] = {"model": FAKE_MODEL, "native_width": 512, "native_height": 512, **fields}
    publish_worker(conn, name=FAKE_WORKER, age_s=-3600, ttl_s=7200, **values)
    conn.close()


def queue_key() -> str:
    """The Redis list of FAKE_MODEL's queue."""
    return f"rq:queue:{queue_name(FAKE_MODEL)}"


def run_queued_jobs(redis_url: str) -> None:
    """Run every queued job of FAKE_MODEL to its end in this thread, as RQ does in a worker (burst mode)."""
    conn = redis.Redis.from_url(redis_url)
    queue = Queue(queue_name(FAKE_MODEL), connection=conn, serializer=JSONSerializer)
    worker = BurstWorker([queue], connection=conn, serializer=JSONSerializer, job_class=FakeJob)
    worker.work(burst=True, with_scheduler=False)
    conn.close()
