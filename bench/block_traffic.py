"""What one CogVideoX transformer block costs a GPU, counted on the CPU: launches, HBM bytes, FLOPs.

A meta-device proxy, not a GPU measurement. One block of the DiT (diffusers' CogVideoXBlock, taken
from a CogVideoXTransformer3DModel built on the meta device, so no weights exist) runs a training
forward and backward at the real shape, bf16, batch 1: for `--shape 5b` configs/arch/cogvideox-5b-i2v.json
with 226 text + 17,550 video tokens (13 x 60 x 90 latents), 3D RoPE as `i2v.model.transformer.rotary_embeddings`
builds it. The attention processor is the one the trainer installs on CUDA (`apply_attention_backend`
with the device given as CUDA): `--attention triton` is our CogVideoXFlashAttnProcessor, whose kernels
are custom ops that run their fake implementations on the meta device; `--attention torch` is diffusers'
SDPA processor, with SDPA sent to its flash kernel (`aten._scaled_dot_product_flash_attention`, what
CUDA picks for bf16, head dim 64 and no mask; the meta device alone would pick the unfused math path).

Gradient checkpointing is installed as the trainer installs it (`_install_checkpointing`), and the
block is called the way the model's forward loop calls it: through `model._gradient_checkpointing_func`
when checkpointing is on. `bench/_traffic.py` counts every aten op (its docstring states the rules), split
into forward, recompute (the checkpointed block's forward run again inside the backward, marked by
wrapping the block's forward) and backward (all of it, not only the block's: the whole training
step's share for one block, with the gradients of the block's two outputs given, as the next block
would give them; parameter gradients are the first of the step, so nothing is accumulated).
diffusers' `apply_rotary_emb` is also counted as a region (its ops forward and recompute, and its
autograd nodes' ops in the backward; the processor's writes of its result into Q and K are not in it).
With `--attention triton` the QK norms and RoPE run as the fused `i2v::qk_norm_rope_fwd/bwd` ops instead,
so that region is absent and the ops are listed under their own names.
The block's forward is the one the trainer installs on CUDA (`apply_block_backend`, `kernels.block`): by
default (`--block auto`, so triton there) `i2v.model.fused_block.fused_forward`, whose adaptive norms and
gated residuals are the `i2v::adaptive_norm_*` and `i2v::gated_residual_*` custom ops; `--block torch` counts
diffusers' own block forward.

    python bench/block_traffic.py [--shape 5b|tiny] [--attention triton|torch] [--block auto|triton|torch]
                                  [--checkpointing none,selective,all]
                                  [--top 10] [--out bench/results/block_traffic.json]

It prints one table per checkpointing setting and the top ops by bytes, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels are defined but never run: only their fakes

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _traffic import PHASES, TrafficCounter, top_ops  # noqa: E402

SHAPES = {"5b": REPO / "configs" / "arch" / "cogvideox-5b-i2v.json", "tiny": REPO / "configs" / "tiny.yaml"}
CHECKPOINTING = ("none", "selective", "all")
DEFAULT_OUT = REPO / "bench" / "results" / "block_traffic.json"


def arch_of(shape: str) -> dict:
    from i2v.config import ModelConfig
    from i2v.config.loader import load_config
    from i2v.model.transformer import transformer_arch

    if shape == "5b":
        return transformer_arch(ModelConfig(arch_file=str(SHAPES["5b"])))
    return transformer_arch(load_config(str(SHAPES["tiny"])).model)


def latent_shape(arch: dict) -> tuple[int, int, int]:
    """The arch's own sample size in latents: (frames - 1) / temporal compression + 1, height, width."""
    frames = (arch["sample_frames"] - 1) // arch["temporal_compression_ratio"] + 1
    return frames, arch["sample_height"], arch["sample_width"]


def build_model(arch: dict, attention: str, block: str = "auto", dtype=torch.bfloat16):
    """The DiT on the meta device with one block, the processor and the block forward the trainer installs on CUDA."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    from i2v.model.attention import apply_attention_backend
    from i2v.model.fused_block import apply_block_backend

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warning on .to(dtype) is about loading weights: none here
    try:
        with torch.device("meta"):
            model = CogVideoXTransformer3DModel(**{**arch, "num_layers": 1}).to(dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    used = apply_attention_backend(model, attention, device="cuda")
    assert used == attention, (used, attention)
    used = apply_block_backend(model, block, device="cuda")
    assert used == ("triton" if block == "auto" else block), (used, block)
    return model


def _install_checkpointing(model, setting: str):
    """Gradient checkpointing of the blocks as the trainer installs it (i2v.model.checkpointing)."""
    from i2v.model.checkpointing import apply_checkpointing

    if setting not in CHECKPOINTING:
        raise ValueError(f"--checkpointing must be among {', '.join(CHECKPOINTING)}, got {setting!r}")
    apply_checkpointing(model, setting)
    return model


def _sdpa_as_flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """SDPA through the flash kernel CUDA would pick (bf16/fp16, no mask, no dropout, head dim <= 256)."""
    if attn_mask is not None or dropout_p or kwargs:
        raise ValueError("the flash SDPA stand-in takes no mask, dropout or other options")
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                              scale=scale)[0]


def count_block(shape: str = "5b", attention: str = "triton", checkpointing: str = "all", block: str = "auto") -> dict:
    """Launches, bytes and FLOPs of one block's training step, per phase (see the module docstring)."""
    from diffusers.models import embeddings

    from i2v.model.transformer import rotary_embeddings

    arch = arch_of(shape)
    model = build_model(arch, attention, block)
    _install_checkpointing(model, checkpointing)
    block = model.transformer_blocks[0]
    frames, height, width = latent_shape(arch)
    text = arch["max_text_seq_length"]
    video = frames * (height // arch["patch_size"]) * (width // arch["patch_size"])
    dim = arch["num_attention_heads"] * arch["attention_head_dim"]
    dtype = torch.bfloat16
    meta = dict(device="meta", dtype=dtype)
    hidden = torch.empty(1, video, dim, **meta, requires_grad=True)
    encoder = torch.empty(1, text, dim, **meta, requires_grad=True)
    temb = torch.empty(1, arch["time_embed_dim"], **meta, requires_grad=True)
    rotary = rotary_embeddings(model.config, frames, height, width, "meta")

    counter = TrafficCounter()
    block.forward = counter.recompute_marker(block.forward)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if attention == "torch":
        torch.nn.functional.scaled_dot_product_attention = _sdpa_as_flash
    # Both processors import diffusers' apply_rotary_emb when called: its traffic is reported as a region.
    rope = embeddings.apply_rotary_emb
    embeddings.apply_rotary_emb = counter.region_marker("apply_rotary_emb", rope)
    try:
        with counter:
            if torch.is_grad_enabled() and model.gradient_checkpointing:  # the model's own loop
                out = model._gradient_checkpointing_func(block, hidden, encoder, temb, rotary, None)
            else:
                out = block(hidden, encoder, temb, rotary, None)
            grads = [torch.empty_like(t) for t in out]  # from the next block: not this block's work
            with counter.in_phase("backward"):
                torch.autograd.backward(out, grads)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        embeddings.apply_rotary_emb = rope
    missing = [n for n, p in model.named_parameters() if n.startswith("transformer_blocks.0") and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    report = counter.report()
    report["tokens"] = {"text": text, "video": video}
    return report


def _versions() -> dict:
    import diffusers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "commit": commit}


def _mb(n: int) -> str:
    return f"{n / 1e6:10,.1f}"


def _gf(n: int) -> str:
    return f"{n / 1e9:11,.1f}"


def print_table(setting: str, report: dict) -> None:
    print(f"\ncheckpointing {setting}: {report['tokens']['text']} text + {report['tokens']['video']} video tokens")
    print(f"{'phase':<10} {'launches':>8} {'MB':>10} {'GEMM GFLOP':>11} {'attn GFLOP':>11} {'GEMM MB':>10} "
          f"{'attn MB':>10} {'syncs':>5}")
    for p in (*PHASES, "total"):
        r = report[p]
        print(f"{p:<10} {r['launches']:>8} {_mb(r['bytes'])} {_gf(r['gemm_flops'])} {_gf(r['attention_flops'])} "
              f"{_mb(r['gemm_bytes'])} {_mb(r['attention_bytes'])} {r['syncs']:>5}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="5b")
    ap.add_argument("--attention", choices=("triton", "torch"), default="triton")
    ap.add_argument("--block", choices=("auto", "triton", "torch"), default="auto",
                    help="kernels.block as the trainer resolves it on CUDA (auto: triton); torch: diffusers' block")
    ap.add_argument("--checkpointing", default=",".join(CHECKPOINTING),
                    help=f"comma-separated among {', '.join(CHECKPOINTING)} (default: all three)")
    ap.add_argument("--top", type=int, default=10, help="ops listed by bytes")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    settings = [s.strip() for s in args.checkpointing.split(",") if s.strip()]
    for s in settings:
        if s not in CHECKPOINTING:
            ap.error(f"--checkpointing: {s!r} is not one of {', '.join(CHECKPOINTING)}")

    results = {}
    for s in settings:
        try:
            report = count_block(args.shape, args.attention, s, args.block)
        except ValueError as e:
            ap.error(str(e))
        print_table(s, report)
        for name, v in report["total"]["regions"].items():
            per = ", ".join(f"{p} {_mb(report[p]['regions'].get(name, {}).get('bytes', 0)).strip()}" for p in PHASES)
            print(f"  region {name}: {v['launches']} launches, {_mb(v['bytes']).strip()} MB ({per})")
        print(f"  top {args.top} non-GEMM, non-attention ops by bytes (all phases):")
        for name, launches, nbytes in top_ops(report, args.top):
            print(f"    {name:<40} {launches:>5} launches {_mb(nbytes)} MB")
        report["top_ops"] = [{"op": n, "launches": k, "bytes": b} for n, k, b in top_ops(report, args.top)]
        results[s] = report

    frames, height, width = latent_shape(arch_of(args.shape))
    out = {
        "mode": "meta-device proxy, not a GPU measurement",
        **_versions(),
        "shape": {"name": args.shape, "batch": 1, "dtype": "bf16", "latents": [frames, height, width],
                  **next(iter(results.values()))["tokens"]} if results else {"name": args.shape},
        "attention": args.attention,
        "block": args.block,
        "checkpointing": results,
    }
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
