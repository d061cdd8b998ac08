"""The committed embedded model draws what held-out prompts ask for, in phrasings it never saw.

A subset of `python -m training.evaluate` (3 cases per held-out triple, 72 images per set) at the
defaults of `models/embedded_model/defaults.json` and at guidance_scale 1, plus the empty prompt:
held-out triples in the training generator's phrasing, and held-out triples in the held-out
phrasings (`training.captions.EVAL_TEMPLATES`). The model card's full evaluation (192 images per
set) gives the measured scores; the thresholds here sit about 3 standard errors of a 72-image
subset under the issue's bars (colour, position, background 95%, shape 90%), so a regression to
chance (12.5% colour, 11% position, 33% shape) cannot pass. The issue's own two prompts are
checked picture by picture.

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
from training.captions import vocabulary
from training.checker import detect
from training.evaluate import Case, Scores, evaluate, generate_images, held_out_cases

CASES_PER_TRIPLE = 3
MIN_COLOUR = 0.9  # bar 95%
MIN_POSITION = 0.9  # bar 95%
MIN_BACKGROUND = 0.9  # bar 95%
MIN_SHAPE = 0.8  # bar 90%
MIN_FOUND = 0.9
MAX_UNPROMPTED = 0.4  # the empty prompt: chance is 12.5% colour, 11% position
ISSUE_SEEDS = range(4)


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
        "new phrasing": evaluate(
            model, held_out_cases(CASES_PER_TRIPLE, phrasing="held-out"), steps, guidance_scale
        ),
    }
    seconds = time.perf_counter() - start
    assert seconds < 160, f"the evaluation subset took {seconds:.0f} s"
    return result


def test_native_size_defaults_and_vocabulary(model: StableDiffusion) -> None:
    defaults = json.loads((EMBEDDED_MODEL_DIR / "defaults.json").read_text())
    assert model.native_size == (defaults["width"], defaults["height"]) == (64, 64)
    assert model.recommended["guidance_scale"] > 1  # classifier-free guidance on by default
    assert model.vae_scale_factor == 4
    assert 0.05 < model.vae.config.scaling_factor < 5
    assert model.schedule.prediction_type == "v_prediction"
    # the words it was trained on, as the caption generator makes them today
    assert json.loads((EMBEDDED_MODEL_DIR / "vocabulary.json").read_text()) == vocabulary()


@pytest.mark.parametrize("name", ["guided", "new phrasing"])
def test_held_out_prompts_get_their_colour_position_shape_and_background(
    scores: dict[str, Scores], name: str
) -> None:
    found = scores[name]
    assert found.count == 72
    assert found.detected >= MIN_FOUND, found
    assert found.colour >= MIN_COLOUR, found
    assert found.position >= MIN_POSITION, found
    assert found.shape >= MIN_SHAPE, found
    assert found.background >= MIN_BACKGROUND, found


def test_guidance_extrapolates_away_from_a_prompt_free_picture(scores: dict[str, Scores]) -> None:
    """What classifier-free guidance pushes away from (the empty prompt's prediction) holds no
    colour or place; the guided pictures score no worse than the unguided ones."""
    unprompted, unguided, guided = scores["unprompted"], scores["unguided"], scores["guided"]
    assert unprompted.colour <= MAX_UNPROMPTED and unprompted.position <= MAX_UNPROMPTED, unprompted
    assert unguided.colour >= MIN_COLOUR and unguided.position >= MIN_POSITION, unguided
    assert guided.all_three >= unguided.all_three, (guided, unguided)


@pytest.mark.parametrize(
    ("prompt", "colour", "shape", "position", "background"),
    [
        # issue 25: drawn as a black square on green (the colours swapped) by the earlier model
        ("on a plain black background, one green square placed center", "green", "square", "center", "black"),
        # issue 25: drawn middle-right by the earlier model; no background named, any other colour
        ("orange circle right in the middle", "orange", "circle", "center", None),
    ],
)
def test_the_issues_prompts(
    model: StableDiffusion, prompt: str, colour: str, shape: str, position: str, background: str | None
) -> None:
    cases = [Case(colour, shape, position, background or "", prompt, seed) for seed in ISSUE_SEEDS]
    steps, guidance_scale = model.recommended["steps"], model.recommended["guidance_scale"]
    missing = 0
    for seed, image in zip(ISSUE_SEEDS, generate_images(model, cases, steps, guidance_scale), strict=True):
        found = detect(image)
        if found is None and background is None:
            # a known limit (model card): with no background named, a seed may pick the shape's
            # own colour for it (seed 1 here: all orange), leaving no shape to see
            missing += 1
            continue
        assert found is not None, seed
        assert (found.colour, found.shape, found.position) == (colour, shape, position), (seed, found)
        if background is not None:
            assert found.background == background, (seed, found)
        else:
            assert found.background != colour, (seed, found)
    assert missing <= 1, f"{missing} of {len(ISSUE_SEEDS)} pictures show no shape"
