"""img2img and inpainting in the engine's continuous batch (issue 19): they share UNet calls with
text-to-image jobs, their input images go through the VAE encoder in batches (halved when out of
memory), and every picture equals its request run alone within 1 level. Then the job function's side:
the input images read from Redis, decoded and fitted, and each bad input a clear InvalidRequest; and a
real worker process running such a mixed batch from its queue."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import redis

from models.image_inputs import ImageInputs, load_inputs
from models.pipeline import Pipeline, generate
from schemas.errors import ErrorType
from schemas.generation import Generation
from schemas.redis_keys import input_image_key
from tests.support.input_images import box_mask, encoded, init_picture
from tests.support.jobs import enqueue, max_pixel_diff, params, wait_terminal, worker_info
from tests.support.pictures import assert_pngs_equal_alone_runs
from tests.workers.test_engine import FakeProgress, FakeResults, finish
from workers.engine import Engine, EngineConfig
from workers.errors import RequestFailed
from workers.faults import SimulatedOutOfMemory
from workers.job_function import input_images
from workers.submission import Submission

# txt2img, img2img at several strengths and samplers, inpainting (4-channel UNet), one of another
# size, one unguided (1 row), one of 2 images (each its own generator)
MIXED = (
    dict(sampler="ddim", steps=6),
    dict(sampler="euler_ancestral", steps=6, init=True, strength=0.5, num_images=2),
    dict(sampler="dpmpp_2m", scheduler="karras", steps=6, init=True, strength=0.8),
    dict(sampler="uni_pc", steps=5, init=True, strength=1.0, width=48),
    dict(sampler="ddim", steps=6, init=True, mask=True, strength=0.75),
    dict(sampler="lcm", steps=4, guidance_scale=1.5, init=True, mask=True, strength=1.0),
    dict(sampler="euler", steps=6, guidance_scale=1.0, init=True, mask=True, strength=0.5),
)


def job(index: int, init: bool = False, mask: bool = False, **overrides) -> Submission:
    """A submission as the job function makes it: the request, and its input images fitted to its size."""
    if init:
        overrides |= {"init_image": f"init-{index}", "mask_image": f"mask-{index}" if mask else None}
    request = Generation.model_validate(
        params(prompt=f"a circle number {index}", seed=10 * index, **overrides)
    )
    inputs = None
    if init:
        picture = init_picture(request.width, request.height)
        inputs = ImageInputs(
            np.roll(picture, 7 * index, axis=1), box_mask(request.width, request.height) if mask else None
        )
    return Submission(f"job-{index}", request, inputs=inputs)


class CountingEncodes(Pipeline):
    """Records the images of each encode; with `memory_for`, a VAE call of more images runs out of memory."""

    def __init__(self, model, memory_for: int | None = None) -> None:
        super().__init__(model)
        self.calls: list[int] = []  # images per VAE encoder call that ran
        self.out_of_memory = 0
        encode_pixels = self.input_encoder.encode_pixels

        def counting(images: Sequence, max_batch: int = 8):
            sizes = Counter(tuple(image.shape) for image in images)  # one size per call, in order
            calls = [min(max_batch, n - start) for n in sizes.values() for start in range(0, n, max_batch)]
            if memory_for is not None and max(calls) > memory_for:
                self.out_of_memory += 1
                raise SimulatedOutOfMemory(f"TEST ONLY: {max(calls)} images in one VAE encode")
            self.calls += calls
            return encode_pixels(images, max_batch)

        self.input_encoder.encode_pixels = counting  # type: ignore[method-assign]


@pytest.fixture
def make_engine(tiny_model) -> Iterator:
    engines: list[Engine] = []

    def make(memory_for: int | None = None, vae_batch: int = 4) -> tuple[Engine, FakeResults, FakeProgress]:
        results, progress = FakeResults(), FakeProgress()
        engine = Engine(
            tiny_model,
            EngineConfig(max_batch_rows=16, vae_batch=vae_batch, idle_wait_s=0.05),
            results,
            progress,
            pipeline_factory=lambda model: CountingEncodes(model, memory_for),
        )
        engines.append(engine)
        return engine, results, progress

    yield make
    for engine in engines:
        engine.drain(0)
        engine.join(30)


def assert_alone_equal(
    tiny_model, results: FakeResults, submission: Submission, inputs: ImageInputs | None
) -> None:
    alone = generate(tiny_model, submission.params, inputs=inputs)
    got = results.pictures[submission.job_id]
    assert len(got) == len(alone) == submission.params.num_images
    for picture, reference in zip(got, alone, strict=True):
        assert max_pixel_diff(picture, reference) <= 1


@pytest.mark.parametrize("memory_for", [None, 1], ids=["plain", "encode-out-of-memory"])
def test_a_mixed_batch_equals_each_request_alone(make_engine, tiny_model, memory_for) -> None:
    engine, results, progress = make_engine(memory_for=memory_for)
    subs = [job(i, **request) for i, request in enumerate(MIXED)]
    inputs = [sub.inputs for sub in subs]
    for sub in subs:
        engine.submit(sub)
    engine.start()  # all in the first batch
    finish(subs)
    for sub, sub_inputs in zip(subs, inputs, strict=True):
        assert sub.error is None, (sub.params.sampler, sub.error)
        assert_alone_equal(tiny_model, results, sub, sub_inputs)
        assert sub.inputs is None and sub.encoded is None  # dropped once started
        # progress counts the steps each runs: int(steps * strength) for img2img
        assert progress.latest[sub.job_id] == (sub.params.steps_to_run, sub.params.steps_to_run)
    stats = engine.stats()
    assert stats.max_requests_per_call >= 6  # txt2img, img2img and inpainting rows in one UNet call
    pipeline = engine.pipeline
    assert isinstance(pipeline, CountingEncodes)
    if memory_for is None:
        assert pipeline.calls == [4, 1, 1]  # one encode for all: 5 init images of 64x64, 1 of 48x64
    else:
        assert pipeline.out_of_memory >= 1 and set(pipeline.calls) == {1}
        assert engine.vae_encode.value == 1


def test_a_job_without_its_input_images_fails_alone(make_engine, tiny_model) -> None:
    engine, results, _ = make_engine()
    broken = job(0, init=True, strength=0.5)
    broken.inputs = None
    fine = job(1, init=True, strength=0.5)
    fine_inputs = fine.inputs
    for sub in (broken, fine):
        engine.submit(sub)
    engine.start()
    finish([broken, fine])
    assert isinstance(broken.error, RequestFailed) and broken.error.error_type == ErrorType.INVALID_REQUEST
    assert "its image was not given" in str(broken.error)
    assert fine.error is None
    assert_alone_equal(tiny_model, results, fine, fine_inputs)


# --- the job function's side: input images from Redis ----------------------------------------------


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def request_for(**overrides) -> Generation:
    base = dict(prompt="x", width=64, height=48, init_image="photo", strength=0.5, mask_blur=0)
    return Generation.model_validate({**base, **overrides})


def test_input_images_are_read_from_redis_decoded_and_fitted(client: redis.Redis) -> None:
    picture, mask = init_picture(80, 60), box_mask(80, 60)
    client.set(input_image_key("photo"), encoded(picture, "JPEG"))
    client.set(input_image_key("holes"), encoded(mask, "WEBP"))
    inputs = input_images(client, request_for(mask_image="holes", mask_blur=2))
    assert inputs is not None and inputs.size == (64, 48)
    assert inputs.init.shape == (48, 64, 3) and inputs.mask is not None and inputs.mask.shape == (48, 64)
    assert 0 < inputs.mask.mean() < 255
    assert input_images(client, Generation(prompt="txt2img")) is None


@pytest.mark.parametrize(
    ("stored", "overrides", "message"),
    [
        ({}, {}, "init_image: no input image named 'photo' in Redis (it expired or was never stored)"),
        ({"photo": b"not an image at all"}, {}, "init_image: not a readable PNG, JPEG or WebP image"),
        ({"photo": "truncated"}, {}, "init_image: not a readable PNG, JPEG or WebP image"),
        ({"photo": "png", "holes": b"GIF89a..."}, {"mask_image": "holes"}, "mask_image: not a readable"),
        ({"photo": "png"}, {"mask_image": "holes"}, "mask_image: no input image named 'holes'"),
        (
            {"photo": "png", "holes": "small"},
            {"mask_image": "holes"},
            "mask_image: the mask is 40x30, the init",
        ),
    ],
    ids=["missing", "not-an-image", "truncated", "mask-not-an-image", "mask-missing", "mask-of-another-size"],
)
def test_bad_input_images_are_an_invalid_request_naming_the_field(
    client: redis.Redis, stored: dict, overrides: dict, message: str
) -> None:
    png = encoded(init_picture(80, 60))
    files = {"png": png, "truncated": png[: len(png) // 2], "small": encoded(box_mask(40, 30))}
    for name, data in stored.items():
        client.set(input_image_key(name), files.get(data, data) if isinstance(data, str) else data)
    with pytest.raises(RequestFailed) as raised:
        input_images(client, request_for(**overrides))
    assert raised.value.error_type == ErrorType.INVALID_REQUEST
    assert message in str(raised.value)


def test_a_real_worker_runs_txt2img_img2img_and_inpainting_together_each_as_alone(
    client: redis.Redis, start_worker, tiny_model
) -> None:
    """Queued before the worker starts, so they share its first UNet calls: each picture equals its
    request alone within 1 level, the input images read from Redis by name."""
    init, mask = encoded(init_picture(80, 60), "JPEG"), encoded(box_mask(80, 60))
    client.set(input_image_key("real-init"), init, ex=600)
    client.set(input_image_key("real-mask"), mask, ex=600)
    image = {"init_image": "real-init", "width": 64, "height": 48, "resize_mode": "crop"}
    requests = [
        params(sampler="ddim", steps=10, seed=1, width=64, height=48),
        params(sampler="euler_ancestral", steps=8, seed=2, strength=0.75, **image),
        params(
            sampler="dpmpp_2m", steps=8, seed=3, strength=0.75, mask_image="real-mask", mask_blur=2, **image
        ),
    ]
    jobs = [(enqueue(client, p, model="tiny-sd1").id, p) for p in requests]
    worker = start_worker(SD_MODEL_NAME="tiny-sd1", SD_SLOTS="3")
    outcomes = wait_terminal(client, [job_id for job_id, _ in jobs], 120)
    assert set(outcomes.values()) == {"finished"}, (outcomes, worker.logs()[-2000:])
    for job_id, job_params in jobs:
        request = Generation.model_validate(job_params)
        inputs = None
        if request.init_image is not None:
            inputs = load_inputs(
                init, mask if request.mask_image else None, 64, 48, "crop", request.mask_blur
            )
        assert_pngs_equal_alone_runs(client, tiny_model, job_id, job_params, inputs)
    assert worker_info(client, worker.name).stats.max_requests_per_call == 3  # one UNet call held all three
