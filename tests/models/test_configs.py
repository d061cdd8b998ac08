"""UNetConfig / VAEConfig: parsing of diffusers config.json dicts, validation, round trips."""

from __future__ import annotations

import json

import pytest
import torch

from models.configs import UNetConfig, VAEConfig
from models.tiny_configs import tiny_config
from models.unet import UNet2DConditionModel
from models.vae import AutoencoderKL

# the public unet/config.json and vae/config.json of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1, as published (older diffusers versions wrote fewer keys)
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD21_VAE = {**SD15_VAE, "_diffusers_version": "0.8.0", "sample_size": 768}

SD15_UNET_PARAMS = 859_520_964  # diffusers' UNet2DConditionModel for SD15_UNET


def diffusers_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_sd15_unet_config():
    config = UNetConfig.from_dict(SD15_UNET)
    assert config.num_attention_heads == (8, 8, 8, 8)
    assert config.cross_attention_dim == (768,) * 4
    assert config.layers_per_block == (2,) * 4
    assert not config.use_linear_projection and not config.upcast_attention
    assert config.sample_size == 64 and config.num_downsamples == 3
    assert config == UNetConfig()  # the dataclass defaults are SD 1.5's


def test_sd21_unet_config():
    config = UNetConfig.from_dict(SD21_UNET)
    assert config.num_attention_heads == (5, 10, 20, 20)  # attention_head_dim holds head counts
    assert config.cross_attention_dim == (1024,) * 4
    assert config.use_linear_projection and config.upcast_attention
    assert config.sample_size == 96


@pytest.mark.parametrize("vae", [SD15_VAE, SD21_VAE], ids=["sd15", "sd21"])
def test_sd_vae_configs(vae):
    config = VAEConfig.from_dict(vae)
    assert config.block_out_channels == (128, 256, 512, 512)
    assert config.layers_per_block == 2 and config.latent_channels == 4
    assert config.scaling_factor == 0.18215  # absent from the file: diffusers' default
    assert config.use_quant_conv and config.use_post_quant_conv and config.mid_block_add_attention
    assert config.downscale_factor == 8
    assert config.sample_size == vae["sample_size"]


def test_num_attention_heads_takes_precedence():
    config = UNetConfig.from_dict(
        {**SD15_UNET, "attention_head_dim": 64, "num_attention_heads": [5, 10, 20, 20]}
    )
    assert config.num_attention_heads == (5, 10, 20, 20)
    config = UNetConfig.from_dict({**SD15_UNET, "num_attention_heads": None})
    assert config.num_attention_heads == (8, 8, 8, 8)


def test_per_block_lists():
    config = UNetConfig.from_dict(
        {**SD15_UNET, "transformer_layers_per_block": [1, 2, 1, 1], "layers_per_block": [2, 1, 2, 2]}
    )
    assert config.transformer_layers_per_block == (1, 2, 1, 1)
    assert config.layers_per_block == (2, 1, 2, 2)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_to_dict_round_trips(name):
    unet = UNetConfig.from_dict(tiny_config(name)["unet"])
    assert UNetConfig.from_dict(json.loads(json.dumps(unet.to_dict()))) == unet
    vae = VAEConfig.from_dict(tiny_config(name)["vae"])
    assert VAEConfig.from_dict(json.loads(json.dumps(vae.to_dict()))) == vae
    for config in (SD15_UNET, SD21_UNET):
        assert UNetConfig.from_dict(UNetConfig.from_dict(config).to_dict()) == UNetConfig.from_dict(config)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text_time"),
        ("addition_time_embed_dim", 256),
        ("time_cond_proj_dim", 0),
        ("num_class_embeds", 10),
        ("encoder_hid_dim", 1024),
        ("only_cross_attention", True),
        ("only_cross_attention", [False, True, False, False]),
        ("dual_cross_attention", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("mid_block_type", None),
        ("act_fn", "gelu"),
        ("time_embedding_type", "fourier"),
        ("conv_in_kernel", 7),
        ("attention_type", "gated"),
        ("downsample_padding", 0),
        ("mid_block_scale_factor", 1.5),
        ("reverse_transformer_layers_per_block", [[1, 1], [1, 1], [1, 1], [1, 1]]),
        (
            "down_block_types",
            ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        ),
        (
            "up_block_types",
            ["UpBlock2D", "SimpleCrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        ),
        ("norm_num_groups", None),
        ("attention_head_dim", "8"),
        ("use_linear_projection", "yes"),
        ("sample_size", [64, 64, 64]),
    ],
)
def test_unsupported_unet_values_raise(key, value):
    with pytest.raises(ValueError) as error:
        UNetConfig.from_dict({**SD15_UNET, key: value})
    assert key in str(error.value) and repr(value) in str(error.value)
    assert "supported" in str(error.value)


def test_unknown_unet_key_raises():
    with pytest.raises(ValueError, match="new_fancy_option"):
        UNetConfig.from_dict({**SD15_UNET, "new_fancy_option": 1})


def test_ignored_unet_keys():
    config = UNetConfig.from_dict(
        {**SD15_UNET, "dropout": 0.1, "_name_or_path": "x", "_use_default_values": []}
    )
    assert config == UNetConfig.from_dict(SD15_UNET)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"block_out_channels": [320, 640, 1280]},
            "down_block_types has 4 entries, block_out_channels has 3",
        ),
        ({"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}, "up_block_types has 2 entries"),
        ({"attention_head_dim": [5, 10, 20]}, "attention_head_dim has 3 entries but there are 4 down blocks"),
        ({"num_attention_heads": [5, 10]}, "num_attention_heads has 2 entries"),
        ({"transformer_layers_per_block": [1, 2]}, "transformer_layers_per_block has 2 entries"),
        ({"cross_attention_dim": [768, 768]}, "cross_attention_dim has 2 entries"),
        ({"attention_head_dim": 7}, "cannot be split into 7 attention heads"),
        ({"norm_num_groups": 24}, "not divisible by norm_num_groups=24"),
    ],
)
def test_inconsistent_lengths_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict({**SD15_UNET, **changes})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("shift_factor", 0.1159),
        ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
        ("act_fn", "relu"),
        ("down_block_types", ["AttnDownEncoderBlock2D"] * 4),
        ("up_block_types", ["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"]),
        ("scaling_factor", "0.18215"),
        ("use_quant_conv", 1),
    ],
)
def test_unsupported_vae_values_raise(key, value):
    with pytest.raises(ValueError) as error:
        VAEConfig.from_dict({**SD15_VAE, key: value})
    assert key in str(error.value) and repr(value) in str(error.value)


def test_vae_validation():
    with pytest.raises(ValueError, match="unknown VAE config key"):
        VAEConfig.from_dict({**SD15_VAE, "tiling": True})
    with pytest.raises(ValueError, match="down_block_types has 3 entries, block_out_channels has 4"):
        VAEConfig.from_dict({**SD15_VAE, "down_block_types": ["DownEncoderBlock2D"] * 3})
    config = VAEConfig.from_dict(
        {
            **SD15_VAE,
            "use_quant_conv": False,
            "shift_factor": None,
            "scaling_factor": 0.13025,
            "force_upcast": False,
        }
    )
    assert not config.use_quant_conv and config.scaling_factor == 0.13025 and not config.force_upcast


# --- against diffusers (test-only dependency) ---


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_diffusers_saved_config_round_trips(tmp_path, name):
    """config.json files written by diffusers' save_pretrained parse to the same architecture, and
    our to_dict builds the same diffusers model."""
    diffusers = pytest.importorskip("diffusers")
    tiny = tiny_config(name)
    for cls, ours, component in (
        (diffusers.UNet2DConditionModel, UNetConfig, "unet"),
        (diffusers.AutoencoderKL, VAEConfig, "vae"),
    ):
        model = cls(**diffusers_kwargs(tiny[component]))
        model.save_pretrained(tmp_path / component)
        saved = json.loads((tmp_path / component / "config.json").read_text())
        config = ours.from_dict(saved)
        assert config == ours.from_dict(tiny[component])
        rebuilt = cls(**diffusers_kwargs(config.to_dict()))
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()
        }


@pytest.mark.parametrize(
    ("unet", "vae"), [(SD15_UNET, SD15_VAE), (SD21_UNET, SD21_VAE)], ids=["sd15", "sd21"]
)
def test_full_size_models_match_diffusers_parameters(unet, vae):
    """Built on the meta device (no memory, no init): the same state dict layout as diffusers'."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        pairs = [
            (
                UNet2DConditionModel(UNetConfig.from_dict(unet)),
                diffusers.UNet2DConditionModel(**diffusers_kwargs(unet)),
            ),
            (AutoencoderKL(VAEConfig.from_dict(vae)), diffusers.AutoencoderKL(**diffusers_kwargs(vae))),
        ]
    for ours, reference in pairs:
        # same keys, shapes and key order (modules registered in diffusers' order)
        assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
            (k, v.shape) for k, v in reference.state_dict().items()
        ]
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    if unet is SD15_UNET:
        assert sum(p.numel() for p in pairs[0][0].parameters()) == SD15_UNET_PARAMS
