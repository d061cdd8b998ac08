"""Sharing a step's rows and splitting it into calls, as pure decisions (no model, no Redis)."""

from __future__ import annotations

from dataclasses import dataclass

from workers.batching import Demand, group_by_shape, share_rows, split_rows


@dataclass
class Item:
    name: str
    rows: int
    latent_shape: tuple[int, ...] = (4, 8, 8)


def share(demands: list[tuple[int, int]], max_rows: int) -> list[int]:
    return share_rows([Demand(rows, images) for rows, images in demands], max_rows)


def test_one_image_per_request_per_round_oldest_first() -> None:
    assert share([(2, 1), (2, 1), (2, 1), (2, 1), (2, 1)], max_rows=8) == [1, 1, 1, 1, 0]
    assert share([(2, 8), (2, 1)], max_rows=8) == [3, 1]  # the big one takes what the small one leaves
    assert share([(2, 8)], max_rows=8) == [4]  # alone, it fills the batch
    assert share([(1, 3), (2, 2)], max_rows=5) == [
        3,
        1,
    ]  # 1 + 2, then 1 + 1: a second 2-row image does not fit


def test_a_small_request_does_not_wait_behind_a_big_one() -> None:
    """What a strict FIFO of whole requests did: the small one waited for the whole big run."""
    assert share([(2, 8), (2, 1)], max_rows=4) == [1, 1]


def test_an_image_bigger_than_the_budget_steps_alone() -> None:
    assert share([(2, 3), (1, 1)], max_rows=1) == [1, 0]
    assert share([(2, 0), (2, 1)], max_rows=1) == [0, 1]


def test_no_request_starves_under_a_stream_of_small_ones() -> None:
    """Simulate a long big request (6 images) among small ones while two new small ones arrive every
    step and each small one is done after one step: the big one gets an image into every step, and
    no small one waits for more than a few steps (the oldest are served first)."""
    max_rows = 8
    waiting: list[tuple[str, int]] = []  # (name, tick it arrived)
    waits = []
    for tick in range(40):
        waiting += [(f"a{tick}", tick), (f"b{tick}", tick)]
        shares = share([(2, 6), *[(2, 1) for _ in waiting]], max_rows)
        assert shares[0] >= 1  # the big one always moves
        served = [w for w, k in zip(waiting, shares[1:], strict=True) if k]
        waits += [tick - arrived for _, arrived in served]
        waiting = [w for w in waiting if w not in served]
    assert max(waits) <= 1  # 3 small ones fit beside the big one each step: none waits long
    assert waiting == sorted(waiting, key=lambda w: w[1])  # nobody jumped an older one


def test_split_rows_keeps_order_and_limit() -> None:
    items = [Item("a", 2), Item("b", 2), Item("c", 1), Item("d", 2), Item("e", 2)]
    chunks = split_rows(items, 4)
    assert [[i.name for i in chunk] for chunk in chunks] == [["a", "b"], ["c", "d"], ["e"]]
    assert all(sum(i.rows for i in chunk) <= 4 for chunk in chunks)


def test_split_rows_never_splits_an_item() -> None:
    chunks = split_rows([Item("a", 2), Item("b", 2)], 1)
    assert [[i.name for i in chunk] for chunk in chunks] == [["a"], ["b"]]


def test_group_by_shape_keeps_order() -> None:
    items = [Item("a", 2, (4, 8, 8)), Item("b", 2, (4, 8, 6)), Item("c", 2, (4, 8, 8))]
    assert [[i.name for i in group] for group in group_by_shape(items)] == [["a", "c"], ["b"]]
