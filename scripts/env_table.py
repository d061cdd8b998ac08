"""The README's configuration table, generated from the settings classes so it cannot drift.

    python scripts/env_table.py            # print the table
    python scripts/env_table.py --write    # replace the table in README.md between its markers

tests/test_deployment.py checks that README.md holds exactly this table and that every environment
variable the code reads appears in it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

START = "<!-- env-table:start -->"
END = "<!-- env-table:end -->"

# Variables read outside the two settings classes: (name, default, meaning, read by).
EXTRA = [
    ("PORT", "8000", "port of the API (`make run`, compose)", "make run, compose"),
    ("HOST", "127.0.0.1", "interface the API listens on under `make run`", "make run"),
    ("SD_RUN_READY_TIMEOUT_S", "300", "`make run`: how long to wait for `/readyz`", "make run"),
    (
        "SD_MODELS",
        "(empty)",
        "`make run`: comma-separated models (folders, checkpoint files, hub ids), one worker launcher "
        "each, all behind one API; empty: SD_MODEL alone",
        "make run",
    ),
    (
        "HF_TOKEN",
        "(empty)",
        "Hugging Face token for gated or private hub models (SD_MODEL=org/name), read by huggingface_hub",
        "worker",
    ),
    (
        "HF_HUB_CACHE",
        "~/.cache/huggingface/hub",
        "where hub models are fetched to and found (or HF_HOME/hub)",
        "worker",
    ),
    (
        "HF_HUB_OFFLINE",
        "(empty)",
        "1: never download; a hub model missing from the cache stops the worker with what to download",
        "worker",
    ),
    (
        "SD_CACHE_DIR",
        "~/.cache/sdserve",
        "where benchmarks keep the random models they build (`bench/worker_bench.py`)",
        "bench",
    ),
    ("SD_URL", "http://127.0.0.1:8000", "server the `sd-txt2img` client talks to", "sd-txt2img"),
    ("SD_API_KEY", "(empty)", "API key the `sd-txt2img` client sends (one of SD_API_KEYS)", "sd-txt2img"),
    (
        "SD_MODEL_DIR",
        "./model-store",
        "compose: host folder mounted read-only at /models in the GPU worker",
        "compose",
    ),
    (
        "TORCH_FLAVOR",
        "cu128",
        "compose: PyTorch wheel index of the GPU worker image (cu126, cu128, cpu...)",
        "compose",
    ),
    (
        "COMPOSE_PROFILES",
        "gpu (.env)",
        "compose: `gpu` starts the CUDA worker, `cpu` the CPU worker",
        "compose",
    ),
]


class ConflictingDefaults(ValueError):
    """Two settings classes give one variable different defaults or meanings."""


def settings_rows() -> dict[str, list[str]]:
    """One row per variable the settings classes read; ConflictingDefaults when two disagree."""
    from schemas.settings import env_name
    from service.settings import Settings
    from workers.janitor import JanitorSettings
    from workers.launcher import LauncherSettings
    from workers.settings import WorkerSettings

    rows: dict[str, list[str]] = {}
    classes = (
        ("api", Settings),
        ("janitor", JanitorSettings),
        ("worker", WorkerSettings),
        ("launcher", LauncherSettings),
    )
    for who, cls in classes:
        for field, info in cls.model_fields.items():
            name = env_name(field, info.validation_alias)
            default = info.default
            shown = "(empty)" if default in ("", (), None) else str(default)
            if name in rows:
                if rows[name][1] != shown:
                    raise ConflictingDefaults(
                        f"{name}: default {rows[name][1]} for {rows[name][3]}, {shown} for {who}: "
                        "declare it once (schemas/settings.py)"
                    )
                rows[name][3] += f", {who}"
                continue
            rows[name] = [name, shown, info.description or "", who]
    # docker-compose.yml's Redis service reads these; no process does
    rows["SD_REDIS_PASSWORD"] = [
        "SD_REDIS_PASSWORD",
        "(none: compose refuses to start)",
        "compose: Redis's password (--requirepass, and in every service's REDIS_URL); letters and digits",
        "compose",
    ]
    rows["SD_REDIS_MAXMEMORY"] = [
        "SD_REDIS_MAXMEMORY",
        "2gb",
        "compose: Redis's maxmemory; when full it refuses writes (the API answers 503), never evicts",
        "compose",
    ]
    return rows


def table() -> str:
    rows = settings_rows()
    for name, default, meaning, who in EXTRA:
        rows[name] = [name, default, meaning, who]
    lines = ["| variable | default | meaning | read by |", "|---|---|---|---|"]
    for name in sorted(rows, key=lambda n: (n != "REDIS_URL", n)):
        name, default, meaning, who = rows[name]
        lines.append(f"| `{name}` | `{default}` | {meaning} | {who} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args()
    text = table()
    if not args.write:
        print(text)
        return
    readme = ROOT / "README.md"
    content = readme.read_text(encoding="utf-8")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
