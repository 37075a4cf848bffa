"""Activation checkpointing of the DiT's transformer blocks, per block: none, all, the first N, or selective.

`apply_checkpointing(model, setting)` is the one entry; `setting` is what `model.gradient_checkpointing`
resolves to (`auto` is decided earlier, by `i2v.plan.planner.resolve_checkpointing`):

- "none": every block keeps its activations for backward.
- "all": every block keeps only its inputs; backward reruns the block's forward (torch's non-reentrant
  `torch.utils.checkpoint.checkpoint`).
- N (an int): the first N blocks as in "all", the rest as in "none" (0 is "none", N >= num_layers "all").
- "selective": every block keeps its inputs, the Q/K/V projections' outputs and the attention core's
  outputs (the attention output and, where the backend gives one, its logsumexp); backward recomputes
  the rest of the block: the adaptive norms, QK-norm, RoPE, the output projection and the feed-forward.
  The attention core, the costliest op, is never rerun.

The mechanism is diffusers' own hook: `enable_gradient_checkpointing(gradient_checkpointing_func=...)`
installs a function that diffusers' block loop (and the sequence-parallel loop of `i2v.model.parallel`)
calls for every block; ours looks up that block's decision. No module is wrapped or renamed, so the
state_dict keys stay those of diffusers.

Selective uses torch's selective activation checkpointing (`create_selective_checkpoint_contexts`): a
policy sees every aten op the block runs and says MUST_SAVE or PREFER_RECOMPUTE. It saves:
- every non-view op run inside a Q/K/V projection module (`to_q`, `to_k`, `to_v`, or a fused `to_qkv`);
  forward hooks on those modules mark the region, so it works with diffusers' processors and ours alike
  (attention processors are swapped after the model is built) and with LoRA adapters, whether they wrap
  the projection before the hooks are set (the whole adapted projection is kept) or after (its base is);
- the attention core, recognised by its op: torch's fused SDPA ops and the Triton kernel's forward
  (`i2v::flash_attention_fwd`, a torch custom op for this reason: an opaque kernel launch would be invisible).
Views are recomputed (they are free), so a saved projection output does not pin its input's storage.
An op that finishes a projection's output in place inside the region (DeepSpeed's ZeRO-3 linear adds
its bias with `+=`) is kept as well, so the recompute neither reruns it nor sees a stale value.
Random ops would be replayed with the block's RNG state, as in full checkpointing (dropout is 0 here).
Under sequence parallelism the all-to-alls sit between the projections and the core: they rerun in
backward, as they do under "all".
"""

from __future__ import annotations

import functools
import threading

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

SETTINGS = ("none", "all", "selective")
# The attention cores whose outputs selective checkpointing keeps (aten's fused SDPA forwards and our kernel).
CORE_OPS = frozenset({
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward",
    "i2v::flash_attention_fwd",
})
PROJECTIONS = ("to_q", "to_k", "to_v", "to_qkv")

_region = threading.local()


def _depth() -> int:
    return getattr(_region, "depth", 0)


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op.name() in CORE_OPS or (_depth() > 0 and not op.is_view):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# Forward hooks on the projection modules bracket the region where ops are kept (a thread-local depth:
# the recompute fires the same hooks, so it sees the same region).
def _enter(module, args):
    _region.depth = _depth() + 1


def _leave(module, args, output):
    _region.depth -= 1


def block_settings(num_layers: int, setting) -> list[str]:
    """What each block does under `setting`: "none", "all" or "selective", first block first.

    A bool is the old form of the setting: True is "all", False "none".
    """
    if isinstance(setting, bool):
        setting = "all" if setting else "none"
    if not (isinstance(setting, int) or setting in SETTINGS):
        raise ValueError(f"gradient checkpointing setting must be one of {', '.join(SETTINGS)} or an int >= 0, "
                         f"got {setting!r}")
    if isinstance(setting, int):
        if setting < 0:
            raise ValueError(f"gradient checkpointing: the number of blocks must be >= 0, got {setting}")
        return ["all"] * min(setting, num_layers) + ["none"] * max(0, num_layers - setting)
    return [setting] * num_layers


def normalize(num_layers: int, setting):
    """The canonical form of a setting: a bool as "all"/"none"; an int N is "none" at 0, "all" at
    N >= num_layers, else N."""
    block_settings(num_layers, setting)  # checks it
    if isinstance(setting, bool):
        return "all" if setting else "none"
    if isinstance(setting, int):
        return "none" if setting == 0 else "all" if setting >= num_layers else setting
    return setting


def effective(configured, resolved=None):
    """The setting a model runs: `resolved` (what the planner made of `auto`) when given, else the configured
    value; an `auto` nobody resolved (a caller without the planner) runs as "all", the setting that needs least."""
    setting = configured if resolved is None else resolved
    return "all" if setting == "auto" else setting


def block_counts(num_layers: int, setting) -> dict[str, int]:
    """How many blocks are not checkpointed ("none"), fully checkpointed ("all") and selective."""
    kinds = block_settings(num_layers, setting)
    return {kind: kinds.count(kind) for kind in SETTINGS}


def _run_block(decisions: dict, block, *args):
    kind = decisions.get(id(block), "none")
    if kind == "none":
        return block(*args)
    if kind == "all":
        return checkpoint(block.__call__, *args, use_reentrant=False)
    # A projection may finish its output in place (DeepSpeed's ZeRO-3 linear adds the bias with `+=`): the
    # in-place op runs inside the region and is kept too, so the recompute takes the finished tensor and
    # runs neither op again. Nothing outside the regions writes into a kept tensor: QK-norm makes new Q and K
    # before RoPE writes into them (apply_checkpointing refuses blocks without it).
    context = functools.partial(create_selective_checkpoint_contexts, _policy, allow_cache_entry_mutation=True)
    # A projection that raised left its region open (its leave hook is not called on an exception: an
    # always-called hook puts a per-block hook id in torch.compile's guards, one recompile per block).
    _region.depth = 0
    return checkpoint(block.__call__, *args, use_reentrant=False, context_fn=context)


def apply_checkpointing(model, setting) -> None:
    """Set `model`'s (a CogVideoXTransformer3DModel) checkpointing: "none", "all", "selective" or an int N.

    Calling it again replaces the previous setting (and its projection hooks).
    """
    blocks = list(model.transformer_blocks)
    kinds = block_settings(len(blocks), setting)
    for handle in getattr(model, "_i2v_checkpoint_hooks", ()):
        handle.remove()
    hooks = []
    for block, kind in zip(blocks, kinds):
        if kind != "selective":
            continue
        if any(getattr(m, "norm_q", 0) is None or getattr(m, "norm_k", 0) is None for m in block.modules()):
            raise ValueError("gradient checkpointing 'selective' needs the QK norm (qk_norm) in every block: without "
                             "it RoPE writes into the kept Q and K; use 'all' or a number of blocks")
        for module in block.modules():
            for name in PROJECTIONS:
                child = getattr(module, name, None)
                if isinstance(child, torch.nn.Module) and module is not child:
                    hooks.append(child.register_forward_pre_hook(_enter))
                    hooks.append(child.register_forward_hook(_leave))
    model._i2v_checkpoint_hooks = hooks
    if all(k == "none" for k in kinds):
        model.disable_gradient_checkpointing()
        return
    decisions = {id(block): kind for block, kind in zip(blocks, kinds)}
    model.enable_gradient_checkpointing(gradient_checkpointing_func=functools.partial(_run_block, decisions))
