"""The img2img contract around the pipeline (issue 19): the request's fields and their checks, input
image files decoded and fitted to the request's size, the PNG parameters A1111 writes, the command line."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from models.image_files import parameters_of, read_parameters
from models.image_inputs import InputImageError, decode_image, default_size, fit_image, load_inputs
from models.txt2img import main
from schemas.generation import Generation
from tests.support.input_images import box_mask, encoded, init_picture

# --- the request ---------------------------------------------------------------------------------


def test_defaults_and_the_steps_an_img2img_request_runs() -> None:
    request = Generation(prompt="x", steps=10, init_image="a")
    assert (request.strength, request.mask_blur, request.resize_mode) == (0.8, 4, "resize")
    assert (request.steps_to_run, request.first_step) == (8, 2)  # diffusers' int(10 * 0.8)
    assert Generation(prompt="x", steps=7, init_image="a", strength=0.3).steps_to_run == 2
    assert Generation(prompt="x", steps=10, init_image="a", strength=1.0).first_step == 0
    # strength means nothing without an init image: text-to-image runs every step
    assert Generation(prompt="x", steps=10, strength=0.1).steps_to_run == 10


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"mask_image": "m"}, "mask_image", "mask_image needs init_image"),
        ({"init_image": "a", "strength": 0.05}, "strength", "at least 1/steps = 0.1 with steps=10"),
        ({"init_image": "a", "strength": 1.5}, "strength", "less than or equal to 1"),
        ({"init_image": "../etc/passwd"}, "init_image", "should match pattern"),
        ({"init_image": "a", "mask_blur": 65}, "mask_blur", "less than or equal to 64"),
        ({"init_image": "a", "resize_mode": "stretch"}, "resize_mode", "'resize', 'crop' or 'fill'"),
    ],
)
def test_bad_image_fields_are_refused_naming_the_field(fields: dict, field: str, message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Generation(prompt="x", steps=10, **fields)
    (error,) = raised.value.errors()
    assert error["loc"] == (field,) and message in error["msg"]


def test_png_parameters_record_the_strength_and_the_mask_blur_as_a1111() -> None:
    img2img = Generation(prompt="x", init_image="a", strength=0.6, seed=3)
    assert "Model: m, Denoising strength: 0.6" in parameters_of(img2img, 3, "m")
    assert "Mask blur" not in parameters_of(img2img, 3, "m")
    inpainting = img2img.model_copy(update={"mask_image": "b", "mask_blur": 4})
    assert parameters_of(inpainting, 3, "m").endswith("Model: m, Denoising strength: 0.6, Mask blur: 4")
    assert "Denoising" not in parameters_of(Generation(prompt="x", strength=0.6), 3, "m")


# --- files to arrays -----------------------------------------------------------------------------------


def test_a_file_of_the_requested_size_is_used_as_it_is() -> None:
    picture, mask = init_picture(64, 48), box_mask(64, 48)
    inputs = load_inputs(encoded(picture), encoded(mask), 64, 48)
    assert np.array_equal(inputs.init, picture) and np.array_equal(inputs.mask, mask)  # type: ignore[arg-type]
    for mode in ("resize", "crop", "fill"):
        image = Image.fromarray(picture)
        assert np.array_equal(np.asarray(fit_image(image, 64, 48, mode)), picture)


def test_resize_modes_fit_the_requested_size() -> None:
    """A 2:1 image into a square: resize squeezes it, crop keeps its centre at full scale, fill keeps it
    whole in the middle band and stretches its edge rows above and below."""
    wide = np.zeros((40, 80, 3), dtype=np.uint8)
    wide[:, :20] = 255  # a white band on the left, outside the centre square
    wide[0] = (0, 0, 255)  # a blue top row, stretched by fill
    image = Image.fromarray(wide)
    resized, cropped, filled = (
        np.asarray(fit_image(image, 40, 40, mode)) for mode in ("resize", "crop", "fill")
    )
    assert resized.shape == cropped.shape == filled.shape == (40, 40, 3)
    assert resized[20, :5].mean() > 200  # the band, squeezed
    assert cropped[20:, :].max() < 30  # the centre: no band
    assert filled[20, :5].mean() > 200  # the band, whole
    # the 10 rows above the image: its (resized) top row, stretched (bluish: Lanczos mixes its neighbours)
    assert (filled[:10] == filled[0]).all() and filled[5, 30, 2] > 100


def test_the_mask_is_gray_blurred_and_must_match_the_image() -> None:
    picture, mask = init_picture(64, 48), box_mask(64, 48)
    colour_mask = np.stack([mask] * 3, axis=-1)
    blurred = load_inputs(encoded(picture), encoded(colour_mask), 64, 48, mask_blur=4).mask
    assert blurred is not None and blurred.shape == (48, 64)
    assert np.count_nonzero((blurred > 0) & (blurred < 255)) > 0  # soft edges
    with pytest.raises(InputImageError, match="mask_image: the mask is 32x24, the init image 64x48"):
        load_inputs(encoded(picture), encoded(box_mask(32, 24)), 64, 48)


def test_files_are_decoded_upright_and_in_rgb() -> None:
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: the colour is kept, the alpha dropped
    assert tuple(np.asarray(decode_image(encoded(rgba), "init_image"))[0, 0]) == (200, 0, 0)
    rotated = Image.fromarray(init_picture(6, 4))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), "init_image").size == (4, 6)
    gif = io.BytesIO()
    Image.fromarray(init_picture(6, 4)).save(gif, format="GIF")
    with pytest.raises(InputImageError, match="init_image: a GIF image; PNG, JPEG or WebP are accepted"):
        decode_image(gif.getvalue(), "init_image")


def test_the_default_size_is_the_image_rounded_down_to_the_multiple() -> None:
    assert default_size(517, 383, 8) == (512, 376)
    assert default_size(5, 3, 8) == (8, 8)


# --- the command line -----------------------------------------------------------------------------------


def test_the_command_line_inpaints(random_models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "init.png").write_bytes(encoded(init_picture(52, 44)))  # 48x40 by default
    (tmp_path / "mask.png").write_bytes(encoded(box_mask(52, 44)))
    out = tmp_path / "out.png"
    common = ["--model", str(random_models["sd1"]), "--prompt", "a circle", "--steps", "4", "--seed", "5"]
    files = ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]
    assert main([*common, *files, "--strength", "0.6", "--mask-blur", "2", "--out", str(out)]) == 0
    with Image.open(out) as written:
        assert written.size == (48, 40)
    text = read_parameters(out.read_bytes())
    assert text is not None and "Size: 48x40" in text and "Denoising strength: 0.6, Mask blur: 2" in text
    assert main([*common, "--mask", str(tmp_path / "mask.png"), "--out", str(out)]) == 2
    assert main([*common, *files, "--strength", "0.1", "--out", str(out)]) == 2  # int(4 * 0.1) = 0 steps
