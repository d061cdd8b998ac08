"""The caption generator: varied, parseable, never a held-out phrasing, words all in the vocabulary."""

from __future__ import annotations

import re

import numpy as np
import pytest

from training.captions import (
    CENTER_WORDS,
    EVAL_TEMPLATES,
    caption,
    describe,
    eval_caption,
    parse_caption,
    vocabulary,
    words_of,
)
from training.shapes import COLOUR_NAMES, POSITION_NAMES, SHAPES, random_scene, scene_at


def _captions(count: int, seed: int) -> list[str]:
    """`count` generator captions of 500 random scenes, in turn."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(500)]
    return [caption(scenes[i % len(scenes)], rng) for i in range(count)]


def _template_pattern(template: str) -> re.Pattern[str]:
    """A regex matching every filling of an `EVAL_TEMPLATES` template ("a"/"an" either way)."""
    alternatives = {
        "c": "|".join(COLOUR_NAMES),
        "b": "|".join(COLOUR_NAMES),
        "s": "|".join(SHAPES),
        "p": "|".join((*POSITION_NAMES, *CENTER_WORDS)),
    }
    parts = re.split(r"\{([cbsp])\}", template)  # literal, slot, literal, slot, ...
    pattern = "".join(
        f"(?:{alternatives[part]})" if i % 2 else re.escape(part).replace(r"\ a\ ", r"\ an?\ ")
        for i, part in enumerate(parts)
    )
    return re.compile(pattern.replace("^a\\ ", "an?\\ "))


def test_captions_are_deterministic_and_parse_back() -> None:
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng) for _ in range(2000)]
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    described = [describe(s, rng_a) for s in scenes]
    assert described == [describe(s, rng_b) for s in scenes]
    assert len({d.text for d in described}) > 1900  # hardly ever the same caption twice
    assert 0.05 < np.mean([not d.names_background for d in described]) < 0.15
    for scene, d in zip(scenes, described, strict=True):
        background = scene.background if d.names_background else None
        assert parse_caption(d.text) == (scene.colour, scene.shape, scene.position, background), d.text


def test_the_background_comes_first_last_and_in_between() -> None:
    places = {"first": 0, "last": 0, "between": 0}
    for text in _captions(3000, seed=2):
        words = words_of(text)
        if "background" not in words and "backdrop" not in words:
            continue
        background = max(i for i, w in enumerate(words) if w in ("background", "backdrop"))
        shape = next(i for i, w in enumerate(words) if w in SHAPES)
        position = max(
            i for i, w in enumerate(words) if w in ("top", "bottom", "left", "right", *CENTER_WORDS)
        )
        if background < min(shape, position):
            places["first"] += 1
        elif background > max(shape, position):
            places["last"] += 1
        else:
            places["between"] += 1
    assert min(places.values()) > 500, places


def test_training_never_produces_a_held_out_phrasing() -> None:
    """100,000 generator captions: none has the form of an `EVAL_TEMPLATES` template (the rules
    in `training.captions` keep it so), while every evaluation caption matches its own."""
    patterns = [_template_pattern(t) for t in EVAL_TEMPLATES]
    rng = np.random.default_rng(0)
    for k, template in enumerate(EVAL_TEMPLATES):
        for position in POSITION_NAMES:
            scene = scene_at("orange", "circle", position, "black", rng)
            assert patterns[k].fullmatch(eval_caption(template, scene, k)), (template, position)
    combined = re.compile("|".join(f"(?:{p.pattern})" for p in patterns))
    matches = [text for text in _captions(100_000, seed=4) if combined.fullmatch(text)]
    assert not matches, matches[:5]


@pytest.mark.parametrize("template", EVAL_TEMPLATES)
def test_every_held_out_phrasing_parses_every_position(template: str) -> None:
    rng = np.random.default_rng(0)
    for case_index in range(3):  # center is spelled center, centre and middle
        for position in POSITION_NAMES:
            text = eval_caption(template, scene_at("red", "triangle", position, "blue", rng), case_index)
            assert parse_caption(text) == ("red", "triangle", position, "blue"), text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "on a plain black background, one green square placed center",
            ("green", "square", "center", "black"),
        ),
        ("orange circle right in the middle", ("orange", "circle", "center", None)),
        ("a red circle in the top left on a blue background", ("red", "circle", "top left", "blue")),
        ("yellow square, bottom right, black background", ("yellow", "square", "bottom right", "black")),
        ("top left: a red circle, blue background", ("red", "circle", "top left", "blue")),
        ("a red circle at the top left of a blue background", ("red", "circle", "top left", "blue")),
        (
            "a white triangle on the right, on a purple colored backdrop",
            ("white", "triangle", "right", "purple"),
        ),
        ("blue square top right on a red background", ("blue", "square", "top right", "red")),
        ("blue square sitting right at the top right corner", ("blue", "square", "top right", None)),
        (
            "in the lower left corner of the picture an orange circle",
            ("orange", "circle", "bottom left", None),
        ),
        (
            "a solid green backdrop with a single black square in the centre",
            ("black", "square", "center", "green"),
        ),
    ],
)
def test_parse_caption(text: str, expected: tuple[str, str, str, str | None]) -> None:
    assert parse_caption(text) == expected


def test_unparseable_captions_raise() -> None:
    for text in (
        "a red circle",  # no position
        "a circle in the top on a blue background",  # no shape colour
        "red square top left, a blue circle",  # two shapes
        "red square top left, a background",  # no background colour
    ):
        with pytest.raises(ValueError):
            parse_caption(text)


def test_vocabulary_is_every_word_the_generator_uses() -> None:
    """Every word of 10,000 captions is in the vocabulary, every vocabulary word is used, and
    the held-out phrasings use no word outside it."""
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and all(re.fullmatch("[a-z]+", w) for w in vocab)
    used = {w for text in _captions(10_000, seed=5) for w in words_of(text)}
    assert used == set(vocab)
    assert {w for t in EVAL_TEMPLATES for w in words_of(re.sub(r"\{\w\}", "", t))} <= set(vocab)
    assert len(vocab) < 60  # small and explicit
