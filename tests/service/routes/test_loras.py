"""GET /v1/loras and the `loras` field / <lora:...> prompt tags on a real API process, with the LoRA
listing a worker publishes in its heartbeat."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.api import client_for, module_api, publish_worker
from tests.support.api_process import ApiProcess
from tests.support.redis_server import RedisServer

LISTING = [
    {"name": "add_detail", "family": "sd", "context_dim": 768, "format": "kohya", "rank": 8,
     "size_bytes": 1000, "layers": {"unet": 10, "text_encoder": 4}},
    {"name": "xl style", "family": "sdxl", "context_dim": 2048, "format": "peft", "rank": 16,
     "size_bytes": 2000, "layers": {"unet": 20}, "usable": False,
     "problem": "a LoRA for sdxl; this model is sd"},
]  # fmt: skip


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    yield from module_api(redis_server, SD_MAX_LORAS_PER_REQUEST="2")


@pytest.fixture
def client(api: ApiProcess, rdb) -> Iterator[httpx.Client]:
    publish_worker(rdb, native_width=512, native_height=512, loras=LISTING, max_loras_per_request=4)
    publish_worker(rdb, name="other-0", model="plain-model", native_width=512, native_height=512)
    with client_for(api) as client:
        yield client


def post(client: httpx.Client, **fields: object) -> httpx.Response:
    return client.post("/v1/txt2img", json={"prompt": "a cat", "model": "test-model", **fields})


def rejected_at(response: httpx.Response, loc: list) -> str:
    assert response.status_code == 422, response.text
    errors = [e for e in response.json()["detail"] if e["loc"] == loc]
    assert errors, response.json()
    return errors[0]["msg"]


def test_lists_each_served_models_loras(client: httpx.Client) -> None:
    listed = client.get("/v1/loras").json()["loras"]
    assert [(x["model"], x["name"], x["usable"]) for x in listed] == [
        ("test-model", "add_detail", True),
        ("test-model", "xl style", False),
    ]
    assert listed[0]["rank"] == 8 and listed[0]["layers"] == {"unet": 10, "text_encoder": 4}
    assert client.get("/v1/loras", params={"model": "plain-model"}).json() == {"loras": []}
    schema = client.get("/openapi.json").json()
    assert "/v1/loras" in schema["paths"]
    request = schema["components"]["schemas"]["Txt2ImgRequest"]["properties"]["loras"]
    assert request["maxItems"] == 2  # SD_MAX_LORAS_PER_REQUEST


def test_field_and_prompt_tags_are_accepted_and_resolved(client: httpx.Client) -> None:
    response = post(client, prompt="a cat <lora:add_detail:0.6>, detailed")
    assert response.status_code == 202, response.text
    job = client.get(response.headers["Location"]).json()
    assert job["request"]["prompt"] == "a cat , detailed"  # the tag taken out, as A1111 does
    assert job["request"]["loras"] == [{"name": "add_detail", "weight": 0.6}]
    assert post(client, loras=[{"name": "add_detail", "weight": -1.5}]).status_code == 202


@pytest.mark.parametrize(
    ("fields", "loc", "words"),
    [
        ({"loras": [{"name": "nope"}]}, ["body", "loras", 0, "name"], ("'nope'", "GET /v1/loras")),
        ({"prompt": "a cat <lora:nope:1>"}, ["body", "loras", 0, "name"], ("'nope'", "GET /v1/loras")),
        ({"loras": [{"name": "xl style"}]}, ["body", "loras", 0, "name"], ("sdxl", "this model is sd")),
        ({"loras": [{"name": "../x"}]}, ["body", "loras", 0, "name"], ("pattern",)),
        ({"loras": [{"name": "add_detail", "weight": 4.5}]}, ["body", "loras", 0, "weight"], ("4",)),
        ({"loras": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}, ["body", "loras"], ("at most 2",)),
        ({"prompt": "<lora:a> <lora:b> <lora:add_detail>"}, ["body", "loras"], ("at most 2",)),
        ({"prompt": "x <lora:add_detail> <lora:add_detail:2>"}, ["body", "loras"], ("named twice",)),
        ({"prompt": "x <lora:add_detail:lots>"}, ["body"], ("'lots' is not a number",)),
        ({"model": "plain-model", "loras": [{"name": "add_detail"}]}, ["body", "loras"], ("no LoRAs",)),
    ],
)
def test_bad_loras_are_422_naming_the_problem(
    client: httpx.Client, fields: dict, loc: list, words: tuple[str, ...]
) -> None:
    message = rejected_at(post(client, **fields), loc)
    for word in words:
        assert word in message, message


def test_a1111_lists_usable_loras(client: httpx.Client) -> None:
    listed = client.get("/sdapi/v1/loras").json()
    assert [(x["name"], x["alias"], x["path"]) for x in listed] == [
        ("add_detail", "add_detail", "add_detail.safetensors")
    ]
