"""img2img and inpainting against diffusers (issue 19): StableDiffusionImg2ImgPipeline,
StableDiffusionInpaintPipeline with an ordinary (4-channel) and an inpainting (9-channel) UNet, and
StableDiffusionXLImg2ImgPipeline, on tiny random models with CPU generators: the same pictures within 2
levels per pixel, at strengths 0.3, 0.75 and 1, square and not, with a negative prompt. Then what the
parity cannot show: an all-black mask, progress, the UNet's fast path with an inpainting UNet, and
loading inpainting checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from models.accel import AccelConfig, UNetRunner
from models.image_inputs import ImageInputs
from models.img2img import pixels
from models.loading import load_model
from models.pipeline import Pipeline, generate
from models.random_model import build_random_model
from models.single_file import CheckpointError
from models.stable_diffusion import StableDiffusion
from schemas.generation import Generation
from tests.support.diffusers_reference import diffusers_edit_images, max_level_difference
from tests.support.input_images import box_mask, init_picture

PROMPT = "a red circle in the top left on a blue background"
NEGATIVE = "a green square"
STEPS = 7  # strength 0.3 runs 2 steps, 0.75 runs 5, 1 runs 7
CORE = (("ddim", "normal"), ("euler_ancestral", "normal"), ("dpmpp_2m", "karras"), ("uni_pc", "normal"))
STRENGTHS = (0.3, 0.75, 1.0)
SIZES = ((64, 64), (48, 64), (64, 48))
# the models and the diffusers pipeline each is compared with: img2img (SD 1.x, the img2img pipeline),
# inpaint (SD 1.x, the inpainting pipeline), inpainting-unet (the 9-channel checkpoint, the same)
MODES = ("img2img", "inpaint", "inpainting-unet")


def core_cases() -> list:
    """Each core sampler at each strength, in turn with each pipeline (a Latin square: every pipeline
    with every core sampler and every strength), the sizes taking turns."""
    return [
        pytest.param(
            MODES[(i + j) % 3],
            sampler,
            scheduler,
            strength,
            *SIZES[(i + 2 * j) % 3],
            id=f"{MODES[(i + j) % 3]}-{sampler}-{strength}",
        )  # fmt: skip
        for i, (sampler, scheduler) in enumerate(CORE)
        for j, strength in enumerate(STRENGTHS)
    ]


# (mode, sampler, scheduler, strength, width, height)
CASES = [
    *core_cases(),
    pytest.param("img2img", "ddim", "normal", 1.0, 64, 48, id="img2img-ddim-1.0"),
    pytest.param("inpaint", "ddim", "normal", 0.3, 48, 64, id="inpaint-ddim-0.3"),
    pytest.param("img2img", "euler", "normal", 0.6, 64, 64, id="img2img-euler-0.6"),
    pytest.param("img2img", "dpmpp_2m_sde", "karras", 0.6, 48, 64, id="img2img-dpmpp_2m_sde-0.6"),
    pytest.param("inpaint", "lcm", "normal", 0.6, 64, 48, id="inpaint-lcm-0.6"),
    # an inpainting checkpoint without a mask: diffusers' inpainting pipeline with a white mask
    pytest.param("inpainting-unet-no-mask", "euler_ancestral", "normal", 0.6, 64, 64, id="9ch-no-mask"),
    pytest.param("inpainting-unet-txt2img", "ddim", "normal", 1.0, 48, 64, id="9ch-txt2img"),
    # zero terminal SNR (v-prediction, trailing): at strength 1 the first level is pure noise
    pytest.param("zero-snr", "ddim", "normal", 1.0, 64, 64, id="zero-snr-ddim-1.0"),
    pytest.param("zero-snr", "euler", "normal", 1.0, 48, 64, id="zero-snr-euler-1.0"),
    pytest.param("sdxl", "euler", "normal", 0.6, 64, 64, id="sdxl-euler-0.6"),
]


@pytest.fixture(scope="module")
def folders(random_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny random models by mode: SD 1.x, its inpainting variant (a diffusers folder, and a single
    file "inpainting_file"), SD 2.x with zero terminal SNR and trailing spacing."""
    root = tmp_path_factory.mktemp("img2img-models")
    inpainting = build_random_model(
        "sd1_inpainting", root / "inpainting", seed=3, single_file=root / "inpainting.safetensors"
    )
    zero_snr = shutil.copytree(random_models["sd2"], root / "sd2-zero-snr")
    config_path = zero_snr / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    config_path.write_text(json.dumps(config))
    return {
        "img2img": random_models["sd1"],
        "inpaint": random_models["sd1"],
        "inpainting-unet": inpainting,
        "inpainting-unet-no-mask": inpainting,
        "inpainting-unet-txt2img": inpainting,
        "inpainting_file": root / "inpainting.safetensors",
        "zero-snr": zero_snr,
    }


@pytest.fixture(scope="module")
def model_of(folders: dict[str, Path], request: pytest.FixtureRequest) -> Callable[[str], tuple]:
    """model_of(mode) -> (folder, our loaded model), each loaded once (SDXL only when asked for)."""
    loaded: dict[Path, StableDiffusion] = {}

    def get(mode: str) -> tuple[Path, StableDiffusion]:
        folder = request.getfixturevalue("sdxl_models")["sdxl"] if mode == "sdxl" else folders[mode]
        if folder not in loaded:
            loaded[folder] = load_model(folder)
        return folder, loaded[folder]

    return get


@pytest.mark.parametrize(("mode", "sampler", "scheduler", "strength", "width", "height"), CASES)
def test_same_picture_as_diffusers(mode, sampler, scheduler, strength, width, height, model_of) -> None:
    folder, model = model_of(mode)
    init = init_picture(width, height)
    masked = mode in ("inpaint", "inpainting-unet")
    mask = box_mask(width, height) if masked else None
    image_fields = {} if mode == "inpainting-unet-txt2img" else {"init_image": "init", "strength": strength}
    request = Generation(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=width,
        height=height,
        steps=STEPS,
        guidance_scale=6.0,
        sampler=sampler,
        scheduler=scheduler,
        seed=40,
        num_images=2 if strength == 0.75 else 1,  # several images, each with its own generator
        mask_image="mask" if masked else None,
        mask_blur=0,
        **image_fields,
    )
    inputs = ImageInputs(init, mask) if image_fields else None
    got = np.stack(generate(model, request, inputs=inputs))
    # diffusers' inpainting pipeline, given a white mask at strength 1, is what txt2img is on an
    # inpainting checkpoint
    reference_request = request.model_copy(update={"strength": strength})
    expected = diffusers_edit_images(folder, reference_request, init, mask)
    assert got.shape == expected.shape == (request.num_images, height, width, 3)
    assert max_level_difference(got, expected) <= 2
    assert got.std() > 10  # a real picture, not a flat image that would match anything


def test_an_all_black_mask_gives_back_the_init_image_through_the_vae(model_of) -> None:
    """Nothing to repaint: with a 4-channel UNet every step blends the whole latent back, so the picture
    is the decoded init latent (the posterior sampled with the image's generator, scaled)."""
    _, model = model_of("inpaint")
    init = init_picture(64, 48)
    request = Generation(
        prompt=PROMPT, width=64, height=48, steps=4, seed=7, sampler="euler_ancestral",
        init_image="init", mask_image="mask", strength=0.75,
    )  # fmt: skip
    got = generate(model, request, inputs=ImageInputs(init, np.zeros((48, 64), dtype=np.uint8)))[0]
    pipeline = Pipeline(model)
    (posterior,) = pipeline.input_encoder.encode_pixels([pixels(init)])
    latent = posterior.sample(torch.Generator().manual_seed(7)) * model.vae.config.scaling_factor
    assert max_level_difference(got, pipeline.decode_latents(latent)[0]) <= 1


def test_progress_counts_the_steps_an_img2img_run_takes(model_of) -> None:
    _, model = model_of("img2img")
    request = Generation(
        prompt=PROMPT, width=64, height=64, steps=10, strength=0.45, init_image="init", sampler="uni_pc"
    )
    assert (request.steps_to_run, request.first_step) == (4, 6)
    pipeline = Pipeline(model)
    inputs = pipeline.encode_inputs([(request, ImageInputs(init_picture(64, 64)))])
    ((image,),) = pipeline.start([(0, request)], inputs)
    assert (image.steps_done, image.total_steps, image.step_index) == (0, 4, 6)
    pipeline.step([image])
    assert (image.steps_done, image.total_steps, image.step_index) == (1, 4, 7)


def test_an_inpainting_unet_runs_through_the_bucketed_fast_path(model_of) -> None:
    """The image conditioning is a per-row input with a static buffer per bucket (CUDA graphs): padded
    to a bucket, the pictures are the plain UNet's."""
    _, model = model_of("inpainting-unet")
    request = Generation(
        prompt=PROMPT, width=48, height=64, steps=2, seed=2, init_image="init", mask_image="mask",
        strength=1.0,
    )  # fmt: skip
    inputs = ImageInputs(init_picture(48, 64), box_mask(48, 64))
    runner = UNetRunner(model.unet, AccelConfig(pad_to_bucket=True, buckets=(3,)))
    fast = np.stack(generate(model, request, unet_runner=runner, inputs=inputs))
    plain = np.stack(generate(model, request, inputs=inputs))
    assert runner.stats().padded_rows > 0
    assert max_level_difference(fast, plain) <= 1


def test_an_inpainting_single_file_is_told_by_its_weights(model_of, folders, random_models) -> None:
    """The configs (the tiny SD 1.x ones, as the shipped SD 1.5 ones) say 4 input channels; the
    checkpoint's first convolution says 9."""
    single = load_model(folders["inpainting_file"], config=random_models["sd1"])
    _, folder_model = model_of("inpainting-unet")
    assert single.inpainting and folder_model.inpainting and single.unet.config.in_channels == 9
    weight = "conv_in.weight"
    assert torch.equal(single.unet.state_dict()[weight], folder_model.unet.state_dict()[weight])


def test_a_unet_of_other_input_channels_is_refused(random_models, tmp_path: Path) -> None:
    """An 8-channel UNet (instruct-pix2pix) is neither text-to-image nor inpainting."""
    folder = shutil.copytree(random_models["sd1"], tmp_path / "pix2pix")
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "in_channels": 8}))
    with pytest.raises(CheckpointError, match="a UNet taking 8 input channels"):
        load_model(folder)


def test_input_images_must_match_the_request(model_of) -> None:
    _, model = model_of("img2img")
    request = Generation(prompt=PROMPT, width=64, height=64, init_image="init", strength=0.5)
    pipeline = Pipeline(model)
    with pytest.raises(ValueError, match="its image was not given"):
        pipeline.start([(0, request)])
    with pytest.raises(ValueError, match="the init image is 48x64, the request 64x64"):
        pipeline.encode_inputs([(request, ImageInputs(init_picture(48, 64)))])
    with pytest.raises(ValueError, match="mask_image and the mask given disagree"):
        pipeline.encode_inputs([(request, ImageInputs(init_picture(64, 64), box_mask(64, 64)))])
