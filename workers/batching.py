"""Continuous-batching decisions as pure functions: who joins the batch, and how a step is cut into
UNet calls. No torch, no Redis: the engine applies them, the unit tests check them directly.

Rows are UNet rows: an image guided by classifier-free guidance takes 2 (prompt and negative
prompt), an unguided one 1.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Protocol, TypeVar


class Rowed(Protocol):
    @property
    def rows(self) -> int: ...


class Shaped(Rowed, Protocol):
    @property
    def latent_shape(self) -> tuple[int, ...]: ...


R = TypeVar("R", bound=Rowed)
S = TypeVar("S", bound=Shaped)


def admit_count(waiting_rows: Iterable[int], running_rows: int, max_rows: int) -> int:
    """How many waiting requests, oldest first, join the batch now.

    Strict FIFO: the oldest waiting request joins if its rows fit in what is left of `max_rows`; if
    it does not, nobody behind it jumps ahead (so a big request is never starved by small ones, nor
    a request of another size by a stream of one size). A request larger than `max_rows` on its own
    joins when nothing else runs, alone; its step is then split over several UNet calls.
    """
    count, rows = 0, running_rows
    for request_rows in waiting_rows:
        if rows > 0 and rows + request_rows > max_rows:
            break
        count += 1
        rows += request_rows
    return count


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
