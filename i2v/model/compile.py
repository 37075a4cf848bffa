"""Regional compilation of the DiT: each transformer block through torch.compile, in place.

`apply_compile(model, setting)` is the one entry; `setting` is `model.compile`:

- "none": eager, nothing changes.
- "blocks": every `CogVideoXBlock`'s forward goes through `torch.compile(..., dynamic=False)`. The module
  is not wrapped (its `forward` attribute is replaced, its hooks stay eager), so the state_dict keys stay
  diffusers' and a checkpoint saved with either setting loads under the other. All blocks run the same
  code at the same shapes and dtypes, and dynamo inlines nn.Modules and treats their parameters as graph
  inputs (`inline_inbuilt_nn_modules`, torch's default), so the first block's graph serves the other
  blocks without a recompile (a pre-hook makes the inputs contiguous, see `_contiguous_inputs`): a model
  of 42 blocks compiles once per input shape, not 42 times. `dynamic=False` keeps the graph specialised
  to the shape (a new resolution or batch size is one recompile, not a dynamic-shape graph for all).

Where it sits relative to the rest of the block's life:
- Activation checkpointing (i2v.model.checkpointing) wraps the block from outside: diffusers' block loop
  (and the sequence-parallel loop) calls `checkpoint(block.__call__, ...)`, and `__call__` of a compiled
  block runs the compiled code, so a checkpointed block recomputes by rerunning it.
- LoRA adapters (peft) must be attached before: the compiled code is traced from the block as it is at
  its first call, and guards on the modules it finds; `Trainer` calls this after `with_lora` and after the
  attention processor is installed.
- The attention processor (i2v.model.attention) traces without graph breaks for both backends; the Triton
  kernel is a torch custom op (`i2v::flash_attention_fwd/bwd`) with fake implementations, opaque to the
  compiler. Under sequence parallelism the all-to-alls of i2v.model.parallel trace into the block's graph.
- ZeRO 0-2 leave the module alone. ZeRO-3 fetches parameters in hooks on every linear, which would run
  inside the compiled block and break it into pieces: `Config.validate` refuses `blocks` with ZeRO-3.

Compiles: one graph for a full fine-tune under every checkpointing setting; two under LoRA (the first
block's input needs no gradient, every later block's does); one more per new input shape.
"""

from __future__ import annotations

import torch

SETTINGS = ("none", "blocks")


def apply_compile(model: torch.nn.Module, setting: str, backend: str = "inductor") -> int:
    """Compile `model`'s (a CogVideoXTransformer3DModel) transformer blocks per `setting`; returns how many were.

    Call it once the model is complete (LoRA attached, attention processors set), before the first forward.
    `backend` is torch.compile's (the tests trace with "aot_eager": dynamo and AOTAutograd as inductor
    sees them, without its code generation).
    """
    if setting not in SETTINGS:
        raise ValueError(f"model.compile must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting == "none":
        return 0
    blocks = list(model.transformer_blocks)
    for block in blocks:
        if getattr(block, "_i2v_compiled", False):  # a second call leaves the first one's compiled forward
            continue
        block.register_forward_pre_hook(_contiguous_inputs, with_kwargs=True)
        block.forward = torch.compile(block.forward, dynamic=False, backend=backend)
        block._i2v_compiled = True
    return len(blocks)


def _contiguous_inputs(module, args, kwargs):
    """The block's tensor inputs, contiguous. The first block's video and text streams are slices of
    the joint embedding (diffusers' patch embed), the others' are whole tensors: one stride guard
    would fail between them and compile the first block apart. The copy is the first block's only
    (`contiguous()` returns a contiguous tensor itself)."""
    def contiguous(a):
        return a.contiguous() if isinstance(a, torch.Tensor) else a

    return tuple(contiguous(a) for a in args), {k: contiguous(v) for k, v in kwargs.items()}
