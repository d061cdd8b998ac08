"""The committed embedded model draws what held-out prompts ask for.

A subset of `python -m training.evaluate` (3 cases per held-out triple, 72 images) at the
defaults of `models/embedded_model/defaults.json` and at guidance_scale 1, plus the empty prompt.
The model card's full evaluation (192 images) gives colour 100%, position 100%, shape 95% at the
defaults; the thresholds here sit about 3 standard errors of a 72-image subset under the issue's
bars, so a regression to chance (12.5% colour, 11% position, 33% shape) cannot pass.

Guidance: this model follows prompts without it (guidance 1 scores within a few points of
guidance 5; see the model card), so the tests check what guidance does here rather than a fall
in the scores: the unconditional prediction it extrapolates away from carries no prompt (the
empty prompt draws random colours and places), and guided pictures score at least as well.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from models.default_model import EMBEDDED_MODEL_DIR
from models.loading import load_model
from models.stable_diffusion import StableDiffusion
from training.evaluate import Case, Scores, evaluate, held_out_cases

CASES_PER_TRIPLE = 3
MIN_COLOUR = 0.85  # bar 90%; 100% measured on 192 images
MIN_POSITION = 0.85  # bar 90%; 100% measured
MIN_SHAPE = 0.72  # bar 80%; 95% measured
MIN_BACKGROUND = 0.9
MIN_FOUND = 0.9
MAX_UNPROMPTED = 0.4  # the empty prompt: chance is 12.5% colour, 11% position


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is the fast choice on a shared 2-core machine
    yield load_model(EMBEDDED_MODEL_DIR)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scores(model: StableDiffusion) -> dict[str, Scores]:
    steps, guidance_scale = model.recommended["steps"], model.recommended["guidance_scale"]
    cases = held_out_cases(CASES_PER_TRIPLE)
    # the same seeds and asked-for scenes, but the prompt left empty: what the unconditional
    # branch of classifier-free guidance draws
    unprompted = [Case(c.colour, c.shape, c.position, c.background, "", c.seed) for c in cases]
    start = time.perf_counter()
    result = {
        "guided": evaluate(model, cases, steps, guidance_scale),
        "unguided": evaluate(model, cases, steps, 1.0),
        "unprompted": evaluate(model, unprompted, steps, 1.0),
    }
    seconds = time.perf_counter() - start
    assert seconds < 120, f"the evaluation subset took {seconds:.0f} s"
    return result


def test_native_size_and_defaults(model: StableDiffusion) -> None:
    defaults = json.loads((EMBEDDED_MODEL_DIR / "defaults.json").read_text())
    assert model.native_size == (defaults["width"], defaults["height"]) == (64, 64)
    assert model.recommended["guidance_scale"] > 1  # classifier-free guidance on by default
    assert model.vae_scale_factor == 4
    assert 0.05 < model.vae.config.scaling_factor < 5
    assert model.schedule.prediction_type == "v_prediction"


def test_held_out_prompts_get_their_colour_position_and_shape(scores: dict[str, Scores]) -> None:
    guided = scores["guided"]
    assert guided.count == 72
    assert guided.detected >= MIN_FOUND, guided
    assert guided.colour >= MIN_COLOUR, guided
    assert guided.position >= MIN_POSITION, guided
    assert guided.shape >= MIN_SHAPE, guided
    assert guided.background >= MIN_BACKGROUND, guided


def test_guidance_extrapolates_away_from_a_prompt_free_picture(scores: dict[str, Scores]) -> None:
    """What classifier-free guidance pushes away from (the empty prompt's prediction) holds no
    colour or place; the guided pictures score no worse than the unguided ones."""
    unprompted, unguided, guided = scores["unprompted"], scores["unguided"], scores["guided"]
    assert unprompted.colour <= MAX_UNPROMPTED and unprompted.position <= MAX_UNPROMPTED, unprompted
    assert unguided.colour >= MIN_COLOUR and unguided.position >= MIN_POSITION, unguided
    assert guided.all_three >= unguided.all_three, (guided, unguided)
