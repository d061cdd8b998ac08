"""Every sampler in the continuous batch (issue 16, item 4): one UNet call holds rows of different
samplers, schedules, step counts and guidance scales, and a picture equals the same request alone
within 1 level, through an out-of-memory split, a batch-mate's failed step, a cancel and a SIGKILL.

What could go wrong is each image's own state: a multistep sampler's history (dpmpp_2m,
dpmpp_2m_sde, uni_pc) advanced twice by a retried step, or a stochastic sampler's noise
(euler_ancestral, dpmpp_2m_sde, lcm, ddim with eta > 0) drawn twice from the image's generator.
The engine-level checks make the faults surface both before the UNet call (as the engine's test
hook and a failing pipeline do) and as late as a step can fail: after every sampler group of the
call has stepped, drawing noise and building histories, just before anything is committed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest

from models.pipeline import ActiveImage, Pipeline
from models.samplers import Sampler
from models.stable_diffusion import StableDiffusion
from schemas.redis_keys import cancel_key, progress_key
from tests.support.jobs import (
    enqueue,
    fetch,
    params,
    status,
    wait_terminal,
    wait_until,
    worker_info,
)
from tests.support.pictures import assert_pngs_equal_alone_runs
from tests.workers.test_engine import (
    FakeProgress,
    FakeResults,
    FaultyPipeline,
    assert_alone_equal,
    finish,
    submit,
)
from workers.engine import Engine, EngineConfig
from workers.errors import RequestFailed
from workers.faults import SimulatedOutOfMemory

JOBS_BOUND_S = 240  # hang guards only, never a speed requirement
RECOVERY_BOUND_S = 120

# 8 concurrent requests, 7 samplers: schedules, step counts and guidance scales differ, one is
# unguided (1 row), one has 2 images (each with its own generator), one is of another size
MIXED = (
    dict(sampler="ddim", steps=6, guidance_scale=7.5, negative_prompt="blurry"),
    dict(sampler="ddim", eta=0.8, steps=5, guidance_scale=5.0),
    dict(sampler="euler", scheduler="karras", steps=7, guidance_scale=3.0),
    dict(sampler="euler_ancestral", steps=8, guidance_scale=1.0, num_images=2),
    dict(sampler="dpmpp_2m", scheduler="karras", steps=6, guidance_scale=7.5),
    dict(sampler="dpmpp_2m_sde", scheduler="exponential", steps=5, guidance_scale=12.0),
    dict(sampler="uni_pc", scheduler="sgm_uniform", steps=4, guidance_scale=6.0),
    dict(sampler="lcm", steps=4, guidance_scale=1.5, width=48),
)

# the samplers with a history per image or noise from each image's generator: 6 jobs, 7 images,
# 13 UNet rows (one call of 16), one job of 2 images so that a split can part a job's images
HISTORY_AND_NOISE = (
    dict(sampler="dpmpp_2m", scheduler="karras", steps=6, num_images=2),
    dict(sampler="uni_pc", steps=5),
    dict(sampler="euler_ancestral", steps=6, guidance_scale=1.0),  # unguided: 1 row
    dict(sampler="dpmpp_2m_sde", scheduler="karras", steps=5),
    dict(sampler="lcm", steps=4, guidance_scale=1.5),
    dict(sampler="ddim", eta=1.0, steps=5),
)


def mixed_params(requests: Sequence[dict], first_seed: int) -> list[dict]:
    return [
        params(prompt=f"a {r['sampler']} circle number {i}", seed=first_seed + 10 * i, **r)
        for i, r in enumerate(requests)
    ]


# --- the engine in-process ---------------------------------------------------------------------------


class LateFaults(Pipeline):
    """Faults raised as late as `Pipeline.step` can raise: after the UNet call and after every sampler
    group of the call has stepped (the stochastic ones drawing noise from their images' generators,
    the multistep ones building new histories), by the call's last group, before anything is
    committed. A call of more than `oom_above_rows` rows runs out of memory there; a call holding an
    image whose prompt contains STEPFAIL fails there."""

    def __init__(self, model: StableDiffusion, oom_above_rows: int | None = None) -> None:
        super().__init__(model)
        self.oom_above_rows = oom_above_rows
        self.faulted_calls: list[tuple[str, ...]] = []  # the sampler groups of each call that faulted
        self._samplers: dict[str, Sampler] = {}
        self._fault: Exception | None = None
        self._groups: tuple[str, ...] = ()

    def start(self, items):
        started = super().start(items)
        for images in started:
            for image in images:
                image.sampler = self._raising_after_its_step(image.sampler)
        return started

    def step(self, images: Sequence[ActiveImage]) -> None:
        rows = sum(image.rows for image in images)
        if self.oom_above_rows is not None and rows > self.oom_above_rows:
            self._fault = SimulatedOutOfMemory(f"TEST ONLY: out of memory after the samplers of {rows} rows")
        elif any("STEPFAIL" in image.request.prompt for image in images):
            self._fault = RuntimeError("TEST ONLY: a sampler exploded")
        else:
            self._fault = None
        # Pipeline.step steps its sampler groups in order of first appearance
        self._groups = tuple(dict.fromkeys(image.sampler.name for image in images))
        super().step(images)

    def _after_group(self, name: str) -> None:
        if self._fault is not None and name == self._groups[-1]:
            self.faulted_calls.append(self._groups)
            raise self._fault

    def _raising_after_its_step(self, sampler: Sampler) -> Sampler:
        if sampler.name not in self._samplers:
            pipeline = self

            class RaisingAfterItsStep(type(sampler)):
                def step(self, *args, **kwargs):
                    result = super().step(*args, **kwargs)
                    pipeline._after_group(self.name)
                    return result

            self._samplers[sampler.name] = RaisingAfterItsStep()
        return self._samplers[sampler.name]


@pytest.fixture
def make_engine(tiny_model) -> Iterator[Callable[..., tuple[Engine, FakeResults]]]:
    """make_engine(pipeline_factory, **EngineConfig fields) -> an engine (not started: submit, then
    start it, so the first step holds every job) and its results."""
    engines: list[Engine] = []

    def make(
        pipeline_factory: Callable[[StableDiffusion], Pipeline] = Pipeline, **config
    ) -> tuple[Engine, FakeResults]:
        results = FakeResults()
        config = {"max_batch_rows": 16, "vae_batch": 4, "idle_wait_s": 0.05, **config}
        engine = Engine(tiny_model, EngineConfig(**config), results, FakeProgress(), pipeline_factory)
        engines.append(engine)
        return engine, results

    yield make
    for engine in engines:
        engine.drain(0)
        engine.join(30)


@pytest.mark.parametrize("where", ["before the UNet call", "after the samplers stepped"])
def test_out_of_memory_split_advances_no_history_and_draws_no_noise_twice(
    make_engine, tiny_model, where
) -> None:
    """Memory for 2 rows only; after 3 clean calls the engine tries bigger calls again, so calls are
    split again mid-run, when the multistep samplers hold histories."""
    if where == "before the UNet call":
        engine, results = make_engine(test_oom_above_rows=2, oom_recover_calls=3)
    else:
        engine, results = make_engine(lambda model: LateFaults(model, oom_above_rows=2), oom_recover_calls=3)
    subs = [submit(engine, f"job-{i}", **p) for i, p in enumerate(mixed_params(HISTORY_AND_NOISE, 300))]
    engine.start()
    finish(subs)
    for sub in subs:
        assert sub.error is None, (sub.params.sampler, sub.error)
        assert_alone_equal(tiny_model, results, sub)
    assert engine.stats().oom_splits >= 2  # halved, grown back, halved again
    if isinstance(engine.pipeline, LateFaults):  # the faults came after several samplers had stepped
        assert max(len(groups) for groups in engine.pipeline.faulted_calls) >= 4


@pytest.mark.parametrize("where", ["before the UNet call", "after the samplers stepped"])
def test_a_failed_step_leaves_its_batch_mates_histories_and_generators_alone(
    make_engine, tiny_model, where
) -> None:
    """The combined call fails; isolation runs it again, then each job alone: the batch-mates'
    pictures are those of their alone runs, so the failed attempts changed none of their states."""
    engine, results = make_engine(FaultyPipeline if where == "before the UNet call" else LateFaults)
    requests = mixed_params(HISTORY_AND_NOISE, 400)
    requests.insert(3, params(prompt="STEPFAIL", sampler="euler", scheduler="karras", steps=6, seed=9))
    subs = [submit(engine, f"job-{i}", **p) for i, p in enumerate(requests)]
    engine.start()
    finish(subs)
    failed = subs.pop(3)
    assert isinstance(failed.error, RequestFailed) and failed.error.error_type == "GenerationFailed"
    for sub in subs:
        assert sub.error is None, (sub.params.sampler, sub.error)
        assert_alone_equal(tiny_model, results, sub)
    if isinstance(engine.pipeline, LateFaults):
        assert len(engine.pipeline.faulted_calls[0]) == 7  # every sampler of the batch had stepped


# --- real workers ----------------------------------------------------------------------------------


def step_of(client, job_id: str) -> int:
    return int(client.hget(progress_key(job_id), "step") or 0)


def test_mixed_samplers_share_unet_calls_cancel_within_two_steps_and_equal_alone_runs(
    client, start_worker, tiny_model
) -> None:
    """A multistep or LCM job canceled mid-run leaves the batch within two steps; the 8 mixed
    requests around it equal their alone runs, and the worker's UNet calls carried several samplers."""
    worker = start_worker(SD_SLOTS="11", SD_MAX_BATCH_ROWS="32")
    doomed = [  # enqueued first, so they run beside the mixed requests from their first step
        enqueue(client, params(sampler=sampler, steps=steps, seed=seed, guidance_scale=1.0)).id
        for sampler, steps, seed in (("dpmpp_2m", 150, 1), ("uni_pc", 150, 2), ("lcm", 50, 3))
    ]
    jobs = [(enqueue(client, p).id, p) for p in mixed_params(MIXED, 100)]
    wait_until(lambda: all(step_of(client, j) >= 2 for j in doomed), 60, "the doomed jobs to run")
    asked_at = {}
    for job_id in doomed:
        client.set(cancel_key(job_id), b"1", ex=600)  # what the API's DELETE does for a running job
        asked_at[job_id] = step_of(client, job_id)
    assert wait_terminal(client, doomed, JOBS_BOUND_S) == dict.fromkeys(doomed, "canceled")
    for job_id in doomed:
        assert step_of(client, job_id) <= asked_at[job_id] + 2, fetch(client, job_id).kwargs["params"]
    outcomes = wait_terminal(client, [job_id for job_id, _ in jobs], JOBS_BOUND_S)
    assert set(outcomes.values()) == {"finished"}, outcomes
    for job_id, job_params in jobs:
        assert_pngs_equal_alone_runs(client, tiny_model, job_id, job_params)
    wait_until(lambda: worker_info(client, worker.name).stats.jobs_succeeded == 8, 10, "published counters")
    stats = worker_info(client, worker.name).stats
    assert stats.jobs_canceled == 3 and stats.images_generated == 9
    # no sampler has more than two of these requests: a call of three or more mixed samplers
    assert stats.max_requests_per_call >= 3, stats


def test_jobs_of_a_killed_worker_rerun_split_by_out_of_memory_and_equal_alone_runs(
    client, start_worker, start_janitor, tiny_model
) -> None:
    """SIGKILL mid-batch, after the multistep and stochastic jobs have stepped: the janitor retries
    them, and the new worker (with memory for 2 UNet rows per call) reruns them from the start, split
    call by call, each picture equal to its alone run."""
    janitor = start_janitor(SD_JANITOR_INTERVAL_S="0.5")
    doomed = start_worker(SD_SLOTS="6", SD_MAX_BATCH_ROWS="16")
    long_runs = [{**r, "steps": 24} for r in HISTORY_AND_NOISE]  # about 1-2 s in the batch
    jobs = [(enqueue(client, p, retries=1).id, p) for p in mixed_params(long_runs, 500)]
    job_ids = [job_id for job_id, _ in jobs]
    wait_until(lambda: all(step_of(client, j) >= 1 for j in job_ids), 60, "the batch to run")
    doomed.kill()
    assert {status(client, j) for j in job_ids} == {"started"}  # killed mid-run, none finished
    rescuer = start_worker(SD_SLOTS="6", SD_MAX_BATCH_ROWS="16", SD_TEST_OOM_ABOVE_ROWS="2")
    outcomes = wait_terminal(client, job_ids, RECOVERY_BOUND_S)
    assert set(outcomes.values()) == {"finished"}, outcomes
    assert "abandoned job(s) retried" in janitor.logs()
    for job_id, job_params in jobs:
        assert fetch(client, job_id).worker_name.startswith(rescuer.name)
        assert_pngs_equal_alone_runs(client, tiny_model, job_id, job_params)
    wait_until(lambda: worker_info(client, rescuer.name).stats.jobs_succeeded == 6, 10, "published counters")
    stats = worker_info(client, rescuer.name).stats
    assert stats.oom_splits >= 1 and stats.last_batch_rows <= 2, stats
