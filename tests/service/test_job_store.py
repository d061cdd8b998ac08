"""JobStore against the test's real Redis (and a real RQ worker process): the status and place a
client sees, from the enqueue to the first step."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
from rq.job import Job
from rq.job import JobStatus as RqStatus
from rq.serializers import JSONSerializer

from schemas.generation import Generation
from schemas.queue import JobStatus, queue_name
from schemas.redis_keys import progress_key, waiting_key
from service.job_store import JobStore
from service.settings import Settings
from tests.support.api import publish_worker

MODEL = "test-model"  # publish_worker's
PARAMS = Generation(
    prompt="a cat",
    width=64,
    height=64,
    steps=2,
    guidance_scale=7.5,
    eta=0.0,
    seed=1,
    num_images=1,
    model=MODEL,
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


def take(store: JobStore, job_id: str, worker: str) -> Job:
    """What a worker's slot does with a job it takes: RQ's BLMOVE to its intermediate list, then
    status "started" under the slot's name."""
    queue = store.queue(MODEL)
    store.redis.lrem(queue.key, 1, job_id)
    store.redis.rpush(queue.intermediate_queue_key, job_id)
    job = Job.fetch(job_id, connection=store.redis, serializer=JSONSerializer)
    job.worker_name = f"{worker}.slot0"
    job.set_status(RqStatus.STARTED)
    job.save()
    return Job.fetch(job_id, connection=store.redis, serializer=JSONSerializer)


def test_a_job_a_worker_holds_before_its_first_step_is_queued_with_its_place(store: JobStore) -> None:
    """Taken by a worker whose batch has no room for it yet: queued, counted with the jobs that
    worker holds (its published waiting list) and those still in the queue: never "running, step
    0" with no place (what a client saw for a minute behind big jobs)."""
    publish_worker(store.redis, "w1")
    first, second, third = (store.submit(PARAMS, owner="")[0] for _ in range(3))
    taken = [take(store, job_id, "w1") for job_id in (first, second)]
    scores = {job.id: job.enqueued_at.timestamp() for job in taken}
    store.redis.zadd(waiting_key("w1"), scores)
    assert [store.snapshot(job).queue_position for job in taken] == [0, 1]
    assert all(store.snapshot(job).status is JobStatus.QUEUED for job in taken)
    assert store.snapshot(store.find(third, "")).queue_position == 2  # behind both, first in the queue
    fourth = store.submit(PARAMS, owner="")
    assert fourth[1:] == (JobStatus.QUEUED, 3)


def test_places_count_only_the_jobs_of_the_same_model(store: JobStore) -> None:
    """Another model's jobs wait for other workers: neither its queue nor its workers' waiting lists
    put anyone ahead of this model's jobs."""
    publish_worker(store.redis, "w1")
    publish_worker(store.redis, "other-1", model="other")
    other = PARAMS.model_copy(update={"model": "other"})
    others = [store.submit(other, owner="")[0] for _ in range(3)]
    store.redis.lrem(f"rq:queue:{queue_name('other')}", 1, others[0])  # other-1 took it
    store.redis.zadd(waiting_key("other-1"), {others[0]: time.time() - 60})
    assert store.submit(PARAMS, owner="")[1:] == (JobStatus.QUEUED, 0)
    assert store.submit(other, owner="")[1:] == (JobStatus.QUEUED, 3)  # 1 held by other-1, 2 queued
    assert store.redis.llen(f"rq:queue:{queue_name('other')}") == 3
    assert store.queue_depth(MODEL) == 1


def test_running_only_from_the_first_step_of_this_attempt(store: JobStore) -> None:
    job_id = store.submit(PARAMS, owner="")[0]
    job = take(store, job_id, "w2")
    progress = progress_key(job_id)
    store.redis.hset(progress, mapping={"step": 7, "total_steps": 9, "attempt": "w1.slot0"})  # an earlier try
    snap = store.snapshot(job)
    assert (snap.status, snap.step, snap.queue_position) == (JobStatus.QUEUED, 0, 0)
    store.redis.hset(progress, mapping={"step": 1, "attempt": "w2.slot0"})
    snap = store.snapshot(job)
    assert (snap.status, snap.step, snap.queue_position) == (JobStatus.RUNNING, 1, None)


def test_with_a_real_idle_worker_every_answer_says_queued_with_a_place(redis_url: str) -> None:
    """A plain RQ worker process blocks on the queue, so it often takes a job between our enqueue
    and our LPOS. Outside a worker process our job function fails at once (after its first
    import), which keeps the worker idle between submits. Whoever took it, a new job is queued (it
    has taken no step) and has a place."""
    client = redis.Redis.from_url(redis_url)
    store = JobStore(client, Settings(job_retries=0))
    worker_code = (
        "import redis, rq, rq.serializers\n"
        f"client = redis.Redis.from_url({redis_url!r})\n"
        f"rq.SimpleWorker([{queue_name(MODEL)!r}], connection=client, serializer=rq.serializers.JSONSerializer)"
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
            job_id, status, position = store.submit(PARAMS, owner="")
            answers.append((status, position, client.lpos(store.queue(MODEL).key, job_id)))
            time.sleep(0.2)
    finally:
        worker.kill()  # nothing to drain
        worker.wait(timeout=30)
        client.close()
    assert all(status is JobStatus.QUEUED and position == 0 for status, position, _ in answers), answers
