"""Sequence parallelism (Ulysses all-to-all) for the CogVideoX DiT under DeepSpeed ZeRO.

Layout. The world is DP x SP: `parallel.sequence_parallel_size` consecutive ranks form an SP
group, which trains one micro-batch together and acts as one data-parallel replica. Everything
data-related (sample order, noise, timesteps, dropout) is keyed by the DP rank, so every rank of a
group reads and noises the same micro-batch. DeepSpeed gets the groups as its `mpu` and partitions
and reduces ZeRO state over all DP x SP ranks.

The split. The N video tokens of a clip are cut into SP contiguous runs of ceil(N / SP) tokens,
the last ones padded with zero rows. Patch embedding, positional embedding, the adaptive norms,
the feed-forward, norm_out and proj_out work on the local run only; the text tokens (a few hundred)
are computed on every rank. In each attention layer Q, K and V of the video tokens go through an
all-to-all (scatter heads, gather sequence), the padding is cut off, and the text's Q, K and V are
*sliced by head*, so every rank attends over exactly the single-rank sequence for H / SP heads
(never the text keys SP times). QK-norm and RoPE are applied there, on the full sequence with the
full RoPE table, so every token sees its true position. The output goes back the same way.

Gradients. Each rank's loss is its local masked squared-error sum over the clip's global element
count, so the SP losses of a micro-batch add up to the single-rank mean. The text stream and the
time embedding are replicated, but each rank's backward only carries the part of their gradient
that flows through its own heads and tokens: a partial gradient. Partial gradients add up, so
- the video all-to-all's backward is the inverse all-to-all;
- the text's head gather's backward is a reduce-scatter (sum the ranks' partials, keep one's
  own heads), never a slice;
- the head slice's backward is the plain zero-padded slice, and DeepSpeed's sum over the SP group
  completes every replicated parameter's gradient.
DeepSpeed sums gradients over SP and averages over DP at ZeRO 0-2; at ZeRO-3 its reduce-scatter
averages over all DP x SP ranks, so there each rank's loss gradient is multiplied by SP (an
identity in the forward: the loss value is untouched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from i2v.config.schema import check_sequence_parallel
from i2v.model.flops import video_tokens


# --------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """Where this rank sits in DP x SP, and the SP group it trains with (None at SP 1)."""

    rank: int
    world_size: int
    sp_size: int
    group: object = None
    mpu: object = None
    zero_stage: int = 0

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    def describe(self) -> str:
        return f"{self.dp_size} DP x {self.sp_size} SP" if self.sp_size > 1 else f"{self.dp_size} DP"

    def video_shard(self, tokens: int) -> "VideoShard":
        return VideoShard(self.group, self.sp_size, self.sp_rank, tokens)

    def micro_batch_loss(self, local_loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss (the sum of its SP shards' losses), detached; the same on the whole group."""
        loss = local_loss.detach()
        if self.sp_size > 1:
            loss = loss.clone()
            dist.all_reduce(loss, group=self.group)
        return loss


class DeepSpeedGroups:
    """The `mpu` DeepSpeed's engine is given: SP groups, and one group of all ranks for ZeRO.

    DeepSpeed recognises a sequence-parallel mpu by its `initialize_sequence_parallel` attribute
    and then partitions and reduces over `get_sequence_data_parallel_group()`. Model parallelism is
    reported as the SP group, as DeepSpeed's own SP module does: ZeRO-0's gradient clipping counts a
    replicated parameter on model-parallel rank 0 only, and under SP every rank of a group holds the
    same gradient there. Tensor parallelism is reported as 1 (no weight is split): checkpoints record
    tensor-parallel degree 1 and have the files of a plain run at the same world size.
    """

    initialize_sequence_parallel = None  # the marker DeepSpeed tests with hasattr

    def __init__(self, layout: Layout, all_ranks):
        self.layout, self.all_ranks = layout, all_ranks

    def get_sequence_parallel_group(self):
        return self.layout.group

    def get_sequence_parallel_world_size(self) -> int:
        return self.layout.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.layout.sp_rank

    def get_sequence_data_parallel_group(self):
        return self.all_ranks

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.layout.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.layout.rank

    get_model_parallel_group = get_sequence_parallel_group
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_rank = get_sequence_parallel_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_tensor_model_parallel_rank(self) -> int:
        return 0


def build_layout(env, cfg, model) -> Layout:
    """The DP x SP layout of this run. At SP > 1: the process groups, the SP forward and attention.

    Collective: every rank calls it, in the same order, before the engine is built.
    """
    sp = cfg.parallel.sequence_parallel_size
    check_sequence_parallel(sp, env.world_size, model.config.num_attention_heads)
    layout = Layout(env.rank, env.world_size, sp, zero_stage=cfg.deepspeed.zero_stage)
    if sp == 1:
        return layout
    for first in range(0, env.world_size, sp):  # new_group is collective: every rank makes every group
        group = dist.new_group(list(range(first, first + sp)))
        if first <= env.rank < first + sp:
            layout.group = group
    layout.mpu = DeepSpeedGroups(layout, dist.new_group(list(range(env.world_size))))
    enable_sharded_forward(model)
    return layout


def enable_sharded_forward(model) -> None:
    """Calls of `model` that carry `video_shard` run the SP forward; all others run diffusers' forward.

    The SP forward must be reached through the module call that DeepSpeed's engine makes: the engine
    hooks the module's call (ZeRO-3 parameter fetching, the gradient-accumulation scaling of the
    outputs), so this replaces the instance's `forward`. Attention modules still on diffusers' processor
    get ours with SDPA: diffusers' would drop the shard argument with a warning and attend locally.
    """
    from diffusers.models.attention_processor import Attention

    from i2v.model.attention import CogVideoXFlashAttnProcessor

    for module in model.modules():
        if isinstance(module, Attention) and not isinstance(module.processor, CogVideoXFlashAttnProcessor):
            module.set_processor(CogVideoXFlashAttnProcessor("torch"))
    plain = model.forward

    def forward(*args, video_shard: "VideoShard | None" = None, **kwargs):
        if video_shard is None:
            return plain(*args, **kwargs)
        return sharded_forward(model, video_shard, *args, **kwargs)

    model.forward = forward


# --------------------------------------------------------------------------- collectives


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x [sp, ...]: row i goes to rank i; row i of the result came from rank i."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group, sp: int) -> torch.Tensor:
    """[P, n, H, d] (local tokens, all heads) -> [P, sp * n, H / sp, d] (all tokens, local heads)."""
    p, n, heads, d = x.shape
    y = _all_to_all(x.reshape(p, n, sp, heads // sp, d).permute(2, 0, 1, 3, 4), group)
    return y.permute(1, 0, 2, 3, 4).reshape(p, sp * n, heads // sp, d)


def _heads_to_seq(y: torch.Tensor, group, sp: int) -> torch.Tensor:
    """The inverse of `_seq_to_heads`: [P, sp * n, h, d] -> [P, n, sp * h, d]."""
    p, s, h, d = y.shape
    x = _all_to_all(y.reshape(p, sp, s // sp, h, d).permute(1, 0, 2, 3, 4), group)
    return x.permute(1, 2, 0, 3, 4).reshape(p, s // sp, sp * h, d)


class _AllToAll(torch.autograd.Function):
    """`_seq_to_heads` (to_heads) or `_heads_to_seq`; each one's backward is the other."""

    @staticmethod
    def forward(ctx, x, group, sp, to_heads):
        ctx.args = group, sp, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, sp)

    @staticmethod
    def backward(ctx, grad):
        group, sp, to_heads = ctx.args
        return (_heads_to_seq if to_heads else _seq_to_heads)(grad, group, sp), None, None, None


class _GatherHeads(torch.autograd.Function):
    """[P, L, h, d] on each rank -> [P, L, sp * h, d], every rank's heads in rank order.

    Each rank continues the replicated text stream from the gathered heads, so the gradient it
    sends back is a partial one; the backward sums the ranks' partials for each rank's own heads
    (a reduce-scatter, done as an all-to-all and a sum).
    """

    @staticmethod
    def forward(ctx, t, group, sp):
        ctx.group, ctx.sp = group, sp
        gathered = _all_to_all(t.unsqueeze(0).expand(sp, *t.shape), group)  # [sp, P, L, h, d]
        return gathered.permute(1, 2, 0, 3, 4).flatten(2, 3)

    @staticmethod
    def backward(ctx, grad):
        p, length, heads, d = grad.shape
        sp = ctx.sp
        parts = _all_to_all(grad.reshape(p, length, sp, heads // sp, d).permute(2, 0, 1, 3, 4), ctx.group)
        return parts.sum(0), None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


# --------------------------------------------------------------------------- the token split


@dataclass(frozen=True)
class VideoShard:
    """This rank's run of a clip's video tokens: [start, stop) of `tokens`, padded to `per_rank` rows."""

    group: object
    size: int
    rank: int
    tokens: int

    @property
    def per_rank(self) -> int:
        return -(-self.tokens // self.size)

    @property
    def start(self) -> int:
        return min(self.rank * self.per_rank, self.tokens)

    @property
    def stop(self) -> int:
        return min(self.start + self.per_rank, self.tokens)

    def pad(self, local: torch.Tensor) -> torch.Tensor:
        """[B, stop - start, ...] -> [B, per_rank, ...] with zero rows after the real tokens."""
        return F.pad(local, (0, 0) * (local.dim() - 2) + (0, self.per_rank - local.shape[1]))

    def to_heads(self, query, key, value, text_len: int):
        """[B, text + per_rank, H, d] each -> [B, text + tokens, H / size, d]: the whole sequence, local heads."""
        if self.size == 1:
            return query, key, value
        batch, _, heads, d = query.shape
        h = heads // self.size
        qkv = torch.stack([query, key, value]).flatten(0, 1)  # one all-to-all for all three
        text = qkv[:, :text_len, self.rank * h : (self.rank + 1) * h]
        video = _AllToAll.apply(qkv[:, text_len:], self.group, self.size, True)[:, : self.tokens]
        return torch.cat([text, video], dim=1).unflatten(0, (3, batch)).unbind(0)

    def to_tokens(self, out, text_len: int):
        """[B, text + tokens, H / size, d] -> [B, text + per_rank, H, d]: local tokens, all heads."""
        if self.size == 1:
            return out
        text = _GatherHeads.apply(out[:, :text_len].contiguous(), self.group, self.size)
        video = out[:, text_len:]
        video = F.pad(video, (0, 0, 0, 0, 0, self.size * self.per_rank - self.tokens))
        return torch.cat([text, _AllToAll.apply(video, self.group, self.size, False)], dim=1)


# --------------------------------------------------------------------------- the SP forward


def patchify(x: torch.Tensor, p: int, pt: int) -> torch.Tensor:
    """[B, F, C, H, W] -> [B, F/pt * H/p * W/p, C * pt * p * p]: tokens in the transformer's order.

    Features are ordered (C, pt, p, p): what CogVideoX-1.5's patch projection reads, and what
    `proj_out` produces per token before diffusers unpatchifies it (1.0 models: pt = 1).
    """
    b, f, c, h, w = x.shape
    x = x.reshape(b, f // pt, pt, c, h // p, p, w // p, p).permute(0, 1, 4, 6, 3, 2, 5, 7)
    return x.reshape(b, (f // pt) * (h // p) * (w // p), c * pt * p * p)


def _frames_of(x: torch.Tensor, shard: VideoShard, p: int, pt: int):
    """The latent frames holding this shard's tokens, and where the shard starts in their tokens."""
    per_group = (x.shape[3] // p) * (x.shape[4] // p)
    first = shard.start // per_group
    last = max(first, -(-shard.stop // per_group))
    return x[:, first * pt : last * pt], shard.start - first * per_group


def _embed_video(patch_embed, latents: torch.Tensor, shard: VideoShard) -> torch.Tensor:
    """The patch embedding of this shard's tokens only (diffusers embeds the whole clip)."""
    p, pt = patch_embed.patch_size, patch_embed.patch_size_t
    frames, offset = _frames_of(latents, shard, p, pt or 1)
    b, f, c, h, w = frames.shape
    if pt is None:  # CogVideoX 1.0: a strided convolution per frame
        y = patch_embed.proj(frames.reshape(b * f, c, h, w))  # [B * f, D, h / p, w / p]
        y = y.unflatten(0, (b, f)).flatten(3).transpose(2, 3).flatten(1, 2)  # frame-major, then rows
    else:  # CogVideoX 1.5: a linear layer on pt x p x p patches
        y = patch_embed.proj(patchify(frames, p, pt))
    return y[:, offset : offset + shard.stop - shard.start]


def _positions(patch_embed, frames: int, height: int, width: int, device):
    """The joint (text + video) positional table diffusers adds, or None for RoPE-only models."""
    pe = patch_embed
    if not (pe.use_positional_embeddings or pe.use_learned_positional_embeddings):
        return None
    if pe.use_learned_positional_embeddings and (pe.sample_width != width or pe.sample_height != height):
        raise ValueError(f"learned positional embeddings exist for {pe.sample_height}x{pe.sample_width} latents only, "
                         f"got {height}x{width}")
    pixel_frames = (frames - 1) * pe.temporal_compression_ratio + 1
    if (pe.sample_height, pe.sample_width, pe.sample_frames) == (height, width, pixel_frames):
        return pe.pos_embedding
    return pe._get_positional_embeddings(height, width, pixel_frames, device=device)


def sharded_forward(model, shard: VideoShard, hidden_states, encoder_hidden_states, timestep, timestep_cond=None,
                    ofs=None, image_rotary_emb=None, attention_kwargs=None, return_dict=False):
    """diffusers' CogVideoXTransformer3DModel.forward on this rank's video tokens.

    Returns a 1-tuple, as diffusers does with return_dict=False (the argument is accepted for its
    signature): the local per-token output of `proj_out`, [B, shard.per_rank, C * pt * p * p], rows
    past `stop - start` being padding; `patchify(target)` has the same layout. At SP 1 it equals
    diffusers' output, patchified (tested).
    """
    from i2v.model.attention import CogVideoXFlashAttnProcessor

    if not all(isinstance(b.attn1.processor, CogVideoXFlashAttnProcessor) for b in model.transformer_blocks):
        raise RuntimeError("the SP forward needs CogVideoXFlashAttnProcessor in every block (enable_sharded_forward)")
    _, frames, _, height, width = hidden_states.shape
    emb = model.time_embedding(model.time_proj(timestep).to(hidden_states.dtype), timestep_cond)
    if model.ofs_embedding is not None:
        emb = emb + model.ofs_embedding(model.ofs_proj(ofs).to(hidden_states.dtype))

    pe = model.patch_embed
    text = pe.text_proj(encoder_hidden_states)
    video = _embed_video(pe, hidden_states, shard)
    table = _positions(pe, frames, height, width, hidden_states.device)
    text_len = text.shape[1]
    if table is not None:
        table = table.to(text.dtype)
        text = text + table[:, :text_len]
        video = video + table[:, text_len + shard.start : text_len + shard.stop]
    text = model.embedding_dropout(text)
    video = model.embedding_dropout(shard.pad(video))

    kwargs = {**(attention_kwargs or {}), "video_shard": shard}
    for block in model.transformer_blocks:
        # i2v.model.checkpointing's function decides per block (none, all or selective), as in diffusers' loop.
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            video, text = model._gradient_checkpointing_func(block, video, text, emb, image_rotary_emb, kwargs)
        else:
            video, text = block(video, text, emb, image_rotary_emb, kwargs)
    video = model.norm_out(model.norm_final(video), temb=emb)
    return (model.proj_out(video),)


def sharded_loss(model, inputs: dict, ofs, rotary, layout: Layout) -> torch.Tensor:
    """This rank's share of the micro-batch's v-MSE: its tokens' squared-error sum / the clip's element count."""
    from i2v.model.transformer import predict

    module = getattr(model, "module", model)
    c = module.config
    x, target = inputs["model_input"], inputs["target"]
    p, pt = c.patch_size, c.patch_size_t or 1
    shard = layout.video_shard(video_tokens(c, x.shape[1], x.shape[3], x.shape[4]))
    pred = predict(model, x, inputs["prompt"], inputs["t"], ofs, rotary, video_shard=shard)
    frames, offset = _frames_of(target, shard, p, pt)
    tokens = patchify(frames, p, pt)[:, offset : offset + shard.stop - shard.start]
    local = ((pred[:, : shard.stop - shard.start].float() - tokens.float()) ** 2).sum() / target.numel()
    if layout.zero_stage == 3:  # ZeRO-3's reduce-scatter averages over SP as well as DP
        local = _ScaleGrad.apply(local, float(layout.sp_size))
    return local


# --------------------------------------------------------------------------- cost


def all_to_all_bytes(config, frames: int, height: int, width: int, micro_batch: int, dtype_bytes: int, sp: int,
                     text_tokens: int | None = None, gradient_checkpointing="none") -> int:
    """Bytes one rank sends per transformer layer and training step (forward + backward) at SP `sp`.

    Per layer the forward moves Q, K and V of the local tokens (3 vectors of width d = heads x
    head_dim per token, padding included), the attention output back (1), and the text's head
    gather (the text's d-wide vectors, once); each all-to-all keeps 1/sp of its input at home. The
    backward moves the same amounts the other way; a checkpointed block repeats the forward's in its
    recompute, fully or selectively (the all-to-alls lie between the kept projections and the kept
    attention core, so they rerun), and the figure is the average over the layers under
    `gradient_checkpointing` ("none", "all", "selective", N; True/False mean "all"/"none").
    Latents are [frames, height, width]; `text_tokens` defaults to the model's max_text_seq_length.
    """
    from i2v.model.checkpointing import block_counts

    if sp == 1:
        return 0
    c = dict(config)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    text = c["max_text_seq_length"] if text_tokens is None else text_tokens
    per_rank = -(-video_tokens(c, frames, height, width) // sp)
    one_pass = micro_batch * d * (4 * per_rank + text) * (sp - 1) // sp
    layers = c["num_layers"]
    rerun = layers - block_counts(layers, gradient_checkpointing)["none"]
    return (2 * layers + rerun) * one_pass * dtype_bytes // layers
