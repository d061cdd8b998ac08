"""RQ status -> API status, and failure text -> {type, message} without the traceback."""

from __future__ import annotations

import traceback

import pytest
from rq.job import JobStatus as RqStatus

from schemas.queue import JobStatus
from service.job_status import MAX_MESSAGE_CHARS, api_status, error_from_exc_string, error_from_meta


@pytest.mark.parametrize(
    ("rq_status", "expected"),
    [
        ("created", "queued"),
        ("queued", "queued"),
        ("deferred", "queued"),
        ("scheduled", "queued"),
        ("started", "running"),
        ("finished", "succeeded"),
        ("failed", "failed"),
        ("stopped", "failed"),
        ("canceled", "canceled"),
    ],
)
def test_every_rq_status_maps(rq_status: str, expected: str) -> None:
    assert api_status(rq_status) is JobStatus(expected)
    assert api_status(RqStatus(rq_status)) is JobStatus(expected)


def exc_text(error: BaseException) -> str:
    try:
        raise error
    except BaseException as caught:
        return "".join(traceback.format_exception(caught))


def test_last_exception_of_a_real_traceback() -> None:
    assert error_from_exc_string(exc_text(ValueError("steps must be <= 150, got 151"))) == (
        "ValueError",
        "steps must be <= 150, got 151",
    )


def test_chained_exceptions_report_the_last() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("CUDA out of memory even at batch size 1") from inner
    except RuntimeError as outer:
        text = "".join(traceback.format_exception(outer))
    assert error_from_exc_string(text) == ("RuntimeError", "CUDA out of memory even at batch size 1")


def test_module_path_is_dropped_and_multiline_messages_kept() -> None:
    text = 'Traceback (most recent call last):\n  File "/srv/x.py", line 3, in f\n    g()\nrq.timeouts.JobTimeoutException: Task exceeded maximum timeout value (600 seconds)\n'
    assert error_from_exc_string(text) == (
        "JobTimeoutException",
        "Task exceeded maximum timeout value (600 seconds)",
    )
    assert error_from_exc_string(exc_text(ValueError("line one\nline two"))) == (
        "ValueError",
        "line one\nline two",
    )


def test_exception_without_message() -> None:
    assert error_from_exc_string(exc_text(MemoryError())) == ("MemoryError", "MemoryError")


@pytest.mark.parametrize(
    ("text", "error_type"),
    [
        ("Moved to FailedJobRegistry, due to AbandonedJobError, at 2025-01-01 00:00:00", "AbandonedJobError"),
        ("Work-horse terminated unexpectedly; waitpid returned 9 (signal 9); ", "WorkerDied"),
        ("Job stopped by user, work-horse terminated.", "JobStopped"),
        ("", "JobFailed"),
        (None, "JobFailed"),
        ("something odd", "JobFailed"),
    ],
)
def test_failures_rq_records_without_traceback(text: str | None, error_type: str) -> None:
    assert error_from_exc_string(text)[0] == error_type


def test_long_messages_are_cut() -> None:
    _, message = error_from_exc_string(exc_text(ValueError("x" * 5000)))
    assert len(message) == MAX_MESSAGE_CHARS


def test_meta_error() -> None:
    assert error_from_meta({"error": {"type": "PromptRejected", "message": "nsfw"}}) == (
        "PromptRejected",
        "nsfw",
    )
    assert error_from_meta({"error": {"message": "no type"}}) == ("JobFailed", "no type")
    assert error_from_meta({"error": "just a string"}) is None
    assert error_from_meta({}) is None
