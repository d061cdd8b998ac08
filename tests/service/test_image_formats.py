"""Output formats through a real API process and a real worker (tiny model): the same seed as PNG, JPEG
and WebP, served with the right content type under the right extension, the A1111 parameters read back
from the EXIF UserComment; the OpenAI route's `output_format`."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import ExifTags, Image

from models.image_files import UNICODE_PREFIX, read_parameters
from tests.support.redis_server import RedisServer
from tests.support.service_stack import ServiceStack

PROMPT = "a red circle in the top left on a blue background"
JOB = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 2, "seed": 21}


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, random_models: dict[str, Path]) -> Iterator[ServiceStack]:
    if redis_server.proc is None:
        redis_server.start()
    with ServiceStack(redis_server.url, random_models["sd1"]) as stack:
        yield stack


@pytest.fixture
def client(stack: ServiceStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def run(client: httpx.Client, **fields: object) -> dict:
    answer = client.post("/v1/txt2img", json={**JOB, **fields})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            assert job["status"] == "succeeded", job
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_jpeg_and_webp_as_asked_with_their_parameters(client: httpx.Client) -> None:
    png_job = run(client)
    reference = client.get(png_job["images"][0]["url"])
    assert reference.headers["content-type"] == "image/png"
    expected = pixels(reference.content)

    # the tiny random model draws noise, the worst case for lossy codecs: pixel for pixel only JPEG at
    # 100 (4:4:4) stays close; WebP (always 4:2:0) keeps the size and the mean colour
    for image_format, compression, media_type, max_mean_error in (
        ("jpeg", 100, "image/jpeg", 1.5),
        ("webp", 80, "image/webp", None),
    ):
        job = run(client, output_format=image_format, output_compression=compression)
        assert job["request"]["output_format"] == image_format
        assert job["request"]["output_compression"] == compression
        url = job["images"][0]["url"]
        assert url == f"/v1/jobs/{job['id']}/images/0.{image_format}"
        answer = client.get(url)
        assert answer.status_code == 200 and answer.headers["content-type"] == media_type
        with Image.open(io.BytesIO(answer.content)) as image:
            assert image.format == image_format.upper() and image.size == (64, 64)
            comment = image.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
        assert comment.startswith(UNICODE_PREFIX)  # as AUTOMATIC1111 writes it
        text = read_parameters(answer.content)
        assert text == read_parameters(reference.content)  # the same parameters as the PNG's chunk
        assert PROMPT in text and "Seed: 21" in text and "Size: 64x64" in text
        decoded = pixels(answer.content)
        error = np.abs(decoded - expected)
        if max_mean_error is not None:
            assert error.mean() <= max_mean_error and error.max() <= 8, (
                image_format,
                error.mean(),
                error.max(),
            )
        assert np.abs(decoded.mean(axis=(0, 1)) - expected.mean(axis=(0, 1))).max() <= 2  # mean colour

        wrong = client.get(url.replace(f".{image_format}", ".png"))
        assert wrong.status_code == 404
        assert f"is a {image_format} file: its URL ends in 0.{image_format}" in wrong.json()["detail"]


def test_compression_needs_a_lossy_format(client: httpx.Client) -> None:
    for body, words in (
        ({"output_compression": 50}, "applies to output_format jpeg or webp"),
        ({"output_format": "gif"}, "'png', 'jpeg' or 'webp'"),
        ({"output_format": "jpeg", "output_compression": 101}, "less than or equal to 100"),
    ):
        answer = client.post("/v1/txt2img", json={**JOB, **body})
        assert answer.status_code == 422, answer.text
        assert words in answer.json()["detail"][0]["msg"]


def test_openai_route_with_output_format_jpeg(stack: ServiceStack) -> None:
    with OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60) as openai:
        result = openai.images.generate(
            prompt=PROMPT,
            size="64x64",
            response_format="b64_json",
            output_format="jpeg",
            output_compression=90,
            extra_body={"steps": 2, "seed": 5},
        )
        data = base64.b64decode(result.data[0].b64_json)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
        assert "Seed: 5" in read_parameters(data)

        linked = openai.images.generate(
            prompt=PROMPT, size="64x64", output_format="webp", extra_body={"steps": 2, "seed": 6}
        )
        url = linked.data[0].url
        assert url.startswith(stack.url) and url.endswith("/images/0.webp")
        assert httpx.get(url).headers["content-type"] == "image/webp"

        with pytest.raises(Exception, match="output_compression") as refused:
            openai.images.generate(
                prompt=PROMPT, size="64x64", output_compression=50, extra_body={"steps": 2}
            )
        assert getattr(refused.value, "status_code", None) == 400
