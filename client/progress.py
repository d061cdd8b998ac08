"""The progress line on stderr: queue position while queued, a bar of steps while running.

On a terminal the line is redrawn in place; into a file or a pipe, a line is written only when the
state changes (and every tenth of the steps), so logs stay short.
"""

from __future__ import annotations

from typing import Any, TextIO

BAR_WIDTH = 30


def describe(job: dict[str, Any]) -> str:
    """One line for a job's status document."""
    status = job.get("status", "?")
    if status == "queued":
        ahead = job.get("queue_position")
        if ahead is None:
            return "queued"
        return "queued, next in line" if ahead == 0 else f"queued, {ahead} job(s) ahead"
    if status == "running":
        progress = job.get("progress") or {}
        step, total = int(progress.get("step", 0)), max(int(progress.get("total_steps", 0)), 1)
        filled = BAR_WIDTH * min(step, total) // total
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        stopping = " (canceling)" if job.get("cancel_requested") else ""
        return f"running [{bar}] step {step}/{total}{stopping}"
    return str(status)


class ProgressLine:
    def __init__(self, stream: TextIO, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.interactive = enabled and stream.isatty()
        self._last = ""
        self._last_key: tuple[object, ...] = ()
        self._width = 0

    def update(self, job: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = describe(job)
        if self.interactive:
            if text != self._last:
                self.stream.write("\r" + text.ljust(self._width))
                self.stream.flush()
                self._width = max(self._width, len(text))
        else:
            key = _change_key(job)
            if key != self._last_key:
                self.stream.write(text + "\n")
                self.stream.flush()
                self._last_key = key
        self._last = text

    def done(self) -> None:
        """End the redrawn line, so that what follows starts on a fresh one."""
        if self.interactive and self._last:
            self.stream.write("\n")
            self.stream.flush()
        self._last = ""


def _change_key(job: dict[str, Any]) -> tuple[object, ...]:
    """What must change for a non-interactive stream to get a new line."""
    progress = job.get("progress") or {}
    total = max(int(progress.get("total_steps", 0)), 1)
    tenth = int(progress.get("step", 0)) * 10 // total if job.get("status") == "running" else 0
    return job.get("status"), job.get("queue_position"), tenth
