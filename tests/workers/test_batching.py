"""Admission and call splitting, as pure decisions (no model, no Redis)."""

from __future__ import annotations

from dataclasses import dataclass

from workers.batching import admit_count, group_by_shape, split_rows


@dataclass
class Item:
    name: str
    rows: int
    latent_shape: tuple[int, ...] = (4, 8, 8)


def test_admits_oldest_first_while_they_fit() -> None:
    assert admit_count([2, 2, 2, 2, 2], running_rows=0, max_rows=8) == 4
    assert admit_count([2, 2, 2], running_rows=6, max_rows=8) == 1
    assert admit_count([2], running_rows=8, max_rows=8) == 0


def test_strict_fifo_nobody_jumps_a_waiting_request() -> None:
    # the head (6 rows) does not fit beside 4 running rows: the small ones behind it wait too
    assert admit_count([6, 1, 1], running_rows=4, max_rows=8) == 0
    # and it joins as soon as there is room, before the later ones
    assert admit_count([6, 1, 1], running_rows=2, max_rows=8) == 1


def test_a_request_larger_than_the_budget_runs_alone() -> None:
    assert admit_count([20, 2], running_rows=0, max_rows=8) == 1  # alone, nobody beside it
    assert admit_count([20], running_rows=2, max_rows=8) == 0  # waits until the batch is empty


def test_no_starvation_under_a_stream_of_small_requests() -> None:
    """Simulate: a big request waits behind running small ones while small ones keep arriving."""
    max_rows, waiting, running = 8, [("big", 8)], [("s0", 2), ("s1", 2), ("s2", 2)]
    admitted_order = []
    for tick in range(20):
        waiting.append((f"new{tick}", 2))  # a new small request every step
        if running:
            running.pop(0)  # one running request finishes per step
        count = admit_count([rows for _, rows in waiting], sum(r for _, r in running), max_rows)
        for _ in range(count):
            name, rows = waiting.pop(0)
            admitted_order.append(name)
            running.append((name, rows))
    assert "big" in admitted_order
    assert admitted_order.index("big") == 0  # nobody arriving after it went first


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
