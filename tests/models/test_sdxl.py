"""SDXL against diffusers (issue 17): a tiny random SDXL-architecture model built with diffusers' own
classes (two text encoders, the "text_time" added conditioning, two transformer layers in a level)
gives our pipeline the picture of diffusers' StableDiffusionXLPipeline within 2 levels, every module
equals diffusers' within 1e-4, the single file equals the folder, and requests batched together
equal their alone runs within 1 level."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.families import family_of
from models.families.sdxl import SDXLPromptEncoder
from models.loading import load_model
from models.pipeline import Pipeline, check_generation, generate
from models.stable_diffusion import StableDiffusion
from schemas.generation import Generation
from tests.support.diffusers_reference import _pipeline, diffusers_images, max_level_difference

PROMPT = "a red circle in the top left on a blue background"
NEGATIVE = "a green square"
SIZE_FIELDS = dict(original_size=(1024, 768), crops_coords_top_left=(32, 16), target_size=(512, 512))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """On a small shared machine torch's thread pool, oversubscribed, makes tiny models much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ours(sdxl_models: dict[str, Path]) -> StableDiffusion:
    return load_model(sdxl_models["sdxl"])


@pytest.fixture(scope="module")
def reference(sdxl_models: dict[str, Path]):
    """diffusers' StableDiffusionXLPipeline on the same folder (the one diffusers_images runs)."""
    pipe, _ = _pipeline(str(sdxl_models["sdxl"]))
    return pipe


# ------------------------------------------------------------------------------------ pictures


@pytest.mark.parametrize(
    ("sampler", "scheduler", "width", "height", "extra"),
    [
        pytest.param(
            "ddim", "normal", 64, 64, dict(negative_prompt=NEGATIVE, num_images=2), id="ddim-64x64-negative"
        ),
        pytest.param("dpmpp_2m", "karras", 80, 48, {}, id="dpmpp_2m-karras-80x48-empty-negative"),
        pytest.param(
            "euler_ancestral",
            "normal",
            48,
            64,
            dict(negative_prompt=NEGATIVE, **SIZE_FIELDS),
            id="euler_a-48x64-negative-size-fields",
        ),
        pytest.param("euler", "normal", 64, 64, dict(guidance_scale=1.0), id="euler-64x64-unguided"),
    ],
)
def test_same_picture_as_diffusers(
    sampler: str,
    scheduler: str,
    width: int,
    height: int,
    extra: dict,
    ours: StableDiffusion,
    sdxl_models: dict[str, Path],
) -> None:
    request = Generation(
        **{
            "prompt": PROMPT,
            "width": width,
            "height": height,
            "steps": 5,
            "guidance_scale": 6.0,
            "sampler": sampler,
            "scheduler": scheduler,
            "seed": 21,
            **extra,
        }
    )
    expected = diffusers_images(sdxl_models["sdxl"], request)
    got = np.stack(generate(ours, request))
    assert got.shape == expected.shape == (request.num_images, height, width, 3)
    difference = max_level_difference(got, expected)
    print(f"SDXL parity {sampler}-{scheduler} {width}x{height} {sorted(extra)}: {difference} levels")
    assert difference <= 2
    assert got.std() > 10  # a real picture, not a flat image that would match anything


def test_size_fields_change_the_picture(ours: StableDiffusion) -> None:
    """The six numbers reach the UNet: other numbers, another picture (same seed)."""
    request = Generation(prompt=PROMPT, width=64, height=64, steps=3, seed=5)
    plain = generate(ours, request)[0]
    conditioned = generate(ours, replace_request(request, **SIZE_FIELDS))[0]
    assert np.abs(plain.astype(int) - conditioned.astype(int)).max() > 0


def replace_request(request: Generation, **changes) -> Generation:
    return Generation.model_validate({**request.model_dump(), **changes})


# ------------------------------------------------------------------------------------- modules


def test_modules_equal_diffusers(ours: StableDiffusion, reference) -> None:
    """UNet (with text_embeds and time_ids, two rows of different numbers), VAE decode, and both text
    encoders through the prompt encoding (context, pooled, negative, zeros), all within 1e-4."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((2, 4, 8, 6), generator=generator)
    timesteps = torch.tensor([999.0, 321.0])
    context = torch.randn((2, 77, 80), generator=generator)
    text_embeds = torch.randn((2, 24), generator=generator)
    time_ids = torch.tensor([[64.0, 48, 0, 0, 64, 48], [1024, 768, 32, 16, 512, 512]])
    with torch.no_grad():
        mine = ours.unet(sample, timesteps, context, None, {"text_embeds": text_embeds, "time_ids": time_ids})
        theirs = reference.unet(
            sample, timesteps, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}
        ).sample
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)

        latents = torch.randn((1, 4, 8, 8), generator=generator)
        torch.testing.assert_close(
            ours.vae.decode(latents), reference.vae.decode(latents).sample, rtol=0, atol=1e-4
        )

        encoder = SDXLPromptEncoder(ours, max_text_batch=64)
        (cond, uncond), (cond_zero, uncond_zero) = encoder.encode_pairs([PROMPT, PROMPT], [NEGATIVE, ""])
        embeds, negative_embeds, pooled, negative_pooled = reference.encode_prompt(
            PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt=NEGATIVE
        )
        torch.testing.assert_close(cond.context, embeds[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(uncond.context, negative_embeds[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(cond.row_inputs["text_embeds"], pooled, rtol=0, atol=1e-4)
        torch.testing.assert_close(uncond.row_inputs["text_embeds"], negative_pooled, rtol=0, atol=1e-4)
        # an empty negative prompt: diffusers' force_zeros_for_empty_prompt (negative_prompt=None)
        _, zero_embeds, _, zero_pooled = reference.encode_prompt(
            PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=True
        )
        assert not zero_embeds.any() and not zero_pooled.any()
        torch.testing.assert_close(cond_zero.context, embeds[0], rtol=0, atol=1e-4)
        assert not uncond_zero.context.any() and not uncond_zero.row_inputs["text_embeds"].any()
        assert uncond_zero.context.shape == cond_zero.context.shape == (77, 80)


def test_empty_negative_without_force_zeros_is_the_encoded_empty_prompt(ours: StableDiffusion) -> None:
    encoder = SDXLPromptEncoder(replace(ours, force_zeros_for_empty_prompt=False), max_text_batch=64)
    ((_, uncond),) = encoder.encode_pairs([PROMPT], [""])
    (empty,) = encoder.encode([("", 1)])
    assert uncond.context.abs().max() > 0
    torch.testing.assert_close(uncond.context, empty.context, rtol=0, atol=0)


def test_long_prompt_chunks_through_both_encoders_and_pools_its_first_chunk(ours: StableDiffusion) -> None:
    encoder = SDXLPromptEncoder(ours, max_text_batch=3)  # 3 chunks per call: calls split a prompt too
    words = " ".join(["a red circle"] * 25)  # 75 tokens: exactly one chunk
    ((long, negative), (short, _)) = encoder.encode_pairs([words + " and a dog", words], ["blurry", None])
    assert long.context.shape == negative.context.shape == (2 * 77, 80)  # negative padded to 2 chunks
    assert short.context.shape == (77, 80)
    torch.testing.assert_close(long.context[:77], short.context, rtol=0, atol=1e-6)
    # the pooled embedding is the first chunk's: what diffusers gives for the prompt truncated to 77
    torch.testing.assert_close(
        long.row_inputs["text_embeds"], short.row_inputs["text_embeds"], rtol=0, atol=1e-6
    )
    a = generate(ours, Generation(prompt=words + " and a dog", width=64, height=64, steps=2, seed=1))[0]
    b = generate(ours, Generation(prompt=words + " and a cat", width=64, height=64, steps=2, seed=1))[0]
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0  # tokens past 77 count


# --------------------------------------------------------------------------- single file, batching


def test_single_file_equals_folder_and_diffusers_reads_it(
    ours: StableDiffusion, sdxl_models: dict[str, Path]
) -> None:
    from diffusers import StableDiffusionXLPipeline

    from_file = load_model(sdxl_models["sdxl_file"], config=sdxl_models["sdxl"])
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(from_file, name).state_dict(), getattr(ours, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    request = Generation(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=48, steps=2, seed=3)
    assert np.array_equal(generate(from_file, request)[0], generate(ours, request)[0])

    pipe = StableDiffusionXLPipeline.from_single_file(
        str(sdxl_models["sdxl_file"]), config=str(sdxl_models["sdxl"]), local_files_only=True
    )
    folder = _pipeline(str(sdxl_models["sdxl"]))[0]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(folder, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name


class CountingUNet:
    """Calls the UNet and records each call's rows and per-row input names."""

    def __init__(self, unet) -> None:
        self.unet = unet
        self.calls: list[tuple[int, tuple[str, ...]]] = []

    def __call__(self, sample, timesteps, context, mask=None, row_inputs=None):
        self.calls.append((sample.shape[0], tuple(sorted(row_inputs or {}))))
        return self.unet(sample, timesteps, context, mask, row_inputs)


def test_mixed_batch_shares_unet_calls_and_equals_alone(ours: StableDiffusion) -> None:
    """Different size fields, step counts, samplers, prompt lengths, negative or not, guided or not:
    one UNet call per step for all of them, each picture equal to its alone run within 1 level."""
    long_prompt = " ".join(["a blue square"] * 30)  # 90 tokens: two chunks, a masked context
    requests = {
        "plain": Generation(prompt=PROMPT, width=64, height=64, steps=4, seed=1),
        "negative": Generation(
            prompt="a cat", negative_prompt=NEGATIVE, width=64, height=64, steps=5, seed=2, sampler="euler"
        ),
        "sized": Generation(
            prompt="a dog",
            width=64,
            height=64,
            steps=3,
            seed=3,
            sampler="dpmpp_2m",
            scheduler="karras",
            **SIZE_FIELDS,
        ),
        "unguided-long": Generation(
            prompt=long_prompt, width=64, height=64, steps=4, guidance_scale=1.0, seed=4
        ),
        "two": Generation(
            prompt="a tree", width=64, height=64, steps=4, seed=5, num_images=2, sampler="euler_ancestral"
        ),
    }
    alone = {key: generate(ours, request) for key, request in requests.items()}
    counting = CountingUNet(ours.unet)
    pipeline = Pipeline(ours, unet_runner=counting)
    started = pipeline.start(list(requests.items()))
    running = [image for images in started for image in images]
    while any(not image.done for image in running):
        pipeline.step([image for image in running if not image.done])
    assert len(counting.calls) == 5  # the longest run's steps: every request shared every call
    assert counting.calls[0] == (6 + 5, ("text_embeds", "time_ids"))  # 6 images, 5 guided
    for key in requests:
        images = [image for image in running if image.key == key]
        for a, b in zip(alone[key], pipeline.decode(images), strict=True):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, key


# --------------------------------------------------------------------------------------- fields


def test_sdxl_fields_are_refused_by_other_families(
    ours: StableDiffusion, random_models: dict[str, Path]
) -> None:
    sd1 = load_model(random_models["sd1"])
    assert family_of(sd1).name == "sd" and family_of(ours).name == "sdxl"
    for name, value in SIZE_FIELDS.items():
        request = Generation(prompt="x", width=64, height=64, **{name: value})
        with pytest.raises(ValueError, match=f"{name} is an SDXL size condition; this model is SD 1.x/2.x"):
            check_generation(sd1, request)
        check_generation(ours, request)


def test_native_size_and_vae_scale(ours: StableDiffusion) -> None:
    assert ours.native_size == (64, 64)  # the tiny UNet's sample_size 8, times 8
    assert ours.vae.config.scaling_factor == 0.13025
    assert ours.context_dim == 80 and ours.force_zeros_for_empty_prompt is True


def test_command_line_draws_at_the_native_size_with_size_fields(
    sdxl_models: dict[str, Path], tmp_path: Path, ours: StableDiffusion
) -> None:
    from models.image_files import read_parameters
    from models.txt2img import main
    from tests.support.jobs import png_pixels

    out = tmp_path / "out.png"
    argv = ["--model", str(sdxl_models["sdxl"]), "--prompt", PROMPT, "--steps", "2", "--seed", "7"]
    assert main([*argv, "--target-size", "512", "512", "--out", str(out)]) == 0
    request = Generation(prompt=PROMPT, width=64, height=64, steps=2, seed=7, target_size=(512, 512))
    assert np.array_equal(png_pixels(out.read_bytes()), generate(ours, request)[0])
    assert "Size: 64x64" in (read_parameters(out.read_bytes()) or "")


def test_bucketed_runner_keeps_a_buffer_per_row_input(ours: StableDiffusion) -> None:
    """models/accel.py's bucketed path (CUDA graphs' static buffers, run eagerly here): SDXL's
    text_embeds and time_ids get their own buffers, padded rows change nothing."""
    from models.accel import AccelConfig, UNetRunner

    runner = UNetRunner(ours.unet, AccelConfig(pad_to_bucket=True, buckets=(4, 8)))
    assert runner.warm_up((4, 8, 8), (77, ours.context_dim), max_rows=4) == 1
    request = Generation(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=3, seed=9, **SIZE_FIELDS
    )
    plain = generate(ours, request)[0]
    bucketed = generate(ours, request, unet_runner=runner)[0]
    assert np.abs(plain.astype(int) - bucketed.astype(int)).max() <= 1
    assert "text_embeds 24, time_ids 6" in runner.stats().keys[0]
    assert runner.stats().padded_rows > 0


def test_unet_with_added_conditioning_compiles_as_one_graph(ours: StableDiffusion) -> None:
    """No graph break in the "text_time" path either: fit for torch.compile and CUDA graphs."""
    generator = torch.Generator().manual_seed(1)
    sample, context = (
        torch.randn((2, 4, 8, 8), generator=generator),
        torch.randn((2, 77, 80), generator=generator),
    )
    row_inputs = {
        "text_embeds": torch.randn((2, 24), generator=generator),
        "time_ids": torch.full((2, 6), 64.0),
    }
    timesteps = torch.tensor([10.0, 500.0])
    torch._dynamo.reset()
    compiled = torch.compile(ours.unet, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected = ours.unet(sample, timesteps, context, None, row_inputs)
        torch.testing.assert_close(
            compiled(sample, timesteps, context, None, row_inputs), expected, rtol=0, atol=0
        )
    with pytest.raises(ValueError, match="needs the row inputs text_embeds and time_ids"):
        ours.unet(sample, timesteps, context)
    with pytest.raises(ValueError, match=r"time_ids has shape \(2, 5\), expected \(B, 6\)"):
        ours.unet(sample, timesteps, context, None, {**row_inputs, "time_ids": torch.zeros((2, 5))})
