"""Deployment files: compose validates for every profile and runs what `make run` runs; the README
documents both commands first and every environment variable the code reads."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_starts_with_the_two_commands() -> None:
    first_block = README.split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands[:2] == ["make run", "make test"]


def test_ci_runs_make_test() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "make test" in script
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_readme_env_table_is_generated_from_the_settings() -> None:
    table = load_script("env_table").table()
    assert table in README, "README's table is stale: run python scripts/env_table.py --write"


def env_vars_read_by_code() -> set[str]:
    """Every variable the code reads: settings fields and direct os.environ / getenv reads."""
    names = set(load_script("env_table").settings_rows())
    pattern = re.compile(
        r"""(?:os\.environ\.get|os\.getenv|os\.environ\.setdefault|environ\[)\(?\s*["']([A-Z][A-Z0-9_]+)["']"""
    )
    for folder in ("models", "workers", "service", "schemas", "scripts", "training", "client"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(pattern.findall(path.read_text(encoding="utf-8")))
    compose_text = (ROOT / "docker-compose.yml").read_text()
    names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose_text))
    return names


def test_every_env_var_is_in_the_readme_table() -> None:
    table = README.split("<!-- env-table:start -->")[1].split("<!-- env-table:end -->")[0]
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)`", table, flags=re.MULTILINE))
    missing = env_vars_read_by_code() - documented
    assert not missing, f"environment variables missing from README's table: {sorted(missing)}"


def python_module_args(command: list[str]) -> list[str]:
    """['python', '-m', 'x', ...] -> ['x', ...]; ['uvicorn', ...] -> ['uvicorn', ...]."""
    return command[2:] if command[:2] == ["python", "-m"] else command


def without_host_port(args: list[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--host", "--port"):
            skip = True
            continue
        out.append(arg)
    return out


def test_compose_services_run_what_make_run_runs() -> None:
    local = load_script("run_local").service_commands("127.0.0.1", "8000")
    services = COMPOSE["services"]
    compose_commands = {
        "api": services["api"]["command"],
        "worker": services["worker"]["command"],
        "worker-cpu": services["worker-cpu"]["command"],
        "janitor": services["janitor"]["command"],
    }
    for compose_name, local_name in (
        ("api", "api"),
        ("worker", "worker"),
        ("worker-cpu", "worker"),
        ("janitor", "janitor"),
    ):
        assert without_host_port(python_module_args(compose_commands[compose_name])) == without_host_port(
            local[local_name]
        ), compose_name
    # both run the launcher: one worker process per device, restarted when one crashes
    assert (
        compose_commands["worker"] == compose_commands["worker-cpu"] == ["python", "-m", "workers.launcher"]
    )


def test_compose_contract() -> None:
    services = COMPOSE["services"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    # bounded memory (full: writes refused, the API answers 503; nothing accepted is evicted)
    assert "--maxmemory ${SD_REDIS_MAXMEMORY:-2gb}" in redis_cmd
    assert services["redis"]["image"].startswith("redis:7")
    assert "redis-data:/data" in services["redis"]["volumes"]
    gpu = services["worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert any(v.endswith(":/models:ro") for v in gpu["volumes"])
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["worker-cpu"]["environment"]["SD_MODEL"] == ""  # the embedded model, whatever .env says
    for name in ("api", "janitor", "worker", "worker-cpu"):
        assert services[name]["env_file"] == ".env", name  # settings in .env reach every process
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        for dep in (service.get("depends_on") or {}).values():
            assert dep["condition"] in ("service_healthy", "service_started")
        if name != "janitor":
            assert "healthcheck" in service, name
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    # the janitor is not the GPU worker, and its image has no torch
    assert services["janitor"]["image"] == services["api"]["image"]


TEST_REDIS_PASSWORD = "s3cretpassw0rd"


def compose_binary() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed (make test installs it with apt-get)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return binary


def compose_config(*args: str, env_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`docker-compose [args] config` with the repository's .env (or `env_file`) and, unless `env_file`
    is given, a Redis password in the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("SD_REDIS_PASSWORD", "SD_DEVICES")}
    options = ["--env-file", str(env_file)] if env_file is not None else []
    if env_file is None:
        env["SD_REDIS_PASSWORD"] = TEST_REDIS_PASSWORD
    argv = [compose_binary(), *options, *args, "config"]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_compose_file_validates(profile: str | None) -> None:
    result = compose_config(*(["--profile", profile] if profile else []))
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_redis_without_a_password(tmp_path: Path) -> None:
    """Whoever can write to Redis controls the queue: no password, no deployment."""
    shipped = (ROOT / ".env").read_text().splitlines()
    assert not [line for line in shipped if line.startswith("SD_REDIS_PASSWORD")]  # no shared default
    without = tmp_path / "env"
    without.write_text("COMPOSE_PROFILES=gpu\n")
    result = compose_config(env_file=without)
    assert result.returncode != 0 and "set SD_REDIS_PASSWORD in .env" in result.stderr
    rendered = yaml.safe_load(compose_config("--profile", "gpu").stdout)
    services = rendered["services"]
    assert "--requirepass" in services["redis"]["command"]
    assert (
        services["redis"]["command"][services["redis"]["command"].index("--requirepass") + 1]
        == TEST_REDIS_PASSWORD
    )
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == TEST_REDIS_PASSWORD  # the healthcheck's
    assert "ports" not in services["redis"]  # never published
    for name in ("api", "janitor", "worker"):
        assert services[name]["environment"]["REDIS_URL"] == f"redis://:{TEST_REDIS_PASSWORD}@redis:6379/0", (
            name
        )


def test_no_two_worker_processes_can_get_the_same_gpu() -> None:
    """Docker maps a GPU count to devices 0..count-1 in every container, so a `count: 1` service scaled
    to N replicas gives each replica GPU 0. The rendered compose file must instead give the one worker
    container every GPU, run the launcher there (one process per device, each told its own), and
    offer no replicas; and the launcher's assignment must give distinct devices and names."""
    from workers.launcher import Launcher, resolve_devices

    rendered = yaml.safe_load(compose_config("--profile", "gpu").stdout)
    gpu_services = {
        name: service
        for name, service in rendered["services"].items()
        if (service.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices")
    }
    assert list(gpu_services) == ["worker"]
    worker = gpu_services["worker"]
    (request,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert request["count"] == "all" and "device_ids" not in request
    assert worker["deploy"].get("replicas", 1) == 1 and "scale" not in worker
    assert worker["command"] == ["python", "-m", "workers.launcher"]
    assert "SD_DEVICE" not in worker["environment"]  # the launcher sets it per process
    assert worker["environment"]["SD_DEVICES"] == "all"
    for visible in (1, 2, 8):
        devices = resolve_devices("all", lambda visible=visible: visible)
        assert len(set(devices)) == len(devices) == visible
        names = [child.name for child in Launcher(devices, "host", command=["true"]).children]
        assert len(set(names)) == visible
    assert resolve_devices("all", lambda: 0) == ["cpu"]


def test_api_image_has_no_torch() -> None:
    assert "COPY models" not in (ROOT / "docker" / "api.Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {re.split(r"[<>=\[ ]", d, maxsplit=1)[0].lower() for d in pyproject["project"]["dependencies"]}
    lines = [
        line.split("#")[0].strip()
        for line in (ROOT / "docker" / "requirements-api.txt").read_text().splitlines()
    ]
    names = [re.split(r"[<>=\[ ]", line, maxsplit=1)[0].lower() for line in lines if line]
    assert "torch" not in names and "transformers" not in names
    assert set(names) <= deps, set(names) - deps


def test_images_run_as_non_root() -> None:
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        text = (ROOT / "docker" / name).read_text()
        assert "\nUSER sdserve" in text, name
    assert (ROOT / ".dockerignore").is_file()


def test_api_image_files_run_without_torch(tmp_path: Path) -> None:
    """Exactly what docker/api.Dockerfile copies imports the API and the janitor with no torch,
    transformers or models/ around (the janitor runs in that image, compose's `janitor` service)."""
    copies = re.findall(
        r"^COPY (?!docker/)(.+)$", (ROOT / "docker" / "api.Dockerfile").read_text(), re.MULTILINE
    )
    for line in copies:
        *sources, dest = line.split()
        for source in sources:
            src = ROOT / source.rstrip("/")
            target = tmp_path / dest.rstrip("/") / (src.name if src.is_file() else "")
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'models', 'safetensors', 'numpy'): sys.modules[name] = None\n"
        "import service.app, workers.janitor\n"
        "print(service.app.__file__, workers.janitor.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert all(path.startswith(str(tmp_path)) for path in result.stdout.split()), result.stdout  # the copies
