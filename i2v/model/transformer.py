"""The DiT: diffusers' CogVideoXTransformer3DModel, from a diffusers directory or inline.

in_channels is 2 x latent channels: the noisy video latents concatenated with the image
latents along channels. `rotary_embeddings` computes the 3D RoPE tables exactly as
diffusers' CogVideoX pipelines do, so training and sampling see the same positions.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from i2v.config import ModelConfig
from i2v.model.checkpointing import apply_checkpointing, effective
from i2v.core import seeding
from i2v.core.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)


def check_arch_keys(arch: dict, cls, key: str) -> None:
    """Unknown constructor arguments are config errors, with a did-you-mean."""
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for name in arch:
        if name not in params:
            close = difflib.get_close_matches(name, params, n=1)
            hint = f" Did you mean '{key}.{close[0]}'?" if close else ""
            raise ConfigError(f"{key}.{name}: not an argument of {cls.__name__}.{hint}")


def check_pretrained_dir(path: str, key: str, weight_files=WEIGHT_FILES) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{key}: {path} has no config.json; expected a diffusers-format model directory")
    if not any(os.path.isfile(os.path.join(path, f)) for f in weight_files):
        raise ConfigError(f"{key}: {path} has no weights; expected one of {', '.join(weight_files)}")


def _check_channels(in_channels: int, out_channels: int, key: str) -> None:
    if in_channels != 2 * out_channels:
        raise ConfigError(
            f"{key}: in_channels ({in_channels}) must be 2 x out_channels ({out_channels}): "
            "noisy video latents concatenated with image latents"
        )


def read_arch_file(path: str, key: str) -> dict:
    """The constructor arguments in a diffusers config.json (its `_class_name`-style keys dropped)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: file not found: {path}")
    with open(path) as f:
        try:
            conf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: {path} is not valid JSON: {e}") from None
    arch = {k: v for k, v in conf.items() if not k.startswith("_")}
    check_arch_keys(arch, CogVideoXTransformer3DModel, key)
    return arch


def transformer_arch(cfg: ModelConfig) -> dict:
    """Every constructor argument of the configured DiT (defaults filled in), read without any weights."""
    if cfg.arch:
        check_arch_keys(cfg.arch, CogVideoXTransformer3DModel, "model.arch")
        arch = dict(cfg.arch)
    elif cfg.arch_file:
        arch = read_arch_file(cfg.arch_file, "model.arch_file")
    else:
        path = os.path.join(cfg.pretrained, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"model.pretrained: {path} not found, so the architecture is unknown; set "
                              "model.arch_file to the model's config.json (configs/arch/ ships the public CogVideoX ones)")
        arch = read_arch_file(path, "model.pretrained")
    defaults = {name: p.default for name, p in inspect.signature(CogVideoXTransformer3DModel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **arch}


def build_transformer(cfg: ModelConfig, seed: int = 0, checkpointing=None) -> CogVideoXTransformer3DModel:
    """Load or construct the transformer; random init is explicit and seeded.

    `checkpointing` is `model.gradient_checkpointing` resolved (i2v.plan.planner.resolve_checkpointing turns
    `auto` into none/selective/N/all); None applies the configured value (an unresolved `auto` runs as `all`).
    """
    if cfg.pretrained:
        check_pretrained_dir(cfg.pretrained, "model.pretrained")
        conf = transformer_arch(ModelConfig(pretrained=cfg.pretrained))
        if cfg.arch_file:
            want = transformer_arch(ModelConfig(arch_file=cfg.arch_file))
            diff = [f"{k} ({conf[k]!r} there, {want[k]!r} here)" for k in want if conf[k] != want[k]]
            if diff:
                raise ConfigError(f"model.arch_file: {cfg.arch_file} differs from {cfg.pretrained}/config.json in "
                                  + ", ".join(diff))
        _check_channels(conf["in_channels"], conf["out_channels"] or 16, "model.pretrained")
        model = CogVideoXTransformer3DModel.from_pretrained(cfg.pretrained, torch_dtype=DTYPES[cfg.dtype])
    else:
        arch = transformer_arch(cfg)
        key = "model.arch" if cfg.arch else "model.arch_file"
        _check_channels(arch["in_channels"], arch["out_channels"] or 16, key)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seeding.seed("transformer-init", seed))
        model = CogVideoXTransformer3DModel(**arch)
        init_weights(model, cfg.init_std)
        torch.random.set_rng_state(gen_state)
        if cfg.dtype != "fp32":
            model = model.to(DTYPES[cfg.dtype])
    apply_checkpointing(model, effective(cfg.gradient_checkpointing, checkpointing))
    return model


@torch.no_grad()
def init_weights(model: torch.nn.Module, std: float) -> None:
    """Explicit init for a random model: normal Linear weights, zero biases, zero output layer.

    A zero output projection makes the untrained model predict 0, a calm start (as in DiT).
    """
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)


def set_attention(model: CogVideoXTransformer3DModel, backend: str, device=None, sdpa_backend=None) -> str:
    """Install the attention implementation chosen by `kernels.attention`; returns the one used.

    `device` is where the model will run: it is built on the CPU, so `auto` must not judge by
    where its parameters are now. `sdpa_backend`: see `i2v.model.attention.apply_attention_backend`.
    """
    from i2v.model.attention import apply_attention_backend

    return apply_attention_backend(model, backend, device=device, sdpa_backend=sdpa_backend)


def rotary_embeddings(model_config, frames: int, height: int, width: int, device) -> tuple | None:
    """3D RoPE (cos, sin) for a latent grid of [frames, height, width], as the diffusers pipelines build it."""
    c = model_config
    if not c.use_rotary_positional_embeddings:
        return None
    p = c.patch_size
    grid_h, grid_w = height // p, width // p
    base_w, base_h = c.sample_width // p, c.sample_height // p
    if c.patch_size_t is None:
        # CogVideoX 1.0: the grid is fitted into the base grid's aspect ratio.
        crops = _resize_crop_region((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=(grid_h, grid_w),
            temporal_size=frames, device=device,
        )
    # CogVideoX 1.5: frames are patched in time too, and the grid is sliced from the base size.
    return get_3d_rotary_pos_embed(
        embed_dim=c.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
        temporal_size=(frames + c.patch_size_t - 1) // c.patch_size_t, grid_type="slice",
        max_size=(base_h, base_w), device=device,
    )


def _resize_crop_region(src: tuple[int, int], tgt_w: int, tgt_h: int) -> tuple:
    """The top-left and bottom-right of `src` resized to fit (tgt_h, tgt_w), centred."""
    h, w = src
    if h / w > tgt_h / tgt_w:
        new_h, new_w = tgt_h, int(round(tgt_h / h * w))
    else:
        new_w, new_h = tgt_w, int(round(tgt_w / w * h))
    top, left = int(round((tgt_h - new_h) / 2.0)), int(round((tgt_w - new_w) / 2.0))
    return (top, left), (top + new_h, left + new_w)


def predict(model, model_input, prompt_embeds, timesteps, ofs=None, rotary=None, **forward_kwargs):
    """One transformer forward: [B, F, 2C, h, w] -> [B, F, C, h, w] (`forward_kwargs`: e.g. a sequence-parallel shard)."""
    dtype = next(model.parameters()).dtype
    ofs_t = None
    if ofs is not None and getattr(model.config, "ofs_embed_dim", None) is not None:
        ofs_t = model_input.new_full((model_input.shape[0],), float(ofs), dtype=dtype)
    out = model(
        hidden_states=model_input.to(dtype),
        encoder_hidden_states=prompt_embeds.to(dtype),
        timestep=timesteps,
        ofs=ofs_t,
        image_rotary_emb=rotary,
        return_dict=False,
        **forward_kwargs,
    )[0]
    return out
