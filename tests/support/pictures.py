"""Comparing what a worker stored with the same request generated alone in the test process."""

from __future__ import annotations

from models.image_files import read_parameters
from models.image_inputs import ImageInputs
from models.pipeline import generate
from schemas.generation import Generation
from schemas.redis_keys import image_key
from tests.support.jobs import max_pixel_diff, png_pixels, result_of


def assert_pngs_equal_alone_runs(
    client, tiny_model, job_id: str, job_params: dict, inputs: ImageInputs | None = None
) -> None:
    """`inputs`: an img2img or inpainting job's input images, fitted to its size."""
    request = Generation.model_validate(job_params)
    result = result_of(client, job_id)
    alone = generate(tiny_model, request, inputs=inputs)
    assert [ref.index for ref in result.images] == list(range(request.num_images))
    assert [ref.seed for ref in result.images] == request.image_seeds()
    for ref, reference in zip(result.images, alone, strict=True):
        assert ref.key == image_key(job_id, ref.index)
        png = client.get(ref.key)
        assert png is not None, f"no PNG at {ref.key}"
        assert 0 < client.ttl(ref.key) <= 3600
        assert max_pixel_diff(png_pixels(png), reference) <= 1
        text = read_parameters(png)
        assert text is not None and request.prompt in text and f"Seed: {ref.seed}" in text
