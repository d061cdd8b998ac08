"""GET /v1/loras: the LoRAs requests may name, per served model, as its workers publish them (each
worker reads its SD_LORA_DIR's file headers and puts the list in its heartbeat: the API never reads a
LoRA file, nor imports torch)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from schemas.loras import LoraInfo
from service.deps import ServicesDep, get_owner
from service.live_workers import live_workers
from service.model_routing import served_models
from service.openapi_docs import error_responses

router = APIRouter(prefix="/v1", tags=["models"])


class LoraView(LoraInfo):
    model: str = Field(description="The served model whose workers have it (GET /v1/models).")


class LoraList(BaseModel):
    loras: list[LoraView] = Field(description="By model, then name.")


LORA_EXAMPLE = LoraView(
    model="stable-diffusion-v1-5",
    name="add_detail",
    family="sd",
    context_dim=768,
    format="kohya",
    rank=8,
    size_bytes=37_861_176,
    layers={"unet": 192, "text_encoder": 72},
)


@router.get(
    "/loras",
    response_model=LoraList,
    summary="The LoRAs a request may name",
    description="Each served model's LoRAs (its workers' SD_LORA_DIR): the name `loras` and "
    "<lora:name:weight> prompt tags take, the base family it was trained for, its rank, size and "
    "adapted layers. One marked `usable: false` (another base model, an unreadable file) is refused "
    "with a 422 that says why.",
    dependencies=[Depends(get_owner)],
    responses={
        200: {"content": {"application/json": {"example": {"loras": [LORA_EXAMPLE.model_dump()]}}}},
        **error_responses(401, 503),
    },
)
async def list_loras(
    services: ServicesDep,
    model: Annotated[str | None, Query(description="Only this model's LoRAs.")] = None,
) -> LoraList:
    workers = await live_workers(services.redis.aio, services.settings.worker_stale_s)
    views = [
        LoraView(model=name, **info.model_dump())
        for name, served in served_models(workers).items()
        if model is None or name == model
        for info in served.info.loras
    ]
    return LoraList(loras=views)
