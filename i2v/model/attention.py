"""Attention backends for the DiT: a CogVideoX attention processor on our fused Triton kernel.

`CogVideoXFlashAttnProcessor` computes exactly what diffusers' `CogVideoXAttnProcessor2_0`
computes (joint text+video tokens, QK layer norm, 3D RoPE on the video tokens only, output
projection and dropout, then the split back into video and text streams); only the
attention core changes, to `i2v.kernels.attention.flash_attention` with backend "triton", or
torch SDPA with backend "torch". It also accepts modules with fused QKV projections.

Under sequence parallelism (`video_shard` given, see `i2v.model.parallel`) the video tokens are this
rank's run only: Q, K and V go through the shard's all-to-all to the whole sequence for this rank's
heads before QK-norm, RoPE and the core, and the output comes back to local tokens, all heads.

With backend "triton", the QK layer norms and RoPE run as one fused kernel per tensor
(`i2v.kernels.qk_norm_rope`) when the module has affine LayerNorm q/k norms and RoPE is given (the
CogVideoX case); otherwise, and always with backend "torch", they run as diffusers runs them.

`apply_attention_backend(transformer, backend)` is what the model builder calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from i2v.kernels.backends import resolve_backend, triton_available


class CogVideoXFlashAttnProcessor:
    """Drop-in replacement for diffusers' CogVideoXAttnProcessor2_0 (same inputs, same outputs)."""

    def __init__(self, backend: str = "triton", sdpa_backend=None):
        """`sdpa_backend` (a torch.nn.attention.SDPBackend, backend "torch" only): SDPA runs restricted to it."""
        if backend not in ("triton", "torch"):
            raise ValueError(f"CogVideoXFlashAttnProcessor backend must be 'triton' or 'torch', got {backend!r}")
        if sdpa_backend is not None and backend != "torch":
            raise ValueError(f"sdpa_backend applies to backend 'torch', not {backend!r}")
        self.backend, self.sdpa_backend = backend, sdpa_backend

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 video_shard=None):
        """`video_shard` (an `i2v.model.parallel.VideoShard`): `hidden_states` are this rank's video tokens only."""
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        hidden_states = self.joint(attn, hidden_states, text_seq_length, attention_mask, image_rotary_emb, video_shard)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states

    def joint(self, attn, hidden_states, text_seq_length: int, attention_mask=None, image_rotary_emb=None,
              video_shard=None):
        """The attention of the joint sequence [B, St + Sv, C] (text first), returned joint: what `__call__` does
        between its cat and its split, for a caller that has the joint tensor (i2v.model.fused_block)."""
        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            if video_shard is not None:
                raise ValueError("an attention mask over a sequence-parallel shard is not supported")
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if getattr(attn, "fused_projections", False):
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim) for t in (query, key, value))
        if video_shard is not None:
            # Sequence parallel: from here on the whole sequence, this rank's heads.
            query, key, value = video_shard.to_heads(query, key, value, text_seq_length)
        # [B, S, H, D] viewed as [B, H, S, D]: the kernel reads strides, so no copy here.
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))

        if self.backend == "triton" and _fused_qk_norm_rope_applies(attn, query, image_rotary_emb, text_seq_length):
            from i2v.kernels.qk_norm_rope import qk_norm_rope

            cos, sin = image_rotary_emb
            query = qk_norm_rope(query, attn.norm_q.weight, attn.norm_q.bias, attn.norm_q.eps, cos, sin,
                                 text_seq_length)
            key = qk_norm_rope(key, attn.norm_k.weight, attn.norm_k.bias, attn.norm_k.eps, cos, sin,
                               text_seq_length)
        else:
            query, key = self._qk_norm_rope_eager(attn, query, key, image_rotary_emb, text_seq_length)

        if self.backend == "triton" and attention_mask is None:
            from i2v.kernels.attention import flash_attention

            hidden_states = flash_attention(query, key, value, backend="triton")
        else:
            # The kernel has no mask input; CogVideoX never passes one, and SDPA gives the same math.
            hidden_states = self._sdpa(query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2)
        if video_shard is not None:
            hidden_states = video_shard.to_tokens(hidden_states, text_seq_length)
        # Free for the triton output ([B, S, H, D] storage); one copy for SDPA, as in diffusers.
        hidden_states = hidden_states.flatten(2)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def _sdpa(self, query, key, value, attention_mask):
        if self.sdpa_backend is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                  is_causal=False)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([self.sdpa_backend]):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                  is_causal=False)

    @staticmethod
    def _qk_norm_rope_eager(attn, query, key, image_rotary_emb, text_seq_length):
        """QK norm and RoPE as diffusers' processor does them (backend "torch"; what the fused op does not cover)."""
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)
        return query, key


def _fused_qk_norm_rope_applies(attn, query, image_rotary_emb, text_seq_length: int) -> bool:
    """Whether `i2v.kernels.qk_norm_rope` computes this module's QK norms and RoPE: affine LayerNorm(D) on
    both Q and K, real (cos, sin) RoPE of [S_video, D] on the video tokens, self-attention, a supported
    head dim, and tensors the kernel runs on (CUDA, the meta device, or the CPU interpreter)."""
    from i2v.kernels.qk_norm_rope import kernel_runs_on, supported_head_dim

    if image_rotary_emb is None or attn.is_cross_attention or not isinstance(image_rotary_emb, (tuple, list)):
        return False
    _, _, s, d = query.shape
    for norm in (attn.norm_q, attn.norm_k):
        if not (isinstance(norm, torch.nn.LayerNorm) and tuple(norm.normalized_shape) == (d,)
                and norm.weight is not None and norm.bias is not None):
            return False
    cos, sin = image_rotary_emb
    return (supported_head_dim(d) and tuple(cos.shape) == tuple(sin.shape) == (s - text_seq_length, d)
            and cos.device == sin.device == query.device and kernel_runs_on(query))


def apply_attention_backend(transformer: torch.nn.Module, backend: str, device=None, sdpa_backend=None) -> str:
    """Install the attention processors for `backend` on a CogVideoXTransformer3DModel; return the one used.

    "triton": our fused kernel everywhere (raises if triton is missing).
    "torch": diffusers' default processors, on torch SDPA (ours, if installed earlier, are replaced by them).
    "auto": the rule of `i2v.kernels.backends`, judged by where the model's parameters are.
    `device`, if given, is where the model will run and replaces its parameters' device in
    that choice (for a model built on the CPU and moved to the GPU afterwards).
    `sdpa_backend` (an "sdpa-*" name of `i2v.kernels.attention_choice`, for a resolved "torch"): our
    processor on SDPA restricted to that torch backend is installed instead, and that name returned.
    """
    from diffusers.models.attention_processor import (
        Attention,
        CogVideoXAttnProcessor2_0,
        FusedCogVideoXAttnProcessor2_0,
    )

    if device is None:
        param = next(transformer.parameters(), None)
        device = param.device if param is not None else "cpu"
    backend = resolve_backend(backend, device, "kernels.attention")
    if backend == "triton" and not triton_available():
        raise ValueError("kernels.attention is 'triton' but triton is not installed (pip install i2v[triton])")

    modules = [m for m in transformer.modules() if isinstance(m, Attention)]
    if not modules:
        raise ValueError(f"apply_attention_backend: {type(transformer).__name__} has no diffusers Attention modules")
    if sdpa_backend is not None and backend == "torch":
        from i2v.kernels.attention_choice import sdpa_backend as torch_sdpa_backend

        restricted = torch_sdpa_backend(sdpa_backend)
        for module in modules:
            module.set_processor(CogVideoXFlashAttnProcessor("torch", sdpa_backend=restricted))
        return sdpa_backend
    for module in modules:
        if backend == "triton":
            module.set_processor(CogVideoXFlashAttnProcessor("triton"))
        elif isinstance(module.processor, CogVideoXFlashAttnProcessor):
            fused = getattr(module, "fused_projections", False)
            module.set_processor(FusedCogVideoXAttnProcessor2_0() if fused else CogVideoXAttnProcessor2_0())
    return backend
