"""workers/main.py's start-up helpers: the VAE decoder compiled on the main thread before the engine
starts, and the warm-up decoding through it."""

from __future__ import annotations

from pathlib import Path

import torch

from models.accel import AccelConfig, VAEDecoder
from models.loading import load_model
from workers.main import native_latent, prepare_vae_decoder, warm_up


def test_the_vae_decoder_is_compiled_at_start_up_for_one_and_for_more_latents(
    tiny_model_dir: Path,
) -> None:
    model = load_model(tiny_model_dir)
    compiled: list[tuple[int, ...]] = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        compiled.append(tuple(example_inputs[0].shape))
        return graph.forward

    torch._dynamo.reset()
    config = AccelConfig(
        compile_vae=True, compile_backend=counting_backend, compile_latents=(native_latent(model),)
    )
    decoder = VAEDecoder(model.vae, config)
    prepare_vae_decoder(model, None)  # nothing to prepare
    prepare_vae_decoder(model, VAEDecoder(model.vae, AccelConfig()))  # not compiled: nothing either
    assert compiled == []
    prepare_vae_decoder(model, decoder)
    assert len(compiled) == 2  # 1 latent, then the graph for 2 and more
    calls: list[int] = []

    def counting(z: torch.Tensor) -> torch.Tensor:
        calls.append(z.shape[0])
        return decoder(z)

    warm_up(model, None, vae_batch=4, vae_decoder=counting)  # the CPU: one generation, decoded
    assert calls == [1] and len(compiled) == 2  # through the decoder, no compile on the engine thread
    torch._dynamo.reset()
