"""What trains: the whole DiT, or LoRA adapters (peft) plus the `model.lora.extra_trainable` modules.

Everything that needs to know which weights train asks here: the trainer (optimizer, EMA), the
checkpointer (a LoRA checkpoint holds only the trainable weights), validation and export.

- `with_lora` checks `model.lora` against the real module tree (so a typo lists the closest
  names), injects the adapters with peft and freezes the base. It works on a meta-device model,
  so trainable parameters of a real 5B can be counted without its weights.
- `trainable_parameters` is the one answer to "which parameters train": `requires_grad`, which
  `with_lora` set (everything when LoRA is off).
- The base stays in `model.dtype`. DeepSpeed keeps fp32 master weights of the trainable
  parameters only (the config requires model.dtype to equal deepspeed.precision under LoRA,
  because the engine casts every parameter to its precision).
- `base_identity` names the frozen base a LoRA checkpoint was trained on (a checkpoint does not
  hold it), and `check_resume` refuses a resume onto another base or another LoRA layout.
- `diffusers_lora_state_dict` and `diffusers_lora_metadata` are the keys and the rank/alpha record of
  `CogVideoXImageToVideoPipeline.save_lora_weights`, so `pipe.load_lora_weights(OUT)` restores
  the scaling alpha / rank (without the metadata diffusers would assume alpha = rank).
"""

from __future__ import annotations

import difflib
import json
import os
import re

import torch

from i2v.config import Config, ModelConfig
from i2v.core import seeding
from i2v.core.errors import CheckpointError, ConfigError

ADAPTER = "default"  # peft's adapter name; it appears in parameter names as `lora_A.default.weight`
_INIT = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}  # model.lora.init -> peft's value
_ADAPTER_SEGMENT = re.compile(rf"\.(lora_[AB])\.{ADAPTER}\.")
_LAYOUT_KEYS = ("rank", "alpha", "target_modules", "extra_trainable")  # what a resume must not change


def lora_enabled(model_cfg: ModelConfig) -> bool:
    return model_cfg.lora.rank > 0


def _matches(name: str, pattern: str) -> bool:
    """peft's rule for a list of target names: the module name itself or its dotted tail."""
    return name == pattern or name.endswith("." + pattern)


def _closest(pattern: str, names: list[str]) -> str:
    """The module names (or dotted tails of them) that come closest to `pattern`."""
    tails = sorted({".".join(n.split(".")[i:]) for n in names for i in range(len(n.split(".")))})
    close = difflib.get_close_matches(pattern, tails, n=5, cutoff=0.5)
    return ", ".join(close) if close else "none close; e.g. " + ", ".join(sorted({n.split(".")[-1] for n in names})[:8])


def _check(model: torch.nn.Module, model_cfg: ModelConfig) -> list[str]:
    """Config errors that need the module tree; returns the module names of `extra_trainable`."""
    lora = model_cfg.lora
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    for target in lora.target_modules:
        hits = [n for n in modules if n and _matches(n, str(target))]
        if not hits:
            raise ConfigError(f"model.lora.target_modules: {target!r} matches no module of the transformer; "
                              f"closest names: {_closest(str(target), linears)}")
        for n in hits:
            layer = modules[n]
            if not isinstance(layer, torch.nn.Linear):
                raise ConfigError(f"model.lora.target_modules: {target!r} matches {n}, a {type(layer).__name__}, "
                                  "not a Linear layer")
            width = min(layer.in_features, layer.out_features)
            if lora.rank > width:
                raise ConfigError(f"model.lora.rank: is {lora.rank}, larger than the width of {n} (Linear "
                                  f"{layer.in_features} -> {layer.out_features}); at most {width} there")
    extra = []
    for pattern in lora.extra_trainable:
        hits = [n for n in modules if n and _matches(n, str(pattern))]
        if not hits:
            raise ConfigError(f"model.lora.extra_trainable: {pattern!r} matches no module of the transformer; "
                              f"closest names: {_closest(str(pattern), [n for n in modules if n])}")
        extra += hits
    if not model_cfg.pretrained and "proj_out" not in extra:
        # init_weights zeroes proj_out: frozen, it passes no gradient back to any adapter.
        raise ConfigError("model.lora.extra_trainable: a random-init model.arch has a zero output layer (proj_out); "
                          "frozen, it passes no gradient to the adapters. Add proj_out to model.lora.extra_trainable "
                          "or fine-tune a pretrained model (model.pretrained)")
    return extra


def with_lora(model: torch.nn.Module, model_cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """Inject LoRA adapters and freeze the base when `model.lora.rank` > 0 (in place); else unchanged."""
    if not lora_enabled(model_cfg):
        return model
    from peft import LoraConfig

    lora = model_cfg.lora
    extra = _check(model, model_cfg)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
                        lora_dropout=lora.dropout, target_modules=[str(t) for t in lora.target_modules],
                        init_lora_weights=_INIT[lora.init])
    # The adapters' random init is a function of the seed, like the model's own.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeding.seed("lora-init", seed))
        model.add_adapter(config, adapter_name=ADAPTER)  # diffusers' PeftAdapterMixin: freezes all but adapters
    for name in extra:
        model.get_submodule(name).requires_grad_(True)
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (and that the optimizer, the EMA and a LoRA checkpoint hold)."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------- base identity


def _weight_files(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory)
                  if f.startswith("diffusion_pytorch_model") and f.endswith((".safetensors", ".bin", ".json")))


def base_identity(cfg: Config) -> dict:
    """What the frozen base is: the pretrained config and weight files (size, sha256), or arch + seed."""
    from i2v.core.fsutil import sha256_file

    m = cfg.model
    if m.pretrained:
        with open(os.path.join(m.pretrained, "config.json")) as f:
            config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}  # `_diffusers_version` etc.
        files = {}
        for name in _weight_files(m.pretrained):
            path = os.path.join(m.pretrained, name)
            files[name] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
        return {"pretrained": os.path.abspath(m.pretrained), "config": config, "files": files}
    return {"arch": dict(m.arch), "seed": cfg.run.seed, "init_std": m.init_std}


def _same_base(a: dict, b: dict) -> bool:
    if "pretrained" in a and "pretrained" in b:  # a moved copy of the same files is the same base
        return a["config"] == b["config"] and a["files"] == b["files"]
    return a == b


def _describe(base: dict) -> str:
    if "pretrained" in base:
        files = ", ".join(f"{n} ({r['size']} bytes, sha256 {r['sha256'][:12]})" for n, r in base["files"].items())
        return f"model.pretrained {base['pretrained']} [{files}]"
    return f"model.arch {base['arch']} with run.seed {base['seed']} and model.init_std {base['init_std']}"


def check_resume(cfg: Config, recorded: dict, where: str, base: dict | None) -> None:
    """Refuse a resume that would put this run's model on the wrong weights, naming both sides."""
    was = ((recorded.get("config") or {}).get("model") or {}).get("lora") or {}
    was_rank, now = int(was.get("rank", 0)), cfg.model.lora
    if was_rank and not now.rank:
        raise ConfigError(
            f"model.lora.rank: is 0, but checkpoint {where} holds LoRA adapters (rank {was_rank}) and no base "
            f"weights; resume with model.lora.rank={was_rank}, or export it with --merge-lora and fine-tune the export"
        )
    if now.rank and not was_rank:
        raise ConfigError(
            f"model.lora.rank: is {now.rank}, but checkpoint {where} is a full fine-tune (model.lora.rank 0); "
            "export it and point model.pretrained at the export's transformer/ in a new run.output_dir"
        )
    if not now.rank:
        return
    diffs = [f"model.lora.{k}: checkpoint has {was.get(k)!r}, config has {getattr(now, k)!r}"
             for k in _LAYOUT_KEYS if was.get(k) != getattr(now, k)]
    if diffs:
        raise ConfigError(f"the LoRA layout differs from checkpoint {where}: {'; '.join(diffs)}")
    recorded_base = recorded.get("base")
    if recorded_base is None or not _same_base(recorded_base, base):
        theirs = _describe(recorded_base) if recorded_base else "an unrecorded base"
        raise CheckpointError(f"checkpoint {where} holds LoRA adapters trained on {theirs}, but this run's base is "
                              f"{_describe(base)}; resume onto the base it was trained on")


# --------------------------------------------------------------------------- diffusers' LoRA format


def diffusers_lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under the keys `save_lora_weights` writes: `transformer.<module>.lora_A.weight`."""
    out = {}
    for name, p in model.named_parameters():
        if _ADAPTER_SEGMENT.search(name):
            out["transformer." + _ADAPTER_SEGMENT.sub(r".\1.", name)] = p.detach().float().cpu().contiguous()
    return out


def diffusers_lora_metadata(model_cfg: ModelConfig) -> dict:
    """peft LoraConfig arguments, prefixed as `save_lora_weights` packs `transformer_lora_adapter_metadata`."""
    lora = model_cfg.lora
    fields = {"r": lora.rank, "lora_alpha": lora.alpha if lora.alpha is not None else lora.rank,
              "lora_dropout": lora.dropout, "target_modules": sorted(str(t) for t in lora.target_modules),
              "init_lora_weights": _INIT[lora.init], "bias": "none", "use_dora": False, "lora_bias": False,
              "rank_pattern": {}, "alpha_pattern": {}}
    return {f"transformer.{k}": v for k, v in fields.items()}
