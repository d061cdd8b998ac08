"""`sd-txt2img`: submit a prompt to the service, follow the job, save the images, print their seeds.

    export SD_URL=http://127.0.0.1:8000 SD_API_KEY=...     # both optional
    sd-txt2img "a lighthouse at dusk" --steps 30 --seed 1 -n 2 --out lighthouse.png
    # stderr: queue position, then a bar of steps; stdout: one line per image
    lighthouse-0.png	seed=1
    lighthouse-1.png	seed=2
    sd-txt2img --list-models        # the models served: name, workers, native size, defaults
    sd-txt2img "a lighthouse" --model sdxl-base

Only the options given are sent; the server fills in the rest (the model's native size and
recommended steps, guidance and sampler, ...). The file format follows --out's extension (.png,
.jpg/.jpeg, .webp) unless --output-format says it. The job is followed through its event stream
(GET /v1/jobs/{id}/events, resumed after a dropped connection); where the stream cannot be had (an
older server, a proxy in the way), by polling its status. Exit status: 0 saved, 1 any error (the
server's own message on stderr), 2 bad usage, 130 interrupted (Ctrl-C cancels the job on the server
first).
"""

from __future__ import annotations

import argparse
import contextlib
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
STREAM_READ_TIMEOUT_S = 60.0  # the server sends a keep-alive every SD_EVENTS_KEEPALIVE_S (15 s)
STREAM_RECONNECTS = 3  # a stream that breaks is resumed (Last-Event-ID) this often, then polling takes over
STREAM_RECONNECT_DELAY_S = 0.5  # before resuming a stream that broke
# File extensions and the output format they stand for.
SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
FORMAT_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
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
    parser.add_argument("prompt", nargs="?", help="what to draw")
    parser.add_argument(
        "--model", help="the model to draw with (--list-models names them; default: the server's)"
    )
    parser.add_argument(
        "--list-models", action="store_true", help="list the models the server serves, then exit"
    )
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
        "--init-image",
        type=Path,
        help="img2img: the PNG, JPEG or WebP image to start from (the size defaults to the image's)",
    )
    parser.add_argument(
        "--strength", type=float, help="img2img: the share of the steps run, 0 to 1 (server default 0.8)"
    )
    parser.add_argument(
        "--mask", type=Path, help="inpainting: a mask of the init image's size, white = repaint, black = keep"
    )
    parser.add_argument(
        "--mask-blur", type=int, help="inpainting: blur radius of the mask in pixels (default 4)"
    )
    parser.add_argument(
        "--resize-mode",
        choices=("resize", "crop", "fill"),
        help="how the init image is fitted to --width/--height: resize (stretch, default), crop, fill",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="file path; several images are saved as NAME-0.png, NAME-1.png, ...; its extension (.png, "
        ".jpg, .jpeg, .webp) picks the format unless --output-format does (default image.png)",
    )
    parser.add_argument(
        "--output-format",
        choices=sorted(FORMAT_SUFFIXES),
        help="file format (default: from --out, else png); jpeg and webp keep the parameters in EXIF",
    )
    parser.add_argument(
        "--output-compression",
        type=int,
        help="jpeg/webp quality, 0-100 (server default 100: the best picture, the biggest file)",
    )
    parser.add_argument("--url", help=f"server URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument(
        "--timeout-s",
        type=float,
        help="give up (and cancel the job) after this many seconds (default: never)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.prompt is None and not args.list_models:
        parser.error("the prompt is required (or --list-models)")
    if args.init_image is None:
        given = [f"--{name.replace('_', '-')}" for name in IMAGE_OPTIONS if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)} needs --init-image (the image to start from)")
    try:
        args.output_format, args.out = output_format_and_path(args.output_format, args.out)
    except ValueError as error:
        parser.error(str(error))
    return args


def output_format_and_path(output_format: str | None, out: Path | None) -> tuple[str, Path]:
    """The format (--output-format, else --out's extension, else png) and the path (--out, else
    image; the format's extension added when it has none); ValueError when they disagree."""
    implied = SUFFIX_FORMATS.get(out.suffix.lower()) if out is not None else None
    chosen = output_format or implied or "png"
    if out is None or not out.suffix:
        return chosen, (out or Path("image")).with_suffix(FORMAT_SUFFIXES[chosen])
    if implied is not None and implied != chosen:
        raise ValueError(f"--out {out} is a {implied} file name, but --output-format is {chosen}")
    return chosen, out


# What only an img2img request has (beside --init-image); the files are sent apart.
IMAGE_OPTIONS = ("strength", "mask", "mask_blur", "resize_mode")


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/txt2img body (POST /v1/img2img's fields but the files, with --init-image): the prompt
    and the options given, nothing else."""
    body: dict[str, Any] = {"prompt": args.prompt}
    for name in (
        "model",
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
        "output_compression",
        *(name for name in IMAGE_OPTIONS if name != "mask"),
    ):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if args.output_format != "png":
        body["output_format"] = args.output_format
    return body


def output_paths(out: Path, count: int) -> list[Path]:
    """FILE.png for one image; FILE-0.png, FILE-1.png, ... for several (as `python -m models.txt2img`)."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


class TimedOut(Exception):
    """--timeout-s passed before the job ended."""


def follow(client: ServiceClient, job_id: str, progress: ProgressLine, timeout_s: float | None) -> dict:
    """Follow the job until it ended (its event stream, else polling); its last status document.
    JobEndedBadly unless it succeeded."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        job = listen(client, job_id, progress, deadline)
        if job is None:
            job = poll(client, job_id, progress, deadline)
    except TimedOut:
        progress.done()
        client.cancel(job_id)
        raise JobEndedBadly(
            f"job {job_id}: no result within {timeout_s:g} s (--timeout-s); canceled it"
        ) from None
    progress.done()
    if job["status"] == "failed":
        error = job.get("error") or {}
        raise JobEndedBadly(
            f"job {job_id} failed: {error.get('type', 'JobFailed')}: {error.get('message', 'no message')}"
        )
    if job["status"] == "canceled":
        raise JobEndedBadly(f"job {job_id} was canceled")
    return job


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def listen(client: ServiceClient, job_id: str, progress: ProgressLine, deadline: float | None) -> dict | None:
    """The job's final document from its event stream, resumed after the last event seen when the
    connection drops; None when the stream cannot be had or keeps breaking (then poll). TimedOut
    past `deadline` (noticed within a keep-alive interval when more than a minute was left)."""
    last_id: str | None = None
    failures = 0
    while failures <= STREAM_RECONNECTS:
        left_s = None if deadline is None else deadline - time.monotonic()
        if left_s is not None and left_s <= 0:
            raise TimedOut
        read_timeout_s = STREAM_READ_TIMEOUT_S if left_s is None else min(STREAM_READ_TIMEOUT_S, left_s)
        received = False
        try:
            with contextlib.closing(client.events(job_id, last_id, read_timeout_s)) as events:
                for event in events:
                    received = True
                    if _past(deadline):
                        raise TimedOut
                    if event is None:  # a keep-alive
                        continue
                    last_id = event.id or last_id
                    progress.update(event.data)
                    if event.name in ENDED:
                        return event.data
            # ended before the job did: the server closes long streams (SD_EVENTS_MAX_S), a proxy
            # may cut them; only one that brought nothing counts as a failure
            failures += 0 if received else 1
        except ApiError as error:
            if _past(deadline):
                raise TimedOut from None
            if error.status is not None:  # the server refuses the stream: polling tells why, or works
                log.debug("no event stream (%s): polling", error)
                return None
            log.debug("event stream: %s", error)
            failures += 1
        time.sleep(STREAM_RECONNECT_DELAY_S)  # then resume after the last event seen
    log.info("the event stream of job %s keeps breaking: polling instead", job_id)
    return None


def poll(client: ServiceClient, job_id: str, progress: ProgressLine, deadline: float | None) -> dict:
    """Poll the job's status until it ended: its last status document. TimedOut past `deadline`."""
    while True:
        job = client.job(job_id)
        progress.update(job)
        if job["status"] in ENDED:
            return job
        if _past(deadline):
            raise TimedOut
        time.sleep(POLL_S)


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


def model_lines(models: list[dict[str, Any]]) -> list[str]:
    """One tab-separated line per served model: name, live workers, family, native size, defaults."""
    lines = []
    for model in models:
        defaults = (
            f"steps={model.get('default_steps')} guidance={model.get('default_guidance_scale')} "
            f"sampler={model.get('default_sampler')}"
        )
        size = f"{model.get('native_width')}x{model.get('native_height')}"
        workers = f"workers={model.get('workers', '?')}"
        lines.append("\t".join([model["id"], workers, str(model.get("family", "?")), size, defaults]))
    return lines


def list_models(base_url: str) -> int:
    with ServiceClient(base_url, os.environ.get(KEY_ENV) or None) as client:
        try:
            models = client.models()
        except ApiError as error:
            log.error("%s", error)
            return EXIT_ERROR
    if not models:
        log.error("no model is served at %s now (no live worker)", base_url)
        return EXIT_ERROR
    for line in model_lines(models):
        print(line)
    return 0


def run(args: argparse.Namespace) -> int:
    base_url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    if args.list_models:
        return list_models(base_url)
    progress = ProgressLine(sys.stderr, enabled=not args.quiet)
    job_id = None
    with ServiceClient(base_url, os.environ.get(KEY_ENV) or None) as client:
        try:
            accepted = submit(client, args)
            job_id = accepted["id"]
            log.info("job %s queued at %s", job_id, base_url)
            job = follow(client, job_id, progress, args.timeout_s)
            for warning in job.get("warnings") or []:  # e.g. words the model does not know
                log.warning("warning: %s", warning)
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


def submit(client: ServiceClient, args: argparse.Namespace) -> dict[str, Any]:
    """POST /v1/txt2img, or /v1/img2img with --init-image (and --mask); ApiError if a file cannot be read."""
    if args.init_image is None:
        return client.submit(request_body(args))
    files = []
    for option, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        try:
            files.append(path.read_bytes() if path is not None else None)
        except OSError as error:
            raise ApiError(f"{option}: cannot read {path}: {error.strerror or error}") from None
    return client.submit_img2img(request_body(args), *files)


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
