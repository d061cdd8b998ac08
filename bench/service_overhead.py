"""What the service adds to one job beyond the worker's own generation time.

    python -m bench.service_overhead [--jobs 30] [--steps 10] [--model PATH]

Starts a private redis-server, a real API process and a real worker (tiny random model unless
--model), then runs jobs one at a time as a client would: POST /v1/txt2img, poll GET /v1/jobs/{id}
every --poll-ms, GET the PNG. For each job:

    end_to_end = POST sent -> PNG bytes received (client clock)
    worker     = the worker's own run_s (joined the batch -> last PNG stored in Redis)
    overhead   = end_to_end - worker   (HTTP, enqueue, RQ hand-off, job bookkeeping, polling, PNG fetch)

Its parts: post (the POST round trip), enqueue_to_batch (RQ enqueue -> a slot dequeues -> the engine
admits it), stored_to_seen (last PNG stored -> RQ marks the job finished -> the client's poll sees
it), png_get (the PNG fetch). The poll interval bounds the measurable overhead from below by about half of it: keep it small.
Prints a table of medians and p99s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path

import httpx
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.api_process import ApiProcess  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.worker_process import WorkerProcess  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(jobs: int, steps: int, model: str | None, poll_ms: float, size: int) -> list[dict[str, float]]:
    redis_server = RedisServer()
    redis_server.start()
    try:
        if model is None:
            from models.random_model import build_random_model

            model = str(build_random_model("sd1", Path(tempfile.mkdtemp(prefix="sd-bench-")) / "tiny"))
        env = {"REDIS_URL": redis_server.url}
        worker_env = {
            **env,
            "SD_MODEL": model,
            "SD_HEARTBEAT_INTERVAL_S": "2",
            "SD_JOB_HEARTBEAT_TTL_S": "30",
        }
        with (
            ApiProcess(env) as api,
            WorkerProcess(worker_env).start(),
            httpx.Client(base_url=api.url) as client,
        ):
            body = {"prompt": "a red circle in the top left", "steps": steps, "width": size, "height": size}
            rows = []
            conn = redis.Redis.from_url(redis_server.url)
            for i in range(jobs + 2):  # the first two warm up
                start, start_wall = time.perf_counter(), time.time()
                job_id = client.post("/v1/txt2img", json={**body, "seed": i}).json()["id"]
                posted = time.perf_counter()
                while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in (
                    "succeeded",
                    "failed",
                ):
                    time.sleep(poll_ms / 1000)
                seen_wall, seen = time.time(), time.perf_counter()
                png = client.get(job["images"][0]["url"])
                end = time.perf_counter()
                assert job["status"] == "succeeded" and png.status_code == 200, job
                rq_job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
                timings = rq_job.return_value()["timings"]
                enqueued_wall = rq_job.enqueued_at.replace(tzinfo=UTC).timestamp()
                stored_wall = enqueued_wall + timings["total_s"]
                if i >= 2:
                    rows.append(
                        {
                            "end_to_end_s": end - start,
                            "worker_s": timings["run_s"],
                            "overhead_s": end - start - timings["run_s"],
                            "post_s": posted - start,
                            "enqueue_to_batch_s": timings["queue_wait_s"],
                            "stored_to_seen_s": seen_wall - stored_wall,
                            "png_get_s": end - seen,
                            "enqueue_lag_s": enqueued_wall - start_wall,
                        }
                    )
            conn.close()
            return rows
    finally:
        redis_server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--poll-ms", type=float, default=2.0)
    parser.add_argument("--model", help="model path for the worker (default: a tiny random model)")
    args = parser.parse_args()
    rows = run(args.jobs, args.steps, args.model, args.poll_ms, args.size)
    print(f"{len(rows)} jobs, {args.steps} steps, {args.size}x{args.size}, poll every {args.poll_ms} ms")
    print(f"{'':20} {'p50 ms':>9} {'p99 ms':>9}")
    for key in rows[0]:
        values = [r[key] for r in rows]
        print(
            f"{key[:-2]:14} {1000 * statistics.median(values):>9.1f} {1000 * percentile(values, 0.99):>9.1f}"
        )


if __name__ == "__main__":
    main()
