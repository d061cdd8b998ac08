"""JobStore against the test's real Redis (and a real RQ worker process): what POST /v1/txt2img
reports right after enqueue."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
from rq.job import Job
from rq.job import JobStatus as RqStatus

from schemas.generation import Generation
from schemas.queue import QUEUE_NAME, JobStatus
from service.job_store import JobStore
from service.settings import Settings

PARAMS = Generation(
    prompt="a cat", width=64, height=64, steps=2, guidance_scale=7.5, eta=0.0, seed=1, num_images=1
)


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    client = redis.Redis.from_url(redis_url)
    yield JobStore(client, Settings())
    client.close()


def test_submit_reports_the_place_in_the_queue(store: JobStore) -> None:
    first = store.submit(PARAMS, owner="")
    second = store.submit(PARAMS, owner="")
    assert first[1:] == (JobStatus.QUEUED, 0)
    assert second[1:] == (JobStatus.QUEUED, 1)


@pytest.mark.parametrize(
    ("status_written", "reported"),
    [(None, JobStatus.RUNNING), (RqStatus.STARTED, JobStatus.RUNNING), (RqStatus.FAILED, JobStatus.FAILED)],
)
def test_a_job_a_worker_takes_at_once_is_not_reported_queued_without_a_place(
    store: JobStore, monkeypatch: pytest.MonkeyPatch, status_written: RqStatus | None, reported: JobStatus
) -> None:
    """What an idle worker does between our enqueue and our LPOS: RQ's BLMOVE of the id to its
    intermediate list first, its status ("started", then perhaps "failed") written only later."""
    enqueue = store.queue.enqueue

    def enqueue_then_a_worker_takes_it(*args: object, **kwargs: object) -> Job:
        job = enqueue(*args, **kwargs)
        store.redis.lmove(store.queue.key, store.queue.intermediate_queue_key, "LEFT", "RIGHT")
        if status_written is not None:
            job.set_status(status_written)
        return job

    monkeypatch.setattr(store.queue, "enqueue", enqueue_then_a_worker_takes_it)
    job_id, status, position = store.submit(PARAMS, owner="")
    assert (status, position) == (reported, None)
    assert store.redis.lrange(store.queue.intermediate_queue_key, 0, -1) == [job_id.encode()]


def test_with_a_real_idle_worker_no_answer_says_queued_without_a_place(redis_url: str) -> None:
    """A plain RQ worker process blocks on the queue, so it often takes a job between our enqueue
    and our LPOS (20 times in 20 here). Outside a worker process our job function fails at once
    (after its first import), which keeps the worker idle between submits."""
    client = redis.Redis.from_url(redis_url)
    store = JobStore(client, Settings(job_retries=0))
    worker_code = (
        "import redis, rq, rq.serializers\n"
        f"client = redis.Redis.from_url({redis_url!r})\n"
        f"rq.SimpleWorker([{QUEUE_NAME!r}], connection=client, serializer=rq.serializers.JSONSerializer)"
        ".work(logging_level='ERROR')\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", worker_code], stderr=subprocess.DEVNULL)
    try:
        first, _, _ = store.submit(PARAMS, owner="")  # the worker imports our job module: seconds
        deadline = time.monotonic() + 60
        while client.hget(Job.key_for(first), "status") != b"failed" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.hget(Job.key_for(first), "status") == b"failed", "the RQ worker took no job"
        answers = []
        for _ in range(20):
            _, status, position = store.submit(PARAMS, owner="")
            answers.append((status, position))
            time.sleep(0.2)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        client.close()
    assert all(position is not None for status, position in answers if status is JobStatus.QUEUED), answers
    assert all(position is None for status, position in answers if status is not JobStatus.QUEUED), answers
    assert any(status is JobStatus.RUNNING for status, _ in answers), answers  # the race did happen
