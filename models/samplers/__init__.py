"""The samplers, one module each, registered by the names of schemas/samplers.py.

A new sampler is one module with a `Sampler` subclass and one line below (plus its entry in the
catalogue of schemas/samplers.py, which the API validates names against).
"""

from __future__ import annotations

from models.samplers.base import Plan, RowState, Sampler, StepResult
from models.samplers.ddim import DDIM
from models.samplers.dpmpp_2m import DPMPP2M
from models.samplers.dpmpp_2m_sde import DPMPP2MSDE
from models.samplers.euler import Euler
from models.samplers.euler_ancestral import EulerAncestral
from models.samplers.lcm import LCM
from models.samplers.uni_pc import UniPC

SAMPLERS: dict[str, Sampler] = {
    sampler.name: sampler
    for sampler in (
        DDIM(),
        Euler(),
        EulerAncestral(),
        DPMPP2M(),
        DPMPP2MSDE(),
        UniPC(),
        LCM(),
    )
}


def get_sampler(name: str) -> Sampler:
    """The sampler registered under a canonical name (schemas.samplers.resolve_sampler gives one)."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"sampler {name!r} is not available here; available: {', '.join(SAMPLERS)}"
        ) from None


__all__ = ["SAMPLERS", "Plan", "RowState", "Sampler", "StepResult", "get_sampler"]
