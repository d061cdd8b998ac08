"""Throughput and latency of the API alone (no worker: jobs just queue).

    python -m bench.api_bench                       # starts its own redis-server and API process
    python -m bench.api_bench --url http://host:8000 --api-key KEY

Three phases at --clients concurrent clients (httpx, asyncio, keep-alive connections), each
--requests requests:
1. GET /healthz: the floor of the server and client (no Redis);
2. POST /v1/txt2img;
3. GET /v1/jobs/{id} on the ids phase 2 created.
Prints requests/s and p50/p99 latency per phase. The client runs on the same machine as the
server unless --url points elsewhere: on a small machine it competes with the API for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx

log = logging.getLogger("api_bench")

BODY = {"prompt": "a watercolor painting of a lighthouse at dawn", "steps": 30, "width": 512, "height": 512}


@dataclass
class PhaseResult:
    name: str
    latencies_s: list[float]
    statuses: Counter
    wall_s: float

    def row(self) -> str:
        ok = sum(n for code, n in self.statuses.items() if 200 <= code < 300)
        lat = sorted(self.latencies_s)
        p50 = statistics.median(lat) * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        codes = ",".join(f"{code}:{n}" for code, n in sorted(self.statuses.items()))
        return f"| {self.name:<22} | {len(lat):>8} | {ok / self.wall_s:>8.0f} | {p50:>7.1f} | {p99:>7.1f} | {codes} |"


async def run_phase(
    name: str, clients: int, requests: int, call: Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]],
    client: httpx.AsyncClient,
) -> PhaseResult:  # fmt: skip
    latencies: list[float] = []
    statuses: Counter = Counter()
    counter = iter(range(requests))

    async def one_client() -> None:
        for i in counter:  # shared iterator: the clients split the requests between them
            start = time.perf_counter()
            response = await call(client, i)
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] += 1

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return PhaseResult(name, latencies, statuses, time.perf_counter() - start)


async def bench(url: str, api_key: str | None, clients: int, requests: int, warmup: int) -> list[PhaseResult]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
        job_ids: list[str] = []

        async def post(c: httpx.AsyncClient, _: int) -> httpx.Response:
            response = await c.post("/v1/txt2img", json=BODY)
            if response.status_code == 202:
                job_ids.append(response.json()["id"])
            return response

        async def get(c: httpx.AsyncClient, i: int) -> httpx.Response:
            return await c.get(f"/v1/jobs/{job_ids[i % len(job_ids)]}")

        async def health(c: httpx.AsyncClient, _: int) -> httpx.Response:
            return await c.get("/healthz")

        await run_phase("warm-up", clients, warmup, post, client)
        # The floor: an async route with no Redis access, through the same server and client.
        health_result = await run_phase("GET /healthz (floor)", clients, requests, health, client)
        post_result = await run_phase("POST /v1/txt2img", clients, requests, post, client)
        random.shuffle(job_ids)
        get_result = await run_phase("GET /v1/jobs/{id}", clients, requests, get, client)
        return [health_result, post_result, get_result]


@contextlib.contextmanager
def local_service() -> Iterator[str]:
    """A private redis-server and API process (the test helpers), stopped afterwards."""
    from tests.support.api_process import ApiProcess
    from tests.support.redis_server import RedisServer

    redis_server = RedisServer()
    redis_server.start()
    try:
        env = {"REDIS_URL": redis_server.url, "SD_MAX_QUEUE_DEPTH": "100000000", "SD_LOG_LEVEL": "WARNING"}
        with ApiProcess(env) as api:
            yield api.url
    finally:
        redis_server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="API to measure; default: start redis-server and the API here")
    parser.add_argument("--api-key", default=os.environ.get("SD_API_KEY"))
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=5000, help="per phase")
    parser.add_argument("--warmup", type=int, default=500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_service())
        log.info("measuring %s: %d clients, %d requests per phase", url, args.clients, args.requests)
        results = asyncio.run(bench(url, args.api_key, args.clients, args.requests, args.warmup))

    print(
        f"\n{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, {args.clients} clients"
    )
    print("| phase                  | requests |    ok/s  | p50 ms  | p99 ms  | statuses |")
    print("|------------------------|---------:|---------:|--------:|--------:|----------|")
    for result in results:
        print(result.row())


if __name__ == "__main__":
    main()
