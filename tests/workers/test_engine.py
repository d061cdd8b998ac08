"""The engine in-process, on the tiny model, with in-memory stand-ins for Redis: batching, FIFO,
splitting, fault isolation, out-of-memory, cancel, timeouts and drain."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pytest

from models.pipeline import Picture, Pipeline, generate
from schemas.generation import Generation
from schemas.queue import ImageRef, JobResult
from tests.support.jobs import max_pixel_diff, params, wait_until
from workers.engine import Engine, EngineConfig, Progress
from workers.errors import EngineFailure, JobCanceled, JobTimedOut, RequestFailed, WorkerShuttingDown
from workers.submission import Submission


class FakeProgress:
    def __init__(self) -> None:
        self.cancel: set[str] = set()
        self.latest: dict[str, tuple[int, int]] = {}
        self.waiting: list[str] = []
        self.lock = threading.Lock()

    def sync(
        self, running: Mapping[str, Progress], waiting: Sequence[tuple[str, float]], previews: Mapping
    ) -> set[str]:
        with self.lock:
            self.latest.update({job_id: (p.step, p.total_steps) for job_id, p in running.items()})
            self.waiting = [job_id for job_id, _ in waiting]
            return self.cancel & {*running, *self.waiting}


class FakeResults:
    def __init__(self) -> None:
        self.pictures: dict[str, list[np.ndarray]] = {}
        self.order: list[str] = []

    def store(self, submission: Submission, pictures: Sequence[Picture]) -> JobResult:
        self.pictures[submission.job_id] = [picture.pixels for picture in pictures]
        self.order.append(submission.job_id)
        return JobResult(
            model="tiny",
            images=[
                ImageRef(index=i, seed=picture.seed, key=f"{submission.job_id}:{i}")
                for i, picture in enumerate(pictures)
            ],
        )


class FaultyPipeline(Pipeline):
    """Prompts containing BOOM fail to encode; images of prompts containing STEPFAIL fail to step."""

    def start(self, items):
        if any("BOOM" in request.prompt for _, request in items):
            raise RuntimeError("text encoder exploded")
        return super().start(items)

    def step(self, images):
        if any("STEPFAIL" in image.request.prompt for image in images):
            raise RuntimeError("UNet exploded")
        return super().step(images)


@pytest.fixture
def make_engine(tiny_model) -> Iterator:
    engines = []

    def make(
        max_batch_rows: int = 16, vae_batch: int = 2, faulty: bool = False, start: bool = True, **config
    ) -> tuple[Engine, FakeResults, FakeProgress]:
        results, progress = FakeResults(), FakeProgress()
        engine = Engine(
            tiny_model,
            EngineConfig(max_batch_rows=max_batch_rows, vae_batch=vae_batch, idle_wait_s=0.05, **config),
            results,
            progress,
            pipeline_factory=FaultyPipeline if faulty else Pipeline,
        )
        if start:
            engine.start()
        engines.append(engine)
        return engine, results, progress

    yield make
    for engine in engines:
        engine.drain(0)
        engine.join(30)


def submit(engine: Engine, job_id: str, timeout_s: float | None = None, **overrides) -> Submission:
    submission = Submission(job_id, Generation.model_validate(params(**overrides)), timeout_s=timeout_s)
    engine.submit(submission)
    return submission


def finish(submissions: list[Submission], timeout_s: float = 120) -> None:
    wait_until(lambda: all(s.finished for s in submissions), timeout_s, "submissions to end")


def assert_alone_equal(tiny_model, results: FakeResults, submission: Submission) -> None:
    alone = generate(tiny_model, submission.params)
    got = results.pictures[submission.job_id]
    assert len(got) == len(alone)
    for picture, reference in zip(got, alone, strict=True):
        assert max_pixel_diff(picture, reference) <= 1


def test_concurrent_requests_share_calls_and_match_alone_runs(make_engine, tiny_model) -> None:
    engine, results, _ = make_engine(max_batch_rows=16)
    subs = [
        submit(engine, "a", seed=1, steps=5, guidance_scale=7.5),
        submit(engine, "b", seed=2, steps=8, guidance_scale=1.0),  # unguided: 1 row
        submit(engine, "c", seed=3, steps=6, guidance_scale=3.0, num_images=2),
        submit(engine, "d", seed=4, steps=4, width=48, height=64),  # another latent shape
        submit(engine, "e", seed=5, steps=7, eta=0.5, negative_prompt="blurry"),
    ]
    finish(subs)
    for sub in subs:
        assert sub.error is None, sub.error
        assert_alone_equal(tiny_model, results, sub)
    stats = engine.stats()
    assert stats.max_requests_per_call > 1
    assert stats.jobs_succeeded == 5 and stats.images_generated == 6


def test_admission_is_fifo_and_respects_the_row_budget(make_engine) -> None:
    engine, results, _ = make_engine(max_batch_rows=2)  # one guided image at a time
    subs = [submit(engine, name, seed=i, steps=3) for i, name in enumerate("pqrs")]
    finish(subs)
    assert results.order == ["p", "q", "r", "s"]
    assert engine.stats().max_requests_per_call == 1


def test_a_big_request_shares_the_rows_with_a_small_one(make_engine, tiny_model) -> None:
    """Images, not requests, take the rows: a small request arriving behind a big one (6 rows > 4)
    is interleaved with it instead of waiting for its whole run, and both equal their alone runs."""
    engine, results, _ = make_engine(max_batch_rows=4, start=False)
    big = submit(engine, "big", num_images=3, steps=4)
    small = submit(engine, "small", steps=3, seed=9)
    engine.start()
    finish([big, small])
    assert big.error is None and small.error is None
    assert results.order == ["small", "big"]  # the small one did not wait for the big one
    assert engine.stats().last_batch_rows <= 4
    assert engine.stats().max_requests_per_call == 2
    assert_alone_equal(tiny_model, results, big)
    assert_alone_equal(tiny_model, results, small)


def test_invalid_request_fails_alone(make_engine, tiny_model) -> None:
    engine, results, _ = make_engine()
    good = submit(engine, "good", seed=3)
    bad = submit(engine, "bad", prompt="cat " * 601)  # more CLIP tokens than this model takes
    finish([good, bad])
    assert isinstance(bad.error, RequestFailed) and bad.error.error_type == "InvalidRequest"
    assert "prompt" in str(bad.error)
    assert good.error is None
    assert_alone_equal(tiny_model, results, good)


def test_prompt_encoding_failure_is_isolated(make_engine, tiny_model, caplog) -> None:
    engine, results, _ = make_engine(faulty=True, start=False)
    subs = [
        submit(engine, "ok1", seed=2),
        submit(engine, "boom", prompt="BOOM"),
        submit(engine, "ok2", seed=3),
    ]
    engine.start()  # all three are admitted together: the batched encoding fails, then each alone
    finish(subs)
    assert "starting 3 requests together failed" in caplog.text
    assert isinstance(subs[1].error, RequestFailed) and subs[1].error.error_type == "PromptEncodingFailed"
    for sub in (subs[0], subs[2]):
        assert sub.error is None
        assert_alone_equal(tiny_model, results, sub)


def test_step_failure_is_isolated(make_engine, tiny_model) -> None:
    engine, results, _ = make_engine(faulty=True)
    subs = [
        submit(engine, "ok1", seed=2),
        submit(engine, "bad", prompt="STEPFAIL"),
        submit(engine, "ok2", seed=3),
    ]
    finish(subs)
    assert isinstance(subs[1].error, RequestFailed) and subs[1].error.error_type == "GenerationFailed"
    for sub in (subs[0], subs[2]):
        assert sub.error is None
        assert_alone_equal(tiny_model, results, sub)


def test_out_of_memory_halves_the_calls_and_loses_nothing(make_engine, tiny_model) -> None:
    engine, results, _ = make_engine(max_batch_rows=16, test_oom_above_rows=2)
    subs = [submit(engine, f"j{i}", seed=i, steps=4 + i) for i in range(3)]
    subs.append(submit(engine, "pair", seed=7, num_images=2, steps=4))  # 4 rows: split per image
    finish(subs)
    for sub in subs:
        assert sub.error is None, sub.error
        assert_alone_equal(tiny_model, results, sub)
    stats = engine.stats()
    assert stats.oom_splits >= 1
    assert stats.call_rows_limit <= 2


def test_rows_per_call_grow_back_after_out_of_memory(make_engine, tiny_model) -> None:
    """Memory is short only above 2 rows: after `oom_recover_calls` clean calls the engine tries
    bigger calls again (and is halved again), so one bad moment does not slow it down for good."""
    engine, results, _ = make_engine(max_batch_rows=8, test_oom_above_rows=2, oom_recover_calls=3)
    subs = [submit(engine, f"j{i}", seed=i, steps=12) for i in range(3)]
    finish(subs)
    for sub in subs:
        assert sub.error is None, sub.error
        assert_alone_equal(tiny_model, results, sub)
    assert engine.stats().oom_splits >= 2  # halved, grown back, halved again


def test_canceled_job_leaves_the_batch_and_others_finish(make_engine, tiny_model) -> None:
    engine, results, progress = make_engine()
    doomed = submit(engine, "doomed", steps=150, width=128, height=128)
    other = submit(engine, "other", steps=10, seed=4)
    wait_until(lambda: progress.latest.get("doomed", (0, 0))[0] >= 2, 60, "the doomed job to run")
    with progress.lock:
        progress.cancel.add("doomed")
        asked_at = progress.latest["doomed"][0]
    finish([doomed, other])
    assert isinstance(doomed.error, JobCanceled)
    assert progress.latest["doomed"][0] <= asked_at + 2
    assert other.error is None
    assert_alone_equal(tiny_model, results, other)
    assert engine.stats().jobs_canceled == 1


def test_timeout_is_enforced_between_steps(make_engine) -> None:
    engine, _, _ = make_engine()
    slow = submit(engine, "slow", steps=150, width=128, height=128, timeout_s=0.5)
    quick = submit(engine, "quick", steps=3)
    finish([slow, quick])
    assert isinstance(slow.error, JobTimedOut)
    assert "timed out after 0.5 s" in str(slow.error)
    assert quick.error is None


def test_drain_hands_unfinished_jobs_back_and_refuses_new_ones(make_engine) -> None:
    engine, _, progress = make_engine()
    long = submit(engine, "long", steps=150, width=128, height=128)
    wait_until(lambda: progress.latest.get("long", (0, 0))[0] >= 1, 60, "the job to run")
    engine.drain(0)
    finish([long])
    assert isinstance(long.error, WorkerShuttingDown)
    with pytest.raises(WorkerShuttingDown):
        submit(engine, "late")
    assert engine.join(30)
    assert engine.stats().jobs_requeued == 1


def test_drain_lets_running_jobs_finish_within_the_deadline(make_engine) -> None:
    engine, _, _ = make_engine()
    job = submit(engine, "job", steps=5)
    engine.drain(120)
    finish([job])
    assert job.error is None
    assert engine.join(30)


def test_a_crash_of_the_loop_itself_loses_no_job(make_engine) -> None:
    engine, _, progress = make_engine(max_batch_rows=2, start=False)
    running = submit(engine, "running", steps=50)
    waiting = submit(engine, "waiting", steps=5)  # no room beside the first: never starts

    def broken_sync(*_args):
        raise RuntimeError("a bug in the loop")

    progress.sync = broken_sync
    engine.start()
    finish([running, waiting])
    assert isinstance(running.error, EngineFailure) and running.error.retryable
    assert isinstance(waiting.error, WorkerShuttingDown)  # back to the queue, no retry used up
    assert engine.join(30) and isinstance(engine.failure, RuntimeError)
    with pytest.raises(WorkerShuttingDown):
        submit(engine, "late")


def test_warm_up_runs_on_the_engine_thread_before_any_job(make_engine) -> None:
    """PyTorch keeps cuDNN's autotuning per thread, so the warm-up must run where the jobs run: on
    the engine's thread, and finished before start() returns (no job waits behind it)."""
    engine, results, _ = make_engine(start=False)
    seen: list[str] = []
    engine.start(warm_up=lambda: seen.append(threading.current_thread().name))
    assert seen == ["sd-engine"]
    job = submit(engine, "after-warm-up")
    finish([job])
    assert job.outcome().images and "after-warm-up" in results.pictures


def test_a_failed_warm_up_is_loud_and_loses_no_job(make_engine) -> None:
    """A job handed over before start() goes back to the queue (not failed); later ones are refused."""
    engine, _, _ = make_engine(start=False)
    early = submit(engine, "early")

    def broken() -> None:
        raise RuntimeError("no GPU memory for the graphs")

    with pytest.raises(RuntimeError, match="warm-up failed.*no GPU memory"):
        engine.start(warm_up=broken)
    assert not engine.alive and engine.failure is not None
    assert early.finished and isinstance(early.error, WorkerShuttingDown)
    with pytest.raises(WorkerShuttingDown):
        submit(engine, "refused")


def test_each_decode_chunk_goes_to_the_writers_before_the_next_is_decoded(tiny_model) -> None:
    """4 one-image jobs finishing together, 2 latents per VAE call: the first two jobs' PNGs are
    stored while the second call decodes (it waits for them here), so no job waits for the others."""
    first_two_stored = threading.Event()
    decode_calls: list[int] = []

    class Results(FakeResults):
        def store(self, submission: Submission, pictures: Sequence[np.ndarray]) -> JobResult:
            result = super().store(submission, pictures)
            if {"job-0", "job-1"} <= set(self.order):
                first_two_stored.set()
            return result

    class WaitingDecode(Pipeline):
        def decode(self, images, max_batch=8):
            decode_calls.append(len(images))
            if len(decode_calls) == 2:
                assert first_two_stored.wait(30), "the first chunk was not stored before the next decode"
            return super().decode(images, max_batch)

    results = Results()
    engine = Engine(
        tiny_model,
        EngineConfig(max_batch_rows=16, vae_batch=2, idle_wait_s=0.05),
        results,
        FakeProgress(),
        pipeline_factory=WaitingDecode,
    )
    jobs = [Submission(f"job-{i}", Generation.model_validate(params(seed=i))) for i in range(4)]
    for job in jobs:
        engine.submit(job)  # before start: all four join the first batch and finish together
    engine.start()
    try:
        finish(jobs)
        for job in jobs:
            job.outcome()  # raises if a decode failed
        assert decode_calls == [2, 2]
        assert set(results.order[:2]) == {"job-0", "job-1"}
    finally:
        engine.drain(0)
        engine.join(30)
