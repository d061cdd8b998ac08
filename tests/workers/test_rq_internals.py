"""What workers/rq_internals.py leans on in RQ is still there, with the same shape; and a job that
names anything but our job function never runs it."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import pytest
import rq
from redis.client import PubSubWorkerThread
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from schemas.queue import queue_name
from service.job_store import queue_key, started_key
from tests.support.jobs import fetch, wait_terminal
from workers.rq_internals import RQ_CHECKED_VERSIONS, AllowlistedJob, ForbiddenJob

# (class, method, parameter names in order): every RQ method we override or call beyond the
# documented API. A rename, a new required parameter or a removal fails here, not in production.
OVERRIDDEN_OR_CALLED = [
    (SimpleWorker, "_install_signal_handlers", ["self"]),
    (SimpleWorker, "dequeue_job_and_maintain_ttl", ["self", "timeout", "max_idle_time"]),
    (SimpleWorker, "subscribe", ["self"]),
    (SimpleWorker, "unsubscribe", ["self"]),
    (SimpleWorker, "handle_payload", ["self", "message"]),
    (SimpleWorker, "_pubsub_exception_handler", ["self", "exc", "pubsub", "pubsub_thread"]),
    (SimpleWorker, "run_maintenance_tasks", ["self"]),
    (SimpleWorker, "perform_job", ["self", "job", "queue"]),
    (SimpleWorker, "handle_exception", ["self", "job", "exc_info"]),
    (SimpleWorker, "handle_job_failure", ["self", "job", "queue", "started_job_registry", "exc_string"]),
    (SimpleWorker, "handle_job_success", ["self", "job", "queue", "started_job_registry"]),
    (SimpleWorker, "handle_execution_ended", ["self", "job", "queue", "heartbeat_ttl"]),
    (SimpleWorker, "get_heartbeat_ttl", ["self", "job"]),
    (SimpleWorker, "cleanup_execution", ["self", "job", "pipeline"]),
    (SimpleWorker, "heartbeat", ["self", "timeout", "pipeline"]),
    (SimpleWorker, "set_state", ["self", "state", "pipeline"]),
    (SimpleWorker, "get_redis_server_version", ["self"]),
    (Queue, "_enqueue_job", ["self", "job", "pipeline", "at_front", "unique"]),
    (Queue, "enqueue_job", ["self", "job", "pipeline", "at_front", "unique"]),
    (
        Queue,
        "dequeue_any",
        ["cls", "queues", "timeout", "connection", "job_class", "serializer", "death_penalty_class"],
    ),
    (Job, "send_webhooks", ["self", "status", "exc_string"]),
    (PubSubWorkerThread, "stop", ["self", "timeout"]),
]


def test_rq_version_is_one_this_module_was_checked_against() -> None:
    from packaging.specifiers import SpecifierSet

    assert rq.__version__ in SpecifierSet(RQ_CHECKED_VERSIONS), (
        f"RQ {rq.__version__}: read workers/rq_internals.py against it, then widen RQ_CHECKED_VERSIONS"
    )


@pytest.mark.parametrize(
    ("cls", "name", "params"), OVERRIDDEN_OR_CALLED, ids=lambda v: getattr(v, "__name__", v)
)
def test_rq_methods_we_rely_on_keep_their_shape(cls: type, name: str, params: list[str]) -> None:
    member = inspect.getattr_static(cls, name, None)
    assert member is not None, f"{cls.__name__}.{name} is gone"
    function = member.__func__ if isinstance(member, classmethod | staticmethod) else member
    assert [p for p in inspect.signature(function).parameters] == params


def test_rq_attributes_and_key_layout_we_rely_on(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    name = queue_name("tiny-sd1")
    queue = Queue(name, connection=client, serializer=JSONSerializer)
    assert StartedJobRegistry(queue=queue).key == f"rq:wip:{name}" == started_key("tiny-sd1")
    assert queue.key == f"rq:queue:{name}" == queue_key("tiny-sd1")
    assert queue.intermediate_queue_key == f"rq:queue:{name}:intermediate"
    assert Queue.from_queue_key(queue.key, connection=client).name == name  # the janitor finds it back
    job = queue.enqueue("workers.job_function.generate", kwargs={"params": {}})
    assert job.started_job_registry.key == StartedJobRegistry(queue=queue).key
    assert job.execution_registry.key == f"rq:executions:{job.id}"
    for attribute in (
        "_success_callback_name",
        "_failure_callback_name",
        "_stopped_callback_name",
        "webhooks",
    ):
        assert hasattr(job, attribute), attribute
    worker = SimpleWorker([queue], connection=client, serializer=JSONSerializer)
    for attribute in ("_stop_requested", "_ordered_queues", "pubsub_channel_name", "execution"):
        assert hasattr(worker, attribute), attribute
    client.close()


def test_a_job_naming_another_function_is_refused_and_never_runs(
    client, start_worker, tmp_path: Path
) -> None:
    """Whoever can write to Redis can enqueue `os.system` with arguments (the JSON serializer only
    rules out pickle): the worker refuses it, loudly, without importing it, and keeps working."""
    worker = start_worker(SD_SLOTS="1")
    marker = tmp_path / "pwned"
    queue = Queue(queue_name(worker.model), connection=client, serializer=JSONSerializer)
    evil = queue.enqueue("os.system", args=[f"touch {marker}"])
    assert wait_terminal(client, [evil.id], 60) == {evil.id: "failed"}
    time.sleep(0.5)
    assert not marker.exists()
    error = fetch(client, evil.id).meta["error"]
    assert error["type"] == "ForbiddenJob" and "'os.system'" in error["message"]
    assert "REFUSED" in worker.logs() and "os.system" in worker.logs()


def test_callbacks_and_webhooks_of_a_job_are_refused(client) -> None:
    job = AllowlistedJob(id="x" * 32, connection=client)
    job._func_name = "workers.job_function.generate"
    job._failure_callback_name = "os.system"
    with pytest.raises(ForbiddenJob, match="callback 'os.system'"):
        _ = job.failure_callback
    job._func_name = "builtins.exec"
    with pytest.raises(ForbiddenJob, match="'builtins.exec'"):
        _ = job.func
