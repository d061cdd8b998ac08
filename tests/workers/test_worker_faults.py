"""Faults with real processes: SIGKILL mid-batch (janitor + a new worker), SIGTERM drain, Redis
restarting or pausing under a running worker, and several workers on one queue."""

from __future__ import annotations

import os
import signal
import time

from rq import Queue
from rq.serializers import JSONSerializer

from schemas.queue import queue_name
from schemas.redis_keys import cancel_key, progress_key
from tests.support.jobs import (
    enqueue,
    fetch,
    live_worker_names,
    params,
    status,
    wait_terminal,
    wait_until,
    worker_info,
)
from tests.support.pictures import assert_pngs_equal_alone_runs

# The whole recovery after a SIGKILL (job heartbeat TTL 4 s + janitor sweep + rerun on the new
# worker) must end within this bound; it only guards against jobs lost or stuck forever.
RECOVERY_BOUND_S = 120
JOBS_BOUND_S = 240
MODEL = "tiny-sd1"  # the name the tiny model's workers serve it under (its folder's)


def started_ids(client) -> set[str]:
    return set(
        Queue(
            queue_name(MODEL), connection=client, serializer=JSONSerializer
        ).started_job_registry.get_job_ids()
    )


def queued_ids(client) -> list[str]:
    return Queue(queue_name(MODEL), connection=client, serializer=JSONSerializer).get_job_ids()


def test_sigkill_mid_batch_every_job_ends_none_lost(client, start_worker, start_janitor) -> None:
    janitor = start_janitor(SD_JANITOR_INTERVAL_S="0.5")
    doomed = start_worker(SD_SLOTS="3", SD_MAX_BATCH_ROWS="8")
    retried = [enqueue(client, params(steps=60, seed=s), retries=1).id for s in range(2)]
    final = enqueue(client, params(steps=60, seed=9), retries=0).id  # no retry left: must fail clearly
    queued = [enqueue(client, params(steps=4, seed=20 + s)).id for s in range(2)]  # never started
    running = retried + [final]
    wait_until(
        lambda: all(int(client.hget(progress_key(j), "step") or 0) >= 1 for j in running),
        60,
        "the batch to run",
    )
    doomed.kill()
    rescuer = start_worker(SD_SLOTS="3", SD_MAX_BATCH_ROWS="8")
    outcomes = wait_terminal(client, running + queued, RECOVERY_BOUND_S)
    assert outcomes[final] == "failed"
    error = fetch(client, final).meta["error"]
    assert error["type"] == "WorkerDied" and "no retries left" in error["message"]
    for job_id in retried + queued:
        assert outcomes[job_id] == "finished", (job_id, outcomes)
        assert fetch(client, job_id).worker_name.startswith(rescuer.name)
    assert not started_ids(client)  # nothing left running
    assert "abandoned job(s) retried" in janitor.logs()
    # the dead worker leaves WORKERS_ZSET; the live one stays
    wait_until(lambda: live_worker_names(client) == {rescuer.name}, 60, "the dead worker pruned")


def test_long_job_outlives_many_heartbeat_ttls_without_being_abandoned(
    client, start_worker, start_janitor
) -> None:
    """SimpleWorker refreshes nothing while a job runs: our heartbeat thread must, or the janitor would
    retry a job that is alive and well."""
    ttl_s = 2
    janitor = start_janitor(SD_JANITOR_INTERVAL_S="0.3", SD_JOB_HEARTBEAT_TTL_S=str(ttl_s))
    worker = start_worker(SD_SLOTS="1", SD_JOB_HEARTBEAT_TTL_S=str(ttl_s), SD_HEARTBEAT_INTERVAL_S="0.3")
    job_id = enqueue(client, params(steps=150, width=256, height=256)).id  # far longer than we watch it
    wait_until(lambda: int(client.hget(progress_key(job_id), "step") or 0) >= 1, 60, "the job to run")
    time.sleep(4 * ttl_s)  # several TTLs (and janitor sweeps) while it runs
    assert started_ids(client) == {job_id}  # still running, its first and only execution
    assert fetch(client, job_id).worker_name.startswith(worker.name)
    assert "stopped heartbeating" not in janitor.logs()  # never taken for abandoned
    client.set(cancel_key(job_id), b"1", ex=60)  # end it quickly
    assert wait_terminal(client, [job_id], JOBS_BOUND_S) == {job_id: "canceled"}
    assert "stopped heartbeating" not in janitor.logs()


def test_sigterm_finishes_running_jobs_and_leaves_queued_ones(client, start_worker) -> None:
    first = start_worker(SD_SLOTS="2", SD_MAX_BATCH_ROWS="4", SD_DRAIN_TIMEOUT_S="120")
    running = [enqueue(client, params(steps=60, seed=s)).id for s in range(2)]
    waiting = [enqueue(client, params(steps=5, seed=10 + s)).id for s in range(3)]
    wait_until(lambda: started_ids(client) == set(running), 60, "two jobs to start")
    wait_until(lambda: int(client.hget(progress_key(running[0]), "step") or 0) >= 1, 60, "the batch to step")
    assert first.stop(timeout_s=120) == 0  # SIGTERM: drain, then exit cleanly
    assert "draining" in first.logs()
    for job_id in running:
        assert status(client, job_id) == "finished"
        assert fetch(client, job_id).worker_name.startswith(first.name)
    assert queued_ids(client) == waiting  # untouched, in order
    assert all(status(client, job_id) == "queued" for job_id in waiting)
    assert first.name not in live_worker_names(client)  # it said goodbye

    second = start_worker(SD_SLOTS="2", SD_MAX_BATCH_ROWS="4")
    outcomes = wait_terminal(client, waiting, JOBS_BOUND_S)
    assert set(outcomes.values()) == {"finished"}
    assert all(fetch(client, job_id).worker_name.startswith(second.name) for job_id in waiting)


def test_sigterm_deadline_hands_running_jobs_back_to_the_queue(client, start_worker) -> None:
    worker = start_worker(SD_SLOTS="2", SD_DRAIN_TIMEOUT_S="0.5")
    endless = enqueue(client, params(steps=150, width=128, height=128), retries=1).id
    later = enqueue(client, params(steps=3, seed=5)).id
    wait_until(lambda: int(client.hget(progress_key(endless), "step") or 0) >= 1, 60, "the job to run")
    assert worker.stop(timeout_s=60) == 0
    job = fetch(client, endless)
    assert job.get_status().value == "queued"
    assert job.retries_left == 1  # a hand-back is not a retry
    assert queued_ids(client)[0] == endless  # at the front: it keeps its turn
    assert status(client, later) in ("queued", "finished")
    assert not started_ids(client)


def test_worker_reconnects_after_redis_restarts(client, redis_server, start_worker) -> None:
    worker = start_worker(SD_SLOTS="2")
    before = enqueue(client, params(seed=1)).id
    assert wait_terminal(client, [before], JOBS_BOUND_S) == {before: "finished"}
    redis_server.stop()  # no persistence: everything in Redis is gone
    wait_until(lambda: "Redis unreachable" in worker.logs(), 30, "the worker to notice")
    redis_server.start()
    client.connection_pool.disconnect()
    after = [enqueue(client, params(seed=s), model=MODEL).id for s in (2, 3)]  # its heartbeat may be late
    assert set(wait_terminal(client, after, JOBS_BOUND_S).values()) == {"finished"}
    assert worker.running
    wait_until(lambda: worker.name in live_worker_names(client), 30, "the worker's heartbeat to return")
    assert worker_info(client, worker.name).name == worker.name


def test_two_workers_share_the_queue_and_no_job_runs_twice(client, start_worker) -> None:
    workers = [start_worker(SD_SLOTS="3", SD_MAX_BATCH_ROWS="6") for _ in range(2)]
    jobs = [enqueue(client, params(steps=8, seed=s)).id for s in range(12)]
    assert set(wait_terminal(client, jobs, JOBS_BOUND_S).values()) == {"finished"}
    logs = "".join(worker.logs() for worker in workers)
    for job_id in jobs:
        assert logs.count(f"job {job_id} succeeded") == 1  # taken once, by one worker
    ran_by = {fetch(client, job_id).worker_name.rsplit(".slot", 1)[0] for job_id in jobs}
    assert ran_by <= {worker.name for worker in workers}


def test_a_redis_outage_costs_time_not_retries(client, redis_server, start_worker, tiny_model) -> None:
    """Redis stops answering (paused: its data survives, as with a network cut) while jobs finish:
    their results wait in the worker and are stored once it answers, RQ's bookkeeping waits too,
    no retry is spent, and the whole outage is one warning and one recovery line, no traceback."""
    worker = start_worker(SD_SLOTS="2", SD_REDIS_SOCKET_TIMEOUT_S="1")
    jobs = [
        (enqueue(client, p, retries=1).id, p) for p in (params(steps=12, seed=3), params(steps=14, seed=4))
    ]
    wait_until(lambda: int(client.hget(progress_key(jobs[0][0]), "step") or 0) >= 1, 60, "the batch to step")
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(6)  # both jobs finish denoising meanwhile (a few tenths of a second each)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    outcomes = wait_terminal(client, [job_id for job_id, _ in jobs], JOBS_BOUND_S)
    assert set(outcomes.values()) == {"finished"}, outcomes
    for job_id, job_params in jobs:
        assert fetch(client, job_id).retries_left == 1  # the outage spent no retry
        assert_pngs_equal_alone_runs(client, tiny_model, job_id, job_params)
    logs = worker.logs()
    assert logs.count("Redis unreachable or refusing writes") == 1, logs[-3000:]
    assert logs.count("Redis answers again") == 1
    assert "Traceback" not in logs
