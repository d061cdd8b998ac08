"""Prometheus metrics of one app instance (own registry, so tests can build several apps).

- requests by route template, method and status (middleware below);
- jobs submitted/rejected (by model); finished jobs' run and queue-wait durations and images, counted
  once per job by whichever API process first sees the job finished (a Redis SET NX marker);
- at scrape time, read from Redis: queue depth, running jobs and live workers, in all and per model
  (`sd_model_*{model}`: every model served or known), and each live worker's published EngineStats:
  its totals as counters, its current state as gauges.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.queue import JobStatus
from schemas.worker_info import WorkerInfo
from service.route_table import RouteTable

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
JOB_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

# Per live worker, from its published EngineStats: (metric suffix, field, help). Totals since the
# worker started are counters (a restart resets them: Prometheus' rate() handles that); the rest
# are gauges of the worker's state now.
WORKER_TOTALS = (
    ("unet_calls", "UNet calls since the worker started"),
    ("unet_rows", "Sum of rows over UNet calls (CFG counts 2 per image)"),
    ("unet_requests", "Sum of requests sharing each UNet call"),
    ("images_generated", "Images the worker generated since it started"),
    ("jobs_succeeded", "Jobs the worker finished"),
    ("jobs_failed", "Jobs the worker failed"),
    ("jobs_canceled", "Jobs the worker canceled"),
    ("jobs_requeued", "Jobs the worker handed back to the queue (shutdown)"),
    ("oom_splits", "Out-of-memory errors that split a UNet call"),
)
WORKER_GAUGES = (
    ("max_requests_per_call", "Most requests that shared one UNet call"),
    ("last_batch_rows", "Rows in the latest UNet call"),
    ("jobs_in_engine", "Jobs in the worker's engine now (running or waiting to join)"),
    ("call_rows_limit", "Rows per UNet call now (lowered by out-of-memory errors)"),
)


@dataclass(frozen=True)
class ModelQueue:
    """One model's queue at scrape time."""

    depth: int = 0
    running: int = 0


@dataclass
class QueueState:
    """What the scrape read from Redis; redis_up False leaves the other values out."""

    redis_up: bool
    models: dict[str, ModelQueue] = field(default_factory=dict)  # every model served or known
    workers: list[WorkerInfo] = field(default_factory=list)

    @property
    def queue_depth(self) -> int:
        return sum(queue.depth for queue in self.models.values())

    @property
    def jobs_running(self) -> int:
        return sum(queue.running for queue in self.models.values())


class QueueStateCollector(Collector):
    """Turns the QueueState read just before a scrape into gauges."""

    def __init__(self) -> None:
        self.state = QueueState(redis_up=False)

    def collect(self) -> Iterator[Metric]:
        state = self.state
        yield GaugeMetricFamily(
            "sd_redis_up", "1 if Redis answered the last scrape", value=int(state.redis_up)
        )
        if not state.redis_up:
            return
        yield GaugeMetricFamily(
            "sd_queue_depth", "Jobs waiting in the queues (all models)", value=state.queue_depth
        )
        yield GaugeMetricFamily(
            "sd_jobs_running", "Jobs a worker is running (all models)", value=state.jobs_running
        )
        yield GaugeMetricFamily(
            "sd_workers_alive", "Workers with a fresh heartbeat (all models)", value=len(state.workers)
        )
        yield from self._per_model(state)
        now_s = time.time()
        labels = ["worker", "model"]
        families = {
            "heartbeat_age": GaugeMetricFamily(
                "sd_worker_heartbeat_age_seconds", "Seconds since the worker's heartbeat", labels=labels
            ),
            "max_batch_rows": GaugeMetricFamily(
                "sd_worker_max_batch_rows", "Largest UNet batch the worker admits", labels=labels
            ),
            "slots": GaugeMetricFamily("sd_worker_slots", "Jobs the worker takes at once", labels=labels),
        }
        families["fast_path_fallback"] = GaugeMetricFamily(
            "sd_worker_fast_path_fallback",
            "1 if the worker's fast path (CUDA graphs, compile) failed and it runs the plain path",
            labels=labels,
        )
        stats: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            name: CounterMetricFamily(f"sd_worker_{name}", help_text, labels=labels)
            for name, help_text in WORKER_TOTALS
        }
        stats |= {
            name: GaugeMetricFamily(f"sd_worker_{name}", help_text, labels=labels)
            for name, help_text in WORKER_GAUGES
        }
        for info in state.workers:
            values = [info.name, info.model]
            families["heartbeat_age"].add_metric(values, max(now_s - info.heartbeat_at, 0.0))
            families["max_batch_rows"].add_metric(values, info.max_batch_rows)
            families["slots"].add_metric(values, info.slots)
            families["fast_path_fallback"].add_metric(values, int("fell back" in info.fast_path))
            for name, family in stats.items():
                family.add_metric(values, getattr(info.stats, name))
        yield from families.values()
        yield from stats.values()

    @staticmethod
    def _per_model(state: QueueState) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "sd_model_queue_depth", "Jobs waiting in the model's queue", labels=["model"]
        )
        running = GaugeMetricFamily(
            "sd_model_jobs_running", "The model's jobs a worker runs", labels=["model"]
        )
        alive = GaugeMetricFamily("sd_model_workers_alive", "The model's live workers", labels=["model"])
        workers: dict[str, int] = {}
        for info in state.workers:
            workers[info.model] = workers.get(info.model, 0) + 1
        for model in sorted(set(state.models) | set(workers)):
            queue = state.models.get(model, ModelQueue())
            depth.add_metric([model], queue.depth)
            running.add_metric([model], queue.running)
            alive.add_metric([model], workers.get(model, 0))
        yield from (depth, running, alive)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "sd_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=registry
        )
        self.request_seconds = Histogram(
            "sd_http_request_duration_seconds",
            "Time to answer a request",
            ["method", "route"],
            registry=registry,
        )
        self.jobs_submitted = Counter(
            "sd_jobs_submitted", "Jobs accepted (202)", ["model"], registry=registry
        )
        # reason queue_full or model_unavailable; model "" when no model was named and none is served
        self.jobs_rejected = Counter(
            "sd_jobs_rejected", "Jobs refused", ["reason", "model"], registry=registry
        )
        self.jobs_finished = Counter("sd_jobs_finished", "Jobs seen finished", ["status"], registry=registry)
        self.job_run_seconds = Histogram(
            "sd_job_run_seconds", "Start to end of finished jobs", ["status"], buckets=JOB_SECONDS_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.job_queue_wait_seconds = Histogram(
            "sd_job_queue_wait_seconds", "Enqueue to start of finished jobs", buckets=JOB_SECONDS_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.images_generated = Counter("sd_images_generated", "Images of succeeded jobs", registry=registry)
        self.queue_state = QueueStateCollector()
        registry.register(self.queue_state)
        ProcessCollector(registry=registry)

    def observe_finished(
        self, status: JobStatus, queue_wait_s: float | None, run_s: float | None, images: int
    ) -> None:
        """Count one finished job (the caller makes sure this happens once per job)."""
        self.jobs_finished.labels(status.value).inc()
        if queue_wait_s is not None:
            self.job_queue_wait_seconds.observe(max(queue_wait_s, 0.0))
        if run_s is not None:
            self.job_run_seconds.labels(status.value).observe(max(run_s, 0.0))
        self.images_generated.inc(images)

    def render(self, state: QueueState) -> bytes:
        # Scrapes are rendered on the event loop one at a time, so setting state here cannot interleave.
        self.queue_state.state = state
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: ApiMetrics, route_table: RouteTable) -> None:
        self.app = app
        self.metrics = metrics
        self.route_table = route_table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status_code = 500  # if the app raises before answering, the server answers 500
        start = time.perf_counter()

        async def send_recording(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            route = self.route_table.template(scope)
            method = scope.get("method", "")
            method = method if method in KNOWN_METHODS else "OTHER"  # bounded label values
            self.metrics.requests.labels(method, route, str(status_code)).inc()
            self.metrics.request_seconds.labels(method, route).observe(time.perf_counter() - start)
