"""The `sd-txt2img` command, run as a subprocess against a real service (API process + worker process with
the tiny model): images saved (PNG, JPEG from the file name) and seeds printed, the job followed through
its event stream; the server's message and a non-zero exit on every error."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from client.api import ServiceClient
from client.cli import follow
from client.progress import ProgressLine
from models.image_files import read_parameters
from tests.support import fake_worker
from tests.support.api_process import REPO_ROOT, ApiProcess
from tests.support.input_images import box_mask, encoded, init_picture
from tests.support.redis_server import RedisServer, free_port
from tests.support.service_stack import ServiceStack

CONSOLE_SCRIPT = Path(sys.executable).with_name("sd-txt2img")
PROMPT = "a red circle in the top left on a blue background"


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, random_models: dict[str, Path]) -> Iterator[ServiceStack]:
    if redis_server.proc is None:
        redis_server.start()
    with ServiceStack(redis_server.url, random_models["sd1"]) as stack:
        yield stack


@pytest.fixture
def idle_redis_url(redis_server: RedisServer) -> str:
    """Another database of the session's Redis, emptied: no real worker takes jobs queued there."""
    url = redis_server.url.rsplit("/", 1)[0] + "/2"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    fake_worker.serve(url)  # a stand-in worker's info: jobs go to the fake model's queue
    return url


def cli_env(url: str, key: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SD_URL", "SD_API_KEY")}
    env["SD_URL"] = url
    env["PYTHONPATH"] = str(REPO_ROOT)
    if key is not None:
        env["SD_API_KEY"] = key
    return env


def run_cli(
    url: str, *args: str, key: str | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        env=cli_env(url, key),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO_ROOT,
    )


def test_console_script_saves_pngs_and_prints_seeds(stack: ServiceStack, tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.exists(), "sd-txt2img is not installed: run `make install` (pip install -e .)"
    out = tmp_path / "pics" / "circle.png"
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), PROMPT, "--width", "64", "--height", "64", "--steps", "3", "--seed", "11",
         "-n", "2", "--negative-prompt", "green", "--out", str(out)],
        env=cli_env(stack.url), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + stack.logs()
    paths = [out.with_name("circle-0.png"), out.with_name("circle-1.png")]
    assert result.stdout.splitlines() == [f"{paths[0]}\tseed=11", f"{paths[1]}\tseed=12"]
    for path, seed in zip(paths, (11, 12), strict=True):
        image = Image.open(io.BytesIO(path.read_bytes()))
        assert image.format == "PNG" and image.size == (64, 64)
        assert f"Seed: {seed}" in image.text["parameters"]
    assert "queued" in result.stderr  # the job id line, then the progress lines (not a terminal here)
    assert "step 3/3" in result.stderr or "succeeded" in result.stderr


def test_one_image_keeps_the_file_name_and_defaults_come_from_the_server(
    stack: ServiceStack, tmp_path: Path
) -> None:
    out = tmp_path / "one.png"
    result = run_cli(stack.url, PROMPT, "--steps", "2", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --quiet
    path, seed = result.stdout.strip().split("\tseed=")
    assert Path(path) == out and int(seed) >= 0
    assert Image.open(out).size == (64, 64)  # the tiny model's native size


def test_jpeg_from_the_file_name_with_its_parameters_in_exif(stack: ServiceStack, tmp_path: Path) -> None:
    out = tmp_path / "circle.jpg"
    result = run_cli(
        stack.url, PROMPT, "--steps", "2", "--seed", "4", "--output-compression", "90", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr + stack.logs()
    assert result.stdout == f"{out}\tseed=4\n"
    image = Image.open(out)
    assert image.format == "JPEG" and image.size == (64, 64)
    assert "Seed: 4" in read_parameters(out.read_bytes())


def test_img2img_and_inpainting_from_files(stack: ServiceStack, tmp_path: Path) -> None:
    (tmp_path / "init.jpg").write_bytes(encoded(init_picture(100, 70), "JPEG"))  # the job: 96x64
    (tmp_path / "mask.png").write_bytes(encoded(box_mask(100, 70)))
    out = tmp_path / "edited.png"
    files = ["--init-image", str(tmp_path / "init.jpg"), "--mask", str(tmp_path / "mask.png")]
    result = run_cli(
        stack.url, PROMPT, *files, "--strength", "0.5", "--steps", "4", "--seed", "2", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr + stack.logs()
    assert result.stdout == f"{out}\tseed=2\n"
    image = Image.open(out)
    assert image.size == (96, 64) and "Denoising strength: 0.5, Mask blur: 4" in image.text["parameters"]
    missing = run_cli(stack.url, PROMPT, "--init-image", str(tmp_path / "none.png"), "--out", str(out))
    assert missing.returncode == 1 and "--init-image: cannot read" in missing.stderr
    (tmp_path / "text.png").write_text("not an image")
    refused = run_cli(stack.url, PROMPT, "--init-image", str(tmp_path / "text.png"), "--out", str(out))
    assert refused.returncode == 1 and "422" in refused.stderr and "init_image: not a PNG" in refused.stderr
    assert (
        run_cli(stack.url, PROMPT, "--mask", str(tmp_path / "mask.png")).returncode == 2
    )  # needs --init-image


def test_list_models_and_draw_with_the_one_named(stack: ServiceStack, tmp_path: Path) -> None:
    listed = run_cli(stack.url, "--list-models")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["sd1\tworkers=1\tsd\t64x64\tsteps=50 guidance=7.5 sampler=ddim"]
    out = tmp_path / "sd1.png"
    drawn = run_cli(stack.url, PROMPT, "--model", "sd1", "--steps", "2", "--out", str(out), "--quiet")
    assert drawn.returncode == 0, drawn.stderr
    assert "Model: sd1" in Image.open(out).text["parameters"]
    assert run_cli(stack.url).returncode == 2  # a prompt, or --list-models


def test_the_cli_listens_to_the_job_instead_of_polling(stack: ServiceStack) -> None:
    """follow() against the real server, every request recorded: the event stream, and no status poll."""
    paths: list[str] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            paths.append(request.url.path)
            return super().handle_request(request)

    with ServiceClient(stack.url, transport=Recording()) as client:
        job_id = client.submit({"prompt": PROMPT, "steps": 12, "seed": 1})["id"]
        stderr = io.StringIO()
        job = follow(client, job_id, ProgressLine(stderr), timeout_s=60)
    assert job["status"] == "succeeded" and job["images"][0]["seed"] == 1
    assert paths[1:] == [f"/v1/jobs/{job_id}/events"]  # after the POST: one stream, no GET of the job
    assert "queued" in stderr.getvalue() or "running" in stderr.getvalue()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--steps", "151"], ["422", "steps", "150"]),
        (["--width", "100"], ["422", "width", "multiple of 8"]),
        (["-n", "9"], ["422", "num_images", "8"]),
        (["--model", "sdxl"], ["422", "model", "'sdxl' is not served; served: sd1"]),
    ],
)
def test_validation_errors_exit_1_with_the_servers_message(
    stack: ServiceStack, tmp_path: Path, args: list[str], words: list[str]
) -> None:
    result = run_cli(stack.url, PROMPT, *args, "--out", str(tmp_path / "x.png"))
    assert result.returncode == 1
    for word in words:
        assert word in result.stderr, result.stderr
    assert result.stdout == "" and not list(tmp_path.iterdir())


def test_api_key_from_the_environment(idle_redis_url: str, tmp_path: Path) -> None:
    with ApiProcess({"REDIS_URL": idle_redis_url, "SD_API_KEYS": "secret-key"}) as api:
        missing = run_cli(api.url, PROMPT)
        assert missing.returncode == 1 and "401" in missing.stderr and "missing API key" in missing.stderr
        wrong = run_cli(api.url, PROMPT, key="nope")
        assert wrong.returncode == 1 and "invalid API key" in wrong.stderr
        # the right key is accepted: the job is queued (no worker on this database), then given up
        right = run_cli(api.url, PROMPT, "--timeout-s", "1", key="secret-key")
        assert right.returncode == 1, right.stderr
        assert "queued" in right.stderr and "no result within 1 s" in right.stderr
        with redis.Redis.from_url(idle_redis_url) as db:
            assert db.llen(fake_worker.queue_key()) == 0  # the CLI canceled it


def test_full_queue(idle_redis_url: str) -> None:
    with ApiProcess({"REDIS_URL": idle_redis_url, "SD_MAX_QUEUE_DEPTH": "1"}) as api:
        assert httpx.post(api.url + "/v1/txt2img", json={"prompt": PROMPT}).status_code == 202
        result = run_cli(api.url, PROMPT)
        assert result.returncode == 1
        assert "429" in result.stderr and "queue is full" in result.stderr


def test_failed_job_exits_1_with_its_error(idle_redis_url: str) -> None:
    with ApiProcess({"REDIS_URL": idle_redis_url, "SD_JOB_RETRIES": "0"}) as api:
        cli = subprocess.Popen(
            [sys.executable, "-m", "client", "fail: the prompt was rejected", "--steps", "2"],
            env=cli_env(api.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )  # fmt: skip
        try:
            with redis.Redis.from_url(idle_redis_url) as db:
                deadline = time.monotonic() + 30
                while not db.llen(fake_worker.queue_key()):
                    assert time.monotonic() < deadline, "the CLI queued no job"
                    time.sleep(0.05)
            fake_worker.run_queued_jobs(idle_redis_url)  # real RQ; the stand-in job function raises
            stdout, stderr = cli.communicate(timeout=30)
        finally:
            cli.kill()
        assert cli.returncode == 1
        assert "failed: ValueError: the prompt was rejected" in stderr and stdout == ""


def test_the_jobs_warnings_go_to_stderr(idle_redis_url: str, tmp_path: Path) -> None:
    with ApiProcess({"REDIS_URL": idle_redis_url}) as api:
        out = tmp_path / "cat.png"
        cli = subprocess.Popen(
            [sys.executable, "-m", "client", f"{fake_worker.WARN_PREFIX} a photo of a cat", "--out", str(out)],
            env=cli_env(api.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )  # fmt: skip
        try:
            with redis.Redis.from_url(idle_redis_url) as db:
                deadline = time.monotonic() + 30
                while not db.llen(fake_worker.queue_key()):
                    assert time.monotonic() < deadline, "the CLI queued no job"
                    time.sleep(0.05)
            fake_worker.run_queued_jobs(idle_redis_url)
            stdout, stderr = cli.communicate(timeout=30)
        finally:
            cli.kill()
        assert cli.returncode == 0 and stdout.startswith(f"{out}\t")  # saved all the same
        assert f"sd-txt2img: warning: {fake_worker.FAKE_WARNING}\n" in stderr


def test_unreachable_server(tmp_path: Path) -> None:
    result = run_cli(f"http://127.0.0.1:{free_port()}", PROMPT)
    assert result.returncode == 1
    assert "cannot reach the server at http://127.0.0.1:" in result.stderr


def test_usage_errors_exit_2() -> None:
    result = run_cli("http://127.0.0.1:1", "--steps", "x")
    assert result.returncode == 2 and "usage: sd-txt2img" in result.stderr
