"""Redis key names shared by the API and the workers (all under one prefix)."""

from __future__ import annotations

PREFIX = "sd:"

# Sorted set of worker names scored by their last heartbeat (unix seconds).
WORKERS_ZSET = PREFIX + "workers"

# Sorted set of the model names workers have served, scored by the last heartbeat of any of their
# workers: a model named here without a live worker is known (503: retry later), one never named is
# not (422/404). The janitor forgets models not seen for MODEL_FORGET_S.
MODELS_ZSET = PREFIX + "models"
MODEL_FORGET_S = 7 * 24 * 3600


def model_workers_key(model: str) -> str:
    """Sorted set of the names of a model's workers scored by their last heartbeat (as WORKERS_ZSET):
    whose waiting jobs a queued job of that model waits behind."""
    return f"{PREFIX}model-workers:{model}"


def image_key(job_id: str, index: int) -> str:
    """PNG bytes of image `index` of a job (SET with a TTL)."""
    return f"{PREFIX}image:{job_id}:{index}"


def input_image_key(name: str) -> str:
    """Bytes of an input image as uploaded (PNG, JPEG or WebP), stored by the API with a TTL under the
    name a job's `init_image` or `mask_image` gives (schemas/generation.py); the worker reads it."""
    return f"{PREFIX}input:{name}"


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


def a1111_model_key(owner: str) -> str:
    """The model an API key chose with AUTOMATIC1111's POST /sdapi/v1/options (its name; no TTL: a
    setting of that key, never of anyone else's). `owner` is the key's owner id ("" with auth off)."""
    return f"{PREFIX}a1111:model:{owner or '-'}"


def a1111_jobs_key(owner: str) -> str:
    """Sorted set of the jobs an API key queued through /sdapi/v1/txt2img, scored by the time they were
    queued (TTL): what /sdapi/v1/progress reports and /sdapi/v1/interrupt cancels."""
    return f"{PREFIX}a1111:jobs:{owner or '-'}"


# Sorted set of the jobs with a webhook still to deliver, scored by when to look at each next (unix
# seconds): written by the API at submission, read and claimed by every API process (service/webhooks.py).
WEBHOOKS_PENDING_ZSET = PREFIX + "webhooks:pending"


def webhook_attempts_key(job_id: str) -> str:
    """Hash {attempts, first_at} of a job's webhook deliveries once the first was tried (TTL)."""
    return f"{PREFIX}webhook:{job_id}"
