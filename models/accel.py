"""The UNet's fast path on a GPU, each part switchable (`AccelConfig`), outputs unchanged.

- **CUDA graphs per batch-size bucket.** Eager PyTorch launches the UNet's ~1,500 kernels one by one
  from Python; at small batches the GPU waits for the host. A captured graph replays them all with
  one launch. A graph has fixed shapes and fixed input addresses, so the rows of a call are padded
  up to the next bucket (1, 2, 4, 8, 16, 24, 32, 48, 64 by default) and the inputs (latents,
  per-row timesteps, contexts, key-padding mask, an LCM-distilled UNet's guidance embeddings) are
  copied into the bucket's static buffers before each replay. Padding rows cost compute but change
  nothing: every UNet op works within its own row (GroupNorm per sample, convs, attention over the
  row's own tokens), and only the real rows are returned. The key of a bucket is (rows, latent
  C/h/w, context length and width, mask present or not, dtypes, timestep condition width). Graphs
  are captured lazily on first use (warm-up runs on a side stream first, as PyTorch's CUDA-graph
  docs require), share one memory pool, and at most `max_graphs` are kept (least recently used
  freed first), so memory stays bounded.
- **Attention kernel** for the UNet's `scaled_dot_product_attention` calls (flash, efficient,
  cudnn, math, or PyTorch's choice).
- **channels_last** memory format of the UNet and VAE convolutions (cuDNN's native layout for
  half-precision tensor cores; our blocks keep the input's format, see models/blocks.py); the VAE
  may take another layout than the UNet (`vae_channels_last`).
- **torch.compile** of the UNet, alone or inside our graphs (the worker's default on CUDA), one
  graph per bucket or one for all (`compile_dynamic_batch`: the batch dimension symbolic, one
  compile at start-up instead of one per bucket), for every call or only chosen ones
  (`compile_latents`, `compile_context_lengths`: the worker's native size with one-chunk prompts,
  compiled at warm-up; other calls run uncompiled).
- **torch.compile of the VAE decoder** (`compile_vae`, off by default: GroupNorm and SiLU fused into
  the convolutions' neighbours, for a longer start-up), for the same chosen latent shapes, the
  batch dimension dynamic (decode calls take 1 to `vae_batch` latents); other shapes decode
  uncompiled. `VAEDecoder` is what the Pipeline calls.
- **Fused attention projections** (`fuse_projections`, off by default): one matmul for each
  attention's q, k and v instead of three, the UNet's and the VAE's; the state dict then no longer
  has diffusers' keys until they are split again.
- **Backend flags** for the process: TF32 for float32 matmuls/convs, cuDNN autotuning.

On the CPU the same bucketing code runs eagerly (no capture), which is how tests check it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.blocks import QKVProjections
from models.stable_diffusion import StableDiffusion
from models.transfer import to_device

log = logging.getLogger(__name__)

# Allowed kernels per choice, in priority order: the named kernel wherever it applies, then the
# others. Flash takes no attention mask, so with "flash" the masked cross-attention of long prompts
# runs on efficient attention; math is the last resort for shapes no fused kernel takes (e.g. a head
# size that is not a multiple of 8), so no model fails for its choice of kernel.
_MATH = SDPBackend.MATH
SDPA_BACKENDS: dict[str, tuple[SDPBackend, ...] | None] = {
    "auto": None,  # PyTorch's own choice per call
    "flash": (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, _MATH),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION, _MATH),
    "cudnn": (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, _MATH),
    "math": (_MATH,),
}
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)  # UNet rows; CFG gives 2 per image


@dataclass(frozen=True)
class AccelConfig:
    """How the UNet runs. The defaults are the plain eager path (what the CPU uses)."""

    channels_last: bool = False
    sdpa_backend: str = "auto"  # a key of SDPA_BACKENDS
    cuda_graphs: bool = False  # capture per bucket (on CPU: the bucketed path, run eagerly)
    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # row counts calls are padded up to
    max_graphs: int = 16  # buckets kept (graphs + static buffers); least recently used freed
    pad_to_bucket: bool = False  # pad rows to buckets even without graphs (compile, tests)
    compile_mode: str = "off"  # a value of COMPILE_MODES
    # a torch.compile backend: name or callable (tests use "eager" to check the plumbing quickly)
    compile_backend: str | Callable[..., Any] = "inductor"
    # latent shapes (C, h, w) and context lengths (prompt tokens) whose unmasked calls are compiled;
    # () for both compiles everything. A compile of SD 1.5 takes minutes: the worker compiles its
    # native size with one-chunk prompts during warm-up, and any other call (another size, longer
    # prompts, a key mask) takes the uncompiled graphs instead of stalling the whole batch while it
    # compiles.
    compile_latents: tuple[tuple[int, int, int], ...] = ()
    compile_context_lengths: tuple[int, ...] = ()
    # one compiled graph for every bucket of a latent shape (the batch dimension symbolic) instead of
    # one per bucket: one compile at start-up instead of nine (a 1-row bucket still gets its own,
    # as torch specialises size 1)
    compile_dynamic_batch: bool = False
    # inductor (only): 1x1 convolutions (the transformers' proj_in/proj_out, the resnets' shortcuts)
    # lowered to matmuls, which fuse with their neighbours' pointwise ops, but give up cuDNN's
    # channels_last 1x1 convolutions, which are the faster for SD 1.5 (docs/benchmarks.md)
    compile_conv_1x1_as_mm: bool = False
    # inductor (only): benchmark Triton matmul templates (with fused epilogues) against cuBLAS per
    # matmul shape, keeping cuDNN's convolutions; a lighter max-autotune: faster matmuls for a longer
    # compile. Inductor then also lowers channels_last 1x1 convolutions to matmuls (as
    # conv_1x1_as_mm does)
    compile_autotune_matmuls: bool = False
    # the VAE's layout when it differs from the UNet's (None: channels_last's); eager PyTorch's CUDA
    # GroupNorm has no channels_last kernel (it copies to contiguous), which the compiled UNet avoids
    # but the uncompiled VAE does not
    vae_channels_last: bool | None = None
    # torch.compile (inductor, default mode) of the VAE decoder for the compile_latents shapes
    compile_vae: bool = False
    # one matmul for each attention's q, k and v (cross-attention: k and v), UNet and VAE: the
    # input read once and fewer launches; same outputs, but not diffusers' state-dict keys
    fuse_projections: bool = False
    tf32: bool = False  # TF32 for float32 matmuls and convs (process-wide)
    cudnn_benchmark: bool = False  # cuDNN autotuning per shape (process-wide)
    warmup_iters: int = 2  # eager runs on a side stream before a capture

    def __post_init__(self) -> None:
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be one of {tuple(SDPA_BACKENDS)}, got {self.sdpa_backend!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.cuda_graphs and self.compile_mode == "reduce-overhead":
            raise ValueError(
                "compile_mode reduce-overhead captures its own CUDA graphs: turn cuda_graphs off"
            )
        if (
            not self.buckets
            or any(b < 1 for b in self.buckets)
            or list(self.buckets) != sorted(set(self.buckets))
        ):
            raise ValueError(f"buckets must be increasing positive row counts, got {self.buckets}")
        if self.max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {self.max_graphs}")
        if self.warmup_iters < 1:
            raise ValueError(f"warmup_iters must be >= 1, got {self.warmup_iters}")
        if any(not isinstance(n, int) or n < 1 for n in self.compile_context_lengths):
            raise ValueError(f"compile_context_lengths must be positive, got {self.compile_context_lengths}")
        for shape in self.compile_latents:
            if len(shape) != 3 or any(not isinstance(n, int) or n < 1 for n in shape):
                raise ValueError(f"compile_latents must hold (C, h, w) latent shapes, got {shape!r}")

    @property
    def bucketed(self) -> bool:
        """Whether calls are padded to buckets (fixed shapes: graphs and compile need them)."""
        return self.cuda_graphs or self.pad_to_bucket or self.compile_mode != "off"

    def bucket(self, rows: int) -> int | None:
        """The smallest bucket holding `rows`; None beyond the largest (such calls run unpadded)."""
        return next((b for b in self.buckets if b >= rows), None)


# The worker's defaults on CUDA (workers/settings.py can switch each one), the fastest combination
# measured (docs/benchmarks.md): torch.compile inside the CUDA graphs, for minutes of start-up; one
# dynamic-batch compile for every bucket rather than one per bucket; channels_last, which helps the
# compiled UNet but slows the uncompiled one (GRAPHS_ONLY_CUDA); PyTorch's own attention kernel.
FAST_CUDA = AccelConfig(
    cuda_graphs=True,
    tf32=True,
    cudnn_benchmark=True,
    compile_mode="default",
    compile_dynamic_batch=True,
    channels_last=True,
)
GRAPHS_ONLY_CUDA = replace(FAST_CUDA, compile_mode="off", channels_last=False)  # start in seconds


def apply_backend_flags(config: AccelConfig) -> None:
    """Process-wide switches: TF32 for float32 matmuls and convs, cuDNN autotuning per shape."""
    torch.backends.cuda.matmul.allow_tf32 = config.tf32
    torch.backends.cudnn.allow_tf32 = config.tf32
    torch.backends.cudnn.benchmark = config.cudnn_benchmark


def set_memory_format(
    model: StableDiffusion, channels_last: bool, vae_channels_last: bool | None = None
) -> None:
    """UNet and VAE weights in channels_last (or back to contiguous), in place; the VAE (and its
    float32 fallback) in `vae_channels_last`'s when given."""
    vae_channels_last = channels_last if vae_channels_last is None else vae_channels_last
    for modules, last in (
        ((model.unet,), channels_last),
        ((model.vae, model.vae_fallback), vae_channels_last),
    ):
        for module in modules:
            if module is not None:
                module.to(memory_format=torch.channels_last if last else torch.contiguous_format)


def fuse_attention_projections(model: StableDiffusion, fuse: bool = True) -> None:
    """Every attention of the UNet and the VAE (and its float32 fallback) fused in place: one
    matmul for q, k and v (models/blocks.py); the state dict then no longer has diffusers' keys.
    `fuse=False` splits them back (diffusers' keys again)."""
    for module in (model.unet, model.vae, model.vae_fallback):
        if module is not None:
            fuse_projections_in(module, fuse)


def fuse_projections_in(module: nn.Module, fuse: bool = True) -> None:
    """`fuse_attention_projections` for one module (a UNet, a VAE) and its children."""
    for layer in list(module.modules()):
        if isinstance(layer, QKVProjections):
            if fuse:
                layer.fuse_projections()
            else:
                layer.unfuse_projections()


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Restrict scaled_dot_product_attention to the kernels of SDPA_BACKENDS[name] (priority order)."""
    backends = SDPA_BACKENDS[name]
    if backends is None:
        yield
        return
    try:
        context = sdpa_kernel(list(backends), set_priority=True)
    except TypeError:  # PyTorch < 2.6: no priorities, PyTorch's own order among the allowed
        context = sdpa_kernel(list(backends))
    with context:
        yield


@dataclass(frozen=True)
class BucketKey:
    """What fixes a graph's shapes and dtypes."""

    rows: int
    latent: tuple[int, int, int]  # C, h, w
    context: tuple[int, int]  # L, D
    masked: bool
    dtype: torch.dtype  # the UNet's: sample and context buffers
    timestep_dtype: torch.dtype
    # the UNet's per-row inputs beyond the text (models/unet.py: ROW_INPUTS): (name, shape per row, dtype)
    row_inputs: tuple[tuple[str, tuple[int, ...], torch.dtype], ...] = ()


class _Bucket:
    """Static inputs of one bucket and, on CUDA, the graph that reads them and its output."""

    def __init__(
        self, key: BucketKey, device: torch.device, channels_last: bool, dynamic_batch: bool = False
    ) -> None:
        c, h, w = key.latent
        length, width = key.context
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        # zeros, then whatever the last call left: padding rows always hold finite, valid inputs
        self.sample = torch.zeros((key.rows, c, h, w), dtype=key.dtype, device=device).contiguous(
            memory_format=fmt
        )
        self.timesteps = torch.zeros((key.rows,), dtype=key.timestep_dtype, device=device)
        self.context = torch.zeros((key.rows, length, width), dtype=key.dtype, device=device)
        self.mask = torch.ones((key.rows, length), dtype=torch.bool, device=device) if key.masked else None
        # image-shaped inputs (an inpainting UNet's image_cond) in the sample's layout: concatenated to it
        self.row_inputs = {
            name: torch.zeros((key.rows, *shape), dtype=dtype, device=device).contiguous(
                memory_format=fmt if len(shape) == 3 else torch.contiguous_format
            )
            for name, shape, dtype in key.row_inputs
        }
        if dynamic_batch:  # torch.compile: one graph for every bucket of this shape (rows symbolic)
            for tensor in (self.sample, self.timesteps, self.context, self.mask, *self.row_inputs.values()):
                if tensor is not None:
                    torch._dynamo.maybe_mark_dynamic(tensor, 0)
            for name, tensor in self.row_inputs.items():
                if name.startswith("lora_"):  # K, the most LoRAs on a row of the call: symbolic too
                    torch._dynamo.maybe_mark_dynamic(tensor, 1)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Tensor | None = None  # (rows, C', h, w), written by each replay

    def load(
        self,
        sample: Tensor,
        timesteps: Tensor,
        context: Tensor,
        mask: Tensor | None,
        row_inputs: Mapping[str, Tensor] | None = None,
    ) -> None:
        n = sample.shape[0]  # stream-ordered copies: a replay still running reads the old values
        self.sample[:n].copy_(sample)
        self.timesteps[:n].copy_(timesteps)
        self.context[:n].copy_(context)
        if self.mask is not None:
            self.mask[:n].copy_(mask)
        for name, buffer in self.row_inputs.items():
            buffer[:n].copy_(row_inputs[name])  # type: ignore[index]

    def inputs(self) -> tuple[Tensor | None, ...]:
        """The UNet's arguments: sample, timesteps, context, mask, and the per-row inputs (or None)."""
        return (self.sample, self.timesteps, self.context, self.mask, self.row_inputs or None)


@dataclass
class RunnerStats:
    calls: int = 0
    rows: int = 0  # real rows computed
    padded_rows: int = 0  # rows computed for padding only
    replays: int = 0
    captures: int = 0
    evictions: int = 0
    failed_captures: int = 0
    capture_s: float = 0.0
    keys: list[str] = field(default_factory=list)  # buckets in use, least recently used first


class UNetRunner:
    """Calls the UNet as `unet(sample, timesteps, context, mask)` would, faster (see module doc).

    Drop-in for `Pipeline(model, unet_runner=...)`. Not thread-safe: one engine thread calls it.
    """

    def __init__(self, unet: nn.Module, config: AccelConfig | None = None) -> None:
        self.unet = unet
        self.config = config or AccelConfig()
        self.compiled: nn.Module | None = None
        if self.config.compile_mode != "off":
            # a compiled graph per bucket (or per layout change): dynamo's recompile limit up to the
            # buckets we keep
            dynamo_config = torch._dynamo.config
            name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 2 * self.config.max_graphs))
            # dynamic=None: shapes static unless marked dynamic (the buckets' batch dimension, see
            # _Bucket); False would ignore the marks
            dynamic = None if self.config.compile_dynamic_batch else False
            self.compiled = torch.compile(
                unet, dynamic=dynamic, backend=self.config.compile_backend, **_compile_mode(self.config)
            )
        self._buckets: OrderedDict[BucketKey, _Bucket] = OrderedDict()
        self._failed: set[BucketKey] = set()  # capture failed (not out of memory): eager from then on
        self._pool: tuple[int, int] | None = None  # one memory pool shared by every graph
        self._last_call: torch.cuda.Event | None = None
        # one side stream for every warm-up: each new stream would get its own cuBLAS workspace
        self._side_stream: torch.cuda.Stream | None = None
        self._stats = RunnerStats()

    def forward_for(
        self, latent: tuple[int, ...] | None, masked: bool = False, context_length: int | None = None
    ) -> nn.Module:
        """The compiled UNet for a call that is to be compiled, else the plain one. With nothing
        chosen (compile_latents and compile_context_lengths empty) every call is; otherwise only
        unmasked calls of a chosen latent shape and context length (what the warm-up compiled):
        compiling another graph mid-batch would stall every running job for a minute. `latent` None:
        a call beyond the largest bucket, whose row count varies call by call."""
        config = self.config
        if self.compiled is None:
            return self.unet
        if not config.compile_latents and not config.compile_context_lengths:
            return self.compiled
        chosen = (
            latent is not None
            and not masked
            and (not config.compile_latents or tuple(latent) in config.compile_latents)
            and (not config.compile_context_lengths or context_length in config.compile_context_lengths)
        )
        return self.compiled if chosen else self.unet

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def stats(self) -> RunnerStats:
        self._stats.keys = [_describe(key) for key in self._buckets]
        return self._stats

    @torch.no_grad()
    def __call__(
        self,
        sample: Tensor,
        timesteps: Tensor,
        context: Tensor,
        mask: Tensor | None = None,
        row_inputs: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        # sample (B, C, h, w); timesteps (B,) or one for all; context (B, L, D); mask (B, L) bool;
        # row_inputs: the UNet's per-row inputs beyond the text, by name, each (B, ...)
        rows = sample.shape[0]
        device = self.device
        timesteps = to_device(timesteps.reshape(-1), device).expand(rows)
        if device.type == "cuda":
            self._wait_for_last_call()
        self._stats.calls += 1
        self._stats.rows += rows
        bucket = self.config.bucket(rows) if self.config.bucketed else None
        if bucket is None:
            if self.config.channels_last:
                sample = sample.contiguous(memory_format=torch.channels_last)
            with attention_backend(self.config.sdpa_backend):
                output = self.forward_for(None)(sample, timesteps, context, mask, row_inputs or None)
        else:
            self._stats.padded_rows += bucket - rows
            output = self._run_bucket(bucket, sample, timesteps, context, mask, row_inputs)
        if device.type == "cuda":
            self._last_call = torch.cuda.Event()
            self._last_call.record()
        return output

    def _wait_for_last_call(self) -> None:
        """Keep at most one UNet call queued ahead of the GPU: the host prepares the next step while
        the GPU computes this one, but progress reports and cancels stay within one step of it."""
        if self._last_call is not None:
            self._last_call.synchronize()
            self._last_call = None

    def _run_bucket(
        self,
        bucket_rows: int,
        sample: Tensor,
        timesteps: Tensor,
        context: Tensor,
        mask: Tensor | None,
        row_inputs: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        n = sample.shape[0]
        key = BucketKey(
            rows=bucket_rows,
            latent=tuple(sample.shape[1:]),  # type: ignore[arg-type]
            context=tuple(context.shape[1:]),  # type: ignore[arg-type]
            masked=mask is not None,
            dtype=self.dtype,
            timestep_dtype=timesteps.dtype,
            row_inputs=tuple(
                (name, tuple(value.shape[1:]), self.dtype if value.is_floating_point() else value.dtype)
                for name, value in sorted((row_inputs or {}).items())
            ),
        )
        bucket = self._bucket(key)
        bucket.load(sample, timesteps, context, mask, row_inputs)
        if (
            self.config.cuda_graphs
            and bucket.sample.is_cuda
            and bucket.graph is None
            and key not in self._failed
        ):
            self._capture(key, bucket)
        if bucket.graph is not None:
            bucket.graph.replay()
            self._stats.replays += 1
            assert bucket.output is not None
            # a copy: the next replay of any graph of the shared pool may overwrite the output
            return bucket.output[:n].clone()
        forward = self.forward_for(key.latent, key.masked, key.context[0])
        with attention_backend(self.config.sdpa_backend):
            output = forward(*bucket.inputs())
        if forward is self.compiled and self.config.compile_mode == "reduce-overhead":
            output = output.clone()  # compile's own graphs overwrite their outputs on the next call
        return output[:n]

    def _bucket(self, key: BucketKey) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            return bucket
        while len(self._buckets) >= self.config.max_graphs:
            old_key, _ = self._buckets.popitem(last=False)  # its graph's memory goes back to the pool
            self._stats.evictions += 1
            log.info("freed the UNet bucket %s (at most %d kept)", _describe(old_key), self.config.max_graphs)
        if not any(b.graph is not None for b in self._buckets.values()):
            # no graph holds the shared pool any more: PyTorch frees it, so the next capture needs a
            # new one (reusing the id of a freed pool is not allowed)
            self._pool = None
        bucket = _Bucket(
            key,
            self.device,
            self.config.channels_last,
            dynamic_batch=self.config.compile_dynamic_batch and self.compiled is not None,
        )
        self._buckets[key] = bucket
        return bucket

    def _capture(self, key: BucketKey, bucket: _Bucket) -> None:
        started = time.perf_counter()
        device = bucket.sample.device
        forward = self.forward_for(key.latent, key.masked, key.context[0])
        try:
            # warm-up on a side stream (cuDNN autotuning, cuBLAS workspaces, lazy init, compilation)
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device)
            side = self._side_stream
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), attention_backend(self.config.sdpa_backend):
                for _ in range(self.config.warmup_iters):
                    forward(*bucket.inputs())
            torch.cuda.current_stream(device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (PNG writers, heartbeats) do not break it
            with (
                attention_backend(self.config.sdpa_backend),
                torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"),
            ):
                output = forward(*bucket.inputs())
        except torch.OutOfMemoryError:
            self._buckets.pop(key, None)  # the caller (the engine) halves the rows and retries
            raise
        except Exception:
            log.warning(
                "capturing a CUDA graph for %s failed: it runs eagerly", _describe(key), exc_info=True
            )
            self._failed.add(key)
            self._stats.failed_captures += 1
            return
        bucket.graph, bucket.output = graph, output
        self._stats.captures += 1
        elapsed = time.perf_counter() - started
        self._stats.capture_s += elapsed
        log.info("captured a CUDA graph for %s in %.2f s", _describe(key), elapsed)

    @torch.no_grad()
    def warm_up(
        self,
        latent_shape: tuple[int, int, int],
        context_shape: tuple[int, int],
        max_rows: int,
        extra_row_inputs: Callable[[int], Mapping[str, Tensor]] | None = None,
    ) -> int:
        """Run (and so capture or compile) every bucket up to the one holding `max_rows`, for one
        latent shape and an unmasked context, so that the first requests pay no capture. Returns the
        number of buckets run. `extra_row_inputs(rows)`: per-row inputs some calls add (e.g. LoRA
        rows, models/lora/layers.py), warmed as their own variant of each bucket."""
        if not self.config.bucketed:
            return 0
        wanted = [b for b in self.config.buckets if b < max_rows]
        last = self.config.bucket(max_rows)
        wanted += [last] if last is not None else []
        wanted = wanted[-self.config.max_graphs :]  # more would evict the first ones again
        device, dtype = self.device, self.dtype
        example = getattr(self.unet, "row_inputs_example", None)
        for rows in wanted:
            sample = torch.randn((rows, *latent_shape), device=device, dtype=dtype)
            # float32, as Pipeline.step passes them (the dtype is part of a bucket's key)
            timesteps = torch.full((rows,), 500, dtype=torch.float32, device=device)
            context = torch.randn((rows, *context_shape), device=device, dtype=dtype)
            # the per-row inputs the UNet always takes (e.g. an LCM-distilled one's guidance embedding,
            # an inpainting one's image conditioning)
            row_inputs = example(rows, device, dtype, latent_shape[1:]) if example is not None else None
            if extra_row_inputs is not None:
                row_inputs = {**(row_inputs or {}), **extra_row_inputs(rows)}
            self(sample, timesteps, context, None, row_inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(wanted)

    def release(self) -> None:
        """Free every bucket and graph (their pool is freed with the last of them)."""
        self._buckets.clear()
        self._failed.clear()
        self._pool = None
        self._last_call = None


def _describe(key: BucketKey) -> str:
    c, h, w = key.latent
    mask = ", masked" if key.masked else ""
    extra = "".join(f", {name} {'x'.join(map(str, shape))}" for name, shape, _ in key.row_inputs)
    return f"{key.rows} rows x {c}x{h}x{w}, context {key.context[0]}x{key.context[1]}{mask}{extra}"


def _compile_mode(config: AccelConfig) -> dict[str, Any]:
    """torch.compile's `mode`, or, with inductor options of ours, the same as `options` (torch.compile
    takes one or the other): the mode's own inductor settings plus ours."""
    mode = None if config.compile_mode == "default" else config.compile_mode
    ours: dict[str, Any] = {}
    if config.compile_conv_1x1_as_mm:
        ours["conv_1x1_as_mm"] = True
    if config.compile_autotune_matmuls:
        # convolutions stay cuDNN's (inductor would otherwise try Triton conv templates too)
        ours |= {"max_autotune_gemm": True, "max_autotune_conv_backends": "ATEN"}
    if not ours or config.compile_backend != "inductor":
        return {"mode": mode}
    from torch._inductor import list_mode_options  # what torch.compile(mode=...) itself applies

    return {"options": {**list_mode_options(config.compile_mode), **ours}}


class VAEDecoder:
    """Decodes as `vae.decode(z)` does; with `compile_vae`, the decoder compiled for the chosen
    latent shapes (`compile_latents`; every shape when none is chosen). Drop-in for
    `Pipeline(model, vae_decoder=...)`. The batch dimension is marked dynamic: one graph for 2 and
    more latents, one for a single latent (torch specialises size 1)."""

    def __init__(self, vae: nn.Module, config: AccelConfig | None = None) -> None:
        self.vae = vae
        self.config = config or AccelConfig()
        self.compiled: Callable[[Tensor], Tensor] | None = None
        if self.config.compile_vae:
            self.compiled = torch.compile(vae.decode, dynamic=None, backend=self.config.compile_backend)

    def __call__(self, z: Tensor) -> Tensor:
        chosen = not self.config.compile_latents or tuple(z.shape[1:]) in self.config.compile_latents
        if self.compiled is None or not chosen:
            return self.vae.decode(z)
        torch._dynamo.maybe_mark_dynamic(z, 0)
        return self.compiled(z)


def prepare(model: StableDiffusion, config: AccelConfig) -> UNetRunner:
    """Apply `config` to `model` (memory format, in place) and to the process (backend flags, on
    CUDA only), and return the runner to hand to the Pipeline (`prepare_vae`: its VAE decoder)."""
    set_memory_format(model, config.channels_last, config.vae_channels_last)
    fuse_attention_projections(model, config.fuse_projections)  # either way, as the memory format
    if model.device.type == "cuda":
        apply_backend_flags(config)
    return UNetRunner(model.unet, config)


def prepare_vae(model: StableDiffusion, config: AccelConfig) -> VAEDecoder | None:
    """The VAE decoder to hand to the Pipeline: None (the plain `model.vae.decode`) without compile_vae."""
    return VAEDecoder(model.vae, config) if config.compile_vae else None
