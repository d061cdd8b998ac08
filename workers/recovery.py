"""The engine's two ways of recovering from a failed batch, named once and used for every batch
(prompt encodings, UNet calls, VAE decodes).

- `AdaptiveLimit`: a batch limit (rows per UNet call, latents per VAE call) that halves when the
  device runs out of memory and doubles again after a number of clean uses, so one huge request
  does not slow the worker down until it restarts.
- `isolate_failures`: a batch of several jobs that failed together is run again one job at a time,
  so the job at fault fails alone and its batch-mates go on (a failed step changes nothing: see
  Pipeline.step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class AdaptiveLimit:
    def __init__(self, call: str, unit: str, ceiling: int, recover_after: int) -> None:
        self.call = call  # "UNet call"
        self.unit = unit  # "rows"
        self.ceiling = ceiling
        self.value = ceiling
        self.recover_after = recover_after
        self._clean = 0

    def shrink(self, tried: int) -> bool:
        """After an out-of-memory error on a batch of `tried`: halve the limit (below `tried`).
        False when `tried` was 1: nothing smaller to try."""
        if tried <= 1:
            return False
        limit = max(1, min(self.value, tried // 2))
        log.warning(
            "out of memory in a %s of %d %s: %s per call %d -> %d, retrying it split",
            self.call,
            tried,
            self.unit,
            self.unit,
            self.value,
            limit,
        )
        self.value = limit
        self._clean = 0
        return True

    def succeeded(self) -> None:
        """One clean use; after `recover_after` of them below the ceiling, the limit doubles."""
        if self.value >= self.ceiling:
            return
        self._clean += 1
        if self._clean >= self.recover_after:
            limit = min(self.ceiling, self.value * 2)
            log.info(
                "%d %ss without running out of memory: %s per call %d -> %d",
                self._clean,
                self.call,
                self.unit,
                self.value,
                limit,
            )
            self.value = limit
            self._clean = 0


def isolate_failures(
    jobs: Sequence[T],
    run: Callable[[Sequence[T]], None],
    fail: Callable[[T, Exception], None],
    what: str,
) -> None:
    """`run(jobs)`; if it raises with several jobs, `run([job])` for each; a job whose run fails
    alone gets `fail(job, error)`. `what` names the batch in the log ("starting", "decoding")."""
    try:
        run(jobs)
    except Exception as error:
        if len(jobs) == 1:
            fail(jobs[0], error)
            return
        log.warning("%s %d requests together failed (%r): %s each alone", what, len(jobs), error, what)
        for job in jobs:
            isolate_failures([job], run, fail, what)
