"""Prompt conditioning: CLIP tokenization in 75-token chunks and batched text encoding.

Prompts longer than 75 tokens are split as AUTOMATIC1111 does: 75-token chunks, each encoded on
its own as ``[BOS] chunk [EOS] pad...`` (77 tokens), and the chunk embeddings concatenated along the
sequence. A prompt of at most 75 tokens is exactly diffusers' single 77-token sequence, so short
prompts give diffusers' embeddings. A prompt and its negative prompt are padded to the same number
of chunks with empty chunks, so their embeddings have the same length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer

CHUNK_TOKENS = 75  # prompt tokens per chunk; with BOS and EOS a chunk is 77 tokens
# Longest prompt (and negative prompt) accepted: every image in a UNet call attends over the longest
# context of the call, so one huge prompt would slow all its batch-mates down.
MAX_CHUNKS = 8
MAX_PROMPT_TOKENS = MAX_CHUNKS * CHUNK_TOKENS


class PromptEncoder:
    """Turns prompts into the cross-attention context the UNet reads: (chunks * 77, D) each."""

    def __init__(
        self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, max_batch_chunks: int = 64
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_batch_chunks = max_batch_chunks  # chunks per text-encoder call, bounds memory
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.chunk_length = CHUNK_TOKENS + 2
        max_positions = text_encoder.config.max_position_embeddings
        if max_positions < self.chunk_length:
            raise ValueError(
                f"text encoder max_position_embeddings is {max_positions}, a chunk needs {self.chunk_length}"
            )

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's BPE token ids, without special tokens and without truncation."""
        # Chunking is ours, so the tokenizer's 77-token limit must not truncate or warn here.
        return self.tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def chunks(self, prompt: str, min_chunks: int = 1) -> list[list[int]]:
        """The prompt as 77-token chunks ``[BOS] tokens [EOS] pad...``, at least `min_chunks` of them."""
        ids = self.token_ids(prompt)
        pieces = [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)] or [[]]
        pieces += [[]] * (min_chunks - len(pieces))
        return [[self.bos_id, *p, self.eos_id] + [self.pad_id] * (CHUNK_TOKENS - len(p)) for p in pieces]

    def num_chunks(self, prompt: str) -> int:
        return max(1, -(-len(self.token_ids(prompt)) // CHUNK_TOKENS))

    @torch.no_grad()
    def encode_chunks(self, chunk_lists: Sequence[list[list[int]]]) -> list[torch.Tensor]:
        """Encode several prompts' chunks in as few text-encoder calls as possible.

        Returns one (num_chunks * 77, D) tensor per prompt, in the text encoder's dtype and device.
        """
        flat = [chunk for chunks in chunk_lists for chunk in chunks]
        device = self.text_encoder.device
        outputs = []
        for start in range(0, len(flat), self.max_batch_chunks):
            ids = torch.tensor(flat[start : start + self.max_batch_chunks], dtype=torch.long, device=device)
            outputs.append(self.text_encoder(input_ids=ids).last_hidden_state)  # (n, 77, D)
        hidden = torch.cat(outputs)
        result, offset = [], 0
        for chunks in chunk_lists:
            n = len(chunks)
            result.append(hidden[offset : offset + n].reshape(n * self.chunk_length, -1))
            offset += n
        return result

    def encode_pairs(
        self, prompts: Sequence[str], negative_prompts: Sequence[str | None]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Encode (prompt, negative prompt) pairs in one batch.

        A None negative prompt means "no unconditional pass" (guidance <= 1). Otherwise the
        negative prompt ("" for the plain empty-prompt unconditional) is padded to the same number of
        chunks as its prompt, and vice versa. Returns (cond, uncond) per pair, each (L, D).
        """
        if len(prompts) != len(negative_prompts):
            raise ValueError("prompts and negative_prompts must have the same length")
        chunk_lists: list[list[list[int]]] = []
        for prompt, negative in zip(prompts, negative_prompts, strict=True):
            if negative is None:
                chunk_lists.append(self.chunks(prompt))
                continue
            n = max(self.num_chunks(prompt), self.num_chunks(negative))
            chunk_lists.append(self.chunks(prompt, n))
            chunk_lists.append(self.chunks(negative, n))
        encoded = iter(self.encode_chunks(chunk_lists))
        return [(next(encoded), None if negative is None else next(encoded)) for negative in negative_prompts]
