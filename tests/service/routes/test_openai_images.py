"""The OpenAI-compatible routes, driven by OpenAI's own Python package against a real API process and a
real worker (tiny model): images.generate (b64_json and url), OpenAI-style errors raised as the
package's exception classes, models.list, API keys, queue full, the bounded wait, Redis down."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import redis
from openai import OpenAI
from PIL import Image

from tests.support import fake_worker
from tests.support.api_process import ApiProcess
from tests.support.input_images import box_mask, encoded, init_picture
from tests.support.redis_server import RedisServer, free_port
from tests.support.service_stack import ServiceStack

PROMPT = "a red circle in the top left on a blue background"
FAST = {"steps": 2}  # the tiny model, two steps: a job takes a fraction of a second


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, random_models: dict[str, Path]) -> Iterator[ServiceStack]:
    if redis_server.proc is None:
        redis_server.start()
    with ServiceStack(
        redis_server.url, random_models["sd1"], worker_env={"SD_MODEL_NAME": "tiny-sd1"}
    ) as stack:
        yield stack


@pytest.fixture
def client(stack: ServiceStack) -> Iterator[OpenAI]:
    with OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture
def idle_redis_url(redis_server: RedisServer) -> str:
    """Another database of the session's Redis, emptied: no worker takes jobs queued there (a stand-in
    worker's info routes them to the fake model's queue)."""
    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    fake_worker.serve(url)
    return url


def png_of(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()  # decodes the whole file: a truncated PNG fails here
    return image


def test_two_images_as_b64_json(client: OpenAI) -> None:
    result = client.images.generate(
        model="tiny-sd1",
        prompt=PROMPT,
        n=2,
        size="64x64",
        response_format="b64_json",
        user="test-user",
        extra_body={**FAST, "seed": 7, "negative_prompt": "green", "guidance_scale": 5.0},
    )
    assert result.created > 0 and len(result.data) == 2
    for index, image in enumerate(result.data):
        assert image.url is None
        png = png_of(base64.b64decode(image.b64_json))
        assert png.size == (64, 64)
        assert f"Seed: {7 + index}" in png.text["parameters"]
        assert image.model_extra["seed"] == 7 + index


def test_url_answers_point_at_the_png_route(client: OpenAI, stack: ServiceStack) -> None:
    result = client.images.generate(
        prompt=PROMPT, size="96x64", response_format="url", extra_body={**FAST, "seed": 3}
    )
    assert len(result.data) == 1 and result.data[0].b64_json is None
    url = result.data[0].url
    assert url.startswith(stack.url + "/v1/jobs/") and url.endswith("/images/0.png")
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert png_of(answer.content).size == (96, 64)


def test_n_null_means_one_image(client: OpenAI) -> None:
    """OpenAI documents `n` as "integer or null"; its SDK sends null for n=None."""
    result = client.images.generate(
        prompt=PROMPT, n=None, size="64x64", response_format="b64_json", extra_body={**FAST, "seed": 5}
    )
    assert len(result.data) == 1 and png_of(base64.b64decode(result.data[0].b64_json)).size == (64, 64)


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"size": "100x64"}, "size", ["width", "multiple of 8"]),
        ({"size": "64x2048"}, "size", ["height", "1024"]),
        ({"size": "large"}, "size", ["WIDTHxHEIGHT"]),
        ({"n": 9}, "n", ["less than or equal to 8"]),
        ({"n": 0}, "n", ["greater than or equal to 1"]),
        ({"prompt": "   "}, "prompt", ["non-whitespace"]),
        ({"response_format": "jpeg"}, "response_format", ["url", "b64_json"]),
    ],
)
def test_invalid_fields_raise_bad_request(client: OpenAI, fields: dict, param: str, words: list[str]) -> None:
    arguments = {"prompt": PROMPT, **{k: v for k, v in fields.items() if k in ("prompt", "n", "size")}}
    extra = {k: v for k, v in fields.items() if k not in arguments}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**arguments, extra_body={**FAST, **extra})
    error = caught.value
    assert error.status_code == 400
    assert error.body["type"] == "invalid_request_error"
    assert error.body["param"] == param
    for word in words:
        assert word in error.body["message"], error.body


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"steps": 151}, "steps", ["150"]),
        ({"guidance_scale": 31}, "guidance_scale", ["30"]),
        ({"seed": -1}, "seed", ["0"]),
        ({"negative_prompt": 3}, "negative_prompt", ["string"]),
        ({"width": 64}, "width", ["unrecognized"]),
    ],
)
def test_txt2img_rules_apply_to_the_extras(client: OpenAI, extra: dict, param: str, words: list[str]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt=PROMPT, size="64x64", extra_body=extra)
    assert caught.value.body["param"] == param
    for word in words:
        assert word in caught.value.body["message"], caught.value.body


def test_models_lists_the_served_model(client: OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-sd1"]
    model = models.data[0]
    assert model.object == "model" and model.owned_by == "sdserve" and model.created > 0
    assert model.model_extra["native_width"] == 64
    assert client.models.retrieve("tiny-sd1").id == "tiny-sd1"
    assert model.model_extra["workers"] == 1 and "euler" in model.model_extra["samplers"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    assert caught.value.body["code"] == "model_not_found"


def test_a_model_not_served_is_404_model_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-3", prompt=PROMPT, size="64x64", extra_body=FAST)
    body = caught.value.body
    assert (body["code"], body["param"]) == ("model_not_found", "model")
    assert "'dall-e-3' is not served; served: tiny-sd1" in body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="../tiny-sd1", prompt=PROMPT, extra_body=FAST)
    assert caught.value.body["param"] == "model" and "no path characters" in caught.value.body["message"]


def test_api_keys_are_required_when_configured(idle_redis_url: str) -> None:
    with ApiProcess({"REDIS_URL": idle_redis_url, "SD_API_KEYS": "k1,k2"}) as api:
        with OpenAI(base_url=api.url + "/v1", api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as caught:
                client.images.generate(prompt=PROMPT)
            assert caught.value.body["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        missing = httpx.post(api.url + "/v1/images/generations", json={"prompt": PROMPT})
        assert missing.status_code == 401
        assert "missing API key" in missing.json()["error"]["message"]
        with OpenAI(base_url=api.url + "/v1", api_key="k2", max_retries=0) as client:
            assert [m.id for m in client.models.list().data] == ["fake-model"]  # the stand-in


def test_full_queue_is_a_rate_limit_error(idle_redis_url: str) -> None:
    with ApiProcess({"REDIS_URL": idle_redis_url, "SD_MAX_QUEUE_DEPTH": "1"}) as api:
        assert httpx.post(api.url + "/v1/txt2img", json={"prompt": PROMPT}).status_code == 202
        with (
            OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0) as client,
            pytest.raises(openai.RateLimitError) as caught,
        ):
            client.images.generate(prompt=PROMPT)
        assert caught.value.body["code"] == "queue_full"
        assert caught.value.response.headers["retry-after"] == "10"


def test_wait_is_bounded_and_the_late_job_is_canceled(idle_redis_url: str) -> None:
    with ApiProcess({"REDIS_URL": idle_redis_url, "SD_OPENAI_WAIT_S": "0.5"}) as api:
        # the client's default retries are on: the answer tells it not to retry (one job, not three)
        with (
            OpenAI(base_url=api.url + "/v1", api_key="x") as client,
            pytest.raises(openai.APIStatusError) as caught,
        ):
            client.images.generate(prompt=PROMPT)
        assert caught.value.status_code == 504
        assert caught.value.body["code"] == "timeout"
        assert "SD_OPENAI_WAIT_S" in caught.value.body["message"]
        metrics = httpx.get(api.url + "/metrics").text
        assert 'sd_jobs_submitted_total{model="fake-model"} 1.0' in metrics
    with redis.Redis.from_url(idle_redis_url) as db:
        assert db.llen(fake_worker.queue_key()) == 0  # canceled: it no longer waits for a worker


def test_client_hanging_up_cancels_its_job(idle_redis_url: str) -> None:
    with ApiProcess({"REDIS_URL": idle_redis_url}) as api, redis.Redis.from_url(idle_redis_url) as db:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(api.url + "/v1/images/generations", json={"prompt": PROMPT}, timeout=1.0)
        deadline = time.monotonic() + 10
        # the cancel empties the queue a moment before the API logs it: wait for both
        while (
            db.llen(fake_worker.queue_key()) or "hung up" not in api.logs()
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert db.llen(fake_worker.queue_key()) == 0
        assert "hung up" in api.logs()


def test_redis_down_is_503_in_openai_shape() -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    with (
        ApiProcess({"REDIS_URL": dead_redis, "SD_LOG_LEVEL": "ERROR"}) as api,
        OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        with pytest.raises(openai.InternalServerError) as caught:
            client.images.generate(prompt=PROMPT)
        assert caught.value.status_code == 503
        assert caught.value.body["code"] == "service_unavailable"
        with pytest.raises(openai.InternalServerError):
            client.models.list()


# --- POST /v1/images/edits ------------------------------------------------------------------------------


def rgba_png(width: int, height: int, transparent_box: bool) -> bytes:
    """A picture whose alpha is 0 in a box (where to edit, as OpenAI's masks say it), else 255."""
    rgba = np.dstack([init_picture(width, height), np.full((height, width), 255, dtype=np.uint8)])
    if transparent_box:
        rgba[..., 3][box_mask(width, height) > 0] = 0
    return encoded(rgba)


def test_edits_repaint_the_transparent_pixels_of_the_mask(client: OpenAI) -> None:
    image = encoded(init_picture(64, 64))
    answers = [
        client.images.edit(
            image=("image.png", image, "image/png"),
            mask=("mask.png", rgba_png(64, 64, transparent_box=box), "image/png"),
            prompt=PROMPT,
            response_format="b64_json",
            extra_body={**FAST, "seed": 11, "strength": 1.0},
        )
        for box in (True, False)
    ]
    edited, untouched = (png_of(base64.b64decode(answer.data[0].b64_json)) for answer in answers)
    assert edited.size == untouched.size == (64, 64)  # size left out: the image's
    assert "Denoising strength: 1, Mask blur: 4" in edited.text["parameters"]
    assert answers[0].data[0].model_extra["seed"] == 11
    # no transparent pixel: nothing to edit; a transparent box: the box is redrawn
    difference = np.abs(np.asarray(edited, dtype=int) - np.asarray(untouched, dtype=int))
    assert difference[box_mask(64, 64) > 0].max() > 10


def test_edit_errors_name_the_file_in_openai_shape(client: OpenAI) -> None:
    image = ("image.png", encoded(init_picture(64, 64)), "image/png")
    cases = [
        ({"mask": ("mask.png", encoded(box_mask(64, 64)), "image/png")}, "mask", "needs an alpha channel"),
        ({"mask": ("mask.png", rgba_png(32, 32, True), "image/png")}, "mask", "the mask is 32x32"),
        ({"image": ("image.png", b"not a picture", "image/png")}, "image", "not a PNG, JPEG or WebP"),
    ]
    for files, param, words in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            client.images.edit(**{"image": image, **files}, prompt=PROMPT, extra_body=FAST)
        assert raised.value.status_code == 400
        error = raised.value.body
        assert error["param"] == param and words in error["message"], error
