"""The UNet's LoRA slots on the device: adapted layers installed once, LoRAs loaded into slots on first
use, a slot reused (least recently used first) only when no running image holds its LoRA.

The pool's shape is fixed at start (`slots`, `max_rank`: SD_LORA_SLOTS, SD_LORA_MAX_RANK), so its
buffers never move and the graphs that read them stay valid. A running image holds a `Lease` on each
of its LoRAs (models/pipeline.py: ActiveImage.loras); the pool keeps only weak references to leases,
so a finished job's slots become free once its images are dropped, whichever way it ended.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.blocks import Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D
from models.lora.files import Adapter, LoraFileError
from models.lora.layers import RESNET, TRANSFORMER, LoraConv2d, LoraLinear, LoraRows

log = logging.getLogger(__name__)

AdaptedLayer = LoraLinear | LoraConv2d


class LoraSlotsBusy(RuntimeError):
    """Every slot holds a LoRA that a running image uses: the request waits for one to free up."""


class Lease:
    """A running image's hold on a LoRA's slot (released when the image is dropped)."""

    def __init__(self, name: str, slot: int, adapts_resnets: bool) -> None:
        self.name = name
        self.slot = slot
        self.adapts_resnets = adapts_resnets  # it has LoCon/resnet weights: calls need conv_scales


@dataclass
class _Slot:
    name: str | None = None
    adapts_resnets: bool = False


def _groups(unet: nn.Module) -> dict[str, str]:
    """The UNet's adaptable layers (module name -> group), as kohya's LoRA (transformers) and LoCon
    (resnets, down/upsamplers) target them."""
    groups: dict[str, str] = {}
    for name, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            group = TRANSFORMER
        elif isinstance(module, ResnetBlock2D | Downsample2D | Upsample2D):
            group = RESNET
        else:
            continue
        for child, layer in module.named_modules():
            if child and isinstance(layer, nn.Linear | nn.Conv2d):
                groups[f"{name}.{child}"] = group
    return groups


class LoraPool:
    """The adapted layers of one UNet and which LoRA each of their `slots` slots holds."""

    def __init__(self, unet: nn.Module, slots: int, max_rank: int) -> None:
        if slots < 1 or max_rank < 1:
            raise ValueError(
                f"a LoRA pool needs at least one slot of rank >= 1, got {slots} of rank {max_rank}"
            )
        if getattr(unet, "lora_rows", None) is not None:
            raise ValueError("this UNet already has a LoRA pool")
        self.slots = slots
        self.max_rank = max_rank
        self.rows = LoraRows()
        self.layers: dict[str, AdaptedLayer] = {}
        for name, group in _groups(unet).items():
            parent_name, _, attr = name.rpartition(".")
            parent = unet.get_submodule(parent_name)
            base = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
            cls = LoraLinear if isinstance(base, nn.Linear) else LoraConv2d
            layer = cls.adapt(base, self.rows, group, slots, max_rank)
            if attr.isdigit():
                parent[int(attr)] = layer
            else:
                setattr(parent, attr, layer)
            self.layers[name] = layer
        unet.lora_rows = self.rows  # the UNet's forward sets the rows of each call
        self._slots = [_Slot() for _ in range(slots)]
        self._by_name: OrderedDict[str, int] = OrderedDict()  # loaded LoRAs, least recently used first
        self._leases: list[weakref.WeakSet[Lease]] = [weakref.WeakSet() for _ in range(slots)]
        self._lock = threading.Lock()
        log.info(
            "LoRA pool: %d slots of rank %d over %d layers (%.1f MB)",
            slots,
            max_rank,
            len(self.layers),
            self.nbytes / 2**20,
        )

    @property
    def nbytes(self) -> int:
        return sum(layer.lora_down.nbytes + layer.lora_up.nbytes for layer in self.layers.values())

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._by_name)

    def lease(self, name: str, adapters: Mapping[str, Adapter]) -> Lease:
        """A lease on `name`'s slot, loading it there first when it is not in the pool (`adapters`: its
        UNet part, by our module names). LoraSlotsBusy when every slot is held; LoraFileError when the
        adapters do not fit this UNet."""
        with self._lock:
            slot = self._by_name.get(name)
            if slot is None:
                slot = self._free_slot()
                self._load(slot, name, adapters)
            self._by_name.move_to_end(name)
            lease = Lease(name, slot, self._slots[slot].adapts_resnets)
            self._leases[slot].add(lease)
            return lease

    def fits(self, sets: Sequence[Sequence[str]]) -> list[bool]:
        """Which of these LoRA sets (in order, each taking what the ones before it took) can be leased
        now: a name in the pool fits, a new one needs a slot that is empty or held by no lease."""
        with self._lock:
            gc.collect()  # leases of dropped images caught in reference cycles
            taken = {name for name, slot in self._by_name.items() if self._leases[slot]}
            free = sum(1 for slot in self._slots if slot.name is None) + sum(
                1 for name, slot in self._by_name.items() if not self._leases[slot]
            )
            result = []
            for names in sets:
                new = {n for n in names if n not in taken and n not in self._by_name}
                reused = {n for n in names if n not in taken and n in self._by_name}
                ok = len(new) + len(reused) <= free
                if ok:  # its LoRAs become held: later sets cannot evict them
                    free -= len(new) + len(reused)
                    taken |= set(names)
                result.append(ok)
            return result

    def _free_slot(self) -> int:
        for index, slot in enumerate(self._slots):
            if slot.name is None:
                return index
        for attempt in range(2):
            for index in self._by_name.values():  # least recently used first
                if not self._leases[index]:
                    return index
            if attempt == 0:
                gc.collect()  # leases of dropped images caught in reference cycles
        raise LoraSlotsBusy(
            f"all {self.slots} LoRA slots (SD_LORA_SLOTS) hold LoRAs that running images use; the request "
            "waits for one to free up"
        )

    def check(self, name: str, adapters: Mapping[str, Adapter]) -> None:
        """LoraFileError naming the first layer of `name` that does not fit this pool's UNet."""
        problems = [self._mismatch(module, adapter) for module, adapter in adapters.items()]
        problems = [p for p in problems if p]
        if problems:
            more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
            raise LoraFileError(f"LoRA {name!r} does not fit this model: {problems[0]}{more}")

    @torch.no_grad()
    def _load(self, slot: int, name: str, adapters: Mapping[str, Adapter]) -> None:
        self.check(name, adapters)
        old = self._slots[slot].name
        if old is not None:
            del self._by_name[old]
            log.info("LoRA %s leaves slot %d for %s", old, slot, name)
        self._slots[slot] = _Slot()  # empty while it is written: a failed copy leaves no half LoRA named
        for layer in self.layers.values():
            layer.lora_down[slot].zero_()
            layer.lora_up[slot].zero_()
        for module, adapter in adapters.items():
            layer = self.layers[module]
            rank = adapter.rank
            # a 1x1 convolution's (r, in, 1, 1) and a Linear's (r, in) are the same map
            layer.lora_down[slot, :rank].copy_(adapter.down.reshape(rank, *layer.lora_down.shape[2:]))
            layer.lora_up[slot, :, :rank].copy_(adapter.up * adapter.scale)
        self._slots[slot] = _Slot(name, any(self.layers[m].group == RESNET for m in adapters))
        self._by_name[name] = slot
        log.info("LoRA %s loaded into slot %d (%d layers)", name, slot, len(adapters))

    def _mismatch(self, module: str, adapter: Adapter) -> str | None:
        layer = self.layers.get(module)
        if layer is None:
            return f"{module} is not an adapted layer of this UNet"
        if adapter.rank > self.max_rank:
            return f"{module} has rank {adapter.rank}, more than the pool's SD_LORA_MAX_RANK {self.max_rank}"
        want_in, got_in = tuple(layer.lora_down.shape[2:]), tuple(adapter.down.shape[1:])
        same_map = want_in == got_in or (
            want_in[0] == got_in[0] and all(k == 1 for k in (*want_in[1:], *got_in[1:]))
        )
        if not same_map or adapter.up.shape[0] != layer.lora_up.shape[1]:
            return (
                f"{module} takes {tuple(want_in)} -> {layer.lora_up.shape[1]}, the LoRA's layer "
                f"{tuple(got_in)} -> {adapter.up.shape[0]} (a LoRA for another base model)"
            )
        return None
