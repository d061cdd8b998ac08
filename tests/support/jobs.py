"""Helpers shared by the worker tests: enqueue as the API does, wait for outcomes, compare PNGs."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable

import numpy as np
import redis
from PIL import Image
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from schemas.generation import Generation
from schemas.queue import JOB_FUNCTION, JobResult, queue_name
from schemas.redis_keys import WORKERS_ZSET, worker_info_key
from schemas.worker_info import WorkerInfo

TERMINAL = ("finished", "failed", "canceled", "stopped")


def params(**overrides: object) -> dict:
    base = dict(
        prompt="a red circle on a blue background",
        negative_prompt="",
        width=64,
        height=64,
        steps=6,
        guidance_scale=7.5,
        eta=0.0,
        seed=1,
        num_images=1,
    )
    base.update(overrides)
    return Generation.model_validate(base).model_dump()


def enqueue(
    client: redis.Redis, job_params: dict, retries: int = 1, timeout_s: int = 300, model: str | None = None
) -> Job:
    """Exactly as the API enqueues (service/job_store.py), on the queue of `model`: else of the model
    `job_params` names, else of the one model the live workers serve."""
    model = model or job_params.get("model") or served_model(client)
    queue = Queue(queue_name(model), connection=client, serializer=JSONSerializer)
    return queue.enqueue(
        JOB_FUNCTION,
        kwargs={"params": {**job_params, "model": model}},
        job_id=uuid.uuid4().hex,
        description="txt2img",
        result_ttl=600,
        failure_ttl=600,
        job_timeout=timeout_s,
        retry=Retry(max=retries) if retries > 0 else None,
        meta={"owner": "test"},
    )


def fetch(client: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=client, serializer=JSONSerializer)


def status(client: redis.Redis, job_id: str) -> str:
    return str(fetch(client, job_id).get_status().value)


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05) -> object:
    """Poll until `predicate()` is truthy; the timeout only guards against hangs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_terminal(client: redis.Redis, job_ids: list[str], timeout_s: float) -> dict[str, str]:
    def statuses() -> dict[str, str] | None:
        found = {job_id: status(client, job_id) for job_id in job_ids}
        return found if all(s in TERMINAL for s in found.values()) else None

    try:
        return wait_until(statuses, timeout_s, "jobs to end", poll_s=0.1)  # type: ignore[return-value]
    except AssertionError:
        raise AssertionError(
            f"jobs did not all end within {timeout_s} s: { {j: status(client, j) for j in job_ids} }"
        ) from None


def result_of(client: redis.Redis, job_id: str) -> JobResult:
    return JobResult.model_validate(fetch(client, job_id).return_value())


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def max_pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def worker_info(client: redis.Redis, name: str) -> WorkerInfo:
    raw = client.get(worker_info_key(name))
    assert raw is not None, f"worker {name} publishes no info"
    return WorkerInfo.model_validate_json(raw)


def served_model(client: redis.Redis) -> str:
    """The model the live workers serve (AssertionError unless exactly one: name it then)."""
    models = {worker_info(client, name).model for name in live_worker_names(client)}
    assert len(models) == 1, f"workers serve {sorted(models) or 'no model'}: name the model to enqueue for"
    return models.pop()


def live_worker_names(client: redis.Redis) -> set[str]:
    return {name.decode() for name in client.zrange(WORKERS_ZSET, 0, -1)}
