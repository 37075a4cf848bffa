"""Float8 in the DiT: float8 matmuls for full training, and a float8-stored frozen base for LoRA.

`model.fp8.compute: tensorwise | rowwise` converts the transformer blocks' attention projections and
feed-forward layers to torchao's `Float8Linear` (`convert_to_float8_training`): inputs, weights and
output gradients are cast to float8 with dynamic scales (one per tensor, or one per row) for each matmul,
while the weights themselves stay Parameters in their dtype, so optimizer state, checkpoints and the export
do not change. Left alone, each named in a log line: the adaptive-norm linears (one row per sample: nothing
to gain, and their error reaches every token), the patch embedding and output projection (the model's
ends), and any layer with a dimension that is not a multiple of 16 (what float8 matmuls require). Where the
device has no float8 matmul (the CPU, GPUs before compute capability 8.9) torchao emulates it: the same
casts and scales, the product in high precision. That is how the CPU proves float8 does not hurt learning
(bench/fp8_quality.py).

`model.fp8.base: e4m3` (LoRA runs) replaces the frozen `base_layer` of every adapted Linear by a
`Float8StoredLinear`: its weight as float8 e4m3 with one fp32 scale per output channel (the channel's
largest magnitude maps to e4m3's 448), upcast to `model.dtype` when used. The upcast copy is made in the
forward and again in the backward, never kept between them, so the saving is not spent on activations.
The stored weight and scales are non-persistent buffers: a LoRA checkpoint holds only the trainable
weights as before, DeepSpeed does not cast buffers, and the base is re-read from `model.pretrained` at
every start (its identity is checked at a resume as before).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0  # largest finite float8 e4m3 (fn) value
RECIPES = ("tensorwise", "rowwise")


# --------------------------------------------------------------------------- float8 compute (full training)


def compute_targets(model: torch.nn.Module) -> tuple[list[str], list[tuple[str, str]]]:
    """The Linear layers `model.fp8.compute` converts, and (name, why) of every other Linear layer."""
    chosen, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not name.startswith("transformer_blocks."):
            why = "outside the transformer blocks"
        elif ".norm1." in name or ".norm2." in name:
            why = "adaptive-norm modulation (one row per sample)"
        elif module.in_features % 16 or module.out_features % 16:
            why = f"{module.in_features} -> {module.out_features} is not a multiple of 16"
        else:
            chosen.append(name)
            continue
        skipped.append((name, why))
    return chosen, skipped


def has_float8_matmul(device) -> bool:
    """Whether `device` multiplies float8 natively (CUDA compute capability 8.9: Ada, Hopper and later)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def torchao_version() -> str | None:
    try:
        import torchao
    except ImportError:
        return None
    return torchao.__version__


def _torchao_float8(key: str):
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        from i2v.core.errors import ConfigError

        raise ConfigError(f"{key}: needs torchao, which does not import here ({e}); pip install -e .[fp8]") from None
    return Float8LinearConfig, convert_to_float8_training


def float8_config(recipe: str, emulate: bool):
    """torchao's `Float8LinearConfig` for `model.fp8.compute: recipe`.

    `tensorwise` is torchao's recipe of that name. `rowwise` is torchao's `rowwise` (e4m3 for inputs, weights and
    output gradients, one scale per row) with the scales left exact instead of rounded down to a power of two, so
    that each row's largest magnitude lands on e4m3's largest value. On the demo recipe (bench/fp8_quality.py,
    emulated) the power-of-two scales ended 14.0% above fp32's final loss and got 2 pairs' motion fewer; exact
    scales end 8.2% above it with the same pairs.
    """
    import dataclasses

    Float8LinearConfig, _ = _torchao_float8("model.fp8.compute")
    config = Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "rowwise":
        config = dataclasses.replace(config, round_scales_to_power_of_2=False)
    return dataclasses.replace(config, emulate=emulate)


def apply_fp8_compute(model: torch.nn.Module, recipe: str, device, log=print) -> list[str]:
    """Convert the `compute_targets` of `model` in place to float8 training; returns their names."""
    _, convert = _torchao_float8("model.fp8.compute")
    chosen, skipped = compute_targets(model)
    emulate = not has_float8_matmul(device)
    config = float8_config(recipe, emulate)
    targets = set(chosen)
    convert(model, module_filter_fn=lambda module, fqn: fqn in targets, config=config)
    how = "emulated: no float8 matmul on " + torch.device(device).type if emulate else "float8 matmuls"
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped:
        names = by_reason.setdefault(why, [])
        if _pattern(name) not in names:
            names.append(_pattern(name))
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    log(f"model.fp8.compute: {recipe} on {len(chosen)} linear layers ({how}); kept in {dtype}: "
        + "; ".join(f"{why}: {', '.join(names)}" for why, names in by_reason.items()))
    return chosen


def _pattern(name: str) -> str:
    """`transformer_blocks.3.norm1.linear` -> `transformer_blocks.*.norm1.linear`: one entry per kind of layer."""
    parts = name.split(".")
    return ".".join("*" if p.isdigit() and i == 1 else p for i, p in enumerate(parts))


# --------------------------------------------------------------------------- float8-stored frozen base (LoRA)


def quantize_e4m3(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] weight -> (float8 e4m3 weight, fp32 scale per output channel); weight ~ stored * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX
    stored = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return stored, scale


def dequantize(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (stored.float() * scale[:, None]).to(dtype)


class _StoredLinear(torch.autograd.Function):
    """y = x W^T + b with W upcast from float8 in the forward and again in the backward: the graph keeps
    the 1-byte weight, not the upcast copy. W and b are frozen: only x gets a gradient."""

    @staticmethod
    def forward(ctx, x, stored, scale, bias):
        ctx.save_for_backward(stored, scale)
        return F.linear(x, dequantize(stored, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        stored, scale = ctx.saved_tensors
        return grad_out @ dequantize(stored, scale, grad_out.dtype), None, None, None


class Float8StoredLinear(torch.nn.Module):
    """A frozen Linear whose weight is stored as float8 e4m3 with a per-output-channel scale."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        stored, scale = quantize_e4m3(linear.weight)
        # Non-persistent: checkpoints keep only what trains; DeepSpeed casts parameters, not buffers.
        self.register_buffer("weight_e4m3", stored, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.bias = linear.bias  # frozen with the rest of the base (None when the layer has none)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.weight_e4m3, self.weight_scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _StoredLinear.apply(x.to(self.compute_dtype), self.weight_e4m3, self.weight_scale, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, stored=float8_e4m3fn"


def store_base_in_float8(model: torch.nn.Module, log=print) -> list[str]:
    """Replace the frozen base of every LoRA-adapted Linear by a Float8StoredLinear; returns their names.

    A base whose weight trains (a module also in model.lora.extra_trainable) stays as it is, logged.
    """
    stored, kept, saved = [], [], 0
    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if not isinstance(base, torch.nn.Linear):
            continue
        if base.weight.requires_grad:
            kept.append(name)
            continue
        module.base_layer = Float8StoredLinear(base)
        stored.append(name)
        saved += base.in_features * base.out_features
    if not stored:
        from i2v.core.errors import ConfigError

        raise ConfigError("model.fp8.base: no frozen LoRA base layer to store in float8 (model.lora.target_modules "
                          "names none, or all of them also train through model.lora.extra_trainable)")
    log(f"model.fp8.base: e4m3 for the frozen base of {len(stored)} layers ({saved / 1e6:.2f}M weights, 1 byte each "
        "+ an fp32 scale per output channel)" + (f"; kept trainable in full: {', '.join(kept)}" if kept else ""))
    return stored


# --------------------------------------------------------------------------- the trainer's one call


def apply_fp8(model: torch.nn.Module, model_cfg, device, log=print) -> None:
    """`model.fp8` on a built model (after LoRA is injected, before the processors and compile)."""
    fp8 = model_cfg.fp8
    if fp8.compute != "none":
        apply_fp8_compute(model, fp8.compute, device, log)
    if fp8.base != "none":
        store_base_in_float8(model, log)


def switch_note(recorded_config: dict, model_cfg) -> str | None:
    """A log line when a resume turns float8 on or off, or changes its recipe (the checkpoint does not change)."""
    was = ((recorded_config or {}).get("model") or {}).get("fp8") or {}
    now = model_cfg.fp8
    changes = [f"model.fp8.{k}: {was.get(k, 'none')} -> {getattr(now, k)}" for k in ("compute", "base")
               if was.get(k, "none") != getattr(now, k)]
    if not changes:
        return None
    return "resuming with another float8 setting (" + "; ".join(changes) + "); the weights and optimizer state load as saved"
