"""The samplers and schedules a request may name: canonical names, aliases, what each supports.

Torch-free (the API validates names with it); the implementations live in models/samplers/, one
module per sampler, registered under the same names (a test checks both agree). Names are
ComfyUI's lowercase ones; AUTOMATIC1111's display names are accepted everywhere as aliases,
including its combined names ("DPM++ 2M Karras" = dpmpp_2m with the karras schedule).
"""

from __future__ import annotations

from dataclasses import dataclass

# How a request's steps are spread over the noise levels.
#   normal       the model's own spacing (its scheduler_config.json's timestep_spacing)
#   karras       Karras et al. 2022's sigma schedule (rho = 7)
#   exponential  sigmas evenly spaced in log
#   sgm_uniform  "trailing" spacing: the first step at the last training timestep (as SGM/ComfyUI)
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform")
SCHEDULER_LABELS = {
    "normal": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
}
# AUTOMATIC1111's "Automatic" leaves the choice to the sampler: our "normal".
SCHEDULER_ALIASES = {"automatic": "normal", "uniform": "normal", "sgm uniform": "sgm_uniform"}


@dataclass(frozen=True)
class SamplerInfo:
    name: str  # canonical (ComfyUI's)
    label: str  # AUTOMATIC1111's display name, as its PNG parameters write it
    schedulers: tuple[str, ...]  # the schedules it can follow
    uses_eta: bool = False  # eta changes its pictures (others accept and ignore it)
    multistep: bool = False  # keeps previous model outputs per image
    stochastic: bool = False  # draws fresh noise at each step, from the image's own generator
    lcm_model: bool = False  # made for LCM-distilled weights (or an LCM-LoRA)
    aliases: tuple[str, ...] = ()
    description: str = ""


SAMPLERS: dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo(
            "ddim",
            "DDIM",
            ("normal", "sgm_uniform"),
            uses_eta=True,
            description="Song et al. 2020; eta > 0 adds noise from the image's own generator",
        ),
        SamplerInfo(
            "euler",
            "Euler",
            ("normal", "karras", "exponential", "sgm_uniform"),
            description="first-order ODE solver on the sigma scale (Karras et al. 2022)",
        ),
        SamplerInfo(
            "euler_ancestral",
            "Euler a",
            ("normal", "sgm_uniform"),
            stochastic=True,
            aliases=("euler a", "euler_a"),
            description="Euler with fresh noise at every step: pictures keep changing with the step count",
        ),
        SamplerInfo(
            "dpmpp_2m",
            "DPM++ 2M",
            ("normal", "karras", "exponential", "sgm_uniform"),
            multistep=True,
            description="DPM-Solver++ (Lu et al. 2022), second-order multistep; good at 20-30 steps",
        ),
        SamplerInfo(
            "dpmpp_2m_sde",
            "DPM++ 2M SDE",
            ("normal", "karras", "exponential", "sgm_uniform"),
            multistep=True,
            stochastic=True,
            description="the SDE variant of DPM-Solver++ 2M",
        ),
        SamplerInfo(
            "uni_pc",
            "UniPC",
            ("normal", "karras", "exponential", "sgm_uniform"),
            multistep=True,
            description="UniPC (Zhao et al. 2023), predictor-corrector; good at 8-15 steps",
        ),
        SamplerInfo(
            "lcm",
            "LCM",
            ("normal", "sgm_uniform"),  # the same plan: LCM's timesteps skip through the model's own
            stochastic=True,
            lcm_model=True,
            description="Latent Consistency Models (Luo et al. 2023): for LCM-distilled weights or an "
            "LCM-LoRA, 2-8 steps (more are allowed), guidance 1-2",
        ),
    )
}
DEFAULT_SAMPLER = "ddim"
DEFAULT_SCHEDULER = "normal"


def _key(name: str) -> str:
    return " ".join(name.strip().lower().split())


# alias (lowercase, single spaces) -> (sampler, scheduler it implies or None)
SAMPLER_ALIASES: dict[str, tuple[str, str | None]] = {}
for _info in SAMPLERS.values():
    for _alias in (_info.name, _info.label, *_info.aliases):
        SAMPLER_ALIASES[_key(_alias)] = (_info.name, None)
    for _scheduler in _info.schedulers:
        if _scheduler != "normal":  # "DPM++ 2M Karras", "Euler Exponential", ...
            SAMPLER_ALIASES[_key(f"{_info.label} {SCHEDULER_LABELS[_scheduler]}")] = (_info.name, _scheduler)


class UnknownName(ValueError):
    """A sampler or scheduler name that is not ours; the message lists the valid ones."""


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """(canonical sampler, the scheduler its name implies or None) for a canonical name or an alias."""
    found = SAMPLER_ALIASES.get(_key(name))
    if found is None:
        raise UnknownName(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)} (or {sampler_labels()})")
    return found


def resolve_scheduler(name: str) -> str:
    key = _key(name)
    key = SCHEDULER_ALIASES.get(key, key.replace(" ", "_"))
    if key not in SCHEDULERS:
        raise UnknownName(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return key


def check_pair(sampler: str, scheduler: str) -> None:
    """ValueError when `sampler` cannot follow `scheduler`, naming the ones it can."""
    allowed = SAMPLERS[sampler].schedulers
    if scheduler not in allowed:
        raise UnknownName(
            f"sampler {sampler} cannot follow scheduler {scheduler!r}; it supports: {', '.join(allowed)}"
        )


def sampler_labels() -> str:
    return ", ".join(f'"{info.label}"' for info in SAMPLERS.values())


def a1111_name(sampler: str, scheduler: str) -> tuple[str, str]:
    """What AUTOMATIC1111 writes in a PNG's parameters: ("DPM++ 2M", "Karras")."""
    return SAMPLERS[sampler].label, SCHEDULER_LABELS[scheduler]


def sampler_spellings(sampler: str | None = None) -> list[str]:
    """The sampler names a request may send, as the public schema lists them: canonical and
    AUTOMATIC1111's (combined names such as "DPM++ 2M Karras" are accepted too, unlisted)."""
    infos = SAMPLERS.values() if sampler is None else [SAMPLERS[sampler]]
    return [name for info in infos for name in (info.name, info.label)]


def scheduler_spellings(schedulers: tuple[str, ...] = SCHEDULERS) -> list[str]:
    """Scheduler names as the public schema lists them: canonical and AUTOMATIC1111's labels."""
    spellings = []
    for scheduler in schedulers:
        spellings += [scheduler, SCHEDULER_LABELS[scheduler]]
        if scheduler == "normal":
            spellings.append("Automatic")
    return spellings


def universal_schedulers() -> tuple[str, ...]:
    """The schedulers every sampler can follow."""
    return tuple(s for s in SCHEDULERS if all(s in info.schedulers for info in SAMPLERS.values()))


def pair_rules() -> list[dict]:
    """JSON Schema rules (`allOf` items): each sampler with the schedulers it can follow, and a
    scheduler that not every sampler can follow only with a sampler named."""
    rules: list[dict] = [
        {
            "if": {"properties": {"sampler": {"enum": sampler_spellings(name)}}, "required": ["sampler"]},
            "then": {"properties": {"scheduler": {"enum": scheduler_spellings(info.schedulers)}}},
        }
        for name, info in SAMPLERS.items()
        if info.schedulers != SCHEDULERS
    ]
    partial = tuple(s for s in SCHEDULERS if s not in universal_schedulers())
    rules.append(
        {
            "if": {
                "properties": {"scheduler": {"enum": scheduler_spellings(partial)}},
                "required": ["scheduler"],
            },
            "then": {"required": ["sampler"]},
        }
    )
    return rules
