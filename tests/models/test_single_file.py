"""Single-file (ldm layout) checkpoints: our key names are the real ones, conversions are exact and strict.

The reference is diffusers' own conversion code (`diffusers.loaders.single_file_utils`, test-only):
a file we write must give diffusers exactly the tensors of the modules it came from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as diffusers_single_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.single_file import (
    CheckpointError,
    detect_variant,
    diffusers_to_ldm,
    ldm_to_diffusers,
    read_checkpoint,
    write_checkpoint,
)
from models.tiny_configs import tiny_config

VARIANTS = ["sd1", "sd2"]
REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
CONFIG_DIRS = {v: REPO_MODELS / "reference_configs" / v for v in VARIANTS}
TOKENIZER_ASSETS = REPO_MODELS / "assets" / "clip_tokenizer"

Components = dict[str, dict[str, torch.Tensor]]


class NotATensor:
    """A Python object a weights_only torch.load must refuse."""


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded random values in every parameter: zeros or init patterns would hide mapping bugs."""
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator))


def _prefixed_text_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's CLIPTextModel keys lack `text_model.`; real checkpoints have it."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}


def _build(
    configs: dict[str, dict[str, Any]], seed: int = 0
) -> tuple[dict[str, torch.nn.Module], Components]:
    """diffusers' UNet and VAE and transformers' CLIP text model with random weights, and their state dicts."""
    generator = torch.Generator().manual_seed(seed)
    modules = {
        "unet": UNet2DConditionModel(**configs["unet"]),
        "vae": AutoencoderKL(**configs["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
    }
    for module in modules.values():
        _randomize(module, generator)
    components = {name: dict(module.state_dict()) for name, module in modules.items()}
    components["text_encoder"] = _prefixed_text_keys(components["text_encoder"])
    components["text_encoder"].pop("text_model.embeddings.position_ids", None)  # a buffer, not a weight
    return modules, components


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key], tensor), key


@pytest.fixture(scope="module", params=VARIANTS)
def tiny(
    request: pytest.FixtureRequest,
) -> tuple[str, dict[str, Any], dict[str, torch.nn.Module], Components]:
    variant = request.param
    configs = tiny_config(variant)
    modules, components = _build(configs)
    return variant, configs, modules, components


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A tiny SD 1.x single file on disk, and its configs."""
    configs = tiny_config("sd1")
    _, components = _build(configs, seed=1)
    path = tmp_path_factory.mktemp("sd1") / "tiny-sd1.safetensors"
    write_checkpoint(diffusers_to_ldm(components, configs, "sd1"), path)
    return path, configs


# ------------------------------------------------------------------------------------ round trips


def test_diffusers_to_ldm_to_diffusers_is_identity(tiny) -> None:
    variant, configs, _, components = tiny
    ldm = diffusers_to_ldm(components, configs, variant)
    assert all(
        k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in ldm
    )
    assert detect_variant(ldm) == variant
    back = ldm_to_diffusers(ldm, configs)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(back[name], components[name])


def test_text_keys_without_text_model_prefix_are_accepted(tiny) -> None:
    variant, configs, modules, components = tiny
    raw = {**components, "text_encoder": dict(modules["text_encoder"].state_dict())}  # transformers 5 naming
    assert not any(k.startswith("text_model.") for k in raw["text_encoder"])
    _assert_same(diffusers_to_ldm(raw, configs, variant), diffusers_to_ldm(components, configs, variant))


def test_vae_mid_attention_is_stored_as_1x1_convs(tiny) -> None:
    variant, configs, _, components = tiny
    ldm = diffusers_to_ldm(components, configs, variant)
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            weight = ldm[f"first_stage_model.{part}.mid.attn_1.{name}.weight"]
            assert weight.ndim == 4 and weight.shape[2:] == (1, 1)


# -------------------------------------------------------------- diffusers reads what we write


def _diffusers_convert(
    path: Path, configs: dict[str, Any], text_model: CLIPTextModel, variant: str
) -> Components:
    """diffusers' own single-file conversion of each component."""
    checkpoint = diffusers_single_file.load_single_file_checkpoint(str(path))
    if variant == "sd1":
        assert diffusers_single_file.is_clip_model(checkpoint)
        text = diffusers_single_file.convert_ldm_clip_checkpoint(checkpoint)
    else:
        assert diffusers_single_file.is_open_clip_model(checkpoint)
        text = diffusers_single_file.convert_open_clip_checkpoint(text_model, checkpoint)
    return {
        "unet": diffusers_single_file.convert_ldm_unet_checkpoint(checkpoint, configs["unet"]),
        "vae": diffusers_single_file.convert_ldm_vae_checkpoint(checkpoint, configs["vae"]),
        "text_encoder": text,
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_diffusers_own_conversion_reads_our_file(tiny, tmp_path: Path, suffix: str) -> None:
    variant, configs, modules, components = tiny
    path = tmp_path / f"model{suffix}"
    write_checkpoint(diffusers_to_ldm(components, configs, variant), path)

    converted = _diffusers_convert(path, configs, modules["text_encoder"], variant)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(converted[name], components[name])
    # and our reader of the same file
    ours = ldm_to_diffusers(read_checkpoint(path), configs)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(ours[name], components[name])


def test_diffusers_from_single_file_loads_our_file(tiny, tmp_path: Path) -> None:
    """The whole diffusers pipeline path, with a local config folder (nothing downloaded)."""
    variant, configs, modules, components = tiny
    path = tmp_path / "model.safetensors"
    write_checkpoint(diffusers_to_ldm(components, configs, variant), path)
    folder = tmp_path / "config"
    for name in ("unet", "vae", "text_encoder"):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(configs[name]))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"]))
    shutil.copytree(TOKENIZER_ASSETS, folder / "tokenizer")
    model_index = json.loads((CONFIG_DIRS[variant] / "model_index.json").read_text())
    model_index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(model_index))

    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(dict(getattr(pipe, name).state_dict()), dict(modules[name].state_dict()))


def test_real_sd2_layout_extra_resblock_and_projection_are_dropped(tmp_path: Path) -> None:
    """Real SD 2.x files hold 24 OpenCLIP resblocks, text_projection and logit_scale; the config uses 23."""
    configs = tiny_config("sd2")
    configs["text_encoder"]["num_hidden_layers"] = 23
    modules, components = _build(configs, seed=2)
    ldm = diffusers_to_ldm(components, configs, "sd2")
    generator = torch.Generator().manual_seed(3)
    hidden, projection = configs["text_encoder"]["hidden_size"], configs["text_encoder"]["projection_dim"]
    for key in [k for k in ldm if ".resblocks.22." in k]:
        ldm[key.replace(".resblocks.22.", ".resblocks.23.")] = torch.randn(
            ldm[key].shape, generator=generator
        )
    ldm["cond_stage_model.model.text_projection"] = torch.randn(hidden, projection, generator=generator)
    ldm["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    ldm["alphas_cumprod"] = torch.rand(1000, generator=generator)
    ldm["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "sd2-real-layout.safetensors"
    write_checkpoint(ldm, path)

    converted = _diffusers_convert(path, configs, modules["text_encoder"], "sd2")
    _assert_same(converted["text_encoder"], components["text_encoder"])
    ours = ldm_to_diffusers(read_checkpoint(path), configs)
    _assert_same(ours["text_encoder"], components["text_encoder"])


def test_real_sd1_non_model_keys_are_ignored(sd1_file) -> None:
    path, configs = sd1_file
    state_dict = read_checkpoint(path)
    expected = ldm_to_diffusers(state_dict, configs)
    state_dict["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state_dict["betas"] = torch.zeros(1000)
    state_dict["model_ema.num_updates"] = torch.tensor(0)
    state_dict["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(1)
    result = ldm_to_diffusers(state_dict, configs)
    for name in expected:
        _assert_same(result[name], expected[name])


def test_ckpt_with_lightning_wrapper_is_unwrapped(sd1_file, tmp_path: Path) -> None:
    path, _ = sd1_file
    state_dict = read_checkpoint(path)
    ckpt = tmp_path / "wrapped.ckpt"
    torch.save({"epoch": 6, "global_step": 470000, "state_dict": state_dict}, ckpt)
    _assert_same(read_checkpoint(ckpt), state_dict)


# ------------------------------------------------------------------------------ bad checkpoints


def _error(func, *args) -> str:
    with pytest.raises(CheckpointError) as info:
        func(*args)
    return str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    message = _error(read_checkpoint, tmp_path / "nope.safetensors")
    assert "nope.safetensors" in message and "does not exist" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("content", [b"this is a text file, not a checkpoint\n", bytes(range(256)) * 8])
def test_not_a_checkpoint(tmp_path: Path, suffix: str, content: bytes) -> None:
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(content)
    message = _error(read_checkpoint, path)
    assert str(path) in message
    assert "not a valid .safetensors file" in message or "not a PyTorch checkpoint" in message


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    assert "unsupported checkpoint file type '.onnx'" in _error(read_checkpoint, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(sd1_file, tmp_path: Path, suffix: str) -> None:
    source, _ = sd1_file
    whole = tmp_path / f"whole{suffix}"
    write_checkpoint(read_checkpoint(source), whole)
    cut = tmp_path / f"cut{suffix}"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    message = _error(read_checkpoint, cut)
    assert str(cut) in message
    assert "truncated" in message


def _cause(func, *args) -> BaseException | None:
    with pytest.raises(CheckpointError) as info:
        func(*args)
    return info.value.__cause__


def test_truncated_legacy_pickle_ckpt(tmp_path: Path) -> None:
    whole = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"a": torch.randn(64, 64)}}, whole, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:500])
    message = _error(read_checkpoint, cut)
    assert "cut.ckpt" in message and "truncated or corrupt" in message
    assert read_checkpoint(whole).keys() == {"a"}  # the whole legacy file is fine


def test_pickle_refused_by_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "payload": NotATensor()}, path)
    message = _error(read_checkpoint, path)
    assert "evil.ckpt" in message and "weights_only=True" in message
    assert "NotATensor" in message  # names the refused object
    assert _cause(read_checkpoint, path) is not None


def test_dict_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {"epoch": 3, "name": "x"}}, path)
    message = _error(read_checkpoint, path)
    assert "empty.ckpt" in message and "no tensors" in message


def test_missing_keys_are_named(sd1_file) -> None:
    path, configs = sd1_file
    state_dict = read_checkpoint(path)
    dropped = ["model.diffusion_model.out.2.weight", "first_stage_model.encoder.mid.attn_1.q.weight"]
    for key in dropped:
        del state_dict[key]
    message = _error(ldm_to_diffusers, state_dict, configs)
    assert "2 keys the configs require are missing" in message
    assert all(key in message for key in dropped)


def test_unexpected_keys_are_named_with_count(sd1_file) -> None:
    path, configs = sd1_file
    state_dict = read_checkpoint(path)
    extra = [f"model.diffusion_model.extra_block.{i}.weight" for i in range(12)]
    for key in extra:
        state_dict[key] = torch.zeros(1)
    message = _error(ldm_to_diffusers, state_dict, configs)
    assert "12 keys map to nothing" in message
    assert "extra_block.0.weight" in message and "(2 more)" in message  # first 10 shown


def test_wrong_shape_is_named(sd1_file) -> None:
    path, configs = sd1_file
    configs = json.loads(json.dumps(configs))
    configs["unet"]["cross_attention_dim"] = 40  # the file's UNet was built with 32
    message = _error(ldm_to_diffusers, read_checkpoint(path), configs)
    assert "config does not fit the weights" in message
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in message
    assert "expected (32, 40), found (32, 32)" in message


def test_wrong_variant_configs_do_not_fit(sd1_file) -> None:
    path, _ = sd1_file
    message = _error(ldm_to_diffusers, read_checkpoint(path), tiny_config("sd2"))
    assert "config does not fit the weights" in message


def test_not_a_stable_diffusion_checkpoint(tiny) -> None:
    _, _, _, components = tiny
    message = _error(detect_variant, components["unet"])  # a diffusers-format UNet file
    assert "not a Stable Diffusion single-file checkpoint" in message and "model.diffusion_model." in message
    message = _error(ldm_to_diffusers, components["vae"], tiny_config("sd1"))
    assert "not a Stable Diffusion single-file checkpoint" in message


def test_sdxl_with_one_text_encoder_and_unet_only_files_are_not_supported() -> None:
    """(SDXL base itself is supported: tests/models/test_sdxl_loading.py.)"""
    sdxl = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
    }
    assert "unknown text encoders" in _error(detect_variant, sdxl)
    unet_only = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    assert "not supported" in _error(detect_variant, unet_only)


def test_diffusers_to_ldm_is_strict(tiny) -> None:
    variant, configs, _, components = tiny
    broken = {name: dict(sd) for name, sd in components.items()}
    del broken["vae"]["decoder.conv_out.weight"]
    broken["unet"]["surprise.weight"] = torch.zeros(1)
    message = _error(diffusers_to_ldm, broken, configs, variant)
    assert "vae: decoder.conv_out.weight" in message and "unet: surprise.weight" in message


def test_unsupported_config_option_is_an_error(tiny) -> None:
    variant, configs, _, components = tiny
    configs = json.loads(json.dumps(configs))
    configs["unet"]["class_embed_type"] = "timestep"
    with pytest.raises(ValueError, match="class_embed_type"):
        diffusers_to_ldm(components, configs, variant)


# ------------------------------------------------------------------------- shipped config folders


def _read_configs(variant: str) -> dict[str, dict[str, Any]]:
    folder = CONFIG_DIRS[variant]
    names = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json"}
    configs = {name: json.loads((folder / rel).read_text()) for name, rel in names.items()}
    configs["scheduler"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    configs["model_index"] = json.loads((folder / "model_index.json").read_text())
    return configs


def _meta_components(configs: dict[str, dict[str, Any]]) -> Components:
    """State dicts of real-size modules built from config.json contents on the meta device (no memory)."""
    public = {
        name: {k: v for k, v in configs[name].items() if not k.startswith("_")} for name in ("unet", "vae")
    }
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel(**public["unet"]),
            "vae": AutoencoderKL(**public["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }
    components = {name: dict(module.state_dict()) for name, module in modules.items()}
    components["text_encoder"] = _prefixed_text_keys(components["text_encoder"])
    components["text_encoder"].pop("text_model.embeddings.position_ids", None)
    return components


# real SD 1.5 / SD 2.1 state dicts, diffusers naming: (unet, vae, text_encoder) key counts
REAL_KEY_COUNTS = {"sd1": (686, 248, 196), "sd2": (686, 248, 372)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_configs_build_real_size_models_and_round_trip_keys(variant: str) -> None:
    configs = _read_configs(variant)
    components = _meta_components(configs)
    counts = tuple(len(components[name]) for name in ("unet", "vae", "text_encoder"))
    assert counts == REAL_KEY_COUNTS[variant]

    ldm = diffusers_to_ldm(components, configs, variant)
    assert len(ldm) == {"sd1": 1130, "sd2": 1214}[variant]  # real files add schedule buffers etc.
    assert detect_variant(ldm) == variant
    back = ldm_to_diffusers(ldm, configs)
    for name in ("unet", "vae", "text_encoder"):
        assert back[name].keys() == components[name].keys()
        assert all(back[name][k].shape == components[name][k].shape for k in back[name])


# Keys of the real SD 1.5 / 2.1 files that diffusers' lenient conversion would not tell apart from
# near-misses (it accepts an upsampler at `.1.conv` or `.2.conv`), spelled as in CompVis openaimodel.py.
REAL_LDM_KEYS = [
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.9.0.op.bias",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",  # no attention in the first up block
    "model.diffusion_model.output_blocks.5.2.conv.weight",  # resnet, attention, upsampler
    "model.diffusion_model.output_blocks.8.2.conv.bias",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.middle_block.1.proj_out.weight",
    "model.diffusion_model.time_embed.2.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.mid.attn_1.proj_out.weight",
    "first_stage_model.quant_conv.weight",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_configs_give_the_real_key_names(variant: str) -> None:
    configs = _read_configs(variant)
    ldm = diffusers_to_ldm(_meta_components(configs), configs, variant)
    assert [k for k in REAL_LDM_KEYS if k not in ldm] == []
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" not in ldm
    # diffusers' own model-type detection, from key names and shapes
    assert diffusers_single_file.infer_diffusers_model_type(ldm) == {"sd1": "v1", "sd2": "v2"}[variant]
    if variant == "sd1":
        assert ldm["cond_stage_model.transformer.text_model.final_layer_norm.weight"].shape == (768,)
    else:
        assert ldm["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape == (
            3072,
            1024,
        )
        assert ldm["cond_stage_model.model.positional_embedding"].shape == (77, 1024)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_configs_values(variant: str) -> None:
    configs = _read_configs(variant)
    unet, text, scheduler = configs["unet"], configs["text_encoder"], configs["scheduler"]
    assert configs["model_index"]["_class_name"] == "StableDiffusionPipeline"
    assert configs["vae"]["scaling_factor"] == 0.18215
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"]) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert (scheduler["steps_offset"], scheduler["set_alpha_to_one"], scheduler["clip_sample"]) == (
        1,
        False,
        False,
    )
    if variant == "sd1":
        assert (unet["attention_head_dim"], unet["cross_attention_dim"], unet["use_linear_projection"]) == (
            8,
            768,
            False,
        )
        assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (768, 12, "quick_gelu")
        assert scheduler["prediction_type"] == "epsilon"
    else:
        assert unet["attention_head_dim"] == [5, 10, 20, 20] and unet["cross_attention_dim"] == 1024
        assert unet["use_linear_projection"] is True and unet["upcast_attention"] is True
        assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (1024, 23, "gelu")
        assert (text["num_attention_heads"], text["intermediate_size"], text["projection_dim"]) == (
            16,
            4096,
            512,
        )
        assert scheduler["prediction_type"] == "v_prediction"


@pytest.mark.parametrize(("variant", "pad_id"), [("sd1", 49407), ("sd2", 0)])
def test_shipped_tokenizer_configs_load_with_shared_vocab(variant: str, pad_id: int, tmp_path: Path) -> None:
    folder = tmp_path / "tokenizer"
    shutil.copytree(CONFIG_DIRS[variant] / "tokenizer", folder)
    assert not (folder / "vocab.json").exists()  # the vocabulary lives once, in models/assets
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_ASSETS / name, folder / name)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tokenizer.pad_token_id == pad_id
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    assert tokenizer("a photo")["input_ids"][0] == 49406
