"""Samplers compared: how close each comes to a converged picture at 5-50 steps, the embedded
model's held-out prompt scores per sampler, and what a sampler's arithmetic adds to a step.

    python bench/samplers.py            # quality and scores: embedded model, random SD 1.5 (~20 min, 1 thread)
    python bench/samplers.py --speed    # time per step: SD 1.5 architecture, 256x256, 2 images with CFG
    python bench/samplers.py --quick    # tiny random model, 3 samplers, 2 step counts, 8 prompts scored

Quality: every sampler (and schedule) generates the same prompts and seeds at each step count, and
its final latent is compared with a reference run of the same prompt and seed: the RMS of the
latent difference and the mean absolute difference of the decoded pixels (levels, 0-255), averaged
over the prompts. Every run of a model shares its UNet calls (rows of different samplers and step
counts in one call, as the worker batches them), so the grid costs about as many calls as its
longest run.

What "converged" means here:
- ddim, euler, dpmpp_2m and uni_pc (any schedule) are deterministic: they integrate the same
  probability-flow ODE from the same initial noise, so as their steps grow they approach one
  picture, if they start at the noisiest training timestep and end at the cleanest. The ODE
  reference is dpmpp_2m with the karras schedule at the reference step count: as diffusers'
  DPMSolverMultistep builds it, it spans the whole training range (sigma at t=999 down to t=0,
  then the clean latent) whatever the step count. A model's own spacing may not: SD 1.5's
  "leading" starts DDIM and Euler at t=981, 951, 801 for 50, 20, 5 steps (dpmpp_2m and uni_pc at
  t=951, 941, 831, and they stop at t=20, 48, 167 before the jump to the clean latent); "trailing"
  (the embedded model's, and sgm_uniform) stops n steps at t=1000/n-1. That part of a run's
  distance is what the model's config gives its users. Three more references at the same step
  count show how converged the reference is: uni_pc karras (another solver), dpmpp_2m exponential
  (another schedule over the whole range) and ddim sgm_uniform (what "many DDIM steps" give: it
  stops at alpha_bar(0), not at the clean latent, where the model's config says so, as SD 1.5's
  set_alpha_to_one false).
- euler_ancestral, dpmpp_2m_sde and lcm draw fresh noise at every step from the image's own
  generator, so runs of different lengths follow different noise: they converge in distribution,
  not to one picture, and not to the ODE's. They are measured against their own run at the
  reference step count (lcm: its longest, 50 steps, so its 50-step row is zero by definition) and
  against the ODE reference; neither distance need go to zero. The "another seed" row (the ODE
  solution of another seed, at 50 steps, against this one's) is the scale of "a different picture".
- A random model's pictures mean nothing: its "quality" is only this convergence.

Scores: the embedded model's held-out prompts (training.evaluate's cases, checker and scoring),
generated with each sampler at 5, 10 and 20 steps.

Speed (--speed): Pipeline.step for a batch per sampler against ddim, the UNet included (its call
timed by a wrapper around the pipeline's UNet), then many more steps with a stand-in for the UNet
(a fixed tensor), whose time outside the UNet call is the sampler's own cost: scaling the input,
guidance, the sampler's step, its noise and the commit. Medians; one torch thread by default (on a
shared machine more threads measure the neighbours).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.default_model import default_model_path  # noqa: E402
from models.loading import (  # noqa: E402
    SINGLE_FILE_CONFIGS,
    TOKENIZER_ASSETS,
    build_model,
    load_model,
    read_component_configs,
)
from models.pipeline import ActiveImage, Pipeline  # noqa: E402
from models.random_model import random_components, random_weights  # noqa: E402
from models.samplers.lcm import ORIGINAL_STEPS_DEFAULT  # noqa: E402
from models.stable_diffusion import StableDiffusion  # noqa: E402
from schemas.generation import STEPS_MAX, Generation  # noqa: E402
from schemas.samplers import SAMPLERS as SAMPLER_INFO  # noqa: E402
from training.checker import detect  # noqa: E402
from training.evaluate import held_out_cases, score  # noqa: E402

log = logging.getLogger("bench.samplers")

STEPS = (5, 10, 20, 30, 50)
SCORE_STEPS = (5, 10, 20)
REFERENCE_STEPS = {"embedded": 500, "sd15": 100, "tiny": 100}  # a random SD 1.5 row costs ~0.3 s here
MAX_ROWS = 256  # UNet rows per call at most
SPEED_GUIDANCE = 7.5  # the speed part's images are guided: 2 UNet rows each
ANOTHER_SEED = 1000  # the "another seed" reference uses seed + this
SD15_PROMPTS = ("a lighthouse at dusk", "a bowl of ramen on a wooden table", "a red fox in the snow")
EMBEDDED_PROMPTS = (
    "a red circle in the top left on a blue background",
    "yellow square, bottom right, black background",
    "a green triangle in the center on a white background",
    "top right: a purple circle, orange background",
)


@dataclass(frozen=True)
class Variant:
    """A sampler and the schedule it follows."""

    sampler: str
    scheduler: str = "normal"

    @property
    def label(self) -> str:
        return self.sampler if self.scheduler == "normal" else f"{self.sampler} {self.scheduler}"

    @property
    def stochastic(self) -> bool:
        return SAMPLER_INFO[self.sampler].stochastic

    @classmethod
    def parse(cls, text: str) -> Variant:
        """NAME or NAME:SCHEDULER, canonical names (schemas/samplers.py)."""
        sampler, _, scheduler = text.partition(":")
        if sampler not in SAMPLER_INFO:
            raise argparse.ArgumentTypeError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLER_INFO)}")
        allowed = SAMPLER_INFO[sampler].schedulers
        if (scheduler or "normal") not in allowed:
            raise argparse.ArgumentTypeError(f"{sampler} follows {', '.join(allowed)}, not {scheduler!r}")
        return cls(sampler, scheduler or "normal")


VARIANTS = tuple(
    Variant.parse(v)
    for v in (
        "ddim", "euler", "euler:karras", "euler_ancestral", "dpmpp_2m", "dpmpp_2m:karras",
        "dpmpp_2m_sde", "dpmpp_2m_sde:karras", "uni_pc", "uni_pc:karras", "lcm",
    )
)  # fmt: skip
QUICK_VARIANTS = tuple(Variant.parse(v) for v in ("ddim", "dpmpp_2m:karras", "euler_ancestral"))
QUICK = {  # --quick: every part in seconds (a functional check, not a figure)
    "models": ["tiny"],
    "samplers": list(QUICK_VARIANTS),
    "steps": [2, 4],
    "score_steps": [2, 4],
    "reference_steps": 8,
    "per_triple": 1,
    "score_cases": 8,
    "prompts": 1,
    "random_prompts": 1,
    "speed_size": 64,
    "speed_repeats": 2,
    "stub_steps": 5,
}
ODE_REFERENCES = {  # name -> the variant run at the reference step count; the first is "the" one
    "ODE (dpmpp_2m karras)": Variant("dpmpp_2m", "karras"),
    "uni_pc karras": Variant("uni_pc", "karras"),
    "dpmpp_2m exponential": Variant("dpmpp_2m", "exponential"),
    "ddim sgm_uniform": Variant("ddim", "sgm_uniform"),
}
ODE = next(iter(ODE_REFERENCES))


@dataclass(frozen=True)
class Subject:
    """A model under test and how the quality grid samples it."""

    name: str  # "embedded", "sd15", "tiny"
    title: str
    model: StableDiffusion
    size: int  # pixels a side
    guidance_scale: float
    cases: tuple[tuple[str, int], ...]  # (prompt, seed)
    reference_steps: int


def request(
    variant: Variant, steps: int, prompt: str, seed: int, size: int, guidance: float, num_images: int = 1
) -> Generation:
    """A validated Generation; reference runs may take more steps than a request may (STEPS_MAX)."""
    generation = Generation(
        prompt=prompt,
        num_images=num_images,
        width=size,
        height=size,
        steps=min(steps, STEPS_MAX),
        guidance_scale=guidance,
        seed=seed,
        sampler=variant.sampler,
        scheduler=variant.scheduler,
    )
    return generation.model_copy(update={"steps": steps}) if steps > STEPS_MAX else generation


def longest_run(model: StableDiffusion, variant: Variant, steps: int) -> int:
    """`steps`, or fewer where the sampler refuses more (lcm: its original_inference_steps)."""
    if variant.sampler == "lcm":
        return min(steps, int(model.schedule.option("original_inference_steps", ORIGINAL_STEPS_DEFAULT)))
    return steps


def run_to_end(
    pipeline: Pipeline, requests: Sequence[Generation], max_rows: int = MAX_ROWS
) -> list[ActiveImage]:
    """Every request's one image, stepped together until all are done (at most `max_rows` UNet
    rows per call); the images in the order of `requests`."""
    images = [image for group in pipeline.start(list(enumerate(requests))) for image in group]
    while active := [image for image in images if not image.done]:
        chunk: list[ActiveImage] = []
        rows = 0
        for image in active:
            if chunk and rows + image.rows > max_rows:
                pipeline.step(chunk)
                chunk, rows = [], 0
            chunk.append(image)
            rows += image.rows
        pipeline.step(chunk)
    return images


# --- quality ---------------------------------------------------------------------------------------


def quality(
    subject: Subject, variants: Sequence[Variant], steps: Sequence[int], max_rows: int
) -> dict[str, Any]:
    """Latent RMS and pixel MAE of every variant at every step count against its reference(s),
    the references against the ODE reference; means over the subject's cases."""
    model, r = subject.model, subject.reference_steps
    seed_steps = min(r, max(steps))  # "another seed" is a scale: its own run need not be converged
    jobs: dict[tuple, Generation] = {}  # (case, variant, steps | "own") or (case, reference) -> request
    for c, (prompt, seed) in enumerate(subject.cases):

        def make(variant: Variant, n: int, seed: int = seed, prompt: str = prompt) -> Generation:
            return request(variant, n, prompt, seed, subject.size, subject.guidance_scale)

        for variant in variants:
            for n in steps:
                jobs[(c, variant, n)] = make(variant, longest_run(model, variant, n))
            if variant.stochastic:
                jobs[(c, variant, "own")] = make(variant, longest_run(model, variant, r))
        for name, variant in ODE_REFERENCES.items():
            jobs[(c, name)] = make(variant, r)
        jobs[(c, "another seed")] = make(ODE_REFERENCES[ODE], seed_steps, seed + ANOTHER_SEED)
    unique = list(dict.fromkeys(jobs.values()))  # lcm's 50-step run is its own reference
    start = time.perf_counter()
    pipeline = Pipeline(subject.model)
    images = run_to_end(pipeline, unique, max_rows)
    pixels = pipeline.decode(images)
    seconds = time.perf_counter() - start
    by_request = {
        g: (i.latent.float().cpu(), p.astype(np.float64))
        for g, i, p in zip(unique, images, pixels, strict=True)
    }

    def distance(key: tuple, reference: tuple) -> tuple[float, float]:
        """(latent RMS, pixel MAE) of one run against another."""
        (latent, image), (ref_latent, ref_image) = by_request[jobs[key]], by_request[jobs[reference]]
        return float((latent - ref_latent).pow(2).mean().sqrt()), float(np.abs(image - ref_image).mean())

    def mean_over_cases(what: Callable[[int], tuple[float, float]]) -> dict[str, float]:
        values = np.array([what(c) for c in range(len(subject.cases))])
        return {"latent_rms": float(values[:, 0].mean()), "pixel_mae": float(values[:, 1].mean())}

    def cell(variant: Variant, n: int, against: str) -> dict[str, float]:
        return mean_over_cases(
            lambda c: distance((c, variant, n), (c, variant, "own") if against == "own" else (c, ODE))
        )

    rows = [
        {
            "variant": variant.label,
            "against": f"own {longest_run(model, variant, r)}" if against == "own" else "ODE",
            "cells": {n: cell(variant, n, against) for n in steps},
        }
        for variant in variants
        for against in (("own", "ODE") if variant.stochastic else ("ODE",))
    ]
    references = [
        {"reference": f"{name} {r}", **mean_over_cases(lambda c, name=name: distance((c, name), (c, ODE)))}
        for name in list(ODE_REFERENCES)[1:]
    ]
    references.append(
        {
            "reference": f"another seed (seed + {ANOTHER_SEED}), {ODE_REFERENCES[ODE].label} {seed_steps}",
            **mean_over_cases(lambda c: distance((c, "another seed"), (c, ODE))),
        }
    )
    scale = float(
        np.mean([by_request[jobs[(c, ODE)]][0].pow(2).mean().sqrt() for c in range(len(subject.cases))])
    )
    return {
        "model": subject.name,
        "title": subject.title,
        "reference_steps": r,
        "cases": [list(case) for case in subject.cases],
        "images": len(unique),
        "seconds": seconds,
        "reference_latent_rms": scale,
        "references": references,
        "rows": rows,
    }


def quality_tables(result: dict[str, Any], steps: Sequence[int]) -> str:
    r = result["reference_steps"]
    lines = [
        f"#### {result['title']}",
        "",
        f"{len(result['cases'])} prompt(s), {result['images']} images, {result['seconds']:.0f} s. ODE reference: "
        f"{ODE_REFERENCES[ODE].label}, {r} steps (RMS of its latent: {result['reference_latent_rms']:.3f}).",
        "",
        "| reference | latent RMS vs the ODE reference | pixel MAE (levels) |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {x['reference']} | {x['latent_rms']:.4f} | {x['pixel_mae']:.2f} |" for x in result["references"]
    ]
    for metric, title, digits in (("latent_rms", "latent RMS", 4), ("pixel_mae", "pixel MAE (levels)", 2)):
        lines += ["", f"| sampler | against | {title}: " + " | ".join(f"{n} steps" for n in steps) + " |"]
        lines.append("|---|---|" + "---:|" * len(steps))
        for row in result["rows"]:
            cells = " | ".join(f"{row['cells'][n][metric]:.{digits}f}" for n in steps)
            lines.append(f"| {row['variant']} | {row['against']} | {cells} |")
    return "\n".join(lines)


# --- held-out prompt scores ------------------------------------------------------------------------


def prompt_scores(
    model: StableDiffusion,
    variants: Sequence[Variant],
    steps: Sequence[int],
    per_triple: int,
    max_rows: int,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """training.evaluate's held-out cases generated with every variant at every step count (at the
    model's recommended guidance), scored by its checker."""
    cases = held_out_cases(per_triple)[:limit]
    width, _ = model.native_size
    guidance = float(model.recommended.get("guidance_scale", 7.5))
    grid = [(v, n) for v in variants for n in steps]
    requests = [
        request(v, longest_run(model, v, n), case.prompt, case.seed, width, guidance)
        for v, n in grid
        for case in cases
    ]
    start = time.perf_counter()
    pipeline = Pipeline(model)
    pixels = pipeline.decode(run_to_end(pipeline, requests, max_rows))
    seconds = time.perf_counter() - start
    rows = []
    for k, (variant, n) in enumerate(grid):
        detections = [detect(image) for image in pixels[k * len(cases) : (k + 1) * len(cases)]]
        rows.append({"variant": variant.label, "steps": n, "images": len(cases), "guidance_scale": guidance,
                     "seconds": seconds, **score(cases, detections)})  # fmt: skip
    return rows


def scores_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"#### Embedded model, held-out prompts ({rows[0]['images']} per row, guidance {rows[0]['guidance_scale']:g}; "
        f"{rows[0]['seconds']:.0f} s)",
        "",
        "| sampler | steps | colour | shape | position | background | all three |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for x in rows:
        lines.append(
            f"| {x['variant']} | {x['steps']} | {x['colour']:.0%} | {x['shape']:.0%} | {x['position']:.0%} | "
            f"{x['background']:.0%} | {x['all_three']:.0%} |"
        )
    return "\n".join(lines)


# --- speed -----------------------------------------------------------------------------------------


class TimedCall:
    """Stands in for the pipeline's UNet: calls `call` and records each call's wall time."""

    def __init__(self, call: Callable[..., torch.Tensor]) -> None:
        self.call = call
        self.seconds: list[float] = []

    def __call__(self, *args: Any) -> torch.Tensor:
        start = time.perf_counter()
        output = self.call(*args)
        self.seconds.append(time.perf_counter() - start)
        return output


class FixedOutput:
    """A UNet stand-in: the same seeded tensor of the UNet's output shape at every call."""

    def __init__(self, out_channels: int) -> None:
        self.out_channels = out_channels
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, sample: torch.Tensor, *_: Any) -> torch.Tensor:
        shape = (sample.shape[0], self.out_channels, *sample.shape[2:])
        if shape not in self.cache:
            self.cache[shape] = 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
        return self.cache[shape].clone()


def timed_step(pipeline: Pipeline, timer: TimedCall, images: list[ActiveImage]) -> tuple[float, float]:
    """(seconds of one Pipeline.step, seconds of its UNet call)."""
    start = time.perf_counter()
    pipeline.step(images)
    return time.perf_counter() - start, timer.seconds[-1]


def speed(model: StableDiffusion, variants: Sequence[Variant], size: int, images: int, guidance: float,
          repeats: int, stub_steps: int, warm_steps: int = 3) -> list[dict[str, Any]]:  # fmt: skip
    """Per variant, `images` images of one request: `warm_steps` steps with the stand-in (so multistep
    histories are full), then `repeats` steps with the UNet (interleaved across variants, so load
    drifts fall on all alike), then `stub_steps` steps with the stand-in."""
    plan_steps = 50
    if warm_steps + repeats + stub_steps > plan_steps:
        raise ValueError(f"warm_steps + repeats + stub_steps must be at most {plan_steps}")
    real, stub = TimedCall(model.unet), TimedCall(FixedOutput(model.unet.config.out_channels))
    with_unet, without = Pipeline(model, unet_runner=real), Pipeline(model, unet_runner=stub)
    batches = {}
    for v in variants:
        generation = request(v, plan_steps, SD15_PROMPTS[0], 1, size, guidance, num_images=images)
        (batches[v],) = with_unet.start([(v, generation)])
        for _ in range(warm_steps):
            without.step(batches[v])
    timed_step(with_unet, real, batches[variants[0]])  # warm-up of the real UNet, not counted
    steps: dict[Variant, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            steps[v].append(timed_step(with_unet, real, batches[v]))
    results = []
    for v in variants:
        alone = [timed_step(without, stub, batches[v]) for _ in range(stub_steps)]
        results.append({
            "variant": v.label,
            "step_s": statistics.median(t for t, _ in steps[v]),
            "unet_s": statistics.median(u for _, u in steps[v]),
            "outside_unet_s": statistics.median(t - u for t, u in steps[v]),
            "outside_unet_stub_s": statistics.median(t - u for t, u in alone),
            "rows": batches[v][0].rows * images,
        })  # fmt: skip
    base = results[0]
    for x in results:
        x["step_vs_first"] = x["step_s"] / base["step_s"]
        x["added_vs_first"] = (x["outside_unet_stub_s"] - base["outside_unet_stub_s"]) / base["step_s"]
    return results


def speed_table(rows: Sequence[dict[str, Any]], title: str) -> str:
    first = rows[0]["variant"]
    lines = [
        f"#### {title}",
        "",
        f"| sampler | Pipeline.step s | UNet call s | outside the UNet ms | outside, stand-in UNet ms | "
        f"step / {first}'s | added vs {first}, % of its step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for x in rows:
        lines.append(
            f"| {x['variant']} | {x['step_s']:.3f} | {x['unet_s']:.3f} | {1e3 * x['outside_unet_s']:.2f} | "
            f"{1e3 * x['outside_unet_stub_s']:.2f} | {x['step_vs_first']:.3f} | {100 * x['added_vs_first']:+.3f} |"
        )
    return "\n".join(lines)


# --- models and command line -----------------------------------------------------------------------


def build_random(name: str) -> StableDiffusion:
    """The SD 1.5 architecture (its real configs) or the tiny test config, seeded random weights."""
    if name == "sd15":
        configs = read_component_configs(SINGLE_FILE_CONFIGS["sd1"])
        weights = random_weights(configs, seed=0)
    else:
        configs, weights = random_components("sd1", seed=0)
    return build_model(f"random-{name}", configs, weights, TOKENIZER_ASSETS).eval()


def subject(name: str, model: StableDiffusion, args: argparse.Namespace) -> Subject:
    reference_steps = args.reference_steps or REFERENCE_STEPS[name]
    if name == "embedded":
        cases = tuple((p, seed) for seed, p in enumerate(EMBEDDED_PROMPTS[: args.prompts], start=1))
        guidance = float(model.recommended.get("guidance_scale", 7.5))
        title = f"Embedded model: 64x64, v-prediction, zero terminal SNR, guidance {guidance:g}"
        return Subject(name, title, model, model.native_size[0], guidance, cases, reference_steps)
    cases = tuple((p, seed) for seed, p in enumerate(SD15_PROMPTS[: args.random_prompts], start=1))
    what = "SD 1.5 architecture (860M-parameter UNet)" if name == "sd15" else "tiny SD1 config"
    title = (f"Random {what}, seeded random weights: {args.random_size}x{args.random_size}, epsilon, "
             f"leading spacing, guidance {args.random_guidance:g}")  # fmt: skip
    return Subject(name, title, model, args.random_size, args.random_guidance, cases, reference_steps)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/samplers.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Prints Markdown tables (each as soon as it is measured); --json keeps every figure.",
    )
    add = parser.add_argument
    add(
        "--quick",
        action="store_true",
        help="a functional check in seconds: the tiny random model "
        "(quality, speed) and 8 held-out prompts, 3 samplers, 2 and 4 steps, references at 8",
    )
    add("--speed", action="store_true", help="only the speed part (default: quality and scores)")
    add(
        "--models",
        nargs="+",
        choices=["embedded", "sd15", "tiny"],
        default=["embedded", "sd15"],
        help="models of the quality part (default: embedded sd15)",
    )
    add(
        "--samplers",
        nargs="+",
        type=Variant.parse,
        default=list(VARIANTS),
        metavar="NAME[:SCHEDULER]",
        help=f"default: {' '.join(v.sampler + (':' + v.scheduler if v.scheduler != 'normal' else '') for v in VARIANTS)}",
    )
    add("--steps", nargs="+", type=int, default=list(STEPS), help=f"quality step counts (default: {STEPS})")
    add(
        "--reference-steps",
        type=int,
        help=f"steps of the reference runs (default per model: {REFERENCE_STEPS})",
    )
    add("--prompts", type=int, default=4, help="embedded model's prompts, seeds 1..N (default 4)")
    add("--random-prompts", type=int, default=1, help="random model's prompts, seeds 1..N (default 1)")
    add("--random-size", type=int, default=64, help="random model's pixels a side (default 64)")
    add(
        "--random-guidance",
        type=float,
        default=1.0,
        help="random model's guidance (default 1: no unconditional pass, half the UNet rows)",
    )
    add(
        "--score-steps",
        nargs="+",
        type=int,
        default=list(SCORE_STEPS),
        help=f"held-out scores' step counts (default: {SCORE_STEPS})",
    )
    add(
        "--per-triple",
        type=int,
        default=1,
        help="held-out cases per triple, 24 triples (default 1; 0: no scores)",
    )
    add("--score-cases", type=int, help="only the first N held-out cases")
    add("--speed-size", type=int, default=256, help="speed part's pixels a side (default 256)")
    add("--speed-images", type=int, default=2, help="speed part's images, guided (default 2: 4 UNet rows)")
    add("--speed-repeats", type=int, default=3, help="steps with the UNet per sampler (default 3)")
    add("--stub-steps", type=int, default=30, help="steps with the stand-in UNet per sampler (default 30)")
    add("--max-rows", type=int, default=MAX_ROWS, help=f"UNet rows per call at most (default {MAX_ROWS})")
    add("--threads", type=int, default=1, help="torch threads (default 1)")
    add("--json", type=Path, help="also write every figure here")
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)  # explicit options still win
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began, began_cpu = time.perf_counter(), time.process_time()
    command = "python bench/samplers.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def out(text: str) -> None:  # each table as soon as it is measured
        sys.stdout.write(text + "\n\n")
        sys.stdout.flush()

    out(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, {args.threads} thread(s); `{command.strip()}`"
    )
    results: dict[str, Any] = {"command": command.strip(), "threads": args.threads}
    models: dict[str, StableDiffusion] = {}

    def model(name: str) -> StableDiffusion:
        if name not in models:
            log.info("building the %s model", name)
            models[name] = load_model(default_model_path()) if name == "embedded" else build_random(name)
        return models[name]

    if not args.speed or args.quick:
        for name in args.models:
            log.info("quality: %s", name)
            result = quality(subject(name, model(name), args), args.samplers, args.steps, args.max_rows)
            results.setdefault("quality", []).append(result)
            out(quality_tables(result, args.steps))
        if args.per_triple:
            log.info("held-out prompt scores")
            rows = prompt_scores(
                model("embedded"),
                args.samplers,
                args.score_steps,
                args.per_triple,
                args.max_rows,
                args.score_cases,
            )
            results["scores"] = rows
            out(scores_table(rows))
    if args.speed or args.quick:
        name = "tiny" if args.quick else "sd15"
        variants = list(dict.fromkeys([Variant("ddim"), *(Variant(v.sampler) for v in args.samplers)]))
        log.info("speed: %s, %d samplers", name, len(variants))
        rows = speed(
            model(name),
            variants,
            args.speed_size,
            args.speed_images,
            SPEED_GUIDANCE,
            args.speed_repeats,
            args.stub_steps,
        )
        results["speed"] = rows
        title = (f"Speed: random {name}, {args.speed_size}x{args.speed_size}, {args.speed_images} images with CFG "
                 f"({rows[0]['rows']} UNet rows), medians of {args.speed_repeats} steps with the UNet and "
                 f"{args.stub_steps} with a stand-in")  # fmt: skip
        out(speed_table(rows, title))
    results["seconds"], results["cpu_seconds"] = time.perf_counter() - began, time.process_time() - began_cpu
    out(f"Whole run: {results['seconds']:.0f} s ({results['cpu_seconds']:.0f} s of CPU time).")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
