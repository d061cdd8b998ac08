"""JobStore against the test's real Redis, in process: what POST /v1/txt2img reports right after enqueue."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from rq.job import Job
from rq.job import JobStatus as RqStatus
from rq.serializers import JSONSerializer

from schemas.jobs import GenerationParams, JobStatus
from service.jobs import JobStore
from service.settings import Settings

PARAMS = GenerationParams(
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


def test_a_job_a_worker_takes_at_once_is_reported_running_not_queued_without_a_place(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueue = store.queue.enqueue

    def enqueue_then_a_worker_takes_it(*args: object, **kwargs: object) -> Job:
        # what an idle worker's BLPOP does between our enqueue and our LPOS
        job = enqueue(*args, **kwargs)
        store.queue.remove(job.id)
        job.set_status(RqStatus.STARTED)
        return job

    monkeypatch.setattr(store.queue, "enqueue", enqueue_then_a_worker_takes_it)
    job_id, status, position = store.submit(PARAMS, owner="")
    assert (status, position) == (JobStatus.RUNNING, None)
    assert (
        Job.fetch(job_id, connection=store.redis, serializer=JSONSerializer).get_status() == RqStatus.STARTED
    )
