"""LoRA files: kohya's and diffusers/PEFT's names read into the same adapters; other network types,
corrupt files and files that hold no LoRA refused with a message that says what they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.lora.files import LoraFileError, read_header, read_lora, resolve

NAMES = {
    "unet": [
        "down_blocks.0.attentions.0.proj_in",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    ],
    "text_encoder": ["encoder.layers.0.self_attn.q_proj"],
}
DOWN_CONV, UP_CONV = torch.randn(2, 8, 1, 1), torch.randn(8, 2, 1, 1)
DOWN_K, UP_K = torch.randn(2, 32), torch.randn(8, 2)
DOWN_Q, UP_Q = torch.randn(2, 16), torch.randn(16, 2)


def kohya(path: Path) -> Path:
    stems = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": (DOWN_CONV, UP_CONV),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (DOWN_K, UP_K),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (DOWN_Q, UP_Q),
    }
    tensors = {}
    for stem, (down, up) in stems.items():
        tensors |= {
            f"{stem}.lora_down.weight": down,
            f"{stem}.lora_up.weight": up,
            f"{stem}.alpha": torch.tensor(6.0),
        }
    save_file(tensors, str(path))
    return path


def peft(path: Path) -> Path:
    modules = {
        "unet.down_blocks.0.attentions.0.proj_in": (DOWN_CONV, UP_CONV),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (DOWN_K, UP_K),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (DOWN_Q, UP_Q),
    }
    tensors = {}
    for module, (down, up) in modules.items():
        tensors |= {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
    metadata = {"unet.r": 2, "unet.lora_alpha": 6, "text_encoder.r": 2, "text_encoder.lora_alpha": 6}
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata)})
    return path


def test_both_formats_give_the_same_adapters(tmp_path: Path) -> None:
    read = [
        resolve(read_lora(make(tmp_path / f"{i}.safetensors")), NAMES, "x")
        for i, make in enumerate((kohya, peft))
    ]
    assert read[0].keys() == read[1].keys() == {"unet", "text_encoder"}
    for part in read[0]:
        assert read[0][part].keys() == read[1][part].keys()
        for module, adapter in read[0][part].items():
            other = read[1][part][module]
            assert adapter.scale == other.scale == 3.0  # alpha 6 / rank 2
            assert torch.equal(adapter.down, other.down) and torch.equal(adapter.up, other.up)
    header = read_header(tmp_path / "0.safetensors")
    assert (header.format, header.family, header.context_dim, header.rank) == ("kohya", "sd", 32, 2)
    assert header.layers == {"unet": 2, "text_encoder": 1}


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        (["lora_unet_x.hada_w1_a", "lora_unet_x.hada_w1_b"], "LoHa"),
        (["lora_unet_x.lokr_w1", "lora_unet_x.lokr_w2"], "LoKr"),
        (["lora_unet_x.lora_down.weight", "lora_unet_x.dora_scale"], "DoRA"),
        (["model.diffusion_model.input_blocks.0.0.weight"], "holds no LoRA weights"),
    ],
)
def test_other_network_types_are_refused_by_name(tmp_path: Path, keys: list[str], named: str) -> None:
    path = tmp_path / "n.safetensors"
    save_file({key: torch.zeros(2, 2) for key in keys}, str(path))
    with pytest.raises(LoraFileError, match=named):
        read_lora(path)
    with pytest.raises(LoraFileError, match=named):
        read_header(path)


def test_a_corrupt_file_and_layers_a_model_lacks_are_named(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 40)
    with pytest.raises(LoraFileError, match="corrupt.safetensors is not a readable .safetensors file"):
        read_lora(corrupt)
    weights = read_lora(kohya(tmp_path / "k.safetensors"))
    with pytest.raises(LoraFileError, match="layers of the unet this model does not have"):
        resolve(weights, {**NAMES, "unet": NAMES["unet"][:1]}, "LoRA 'k'")
    with pytest.raises(LoraFileError, match="adapts text_encoder, which this model does not have"):
        resolve(weights, {"unet": NAMES["unet"]}, "LoRA 'k'")
    # a layer the model has but LoRAs are not applied to (conv_in, time_embedding...): said so
    adapted_here = {**NAMES, "unet": NAMES["unet"][:1]}
    with pytest.raises(LoraFileError, match="layers of the unet that this server does not apply LoRAs to"):
        resolve(weights, adapted_here, "LoRA 'k'", present=NAMES)


@pytest.mark.parametrize(
    ("original", "diffusers_name"),
    [
        (
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        ),
        ("input_blocks_2_0_in_layers_2", "down_blocks_0_resnets_1_conv1"),
        ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
        ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
        ("middle_block_2_emb_layers_1", "mid_block_resnets_1_time_emb_proj"),
        ("output_blocks_5_0_skip_connection", "up_blocks_1_resnets_2_conv_shortcut"),
        ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
        ("output_blocks_8_0_out_layers_3", "up_blocks_2_resnets_2_conv2"),
        ("time_embed_0", "time_embedding_linear_1"),
        ("input_blocks_0_0", "conv_in"),
        ("down_blocks_0_attentions_0_proj_in", "down_blocks_0_attentions_0_proj_in"),
    ],
)
def test_the_original_unets_layer_names_map_as_diffusers_maps_them(
    original: str, diffusers_name: str
) -> None:
    from models.lora.files import sgm_to_diffusers

    assert sgm_to_diffusers(original, layers_per_block=2) == diffusers_name  # SDXL's layout
