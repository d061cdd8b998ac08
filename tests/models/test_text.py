"""Prompt tokenization in 75-token chunks and batched text encoding."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.loading import TOKENIZER_ASSETS
from models.text import PromptEncoder
from models.tiny_configs import tiny_config

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_ASSETS))


@pytest.fixture(scope="module")
def encoder(tokenizer: CLIPTokenizer) -> PromptEncoder:
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig.from_dict(tiny_config("sd1")["text_encoder"])).eval()
    return PromptEncoder(tokenizer, model, max_batch_chunks=3)


def test_real_clip_tokens(tokenizer: CLIPTokenizer) -> None:
    # ids of the public openai/clip-vit-large-patch14 tokenizer
    assert tokenizer("a photo of a cat")["input_ids"] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert len(tokenizer) == 49408


def test_short_prompt_is_diffusers_sequence(encoder: PromptEncoder, tokenizer: CLIPTokenizer) -> None:
    """<= 75 tokens: the same 77 ids and embedding as diffusers' pipeline (pad to max_length)."""
    prompt = "a red circle in the top left on a blue background"
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert encoder.chunks(prompt) == [ids]
    ((cond, _),) = encoder.encode_pairs([prompt], [None])
    with torch.no_grad():
        expected = encoder.text_encoder(torch.tensor([ids])).last_hidden_state[0]
    torch.testing.assert_close(cond, expected)


def test_long_prompt_is_chunked_and_padded_against_negative(encoder: PromptEncoder) -> None:
    prompt = " ".join(["cat"] * 80)  # 80 tokens -> chunks of 75 and 5
    chunks = encoder.chunks(prompt)
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert chunks[0] == [BOS] + [2368] * 75 + [EOS]
    assert chunks[1][:7] == [BOS] + [2368] * 5 + [EOS] and chunks[1][7:] == [EOS] * 70  # SD1 pads with EOS
    ((cond, uncond),) = encoder.encode_pairs([prompt], ["blurry"])
    assert cond.shape == uncond.shape == (154, 32)
    # each chunk is encoded on its own: the second half of uncond is an empty prompt's embedding
    ((empty, _),) = encoder.encode_pairs([""], [None])
    torch.testing.assert_close(uncond[77:], empty)


def test_batched_encoding_equals_one_by_one(encoder: PromptEncoder) -> None:
    prompts = ["a blue square", " ".join(["dog"] * 160), "", "a green triangle at the bottom"]
    negatives = [None, "ugly", "", "a red circle"]
    batched = encoder.encode_pairs(prompts, negatives)  # 3 chunks per text-encoder call
    for prompt, negative, (cond, uncond) in zip(prompts, negatives, batched, strict=True):
        ((alone_cond, alone_uncond),) = encoder.encode_pairs([prompt], [negative])
        torch.testing.assert_close(cond, alone_cond, rtol=1e-5, atol=1e-5)
        if negative is None:
            assert uncond is None
        else:
            torch.testing.assert_close(uncond, alone_uncond, rtol=1e-5, atol=1e-5)
    assert batched[1][0].shape[0] == 3 * 77  # 160 tokens -> 3 chunks, negative padded to 3
    assert batched[1][1].shape[0] == 3 * 77
