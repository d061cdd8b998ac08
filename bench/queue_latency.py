"""Latency of small jobs behind big ones: head-of-line blocking, before and after a change.

    python bench/queue_latency.py                          # this checkout, CPU worker, embedded model
    python bench/queue_latency.py --repo /tmp/before       # a worker of another checkout (a git worktree)

It starts a real worker process (`python -m workers.main`, SD_MAX_BATCH_ROWS 8 as on a CPU) from
--repo on a private redis-server, keeps --big-jobs big jobs in flight the whole time (8 guided images,
--big-steps steps: 16 rows, twice what a step holds) and enqueues a small job (1 image, --small-steps
steps) every --interval-s seconds for --duration-s seconds, exactly as the API enqueues them. It
prints, for the small jobs and the big ones, the latency from enqueue to the last PNG stored (RQ's
enqueued_at -> ended_at): p50, p95, p99, max, and the images per second of the whole run.

Timings on a shared machine are noisy: compare two runs made one after the other, as ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from rq import Queue  # noqa: E402
from rq.job import Job  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from schemas.queue import JOB_FUNCTION  # noqa: E402
from schemas.redis_keys import worker_info_key  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

ENDED = ("finished", "failed", "canceled", "stopped")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repo", type=Path, default=ROOT, help="checkout whose worker runs (default: this one)"
    )
    parser.add_argument("--duration-s", type=float, default=60.0, help="how long small jobs keep arriving")
    parser.add_argument("--interval-s", type=float, default=1.5, help="seconds between small jobs")
    parser.add_argument("--small-steps", type=int, default=6)
    parser.add_argument("--big-steps", type=int, default=150)
    parser.add_argument("--big-jobs", type=int, default=1, help="big jobs kept in flight")
    parser.add_argument("--batch-rows", type=int, default=8, help="SD_MAX_BATCH_ROWS of the worker")
    parser.add_argument("--size", type=int, default=64, help="pixels per side (the embedded model's 64)")
    return parser.parse_args(argv)


def params(prompt: str, steps: int, images: int, seed: int, size: int) -> dict:
    """A resolved request as the API enqueues it (it fills in the model's size; so do we)."""
    return {
        "prompt": prompt,
        "steps": steps,
        "num_images": images,
        "seed": seed,
        "width": size,
        "height": size,
    }


def enqueue(queue: Queue, job_params: dict) -> Job:
    """As the API enqueues (service/job_store.py), without the queue limit."""
    return queue.enqueue(
        JOB_FUNCTION,
        kwargs={"params": job_params},
        job_id=uuid.uuid4().hex,
        description="generate",
        result_ttl=3600,
        failure_ttl=3600,
        job_timeout=3600,
    )


def start_worker(repo: Path, redis_url: str, batch_rows: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": redis_url, "SD_DEVICE": "cpu", "SD_MAX_BATCH_ROWS": str(batch_rows),
           "SD_WORKER_NAME": "latency-bench", "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("SD_MODEL", None)  # the embedded model of that checkout
    return subprocess.Popen(
        [sys.executable, "-m", "workers.main"],
        cwd=repo,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def latency_s(job: Job) -> float | None:
    job.refresh()
    if job.get_status(refresh=False).value != "finished" or not job.ended_at or not job.enqueued_at:
        return None
    return (job.ended_at - job.enqueued_at).total_seconds()


def summary(values: list[float]) -> str:
    if not values:
        return "none finished"
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return (
        f"n={len(values):3d}  p50 {statistics.median(values):6.2f} s  p95 {pct(95):6.2f} s  "
        f"p99 {pct(99):6.2f} s  max {ordered[-1]:6.2f} s"
    )


def run(args: argparse.Namespace) -> None:
    server = RedisServer()
    server.start()
    log = Path(tempfile.mkdtemp(prefix="latency-bench-")) / "worker.log"
    worker = start_worker(args.repo.resolve(), server.url, args.batch_rows, log)
    client = redis.Redis.from_url(server.url)
    try:
        deadline = time.monotonic() + 180
        while (
            not (slots := client.keys("rq:workers:txt2img*"))
            or client.get(worker_info_key("latency-bench")) is None
        ):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        # the queue its slots listen on: its model's (a checkout from before per-model queues: "txt2img")
        queue = Queue(
            slots[0].decode().removeprefix("rq:workers:"), connection=client, serializer=JSONSerializer
        )
        big: list[Job] = []
        small: list[Job] = []
        started = time.monotonic()
        next_small = started
        seed = 0
        while time.monotonic() - started < args.duration_s:
            running_big = [j for j in big if j.get_status(refresh=True).value not in ENDED]
            for _ in range(args.big_jobs - len(running_big)):
                seed += 1
                big.append(
                    enqueue(
                        queue, params("a blue square on a red background", args.big_steps, 8, seed, args.size)
                    )
                )
            if time.monotonic() >= next_small:
                seed += 1
                small.append(
                    enqueue(
                        queue,
                        params("a red circle on a blue background", args.small_steps, 1, seed, args.size),
                    )
                )
                next_small += args.interval_s
            time.sleep(0.05)
        wait_until = time.monotonic() + 600
        while any(j.get_status(refresh=True).value not in ENDED for j in small + big):
            if time.monotonic() > wait_until:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        small_latencies = [v for v in map(latency_s, small) if v is not None]
        big_latencies = [v for v in map(latency_s, big) if v is not None]
        images = len(small_latencies) + 8 * len(big_latencies)
        print(f"worker from {args.repo} | small: {args.small_steps} steps, 1 image, every {args.interval_s:g} s; "
              f"big: {args.big_steps} steps, 8 images, {args.big_jobs} in flight; {args.batch_rows} rows per step")  # fmt: skip
        print(f"| small jobs | {summary(small_latencies)} |")
        print(f"| big jobs   | {summary(big_latencies)} |")
        print(f"| throughput | {images} images in {elapsed:.0f} s = {images / elapsed:.2f} images/s |")
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        client.close()
        server.cleanup()


if __name__ == "__main__":
    run(parse_args())
