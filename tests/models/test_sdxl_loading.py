"""Loading SDXL (issue 17): the shipped SDXL base configs build the real architecture with the real key
names, a single file's variant is read from its keys, loading stays strict (every missing or
unexpected key named), and the SDXL variants and other families we do not run are refused naming
what was found."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as diffusers_single_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models.configs import UNetConfig
from models.loading import SINGLE_FILE_CONFIGS, load_model, load_tokenizer, read_component_configs
from models.single_file import (
    CheckpointError,
    detect_variant,
    diffusers_to_ldm,
    ldm_to_diffusers,
    read_checkpoint,
)
from models.tiny_configs import tiny_config

UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer.text_model."
BIG_G = "conditioner.embedders.1.model."


def _error(func, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        func(*args, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------- the shipped SDXL configs


@pytest.fixture(scope="module")
def shipped() -> dict[str, dict[str, Any]]:
    return read_component_configs(SINGLE_FILE_CONFIGS["sdxl"])


@pytest.fixture(scope="module")
def meta_components(shipped) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of diffusers' and transformers' real-size SDXL modules on the meta device."""
    public = {
        name: {k: v for k, v in shipped[name].items() if not k.startswith("_")} for name in ("unet", "vae")
    }
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel(**public["unet"]),
            "vae": AutoencoderKL(**public["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**shipped["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**shipped["text_encoder_2"])),
        }
    components = {name: dict(module.state_dict()) for name, module in modules.items()}
    components["text_encoder"] = {
        k if k.startswith("text_model.") else f"text_model.{k}": v
        for k, v in components["text_encoder"].items()
    }
    return components


def test_shipped_configs_are_sdxl_base(shipped) -> None:
    unet, vae, scheduler = shipped["unet"], shipped["vae"], shipped["scheduler"]
    index = json.loads((SINGLE_FILE_CONFIGS["sdxl"] / "model_index.json").read_text())
    assert (
        index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    )
    config = UNetConfig.from_dict(unet)
    assert config.block_out_channels == (320, 640, 1280)
    assert config.transformer_layers_per_block == (1, 2, 10) and config.num_attention_heads == (5, 10, 20)
    assert (config.cross_attention_dim[0], config.addition_time_embed_dim, config.text_embeds_dim) == (
        2048,
        256,
        1280,
    )
    assert config.use_linear_projection and config.sample_size == 128
    for unet_config in (config, UNetConfig.from_dict(tiny_config("sdxl")["unet"])):  # to_dict round trip
        assert UNetConfig.from_dict(json.loads(json.dumps(unet_config.to_dict()))) == unet_config
    assert (vae["scaling_factor"], vae["force_upcast"]) == (0.13025, True)
    text, text_2 = shipped["text_encoder"], shipped["text_encoder_2"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (768, 12, "quick_gelu")
    assert (text_2["hidden_size"], text_2["intermediate_size"], text_2["num_hidden_layers"]) == (
        1280,
        5120,
        32,
    )
    assert (text_2["num_attention_heads"], text_2["projection_dim"], text_2["hidden_act"]) == (
        20,
        1280,
        "gelu",
    )
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"
    assert (scheduler["steps_offset"], scheduler["timestep_spacing"], scheduler["beta_schedule"]) == (
        1,
        "leading",
        "scaled_linear",
    )
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)
    tokenizer, tokenizer_2 = (
        load_tokenizer(SINGLE_FILE_CONFIGS["sdxl"] / name) for name in ("tokenizer", "tokenizer_2")
    )
    assert (tokenizer.pad_token_id, tokenizer_2.pad_token_id) == (49407, 0)  # "<|endoftext|>" and "!"


def test_shipped_configs_build_the_real_architecture_with_the_real_key_names(
    shipped, meta_components
) -> None:
    from models.unet import UNet2DConditionModel as OurUNet

    with torch.device("meta"):
        unet = OurUNet(UNetConfig.from_dict(shipped["unet"]))
    ours = unet.state_dict()
    assert ours.keys() == meta_components["unet"].keys()
    assert all(ours[k].shape == meta_components["unet"][k].shape for k in ours)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 2567  # SDXL's 2.6 B
    counts = tuple(len(meta_components[n]) for n in ("unet", "vae", "text_encoder", "text_encoder_2"))
    assert counts == (1680, 248, 196, 517)

    ldm = diffusers_to_ldm(meta_components, shipped, "sdxl")
    assert detect_variant(ldm) == "sdxl"
    # diffusers' own model-type detection from the key names and shapes
    assert diffusers_single_file.infer_diffusers_model_type(ldm) == "xl_base"
    assert ldm[UNET + "label_emb.0.0.weight"].shape == (1280, 2816)
    assert ldm[UNET + "label_emb.0.2.weight"].shape == (1280, 1280)
    assert ldm[UNET + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
    assert ldm[UNET + "middle_block.1.transformer_blocks.9.ff.net.2.weight"].shape == (1280, 5120)
    assert ldm[UNET + "output_blocks.2.2.conv.weight"].shape == (
        1280,
        1280,
        3,
        3,
    )  # upsampler after attention
    assert UNET + "input_blocks.1.1.norm.weight" not in ldm  # the first level has no attention
    assert ldm[BIG_G + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert ldm[BIG_G + "text_projection"].shape == (1280, 1280)
    assert ldm[CLIP_L + "encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)
    back = ldm_to_diffusers(ldm, shipped)
    for name, component in meta_components.items():
        assert back[name].keys() == component.keys(), name


# --------------------------------------------------------------------------------- a tiny single file


@pytest.fixture(scope="module")
def tiny_file(sdxl_models: dict[str, Path]) -> dict[str, torch.Tensor]:
    return read_checkpoint(sdxl_models["sdxl_file"])


def test_text_projection_is_stored_transposed_and_in_proj_fused(
    tiny_file, sdxl_models: dict[str, Path]
) -> None:
    """OpenCLIP applies `x @ text_projection` and fuses q/k/v: diffusers' conversion reads it back."""
    model = load_model(sdxl_models["sdxl"])
    weight = model.text_encoder_2.text_projection.weight  # (24, 48): Linear(48 -> 24)
    torch.testing.assert_close(tiny_file[BIG_G + "text_projection"], weight.T, rtol=0, atol=0)
    layer = model.text_encoder_2.text_model.encoder.layers[1].self_attn
    fused = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
    torch.testing.assert_close(
        tiny_file[BIG_G + "transformer.resblocks.1.attn.in_proj_weight"], fused, rtol=0, atol=0
    )


def test_known_unused_keys_of_real_files_are_ignored(
    tiny_file, sdxl_models: dict[str, Path], tmp_path: Path
) -> None:
    configs = tiny_config("sdxl")
    expected = ldm_to_diffusers(tiny_file, configs)
    extra = {
        BIG_G + "logit_scale": torch.tensor(4.6),
        CLIP_L + "embeddings.position_ids": torch.arange(77)[None],
        "denoiser.sigmas": torch.ones(1000),
        "alphas_cumprod": torch.ones(1000),
    }
    result = ldm_to_diffusers({**tiny_file, **extra}, configs)
    for name, component in expected.items():
        assert result[name].keys() == component.keys()


def test_missing_and_unexpected_keys_are_named(
    tiny_file, sdxl_models: dict[str, Path], tmp_path: Path
) -> None:
    broken = dict(tiny_file)
    del broken[BIG_G + "text_projection"]
    del broken[UNET + "label_emb.0.2.bias"]
    broken[BIG_G + "transformer.resblocks.7.ln_1.weight"] = torch.zeros(48)
    message = _error(ldm_to_diffusers, broken, tiny_config("sdxl"))
    assert "2 keys the configs require are missing" in message
    assert BIG_G + "text_projection" in message and UNET + "label_emb.0.2.bias" in message
    assert "1 keys map to nothing" in message and "resblocks.7.ln_1.weight" in message

    folder = tmp_path / "folder"
    shutil.copytree(sdxl_models["sdxl"], folder)
    weights_file = folder / "text_encoder_2" / "model.safetensors"
    weights = read_checkpoint(weights_file)
    del weights["text_projection.weight"]
    weights["text_model.surprise.weight"] = torch.zeros(1)
    from safetensors.torch import save_file

    save_file(weights, str(weights_file))
    message = _error(load_model, folder)
    assert "text_encoder_2" in message and "1 missing keys: text_projection.weight" in message
    assert "1 unexpected keys: text_model.surprise.weight" in message


def test_sdxl_file_with_sd_configs_or_sd_file_with_sdxl_configs(
    sdxl_models: dict[str, Path], random_models
) -> None:
    message = _error(load_model, sdxl_models["sdxl_file"], config=random_models["sd1"])
    assert "SDXL checkpoint" in message and "not SDXL's" in message
    message = _error(load_model, random_models["sd1_file"], config=sdxl_models["sdxl"])
    assert "SD 1 checkpoint" in message


# ------------------------------------------------------------------------------ refused families


def _keys(*names: str, conv_in_channels: int = 4) -> dict[str, torch.Tensor]:
    state = {name: torch.zeros(1) for name in names}
    state[UNET + "input_blocks.0.0.weight"] = torch.zeros(320, conv_in_channels, 3, 3)
    return state


@pytest.mark.parametrize(
    ("state_dict", "expected"),
    [
        (_keys(CLIP_L + "final_layer_norm.weight", BIG_G + "ln_final.weight"), None),
        (_keys(BIG_G.replace(".1.", ".0.") + "ln_final.weight"), "SDXL refiner checkpoint"),
        (
            _keys(CLIP_L + "final_layer_norm.weight", BIG_G + "ln_final.weight", conv_in_channels=9),
            "SDXL inpainting checkpoint whose UNet takes 9 input channels",
        ),
        (
            _keys(CLIP_L + "final_layer_norm.weight"),
            "unknown text encoders (conditioner.embedders.0.transformer)",
        ),
        (
            {"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(1)},
            "SD3 (MMDiT) checkpoint (found 'model.diffusion_model.joint_blocks.0",
        ),
        (
            {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(1)},
            "Flux checkpoint (found 'double_blocks",
        ),
    ],
    ids=["sdxl-base", "refiner", "inpainting", "one-encoder", "sd3", "flux"],
)
def test_variant_from_the_keys(state_dict: dict[str, torch.Tensor], expected: str | None) -> None:
    if expected is None:
        assert detect_variant(state_dict) == "sdxl"
    else:
        message = _error(detect_variant, state_dict)
        assert expected in message and "not supported" in message


def _folder_with_index(sdxl_models: dict[str, Path], tmp_path: Path, **index: Any) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(sdxl_models["sdxl"], folder)
    path = folder / "model_index.json"
    data = json.loads(path.read_text())
    data.update(index)
    path.write_text(json.dumps({k: v for k, v in data.items() if v != "drop"}))
    return folder


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        (
            dict(
                _class_name="StableDiffusionXLImg2ImgPipeline",
                text_encoder=[None, None],
                requires_aesthetics_score=True,
            ),
            "StableDiffusionXLImg2ImgPipeline is an SDXL refiner",
        ),
        (dict(_class_name="MyPipeline", text_encoder=[None, None]), "an SDXL refiner (only text_encoder_2"),
        (dict(_class_name="StableDiffusion3Pipeline"), "StableDiffusion3Pipeline is SD3"),
        (
            dict(_class_name="FluxPipeline", transformer=["diffusers", "FluxTransformer2DModel"]),
            "FluxPipeline is Flux",
        ),
        (
            dict(transformer=["diffusers", "SD3Transformer2DModel"]),
            "with transformer: not a Stable Diffusion UNet",
        ),
        (dict(tokenizer_2="drop"), "lists one of text_encoder_2 and tokenizer_2 without the other"),
    ],
    ids=["refiner-class", "refiner-components", "sd3", "flux", "transformer", "no-tokenizer-2"],
)
def test_unsupported_folders_are_refused_naming_what_was_found(
    sdxl_models: dict[str, Path], tmp_path: Path, index: dict[str, Any], expected: str
) -> None:
    message = _error(load_model, _folder_with_index(sdxl_models, tmp_path, **index))
    assert expected in message
    assert "not supported" in message or "without the other" in expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (dict(in_channels=9), "an SDXL UNet with in_channels 9 (inpainting: 9): not supported"),
        (dict(projection_class_embeddings_input_dim=64), "a refiner takes an aesthetic score, 5 numbers"),
        (dict(cross_attention_dim=64), "cross_attention_dim 64 is not the two text encoders' hidden sizes"),
    ],
)
def test_unets_that_do_not_fit_sdxl_base_are_refused(
    sdxl_models: dict[str, Path], tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    folder = _folder_with_index(sdxl_models, tmp_path)
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **changes}))
    assert expected in _error(load_model, folder)


def test_sd_folder_with_an_sdxl_unet_is_refused(random_models, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(random_models["sd1"], folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config |= {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 72,
    }
    config_path.write_text(json.dumps(config))
    assert "an SDXL model needs text_encoder_2 and tokenizer_2" in _error(load_model, folder)
