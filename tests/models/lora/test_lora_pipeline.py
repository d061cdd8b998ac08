"""LoRAs through the whole pipeline: equal to diffusers' unfused LoRAs, both file formats alike, and a
batch mixing LoRA sets equal to each request alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.loading import load_model
from models.lora.library import LoraLibrary
from models.lora.pool import LoraPool
from models.pipeline import Pipeline, generate
from models.stable_diffusion import StableDiffusion
from schemas.generation import Generation
from tests.support.lora_files import random_lora, write_kohya, write_peft
from tests.support.lora_reference import diffusers_lora_images

PROMPT = "a red circle in the top left on a blue background"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One thread, as the worker tests run: torch's pool oversubscribes a small shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(random_models: dict[str, Path]) -> StableDiffusion:
    return load_model(random_models["sd1"])  # its own copy: the pool replaces its layers


@pytest.fixture(scope="module")
def lora_dir(model: StableDiffusion, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ "a": rank 4 with LoCon convolutions (alpha 8: scale 2), in both formats and in kohya's with the
    original UNet's layer names; "b": rank 8 (alpha 4);
    "c": rank 2, UNet only."""
    folder = tmp_path_factory.mktemp("loras")
    a = random_lora(model, seed=1, rank=4, alpha=8.0, locon=True)
    write_peft(a, folder / "a.safetensors")
    write_kohya(a, folder / "a_kohya.safetensors")
    write_kohya(a, folder / "a_original.safetensors", original_names_of=model.unet)
    write_peft(random_lora(model, seed=2, rank=8, alpha=4.0), folder / "b.safetensors")
    c = random_lora(model, seed=3, rank=2, alpha=2.0)
    c.layers["text_encoder"].clear()
    write_kohya(c, folder / "c.safetensors")
    return folder


@pytest.fixture(scope="module")
def library(model: StableDiffusion, lora_dir: Path) -> LoraLibrary:
    return LoraLibrary(lora_dir, model, LoraPool(model.unet, slots=4, max_rank=8), max_per_request=4)


def _request(prompt: str = PROMPT, **fields: object) -> Generation:
    values = {"negative_prompt": "a green square", "width": 64, "height": 64, "steps": 4, "seed": 11}
    return Generation(prompt=prompt, **{**values, **fields})


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


@pytest.mark.parametrize(
    "loras",
    [[("a", 0.8)], [("a", 0.7), ("b", -0.6)]],
    ids=["one LoRA", "two LoRAs at different weights"],
)
def test_equals_diffusers_set_adapters(
    loras: list[tuple[str, float]],
    model: StableDiffusion,
    library: LoraLibrary,
    lora_dir: Path,
    random_models: dict[str, Path],
) -> None:
    request = _request(loras=[{"name": name, "weight": weight} for name, weight in loras])
    expected = diffusers_lora_images(
        random_models["sd1"], request, [(lora_dir / f"{name}.safetensors", weight) for name, weight in loras]
    )
    got = np.stack(generate(model, request, loras=library))
    assert _max_diff(got, expected) <= 2
    plain = np.stack(generate(model, _request()))
    assert np.abs(got.astype(int) - plain.astype(int)).mean() > 3  # the LoRA really changes the picture


def test_kohya_and_peft_files_of_the_same_weights_give_the_same_picture(
    model: StableDiffusion, library: LoraLibrary
) -> None:
    peft = generate(model, _request(PROMPT + " <lora:a:0.9>"), loras=library)[0]
    kohya = generate(model, _request(PROMPT + " <lora:a_kohya:0.9>"), loras=library)[0]
    assert _max_diff(peft, kohya) <= 1
    # the original (LDM) UNet's names: resnets, downsamplers and the upsampler of a level without
    # attention (output_blocks.2.1) land on the same layers
    original = generate(model, _request(PROMPT + " <lora:a_original:0.9>"), loras=library)[0]
    assert _max_diff(peft, original) <= 1


def test_a_batch_mixing_lora_sets_equals_each_alone(model: StableDiffusion, library: LoraLibrary) -> None:
    """Three LoRA sets and a LoRA-free request share every UNet call (guided and unguided rows, one
    row with two LoRAs, one with LoCon convolutions), each picture as when it ran alone."""
    requests = {
        "a": _request(loras=[{"name": "a", "weight": 1.0}], seed=1),
        "b+c": _request("a blue square <lora:b:0.5> <lora:c:-1.5>", seed=2, guidance_scale=1.0),
        "c": _request(loras=[{"name": "c", "weight": 2.0}], seed=3, steps=3),
        "plain": _request(seed=4),
    }
    alone = {key: generate(model, request, loras=library)[0] for key, request in requests.items()}
    pipeline = Pipeline(model, loras=library)
    started = pipeline.start(list(requests.items()))
    images = [image for group in started for image in group]
    while not all(image.done for image in images):
        pipeline.step([image for image in images if not image.done])
    for image, picture in zip(images, pipeline.decode(images), strict=True):
        assert _max_diff(picture, alone[image.key]) <= 1, image.key
    assert _max_diff(alone["plain"], generate(model, requests["plain"])[0]) == 0  # the pool changes nothing


def test_sd2_linear_projections_equal_diffusers(
    random_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SD 2.x: proj_in/proj_out are Linears (SD 1.x: 1x1 convolutions), its text encoder another."""
    model = load_model(random_models["sd2"])
    folder = tmp_path_factory.mktemp("sd2-loras")
    write_peft(random_lora(model, seed=5, rank=4, alpha=4.0, locon=True, std=0.3), folder / "s.safetensors")
    library = LoraLibrary(folder, model, LoraPool(model.unet, slots=2, max_rank=4), max_per_request=4)
    request = _request(loras=[{"name": "s", "weight": 1.2}])
    expected = diffusers_lora_images(random_models["sd2"], request, [(folder / "s.safetensors", 1.2)])
    got = np.stack(generate(model, request, loras=library))
    assert _max_diff(got, expected) <= 2
    assert np.abs(got.astype(int) - np.stack(generate(model, _request())).astype(int)).mean() > 3


def test_sdxl_both_text_encoders_equal_diffusers(
    sdxl_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SDXL: the LoRA adapts both text encoders (PEFT text_encoder/text_encoder_2; kohya lora_te1_/
    lora_te2_) and the UNet; diffusers' StableDiffusionXLPipeline as the reference, kohya's file the same."""
    model = load_model(sdxl_models["sdxl"])
    folder = tmp_path_factory.mktemp("sdxl-loras")
    lora = random_lora(model, seed=6, rank=4, alpha=8.0, std=0.3)
    write_peft(lora, folder / "x.safetensors")
    write_kohya(lora, folder / "x_kohya.safetensors")
    write_kohya(
        lora, folder / "x_original.safetensors", original_names_of=model.unet
    )  # as kohya's SDXL files
    library = LoraLibrary(folder, model, LoraPool(model.unet, slots=3, max_rank=4), max_per_request=4)
    assert {(i.name, i.family) for i in library.listing()} == {
        ("x", "sdxl"),
        ("x_kohya", "sdxl"),
        ("x_original", "sdxl"),
    }
    request = _request(negative_prompt="", loras=[{"name": "x", "weight": 0.9}])
    expected = diffusers_lora_images(sdxl_models["sdxl"], request, [(folder / "x.safetensors", 0.9)])
    got = np.stack(generate(model, request, loras=library))
    assert _max_diff(got, expected) <= 2
    kohya = generate(model, _request(PROMPT + " <lora:x_kohya:0.9>", negative_prompt=""), loras=library)[0]
    assert _max_diff(got[0], kohya) <= 1
    # the original UNet's names, with diffusers reading the same file as the reference
    original_expected = diffusers_lora_images(
        sdxl_models["sdxl"], request, [(folder / "x_original.safetensors", 0.9)]
    )
    original = generate(model, _request(PROMPT + " <lora:x_original:0.9>", negative_prompt=""), loras=library)
    assert _max_diff(original_expected, expected) <= 1
    assert _max_diff(np.stack(original), original_expected) <= 2
    assert (
        np.abs(got.astype(int) - np.stack(generate(model, _request(negative_prompt=""))).astype(int)).mean()
        > 3
    )
