"""The API in front of an SDXL worker (issue 17): /v1/models reports its family and native size, a
request without a size gets 1024x1024, SDXL's size fields pass through to the worker, and bad sizes
are refused as for any model (422 naming the field)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from schemas.redis_keys import WORKERS_ZSET, worker_info_key
from service.app import create_app
from service.settings import load_settings
from tests.support.api import publish_worker


def test_sdxl_worker_native_size_family_and_size_fields(redis_url: str, rdb) -> None:
    publish_worker(rdb, family="sdxl", native_width=1024, native_height=1024, model="sdxl-base")
    try:
        with TestClient(create_app(load_settings(redis_url=redis_url))) as client:
            model = client.get("/v1/models").json()["data"][0]
            assert (model["id"], model["family"], model["native_width"], model["native_height"]) == (
                "sdxl-base",
                "sdxl",
                1024,
                1024,
            )

            def resolved(**fields: object) -> dict:
                response = client.post("/v1/txt2img", json={"prompt": "a cat", **fields})
                assert response.status_code == 202, response.text
                return client.get(f"/v1/jobs/{response.json()['id']}").json()["request"]

            plain = resolved()
            assert (plain["width"], plain["height"]) == (1024, 1024)
            assert plain["original_size"] is None and plain["target_size"] is None
            sized = resolved(
                width=768, original_size=[2048, 1536], crops_coords_top_left=[0, 64], target_size=[1024, 768]
            )
            assert (sized["width"], sized["height"]) == (768, 1024)
            assert sized["original_size"] == [2048, 1536] and sized["crops_coords_top_left"] == [0, 64]
            assert sized["target_size"] == [1024, 768]

            for fields, field in (
                ({"width": 1020}, "width"),
                ({"height": 8}, "height"),  # below SD_MIN_SIZE, as for every model
                ({"original_size": [0, 1024]}, "original_size"),
                ({"crops_coords_top_left": [-8, 0]}, "crops_coords_top_left"),
                ({"target_size": [1024]}, "target_size"),
            ):
                response = client.post("/v1/txt2img", json={"prompt": "a cat", **fields})
                assert response.status_code == 422, (fields, response.text)
                assert any(error["loc"][:2] == ["body", field] for error in response.json()["detail"]), (
                    fields,
                    response.text,
                )
    finally:
        rdb.delete(WORKERS_ZSET, worker_info_key("gpu-0"))
