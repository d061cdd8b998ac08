"""Schema-driven fuzzing of POST /v1/images/generations (schemathesis, like tests/service/test_fuzz.py).

No worker runs here, so every valid request ends in the documented 504 after SD_OPENAI_WAIT_S (and
its job is canceled): the checks that count any 5xx, or any refusal of valid data, as a finding are
left out. What remains: no undocumented status (an unexpected 500 is one), every answer in the
documented OpenAI shape, invalid data always rejected with a 4xx, auth never ignored.
"""

from __future__ import annotations

import subprocess
import sys

import redis

from tests.service.test_fuzz import API_KEY, SEED, is_only_an_internal_error
from tests.support.api import publish_worker

EXAMPLES = 30
EXCLUDED_CHECKS = ["use_after_free", "not_a_server_error", "positive_data_acceptance"]


def test_generation_route_answers_only_documented_openai_errors(start_api, redis_url: str) -> None:
    publish_worker(redis.Redis.from_url(redis_url), ttl_s=600)
    api = start_api(
        SD_API_KEYS=API_KEY, SD_WORKER_STALE_S="600", SD_MAX_PROMPT_CHARS="200", SD_OPENAI_WAIT_S="0.1"
    )
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{api.url}/openapi.json",
        "--include-path", "/v1/images/generations",
        "--checks", "all", "--exclude-checks", ",".join(EXCLUDED_CHECKS),
        "--max-examples", str(EXAMPLES), "--seed", SEED,
        "--header", f"Authorization: Bearer {API_KEY}",
        "--workers", "1", "--request-timeout", "10", "--no-color",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    if result.returncode != 0 and is_only_an_internal_error(result.stdout):
        result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    report = result.stdout[-20_000:] + result.stderr[-5_000:]
    assert result.returncode == 0, (
        f"schemathesis found problems:\n{report}\n--- API log ---\n{api.logs()[-5_000:]}"
    )
    assert "passed" in result.stdout
    assert "Traceback" not in api.logs()
