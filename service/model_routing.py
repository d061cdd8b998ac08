"""Which model a request runs on: every route that creates jobs asks `choose_model`.

Each worker serves one model and publishes it (schemas/worker_info.py); a model is *served* while at
least one of its workers is alive, and *known* while Redis remembers a worker of it (MODELS_ZSET,
forgotten after a week) or SD_DEFAULT_MODEL names it. A request's model is:
- the one it names: served, it is queued there; known but without a live worker (restarting,
  loading, scaled to zero), ModelUnavailable (503, Retry-After: the job is not queued); unknown,
  UnknownModel (a 422 on our routes, OpenAI's 404 `model_not_found`), naming the served ones;
- else SD_DEFAULT_MODEL (503 while it has no live worker);
- else the only model served; with several, a 422 naming them; with none, a 503.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError

from schemas.worker_info import WorkerInfo


@dataclass(frozen=True)
class ServedModel:
    """A model with live workers (newest heartbeat first): the newest one's info stands for it."""

    name: str
    workers: tuple[WorkerInfo, ...]

    @property
    def info(self) -> WorkerInfo:
        return self.workers[0]


def served_models(workers: Sequence[WorkerInfo]) -> dict[str, ServedModel]:
    """The live workers (newest first, as service/live_workers.py returns them) grouped by model,
    sorted by name."""
    grouped: dict[str, list[WorkerInfo]] = {}
    for info in workers:
        grouped.setdefault(info.model, []).append(info)
    return {name: ServedModel(name, tuple(grouped[name])) for name in sorted(grouped)}


def names(served: Sequence[str]) -> str:
    return ", ".join(served) if served else "none (no live worker)"


class UnknownModel(RequestValidationError):
    """The request names a model no worker serves or has served: a 422 at `model` (a RequestValidationError,
    so every route answers it in its own shape; OpenAI's route answers 404 `model_not_found`)."""

    def __init__(self, model: str, served: Sequence[str], field: tuple[str, ...] = ("model",)) -> None:
        self.model = model
        self.served = list(served)
        self.message = f"model {model!r} is not served; served: {names(served)}"
        super().__init__([{"loc": ("body", *field), "msg": self.message, "type": "unknown_model"}])


class ModelUnavailable(RuntimeError):
    """A model without a live worker now (or no model served at all: `model` None): 503 with Retry-After;
    nothing is queued."""

    def __init__(self, model: str | None, served: Sequence[str], retry_after_s: int) -> None:
        self.model = model
        self.retry_after_s = retry_after_s
        if model is None:
            what = "no model is served now (no live worker)"
        else:
            what = f"model {model!r} has no live worker now (stopped, restarting or still loading)"
        others = f"; served: {', '.join(served)}" if served else ""
        super().__init__(f"{what}; retry in {retry_after_s} s{others}")


def model_required(served: Sequence[str]) -> RequestValidationError:
    return RequestValidationError(
        [
            {
                "loc": ("body", "model"),
                "msg": f"several models are served and this server has no default (SD_DEFAULT_MODEL): "
                f"send `model`, one of {names(served)}",
                "type": "model_required",
            }
        ]
    )


def choose_model(
    requested: str | None,
    served: dict[str, ServedModel],
    default_model: str | None,
    is_known: Callable[[str], bool],
    retry_after_s: int,
) -> ServedModel:
    """The served model a request runs on (see the module's docstring), or the error to answer.
    `is_known(name)`: whether a worker of that model has been seen (asked only when none is live)."""
    wanted = requested or default_model
    if wanted is None:
        if len(served) == 1:
            return next(iter(served.values()))
        if not served:
            raise ModelUnavailable(None, [], retry_after_s)
        raise model_required(list(served))
    if wanted in served:
        return served[wanted]
    if wanted == default_model or is_known(wanted):
        raise ModelUnavailable(wanted, list(served), retry_after_s)
    raise UnknownModel(wanted, list(served))
