"""The procedural dataset: deterministic, held-out triples never drawn, renders where asked.
(Captions: test_captions.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from training.shapes import (
    COLOUR_NAMES,
    HELD_OUT,
    POSITION_NAMES,
    SHAPES,
    make_dataset,
    random_scene,
    render,
    scene_at,
)


def test_same_seed_same_images_and_scenes() -> None:
    images_a, scenes_a = make_dataset(20, seed=7)
    images_b, scenes_b = make_dataset(20, seed=7)
    assert images_a.shape == (20, 64, 64, 3) and images_a.dtype == np.uint8
    assert np.array_equal(images_a, images_b)
    assert scenes_a == scenes_b
    images_c, _ = make_dataset(20, seed=8)
    assert not np.array_equal(images_a, images_c)


def test_held_out_triples_cover_every_word_and_are_never_drawn() -> None:
    assert len(HELD_OUT) == 24
    assert {c for c, _, _ in HELD_OUT} == set(COLOUR_NAMES)
    assert {s for _, s, _ in HELD_OUT} == set(SHAPES)
    assert {p for _, _, p in HELD_OUT} == set(POSITION_NAMES)
    rng = np.random.default_rng(0)
    drawn = {random_scene(rng).combination for _ in range(5000)}
    assert not drawn & HELD_OUT
    assert len(drawn) == len(COLOUR_NAMES) * len(SHAPES) * len(POSITION_NAMES) - len(HELD_OUT)
    # every pair of words still appears in training
    for colour, shape, position in HELD_OUT:
        assert any(c == colour and s == shape for c, s, _ in drawn)
        assert any(c == colour and p == position for c, _, p in drawn)
        assert any(s == shape and p == position for _, s, p in drawn)


def test_render_puts_the_shape_colour_where_the_scene_says() -> None:
    scene = scene_at("red", "square", "bottom right", "blue", np.random.default_rng(0))
    image = render(scene)
    y, x = round(scene.centre_y_px), round(scene.centre_x_px)
    assert tuple(image[y, x]) == (220, 30, 30)
    assert tuple(image[2, 2]) == (30, 70, 225)
    with pytest.raises(ValueError, match="both"):
        scene_at("red", "circle", "top", "red", np.random.default_rng(0))
