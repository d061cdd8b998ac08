"""Continuous-batching decisions as pure functions: which images take the next step, and how a step
is cut into UNet calls. No torch, no Redis: the engine applies them, the unit tests check them.

Rows are UNet rows: an image guided by classifier-free guidance takes 2 (prompt and negative
prompt), an unguided one 1.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


class Rowed(Protocol):
    @property
    def rows(self) -> int: ...


class Shaped(Rowed, Protocol):
    @property
    def latent_shape(self) -> tuple[int, ...]: ...


R = TypeVar("R", bound=Rowed)
S = TypeVar("S", bound=Shaped)


@dataclass(frozen=True)
class Demand:
    """What one request in the engine wants from the next step."""

    rows_per_image: int  # 2 with classifier-free guidance, else 1
    images_left: int  # images not denoised yet


def share_rows(demands: Sequence[Demand], max_rows: int) -> list[int]:
    """How many images of each request (given oldest first) take the next step.

    Round robin in arrival order, one image per request per round, while the images fit in
    `max_rows`: every request in the engine gets an image into every step as long as one image of
    each fits, so a big request cannot hold a small one back for its whole run, and the oldest
    requests ask first in every round, so a stream of small ones cannot starve a big one (or any
    request: the newest wait when even one image each does not fit, until an older one ends). An
    image bigger than `max_rows` on its own steps alone (its call is split only by the device's limit).
    """
    take = [0] * len(demands)
    rows = 0
    while True:
        grew = False
        for i, demand in enumerate(demands):
            if take[i] >= demand.images_left:
                continue
            if rows > 0 and rows + demand.rows_per_image > max_rows:
                continue
            take[i] += 1
            rows += demand.rows_per_image
            grew = True
        if not grew:
            return take


def group_by_shape(images: Iterable[S]) -> list[list[S]]:
    """Images grouped by latent shape (only same-shape latents can share a UNet call), each group in
    the given order, groups in order of first appearance."""
    groups: dict[Hashable, list[S]] = {}
    for image in images:
        groups.setdefault(image.latent_shape, []).append(image)
    return list(groups.values())


def split_rows(items: Sequence[R], max_rows: int) -> list[list[R]]:
    """Cut `items` (in order) into consecutive chunks of at most `max_rows` rows each; an item is never
    split, so an item larger than `max_rows` forms a chunk of its own."""
    chunks: list[list[R]] = []
    current: list[R] = []
    rows = 0
    for item in items:
        if current and rows + item.rows > max_rows:
            chunks.append(current)
            current, rows = [], 0
        current.append(item)
        rows += item.rows
    if current:
        chunks.append(current)
    return chunks


def total_rows(items: Iterable[Rowed]) -> int:
    return sum(item.rows for item in items)
