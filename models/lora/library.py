"""The LoRA files of one folder, by name, for one loaded model.

- `listing()`: every `*.safetensors` file of the folder from its header alone (format, base family,
  rank, layers), marked unusable with the reason when it is not a LoRA this model can take; what the
  worker publishes for GET /v1/loras.
- `load(name)`: the file parsed and resolved against the model's module names, kept in a small
  host-memory LRU (`host_cache` LoRAs); a LoraFileError names what is wrong with it.
- `lease(refs)`: what a request's images carry: the UNet part in the device pool (models/lora/pool.py)
  with a lease per LoRA, and the text-encoder parts to apply while its prompts are encoded.

A name is a file name without `.safetensors`, never a path: it is checked against the name rule and
the file must lie directly in the folder.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from models.families import family_of
from models.lora.files import Adapter, LoraFileError, read_header, read_lora, resolve, short_hash
from models.lora.pool import Lease, LoraPool
from models.lora.text import TextLora, linear_names
from models.stable_diffusion import StableDiffusion
from schemas.loras import LORA_FILE_SUFFIX, LoraInfo, LoraRef, is_lora_name

log = logging.getLogger(__name__)


class UnknownLora(LoraFileError):
    """A name with no file in the folder."""


@dataclass(frozen=True)
class LoadedLora:
    name: str
    unet: dict[str, Adapter]  # our UNet module names -> adapter
    text: dict[str, dict[str, Adapter]]  # "text_encoder"/"text_encoder_2" -> module name -> adapter
    short_hash: str


@dataclass(frozen=True)
class RowLoras:
    """A request's UNet LoRAs as its rows carry them: a slot and a weight each. The leases keep the
    slots from being reused while an image of the request holds this object."""

    leases: tuple[Lease, ...]
    weights: tuple[float, ...]

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(lease.slot for lease in self.leases)

    @property
    def adapts_resnets(self) -> bool:
        return any(lease.adapts_resnets for lease in self.leases)


class LoraLibrary:
    def __init__(
        self, folder: Path, model: StableDiffusion, pool: LoraPool, max_per_request: int, host_cache: int = 16
    ) -> None:
        self.folder = folder
        self.model = model
        self.pool = pool
        self.max_per_request = max_per_request
        self.host_cache = host_cache
        self._cache: OrderedDict[str, LoadedLora] = OrderedDict()
        self._lock = threading.Lock()
        self._encoders: dict[str, nn.Module] = {"text_encoder": model.text_encoder}
        if model.text_encoder_2 is not None:
            self._encoders["text_encoder_2"] = model.text_encoder_2
        self._module_names = {"unet": list(pool.layers)} | {
            part: linear_names(encoder) for part, encoder in self._encoders.items()
        }
        # every module, to tell "not in this model" from "not adapted here" in errors
        self._present = {"unet": [name for name, _ in model.unet.named_modules()]} | {
            part: [name for name, _ in encoder.named_modules()] for part, encoder in self._encoders.items()
        }

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        return self._encoders

    def path(self, name: str) -> Path:
        if not is_lora_name(name):
            raise UnknownLora(
                f"{name!r} is not a LoRA name (a file name without {LORA_FILE_SUFFIX}, no path)"
            )
        path = self.folder / f"{name}{LORA_FILE_SUFFIX}"
        if path.parent.resolve() != self.folder.resolve() or not path.is_file():
            raise UnknownLora(f"no LoRA named {name!r} in this worker's SD_LORA_DIR")
        return path

    def listing(self) -> list[LoraInfo]:
        """Every LoRA file of the folder, sorted by name, from its header."""
        family = family_of(self.model).name
        infos = []
        for path in sorted(self.folder.glob(f"*{LORA_FILE_SUFFIX}")):
            name = path.name[: -len(LORA_FILE_SUFFIX)]
            if not is_lora_name(name):
                log.warning("LoRA file %s: its name does not follow the rule; not listed", path.name)
                continue
            size = path.stat().st_size
            try:
                header = read_header(path)
            except (LoraFileError, OSError) as error:
                infos.append(
                    LoraInfo(
                        name=name,
                        family="unknown",
                        format="unknown",
                        rank=0,
                        size_bytes=size,
                        layers={},
                        usable=False,
                        problem=str(error),
                    )  # fmt: skip
                )
                continue
            problem = None
            if header.family != family:
                problem = f"a LoRA for {header.family}; this model is {family}"
            elif header.context_dim is not None and header.context_dim != self.model.context_dim:
                problem = (
                    f"a LoRA for a {header.family} model with a {header.context_dim}-wide text context; this "
                    f"model's is {self.model.context_dim} wide (SD 1.x: 768, SD 2.x: 1024)"
                )
            infos.append(
                LoraInfo(
                    name=name,
                    family=header.family,
                    context_dim=header.context_dim,
                    format=header.format,
                    rank=header.rank,
                    size_bytes=size,
                    layers=header.layers,
                    usable=problem is None,
                    problem=problem,
                )
            )
        return infos

    def load(self, name: str) -> LoadedLora:
        """`name` parsed and resolved against this model (host LRU); LoraFileError if it cannot be used."""
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None:
                self._cache.move_to_end(name)
                return cached
        path = self.path(name)
        where = f"LoRA {name!r} ({path.name})"
        try:
            weights = read_lora(path)
            parts = resolve(weights, self._module_names, where, self._present)
            loaded = LoadedLora(
                name,
                parts.get("unet", {}),
                {part: adapters for part, adapters in parts.items() if part != "unet"},
                short_hash(path),
            )
        except LoraFileError:
            raise
        except (OSError, RuntimeError, ValueError, struct.error) as error:
            raise LoraFileError(f"{where} cannot be read: {error}") from None
        self.pool.check(name, loaded.unet)
        self._check_text(where, loaded.text)
        with self._lock:
            self._cache[name] = loaded
            while len(self._cache) > self.host_cache:
                self._cache.popitem(last=False)
        log.info(
            "LoRA %s read: %s format, rank %d, %.1f MB",
            name,
            weights.format,
            weights.rank,
            weights.nbytes / 2**20,
        )
        return loaded

    def _check_text(self, where: str, parts: dict[str, dict[str, Adapter]]) -> None:
        for part, adapters in parts.items():
            encoder = self._encoders[part]
            for module_name, adapter in adapters.items():
                want = tuple(encoder.get_submodule(module_name).weight.shape)
                got = (adapter.up.shape[0], *adapter.down.shape[1:])
                if want != got:
                    raise LoraFileError(
                        f"{where} does not fit this model: {part}.{module_name} is {want}, the LoRA's layer "
                        f"{got} (a LoRA for another base model)"
                    )

    def check(self, refs: Sequence[LoraRef]) -> None:
        """Load (or find cached) every LoRA of a request: a bad one fails here, before the engine (called
        by the job's slot thread)."""
        limit = min(self.max_per_request, self.pool.slots)  # more than the slots could never start
        if len(refs) > limit:
            raise LoraFileError(
                f"{len(refs)} LoRAs in one request; this worker takes at most {limit} "
                f"(SD_MAX_LORAS_PER_REQUEST {self.max_per_request}, SD_LORA_SLOTS {self.pool.slots})"
            )
        for ref in refs:
            self.load(ref.name)

    def short_hashes(self, names: Sequence[str]) -> dict[str, str]:
        """A1111's short hash of each named LoRA that is cached (the ones a finished job used are)."""
        with self._lock:
            return {name: self._cache[name].short_hash for name in names if name in self._cache}

    def admit(self, requests: Sequence[Sequence[LoraRef]]) -> list[bool]:
        """Which requests (by their LoRAs, in order) can be given pool slots now; the others wait."""
        return self.pool.fits([[ref.name for ref in refs] for refs in requests])

    def lease(self, refs: Sequence[LoraRef]) -> tuple[RowLoras | None, list[TextLora]]:
        """The request's UNet LoRAs in pool slots (LoraSlotsBusy when they cannot all be placed now) and
        its text-encoder LoRAs with their weights."""
        self.check(refs)
        loaded = [(self.load(ref.name), ref.weight) for ref in refs]
        leases, weights = [], []
        for lora, weight in loaded:
            if lora.unet:
                leases.append(self.pool.lease(lora.name, lora.unet))
                weights.append(weight)
        text = [(lora.text, weight) for lora, weight in loaded if lora.text]
        rows = RowLoras(tuple(leases), tuple(weights)) if leases else None
        return rows, text
