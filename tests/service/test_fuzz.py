"""Schema-driven fuzzing: schemathesis runs against /openapi.json of a real API process.

Every operation gets schema-valid and schema-violating requests (examples, coverage, random
fuzzing, and stateful POST -> GET/DELETE sequences through the links it infers from `Location`).
No answer may be a 5xx or break the documented schema: status codes, content types, headers,
bodies, `Allow` on 405, valid data accepted, invalid data rejected, auth not ignored.

The CLI runs in a subprocess: schemathesis's lazy pytest fixture loader does not work with
pytest 9 (it reads the removed `Function._nodeid`). A fixed seed keeps CI deterministic; set
SD_FUZZ_SEED (any integer) and SD_FUZZ_EXAMPLES to explore further by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys

import redis

from tests.support.api import publish_worker

API_KEY = "fuzz-key"
EXAMPLES_PER_OPERATION = int(os.environ.get("SD_FUZZ_EXAMPLES", "40"))
SEED = os.environ.get("SD_FUZZ_SEED", "20250101")

# DELETE cancels a job; the job stays readable (status "canceled") until it expires, by design.
EXCLUDED_CHECKS = ["use_after_free"]


def is_only_an_internal_error(stdout: str) -> bool:
    """The run broke on an error inside schemathesis, and reported no failure of the API."""
    return "Runtime Error" in stdout and "=== FAILURES ===" not in stdout


def test_no_5xx_and_no_schema_violation(start_api, redis_url: str) -> None:
    # A live worker, so that /readyz answers 200 (its documented 503 counts as a server error).
    publish_worker(redis.Redis.from_url(redis_url), ttl_s=600)
    # SD_EVENTS_MAX_S: with no worker a job never ends, and neither would its event stream
    api = start_api(
        SD_API_KEYS=API_KEY, SD_WORKER_STALE_S="600", SD_MAX_PROMPT_CHARS="200", SD_EVENTS_MAX_S="1"
    )
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{api.url}/openapi.json",
        "--checks", "all", "--exclude-checks", ",".join(EXCLUDED_CHECKS),
        "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", SEED,
        "--header", f"Authorization: Bearer {API_KEY}",
        # they answer only once their job ended (no worker here: a 504): generations is fuzzed in
        # test_openai_fuzz.py
        "--exclude-path", "/v1/images/generations", "--exclude-path", "/v1/images/edits",
        "--workers", "1", "--request-timeout", "10", "--no-color",
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.service.fuzz_hooks"}  # valid requests: a served model
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    if result.returncode != 0 and is_only_an_internal_error(result.stdout):
        # Seen once: schemathesis itself crashed (CPython's "AST constructor recursion depth mismatch"
        # inside hypothesis) with no finding about the API. One more run, same seed.
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    report = result.stdout[-20_000:] + result.stderr[-5_000:]
    assert result.returncode == 0, (
        f"schemathesis found problems:\n{report}\n--- API log ---\n{api.logs()[-5_000:]}"
    )
    assert "passed" in result.stdout
    assert "Traceback" not in api.logs()
