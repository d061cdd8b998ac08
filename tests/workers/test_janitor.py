"""The janitor's sweep and the heartbeat's keep-alive, in-process against the private Redis (RQ's
registries as a slot worker leaves them; no model, no worker process)."""

from __future__ import annotations

import time

from rq import Queue
from rq.serializers import JSONSerializer

from schemas.queue import queue_name
from schemas.redis_keys import MODEL_FORGET_S, MODELS_ZSET, WORKERS_ZSET, model_workers_key
from tests.support.jobs import enqueue, fetch, params
from workers.janitor import sweep
from workers.slots import SlotWorker

MODEL = "tiny"


def take_job(client, worker_name: str, ttl_s: int, model: str = MODEL):
    """Dequeue the next job of `model` and register it as started, as a slot does (without running it)."""
    worker = SlotWorker(
        [queue_name(model)],
        name=worker_name,
        connection=client,
        serializer=JSONSerializer,
        job_heartbeat_ttl_s=ttl_s,
    )
    job, queue = Queue.dequeue_any(worker.queues, None, connection=client, serializer=JSONSerializer)
    worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    return worker, job


def test_abandoned_jobs_are_retried_or_failed_with_a_clear_error(client) -> None:
    """Every model's queue is swept: one abandoned job on each of two models' queues."""
    retried = enqueue(client, params(seed=1), retries=1, model="alpha").id
    final = enqueue(client, params(seed=2), retries=0, model="beta").id
    take_job(client, "dead-1", ttl_s=1, model="alpha")
    take_job(client, "dead-2", ttl_s=1, model="beta")
    time.sleep(1.1)  # the dead worker's heartbeat TTL runs out
    report = sweep(client, job_heartbeat_ttl_s=1, worker_stale_s=30)
    assert (report.retried, report.failed) == (1, 1)
    assert fetch(client, retried).get_status().value == "queued"
    assert Queue(queue_name("alpha"), connection=client, serializer=JSONSerializer).get_job_ids() == [retried]
    assert Queue(queue_name("beta"), connection=client, serializer=JSONSerializer).get_job_ids() == []
    job = fetch(client, final)
    assert job.get_status().value == "failed"
    assert job.meta["error"]["type"] == "WorkerDied"
    assert job.meta["owner"] == "test"
    assert job.ended_at is not None


def test_heartbeat_keeps_a_running_job_out_of_the_sweep(client) -> None:
    from workers.rq_internals import KEEP_JOB_ALIVE

    job_id = enqueue(client, params(seed=3), model=MODEL).id
    worker, job = take_job(client, "alive", ttl_s=1)
    keep_alive = client.register_script(KEEP_JOB_ALIVE)
    execution = worker.execution
    for _ in range(4):  # 2 s of heartbeats: twice the TTL
        keep_alive(
            keys=[job.started_job_registry.key, job.key, execution.key, job.execution_registry.key],
            args=[execution.composite_key, execution.id, time.time(), "2026-01-01T00:00:00.000000Z", 1],
        )
        time.sleep(0.5)
        assert sweep(client, job_heartbeat_ttl_s=1, worker_stale_s=30).retried == 0
    assert fetch(client, job_id).get_status().value == "started"
    assert [e.id for e in job.get_executions()] == [execution.id]


def test_keep_alive_never_brings_back_a_finished_execution(client) -> None:
    from workers.rq_internals import KEEP_JOB_ALIVE

    enqueue(client, params(seed=4), model=MODEL)
    worker, job = take_job(client, "alive", ttl_s=5)
    execution = worker.execution
    with client.pipeline() as pipe:
        worker.cleanup_execution(job, pipeline=pipe)  # the job ended
        pipe.execute()
    keep_alive = client.register_script(KEEP_JOB_ALIVE)
    keys = [job.started_job_registry.key, job.key, execution.key, job.execution_registry.key]
    assert keep_alive(keys=keys, args=[execution.composite_key, execution.id, time.time(), "x", 5]) == 0
    assert not client.exists(execution.key)
    assert client.zcard(job.started_job_registry.key) == 0


def test_stale_worker_names_are_pruned(client) -> None:
    now = time.time()
    client.zadd(WORKERS_ZSET, {"gone": now - 100, "here": now})
    client.zadd(model_workers_key(MODEL), {"gone": now - 100, "here": now})
    client.zadd(MODELS_ZSET, {MODEL: now, "retired": now - MODEL_FORGET_S - 1})
    assert sweep(client, job_heartbeat_ttl_s=30, worker_stale_s=30).pruned_workers == 1
    assert [name.decode() for name in client.zrange(WORKERS_ZSET, 0, -1)] == ["here"]
    assert [name.decode() for name in client.zrange(model_workers_key(MODEL), 0, -1)] == ["here"]
    assert [name.decode() for name in client.zrange(MODELS_ZSET, 0, -1)] == [MODEL]  # "retired" forgotten
