"""Worker throughput and latency: continuous batching against the same worker limited to one request
at a time, under the same offered load.

    python bench/worker_bench.py                       # tiny random model on CPU, 64x64
    python bench/worker_bench.py --model sd15-random --device cuda --size 512 --steps 50 --batch-rows 64

For each mode it starts a real worker process (`python -m workers.main`) on a private redis-server
(or --redis-url), lets it warm up, submits --requests jobs at once exactly as the API enqueues them
(one image each, CFG --guidance, different seeds), and waits for all of them:
- latency of a job: RQ's enqueued_at -> ended_at (the PNG is in Redis by then); p50 and p99;
- throughput: images / (last job end - first enqueue).
Modes: "batched" (SD_MAX_BATCH_ROWS=--batch-rows) and "one at a time" (SD_MAX_BATCH_ROWS=2: one
guided image per UNet call, nothing shares a step). Same slots, same requests, same warm-up.

--model sd15-random builds (once, cached) a diffusers folder with the SD 1.5 architecture and seeded
random weights (float16 on disk, ~1.7 GB): the GPU figure of the workers issue.
"""

from __future__ import annotations

import argparse
import os
import statistics
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

from schemas.generation import Generation  # noqa: E402
from schemas.queue import JOB_FUNCTION, queue_name  # noqa: E402
from schemas.redis_keys import worker_info_key  # noqa: E402
from schemas.worker_info import EngineStats, WorkerInfo  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.worker_process import WorkerProcess  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("SD_CACHE_DIR", Path.home() / ".cache" / "sdserve"))


def build_model(name: str, cache: Path) -> Path:
    """A model folder for `--model`: an existing path, "tiny-random" or "sd15-random"."""
    from models.random_model import build_random_model

    if name == "tiny-random":
        return build_random_model("sd1", Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "tiny-sd1")
    if name == "sd15-random":
        target = cache / "bench-sd15-random"
        if not (target / "model_index.json").is_file():
            build_sd15_random(target)
        return target
    path = Path(name)
    if not path.exists():
        raise SystemExit(f"--model {name}: no such path (or use tiny-random / sd15-random)")
    return path


def build_sd15_random(target: Path) -> None:
    """SD 1.5's architecture (the shipped reference configs) with seeded random weights, fp16 on disk."""
    import torch

    from models.loading import SINGLE_FILE_CONFIGS, read_component_configs
    from models.random_model import random_weights, write_diffusers_folder
    from models.tiny_configs import TOKENIZER_PAD_TOKEN

    print(f"building a random SD 1.5 model in {target} (once) ...", flush=True)
    configs = read_component_configs(SINGLE_FILE_CONFIGS["sd1"])
    weights = random_weights(configs, seed=0, dtype=torch.float16)
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    write_diffusers_folder(staging, configs, weights, TOKENIZER_PAD_TOKEN["sd1"])
    staging.rename(target)


def run_mode(
    label: str, max_rows: int, args: argparse.Namespace, model_dir: Path, redis_url: str
) -> dict[str, float | str]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    env = {
        "REDIS_URL": redis_url,
        "SD_MODEL": str(model_dir),
        "SD_DEVICE": args.device,
        "SD_MAX_BATCH_ROWS": str(max_rows),
        "SD_SLOTS": str(args.slots or args.requests),
        "SD_LOG_LEVEL": "WARNING",
        "SD_JOB_HEARTBEAT_TTL_S": "30",
        "SD_HEARTBEAT_INTERVAL_S": "1",
    }
    if args.dtype:
        env["SD_DTYPE"] = args.dtype
    if args.torch_threads:
        env["SD_TORCH_THREADS"] = str(args.torch_threads)
    if args.vae_batch:
        env["SD_VAE_BATCH"] = str(args.vae_batch)
    env.update(getattr(args, "worker_env", None) or {})
    launched = time.monotonic()
    worker_process = WorkerProcess(env, log_path=getattr(args, "worker_log", None))
    with worker_process.start(timeout_s=getattr(args, "start_timeout_s", 120.0)) as worker:
        start_s = time.monotonic() - launched  # process start to ready: model load and warm-up
        queue = Queue(queue_name(worker.model), connection=client, serializer=JSONSerializer)
        submit_and_wait(queue, client, args, seeds=[10_000 + i for i in range(2)])  # warm-up at this size
        before = published_stats(client, worker.name, expect_jobs=2)
        started = time.time()
        jobs = submit_and_wait(queue, client, args, seeds=list(range(args.requests)))
        wall_s = time.time() - started
        after = published_stats(client, worker.name, expect_jobs=2 + args.requests)
    calls = after.unet_calls - before.unet_calls
    latencies = sorted((job.ended_at - job.enqueued_at).total_seconds() for job in jobs)
    first = min(job.enqueued_at for job in jobs)
    last = max(job.ended_at for job in jobs)
    span_s = (last - first).total_seconds()
    return {
        "mode": label,
        "max_rows": max_rows,
        "images_per_s": args.requests / span_s,
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 99),
        "rows_per_call": (after.unet_rows - before.unet_rows) / max(1, calls),
        "requests_per_call": (after.unet_requests - before.unet_requests) / max(1, calls),
        "wall_s": wall_s,
        "start_s": start_s,
    }


def published_stats(client: redis.Redis, worker_name: str, expect_jobs: int) -> EngineStats:
    """The worker's counters once its heartbeat has caught up with `expect_jobs` finished jobs."""
    deadline = time.monotonic() + 30
    while True:
        stats = WorkerInfo.model_validate_json(client.get(worker_info_key(worker_name))).stats
        if stats.jobs_succeeded >= expect_jobs or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def submit_and_wait(
    queue: Queue, client: redis.Redis, args: argparse.Namespace, seeds: list[int]
) -> list[Job]:
    jobs = []
    for seed in seeds:
        params = Generation(
            prompt=f"a photograph of an astronaut riding a horse, number {seed}",
            width=args.size,
            height=args.size,
            steps=args.steps,
            guidance_scale=args.guidance,
            eta=0.0,
            seed=seed,
            num_images=1,
        )
        jobs.append(
            queue.enqueue(
                JOB_FUNCTION,
                kwargs={"params": params.model_dump()},
                job_id=uuid.uuid4().hex,
                result_ttl=600,
                job_timeout=3600,
            )
        )
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:
        fetched = Job.fetch_many([job.id for job in jobs], connection=client, serializer=JSONSerializer)
        statuses = [job.get_status(refresh=False) for job in fetched if job is not None]
        if any(status.value in ("failed", "canceled", "stopped") for status in statuses):
            raise SystemExit(f"a benchmark job did not succeed: {[s.value for s in statuses]}")
        if len(statuses) == len(jobs) and all(status.value == "finished" for status in statuses):
            return [job for job in fetched if job is not None]
        time.sleep(0.05)
    raise SystemExit(f"jobs not done within {args.timeout_s} s")


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-random", help="model folder, tiny-random or sd15-random")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the worker's")
    parser.add_argument("--size", type=int, default=64, help="width = height in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--requests", type=int, default=16, help="jobs submitted at once")
    parser.add_argument("--batch-rows", type=int, default=32, help="SD_MAX_BATCH_ROWS of the batched mode")
    parser.add_argument("--slots", type=int, help="SD_SLOTS (default: --requests)")
    parser.add_argument("--vae-batch", type=int, help="SD_VAE_BATCH (default: the worker's)")
    parser.add_argument("--torch-threads", type=int, help="SD_TORCH_THREADS for the worker")
    parser.add_argument("--redis-url", help="use this Redis (it gets FLUSHDB!) instead of a private one")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()

    model_dir = build_model(args.model, args.cache_dir)
    server = None
    if args.redis_url is None:
        server = RedisServer()
        server.start()
    redis_url = args.redis_url or server.url
    try:
        rows = [
            run_mode("one at a time", 2 if args.guidance > 1 else 1, args, model_dir, redis_url),
            run_mode("batched", args.batch_rows, args, model_dir, redis_url),
        ]
    finally:
        if server is not None:
            server.cleanup()

    print()
    print(
        f"model {args.model}, {args.device} {args.dtype or 'default dtype'}, {args.size}x{args.size}, "
        f"{args.steps} steps, guidance {args.guidance:g}, {args.requests} requests submitted at once"
    )
    header = f"{'mode':<14} {'max rows':>8} {'images/s':>9} {'p50 s':>8} {'p99 s':>8} {'rows/call':>9} {'req/call':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['mode']:<14} {row['max_rows']:>8} {row['images_per_s']:>9.3f} {row['p50_s']:>8.2f} "
            f"{row['p99_s']:>8.2f} {row['rows_per_call']:>9.1f} {row['requests_per_call']:>8.1f}"
        )
    single, batched = rows
    print(
        f"\nbatching: {batched['images_per_s'] / single['images_per_s']:.2f}x throughput, "
        f"p99 {batched['p99_s'] / single['p99_s']:.2f}x of one-at-a-time"
    )


if __name__ == "__main__":
    main()
