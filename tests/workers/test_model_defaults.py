"""A worker publishes its model's recommended steps and guidance (the API's defaults)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.support.jobs import worker_info
from tests.support.worker_process import WorkerProcess


def test_worker_publishes_the_models_recommended_settings(
    client, redis_url: str, random_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(random_models["sd1"], tmp_path / "model"))
    (folder / "defaults.json").write_text(json.dumps({"steps": 20, "guidance_scale": 4.0}))
    with WorkerProcess({"REDIS_URL": redis_url, "SD_MODEL": str(folder), "SD_WARMUP": "false"}) as worker:
        info = worker_info(client, worker.name)
    assert (info.default_steps, info.default_guidance_scale) == (20, 4.0)
    assert (info.native_width, info.native_height, info.model) == (64, 64, "model")
