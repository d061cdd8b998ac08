"""The evaluation's case lists and scoring, without a model."""

from __future__ import annotations

import pytest

from training.captions import EVAL_TEMPLATES, parse_caption
from training.checker import Detection
from training.evaluate import EVAL_SETS, held_out_cases, score, set_cases, training_cases
from training.shapes import HELD_OUT


@pytest.mark.parametrize("phrasing", ["training", "held-out"])
def test_held_out_cases_cover_every_held_out_triple_and_only_those(phrasing: str) -> None:
    cases = held_out_cases(2, phrasing=phrasing)
    assert len(cases) == 2 * len(HELD_OUT)
    assert {(c.colour, c.shape, c.position) for c in cases} == set(HELD_OUT)
    assert len({c.seed for c in cases}) == len(cases)
    for case in cases:  # the prompt says what the case expects, background included
        assert parse_caption(case.prompt) == (case.colour, case.shape, case.position, case.background)
    assert held_out_cases(2, phrasing=phrasing) == cases  # deterministic


def test_held_out_phrasing_uses_every_template() -> None:
    cases = held_out_cases(8, phrasing="held-out")
    heads = {t.split("{")[0] for t in EVAL_TEMPLATES}  # each template's opening words
    assert {h for h in heads if any(c.prompt.startswith(h) for c in cases)} == heads
    assert any("right in the middle" in c.prompt for c in cases)  # the phrase
    assert any(c.prompt.startswith("on a plain") and " placed " in c.prompt for c in cases)


@pytest.mark.parametrize("phrasing", ["training", "held-out"])
def test_training_cases_never_use_a_held_out_triple(phrasing: str) -> None:
    cases = training_cases(200, phrasing=phrasing)
    assert not {(c.colour, c.shape, c.position) for c in cases} & HELD_OUT
    assert training_cases(200, phrasing=phrasing) == cases
    for case in cases:
        assert parse_caption(case.prompt) == (case.colour, case.shape, case.position, case.background)


def test_every_set_has_its_triples_and_phrasing() -> None:
    for name, (triples, phrasing) in EVAL_SETS.items():
        cases = set_cases(name, 1)
        assert len(cases) == len(HELD_OUT)
        if triples == "held-out":
            assert cases == held_out_cases(1, phrasing=phrasing), name
        else:
            assert cases == training_cases(len(HELD_OUT), phrasing=phrasing), name
    with pytest.raises(ValueError, match="unknown evaluation set"):
        set_cases("everything", 1)


def test_score_counts_each_attribute_and_missing_shapes() -> None:
    cases = held_out_cases(1)[:3]
    right = Detection(
        cases[0].colour, cases[0].shape, cases[0].position, cases[0].background, 100, (0.0, 0.0), 0.9
    )
    wrong_position = Detection(
        cases[1].colour, cases[1].shape, "nowhere", cases[1].background, 100, (0.0, 0.0), 0.9
    )
    scores = score(cases, [right, wrong_position, None])
    assert scores["colour"] == scores["shape"] == 2 / 3
    assert scores["position"] == scores["all_three"] == scores["all_four"] == 1 / 3
    assert scores["detected"] == 2 / 3
    assert scores["background"] == 2 / 3
