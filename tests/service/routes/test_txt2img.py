"""POST /v1/txt2img against a real API process: every bound on both sides, defaults, 202 answer."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from schemas.generation import SEED_MAX
from schemas.redis_keys import WORKERS_ZSET, worker_info_key
from tests.support.api import client_for, module_api, publish_worker
from tests.support.api_process import ApiProcess
from tests.support.redis_server import RedisServer

MAX_PROMPT = 20
MAX_IMAGES = 4
MAX_PIXELS = 512 * 768


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    yield from module_api(
        redis_server,
        SD_MAX_PROMPT_CHARS=str(MAX_PROMPT),
        SD_MAX_NUM_IMAGES=str(MAX_IMAGES),
        SD_MAX_PIXELS=str(MAX_PIXELS),
    )


@pytest.fixture
def client(api: ApiProcess, rdb) -> Iterator[httpx.Client]:
    # a live worker of "test-model" at 512x512, heartbeat 10 s old: a test's own publish_worker
    # ("gpu-0" again, or a newer name) takes over
    publish_worker(rdb, age_s=10, native_width=512, native_height=512)
    with client_for(api) as client:
        yield client


def post(client: httpx.Client, **fields: object) -> httpx.Response:
    return client.post("/v1/txt2img", json={"prompt": "a cat", **fields})


def assert_rejected(response: httpx.Response, field: str, *msg_parts: str) -> None:
    """422 in FastAPI's shape, with an error located at the field and a message naming the bound."""
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    matching = [e for e in errors if e["loc"] == ["body", field]]
    assert matching, f"no error for field {field!r}: {errors}"
    assert set(matching[0]) == {"loc", "msg", "type"}
    for part in msg_parts:
        assert part in matching[0]["msg"], matching[0]


def assert_accepted(response: httpx.Response) -> dict:
    assert response.status_code == 202, response.text
    return response.json()


# (fields, rejected field or None if accepted, words the message must hold)
CASES = [
    # prompt: required, non-blank, at most SD_MAX_PROMPT_CHARS
    ({"prompt": "a"}, None, ()),
    ({"prompt": ""}, "prompt", ("at least 1 character",)),
    ({"prompt": "   "}, "prompt", ("non-whitespace",)),
    ({"prompt": "a" * MAX_PROMPT}, None, ()),
    ({"prompt": "a" * (MAX_PROMPT + 1)}, "prompt", (f"at most {MAX_PROMPT} characters",)),
    ({"prompt": 5}, "prompt", ("valid string",)),
    ({"negative_prompt": "b" * MAX_PROMPT}, None, ()),
    ({"negative_prompt": "b" * (MAX_PROMPT + 1)}, "negative_prompt", (f"at most {MAX_PROMPT} characters",)),
    # width/height: multiples of 8 in [64, 1024], width x height <= MAX_PIXELS
    ({"width": 56, "height": 64}, "width", ("greater than or equal to 64",)),
    ({"width": 64, "height": 64}, None, ()),
    ({"width": 1024, "height": 64}, None, ()),
    ({"width": 1032, "height": 64}, "width", ("less than or equal to 1024",)),
    ({"width": 100, "height": 64}, "width", ("multiple of 8",)),
    ({"width": 64, "height": 56}, "height", ("greater than or equal to 64",)),
    ({"width": 64, "height": 1024}, None, ()),
    ({"width": 64, "height": 1032}, "height", ("less than or equal to 1024",)),
    ({"width": 64, "height": 100}, "height", ("multiple of 8",)),
    ({"width": 512, "height": 768}, None, ()),  # exactly MAX_PIXELS
    ({"width": 520, "height": 768}, "height", (f"at most {MAX_PIXELS} pixels",)),
    ({"width": 1024}, "width", (f"at most {MAX_PIXELS} pixels",)),  # height defaults to 512
    ({"width": "512"}, "width", ("valid integer",)),
    ({"width": 512.0}, None, ()),  # JSON Schema's integer includes 512.0
    ({"width": 512.5}, "width", ("valid integer",)),
    # steps: 1 to 150, integers only
    ({"steps": 0}, "steps", ("greater than or equal to 1",)),
    ({"steps": 1}, None, ()),
    ({"steps": 150}, None, ()),
    ({"steps": 151}, "steps", ("less than or equal to 150",)),
    ({"steps": "5"}, "steps", ("valid integer",)),
    ({"steps": 5.5}, "steps", ("valid integer",)),
    ({"steps": True}, "steps", ("valid integer",)),
    ({"steps": None}, "steps", ("valid integer",)),
    # guidance_scale: 0 to 30
    ({"guidance_scale": -0.1}, "guidance_scale", ("greater than or equal to 0",)),
    ({"guidance_scale": 0}, None, ()),
    ({"guidance_scale": 30}, None, ()),
    ({"guidance_scale": 30.1}, "guidance_scale", ("less than or equal to 30",)),
    ({"guidance_scale": "7.5"}, "guidance_scale", ("valid number",)),
    ({"guidance_scale": True}, "guidance_scale", ("valid number",)),
    # eta: 0 to 1
    ({"eta": -0.01}, "eta", ("greater than or equal to 0",)),
    ({"eta": 0}, None, ()),
    ({"eta": 1}, None, ()),
    ({"eta": 1.01}, "eta", ("less than or equal to 1",)),
    # seed: 0 to 2^32-1 or null
    ({"seed": -1}, "seed", ("greater than or equal to 0",)),
    ({"seed": 0}, None, ()),
    ({"seed": SEED_MAX}, None, ()),
    ({"seed": SEED_MAX + 1}, "seed", (f"less than or equal to {SEED_MAX}",)),
    ({"seed": None}, None, ()),
    # the last image's seed (seed + num_images - 1) must fit in 32 bits too
    ({"seed": SEED_MAX - 2, "num_images": 3}, None, ()),
    ({"seed": SEED_MAX - 1, "num_images": 3}, "seed", (f"at most {SEED_MAX - 2} with num_images=3",)),
    ({"seed": "1"}, "seed", ("valid integer",)),
    ({"seed": 1.5}, "seed", ("valid integer",)),
    ({"seed": 1.0}, None, ()),
    ({"seed": True}, "seed", ("valid integer",)),
    # num_images: 1 to SD_MAX_NUM_IMAGES
    ({"num_images": 0}, "num_images", ("greater than or equal to 1",)),
    ({"num_images": 1}, None, ()),
    ({"num_images": MAX_IMAGES}, None, ()),
    ({"num_images": MAX_IMAGES + 1}, "num_images", (f"less than or equal to {MAX_IMAGES}",)),
    # sampler and scheduler: our names, A1111's names, pairs the sampler supports
    ({"sampler": "euler"}, None, ()),
    ({"sampler": "DPM++ 2M Karras"}, None, ()),
    ({"sampler": "Euler a", "scheduler": "normal"}, None, ()),
    ({"sampler": "heun"}, "sampler", ("unknown sampler 'heun'; valid: ddim, euler",)),
    ({"sampler": 3}, "sampler", ("valid string",)),
    ({"sampler": "ddim", "scheduler": "karras"}, "scheduler", ("it supports: normal, sgm_uniform",)),
    ({"scheduler": "fast"}, "scheduler", ("unknown scheduler 'fast'; valid: normal, karras",)),
    ({"sampler": "DPM++ 2M Karras", "scheduler": "exponential"}, "sampler", ("means sampler dpmpp_2m",)),
    # unknown fields
    ({"sampler_name": "euler"}, "sampler_name", ("Extra inputs are not permitted",)),
]


@pytest.mark.parametrize(("fields", "rejected", "words"), CASES, ids=[json.dumps(c[0])[:60] for c in CASES])
def test_bounds(client: httpx.Client, fields: dict, rejected: str | None, words: tuple[str, ...]) -> None:
    response = post(client, **fields)
    if rejected is None:
        assert_accepted(response)
    else:
        assert_rejected(response, rejected, *words)


def test_missing_prompt_is_named(client: httpx.Client) -> None:
    assert_rejected(client.post("/v1/txt2img", json={"steps": 5}), "prompt", "Field required")


@pytest.mark.parametrize("body", [b"[]", b'"a cat"', b"{", b""])
def test_body_that_is_not_an_object_is_422(client: httpx.Client, body: bytes) -> None:
    response = client.post("/v1/txt2img", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"


def test_accepted_answer_and_resolved_request(client: httpx.Client) -> None:
    response = post(
        client, seed=42, num_images=2, steps=20, guidance_scale=5, eta=0.5, negative_prompt="dull"
    )
    body = assert_accepted(response)
    assert set(body) == {"id", "status", "queue_position"}
    assert body["status"] == "queued"
    assert isinstance(body["queue_position"], int)
    assert response.headers["Location"] == f"/v1/jobs/{body['id']}"
    assert len(body["id"]) == 32 and int(body["id"], 16) >= 0

    job = client.get(response.headers["Location"]).json()
    assert job["request"] == {
        "prompt": "a cat",
        "negative_prompt": "dull",
        "model": "test-model",
        "width": 512,
        "height": 512,
        "steps": 20,
        "guidance_scale": 5.0,
        "eta": 0.5,
        "sampler": "ddim",
        "scheduler": "normal",
        "seed": 42,
        "num_images": 2,
        # every field of the one description of a generation, at its default
        "output_format": "png",
        "output_compression": None,
        "loras": [],
        "original_size": None,
        "crops_coords_top_left": None,
        "target_size": None,
        "init_image": None,
        "mask_image": None,
        "strength": 0.8,
        "mask_blur": 4,
        "resize_mode": "resize",
    }


def test_ids_are_random_and_seed_is_reported(client: httpx.Client) -> None:
    first, second = (assert_accepted(post(client)) for _ in range(2))
    assert first["id"] != second["id"]
    seeds = {client.get(f"/v1/jobs/{job['id']}").json()["request"]["seed"] for job in (first, second)}
    assert all(0 <= seed <= SEED_MAX for seed in seeds)


def test_queue_position_counts_jobs_ahead(client: httpx.Client, rdb) -> None:
    first = assert_accepted(post(client))
    second = assert_accepted(post(client))
    assert second["queue_position"] == first["queue_position"] + 1 == 1


def test_defaults_come_from_the_live_worker(client: httpx.Client, rdb) -> None:
    publish_worker(rdb, native_width=768, native_height=640)  # 491520 px: over MAX_PIXELS, yet trusted
    job = client.get(f"/v1/jobs/{assert_accepted(post(client))['id']}").json()
    assert (job["request"]["width"], job["request"]["height"]) == (768, 640)


def test_steps_and_guidance_default_to_what_the_served_model_recommends(client: httpx.Client, rdb) -> None:
    publish_worker(rdb, default_steps=20, default_guidance_scale=4.0)
    left_out = assert_accepted(client.post("/v1/txt2img", json={"prompt": "a red circle"}))
    job = client.get(f"/v1/jobs/{left_out['id']}").json()
    assert (job["request"]["steps"], job["request"]["guidance_scale"]) == (20, 4.0)
    given = assert_accepted(
        client.post("/v1/txt2img", json={"prompt": "x", "steps": 7, "guidance_scale": 7.5})
    )
    job = client.get(f"/v1/jobs/{given['id']}").json()
    assert (job["request"]["steps"], job["request"]["guidance_scale"]) == (7, 7.5)


def test_api_defaults_when_the_model_recommends_nothing(client: httpx.Client, rdb) -> None:
    publish_worker(rdb)
    job = client.get(
        f"/v1/jobs/{assert_accepted(client.post('/v1/txt2img', json={'prompt': 'x'}))['id']}"
    ).json()
    assert (job["request"]["steps"], job["request"]["guidance_scale"]) == (50, 7.5)  # SD_DEFAULT_*


def test_most_recent_live_worker_wins_and_stale_ones_are_ignored(client: httpx.Client, rdb) -> None:
    publish_worker(rdb, name="old", age_s=5, native_width=256, native_height=256)
    publish_worker(rdb, name="new", age_s=1, native_width=384, native_height=320)
    publish_worker(rdb, name="stale", age_s=3600, native_width=128, native_height=128)
    job = client.get(f"/v1/jobs/{assert_accepted(post(client))['id']}").json()
    assert (job["request"]["width"], job["request"]["height"]) == (384, 320)


def test_no_live_worker_is_503_and_nothing_is_queued(client: httpx.Client, rdb) -> None:
    publish_worker(rdb, age_s=3600, native_width=768, native_height=768)  # stale heartbeat
    for fields, words in (
        ({}, "no model is served now"),
        ({"model": "test-model"}, "'test-model' has no live"),
    ):
        response = post(client, **fields)
        assert response.status_code == 503, response.text
        assert words in response.json()["detail"] and response.headers["retry-after"]
    assert rdb.llen("rq:queue:txt2img:test-model") == 0


def test_model_size_multiple_is_enforced(client: httpx.Client, rdb) -> None:
    publish_worker(rdb, size_multiple=64, native_width=512, native_height=512)
    assert_rejected(post(client, width=520, height=512), "width", "multiple of 64")
    assert_accepted(post(client, width=576, height=512))


def test_malformed_worker_info_is_ignored(client: httpx.Client, rdb) -> None:
    rdb.set(worker_info_key("broken"), b"{not json", ex=30)
    rdb.zadd(WORKERS_ZSET, {"broken": time.time()})
    job = client.get(f"/v1/jobs/{assert_accepted(post(client))['id']}").json()
    assert job["request"]["width"] == 512
