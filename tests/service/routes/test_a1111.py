"""AUTOMATIC1111's routes (/sdapi/v1), driven by the real `webuiapi` client and by request bodies shaped
exactly as Open WebUI and SillyTavern send them, against a real API process and a real worker (tiny
model, shared by the module); the answers that need no pictures (a failed job, a full queue, no result
in time) against an API whose jobs a stand-in worker runs (tests/support/fake_worker.py)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import webuiapi
from PIL import Image

from schemas.redis_keys import WORKERS_ZSET, a1111_model_key, worker_info_key
from schemas.worker_info import WorkerInfo
from service.a1111_models import Txt2ImgRequest, sampler_items, scheduler_items, to_txt2img
from service.auth import owner_of
from service.settings import load_settings
from tests.support import fake_worker
from tests.support.api_process import ApiProcess
from tests.support.input_images import box_mask, encoded, init_picture
from tests.support.redis_server import RedisServer
from tests.support.service_stack import ServiceStack

KEY_A, KEY_B = "a1111-key-a", "a1111-key-b"
MODEL = "tiny-sd1"
PROMPT = "a red circle in the top left on a blue background"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMALL = {"width": 64, "height": 64, "steps": 2}


def basic(key: str, user: str = "someone") -> dict[str, str]:
    """HTTP Basic auth as A1111's clients send it: the API key as password, any user name."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def png_of(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    image.load()  # decodes the whole file: a truncated PNG fails here
    return image


def refused_at(response: httpx.Response) -> list[list]:
    assert response.status_code == 422, response.text
    return [issue["loc"] for issue in response.json()["detail"]]


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, random_models: dict[str, Path]) -> Iterator[ServiceStack]:
    if redis_server.proc is None:
        redis_server.start()
    with ServiceStack(
        redis_server.url,
        random_models["sd1"],
        api_env={"SD_API_KEYS": f"{KEY_A},{KEY_B}"},
        worker_env={"SD_MODEL_NAME": MODEL},
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def webui(stack: ServiceStack) -> webuiapi.WebUIApi:
    """The `webuiapi` client as its README shows it, with key A as its Basic auth password."""
    return webuiapi.WebUIApi(host="127.0.0.1", port=stack.api.port, username="webuiapi", password=KEY_A)


@pytest.fixture
def http(stack: ServiceStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url + "/sdapi/v1", headers=basic(KEY_A), timeout=60) as client:
        yield client


# --- the webuiapi package ---------------------------------------------------------------------------


def test_webuiapi_txt2img_returns_real_pngs_with_their_seeds(webui: webuiapi.WebUIApi) -> None:
    # webuiapi's own defaults ride along: Euler a, eta 1, denoising_strength 0.7 and the hires. fix
    # settings with enable_hr false, s_tmax 0, subseed -1, empty scripts, save_images false...
    result = webui.txt2img(prompt=PROMPT, negative_prompt="green", seed=7, batch_size=2, cfg_scale=5, **SMALL)

    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    texts = [image.text["parameters"] for image in result.images]  # type: ignore[attr-defined]
    assert "Seed: 7," in texts[0] and "Seed: 8," in texts[1]
    assert texts[0].startswith(f"{PROMPT}\nNegative prompt: green\nSteps: 2, Sampler: Euler a, CFG scale: 5")
    info = result.info
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8]
    assert info["infotexts"] == texts
    assert info["all_prompts"] == [PROMPT, PROMPT] and info["negative_prompt"] == "green"
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 2, 5)
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == MODEL
    assert info["index_of_first_image"] == 0 and len(info["job_timestamp"]) == 14
    assert result.parameters["seed"] == 7 and result.parameters["prompt"] == PROMPT


def test_webuiapi_reads_what_the_server_offers(webui: webuiapi.WebUIApi) -> None:
    samplers = {item["name"]: item for item in webui.get_samplers()}
    assert {"DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "UniPC", "LCM"} <= set(samplers)
    assert "k_dpmpp_2m" in samplers["DPM++ 2M"]["aliases"]
    assert samplers["DPM++ 2M"]["options"]["scheduler"] == "karras"  # what its "Automatic" means
    assert {"automatic", "uniform", "karras", "exponential", "sgm_uniform"} == set(
        webui.util_get_scheduler_names()
    )
    models = webui.get_sd_models()
    assert [(m["title"], m["model_name"]) for m in models] == [(MODEL, MODEL)]
    assert webui.util_get_current_model() == MODEL
    assert webui.get_options()["CLIP_stop_at_last_layers"] == 1
    for listing in (webui.get_upscalers, webui.get_latent_upscale_modes, webui.get_sd_vae,
                    webui.get_hypernetworks, webui.get_face_restorers, webui.get_prompt_styles):  # fmt: skip
        assert listing() == []
    assert webui.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert webui.get_scripts() == {"txt2img": [], "img2img": []}
    assert webui.get_cmd_flags()["api"] is True
    assert set(webui.get_memory()) == {"ram", "cuda"}


def test_every_sampler_and_scheduler_listed_is_accepted() -> None:
    settings = load_settings()
    names = [(sampler, None) for item in sampler_items() for sampler in (item.name, *item.aliases)]
    names += [("Euler", item.name) for item in scheduler_items()]
    names += [("Euler", alias) for item in scheduler_items() for alias in item.aliases or ()]
    for sampler, scheduler in names:
        body = Txt2ImgRequest(prompt=PROMPT, sampler_name=sampler, scheduler=scheduler)
        assert to_txt2img(body, settings, [MODEL], "ddim").prompt == PROMPT


def test_webuiapi_progress_shows_the_running_job_and_interrupt_cancels_it(
    webui: webuiapi.WebUIApi, http: httpx.Client, stack: ServiceStack
) -> None:
    outcome: dict[str, Any] = {}
    running = threading.Thread(
        target=lambda: outcome.update(
            result=webui.txt2img(prompt=PROMPT, sampler_name="DDIM", eta=0, steps=150, width=64, height=64)
        )
    )
    running.start()
    try:
        deadline = time.monotonic() + 30
        progress = webui.get_progress()
        while not (progress["state"]["sampling_step"] > 0 and progress["current_image"]):
            assert time.monotonic() < deadline, f"no progress with a preview: {progress}\n{stack.logs()}"
            time.sleep(0.05)
            progress = webui.get_progress()
        assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
        assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 150
        assert png_of(progress["current_image"]).format == "PNG"
        assert http.get("/progress", params={"skip_current_image": True}).json()["current_image"] is None

        # another key sees nothing of it, and cannot stop it
        with httpx.Client(base_url=http.base_url, headers=basic(KEY_B), timeout=10) as other:
            assert other.get("/progress").json()["state"]["job_count"] == 0
            assert other.post("/interrupt").json() == {}
        assert webui.get_progress()["state"]["interrupted"] is False

        assert webui.interrupt() == {}
    finally:
        running.join(timeout=30)
    result = outcome["result"]
    assert result.images == [] and len(result.info["all_seeds"]) == 1  # interrupted: no images, as asked
    assert webui.get_progress()["state"]["job_count"] == 0


# --- pictures: the translation draws what the native API draws ----------------------------------------


def test_same_pixels_as_the_native_route_for_the_same_settings(
    http: httpx.Client, stack: ServiceStack
) -> None:
    # A1111's "Automatic" schedule for DPM++ 2M is Karras: the native route names it
    a1111 = http.post(
        "/txt2img",
        json={"prompt": PROMPT, "seed": 11, "cfg_scale": 6, "sampler_name": "DPM++ 2M", "scheduler": "Automatic",
              "steps": 3, "width": 64, "height": 64},
    )  # fmt: skip
    assert a1111.status_code == 200, a1111.text
    picture = png_of(a1111.json()["images"][0])
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in picture.text["parameters"]  # type: ignore[attr-defined]

    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as native:
        job = native.post(
            "/v1/txt2img",
            json={"prompt": PROMPT, "seed": 11, "guidance_scale": 6, "sampler": "dpmpp_2m", "scheduler": "karras",
                  "steps": 3, "width": 64, "height": 64},
        ).json()  # fmt: skip
        deadline = time.monotonic() + 30
        while (view := native.get(f"/v1/jobs/{job['id']}").json())["status"] != "succeeded":
            assert time.monotonic() < deadline and view["status"] in ("queued", "running"), view
            time.sleep(0.05)
        reference = Image.open(io.BytesIO(native.get(view["images"][0]["url"]).content))
    assert picture.tobytes() == reference.tobytes()


def test_send_images_false_answers_the_info_without_images(http: httpx.Client) -> None:
    answer = http.post("/txt2img", json={"prompt": PROMPT, "seed": 3, "send_images": False, **SMALL})
    assert answer.status_code == 200, answer.text
    assert answer.json()["images"] == []
    info = json.loads(answer.json()["info"])
    assert info["all_seeds"] == [3] and "Seed: 3," in info["infotexts"][0]


def test_webuiapi_img2img_inpaints_as_the_native_route_does(
    webui: webuiapi.WebUIApi, stack: ServiceStack
) -> None:
    init, mask = Image.fromarray(init_picture(64, 64)), Image.fromarray(box_mask(64, 64))
    # webuiapi's defaults ride along: inpainting_fill 0, image_cfg_scale, include_init_images false...
    result = webui.img2img(
        images=[init], mask_image=mask, prompt=PROMPT, seed=5, denoising_strength=0.5, mask_blur=2,
        inpaint_full_res=False, cfg_scale=5, sampler_name="Euler", **SMALL,
    )  # fmt: skip
    (picture,) = result.images
    assert picture.size == (64, 64)
    assert "Denoising strength: 0.5, Mask blur: 2" in picture.text["parameters"]  # type: ignore[attr-defined]
    assert result.parameters["init_images"] is None  # not echoed back, as A1111
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as native:
        fields = {"prompt": PROMPT, "seed": 5, "strength": 0.5, "mask_blur": 2, "guidance_scale": 5,
                  "sampler": "euler", **SMALL}  # fmt: skip
        files = {
            "init_image": ("i.png", encoded(init_picture(64, 64))),
            "mask_image": ("m.png", encoded(box_mask(64, 64))),
        }
        job = native.post("/v1/img2img", data={k: str(v) for k, v in fields.items()}, files=files).json()
        deadline = time.monotonic() + 30
        while (view := native.get(f"/v1/jobs/{job['id']}").json())["status"] != "succeeded":
            assert time.monotonic() < deadline and view["status"] in ("queued", "running"), view
            time.sleep(0.05)
        reference = Image.open(io.BytesIO(native.get(view["images"][0]["url"]).content))
    difference = np.abs(np.asarray(picture, dtype=int) - np.asarray(reference.convert("RGB"), dtype=int))
    assert difference.max() <= 1  # each decoded in its own batch


def test_img2img_fields_that_would_change_the_picture_are_a_422_naming_them(http: httpx.Client) -> None:
    image, mask = b64_file(encoded(init_picture(64, 64))), b64_file(encoded(box_mask(64, 64)))
    cases = [
        ({"mask": mask, "inpainting_fill": 2, "inpaint_full_res": False}, ["body", "inpainting_fill"]),
        ({"mask": mask}, ["body", "inpaint_full_res"]),  # A1111's default: "Only masked"
        ({"resize_mode": 3}, ["body", "resize_mode"]),
        ({"init_images": [image, image]}, ["body", "init_images"]),
        ({"init_images": [b64_file(b"not an image")]}, ["body", "init_images"]),
        ({"mask": b64_file(encoded(box_mask(32, 32))), "inpaint_full_res": False}, ["body", "mask"]),
        ({"denoising_strength": 0.1, "steps": 4}, ["body", "denoising_strength"]),
    ]
    for fields, loc in cases:
        assert refused_at(
            http.post("/img2img", json={"prompt": PROMPT, "init_images": [image], **fields})
        ) == [loc]


def b64_file(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# --- the bodies Open WebUI and SillyTavern send -------------------------------------------------------


def test_open_webui(stack: ServiceStack) -> None:
    # open-webui/open-webui backend/open_webui/routers/images.py: `Authorization: Basic base64(api_auth)`;
    # get_models reads title and model_name of /sd-models; set_image_model GETs /options, changes
    # sd_model_checkpoint and POSTs the whole document back; image_generations POSTs
    # {prompt, batch_size: n, width, height, steps, negative_prompt} merged with AUTOMATIC1111_PARAMS.
    headers = {"authorization": basic(KEY_A, "open-webui")["Authorization"]}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as client:
        models = [
            {"id": m["title"], "name": m["model_name"]} for m in client.get("/sdapi/v1/sd-models").json()
        ]
        assert models == [{"id": MODEL, "name": MODEL}]
        options = client.get("/sdapi/v1/options").json()
        options["sd_model_checkpoint"] = models[0]["id"]
        client.post("/sdapi/v1/options", json=options).raise_for_status()

        for name in ("open_webui_txt2img.json", "open_webui_txt2img_with_params.json"):
            body = fixture(name)
            answer = client.post("/sdapi/v1/txt2img", json=body)
            assert answer.status_code == 200, answer.text
            res = answer.json()
            images = [png_of(image) for image in res["images"]]
            assert len(images) == body["batch_size"] and images[0].size == (body["width"], body["height"])
            assert json.loads(res["info"])["prompt"] == body["prompt"]
        assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5" in images[0].text["parameters"]  # type: ignore[attr-defined]


def test_sillytavern(stack: ServiceStack) -> None:
    # SillyTavern/SillyTavern src/endpoints/stable-diffusion.js forwards the body that
    # public/scripts/extensions/stable-diffusion/index.js (generateAutoImage) builds, its own `url` and
    # `auth` included, with `Authorization: Basic base64(auth)`; /ping, /samplers, /schedulers,
    # /models, /get-model and /set-model (POST {sd_model_checkpoint}, then poll /progress until
    # progress 0 and job_count 0) read the routes below.
    body = fixture("sillytavern_txt2img.json")
    body["auth"] = f"sillytavern:{KEY_B}"
    with httpx.Client(base_url=stack.url, headers=basic(KEY_B, "sillytavern"), timeout=60) as client:
        assert "forge_preset" not in client.get("/sdapi/v1/options").json()  # not SD Forge
        assert "DDIM" in [x["name"] for x in client.get("/sdapi/v1/samplers").json()]
        assert "automatic" in [x["name"] for x in client.get("/sdapi/v1/schedulers").json()]
        title = client.get("/sdapi/v1/sd-models").json()[0]["title"]
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).raise_for_status()
        progress = client.get("/sdapi/v1/progress").json()
        assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == title

        answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    image = png_of(data["images"][0])
    assert image.size == (64, 64)
    assert "Sampler: DDIM, CFG scale: 7, Seed: 1234," in image.text["parameters"]  # type: ignore[attr-defined]
    assert "auth" not in data["parameters"] and "url" not in data["parameters"]  # never echoed
    assert data["parameters"]["denoising_strength"] == 0.7


# --- refused fields, options per key, auth -----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"enable_hr": True}, ["enable_hr"]),
        ({"restore_faces": True}, ["restore_faces"]),
        ({"tiling": True}, ["tiling"]),
        ({"styles": ["cinematic"]}, ["styles"]),
        ({"subseed": 5, "subseed_strength": 0.5}, ["subseed_strength"]),
        ({"seed_resize_from_h": 512, "seed_resize_from_w": 512}, ["seed_resize_from_h"]),
        ({"s_churn": 0.5}, ["s_churn"]),
        ({"s_noise": 0.9}, ["s_noise"]),
        ({"s_min_uncond": 0.2}, ["s_min_uncond"]),
        ({"refiner_checkpoint": "sd_xl_refiner_1.0", "refiner_switch_at": 0.8}, ["refiner_checkpoint"]),
        ({"script_name": "x/y/z plot"}, ["script_name"]),
        # SillyTavern's "ADetailer face" option
        ({"alwayson_scripts": {"ADetailer": {"args": [True, True, {"ad_model": "face_yolov8n.pt"}]}}},
         ["alwayson_scripts", "ADetailer"]),
        ({"infotext": "a cat\nSteps: 20, Sampler: Euler"}, ["infotext"]),
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, ["override_settings", "CLIP_stop_at_last_layers"]),
        ({"override_settings": {"sd_vae": "vae-ft-mse-840000.safetensors"}}, ["override_settings", "sd_vae"]),
        ({"override_settings": {"sd_model_checkpoint": "sdxl.safetensors"}}, ["override_settings", "sd_model_checkpoint"]),
        ({"override_settings": {"eta_noise_seed_delta": 31337}}, ["override_settings", "eta_noise_seed_delta"]),
        ({"override_settings": {"forge_additional_modules": ["ae.safetensors"]}},
         ["override_settings", "forge_additional_modules"]),
        ({"sampler_name": "Euler a", "eta": 0.5}, ["eta"]),
        ({"sampler_name": "DDIM", "eta": 1.5}, ["eta"]),
        ({"batch_size": 4, "n_iter": 3}, ["n_iter"]),
        ({"batch_size": 9}, ["batch_size"]),
        ({"batch_size": 0}, ["batch_size"]),
        ({"cfg_scale": 31}, ["cfg_scale"]),
        ({"steps": "20"}, ["steps"]),
        ({"width": 100}, ["width"]),
        ({"seed": -2}, ["seed"]),
        ({"seed": 2**32}, ["seed"]),
        ({"sampler_name": "Heun"}, ["sampler_name"]),
        ({"sampler_index": "PLMS"}, ["sampler_index"]),
        ({"sampler_name": "Euler a", "scheduler": "Karras"}, ["scheduler"]),
        ({"sampler_name": "DPM++ 2M", "scheduler": "Align Your Steps"}, ["scheduler"]),
        ({"prompt": ""}, ["prompt"]),
    ],
)  # fmt: skip
def test_a_field_that_would_change_the_picture_is_a_422_naming_it(
    http: httpx.Client, extra: dict[str, Any], where: list[str]
) -> None:
    assert ["body", *where] in refused_at(http.post("/txt2img", json={"prompt": PROMPT, **SMALL, **extra}))


def test_the_default_model_is_set_per_key(http: httpx.Client, stack: ServiceStack) -> None:
    """Key A's POST /options changes what key A sees, never key B (a second model served meanwhile)."""
    client = redis.Redis.from_url(stack.redis_url)
    served = [WorkerInfo.model_validate_json(client.get(worker_info_key(n.decode()))) for n in client.zrange(WORKERS_ZSET, 0, -1)]  # fmt: skip
    other = served[0].model_copy(
        update={"name": "other-gpu", "model": "another-model", "heartbeat_at": time.time()}
    )
    client.set(worker_info_key(other.name), other.model_dump_json(), ex=60)
    client.zadd(WORKERS_ZSET, {other.name: other.heartbeat_at})
    try:
        with httpx.Client(base_url=http.base_url, headers=basic(KEY_B), timeout=10) as b:
            assert [m["title"] for m in b.get("/sd-models").json()] == ["another-model", MODEL]
            before_b = b.get("/options").json()["sd_model_checkpoint"]
            assert http.post("/options", json={"sd_model_checkpoint": MODEL}).status_code == 200
            assert http.get("/options").json()["sd_model_checkpoint"] == MODEL
            assert http.post("/options", json={"sd_model_checkpoint": "another-model"}).status_code == 200
            assert http.get("/options").json()["sd_model_checkpoint"] == "another-model"
            assert b.get("/options").json()["sd_model_checkpoint"] == before_b
            b.post("/options", json={"sd_model_checkpoint": MODEL}).raise_for_status()
            assert http.get("/options").json()["sd_model_checkpoint"] == "another-model"
    finally:
        client.zrem(WORKERS_ZSET, other.name)
        client.delete(worker_info_key(other.name))
    assert client.get(a1111_model_key(owner_of(KEY_A))) == b"another-model"
    assert client.ttl(a1111_model_key(owner_of(KEY_A))) == -1  # a setting: no expiry
    client.close()


def test_options_this_server_cannot_change_are_a_422_naming_them(http: httpx.Client) -> None:
    answer = http.post("/options", json={"sd_model_checkpoint": "sdxl.safetensors", "eta_ddim": 0.5})
    assert refused_at(answer) == [["body", "sd_model_checkpoint"], ["body", "eta_ddim"]]
    assert "served: 'tiny-sd1'" in answer.json()["detail"][0]["msg"]
    # the document GET answers goes back unchanged (Open WebUI does so); files on A1111's disk are no matter
    options = http.get("/options").json()
    assert http.post("/options", json={**options, "samples_save": True}).status_code == 200


def test_basic_auth_takes_the_api_key_as_password(stack: ServiceStack) -> None:
    url = stack.url + "/sdapi/v1/options"
    for headers in ({}, basic("wrong-key"), {"authorization": ""}, {"Authorization": "Basic not-base64!"}):
        answer = httpx.get(url, headers=headers)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Basic", headers
        assert set(answer.json()) == {"error", "detail", "body", "errors"}
    assert httpx.get(url, headers=basic(KEY_A, "any user name")).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 200


# --- with a stand-in worker: a failed job, a full queue, no result in time ------------------------------


@pytest.fixture(scope="module")
def idle_api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    """An API on another database of the session's Redis, where no real worker takes jobs."""
    url = redis_server.url.rsplit("/", 1)[0] + "/5"
    with ApiProcess({"REDIS_URL": url, "SD_MAX_QUEUE_DEPTH": "1", "SD_OPENAI_WAIT_S": "1.5"}) as api:
        yield api


@pytest.fixture
def idle_url(idle_api: ApiProcess) -> str:
    url = idle_api.env["REDIS_URL"]
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    fake_worker.serve(url)  # its jobs go to the fake model's queue
    return url


def test_a_failed_generation_is_a1111s_500(idle_api: ApiProcess, idle_url: str) -> None:
    outcome: dict[str, httpx.Response] = {}
    body = {"prompt": f"{fake_worker.FAIL_PREFIX} the GPU caught fire", **SMALL}
    posting = threading.Thread(
        target=lambda: outcome.update(
            answer=httpx.post(idle_api.url + "/sdapi/v1/txt2img", json=body, timeout=30)
        )
    )
    posting.start()
    with redis.Redis.from_url(idle_url) as client:
        deadline = time.monotonic() + 10
        while not client.llen(fake_worker.queue_key()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    fake_worker.run_queued_jobs(idle_url)  # fails, is retried once, fails again
    posting.join(timeout=30)
    answer = outcome["answer"]
    assert answer.status_code == 500
    error = answer.json()
    assert set(error) == {"error", "detail", "body", "errors"} and error["error"] == "ValueError"
    assert "the GPU caught fire" in error["detail"]


def test_a_full_queue_is_a_429_with_retry_after(idle_api: ApiProcess, idle_url: str) -> None:
    assert httpx.post(idle_api.url + "/v1/txt2img", json={"prompt": PROMPT}).status_code == 202  # fills it
    answer = httpx.post(idle_api.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, **SMALL})
    assert answer.status_code == 429 and int(answer.headers["retry-after"]) > 0
    assert answer.json()["error"] == "QueueFull" and "queue is full" in answer.json()["detail"]


def test_no_result_in_time_is_a_504_and_the_job_is_canceled(idle_api: ApiProcess, idle_url: str) -> None:
    answer = httpx.post(idle_api.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, **SMALL}, timeout=30)
    assert answer.status_code == 504 and "SD_OPENAI_WAIT_S" in answer.json()["detail"]
    with redis.Redis.from_url(idle_url) as client:
        assert client.llen(fake_worker.queue_key()) == 0  # canceled: nobody would read its images
    assert httpx.get(idle_api.url + "/sdapi/v1/progress").json()["state"]["job_count"] == 0
