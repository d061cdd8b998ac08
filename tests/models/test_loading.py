"""Loading diffusers-format folders: the real key layouts load, every broken folder is a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from models.default_model import EMBEDDED_MODEL_DIR
from models.loading import load_model, read_vocabulary
from models.single_file import CheckpointError
from schemas.vocabulary import VOCABULARY_FILE

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"
VAE_FILE = Path("vae") / "diffusion_pytorch_model.safetensors"
TEXT_FILE = Path("text_encoder") / "model.safetensors"


@pytest.fixture
def folder(tmp_path: Path, random_models: dict[str, Path]) -> Path:
    """A private copy of the tiny SD1 folder that a test may break."""
    return Path(shutil.copytree(random_models["sd1"], tmp_path / "model"))


def unet_output(model, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, model.text_encoder.config.hidden_size, generator=gen)
    with torch.no_grad():
        return model.unet(sample, torch.tensor([10, 500]), context)


def test_text_encoder_equals_transformers_own_loading(random_models: dict[str, Path]) -> None:
    ours = load_model(random_models["sd1"]).text_encoder
    reference = CLIPTextModel.from_pretrained(random_models["sd1"] / "text_encoder").eval()
    ids = torch.tensor([[49406, 320, 736, 7117, 49407] + [49407] * 72])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids).last_hidden_state, reference(ids).last_hidden_state, rtol=0, atol=1e-6
        )


def test_bin_weights_load_through_weights_only(folder: Path) -> None:
    reference = unet_output(load_model(folder))
    for path, bin_name in ((UNET_FILE, "diffusion_pytorch_model.bin"), (TEXT_FILE, "pytorch_model.bin")):
        torch.save(load_file(folder / path), folder / path.parent / bin_name)
        (folder / path).unlink()
    torch.testing.assert_close(unet_output(load_model(folder)), reference, rtol=0, atol=0)


def test_key_variants_of_real_checkpoints(folder: Path) -> None:
    """Old diffusers VAE attention names and transformers-5 text keys without `text_model.` load."""
    reference = load_model(folder)
    vae = load_file(folder / VAE_FILE)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old_vae = {}
    for key, value in vae.items():
        for new, old in renames.items():
            if ".mid_block.attentions.0." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        old_vae[key] = value
    assert any(".query." in k for k in old_vae)
    save_file(old_vae, str(folder / VAE_FILE))
    text = load_file(folder / TEXT_FILE)
    save_file({k.removeprefix("text_model."): v for k, v in text.items()}, str(folder / TEXT_FILE))
    loaded = load_model(folder)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.vae.decode(x), reference.vae.decode(x), rtol=0, atol=0)
        ids = torch.tensor([[49406, 320, 49407]])
        torch.testing.assert_close(
            loaded.text_encoder(ids).last_hidden_state,
            reference.text_encoder(ids).last_hidden_state,
            rtol=0,
            atol=0,
        )


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        load_model(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="neither a diffusers-format folder nor a checkpoint file"):
        load_model(tmp_path / "notes.txt")


def test_truncated_weights(folder: Path) -> None:
    data = (folder / UNET_FILE).read_bytes()
    (folder / UNET_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        load_model(folder)


def test_missing_weights_file(folder: Path) -> None:
    (folder / VAE_FILE).unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_model(folder)


def test_missing_and_unexpected_keys_are_named(folder: Path) -> None:
    weights = load_file(folder / UNET_FILE)
    del weights["conv_in.weight"]
    weights["extra.layer.weight"] = torch.zeros(3)
    save_file(weights, str(folder / UNET_FILE))
    with pytest.raises(CheckpointError) as error:
        load_model(folder)
    message = str(error.value)
    assert "unet" in message and "1 missing keys: conv_in.weight" in message
    assert "1 unexpected keys: extra.layer.weight" in message


def test_config_that_does_not_fit_the_weights(folder: Path) -> None:
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 64  # the weights were made for 32
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config does not fit the weights: .*attn2\.to_k\.weight"):
        load_model(folder)


def test_unsupported_or_broken_config(folder: Path) -> None:
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(CheckpointError, match="class_embed_type"):
        load_model(folder)
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_model(folder)


def test_recommended_settings_from_defaults_json(folder: Path) -> None:
    assert load_model(folder).recommended == {}
    (folder / "defaults.json").write_text(
        json.dumps({"steps": 20, "guidance_scale": 5.0, "note": "free text"})
    )
    assert load_model(folder).recommended == {"steps": 20, "guidance_scale": 5.0}
    (folder / "defaults.json").write_text(json.dumps({"steps": "many"}))
    with pytest.raises(CheckpointError, match="steps must be a positive integer"):
        load_model(folder)


def test_vocabulary_from_vocabulary_json(folder: Path) -> None:
    assert load_model(folder).vocabulary is None  # a real checkpoint's text encoder knows every word
    assert read_vocabulary(EMBEDDED_MODEL_DIR / VOCABULARY_FILE) >= {"a", "red", "circle", "background"}
    (folder / VOCABULARY_FILE).write_text(json.dumps(["a", "circle", "red"]))
    assert load_model(folder).vocabulary == {"a", "circle", "red"}
    for broken in ('{"a": 1}', '["a", "Red"]', '["top left"]', "[1]", "not json"):
        (folder / VOCABULARY_FILE).write_text(broken)
        with pytest.raises(CheckpointError, match="vocabulary.json"):
            load_model(folder)
