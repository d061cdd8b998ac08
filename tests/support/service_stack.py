"""A whole running service for client tests: a real API process and a real worker process (tiny model)
on one Redis.

    with ServiceStack(redis_url, model_dir) as stack:
        httpx.get(stack.url + "/v1/models")
"""

from __future__ import annotations

from pathlib import Path

import redis

from tests.support.api_process import ApiProcess
from tests.support.worker_process import WorkerProcess


class ServiceStack:
    def __init__(
        self,
        redis_url: str,
        model_dir: Path,
        api_env: dict[str, str] | None = None,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.api = ApiProcess({"REDIS_URL": redis_url, "SD_MAX_QUEUE_DEPTH": "100000", **(api_env or {})})
        self.worker = WorkerProcess(
            {"REDIS_URL": redis_url, "SD_MODEL": str(model_dir), **(worker_env or {})}
        )

    @property
    def url(self) -> str:
        return self.api.url

    def start(self) -> ServiceStack:
        """Empty the Redis (no job of an earlier test may reach this worker), then start both."""
        client = redis.Redis.from_url(self.redis_url)
        client.flushdb()
        client.close()
        self.api.start()
        try:
            self.worker.start()
        except BaseException:
            self.api.cleanup()
            raise
        return self

    def stop(self) -> None:
        self.worker.kill()  # nothing to drain: the tests are over
        self.api.cleanup()

    def logs(self) -> str:
        return f"--- API ---\n{self.api.logs()[-3000:]}\n--- worker ---\n{self.worker.logs()[-3000:]}"

    def __enter__(self) -> ServiceStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
