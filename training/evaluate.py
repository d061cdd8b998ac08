"""Score prompt-following on held-out (colour, shape, position) combinations and phrasings.

Images are generated through the serving pipeline (`load_model` + `models.pipeline.Pipeline`, the
stepper behind `generate`, here with many requests per UNet call) and read back by the checker
(`training.checker.detect`). Prints a table of colour / position / shape / background accuracy
per evaluation set and guidance scale:

    python -m training.evaluate --model models/embedded_model --per-triple 8   # defaults and guidance 1

The sets (`EVAL_SETS`) cross the triples, held out of training (`training.shapes.HELD_OUT`) or
seen, with the phrasing, the training generator's (`training.captions.describe`) or the held-out
templates it never produces (`training.captions.EVAL_TEMPLATES`). The default sets are the three
with something held out. Every case is deterministic: its background, its phrasing and its seed
follow from its index, so two runs on one machine print the same table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.loading import load_model
from models.pipeline import Pipeline
from models.stable_diffusion import StableDiffusion
from models.txt2img import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS
from schemas.generation import Generation
from training.captions import EVAL_TEMPLATES, describe, eval_caption
from training.checker import Detection, detect
from training.shapes import COLOUR_NAMES, HELD_OUT, random_scene, scene_at

logger = logging.getLogger(__name__)

EVAL_SEED = 1234  # case k is generated with seed EVAL_SEED + k
ATTRIBUTES = ("colour", "position", "shape")  # all three: the picture is right; background scored too
PHRASINGS = ("training", "held-out")
# name -> (triples, phrasing); triples "held-out" (never trained on) or "seen"
EVAL_SETS: dict[str, tuple[str, str]] = {
    "held-out-triples": ("held-out", "training"),
    "held-out-both": ("held-out", "held-out"),
    "held-out-phrasing": ("seen", "held-out"),
    "seen": ("seen", "training"),  # for choosing sampling defaults, never for the score
}
DEFAULT_SETS = ("held-out-triples", "held-out-both", "held-out-phrasing")


@dataclass(frozen=True)
class Case:
    """One evaluation prompt and what its image should show."""

    colour: str
    shape: str
    position: str
    background: str
    prompt: str
    seed: int


@dataclass(frozen=True)
class Scores:
    """Accuracies (0..1) over `count` images of one evaluation set at one guidance scale."""

    name: str  # the evaluation set (`EVAL_SETS`), or what the caller calls its cases
    guidance_scale: float
    steps: int
    count: int
    colour: float
    position: float
    shape: float
    all_three: float  # colour, position and shape all right
    all_four: float  # and the background too
    background: float
    detected: float  # share of images where the checker found a shape at all
    seconds_per_image: float


def _prompt(
    colour: str, shape: str, position: str, background: str, phrasing: str, seed: int, template_index: int
) -> str:
    """A case's prompt: a training-generator caption naming the background (drawn with an rng of
    `seed`) or held-out template `template_index` mod 8."""
    rng = np.random.default_rng(seed)
    scene = scene_at(colour, shape, position, background, rng)
    if phrasing == "training":
        return describe(scene, rng, names_background=True).text
    if phrasing == "held-out":
        return eval_caption(EVAL_TEMPLATES[template_index % len(EVAL_TEMPLATES)], scene, template_index)
    raise ValueError(f"unknown phrasing {phrasing!r}; known: {PHRASINGS}")


def held_out_cases(per_triple: int, start: int = 0, phrasing: str = "training") -> list[Case]:
    """`per_triple` cases for each held-out triple, cases start..start+per_triple-1 of each.

    Case k of triple t uses background `k`-th of the other colours (rotated by the triple's index,
    so every background appears), seed EVAL_SEED + 1000 t + k and a prompt in `phrasing` (the
    training generator's, drawn with that seed, or held-out template (t + k) mod 8).
    """
    cases = []
    for t, (colour, shape, position) in enumerate(sorted(HELD_OUT)):
        others = [c for c in COLOUR_NAMES if c != colour]
        for k in range(start, start + per_triple):
            background = others[(t + 3 * k) % len(others)]
            seed = EVAL_SEED + t * 1000 + k
            prompt = _prompt(colour, shape, position, background, phrasing, seed, t + k)
            cases.append(Case(colour, shape, position, background, prompt, seed))
    return cases


def training_cases(count: int, seed: int = EVAL_SEED, phrasing: str = "training") -> list[Case]:
    """`count` random cases of triples seen in training, prompts in `phrasing` (training phrasing:
    a validation set for choosing sampling defaults, the held-out triples stay untouched)."""
    rng = np.random.default_rng(seed)
    cases = []
    for k in range(count):
        s = random_scene(rng)
        prompt = _prompt(s.colour, s.shape, s.position, s.background, phrasing, seed + 100_000 + k, k)
        cases.append(Case(s.colour, s.shape, s.position, s.background, prompt, seed + 100_000 + k))
    return cases


def set_cases(name: str, per_triple: int) -> list[Case]:
    """The cases of evaluation set `name` (`EVAL_SETS`): `per_triple` per held-out triple, or as
    many cases of seen triples (24 * per_triple)."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; known: {sorted(EVAL_SETS)}")
    triples, phrasing = EVAL_SETS[name]
    if triples == "held-out":
        return held_out_cases(per_triple, phrasing=phrasing)
    return training_cases(per_triple * len(HELD_OUT), phrasing=phrasing)


def generate_images(
    model: StableDiffusion, cases: Sequence[Case], steps: int, guidance_scale: float, batch_size: int = 16
) -> list[np.ndarray]:
    """One (H, W, 3) uint8 image per case at the model's native size, `batch_size` requests per UNet call."""
    width, height = model.native_size
    pipeline = Pipeline(model)
    images: list[np.ndarray] = []
    for start in range(0, len(cases), batch_size):
        requests = [
            (
                i,
                Generation(
                    prompt=c.prompt,
                    width=width,
                    height=height,
                    steps=steps,
                    guidance_scale=guidance_scale,
                    seed=c.seed,
                ),
            )
            for i, c in enumerate(cases[start : start + batch_size])
        ]
        active = [image for group in pipeline.start(requests) for image in group]
        while not active[0].done:
            pipeline.step(active)
        images.extend(pipeline.decode(active))
    return images


def score(cases: Sequence[Case], detections: Sequence[Detection | None]) -> dict[str, float]:
    """Per-attribute accuracy of `detections` against `cases` (a missing shape is wrong on all)."""
    hits = {name: 0 for name in (*ATTRIBUTES, "all_three", "all_four", "background", "detected")}
    for case, found in zip(cases, detections, strict=True):
        if found is None:
            continue
        right = {name: getattr(found, name) == getattr(case, name) for name in ATTRIBUTES}
        hits["detected"] += 1
        hits["all_three"] += all(right.values())
        hits["all_four"] += all(right.values()) and found.background == case.background
        hits["background"] += found.background == case.background
        for name in ATTRIBUTES:
            hits[name] += right[name]
    return {name: count / max(len(cases), 1) for name, count in hits.items()}


def evaluate(
    model: StableDiffusion, cases: Sequence[Case], steps: int, guidance_scale: float, name: str = ""
) -> Scores:
    """Generate every case's image and score what the checker reads in it."""
    start = time.perf_counter()
    images = generate_images(model, cases, steps, guidance_scale)
    seconds = (time.perf_counter() - start) / max(len(cases), 1)
    accuracy = score(cases, [detect(image) for image in images])
    return Scores(
        name=name,
        guidance_scale=guidance_scale,
        steps=steps,
        count=len(cases),
        seconds_per_image=seconds,
        **accuracy,
    )


def format_table(rows: Sequence[Scores]) -> str:
    """A Markdown table of scores, one row per evaluation set and guidance scale."""
    lines = [
        "| set | guidance | steps | images | colour | position | shape | background | all four | shape found | s/image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.guidance_scale:g} | {r.steps} | {r.count} | {r.colour:.1%} | {r.position:.1%} | "
            f"{r.shape:.1%} | {r.background:.1%} | {r.all_four:.1%} | {r.detected:.1%} | "
            f"{r.seconds_per_image:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/embedded_model"))
    parser.add_argument("--per-triple", type=int, default=4, help="cases per held-out triple (24 triples)")
    parser.add_argument(
        "--set",
        dest="sets",
        choices=sorted(EVAL_SETS),
        action="append",
        help=f"evaluation set(s); repeatable (default: {', '.join(DEFAULT_SETS)})",
    )
    parser.add_argument("--steps", type=int, help="default: the model's defaults.json, else 50")
    parser.add_argument("--guidance", type=float, action="append", help="guidance scale(s); repeatable")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    steps = args.steps or int(model.recommended.get("steps", DEFAULT_STEPS))
    scales = args.guidance or [float(model.recommended.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)), 1.0]
    rows = []
    for name in args.sets or DEFAULT_SETS:
        cases = set_cases(name, args.per_triple)
        rows.extend(evaluate(model, cases, steps, scale, name) for scale in scales)
    sys.stdout.write(format_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
