"""The evaluation's case lists and scoring, without a model."""

from __future__ import annotations

from training.checker import Detection
from training.evaluate import held_out_cases, score, training_cases
from training.shapes import HELD_OUT, parse_caption


def test_held_out_cases_cover_every_held_out_triple_and_only_those() -> None:
    cases = held_out_cases(2)
    assert len(cases) == 2 * len(HELD_OUT)
    assert {(c.colour, c.shape, c.position) for c in cases} == set(HELD_OUT)
    assert len({c.seed for c in cases}) == len(cases)
    for case in cases:  # the prompt says what the case expects, in one of the training templates
        assert parse_caption(case.prompt) == (case.colour, case.shape, case.position, case.background)
    assert held_out_cases(2) == cases  # deterministic


def test_training_cases_never_use_a_held_out_triple() -> None:
    cases = training_cases(200)
    assert not {(c.colour, c.shape, c.position) for c in cases} & HELD_OUT
    assert training_cases(200) == cases


def test_score_counts_each_attribute_and_missing_shapes() -> None:
    cases = held_out_cases(1)[:3]
    right = Detection(
        cases[0].colour, cases[0].shape, cases[0].position, cases[0].background, 100, (0.0, 0.0), 0.9
    )
    wrong_position = Detection(cases[1].colour, cases[1].shape, "nowhere", "x", 100, (0.0, 0.0), 0.9)
    scores = score(cases, [right, wrong_position, None])
    assert scores["colour"] == scores["shape"] == 2 / 3
    assert scores["position"] == scores["all_three"] == 1 / 3
    assert scores["detected"] == 2 / 3
    assert scores["background"] == 1 / 3
