"""Models by Hugging Face hub id (models/hub.py), without the network: a hub cache laid out by the test
as huggingface_hub lays it out (models--org--name/{blobs,refs,snapshots/<commit>}, snapshot files as
links to their blobs), read offline; which files a download would fetch; the errors that say what to
download and where; and a real worker process serving a model by its hub id."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from models.hub import (
    HubError,
    HubModel,
    choose_files,
    parse_hub_id,
    resolve_model_source,
)
from models.loading import load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_cache(
    cache: Path, repo_id: str, model_dir: Path, fp16_names: bool = True, drop: str = ""
) -> Path:
    """`model_dir` as the snapshot `COMMIT` of `repo_id` in a hub cache, as huggingface_hub writes it:
    each file a link to its blob (named by its hash), refs/main naming the commit. `fp16_names`: the
    weights under their fp16 variant names (what a CUDA worker fetches); `drop`: a file left out."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for source in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        relative = source.relative_to(model_dir).as_posix()
        if relative == drop:
            continue
        if fp16_names and relative.endswith(".safetensors"):
            relative = relative.replace(".safetensors", ".fp16.safetensors")
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            HubModel("stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ),
        ("org/name@v1.0", HubModel("org/name", "v1.0")),
        (f"org/name@{COMMIT}", HubModel("org/name", COMMIT)),
        ("/models/sd15", None),  # paths
        ("./models/sd15", None),
        ("~/models/sd15", None),
        ("models/v1-5.safetensors", None),
        ("tests/models", None),  # exists here
        ("a/b/c", None),
        ("org/name@", None),
    ],
)
def test_hub_ids_and_paths_are_told_apart(text: str, expected: HubModel | None) -> None:
    assert parse_hub_id(text) == expected


def test_a_cached_model_loads_offline_under_its_repos_name(
    tmp_path: Path, random_models: dict[str, Path]
) -> None:
    snapshot = lay_out_cache(tmp_path / "hub", "someone/tiny-sd1", random_models["sd1"])
    source = resolve_model_source(
        "someone/tiny-sd1", prefer_fp16=True, cache_dir=tmp_path / "hub", offline=True
    )
    assert (source.path, source.name) == (snapshot, "tiny-sd1")
    model = load_model(source.path)  # the fp16-named weights, as a CUDA worker fetches them
    assert model.native_size == load_model(random_models["sd1"]).native_size
    pinned = resolve_model_source(f"someone/tiny-sd1@{COMMIT}", False, tmp_path / "hub", offline=True)
    assert pinned.path == snapshot


def test_a_missing_model_says_what_to_download_and_where(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    with pytest.raises(HubError) as error:
        resolve_model_source("someone/not-here@v2", prefer_fp16=False, cache_dir=cache, offline=True)
    message = str(error.value)
    assert f"HF_HUB_CACHE={cache} huggingface-cli download someone/not-here --revision v2" in message
    assert "--include model_index.json '*/*.json' '*/*.txt' '*.safetensors'" in message
    assert "HF_HUB_OFFLINE" in message


def test_an_incomplete_snapshot_is_not_taken_for_the_model(
    tmp_path: Path, random_models: dict[str, Path]
) -> None:
    lay_out_cache(
        tmp_path / "hub",
        "someone/half",
        random_models["sd1"],
        drop="unet/diffusion_pytorch_model.safetensors",
    )
    with pytest.raises(HubError, match="someone/half is not in the Hugging Face cache"):
        resolve_model_source("someone/half", prefer_fp16=True, cache_dir=tmp_path / "hub", offline=True)


REPO_FILES = [
    "model_index.json",
    "v1-5-pruned-emaonly.safetensors",  # a single file beside the folders: not fetched
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",  # no fp16 variant: the full one on CUDA too
]


def test_what_a_download_fetches() -> None:
    hub = HubModel("org/sd15")
    common = {
        "model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json", "text_encoder/config.json", "unet/config.json", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    }  # fmt: skip
    on_cuda = set(choose_files(REPO_FILES, prefer_fp16=True, hub=hub))
    assert on_cuda == common | {
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    }
    on_cpu = set(choose_files(REPO_FILES, prefer_fp16=False, hub=hub))
    assert on_cpu == common | {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"}
    pickled_only = [
        f for f in REPO_FILES if not f.startswith("unet/diffusion_pytorch_model.") or f.endswith(".bin")
    ]
    with pytest.raises(HubError, match="unet/ has no safetensors weights"):
        choose_files(pickled_only, prefer_fp16=True, hub=hub)
    assert choose_files(["README.md", "model.safetensors"], True, hub) == ["model.safetensors"]
    with pytest.raises(HubError, match="neither a diffusers-format repo"):
        choose_files(["a.safetensors", "b.safetensors"], True, hub)


def test_a_worker_serves_a_model_by_its_hub_id(
    tmp_path: Path, redis_url: str, random_models: dict[str, Path]
) -> None:
    from tests.support.worker_process import ProcessError, WorkerProcess

    lay_out_cache(tmp_path / "hub", "someone/tiny-sd1", random_models["sd1"], fp16_names=False)
    env = {"REDIS_URL": redis_url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    with WorkerProcess({**env, "SD_MODEL": "someone/tiny-sd1"}) as worker:
        assert worker.model == "tiny-sd1"  # the repo's name, its queue txt2img:tiny-sd1
    missing = WorkerProcess({**env, "SD_MODEL": "someone/elsewhere"})
    with pytest.raises(ProcessError):
        missing.start(timeout_s=120)
    assert missing.proc.wait(timeout=30) == 2  # bad configuration: the launcher does not restart it
    assert "huggingface-cli download someone/elsewhere" in missing.logs()
