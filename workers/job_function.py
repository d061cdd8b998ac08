"""The RQ job function, `workers.job_function.generate(params)`: hand the request to this process's engine and
wait for it, so RQ records status, result, failure and retries through its normal per-job path.

It runs in a slot thread (workers/slots.py). The engine is process-global: `set_engine` is called
once by workers/main.py after the model is loaded.
"""

from __future__ import annotations

import logging
import time
import uuid

from pydantic import ValidationError
from rq import get_current_job
from rq.job import Job

from schemas.errors import ErrorType
from schemas.generation import Generation
from workers.engine import Engine
from workers.errors import (
    EngineFailure,
    JobCanceled,
    JobEnded,
    JobTimedOut,
    RequestFailed,
    WorkerShuttingDown,
)
from workers.submission import Submission

log = logging.getLogger(__name__)

# The engine enforces each job's time limit between steps; the slot gives up waiting only this much
# later, when the engine itself must be stuck.
WAIT_SLACK_S = 60.0
WAIT_POLL_S = 1.0
DEFAULT_RQ_TIMEOUT_S = 180  # RQ's Queue.DEFAULT_TIMEOUT, for a job enqueued without job_timeout

# The word the per-job log line uses for each way a job can end (see workers/errors.py).
OUTCOMES: dict[type[JobEnded], str] = {
    JobCanceled: "canceled",
    JobTimedOut: "timed out",
    WorkerShuttingDown: "handed back",
}

_engine: Engine | None = None


def set_engine(engine: Engine | None) -> None:
    global _engine
    _engine = engine


def generate(params: dict) -> dict:
    """Generate the request's images; returns JobResult as a dict (PNG bytes live in Redis)."""
    job = get_current_job()
    job_id = job.id if job is not None else uuid.uuid4().hex
    try:
        request = Generation.model_validate(params)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in error.errors()[:5]
        )
        log.info("job %s failed: invalid params (%s)", job_id, problems)
        raise RequestFailed(f"invalid params: {problems}", ErrorType.INVALID_PARAMS) from None

    engine = _engine
    if engine is None:
        raise EngineFailure(
            "workers.job_function.generate runs only inside a worker process (python -m workers.main)"
        )
    submission = Submission(
        job_id,
        request,
        timeout_s=job_timeout_s(job),
        enqueued_at=job.enqueued_at.timestamp() if job is not None and job.enqueued_at else None,
        attempt=job.worker_name or "" if job is not None else "",
    )
    outcome, detail = "succeeded", ""
    try:
        engine.submit(submission)
        _wait(submission, engine)
        return submission.outcome().model_dump()
    except JobEnded as error:
        outcome, detail = OUTCOMES.get(type(error), "failed"), f" [{error.error_type}: {error}]"
        raise
    finally:
        _log_job(submission, outcome, detail)


def job_timeout_s(job: Job | None) -> float | None:
    """The job's time limit as RQ gives it (-1: none; unset: RQ's default)."""
    if job is None:
        return None
    timeout = job.timeout if job.timeout is not None else DEFAULT_RQ_TIMEOUT_S
    return None if float(timeout) < 0 else float(timeout)


def _wait(submission: Submission, engine: Engine) -> None:
    """Wait for the engine, with a bound: it must answer within the job's limit plus WAIT_SLACK_S, and
    while it waits the engine thread must be alive."""
    bound_s = None if submission.timeout_s is None else submission.timeout_s + WAIT_SLACK_S
    started = time.monotonic()
    while not submission.wait(WAIT_POLL_S):
        if not engine.alive:
            submission.fail(EngineFailure("the worker's engine stopped before finishing the job"))
        elif bound_s is not None and time.monotonic() - started > bound_s:
            log.error(
                "job %s: the engine gave no answer within %.0f s; giving up on it", submission.job_id, bound_s
            )
            submission.fail(EngineFailure(f"the worker's engine gave no answer within {bound_s:.0f} s"))


def _log_job(submission: Submission, outcome: str, detail: str) -> None:
    """The one INFO line per job."""
    params = submission.params
    now = time.time()
    admitted = submission.admitted_at
    queued = submission.enqueued_at if submission.enqueued_at is not None else submission.submitted_at
    queue_wait_s = (admitted if admitted is not None else now) - queued
    run_s = now - admitted if admitted is not None else 0.0
    log.info(
        "job %s %s: %dx%d, %d steps, %d image(s), guidance %g, queue wait %.2f s, run %.2f s%s",
        submission.job_id,
        outcome,
        params.width,
        params.height,
        params.steps,
        params.num_images,
        params.guidance_scale,
        max(0.0, queue_wait_s),
        run_s,
        detail,
    )
