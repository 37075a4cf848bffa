"""Know before launch: parameters, per-rank memory, FLOPs and step time of a run config.

`make_plan` builds the DiT on the meta device from the configured architecture (an inline
`model.arch`, `model.arch_file`, or the `config.json` of `model.pretrained`; never the weights),
then prices one optimizer step with the cost model (`i2v.model.flops`) and the memory model
(`i2v.plan.memory`) at the config's clip geometry (the largest bucket when there are buckets).
The latent shape follows the configured VAE's compression (`i2v.config.schema.vae_compression`).
`render` prints it; `launcher/plan.py` is the command.

Every gradient-checkpointing setting is priced (none, selective, the first N blocks, all);
`model.gradient_checkpointing: auto` takes the one with the least recompute whose peak fits the
accelerator's memory less the headroom (`resolve_checkpointing`; at training start
`checkpointing_at_start`, on the rank's own device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from i2v.config import Config, resolve
from i2v.config.schema import VAECompression, latent_shape, planned_vae
from i2v.train.ds_config import build_deepspeed_config
from i2v.model.flops import SampleFlops, training_flops
from i2v.plan.memory import (DTYPE_BYTES, ParamCounts, StateBytes, ZeroSettings, activation_bytes, state_bytes,
                             weight_bytes)
from i2v.model.checkpointing import normalize
from i2v.model.transformer import transformer_arch

GiB = 2**30
# Left free for what the allocator does not count as tensors: the CUDA context, library workspaces,
# communication buffers, fragmentation (`model.memory_headroom_gb` sets it in GiB instead).
RESERVE_FRACTION = 0.10
# What `auto` assumes of an accelerator whose memory is unknown (a CPU run): the plan command's default.
DEFAULT_GPU_MEM_GB = 80.0


def headroom_bytes(cfg: Config, gpu_mem_bytes: int) -> int:
    """Memory left free beyond the predicted peak: `model.memory_headroom_gb`, else 10% of the accelerator's."""
    h = cfg.model.memory_headroom_gb
    return int(gpu_mem_bytes * RESERVE_FRACTION) if h is None else int(h * GiB)


def checkpointing_candidates(num_layers: int) -> list:
    """Every distinct setting `auto` weighs: none, selective, the first N blocks (0 < N < num_layers), all."""
    return ["none", "selective", *range(1, num_layers), "all"]


@dataclass(frozen=True)
class Plan:
    arch: dict
    counts: ParamCounts
    gpus: int
    gpu_mem_bytes: int
    latent: tuple  # (frames, height, width) of the latents priced
    vae: VAECompression  # what turned the clip geometry into `latent`
    flops: SampleFlops
    samples_per_step: int
    grad_accum_steps: int  # at `gpus` ranks (train.global_batch_size may set it)
    state: StateBytes
    activations: dict  # checkpointing setting ("none", "selective", N, "all") -> ActivationBytes
    recompute: dict  # checkpointing setting -> recompute FLOPs per sample
    checkpointing: object  # the setting priced: the configured one, `auto` resolved
    requested: object  # model.gradient_checkpointing as configured
    reason: str  # why `checkpointing` (what auto weighed, or "configured")
    headroom_bytes: int
    mfu: float
    peak_tflops: float

    def peak_at(self, setting) -> int:
        """The estimated per-rank peak on the accelerator under a checkpointing setting."""
        return self.state.device + self.activations[setting].peak

    @property
    def peak_bytes(self) -> int:
        """The estimated per-rank peak on the accelerator at the configured checkpointing."""
        return self.peak_at(self.checkpointing)

    @property
    def usable_bytes(self) -> int:
        return self.gpu_mem_bytes - self.headroom_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def step_flops(self) -> int:
        """Model FLOPs of one optimizer step, all ranks together."""
        return self.flops.model * self.samples_per_step

    @property
    def step_seconds(self) -> float:
        """One optimizer step if every rank runs at `mfu` of `peak_tflops`."""
        return self.step_flops / self.gpus / (self.mfu * self.peak_tflops * 1e12)


def make_plan(cfg: Config, gpus: int, gpu_mem_gb: float, mfu: float = 0.4, peak_tflops: float | None = None) -> Plan:
    """Price one optimizer step of `cfg` on `gpus` accelerators of `gpu_mem_gb` GiB each.

    Sequence parallelism (`parallel.sequence_parallel_size`) splits each clip's video tokens over an
    SP group: activations per rank shrink, and an SP group trains one micro-batch. LoRA
    (`model.lora.rank`) leaves only the adapters trainable; an EMA (`train.ema.decay`) adds an fp32
    copy of the trainable weights.
    """
    from diffusers import CogVideoXTransformer3DModel

    from i2v.model.adapters import with_lora
    from i2v.model.fp8 import store_base_in_float8

    run = resolve(cfg, gpus)
    arch = transformer_arch(cfg.model)
    with torch.device("meta"):
        model = with_lora(CogVideoXTransformer3DModel(**arch), cfg.model)
        if cfg.model.fp8.base != "none":
            store_base_in_float8(model, log=lambda line: None)
    zero = ZeroSettings.from_deepspeed(build_deepspeed_config(cfg, run)["zero_optimization"])
    counts = ParamCounts.of(model, zero.param_persistence_threshold)
    vae = planned_vae(cfg)
    latent = latent_shape(cfg, vae)
    t, d = cfg.train, cfg.deepspeed
    sequence_parallel_size = cfg.parallel.sequence_parallel_size
    act_bytes = 2 if d.precision in ("bf16", "fp16") else DTYPE_BYTES[cfg.model.dtype]
    settings = checkpointing_candidates(arch["num_layers"])
    activations = {
        s: activation_bytes(model.config, *latent, micro_batch=t.micro_batch_size, dtype_bytes=act_bytes,
                            gradient_checkpointing=s, attention="torch" if cfg.kernels.attention == "torch"
                            else "triton", sequence_parallel_size=sequence_parallel_size)
        for s in settings
    }
    flops = {s: training_flops(model.config, *latent, gradient_checkpointing=s) for s in settings}
    state = state_bytes(counts, zero, d.precision, gpus, ema=t.ema.decay > 0, model_dtype=cfg.model.dtype)
    gpu_mem_bytes = int(gpu_mem_gb * GiB)
    headroom = headroom_bytes(cfg, gpu_mem_bytes)
    requested = cfg.model.gradient_checkpointing
    if requested == "auto":
        checkpointing, reason = _choose(settings, activations, flops, state.device, gpu_mem_bytes - headroom)
    else:
        checkpointing, reason = normalize(arch["num_layers"], requested), "configured"
    return Plan(
        arch=arch, counts=counts, gpus=gpus, gpu_mem_bytes=gpu_mem_bytes, latent=latent, vae=vae,
        flops=flops[checkpointing], samples_per_step=run.global_batch_size, grad_accum_steps=run.grad_accum_steps,
        state=state, activations=activations, recompute={s: f.recompute for s, f in flops.items()},
        checkpointing=checkpointing, requested=requested, reason=reason, headroom_bytes=headroom, mfu=mfu,
        peak_tflops=peak_tflops or t.peak_tflops or 989.0,
    )


def _choose(settings: list, activations: dict, flops: dict, state_bytes: int, usable: int) -> tuple:
    """`auto`: of the settings whose peak fits `usable`, the one with the least recompute (then the
    lowest peak); `all` when none fits."""
    fitting = [s for s in settings if state_bytes + activations[s].peak <= usable]
    if not fitting:
        return "all", f"nothing fits {usable / GiB:.1f} GiB usable; all keeps the least"
    best = min(fitting, key=lambda s: (flops[s].recompute, activations[s].peak))
    if best == "none":
        return best, f"fits {usable / GiB:.1f} GiB usable without recompute"
    share = flops[best].recompute / flops[best].model
    return best, (f"the least recompute ({share:.1%} of the model FLOPs) whose peak fits "
                  f"{usable / GiB:.1f} GiB usable ({len(fitting)} of {len(settings)} settings fit)")


def resolve_checkpointing(cfg: Config, gpu_mem_bytes: int, world_size: int) -> tuple:
    """(setting, predicted per-rank peak bytes, reason) of `model.gradient_checkpointing` on `world_size`
    accelerators of `gpu_mem_bytes` each: `auto` resolved by the memory model, any other value normalised
    (true/false -> "all"/"none", 0 -> "none", N >= num_layers -> "all")."""
    plan = make_plan(cfg, world_size, gpu_mem_bytes / GiB)
    return plan.checkpointing, plan.peak_bytes, plan.reason


def device_memory_bytes() -> tuple[int, str]:
    """(bytes, what they are) of the memory this process trains in: its CUDA device's (LOCAL_RANK), else, on a
    CPU, the machine's physical memory (where a CPU run's activations live)."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.cuda.get_device_properties(index).total_memory, torch.cuda.get_device_name(index)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory (no GPU)"


def checkpointing_at_start(cfg: Config, world_size: int) -> tuple:
    """(setting, line) for a training run about to start: `auto` resolved on this process's device
    (`device_memory_bytes`), with the line to print; (None, None) when the config names a setting itself."""
    if cfg.model.gradient_checkpointing != "auto":
        return None, None
    memory, source = device_memory_bytes()
    plan = make_plan(cfg, world_size, memory / GiB)
    return plan.checkpointing, f"{describe_checkpointing(cfg, plan)} on {source}: {plan.reason}"


def describe_checkpointing(cfg: Config, plan: Plan) -> str:
    """One line: what was asked, what runs, the predicted peak against the memory and the headroom."""
    layers = plan.arch["num_layers"]
    what = plan.checkpointing
    if isinstance(what, int):
        what = f"{what} of {layers} blocks"
    asked = plan.requested if not isinstance(plan.requested, bool) else str(plan.requested).lower()
    return (f"gradient checkpointing: {asked} -> {what} (predicted peak {plan.peak_bytes / GiB:.1f} GiB of "
            f"{plan.gpu_mem_bytes / GiB:.0f} GiB, headroom {plan.headroom_bytes / GiB:.1f} GiB)")


def alternatives(cfg: Config, plan: Plan) -> list[str]:
    """Changes, cheapest first, under which a plan that does not fit would fit."""
    trials = [("deepspeed.zero_stage=3", {"deepspeed": {"zero_stage": 3}}),
              ("deepspeed.zero_stage=3 deepspeed.offload_optimizer=true",
               {"deepspeed": {"zero_stage": 3, "offload_optimizer": True}})]
    if plan.requested != "auto":
        trials.insert(0, ("model.gradient_checkpointing=auto", {}))
    found = []
    for line, change in trials:
        new = cfg
        for section, values in change.items():
            new = replace(new, **{section: replace(getattr(new, section), **values)})
        if plan.requested != "auto" and "gradient_checkpointing" not in line:
            line = "model.gradient_checkpointing=auto " + line
        new = replace(new, model=replace(new.model, gradient_checkpointing="auto"))
        trial = make_plan(new, plan.gpus, plan.gpu_mem_bytes / GiB, plan.mfu, plan.peak_tflops)
        if trial.fits:
            found.append(f"{line} (picks {trial.checkpointing}; peak {trial.peak_bytes / GiB:.1f} GiB)")
    return found


def _gib(n: int) -> str:
    return f"{n / GiB:7.2f} GiB"


def render(cfg: Config, plan: Plan) -> str:
    a, c, s, d = plan.arch, plan.counts, plan.state, cfg.deepspeed
    f, (lf, lh, lw) = plan.flops, plan.latent
    v = cfg.data.video
    frozen = c.total + c.stored_weights - c.trainable  # a float8-stored base is weights, not parameters
    lines = [
        f"model       {a['num_layers']} layers, {a['num_attention_heads']} heads x {a['attention_head_dim']}, "
        f"in_channels {a['in_channels']}" + (f", patch_size_t {a['patch_size_t']}" if a.get("patch_size_t") else ""),
        f"parameters  {c.total + c.stored_weights:,} total, {c.trainable:,} trainable" + (f" ({frozen:,} frozen)" if frozen else ""),
        f"run         {plan.gpus} GPU(s) x {plan.gpu_mem_bytes / GiB:g} GiB | ZeRO-{d.zero_stage} {d.precision}"
        + (" + optimizer offload" if d.offload_optimizer else "")
        + f" | micro-batch {cfg.train.micro_batch_size} x accumulation {plan.grad_accum_steps}"
        f" = {plan.samples_per_step} samples per step",
        "sample      " + (f"the largest of {len(v.buckets)} buckets" if v.buckets else f"clips {v.frames} x {v.height} x {v.width}")
        + f" -> latents {lf} x {lh} x {lw}: "
        f"{f.text_tokens} text + {f.video_tokens:,} video = {f.tokens:,} tokens",
        f"vae         {plan.vae.spatial}x in space, {plan.vae.temporal}x in time ({plan.vae.source})",
        f"FLOPs       {f.model / 1e15:.4f} PFLOP per sample (forward + backward)"
        + (f", {f.hardware / 1e15:.4f} with the checkpointing recompute" if f.recompute else "")
        + f"; {plan.step_flops / 1e15:.3f} PFLOP per optimizer step",
        f"recompute   {f.recompute / 1e15:.4f} PFLOP per sample under {plan.checkpointing}: HFU = "
        f"{f.hardware / f.model:.3f} x MFU ({plan.mfu * f.hardware / f.model:.0%} HFU at {plan.mfu:.0%} MFU)",
        "checkpoint  " + describe_checkpointing(cfg, plan).split(": ", 1)[1] + f"; {plan.reason}",
        f"step time   {plan.step_seconds:.2f} s at {plan.mfu:.0%} MFU of {plan.peak_tflops:g} TFLOP/s per GPU "
        f"({plan.samples_per_step / plan.step_seconds:.2f} samples/s)",
        "memory per rank (accelerator):",
        f"  {'weights':32s}{_gib(s.weights)}" + (
            f"   ({c.stored_weights:,} frozen base weights in float8 e4m3: {_gib(c.stored_bytes).strip()} with their "
            f"scales, against {_gib(c.stored_weights * weight_bytes(d.precision, cfg.model.dtype)).strip()})"
            if c.stored_bytes else ""),
        f"  {'gradients':32s}{_gib(s.gradients)}",
        f"  {'optimizer states':32s}{_gib(s.optimizer)}" + ("   (offloaded: see host)" if d.offload_optimizer else ""),
    ]
    if s.ema:
        lines.append(f"  {'EMA':32s}{_gib(s.ema)}" + ("   (in host memory)" if s.ema_on_host else ""))
    lines.append(f"  {'ZeRO buffers':32s}{_gib(s.buckets)}")
    shown = ["none", "selective", "all"] + ([plan.checkpointing] if isinstance(plan.checkpointing, int) else [])
    for ckpt in shown:
        label = f"activations, checkpointing {ckpt}" if not isinstance(ckpt, int) else f"activations, {ckpt} blocks"
        label = label.replace("checkpointing selective", "selective ckpt")
        mark = "   <- " + ("chosen" if plan.requested == "auto" else "configured") if ckpt == plan.checkpointing else ""
        lines.append(f"  {label:32s}{_gib(plan.activations[ckpt].peak)} per micro-batch, recompute "
                     f"{plan.recompute[ckpt] / 1e15:.4f} PFLOP{mark}")
    kept = ("10%" if cfg.model.memory_headroom_gb is None else "model.memory_headroom_gb")
    lines.append(f"  {'peak estimate':32s}{_gib(plan.peak_bytes)} of {plan.usable_bytes / GiB:.1f} GiB usable "
                 f"({plan.headroom_bytes / GiB:.1f} GiB of {plan.gpu_mem_bytes / GiB:g} GiB kept free: {kept})")
    if s.host:
        lines.append(f"host memory per rank {_gib(s.host)} (optimizer states and, at ZeRO-1/2, fp32 gradients)")
    if plan.fits:
        lines.append(f"verdict     FITS, {(plan.usable_bytes - plan.peak_bytes) / GiB:.1f} GiB to spare per GPU")
    else:
        lines.append(f"verdict     DOES NOT FIT: {(plan.peak_bytes - plan.usable_bytes) / GiB:.1f} GiB over per GPU")
        found = alternatives(cfg, plan)
        lines += [f"            fits with: {alt}" for alt in found] or ["            no ZeRO-3/offload/checkpointing variant fits either"]
    return "\n".join(lines)
