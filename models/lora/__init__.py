"""LoRAs applied per request, many different ones in one batch, never merged into the UNet.

- files.py: a `.safetensors` LoRA in kohya/AUTOMATIC1111's names (`lora_unet_*`, `lora_te*_*`,
  `.lora_down`/`.lora_up`/`.alpha`, LoCon convolutions included) or diffusers/PEFT's (`lora_A`/
  `lora_B`) read into one normalized form: per part ("unet", "text_encoder", "text_encoder_2"), our
  module names -> (down, up, scale). Other LyCORIS types are refused by name.
- layers.py: the UNet's Linear and Conv2d layers with batched adapters: each adds
  `weight * up(down(x))` for its own rows, from a fixed pool of device slots. A row's slot indices
  and weights are UNet row inputs (models/unet.py: ROW_INPUTS), not shapes: compiled graphs and CUDA
  graphs survive any mix of LoRAs.
- pool.py: the device slots (count and rank fixed at start), which LoRA is in which slot, and
  leases: a slot is reused only when no running image holds its LoRA.
- text.py: a request's text-encoder adapters, applied while its prompts are encoded.
- library.py: the LoRA files of a folder by name: listing from their headers, a host-memory LRU of
  parsed files, the pool fed on first use.
"""
