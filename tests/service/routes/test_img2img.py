"""POST /v1/img2img against a real API process and a real worker (tiny model, shared by the module): JSON
with base64 images and multipart/form-data give the same pictures, the job is a txt2img job's (progress,
request, PNG parameters), the files wait in Redis under a name with a TTL, never in the job; and every
bad input is a 4xx naming its field, before anything is stored or queued."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from schemas.redis_keys import input_image_key
from tests.support.input_images import box_mask, encoded, init_picture
from tests.support.jobs import fetch, max_pixel_diff, png_pixels
from tests.support.redis_server import RedisServer
from tests.support.service_stack import ServiceStack

MAX_UPLOAD_BYTES = 200_000
MAX_INPUT_PIXELS = 300 * 300
FAST = {"prompt": "a red circle", "steps": 4, "seed": 3, "guidance_scale": 5.0}
INPUTS_PATTERN = input_image_key("*")


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, random_models: dict[str, Path]) -> Iterator[ServiceStack]:
    if redis_server.proc is None:
        redis_server.start()
    with ServiceStack(
        redis_server.url,
        random_models["sd1"],
        api_env={"SD_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES), "SD_MAX_INPUT_PIXELS": str(MAX_INPUT_PIXELS)},
        worker_env={"SD_MODEL_NAME": "tiny-sd1"},
    ) as stack:
        yield stack


@pytest.fixture
def http(stack: ServiceStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        yield client


@pytest.fixture
def rdb(stack: ServiceStack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def finished(http: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            assert job["status"] == "succeeded", job
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end within {timeout_s} s")


def picture(http: httpx.Client, job: dict, index: int = 0) -> tuple[np.ndarray, str]:
    """The job's image `index` as pixels, and its PNG parameters."""
    data = http.get(job["images"][index]["url"]).content
    with Image.open(io.BytesIO(data)) as image:
        text = image.text["parameters"]  # type: ignore[attr-defined]
    return png_pixels(data), text


def test_img2img_as_json_and_as_a_form_give_the_same_picture(http: httpx.Client, rdb: redis.Redis) -> None:
    init = encoded(init_picture(100, 70), "JPEG")  # 100x70: the job is 96x64 (rounded down to 8)
    answer = http.post("/v1/img2img", json={**FAST, "init_image": b64(init), "strength": 0.6})
    assert answer.status_code == 202, answer.text
    assert answer.headers["Location"] == f"/v1/jobs/{answer.json()['id']}"
    form = {name: str(value) for name, value in {**FAST, "strength": 0.6}.items()}
    multipart = http.post("/v1/img2img", data=form, files={"init_image": ("photo.jpg", init, "image/jpeg")})
    assert multipart.status_code == 202, multipart.text

    jobs = [finished(http, response.json()["id"]) for response in (answer, multipart)]
    (pixels, text), (form_pixels, _) = (picture(http, job) for job in jobs)
    # the same input and seed; the two jobs may share a batch or not, and CPU kernels round
    # differently per batch size (1 level seen on an AVX2 machine)
    assert pixels.shape == (64, 96, 3) and max_pixel_diff(pixels, form_pixels) <= 1
    assert "Size: 96x64" in text and "Denoising strength: 0.6" in text and "Mask blur" not in text
    job = jobs[0]
    assert job["progress"] == {"step": 2, "total_steps": 2}  # int(4 * 0.6) steps run
    request = job["request"]
    assert (request["width"], request["height"], request["strength"]) == (96, 64, 0.6)
    # the job names its file; the file waits in Redis with a TTL, the RQ job holds no image
    assert request["init_image"] and request["mask_image"] is None
    key = input_image_key(request["init_image"])
    assert rdb.get(key) == init and 0 < rdb.ttl(key) <= 3600
    assert b64(init)[:64] not in json.dumps(fetch(rdb, job["id"]).kwargs)


def test_an_all_black_mask_gives_the_init_image_back_whatever_the_prompt(http: httpx.Client) -> None:
    """Nothing to repaint: the picture is the init image through the VAE, the prompt changes nothing;
    a box mask repaints."""
    init = encoded(init_picture(64, 64))
    black = encoded(np.zeros((64, 64), dtype=np.uint8))
    files = {"init_image": ("i.png", init), "mask_image": ("m.png", black)}
    fields = {"steps": "4", "seed": "5", "strength": "0.75", "mask_blur": "0"}
    ids = [
        http.post("/v1/img2img", data={**fields, "prompt": prompt}, files=files).json()["id"]
        for prompt in ("a red circle", "a green square")
    ]
    boxed = {"init_image": ("i.png", init), "mask_image": ("m.png", encoded(box_mask(64, 64)))}
    ids.append(
        http.post("/v1/img2img", data={**fields, "prompt": "a green square"}, files=boxed).json()["id"]
    )
    (first, text), (second, _), (inpainted, _) = (picture(http, finished(http, job_id)) for job_id in ids)
    assert max_pixel_diff(first, second) <= 1  # decoded in batches of other sizes
    assert "Denoising strength: 0.75, Mask blur: 0" in text
    # the box was repainted (the tiny model's VAE mixes the whole latent into every pixel: its outside
    # changes too; tests/workers/test_img2img_engine.py compares latents' pictures with runs alone)
    box = box_mask(64, 64) > 0
    assert np.abs(inpainted[box].astype(int) - first[box]).max() > 10


# --- refused before anything is stored or queued -------------------------------------------------------


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


PNG = encoded(init_picture(64, 48))
JPEG = encoded(init_picture(64, 48), "JPEG")
GIF = io.BytesIO()
Image.fromarray(init_picture(8, 8)).save(GIF, format="GIF")
BIG = encoded(np.zeros((301, 300), dtype=np.uint8))  # small file, too many pixels

# (JSON fields beside the prompt, the field named, words of the message)
BAD = [
    ({}, "init_image", "Field required"),
    ({"init_image": "not base64!"}, "init_image", "not valid base64"),
    ({"init_image": b64(b"hello, not an image")}, "init_image", "not a PNG, JPEG or WebP image"),
    ({"init_image": b64(truncated(PNG))}, "init_image", "the PNG file is truncated or corrupt"),
    ({"init_image": b64(truncated(JPEG))}, "init_image", "the JPEG file is truncated or corrupt"),
    ({"init_image": b64(GIF.getvalue())}, "init_image", "a GIF image; PNG, JPEG or WebP are accepted"),
    ({"init_image": b64(BIG)}, "init_image", f"300x301 = 90300 pixels; at most {MAX_INPUT_PIXELS}"),
    (
        {"init_image": b64(PNG), "mask_image": b64(encoded(box_mask(32, 24)))},
        "mask_image",
        "the mask is 32x24, the image 64x48: they must be the same size",
    ),
    ({"init_image": b64(PNG), "mask_image": b64(truncated(PNG))}, "mask_image", "truncated"),
    ({"init_image": b64(PNG), "strength": 1.5}, "strength", "less than or equal to 1"),
    (
        {"init_image": b64(PNG), "steps": 4, "strength": 0.2},
        "strength",
        "at least 1/steps = 0.25 with steps=4",
    ),
    ({"init_image": b64(PNG), "resize_mode": "stretch"}, "resize_mode", "'resize', 'crop' or 'fill'"),
]


@pytest.mark.parametrize(
    ("fields", "field", "words"), BAD, ids=[f"{case[1]}-{i}" for i, case in enumerate(BAD)]
)
def test_bad_inputs_are_a_422_naming_the_field_and_store_nothing(
    http: httpx.Client, rdb: redis.Redis, fields: dict, field: str, words: str
) -> None:
    stored = set(rdb.scan_iter(INPUTS_PATTERN))
    response = http.post("/v1/img2img", json={"prompt": "a cat", **fields})
    assert response.status_code == 422, response.text
    errors = [e for e in response.json()["detail"] if e["loc"] == ["body", field]]
    assert errors and words in errors[0]["msg"], response.json()
    assert set(rdb.scan_iter(INPUTS_PATTERN)) == stored


def test_a_form_is_checked_as_json_is(http: httpx.Client) -> None:
    files = {"init_image": ("i.png", PNG)}
    wrong_type = http.post("/v1/img2img", data={"prompt": "42", "steps": "many"}, files=files)
    assert wrong_type.status_code == 422
    assert [e["loc"] for e in wrong_type.json()["detail"]] == [["body", "steps"]]
    bad_mask = http.post(
        "/v1/img2img", data={"prompt": "a cat"}, files={**files, "mask_image": ("m.gif", GIF.getvalue())}
    )
    assert bad_mask.status_code == 422 and bad_mask.json()["detail"][0]["loc"] == ["body", "mask_image"]
    as_text = http.post("/v1/img2img", files={"prompt": (None, "a cat"), "init_image": (None, b64(PNG))})
    assert as_text.status_code == 422 and "must be a file part" in as_text.text
    urlencoded = http.post("/v1/img2img", data={"prompt": "a cat"})
    assert urlencoded.status_code == 422 and "or multipart/form-data" in urlencoded.text


def test_bodies_over_the_upload_limit_are_413_and_txt2img_takes_no_image(http: httpx.Client) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)  # ~180 kB as PNG
    big = encoded(noise)
    response = http.post("/v1/img2img", json={"prompt": "a cat", "init_image": b64(big)})
    assert response.status_code == 413 and "SD_MAX_UPLOAD_BYTES" in response.json()["detail"]
    form = http.post("/v1/img2img", data={"prompt": "a cat"}, files={"init_image": ("i.png", big + big)})
    assert form.status_code == 413
    # OpenAI's route answers in OpenAI's shape (its clients raise their usual error)
    edits = http.post("/v1/images/edits", data={"prompt": "a cat"}, files={"image": ("i.png", big + big)})
    assert edits.status_code == 413 and edits.headers["x-should-retry"] == "false"
    error = edits.json()["error"]
    assert error["code"] == "request_too_large" and "SD_MAX_UPLOAD_BYTES" in error["message"]
    txt2img = http.post("/v1/txt2img", json={"prompt": "a cat", "init_image": "abc"})
    assert txt2img.status_code == 422 and txt2img.json()["detail"][0]["loc"] == ["body", "init_image"]
