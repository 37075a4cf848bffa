"""The run configuration's schema: a tree of typed dataclasses, one per component, and the checks
that need only the built tree (`Config.validate`). `i2v.config.loader` reads YAML into it.

Every field is documented where it is declared. Loading is strict: an unknown key, a wrong
type, a missing required value or an inconsistent combination raises `ConfigError` naming
the dotted key and what was expected (with a did-you-mean for near misses). A mistake in the
file also names the file and line (`train.max_step: unknown key at configs/x.yaml:12`), and a
key set twice in one mapping is an error naming both lines (PyYAML would keep the last).

Command lines take dotted overrides after the config file::

    launcher/train.py --config configs/tiny.yaml train.max_steps=40 deepspeed.zero_stage=3

One-of groups. `model.pretrained` / `model.arch_file` against `model.arch`, and `pretrained`
against `arch` in `precompute.vae` and `precompute.text_encoder`, name the same component two
ways: at most one may be set (`model.pretrained` and `model.arch_file` go together). A command-line
override of one member replaces the others that came from the config file, so
`--config configs/tiny.yaml model.pretrained=runs/tiny/export/transformer` needs no `model.arch={}`
(which stays accepted). Two members set on the same command line, or both in the same file, are an
error that names the override or line that fixes it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from i2v.core.errors import ConfigError

CHECKPOINTING_VALUES = ("none, all, selective, auto, or an integer N >= 0 (the first N blocks); "
                        "true/false mean all/none")
REQUIRED: Any = "???"  # sentinel default of a field the YAML must set
# Values that were renamed: a config that still says the old one is told the new one, not aliased.
RENAMED = {"kernels.attention": {"sdpa": "torch"}}


def doc(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:
    """A dataclass field with its documentation attached (shown in errors)."""
    if isinstance(default, (list, dict)):
        value = default
        kw["default_factory"] = lambda: type(value)(value)
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return field(metadata={"help": help}, **kw)


# --------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    output_dir: str = doc(REQUIRED, "Directory for config.yaml, checkpoints/, tensorboard/, metrics.jsonl, samples/.")
    seed: int = doc(0, "Global seed: parameter init, data order, timesteps and noise all derive from it.")
    deterministic: bool = doc(False, "torch.use_deterministic_algorithms(True); needed for bit-exact resume tests.")
    lock_timeout_s: float = doc(
        120.0, "A run holds output_dir/RUN_LOCK.json with a heartbeat; a lock whose heartbeat is older than this "
        "(or whose process is gone, on the same host) is stale and taken over (i2v.train.run_lock)."
    )


@dataclass
class LoRAConfig:
    rank: int = doc(0, "LoRA rank (peft); 0 turns LoRA off and the whole DiT trains.")
    alpha: Optional[float] = doc(None, "LoRA alpha: adapter outputs are scaled by alpha / rank; null means alpha = rank.")
    dropout: float = doc(0.0, "Dropout on the adapters' input during training.")
    target_modules: list = doc(
        ["to_q", "to_k", "to_v", "to_out.0"],
        "Linear layers that get adapters: a module name or its dotted tail (peft's matching), e.g. to_q, attn1.to_out.0.",
    )
    init: Literal["default", "gaussian", "orthogonal"] = doc(
        "default",
        "peft's adapter init: default (Kaiming A, zero B), gaussian (normal A, zero B) or orthogonal (even ranks). "
        "Inits that rewrite the base weights (pissa, olora, ...) are not offered: the base stays as it was loaded.",
    )
    extra_trainable: list = doc(
        [], "Modules trained in full beside the adapters (names or dotted tails), e.g. patch_embed.proj, proj_out."
    )


@dataclass
class FP8Config:
    compute: Literal["none", "tensorwise", "rowwise"] = doc(
        "none",
        "Float8 matmuls in full training (torchao's float8 training, `pip install -e .[fp8]`): the transformer "
        "blocks' attention projections and feed-forward layers compute in float8 with `tensorwise` or `rowwise` "
        "scales (tensorwise learns closer to bf16: on the demo +3% final loss against rowwise's +8%); the "
        "adaptive-norm linears, the patch embedding, the output projection and any layer with a "
        "dimension that is not a multiple of 16 stay as they are (each named in a log line). A compute choice, "
        "not a storage one: weights and checkpoints keep their dtype, so a resume may switch it. Emulated (same "
        "quantisation, high-precision matmul) where the device has no float8 matmul (CPU, before compute "
        "capability 8.9). Not with model.lora (see `base`), deepspeed.precision fp16 or deepspeed.zero_stage 3.",
    )
    base: Literal["none", "e4m3"] = doc(
        "none",
        "LoRA runs: the frozen base weights of the layers in model.lora.target_modules are stored as float8 e4m3 "
        "with one fp32 scale per output channel, and upcast to model.dtype at use (forward and backward), halving "
        "their bytes from bf16. Adapters, extra_trainable modules and the export (LoRA file on the original base) "
        "are unchanged. Needs model.lora.rank > 0; not with deepspeed.zero_stage 3 (which already partitions the "
        "base across ranks).",
    )


@dataclass
class ModelConfig:
    pretrained: Optional[str] = doc(
        None, "Diffusers-format transformer directory (config.json + weights), e.g. CogVideoX-5b-I2V/transformer."
    )
    arch: dict = doc(
        {},
        "Inline CogVideoXTransformer3DModel constructor arguments, used when `pretrained` is unset; "
        "keys are checked against the constructor. in_channels must be 2 * out_channels.",
    )
    arch_file: Optional[str] = doc(
        None,
        "A transformer config.json (diffusers format; configs/arch/ ships the public CogVideoX ones): the "
        "architecture of a random-init model, or, beside `pretrained`, the architecture its weights must have. "
        "The planner reads it, so planning needs no weights.",
    )
    dtype: Literal["fp32", "bf16", "fp16"] = doc("fp32", "Parameter dtype when not training under DeepSpeed mixed precision.")
    gradient_checkpointing: bool | int | Literal["none", "all", "selective", "auto"] = doc(
        "none",
        "Activation checkpointing of the transformer blocks (recompute in backward to save memory): `none`; `all` "
        "(each block keeps only its input); an integer N (the first N blocks as `all`, the rest as `none`); "
        "`selective` (every block keeps its Q/K/V projections' and attention core's outputs and recomputes the "
        "norms, QK-norm, RoPE, output projection and feed-forward); `auto` (the cheapest of these whose "
        "predicted peak fits the accelerator's memory less `memory_headroom_gb`; i2v.plan.planner.resolve_checkpointing). "
        "true and false, the old form, mean `all` and `none`.",
    )
    memory_headroom_gb: Optional[float] = doc(
        None, "GiB of accelerator memory that `gradient_checkpointing: auto` leaves free beyond its predicted peak "
        "(CUDA context, workspaces, fragmentation); null means 10% of the accelerator's memory.",
    )
    compile: Literal["none", "blocks"] = doc(
        "none",
        "torch.compile of the DiT: `none` (eager); `blocks` (regional: each transformer block is compiled in place, "
        "`dynamic=False`, one compiled code shared by every block, so the first step pays one compile per input shape; "
        "checkpointing and LoRA wrap or sit inside the compiled block; state_dict keys do not change, so checkpoints "
        "move between the two settings). Not with deepspeed.zero_stage 3 (its parameter-gathering hooks run inside "
        "the block).",
    )
    compile_backend: Literal["inductor", "aot_eager"] = doc(
        "inductor",
        "torch.compile backend of `model.compile: blocks`: `inductor` generates fused kernels (the speed); `aot_eager` "
        "traces the same graphs (dynamo and AOTAutograd, forward and backward) and runs them eagerly, without code "
        "generation: a quick check that a configuration compiles without graph breaks and trains the same.",
    )
    init_std: float = doc(0.02, "Std of the explicit normal init of Linear weights for a random-init (inline) model.")
    lora: LoRAConfig = doc(help="LoRA fine-tuning: adapters on a frozen base.", default_factory=LoRAConfig)
    fp8: FP8Config = doc(help="Float8: matmuls for full training, or a float8-stored frozen base for LoRA.",
                         default_factory=FP8Config)


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = doc(1000, "Number of discrete diffusion steps.")
    beta_start: float = doc(0.00085, "First beta of the scaled-linear schedule.")
    beta_end: float = doc(0.012, "Last beta of the scaled-linear schedule.")
    snr_shift_scale: float = doc(1.0, "Divide alpha_bar/(1-alpha_bar) by this (CogVideoX: 1.0 for 5B, 3.0 for 2B).")
    rescale_zero_terminal_snr: bool = doc(True, "Rescale betas so the last step has zero SNR (CogVideoX does).")
    prediction: Literal["v", "epsilon"] = doc("v", "What the model predicts: v (CogVideoX) or epsilon.")
    t_min: int = doc(0, "Smallest training timestep (inclusive).")
    t_max: int = doc(999, "Largest training timestep (inclusive).")
    text_dropout: float = doc(0.1, "Probability of replacing a sample's prompt embedding with the empty prompt's (CFG).")
    image_dropout: float = doc(0.05, "Probability of zeroing a sample's image latents (CFG on the image).")
    ofs: Optional[float] = doc(None, "Value of the `ofs` input of CogVideoX-1.5-style models (2.0 there); None for 1.0 models.")


@dataclass
class VideoConfig:
    frames: int = doc(9, "Frames per training clip (CogVideoX: 49, i.e. 4k+1 for the causal VAE).")
    height: int = doc(32, "Clip height after resize and crop.")
    width: int = doc(32, "Clip width after resize and crop.")
    fps: Optional[float] = doc(None, "Resample clips to this frame rate by timestamps; None keeps the source rate.")
    stride: int = doc(1, "Take every stride-th frame when `fps` is None.")
    buckets: list = doc(
        [], "Optional [height, width, frames] buckets; each clip goes to the nearest aspect/length bucket."
    )
    min_frames: Optional[int] = doc(None, "Reject clips with fewer decodable frames than this (default: `frames`).")
    max_upscale: float = doc(
        8.0, "Reject clips whose resize to height x width would enlarge them more than this factor (tiny sources)."
    )


@dataclass
class RemoteConfig:
    retries: int = doc(5, "Retries in a row (no byte read between them) of a remote shard read after a drop, a stall, "
                          "a 429 or a 5xx; then the shard counts as bad (data.max_bad_fraction).")
    timeout_s: float = doc(60.0, "Seconds a remote connect or read may wait for a byte before it is retried.")
    backoff_s: float = doc(1.0, "Wait before the first retry; doubled for each retry in a row (at most 30 s).")
    endpoint_url: Optional[str] = doc(
        None, "S3 endpoint of an S3-compatible store (MinIO, Ceph, ...); unset: boto3's own (AWS_ENDPOINT_URL, ~/.aws)."
    )


@dataclass
class DataConfig:
    latent_shards: str = doc(REQUIRED, "Latent shards: a directory, a .tar path, a brace pattern or a URL.")
    video_shards: Optional[str] = doc(None, "Video shards read by the precompute job (directory, pattern or URL).")
    allow_pipe: bool = doc(False, "Allow `pipe:` shard URLs (they run shell commands).")
    order: Literal["auto", "global", "stream"] = doc(
        "auto",
        "Latent sample order. global: a function of (seed, epoch, index), the same at any world size "
        "(local files, or http(s)/s3 shards whose manifest.json records sample offsets). stream: per-rank shard "
        "streams with a shuffle buffer (any URL). auto: global for local files, stream for URLs.",
    )
    shuffle_buffer: int = doc(64, "Size of the seeded sample shuffle buffer; 0 or 1 disables sample shuffling.")
    resampled: bool = doc(True, "Draw shards with replacement forever (infinite training stream).")
    num_workers: int = doc(0, "DataLoader worker processes per rank.")
    max_bad_fraction: float = doc(0.05, "Stop with an error when more than this fraction of samples is bad.")
    min_samples_for_bad_check: int = doc(20, "Judge the bad fraction only after this many samples were seen.")
    video: VideoConfig = doc(help="Decoding, frame sampling and geometry of video clips.", default_factory=VideoConfig)
    log_keys: bool = doc(False, "Each rank appends the keys of every micro-batch it trains to "
                                "run.output_dir/keys-rank<R>.jsonl (an audit of what was trained, and when).")
    remote: RemoteConfig = doc(help="Reading shards from http(s):// and s3:// URLs.", default_factory=RemoteConfig)


@dataclass
class EMAConfig:
    decay: float = doc(0.0, "EMA decay of the trainable weights (fp32, sharded like the optimizer); 0 keeps no EMA.")
    update_every: int = doc(1, "Average every this many optimizer steps.")
    start_step: int = doc(0, "Before this optimizer step the EMA follows the weights exactly (decay 0).")
    warmup: bool = doc(False, "Use min(decay, (1 + n) / (10 + n)) at the n-th averaging update, as diffusers' EMAModel.")


@dataclass
class TrainConfig:
    max_steps: int = doc(REQUIRED, "Optimizer steps to run.")
    micro_batch_size: int = doc(1, "Samples per rank per forward/backward.")
    grad_accum_steps: Optional[int] = doc(
        None, "Micro-batches accumulated per optimizer step. Unset: global_batch_size / (micro_batch_size x "
        "data-parallel size) when global_batch_size is set, else 1."
    )
    global_batch_size: Optional[int] = doc(
        None, "Samples per optimizer step over all ranks. With grad_accum_steps unset it fixes the accumulation "
        "at every world size (a run resumed on more or fewer ranks keeps its trajectory); with it set, the "
        "three must agree (a guard against typos)."
    )
    lr: float = doc(1e-4, "Peak learning rate.")
    lr_schedule: Literal["cosine", "constant"] = doc("cosine", "Schedule after warmup.")
    warmup_steps: int = doc(0, "Linear warmup steps from 0 to `lr`.")
    min_lr_ratio: float = doc(0.0, "Cosine floor as a fraction of `lr`.")
    weight_decay: float = doc(1e-4, "AdamW weight decay.")
    no_decay: bool = doc(True, "No weight decay on biases and norm weights (a second parameter group).")
    betas: list = doc([0.9, 0.95], "AdamW betas.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    log_every: int = doc(10, "Console, metrics.jsonl and TensorBoard scalars every this many steps.")
    peak_tflops: Optional[float] = doc(
        None, "Peak dense TFLOP/s of one accelerator, the denominator of MFU. Default: from the device name "
        "(H100/H200 SXM 989, A100 312, bf16); on the CPU or an unknown GPU MFU is not reported."
    )
    max_consecutive_skips: int = doc(5, "Abort after this many consecutive steps skipped for a non-finite loss/grad.")
    ema: EMAConfig = doc(help="Exponential moving average of the trainable weights.", default_factory=EMAConfig)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = doc(2, "ZeRO stage 0-3.")
    precision: Literal["fp32", "bf16", "fp16"] = doc("fp32", "Mixed precision mode of the DeepSpeed engine.")
    offload_optimizer: bool = doc(False, "Keep optimizer state on the CPU (ZeRO 1-3).")
    extra: dict = doc(
        {}, "Advanced DeepSpeed keys merged into the generated config; keys the tree already controls are refused."
    )


@dataclass
class ParallelConfig:
    sequence_parallel_size: int = doc(
        1,
        "Ranks that split one clip's video tokens (Ulysses all-to-all); consecutive ranks form a group that "
        "trains one micro-batch. Must divide the world size and the number of attention heads.",
    )


@dataclass
class CheckpointConfig:
    every_steps: int = doc(0, "Save a checkpoint every this many steps; 0 saves only at the end.")
    save_at_end: bool = doc(True, "Commit a checkpoint when the run reaches train.max_steps (benchmarks turn it off).")
    keep_last: int = doc(3, "Keep this many newest committed checkpoints (the newest is never deleted).")
    resume: bool = doc(True, "Resume from the newest committed checkpoint in run.output_dir/checkpoints.")
    fallback_on_corrupt: bool = doc(True, "If the newest checkpoint is corrupt, resume from the previous committed one.")
    export_on_finish: bool = doc(False, "Export a diffusers-format directory to run.output_dir/export at the end.")


@dataclass
class KernelsConfig:
    noise: Literal["auto", "triton", "torch"] = doc(
        "auto", "Noise injection: triton (the fused kernel), torch (the reference in PyTorch), or auto: triton "
        "when training on CUDA and triton imports, else torch (i2v.kernels.backends).")
    attention: Literal["auto", "triton", "torch"] = doc(
        "auto", "Attention: triton (our flash kernel), torch (torch's scaled_dot_product_attention, SDPA; "
        "called sdpa before), or auto: on CUDA the fastest of triton and SDPA restricted to its cuDNN, flash or "
        "efficient backend, timed once at the run's shape (kept in <run.output_dir>/attention_choice.json); "
        "elsewhere torch.")
    block: Literal["auto", "triton", "torch"] = doc(
        "auto", "The transformer blocks' adaptive norms and gated residuals: triton (the fused adaptive-norm and "
        "gated-residual kernels, i2v.model.fused_block), torch (diffusers' block), or auto: triton when training on "
        "CUDA and triton imports, else torch (i2v.kernels.backends); torch at deepspeed.zero_stage 3.")


@dataclass
class VAEConfig:
    pretrained: Optional[str] = doc(None, "Diffusers-format AutoencoderKLCogVideoX directory (e.g. CogVideoX-5b-I2V/vae).")
    arch: dict = doc({}, "Inline AutoencoderKLCogVideoX constructor arguments when `pretrained` is unset.")
    dtype: Literal["fp32", "bf16", "fp16"] = doc("fp32", "VAE compute dtype.")
    tiling: bool = doc(False, "Encode in spatial tiles (large resolutions).")
    slicing: bool = doc(False, "Encode batch elements one at a time.")
    seed: Optional[int] = doc(
        None, "Init seed of a random-init (`arch`) VAE; null: run.seed. Training, sampling and export take the "
        "VAE from the latent manifest (i2v.data.lineage), seed included."
    )


@dataclass
class TextEncoderConfig:
    pretrained: Optional[str] = doc(None, "Diffusers-format model root or T5 directory holding text_encoder/ and tokenizer/.")
    arch: dict = doc({}, "Inline T5Config arguments for a tiny random-init encoder when `pretrained` is unset.")
    max_length: int = doc(226, "Prompt embeddings are padded or truncated to this many tokens (CogVideoX: 226).")
    dtype: Literal["fp32", "bf16", "fp16"] = doc("fp32", "Text encoder compute dtype.")
    seed: Optional[int] = doc(None, "Init seed of a random-init (`arch`) text encoder; null: run.seed.")


@dataclass
class PrecomputeConfig:
    vae: VAEConfig = doc(help="The video VAE.", default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = doc(help="The T5 text encoder and tokenizer.", default_factory=TextEncoderConfig)
    latents: Literal["sample", "mode"] = doc("sample", "Take the VAE posterior's sample (CogVideoX) or its mode.")
    image_draws: int = doc(2, "K noisy draws of the conditioning image latent stored per clip.")
    image_log_sigma_mean: float = doc(-3.0, "Mean of log(sigma) of the first-frame pixel noise.")
    image_log_sigma_std: float = doc(0.5, "Std of log(sigma) of the first-frame pixel noise.")
    batch_size: int = doc(1, "Clips per VAE forward.")
    samples_per_shard: int = doc(0, "Unused when 0: output shards mirror input shards one to one.")


@dataclass
class ValidationConfig:
    every_steps: int = doc(0, "Sample validation videos every this many steps; 0 disables.")
    pairs: list = doc([], "List of {image: image or video path (its first frame), prompt: text} conditioning pairs.")
    num_inference_steps: int = doc(50, "Sampler steps.")
    guidance_scale: float = doc(6.0, "Classifier-free guidance scale (1.0 disables guidance).")
    num_frames: Optional[int] = doc(None, "Frames to sample (default: data.video.frames).")
    timeout_s: float = doc(600.0, "Upper bound on one validation round; ranks never wait in a collective longer.")
    weights: Literal["live", "ema"] = doc("live", "Sample with the live weights or with the EMA (needs train.ema.decay > 0).")


@dataclass
class Config:
    run: RunConfig = doc(help="Where and how the run writes.", default_factory=RunConfig)
    model: ModelConfig = doc(help="The DiT.", default_factory=ModelConfig)
    diffusion: DiffusionConfig = doc(help="Noise schedule and objective.", default_factory=DiffusionConfig)
    data: DataConfig = doc(help="Shards and loaders.", default_factory=DataConfig)
    train: TrainConfig = doc(help="Optimisation.", default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = doc(help="DeepSpeed engine.", default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = doc(help="Sequence parallelism (the DP x SP layout).", default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = doc(help="Checkpoints and resume.", default_factory=CheckpointConfig)
    kernels: KernelsConfig = doc(help="Fused kernels.", default_factory=KernelsConfig)
    precompute: PrecomputeConfig = doc(help="Offline latent precomputation.", default_factory=PrecomputeConfig)
    validation: ValidationConfig = doc(help="Validation videos.", default_factory=ValidationConfig)

    def validate(self) -> "Config":
        """Cross-field checks of the tree alone; nothing is changed. What also needs the world size
        (SP divides it, the global batch fits it) is checked by `i2v.config.resolved.resolve`."""
        _check_ranges(self)
        sp = self.parallel.sequence_parallel_size
        m = self.model
        if not (m.pretrained or m.arch or m.arch_file):
            raise ConfigError("model: set model.pretrained (a diffusers transformer directory), model.arch (inline) "
                              "or model.arch_file (a config.json)")
        _check_exclusive(self)
        ckpt = m.gradient_checkpointing
        if isinstance(ckpt, int) and not isinstance(ckpt, bool) and ckpt < 0:
            raise ConfigError(f"model.gradient_checkpointing: is {ckpt}, expected {CHECKPOINTING_VALUES}")
        if self.diffusion.t_max >= self.diffusion.num_train_timesteps:
            raise ConfigError(
                f"diffusion.t_max: is {self.diffusion.t_max}, expected < diffusion.num_train_timesteps "
                f"({self.diffusion.num_train_timesteps})"
            )
        if self.diffusion.t_min > self.diffusion.t_max:
            raise ConfigError(f"diffusion.t_min: is {self.diffusion.t_min}, expected <= diffusion.t_max ({self.diffusion.t_max})")
        zero = self.deepspeed.extra.get("zero_optimization", {})
        if sp > 1 and self.deepspeed.zero_stage == 3 and zero.get("reduce_scatter", True) is not True:
            # The ZeRO-3 gradient scale of i2v.model.parallel assumes the reduce-scatter path (it averages over SP too).
            raise ConfigError("deepspeed.extra.zero_optimization.reduce_scatter: must stay true with "
                              f"parallel.sequence_parallel_size {sp} at ZeRO-3")
        if m.compile == "blocks" and self.deepspeed.zero_stage == 3:
            raise ConfigError("model.compile: `blocks` does not work with deepspeed.zero_stage 3 (ZeRO-3 gathers each "
                              "block's parameters with module hooks that would run inside the compiled block); use "
                              "model.compile: none or deepspeed.zero_stage 0-2")
        if self.kernels.block == "triton" and self.deepspeed.zero_stage == 3:
            raise ConfigError("kernels.block: `triton` does not work with deepspeed.zero_stage 3 (the fused block reads "
                              "the adaptive norms' weights without the module calls that ZeRO-3 gathers them in); use "
                              "kernels.block: auto or torch, or deepspeed.zero_stage 0-2")
        if self.checkpoint.export_on_finish and not self.checkpoint.save_at_end:
            raise ConfigError("checkpoint.export_on_finish: exports the final checkpoint; needs checkpoint.save_at_end: true")
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer: needs deepspeed.zero_stage 1, 2 or 3 (it is 0)")
        _check_deepspeed_extra(self.deepspeed.extra)
        if m.arch and "in_channels" in m.arch:
            out = m.arch.get("out_channels") or 16  # the constructor's default
            if m.arch["in_channels"] != 2 * out:
                raise ConfigError(f"model.arch: in_channels ({m.arch['in_channels']}) must be 2 x out_channels "
                                  f"({out}): noisy video latents concatenated with image latents")
        _check_lora_and_ema(self)
        _check_fp8(self)
        check_validation(self)
        return self


# One-of groups: pairs of keys that name the same component two ways, so at most one of a pair may be
# set. The model's pretrained and arch_file go together (the architecture the weights must have).
# `load_config` lets a command-line member replace the file's other one (see the module docstring).
_EXCLUSIVE = {
    "model": (("arch", "pretrained"), ("arch", "arch_file")),
    "precompute.vae": (("pretrained", "arch"),),
    "precompute.text_encoder": (("pretrained", "arch"),),
}
# The override that unsets a member of a group.
_UNSET = {"pretrained": "null", "arch_file": "null", "arch": "{}"}


def _is_set(value: Any) -> bool:
    return value not in (None, "", {})


def _keep_either(section: str, a: str, b: str, verb: str) -> str:
    return f"to keep {a}, {verb} {section}.{b}={_UNSET[b]}; to keep {b}, {verb} {section}.{a}={_UNSET[a]}"


def _check_exclusive(cfg: Config) -> None:
    """A config built in code (from_dict, a resolved config.yaml) gets the same one-of check as a file."""
    for section, pairs in _EXCLUSIVE.items():
        node = get_dotted(cfg, section)
        for a, b in pairs:
            if _is_set(getattr(node, a)) and _is_set(getattr(node, b)):
                raise ConfigError(f"{section}.{a}: set only one of {section}.{a} and {section}.{b}; "
                                  + _keep_either(section, a, b, "set"))


def _check_fp8(cfg: Config) -> None:
    fp8, lora, ds = cfg.model.fp8, cfg.model.lora, cfg.deepspeed
    if fp8.compute != "none":
        if lora.rank > 0:
            raise ConfigError(f"model.fp8.compute: is {fp8.compute}, but model.lora trains adapters on a frozen base; "
                              "float8 matmuls are for full training. For LoRA, store the base in float8 with "
                              "model.fp8.base: e4m3 (and model.fp8.compute: none)")
        if ds.precision == "fp16":
            raise ConfigError(f"model.fp8.compute: is {fp8.compute}, with deepspeed.precision fp16; float8 training "
                              "runs in bf16 or fp32: set deepspeed.precision to bf16")
        if ds.zero_stage == 3:
            raise ConfigError(f"model.fp8.compute: is {fp8.compute}, with deepspeed.zero_stage 3, whose parameter "
                              "gathering float8 layers are not built for; use deepspeed.zero_stage 0-2")
    if fp8.base != "none":
        if lora.rank == 0:
            raise ConfigError(f"model.fp8.base: is {fp8.base}, but model.lora.rank is 0: it stores the frozen base of "
                              "a LoRA run. For full training, see model.fp8.compute")
        if ds.zero_stage == 3:
            raise ConfigError(f"model.fp8.base: is {fp8.base}, with deepspeed.zero_stage 3, which already partitions "
                              "the frozen base across ranks; use deepspeed.zero_stage 0-2")


def _check_lora_and_ema(cfg: Config) -> None:
    lora, ema, ds = cfg.model.lora, cfg.train.ema, cfg.deepspeed
    if lora.rank == 0 and lora.extra_trainable:
        raise ConfigError("model.lora.extra_trainable: set, but model.lora.rank is 0 (a full fine-tune trains every module)")
    if lora.rank > 0:
        if not lora.target_modules:
            raise ConfigError("model.lora.target_modules: empty; name the layers that get adapters, e.g. [to_q, to_k, to_v, to_out.0]")
        if lora.alpha is not None and lora.alpha <= 0:
            raise ConfigError(f"model.lora.alpha: is {lora.alpha}, expected > 0 (or null for alpha = rank)")
        if lora.init == "orthogonal" and lora.rank % 2:
            raise ConfigError(f"model.lora.init: orthogonal needs an even model.lora.rank (it is {lora.rank})")
        if cfg.model.dtype != ds.precision:
            # DeepSpeed casts every parameter, the frozen base included, to its precision: say so instead.
            raise ConfigError(
                f"model.dtype: is {cfg.model.dtype}, but deepspeed.precision is {ds.precision}; with model.lora the "
                "frozen base is held in the engine's dtype (DeepSpeed casts every parameter to it), so set both to "
                "the same value (the adapters' master weights are fp32 either way)"
            )
    if cfg.validation.weights == "ema" and ema.decay == 0:
        raise ConfigError("validation.weights: is ema, but the run keeps no EMA; set train.ema.decay (e.g. 0.999)")
    if ema.decay > 0 and ds.zero_stage == 0 and ds.precision != "fp32":
        raise ConfigError(
            f"train.ema.decay: the EMA averages DeepSpeed's fp32 master weights, which ZeRO-0 under "
            f"deepspeed.precision={ds.precision} does not expose; use deepspeed.zero_stage 1, 2 or 3"
        )


# deepspeed.extra: top-level keys DeepSpeed understands that are safe to pass through.
PASSTHROUGH_KEYS = {
    "zero_optimization", "bf16", "fp16", "activation_checkpointing", "flops_profiler", "comms_logger",
    "wall_clock_breakdown", "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "steps_per_print", "dump_state", "memory_breakdown", "data_types", "checkpoint",
    "aio", "compile", "seq_parallel_communication_data_type", "zero_force_ds_cpu_optimizer",
    "zero_allow_untested_optimizer", "graph_harvesting", "use_data_before_expert_parallelism", "timers",
}
# DeepSpeed keys owned by the run config: dotted path -> the config key to set instead.
OWNED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr / train.betas / train.weight_decay",
    "scheduler": "train.lr_schedule / train.warmup_steps",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
}


def _check_deepspeed_extra(extra: dict) -> None:
    for key, value in extra.items():
        if key in OWNED:
            raise ConfigError(f"deepspeed.extra.{key}: set by the run config; use {OWNED[key]} instead")
        if key not in PASSTHROUGH_KEYS:
            close = difflib.get_close_matches(key, sorted(PASSTHROUGH_KEYS), n=1)
            hint = f" Did you mean 'deepspeed.extra.{close[0]}'?" if close else ""
            raise ConfigError(f"deepspeed.extra.{key}: not a DeepSpeed key this trainer passes through.{hint}")
        for sub in value if isinstance(value, dict) else ():
            if f"{key}.{sub}" in OWNED:
                raise ConfigError(f"deepspeed.extra.{key}.{sub}: set by the run config; use {OWNED[f'{key}.{sub}']} "
                                  "instead")


# AutoencoderKLCogVideoX's defaults (CogVideoX's VAE), for a VAE config that leaves them out.
_VAE_BLOCKS = (128, 256, 256, 512)
_VAE_TEMPORAL = 4


@dataclass(frozen=True)
class VAECompression:
    spatial: int
    temporal: int
    source: str  # where the factors were read, for a reader of the plan or an error


def compression_of(conf) -> tuple[int, int]:
    """(spatial, temporal) compression of an AutoencoderKLCogVideoX config (a dict or a diffusers config): it
    halves height and width once per down block after the first, and compresses time by
    `temporal_compression_ratio`."""
    blocks = conf.get("block_out_channels") or _VAE_BLOCKS
    return 2 ** (len(blocks) - 1), int(conf.get("temporal_compression_ratio") or _VAE_TEMPORAL)


def vae_compression(vae: VAEConfig) -> VAECompression | None:
    """The compression of the VAE that `precompute.vae` names, from its inline arch or the pretrained
    directory's config.json (never its weights). None when it names none (training takes the latents'
    VAE, see i2v.data.lineage) or the file cannot be read (building the VAE reports that)."""
    if vae.arch:
        conf, source = vae.arch, "precompute.vae.arch"
    elif vae.pretrained:
        source = os.path.join(vae.pretrained, "config.json")
        try:
            with open(source) as f:
                conf = json.load(f)
        except (OSError, ValueError):
            return None
    else:
        return None
    return VAECompression(*compression_of(conf), source)


def check_validation(cfg: Config, training: bool = False) -> None:
    """The validation pairs' form and a clip geometry the VAE can sample, when validation is on. Part of
    `Config.validate`; the training launcher runs it again with `training` once the latents' VAE is adopted
    (a config that names no VAE takes it from the latent manifest). `training` also requires pairs: the
    shipped model configs turn validation on and leave the pairs to the user, and the planner, sampler
    and exporter load them as they are."""
    v, video = cfg.validation, cfg.data.video
    if v.every_steps == 0:
        return
    if training and not v.pairs:
        raise ConfigError(
            f"validation.pairs: empty, but validation.every_steps is {v.every_steps}; "
            "give a list of {image: PNG or video path, prompt: text} or set validation.every_steps=0"
        )
    for i, p in enumerate(v.pairs):
        key = f"validation.pairs[{i}]"
        if not isinstance(p, dict) or set(p) != {"image", "prompt"}:
            raise ConfigError(f"{key}: expected a mapping with exactly the keys image and prompt, got {p!r}")
        if not isinstance(p["prompt"], str):
            raise ConfigError(f"{key}.prompt: expected text, got {p['prompt']!r}")
    known = vae_compression(cfg.precompute.vae)
    spatial, temporal = (known.spatial, known.temporal) if known else (None, _VAE_TEMPORAL)
    frames = v.num_frames or video.frames
    if (frames - 1) % temporal:
        source = "" if v.num_frames else " (data.video.frames; validation.num_frames is unset)"
        raise ConfigError(f"validation.num_frames: is {frames}{source}; the VAE compresses time {temporal}x, so "
                          f"it needs {temporal}k + 1 frames (e.g. {temporal * 2 + 1}, {temporal * 12 + 1})")
    # The latents are patchified 2 x 2 by the DiT.
    if spatial is not None and (video.height % (spatial * 2) or video.width % (spatial * 2)):
        raise ConfigError(
            f"data.video.height/width: {video.height}x{video.width} must be multiples of {spatial * 2} "
            "(VAE compression x patch size) to sample validation videos"
        )


# Ranges of numeric fields: dotted key -> (low, high), inclusive; None is unbounded.
_RANGES = {
    "model.memory_headroom_gb": (0.0, None),
    "train.max_steps": (1, None),
    "run.lock_timeout_s": (1.0, None),
    "train.micro_batch_size": (1, None),
    "train.grad_accum_steps": (1, None),
    "train.log_every": (1, None),
    "train.lr": (0.0, None),
    "train.warmup_steps": (0, None),
    "train.grad_clip": (0.0, None),
    "train.max_consecutive_skips": (1, None),
    "train.min_lr_ratio": (0.0, 1.0),
    "train.ema.decay": (0.0, 1.0),
    "train.ema.update_every": (1, None),
    "train.ema.start_step": (0, None),
    "model.lora.rank": (0, None),
    "model.lora.dropout": (0.0, 1.0),
    "train.peak_tflops": (1e-6, None),
    "deepspeed.zero_stage": (0, 3),
    "parallel.sequence_parallel_size": (1, None),
    "diffusion.num_train_timesteps": (2, None),
    "diffusion.t_min": (0, None),
    "diffusion.snr_shift_scale": (1e-6, None),
    "diffusion.text_dropout": (0.0, 1.0),
    "diffusion.image_dropout": (0.0, 1.0),
    "data.max_bad_fraction": (0.0, 1.0),
    "data.num_workers": (0, None),
    "data.shuffle_buffer": (0, None),
    "data.video.frames": (1, None),
    "data.video.height": (1, None),
    "data.video.width": (1, None),
    "data.video.stride": (1, None),
    "data.video.max_upscale": (1e-6, None),
    "data.remote.retries": (0, None),
    "data.remote.timeout_s": (1e-3, None),
    "data.remote.backoff_s": (0.0, None),
    "checkpoint.every_steps": (0, None),
    "checkpoint.keep_last": (1, None),
    "precompute.image_draws": (1, None),
    "precompute.batch_size": (1, None),
    "precompute.image_log_sigma_std": (0.0, None),
    "validation.every_steps": (0, None),
    "validation.num_inference_steps": (1, None),
    "validation.num_frames": (1, None),
    # Ranks meet in a collective after validation: stay well inside the 1800 s process-group timeout.
    "validation.timeout_s": (0.0, 1500.0),
}


def _check_ranges(cfg: Config) -> None:
    for key, (low, high) in _RANGES.items():
        value = get_dotted(cfg, key)
        if value is None:  # an optional field left unset
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{key}: is {value!r}, expected a value {bound}")

def get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def check_sequence_parallel(sp_size: int, world_size: int | None = None, heads: int | None = None) -> None:
    """SP must divide the world size and the number of attention heads."""
    if world_size is not None and world_size % sp_size:
        raise ConfigError(f"parallel.sequence_parallel_size: is {sp_size}, which does not divide the world size "
                          f"{world_size}; launch a multiple of {sp_size} ranks or change it")
    if heads is not None and heads % sp_size:
        raise ConfigError(f"parallel.sequence_parallel_size: is {sp_size}, which does not divide the model's "
                          f"{heads} attention heads; each rank attends over heads / sequence_parallel_size heads")


def planned_vae(cfg: Config) -> VAECompression:
    """The configured VAE's compression (`vae_compression`); CogVideoX's VAE (8x in space, 4x
    in time) where the config names none, or names a pretrained directory that is not here yet (planning
    before the download), which the source says."""
    v = cfg.precompute.vae
    known = vae_compression(v)
    if known is not None:
        return known
    missing = f"{os.path.join(v.pretrained, 'config.json')} not found" if v.pretrained else "no precompute.vae"
    return VAECompression(*compression_of({}), f"CogVideoX's VAE: {missing}")


def latent_shape(cfg: Config, vae: VAECompression | None = None) -> tuple:
    """Latent (frames, height, width) of the clip geometry with the most tokens, through the configured VAE."""
    v, vae = cfg.data.video, vae or planned_vae(cfg)
    clips = [(v.frames, v.height, v.width)] + [(f, h, w) for h, w, f in v.buckets]
    frames, height, width = max(clips, key=lambda c: c[0] * c[1] * c[2])
    return (frames - 1) // vae.temporal + 1, height // vae.spatial, width // vae.spatial
