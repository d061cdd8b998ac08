"""Redis key names shared by the API and the workers (all under one prefix)."""

from __future__ import annotations

PREFIX = "sd:"

# Sorted set of worker names scored by their last heartbeat (unix seconds).
WORKERS_ZSET = PREFIX + "workers"


def image_key(job_id: str, index: int) -> str:
    """PNG bytes of image `index` of a job (SET with a TTL)."""
    return f"{PREFIX}image:{job_id}:{index}"


def progress_key(job_id: str) -> str:
    """Hash {step, total_steps, attempt} of a job that has taken its first step (TTL); `attempt` is
    the RQ worker running it, so a retried job's old progress is not taken for the new attempt's."""
    return f"{PREFIX}progress:{job_id}"


def cancel_key(job_id: str) -> str:
    """Set by the API to ask the engine to drop a running job at its next step (TTL)."""
    return f"{PREFIX}cancel:{job_id}"


def preview_key(job_id: str) -> str:
    """PNG bytes of a cheap preview of a running job's current latent (TTL)."""
    return f"{PREFIX}preview:{job_id}"


def worker_info_key(worker_name: str) -> str:
    """JSON WorkerInfo a worker publishes on every heartbeat (TTL a few heartbeats)."""
    return f"{PREFIX}worker:{worker_name}"


def waiting_key(worker_name: str) -> str:
    """Sorted set of the jobs a worker holds that have not taken their first step, scored by the time
    they were enqueued (TTL): with the queue, what a queued job waits behind."""
    return f"{PREFIX}waiting:{worker_name}"
