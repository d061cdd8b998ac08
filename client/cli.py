"""`sd-txt2img`: submit a prompt to the service, follow the job, save the PNGs, print their seeds.

    export SD_URL=http://127.0.0.1:8000 SD_API_KEY=...     # both optional
    sd-txt2img "a lighthouse at dusk" --steps 30 --seed 1 -n 2 --out lighthouse.png
    # stderr: queue position, then a bar of steps; stdout: one line per PNG
    lighthouse-0.png	seed=1
    lighthouse-1.png	seed=2

Only the options given are sent; the server fills in the rest (the model's native size and
recommended steps, guidance and sampler, ...). Exit status: 0 saved, 1 any error (the server's own message on stderr), 2 bad
usage, 130 interrupted (Ctrl-C cancels the job on the server first).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from client.api import ApiError, ServiceClient
from client.progress import ProgressLine

log = logging.getLogger("sd-txt2img")

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "SD_URL"
KEY_ENV = "SD_API_KEY"
POLL_S = 0.2
ENDED = frozenset({"succeeded", "failed", "canceled"})
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class JobEndedBadly(Exception):
    """The job failed, was canceled, or took too long: the message says which and why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sd-txt2img",
        description="Generate images with the Stable Diffusion service and save them as PNGs.",
        epilog=f"Environment: {URL_ENV} (server, default {DEFAULT_URL}), {KEY_ENV} (API key, if the server "
        "needs one). Options left out take the server's defaults.",
    )
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--negative-prompt", help="what to steer away from")
    parser.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's)")
    parser.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's)")
    parser.add_argument(
        "--steps", type=int, help="denoising steps (server default: the model's recommendation)"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        help="classifier-free guidance (server default: the model's recommendation)",
    )
    parser.add_argument(
        "--sampler",
        help="e.g. ddim, euler, euler_ancestral, dpmpp_2m, uni_pc, lcm, or AUTOMATIC1111's names (\"DPM++ 2M "
        'Karras", "Euler a"); GET /v1/samplers lists them (server default: the model\'s recommendation)',
    )
    parser.add_argument(
        "--scheduler", help="normal, karras, exponential or sgm_uniform (server default: normal)"
    )
    parser.add_argument("--eta", type=float, help="DDIM eta, 0 to 1 (other samplers ignore it)")
    parser.add_argument("--seed", type=int, help="image i uses seed + i (default: random, printed)")
    parser.add_argument("-n", "--num-images", type=int, help="images to generate (default 1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("image.png"),
        help="PNG path; several images are saved as NAME-0.png, NAME-1.png, ... (default image.png)",
    )
    parser.add_argument("--url", help=f"server URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument(
        "--timeout-s",
        type=float,
        help="give up (and cancel the job) after this many seconds (default: never)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/txt2img body: the prompt and the options given, nothing else."""
    body: dict[str, Any] = {"prompt": args.prompt}
    for name in (
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "sampler",
        "scheduler",
        "eta",
        "seed",
        "num_images",
    ):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    return body


def output_paths(out: Path, count: int) -> list[Path]:
    """FILE.png for one image; FILE-0.png, FILE-1.png, ... for several (as `python -m models.txt2img`)."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


def follow(client: ServiceClient, job_id: str, progress: ProgressLine, timeout_s: float | None) -> dict:
    """Poll the job until it ended; its last status document. JobEndedBadly unless it succeeded."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        job = client.job(job_id)
        progress.update(job)
        if job["status"] in ENDED:
            break
        if deadline is not None and time.monotonic() > deadline:
            progress.done()
            client.cancel(job_id)
            raise JobEndedBadly(f"job {job_id}: no result within {timeout_s:g} s (--timeout-s); canceled it")
        time.sleep(POLL_S)
    progress.done()
    if job["status"] == "failed":
        error = job.get("error") or {}
        raise JobEndedBadly(
            f"job {job_id} failed: {error.get('type', 'JobFailed')}: {error.get('message', 'no message')}"
        )
    if job["status"] == "canceled":
        raise JobEndedBadly(f"job {job_id} was canceled")
    return job


def save_images(client: ServiceClient, job: dict, out: Path) -> list[tuple[Path, int]]:
    images = sorted(job["images"], key=lambda image: image["index"])
    paths = output_paths(out, len(images))
    saved = []
    for image, path in zip(images, paths, strict=True):
        data = client.download(image["url"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        saved.append((path, image["seed"]))
    return saved


def run(args: argparse.Namespace) -> int:
    base_url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    progress = ProgressLine(sys.stderr, enabled=not args.quiet)
    job_id = None
    with ServiceClient(base_url, os.environ.get(KEY_ENV) or None) as client:
        try:
            accepted = client.submit(request_body(args))
            job_id = accepted["id"]
            log.info("job %s queued at %s", job_id, base_url)
            job = follow(client, job_id, progress, args.timeout_s)
            for path, seed in save_images(client, job, args.out):
                print(f"{path}\tseed={seed}")  # the results: stdout, one line per image
        except (ApiError, JobEndedBadly) as error:
            progress.done()
            log.error("%s", error)
            return EXIT_ERROR
        except KeyboardInterrupt:
            progress.done()
            if job_id is not None:
                _cancel_quietly(client, job_id)
            return EXIT_INTERRUPTED
    return 0


def _cancel_quietly(client: ServiceClient, job_id: str) -> None:
    try:
        client.cancel(job_id)
        log.warning("interrupted: canceled job %s", job_id)
    except ApiError as error:
        log.warning("interrupted: could not cancel job %s: %s", job_id, error)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="sd-txt2img: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
