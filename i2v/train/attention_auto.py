"""`kernels.attention: auto` for a training run: on CUDA, the fastest attention at the run's shape.

On CUDA, rank 0 times every candidate of `i2v.kernels.attention_choice` once at start, forward +
backward at the shape each attention call sees (micro-batch, heads per rank, the whole joint
text + video sequence, head dim; under sequence parallelism the all-to-all gives each rank the
whole sequence for heads / sp_size), keeps the times in `<run.output_dir>/attention_choice.json`
(a resumed run reads them back) and broadcasts the winner's index to the other ranks.

Why rank 0 measures and broadcasts rather than every rank measuring: timings differ by a few
percent between GPUs, so independent measurements could pick different backends, and ranks on
different attention implementations would train on (slightly) different maths; one measurement
and one writer of the cache file avoid both, for the price of one tiny collective in start-up. The
ranks of a run are assumed to have the same kind of GPU.

Elsewhere, and for `triton` or `torch`, nothing is measured: the rule of `i2v.kernels.backends`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from i2v.config.schema import latent_shape
from i2v.kernels import attention_choice
from i2v.model.flops import video_tokens

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
CACHE_NAME = "attention_choice.json"


def attention_shape(cfg, model_config) -> tuple[int, int, int, int]:
    """(B, H, S, D) of one attention call on one rank: the micro-batch, the heads this rank holds, the
    text + video tokens of the clip geometry with the most tokens (i2v.config.schema.latent_shape: through
    the configured VAE's compression, CogVideoX's where none is named), the head dim."""
    video = video_tokens(model_config, *latent_shape(cfg))
    heads = model_config["num_attention_heads"] // cfg.parallel.sequence_parallel_size
    seq = model_config["max_text_seq_length"] + video
    return cfg.train.micro_batch_size, heads, seq, model_config["attention_head_dim"]


def auto_attention(cfg, env, model_config, log) -> tuple[str, str | None]:
    """(kernels.attention, sdpa backend) to install: ("triton", None), ("torch", "sdpa-cudnn") and so on
    after a measurement for `auto` on CUDA; the setting unchanged, None, otherwise (no timing)."""
    choice = cfg.kernels.attention
    if choice != "auto" or env.device.type != "cuda":
        return choice, None
    shape = attention_shape(cfg, model_config)
    dtype = _DTYPES[cfg.deepspeed.precision]
    index = torch.full((1,), -1, dtype=torch.int64, device=env.device)
    if env.is_main:
        index[0] = _measure_on_main(cfg, env, shape, dtype, log)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(index, src=0)
    picked = int(index.item())
    if picked < 0:  # nothing measured usable: the rule of i2v.kernels.backends
        return "auto", None
    name = attention_choice.CANDIDATES[picked]
    return ("triton", None) if name == "triton" else ("torch", name)


def _measure_on_main(cfg, env, shape, dtype, log) -> int:
    """The index in CANDIDATES of the fastest, or -1 (after saying why) when none could be timed."""
    path = os.path.join(cfg.run.output_dir, CACHE_NAME)
    skipped: dict = {}
    key = attention_choice.cache_key(shape, dtype, env.device)
    try:
        name, times, cached = attention_choice.choose_cached(
            path, key, lambda: attention_choice.measure_attention(shape, dtype, env.device, skipped=skipped))
    except Exception as e:  # noqa: BLE001 - the other ranks wait in the broadcast: fall back, never stop here
        log(f"attention: auto could not measure ({type(e).__name__}: {e}); using the default rule")
        return -1
    log(describe(name, times, shape, dtype, path, cached, skipped))
    return attention_choice.CANDIDATES.index(name)


def describe(name, times, shape, dtype, path, cached, skipped=None) -> str:
    """The start-up line: the choice, every time (fastest first), the shape, where the times are kept."""
    ranked = ", ".join(f"{n} {t:.1f} ms" for n, t in sorted(times.items(), key=lambda x: x[1]))
    extra = "".join(f"; {n} skipped: {why}" for n, why in (skipped or {}).items())
    where = "cached in" if cached else "measured, saved to"
    return (f"attention: auto -> {name} (fwd+bwd at {'x'.join(map(str, shape))} "
            f"{_NAMES[dtype]}: "
            f"{ranked}{extra}; {where} {path})")
