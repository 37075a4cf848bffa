"""CogVideoX transformer blocks on the fused modulation kernels (`kernels.block`).

`fused_forward` computes what diffusers' `CogVideoXBlock.forward` computes, in the same order:

    norm1 = LN(x) (1 + scale) + shift, LN(e) (1 + enc_scale) + enc_shift     (CogVideoXLayerNormZero)
    attention of [norm1 text, norm1 video]; x += gate * attn video, e += enc_gate * attn text
    norm2 likewise; the feed-forward of [norm2 text, norm2 video]; x += gate_ff * ff video, e += ...

with the modulation vectors from each norm's own `linear(silu(temb))`. What changes is how: the adaptive
norms and the gated residuals run as the kernels of `i2v.kernels.modulation` (one launch each way for
both streams; the attention's residual and norm2 share one, `residual_norm`), each norm writes the joint [B, St + Sv, C] sequence the attention and the feed-forward
take (no cat), and the residuals read the attention's and the feed-forward's joint outputs directly
(no slices, so no slice copies in the backward). SiLU(temb) is computed once for both norms (diffusers
computes the same values twice). With our attention processor (i2v.model.attention) the block calls its
`joint` entry, skipping the processor's own cat and split; with any other processor it calls `attn1` on
views of the joint norm and joins the two outputs (one copy).

Installed per block instance (`apply_block_backend`): the block's `forward` attribute is replaced, the
module is not wrapped or subclassed, so state_dict keys, `save_pretrained` and exports stay diffusers'.
It composes with the rest of the block's life as the attention processor does:
- gradient checkpointing (i2v.model.checkpointing) calls the block from outside; under "selective" the
  fused ops are recomputed like the adaptive norms they replace (the policy keeps only the QKV
  projections and the attention core);
- sequence parallelism: the kernels are per token, so they run on this rank's video tokens; the shard
  travels in `attention_kwargs` to the processor as before;
- LoRA: the block calls its Linear modules, adapted or not;
- `model.compile: blocks` compiles this forward (install it first: `apply_compile` comes last); the
  kernels are custom ops with fake implementations, so the block traces without graph breaks.
Calling the processor's `joint` skips `attn1`'s own module call (hooks on `attn1` itself do not fire, its
submodules' do), and the kernels read the norms' LayerNorm weights without calling those modules: ZeRO-3,
which gathers parameters in module hooks, is refused with `kernels.block: triton` by `Config.validate`, and
`auto` gives torch there. Under autocast (which the trainer does not use) the block runs diffusers' forward:
the kernels take one dtype, autocast gives the linears' outputs another.
"""

from __future__ import annotations

import types

import torch

from i2v.kernels.backends import resolve_backend, triton_available

_PROCESSOR_KWARGS = ("attention_mask", "video_shard")


def fused_forward(block, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                  image_rotary_emb=None, attention_kwargs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' CogVideoXBlock.forward on the fused kernels: (hidden_states, encoder_hidden_states)."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    from i2v.kernels.modulation import adaptive_norm, gated_residual, residual_norm

    device = hidden_states.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return CogVideoXBlock.forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                      attention_kwargs)
    text_len = encoder_hidden_states.size(1)
    attention_kwargs = attention_kwargs or {}
    cond = block.norm1.silu(temb)  # norm2.silu(temb) is the same tensor

    shift, scale, gate, enc_shift, enc_scale, enc_gate = block.norm1.linear(cond).chunk(6, dim=1)
    norm = block.norm1.norm
    joint = adaptive_norm(hidden_states, encoder_hidden_states, norm.weight, norm.bias, norm.eps,
                          shift, scale, enc_shift, enc_scale)
    attn_output = _attention(block.attn1, joint, text_len, image_rotary_emb, attention_kwargs)

    # The attention's gated residual and norm2 in one kernel: norm2 reads the residual's result in registers.
    ff_shift, ff_scale, ff_gate, ff_enc_shift, ff_enc_scale, ff_enc_gate = block.norm2.linear(cond).chunk(6, dim=1)
    norm = block.norm2.norm
    hidden_states, encoder_hidden_states, joint = residual_norm(
        hidden_states, encoder_hidden_states, attn_output, gate, enc_gate, norm.weight, norm.bias, norm.eps,
        ff_shift, ff_scale, ff_enc_shift, ff_enc_scale)
    ff_output = block.ff(joint)
    return gated_residual(hidden_states, encoder_hidden_states, ff_output, ff_gate, ff_enc_gate)


def _attention(attn, joint: torch.Tensor, text_len: int, image_rotary_emb, attention_kwargs: dict) -> torch.Tensor:
    """The attention's joint output [B, St + Sv, C] for the joint normed input."""
    from i2v.model.attention import CogVideoXFlashAttnProcessor

    processor = attn.processor
    if isinstance(processor, CogVideoXFlashAttnProcessor) and set(attention_kwargs) <= set(_PROCESSOR_KWARGS):
        return processor.joint(attn, joint, text_len, image_rotary_emb=image_rotary_emb, **attention_kwargs)
    video, text = attn(hidden_states=joint[:, text_len:], encoder_hidden_states=joint[:, :text_len],
                       image_rotary_emb=image_rotary_emb, **attention_kwargs)
    return torch.cat([text, video], dim=1)


def fused_block_applies(block) -> bool:
    """Whether the kernels compute this block: a CogVideoXBlock whose two adaptive norms are affine LayerNorms."""
    from diffusers.models.normalization import CogVideoXLayerNormZero
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    if not isinstance(block, CogVideoXBlock):
        return False
    for norm in (block.norm1, block.norm2):
        if not (isinstance(norm, CogVideoXLayerNormZero) and isinstance(norm.norm, torch.nn.LayerNorm)
                and norm.norm.weight is not None and norm.norm.bias is not None):
            return False
    return True


def apply_block_backend(transformer: torch.nn.Module, backend: str, device=None, zero_stage: int = 0) -> str:
    """Install the block forward chosen by `kernels.block` on a CogVideoXTransformer3DModel; return the one used.

    "triton": `fused_forward` in every block (raises if triton is missing or a block does not fit the kernels).
    "torch": diffusers' own forward (ours, if installed earlier, is removed).
    "auto": the rule of `i2v.kernels.backends` by `device` (else where the parameters are); torch where the
    blocks do not fit the kernels, and at `zero_stage` 3. Call it before `i2v.model.compile.apply_compile`.
    """
    if device is None:
        param = next(transformer.parameters(), None)
        device = param.device if param is not None else "cpu"
    choice = backend
    backend = resolve_backend(backend, device, "kernels.block")
    if zero_stage == 3 and backend == "triton":
        if choice != "auto":
            raise ValueError("kernels.block: `triton` does not work with deepspeed.zero_stage 3")
        backend = "torch"
    blocks = list(getattr(transformer, "transformer_blocks", ()))
    if not blocks:
        raise ValueError(f"kernels.block: {type(transformer).__name__} has no transformer_blocks")
    if any(getattr(b, "_i2v_compiled", False) for b in blocks):
        raise ValueError("kernels.block: the blocks are compiled already; set the block backend before "
                         "model.compile")
    if backend == "triton":
        if not triton_available():
            raise ValueError("kernels.block is 'triton' but triton is not installed (pip install i2v[triton])")
        unfit = [i for i, b in enumerate(blocks) if not fused_block_applies(b)]
        if unfit and choice == "auto":
            backend = "torch"
        elif unfit:
            raise ValueError(f"kernels.block is 'triton' but block {unfit[0]} is not a CogVideoXBlock with affine "
                             "LayerNorms (norm_elementwise_affine: true); use torch")
    for block in blocks:
        if backend == "triton":
            block.forward = types.MethodType(fused_forward, block)
        elif "forward" in vars(block) and getattr(block.forward, "__func__", None) is fused_forward:
            del block.forward
    return backend
