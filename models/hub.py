"""Models by Hugging Face hub id: SD_MODEL=`org/name` or `org/name@revision` (a branch, tag or commit).

`resolve_model_source` turns SD_MODEL (a path, a hub id, or nothing: the embedded model) into a local
path for models/loading.py and the name the model is published under. A hub id is fetched once into
huggingface_hub's cache (HF_HOME / HF_HUB_CACHE, `~/.cache/huggingface/hub` by default), with
huggingface_hub's own progress bars on stderr, and later starts find it there without asking the
network. Only what models/loading.py reads is fetched: model_index.json (and our defaults.json),
the configs, tokenizers and safetensors weights of unet, vae, text_encoder(_2), tokenizer(_2) and
scheduler (never pickled .bin/.ckpt files, never a safety checker); on CUDA the `fp16` variant of
each weight file where the repo has one (half the download), else the full one. HF_TOKEN (or a
`huggingface-cli login`) is honoured by huggingface_hub itself, for gated and private repos. With
HF_HUB_OFFLINE=1 nothing is downloaded, and a model missing from the cache is an error that says
what to download and where.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from models.default_model import default_model_path
from models.single_file import CheckpointError
from schemas.model_names import model_name_from

log = logging.getLogger(__name__)

# org/name as the hub spells repo ids, optionally @revision (branch, tag or commit hash)
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HUB_ID = re.compile(rf"^(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<revision>[A-Za-z0-9._/-]{{1,255}}))?$")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# The components models/loading.py reads, and what each must hold: (configs, weight file stems).
COMPONENTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "unet": (("config.json",), "diffusion_pytorch_model"),
    "vae": (("config.json",), "diffusion_pytorch_model"),
    "text_encoder": (("config.json",), "model"),
    "text_encoder_2": (("config.json",), "model"),  # SDXL
    "tokenizer": (("vocab.json", "merges.txt"), None),
    "tokenizer_2": (("vocab.json", "merges.txt"), None),  # SDXL
    "scheduler": (("scheduler_config.json",), None),
}
ROOT_FILES = ("model_index.json", "defaults.json", "vocabulary.json")  # both ours, optional
# What the download command names (the configs and tokenizers are small; weights: the variant chosen).
DOWNLOAD_PATTERNS = ("model_index.json", "*/*.json", "*/*.txt", "*.safetensors")


class HubError(CheckpointError):
    """A hub model that cannot be had: the message says what to download and where."""


@dataclass(frozen=True)
class HubModel:
    repo_id: str  # org/name
    revision: str | None = None  # None: the default branch

    @property
    def name(self) -> str:
        """The model's published name: the repo's name (`org/name` -> `name`)."""
        return model_name_from(self.repo_id.rsplit("/", 1)[1])

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def download_command(self, cache_dir: Path) -> str:
        revision = f" --revision {shlex.quote(self.revision)}" if self.revision else ""
        patterns = " ".join(shlex.quote(p) for p in DOWNLOAD_PATTERNS)
        return (
            f"HF_HUB_CACHE={shlex.quote(str(cache_dir))} huggingface-cli download {self.repo_id}{revision} "
            f"--include {patterns}"
        )


def parse_hub_id(text: str) -> HubModel | None:
    """The hub model `text` names, or None when it names a local path: one that exists, starts with
    `/`, `.` or `~`, has a checkpoint's suffix, or is not `org/name[@revision]`."""
    text = text.strip()
    if not text or text.startswith(("/", ".", "~")) or "\\" in text or Path(text).exists():
        return None
    match = _HUB_ID.match(text)
    if match is None or match["repo"].lower().endswith(CHECKPOINT_SUFFIXES):
        return None
    return HubModel(match["repo"], match["revision"])


@dataclass(frozen=True)
class ModelSource:
    """Where to load a model from, and the name it is published under unless SD_MODEL_NAME says one
    (None: the loaded model's own, from its file or folder name)."""

    path: Path
    name: str | None = None


def resolve_model_source(
    model: str | None, prefer_fp16: bool, cache_dir: Path | None = None, offline: bool | None = None
) -> ModelSource:
    """SD_MODEL as a local path: the embedded model when empty, the path itself, or a hub id's folder
    in the cache (fetched when missing, unless offline: HubError)."""
    if not model:
        return ModelSource(default_model_path())
    hub = parse_hub_id(model)
    if hub is None:
        return ModelSource(Path(model).expanduser())
    return ModelSource(fetch(hub, prefer_fp16, cache_dir, offline), hub.name)


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE")
    return (
        flag.strip().upper() in ("1", "ON", "YES", "TRUE") if flag is not None else constants.HF_HUB_OFFLINE
    )


def fetch(
    hub: HubModel, prefer_fp16: bool, cache_dir: Path | None = None, offline: bool | None = None
) -> Path:
    """The local folder (or single file) of a hub model: from the cache when it is complete there, else
    downloaded into it (not when offline: HubError saying what to download and where)."""
    cache_dir = cache_dir or hub_cache_dir()
    offline = hub_offline() if offline is None else offline
    cached = cached_snapshot(hub, cache_dir)
    if cached is not None:
        log.info("model %s: found in the Hugging Face cache, %s", hub, cached)
        return cached
    if offline:
        raise HubError(
            f"model {hub} is not in the Hugging Face cache {cache_dir} (or is incomplete there) and "
            f"HF_HUB_OFFLINE is set: download it first, e.g. `{hub.download_command(cache_dir)}`, or unset "
            "HF_HUB_OFFLINE"
        )
    return download(hub, prefer_fp16, cache_dir)


def cached_snapshot(hub: HubModel, cache_dir: Path) -> Path | None:
    """The cached snapshot of `hub` if it holds everything models/loading.py needs; None otherwise.
    Reads the cache layout itself (models--org--name/refs/<revision>, snapshots/<commit>/...): no
    network, whatever huggingface_hub's version."""
    repo_dir = cache_dir / ("models--" + hub.repo_id.replace("/", "--"))
    revision = hub.revision or "main"
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    if (snapshot / "model_index.json").is_file():
        return snapshot if not missing_files(snapshot) else None
    checkpoints = sorted(p for p in snapshot.glob("*.safetensors") if p.is_file())
    return checkpoints[0] if len(checkpoints) == 1 else None


def missing_files(folder: Path) -> list[str]:
    """What a diffusers folder lacks of what models/loading.py reads (its weights as safetensors)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["model_index.json"]
    missing = []
    for component, (configs, weights) in COMPONENTS.items():
        if component not in index:
            continue
        missing += [f"{component}/{name}" for name in configs if not (folder / component / name).is_file()]
        if weights and not any((folder / component / n).is_file() for n in weight_names(weights)):
            missing.append(f"{component}/{weights}.safetensors")
    return missing


def weight_names(stem: str) -> tuple[str, str]:
    return f"{stem}.safetensors", f"{stem}.fp16.safetensors"


def choose_files(files: list[str], prefer_fp16: bool, hub: HubModel) -> list[str]:
    """The files of a repo to fetch: see the module's docstring. A repo without model_index.json must
    hold exactly one .safetensors file at its root (an original single-file checkpoint)."""
    present = set(files)
    if "model_index.json" not in present:
        singles = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
        if len(singles) == 1:
            return singles
        raise HubError(
            f"{hub} is neither a diffusers-format repo (no model_index.json) nor a repo with one "
            f".safetensors checkpoint at its root (found {len(singles)}: {', '.join(singles[:5]) or 'none'})"
        )
    chosen = [name for name in ROOT_FILES if name in present]
    for component, (_, weights) in COMPONENTS.items():
        if not any(f.startswith(component + "/") for f in files):
            continue
        chosen += [f for f in files if f.startswith(component + "/") and f.endswith((".json", ".txt"))]
        if weights is None:
            continue
        full, half = (f"{component}/{name}" for name in weight_names(weights))
        order = (half, full) if prefer_fp16 else (full, half)
        found = next((name for name in order if name in present), None)
        if found is None:
            raise HubError(
                f"{hub}: {component}/ has no safetensors weights ({full} or {half}); pickled .bin files are "
                "not loaded"
            )
        chosen.append(found)
    return chosen


def download(hub: HubModel, prefer_fp16: bool, cache_dir: Path) -> Path:
    """Fetch what the model needs into the cache (huggingface_hub's progress bars on stderr)."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(hub.repo_id, revision=hub.revision)
        chosen = choose_files(files, prefer_fp16, hub)
        log.info(
            "model %s: downloading %d files into %s (%s weights)",
            hub,
            len(chosen),
            cache_dir,
            "fp16 where the repo has them" if prefer_fp16 else "full-precision",
        )
        folder = Path(
            snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=chosen, cache_dir=cache_dir)
        )
    except HubError:
        raise
    except Exception as error:  # huggingface_hub's HTTP errors, the network's, the disk's
        raise HubError(
            f"cannot fetch model {hub} from the Hugging Face hub into {cache_dir}: {error} (gated or private "
            f"repo: set HF_TOKEN; no network here: download it elsewhere with "
            f"`{hub.download_command(cache_dir)}` and copy the cache)"
        ) from error
    if "model_index.json" not in chosen:
        return folder / chosen[0]
    missing = missing_files(folder)
    if missing:
        raise HubError(f"model {hub}: the downloaded snapshot {folder} lacks {', '.join(missing)}")
    return folder
