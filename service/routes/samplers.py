"""GET /v1/samplers: the samplers and schedules a request may name, with their aliases and traits."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from schemas.samplers import SAMPLERS, SCHEDULER_LABELS, SCHEDULERS, SamplerInfo
from service.deps import get_owner
from service.openapi_docs import error_responses

router = APIRouter(prefix="/v1", tags=["models"])

SCHEDULER_MEANINGS = {
    "normal": "the model's own spacing of the steps (its scheduler_config.json)",
    "karras": "Karras et al. 2022's noise levels (rho 7): more steps at low noise",
    "exponential": "noise levels evenly spaced in log",
    "sgm_uniform": "'trailing' spacing: the first step at the last training timestep",
}


class SamplerView(BaseModel):
    name: str = Field(description="What `sampler` takes (ComfyUI's name).")
    label: str = Field(description="AUTOMATIC1111's name, also accepted, and what PNG parameters write.")
    aliases: list[str] = Field(description="Other names accepted (case does not matter).")
    schedulers: list[str] = Field(description="The `scheduler` values it can follow.")
    uses_eta: bool = Field(description="`eta` changes its pictures (the others ignore it).")
    multistep: bool
    stochastic: bool = Field(description="Draws fresh noise each step (from the image's own seed).")
    lcm_model: bool = Field(description="Made for LCM-distilled weights or an LCM-LoRA.")
    description: str


class SchedulerView(BaseModel):
    name: str
    label: str = Field(description="AUTOMATIC1111's name, also accepted.")
    description: str


class SamplerList(BaseModel):
    samplers: list[SamplerView]
    schedulers: list[SchedulerView]


def sampler_view(info: SamplerInfo) -> SamplerView:
    combined = [f"{info.label} {SCHEDULER_LABELS[s]}" for s in info.schedulers if s != "normal"]
    return SamplerView(
        name=info.name,
        label=info.label,
        aliases=[*info.aliases, *combined],
        schedulers=list(info.schedulers),
        uses_eta=info.uses_eta,
        multistep=info.multistep,
        stochastic=info.stochastic,
        lcm_model=info.lcm_model,
        description=info.description,
    )


SAMPLER_LIST = SamplerList(
    samplers=[sampler_view(info) for info in SAMPLERS.values()],
    schedulers=[
        SchedulerView(name=s, label=SCHEDULER_LABELS[s], description=SCHEDULER_MEANINGS[s])
        for s in SCHEDULERS
    ],
)


@router.get(
    "/samplers",
    response_model=SamplerList,
    summary="The samplers and schedules a request may name",
    description='Names, AUTOMATIC1111\'s aliases (combined ones such as "DPM++ 2M Karras" set the '
    "scheduler too), which schedules each can follow, and their traits. Which one a request gets "
    "when it names none: the served model's recommendation (GET /v1/models), else ddim.",
    dependencies=[Depends(get_owner)],
    responses={
        200: {"content": {"application/json": {"example": SamplerList(
            samplers=SAMPLER_LIST.samplers[3:4], schedulers=SAMPLER_LIST.schedulers[:2]
        ).model_dump()}}},
        **error_responses(401),
    },
)  # fmt: skip
async def list_samplers() -> SamplerList:
    return SAMPLER_LIST
