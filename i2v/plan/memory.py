"""Per-rank memory of a training run: model states by ZeRO stage, EMA and activations per micro-batch.

The state model is what DeepSpeed's engines actually allocate (`tests/test_memory.py` walks the
tensors a real engine holds and compares), per parameter, with W the number of ranks ZeRO
partitions over (the whole world: data x sequence parallel) and T the trainable parameters:

| precision | stage | weights | gradients | optimizer (fp32 master + AdamW moments) |
|---|---|---|---|---|
| bf16/fp16 | 0 | 2 | 2T | 12T (not partitioned) |
| bf16/fp16 | 1, 2 | 2 | 2T/W | 12T/W |
| bf16/fp16 | 3 | 2/W (+ small parameters whole) | 2T/W | 12T/W |
| fp32 | 0 | 4 | 4T | 8T (no master copy) |
| fp32 | 1, 2, 3 | 4 (3: 4/W) | 4T/W | 12T/W (ZeRO clones a master copy) |

Optimizer offload moves the optimizer column to host memory; at ZeRO-1/2 the gradients go there
too (an fp32 partition, beside a low-precision staging copy of the parameters). ZeRO's reduction buckets (`reduce_bucket_size`
elements, two with `overlap_comm`) and, at ZeRO-3, the gathered parameters of one block plus
the prefetch bucket are counted as `buckets`. An EMA is an fp32 copy of the trainable
parameters, sharded like the optimizer state at ZeRO 1-3.

Activations: a CogVideoX block saves, per token, 15 vectors of width d (the residual stream,
the norms' outputs, Q and K before the QK norm, Q/K/V after RoPE, the attention output, the
projections' inputs and outputs) and 2 of the feed-forward width (before and after the GELU);
our Triton attention's output is already the output projection's input, one vector fewer.
Outside the blocks: four more vectors per video token (the final norms and the output
projection's input), the inputs and the loss's difference. Sequence parallelism splits the video
tokens over its group; text tokens are replicated.

What a block keeps depends on its checkpointing (`model.gradient_checkpointing`, see
`i2v.model.checkpointing`):

| block | kept per token until backward | backward's extra peak |
|---|---|---|
| none | the 15 d + 2 ffn vectors above | - |
| all | its input: 1 vector of width d | the block's full set, recomputed |
| selective | 5 vectors of width d (its input; Q, K and V as the projections return them; the attention core's output) and the core's fp32 logsumexp (one float per head) | the full set less what was kept |

A setting of N checkpoints the first N blocks fully and leaves the rest as under none. Backward
recomputes one block at a time, so the peak adds one block's recomputed activations (the largest
of the checkpointed kinds present). `tests/test_checkpointing.py` measures the per-block figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from i2v.model.flops import video_tokens

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    buffers: int = 0  # elements of non-parameter buffers (e.g. a fixed positional table)
    small: int = 0  # elements of parameters small enough that ZeRO-3 keeps them whole on every rank
    largest_block: int = 0  # parameters of the biggest transformer block (what ZeRO-3 gathers at once)
    stored_bytes: int = 0  # bytes of weights kept in their own storage dtype: a float8 LoRA base and its scales
    stored_weights: int = 0  # elements of those weights (their scales not counted)

    @classmethod
    def of(cls, model: torch.nn.Module, persistence_threshold: int = 100_000) -> "ParamCounts":
        """Count a model (a meta-device one is enough); trainable = parameters that require grad."""
        from i2v.model.fp8 import Float8StoredLinear

        params = list(model.parameters())
        blocks = getattr(model, "transformer_blocks", [])
        stored = [m for m in model.modules() if isinstance(m, Float8StoredLinear)]
        stored_ids = {id(b) for m in stored for b in m.buffers(recurse=False)}
        return cls(
            total=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in params if p.requires_grad),
            buffers=sum(b.numel() for b in model.buffers() if id(b) not in stored_ids),
            small=sum(p.numel() for p in params if p.numel() < persistence_threshold),
            largest_block=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
            stored_bytes=sum(b.numel() * b.element_size() for m in stored for b in m.buffers(recurse=False)),
            stored_weights=sum(m.weight_e4m3.numel() for m in stored),
        )


@dataclass(frozen=True)
class ZeroSettings:
    """The parts of DeepSpeed's ZeRO config that size its buffers (DeepSpeed's own defaults apply)."""

    stage: int
    offload_optimizer: bool = False
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000

    @classmethod
    def from_deepspeed(cls, zero_optimization: dict) -> "ZeroSettings":
        """Resolve a generated `zero_optimization` section through DeepSpeed's own config model."""
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

        z = DeepSpeedZeroConfig(**zero_optimization)
        offload = z.offload_optimizer is not None and z.offload_optimizer.device != OffloadDeviceEnum.none
        return cls(stage=int(z.stage), offload_optimizer=offload, reduce_bucket_size=int(z.reduce_bucket_size),
                   overlap_comm=bool(z.overlap_comm), prefetch_bucket_size=int(z.prefetch_bucket_size),
                   param_persistence_threshold=int(z.param_persistence_threshold))


@dataclass(frozen=True)
class StateBytes:
    weights: int
    gradients: int
    optimizer: int  # on the accelerator (0 under optimizer offload)
    offloaded: int  # in host memory under optimizer offload
    ema: int
    ema_on_host: bool
    buckets: int

    @property
    def device(self) -> int:
        """Everything above that lives on the accelerator."""
        return self.weights + self.gradients + self.optimizer + self.buckets + (0 if self.ema_on_host else self.ema)

    @property
    def host(self) -> int:
        return self.offloaded + (self.ema if self.ema_on_host else 0)


def weight_bytes(precision: str, model_dtype: str) -> int:
    """Bytes of a weight (and of its gradient): 2 under mixed precision, else the model's dtype."""
    return 2 if precision in ("bf16", "fp16") else DTYPE_BYTES[model_dtype]


def _optimizer_bytes(precision: str, stage: int) -> int:
    """Optimizer bytes per trainable parameter: AdamW's two fp32 moments, plus an fp32 master copy
    under mixed precision or any ZeRO stage."""
    return 12 if precision in ("bf16", "fp16") or stage > 0 else 8


def state_bytes(counts: ParamCounts, zero: ZeroSettings, precision: str, world_size: int, ema: bool = False,
                model_dtype: str = "fp32") -> StateBytes:
    """Bytes one rank holds for weights, gradients, optimizer state, EMA and ZeRO's buffers.

    `precision` is DeepSpeed's (`deepspeed.precision`); under fp32 the weights keep `model_dtype`.
    """
    w, t, stage = world_size, counts.trainable, zero.stage
    p = weight_bytes(precision, model_dtype)
    if stage == 3:
        weights = p * (counts.total - counts.small) // w + p * counts.small
    else:
        weights = p * counts.total
    weights += p * counts.buffers + counts.stored_bytes  # a float8 base: 1 byte a weight, on every rank
    shard = 1 if stage == 0 else w
    gradients = p * t // shard
    optimizer = _optimizer_bytes(precision, stage) * t // shard
    offloaded = 0
    if zero.offload_optimizer:
        offloaded, optimizer = optimizer, 0
        if stage < 3:
            # ZeRO-1/2 reduce gradients straight into an fp32 partition in host memory, beside a
            # low-precision staging copy of the parameters; ZeRO-3 keeps its gradient partition on the device.
            offloaded += (4 + p) * t // shard
            gradients = 0
    buckets = 0
    if stage in (1, 2):
        buckets = zero.reduce_bucket_size * p * (2 if zero.overlap_comm else 1)
    elif stage == 3:
        buckets = (zero.reduce_bucket_size + zero.prefetch_bucket_size + counts.largest_block) * p
    return StateBytes(weights=weights, gradients=gradients, optimizer=optimizer, offloaded=offloaded,
                      ema=4 * t // shard if ema else 0, ema_on_host=zero.offload_optimizer, buckets=buckets)


def checkpoint_bytes(counts: ParamCounts, stage: int, precision: str, ema: bool = False, model_dtype: str = "fp32",
                     trainable_only: bool = False) -> int:
    """Tensor bytes of one committed checkpoint, all ranks' files together (the same at any world size).

    The module's weights (only the trainable ones under LoRA, whose checkpoints leave the frozen base
    out), the optimizer's fp32 master copy and AdamW moments, and the fp32 EMA.
    """
    t = counts.trainable
    weights = weight_bytes(precision, model_dtype) * (t if trainable_only else counts.total)
    return weights + _optimizer_bytes(precision, stage) * t + (4 * t if ema else 0)


@dataclass(frozen=True)
class ActivationBytes:
    held: int  # what the forward leaves for backward
    peak: int  # held plus, under gradient checkpointing, one block's recomputed activations
    per_block: int = field(repr=False, default=0)  # one block's full set (what a block keeps without checkpointing)
    kept_per_block: dict = field(repr=False, default_factory=dict)  # "none"/"all"/"selective" -> bytes one block keeps


def activation_bytes(config, frames: int, height: int, width: int, micro_batch: int, dtype_bytes: int,
                     gradient_checkpointing="none", attention: str = "triton", text_tokens: int | None = None,
                     sequence_parallel_size: int = 1) -> ActivationBytes:
    """Activation bytes of one micro-batch on one rank (latents of [frames, height, width]).

    `gradient_checkpointing` is a resolved setting: "none", "all", "selective" or an int N (the
    first N blocks); True and False mean "all" and "none".
    """
    from i2v.model.checkpointing import block_counts

    c = dict(config)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    pt = c.get("patch_size_t") or 1
    text = c["max_text_seq_length"] if text_tokens is None else text_tokens
    padded_frames = -(-frames // pt) * pt
    video = video_tokens(c, frames, height, width) // sequence_parallel_size
    seq = text + video
    scale = micro_batch * dtype_bytes
    vectors = 15 * d + 2 * 4 * d - (d if attention == "triton" else 0)
    full = seq * vectors * scale
    kept = {"none": full, "all": seq * d * scale,
            "selective": seq * 5 * d * scale + micro_batch * seq * c["num_attention_heads"] * 4}
    # Outside the blocks, per video token: the last block's output, the final norm's output,
    # norm_out's normalised and modulated outputs; then the inputs (model input with the image
    # latents, prompt embeddings) and the loss's fp32 difference from the target.
    pixels = padded_frames * height * width // sequence_parallel_size
    outer = 4 * video * d + pixels * c["in_channels"] + text * c["text_embed_dim"]
    loss = micro_batch * 4 * pixels * c["out_channels"]
    counts = block_counts(c["num_layers"], gradient_checkpointing)
    held = sum(n * kept[kind] for kind, n in counts.items()) + outer * scale + loss
    recompute = max([full - (kept[kind] if kind == "selective" else 0) for kind in ("all", "selective")
                     if counts[kind]], default=0)
    return ActivationBytes(held=held, peak=held + recompute, per_block=full, kept_per_block=kept)
