"""SDXL: two text encoders and an added conditioning (diffusers' StableDiffusionXLPipeline).

- Context: CLIP ViT-L's and OpenCLIP bigG's penultimate hidden states (`hidden_states[-2]`, no
  final layer norm), side by side along the features: 768 + 1280 = 2048 per token.
- Pooled text embedding (`text_embeds`, a per-row UNet input): bigG's projected pooled output (its
  final layer norm at the first EOS token, through `text_projection`).
- Six size/crop numbers (`time_ids`, a per-row input): original (height, width), crop (top, left),
  target (height, width); by default as diffusers: original = target = the requested size, crop 0.
- `force_zeros_for_empty_prompt` (the pipeline config; true for SDXL base): an empty negative prompt
  is zeros, context and pooled, instead of the encoded empty prompt.

Long prompts are chunked through both encoders as SD 1/2's are (models/text.py: 75-token chunks,
each [BOS] chunk [EOS] padded to 77, the chunks' contexts concatenated). The pooled embedding of a
prompt of several chunks is its FIRST chunk's, as AUTOMATIC1111 takes it (sd_hijack_clip:
`zs[0].pooled`): the first chunk holds the start of the prompt, and it is exactly what diffusers
computes for the same prompt, which it truncates to that first chunk (77 tokens). A negative
prompt padded with empty chunks to its prompt's length keeps its own first chunk's pooled too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.families import Conditioning
from models.stable_diffusion import StableDiffusion
from models.text import PromptEncoder
from models.transfer import to_device
from schemas.generation import Generation


class SDXLPromptEncoder:
    """Both encoders over the same chunks, in as few calls as possible (`max_text_batch` chunks)."""

    def __init__(self, model: StableDiffusion, max_text_batch: int) -> None:
        if model.text_encoder_2 is None or model.tokenizer_2 is None:
            raise ValueError("an SDXL model needs text_encoder_2 and tokenizer_2")
        # the two tokenizers share CLIP's BPE and differ in padding ("<|endoftext|>" and "!")
        self.first = PromptEncoder(model.tokenizer, model.text_encoder, max_text_batch)
        self.second = PromptEncoder(model.tokenizer_2, model.text_encoder_2, max_text_batch)
        self.max_batch_chunks = max_text_batch
        self.force_zeros_for_empty_prompt = model.force_zeros_for_empty_prompt

    def num_chunks(self, text: str) -> int:
        return max(self.first.num_chunks(text), self.second.num_chunks(text))

    @torch.no_grad()
    def encode(self, texts: Sequence[tuple[str, int]]) -> list[Conditioning]:
        """Each (text, chunks) as Conditioning: context (chunks * 77, 2048), `text_embeds` (1, 1280)."""
        ids_1 = [chunk for text, n in texts for chunk in self.first.chunks(text, n)]
        ids_2 = [chunk for text, n in texts for chunk in self.second.chunks(text, n)]
        encoder_1, encoder_2 = self.first.text_encoder, self.second.text_encoder
        contexts, pooled = [], []
        for start in range(0, len(ids_1), self.max_batch_chunks):
            stop = start + self.max_batch_chunks
            out_1 = encoder_1(
                input_ids=torch.tensor(ids_1[start:stop], device=encoder_1.device), output_hidden_states=True
            )
            out_2 = encoder_2(
                input_ids=torch.tensor(ids_2[start:stop], device=encoder_2.device), output_hidden_states=True
            )
            # (n, 77, 768) and (n, 77, 1280) -> (n, 77, 2048)
            contexts.append(torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1))
            pooled.append(out_2.text_embeds)  # (n, 1280)
        hidden, pooled_all = torch.cat(contexts), torch.cat(pooled)
        result, offset = [], 0
        for _, n in texts:
            context = hidden[offset : offset + n].reshape(n * self.first.chunk_length, -1)
            # the first chunk's pooled embedding (module docstring)
            result.append(Conditioning(context, {"text_embeds": pooled_all[offset : offset + 1]}))
            offset += n
        return result

    def encode_pairs(
        self, prompts: Sequence[str], negative_prompts: Sequence[str | None]
    ) -> list[tuple[Conditioning, Conditioning | None]]:
        """As models.text.PromptEncoder.encode_pairs, with SDXL's zeros for an empty negative prompt."""
        if len(prompts) != len(negative_prompts):
            raise ValueError("prompts and negative_prompts must have the same length")
        texts: list[tuple[str, int]] = []
        for prompt, negative in zip(prompts, negative_prompts, strict=True):
            if negative is None or self._zeros(negative):
                texts.append((prompt, self.num_chunks(prompt)))
            else:
                n = max(self.num_chunks(prompt), self.num_chunks(negative))
                texts += [(prompt, n), (negative, n)]
        encoded = iter(self.encode(texts))
        pairs: list[tuple[Conditioning, Conditioning | None]] = []
        for negative in negative_prompts:
            cond = next(encoded)
            if negative is None:
                uncond = None
            elif self._zeros(negative):
                uncond = Conditioning(
                    torch.zeros_like(cond.context),
                    {name: torch.zeros_like(value) for name, value in cond.row_inputs.items()},
                )
            else:
                uncond = next(encoded)
            pairs.append((cond, uncond))
        return pairs

    def _zeros(self, negative: str) -> bool:
        # diffusers zeroes a negative prompt left out (None); ours is "" then
        return negative == "" and self.force_zeros_for_empty_prompt


def time_ids(request: Generation) -> list[int]:
    """The six numbers of a request, as diffusers' `_get_add_time_ids`: original (height, width), crop
    (top, left), target (height, width); unset ones as diffusers defaults them."""
    size = (request.height, request.width)
    original = request.original_size or size
    crop = request.crops_coords_top_left or (0, 0)
    target = request.target_size or size
    return [*original, *crop, *target]


class SDXLFamily:
    name = "sdxl"
    label = "SDXL"

    def prompt_encoder(self, model: StableDiffusion, max_text_batch: int) -> SDXLPromptEncoder:
        return SDXLPromptEncoder(model, max_text_batch)

    def request_row_inputs(self, model: StableDiffusion, request: Generation) -> dict[str, torch.Tensor]:
        # in the text encoders' dtype, as diffusers makes them (prompt_embeds.dtype)
        ids = torch.tensor([time_ids(request)], dtype=model.dtype)  # (1, 6)
        return {"time_ids": to_device(ids, model.device)}

    def check_generation(self, model: StableDiffusion, request: Generation) -> None:
        """The size fields' bounds are Generation's own; nothing more depends on the model."""


SDXL = SDXLFamily()
