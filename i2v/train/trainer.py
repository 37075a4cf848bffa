"""The training loop: DeepSpeed engine, latent batches, fused noise injection, v-MSE.

One optimizer step:
  1. for each micro-batch: draw t and CFG dropout from a counter-keyed generator, inject noise,
     predict v, compute the loss; a micro-batch whose loss is not finite on some rank is dropped
     everywhere (nothing of it reaches parameters or optimizer state), counted and replaced
     (i2v.train.nan_guard, which reads nothing on the host in a steady-state step);
  2. DeepSpeed reduces gradients, clips and steps; the LR schedule advances;
  3. rank 0 logs (one host read); a checkpoint is committed every `checkpoint.every_steps`; a preemption
     signal (SIGTERM, SIGUSR1) or Ctrl-C (SIGINT) on any rank is agreed on by all ranks at the next step
     boundary (i2v.train.stop_signal), which commit a checkpoint and exit with 143, or 130 for Ctrl-C. A
     second Ctrl-C exits at once (the half-written tmp-step-N is removed at the next start).

Rank 0 holds the output folder's lock (i2v.train.run_lock) for the life of the run, and every checkpoint
records the VAE and text encoder the run trained with (i2v.data.lineage).

All training randomness (timesteps, dropout, noise) is a function of (seed, global micro-batch index),
not of global RNG state or the rank, so a resumed run reproduces an uninterrupted one step for step,
at the same world size or, resharded (i2v.checkpoint.reshard) with train.global_batch_size fixed, at another.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from i2v.data import lineage
from i2v.model.adapters import base_identity, check_resume, lora_enabled, trainable_parameters, with_lora
from i2v.checkpoint.checkpointer import Checkpointer, check_engine_layout
from i2v.checkpoint.commit import saved_client_state
from i2v.config import Config, dump_yaml, resolve, to_dict
from i2v.data.latent_order import resolve_order
from i2v.data.latents import LatentDataset, load_empty_prompt, make_loader
from i2v.data.shards import expand_shards
from i2v.core.distributed import DistEnv, all_ranks_agree
from i2v.model.compile import apply_compile
from i2v.model.ema import ShardedEMA
from i2v.model.fp8 import apply_fp8, switch_note
from i2v.core.errors import I2VError
from i2v.model.fused_block import apply_block_backend
from i2v.model.transformer import build_transformer, set_attention
from i2v.train.attention_auto import auto_attention
from i2v.kernels.backends import resolve_backend
from i2v.train.nan_guard import StepRunner
from i2v.train.objective import Objective
from i2v.train.optim import build_engine
from i2v.model.parallel import build_layout
from i2v.train.run_lock import RunLock
from i2v.train.stop_signal import StopAgreement
from i2v.train.telemetry import KeyLog, StepLogger
from i2v.sample.validation import load_pairs

PREEMPTED_EXIT = 143  # SIGTERM / SIGUSR1: the scheduler's preemption
INTERRUPTED_EXIT = 130  # SIGINT: Ctrl-C
EXIT_CODES = {signal.SIGINT: INTERRUPTED_EXIT, signal.SIGTERM: PREEMPTED_EXIT, signal.SIGUSR1: PREEMPTED_EXIT}


class TooManySkips(I2VError):
    exit_code = 3


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, checkpointing: tuple = (None, None)):
        """`checkpointing`: (setting, line) of `model.gradient_checkpointing: auto` resolved at start (launcher/train.py)."""
        self.cfg, self.env = cfg, env
        self.resolved = resolve(cfg, env.world_size)  # the accumulation at this world size
        self.out = cfg.run.output_dir
        # Inputs every rank must see fail here, before minutes of model and engine setup, and on all
        # ranks together: a rank stopping alone would leave the others waiting in a collective.
        self.lock = None
        with all_ranks_agree(env, "input checks"):
            self.shard_urls = expand_shards(cfg.data.latent_shards, "data.latent_shards", cfg.data.allow_pipe,
                                            remote_cfg=cfg.data.remote)
            pairs = load_pairs(cfg) if cfg.validation.every_steps > 0 else None
            if env.is_main:  # one run per output folder, before anything is written into it
                self.lock = RunLock.acquire(self.out, cfg.run.lock_timeout_s, self.log)
        # What the checkpoints record (rank 0 writes the client state); checked against the manifest by the launcher.
        self.encoders = lineage.recorded_identities(cfg) if env.is_main else {}
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
            # Not its debugging fill of every new tensor with NaN: DeepSpeed allocates reduction
            # buckets of 5e8 elements, and filling them cost seconds per step.
            torch.utils.deterministic.fill_uninitialized_memory = False
        if env.is_main:
            os.makedirs(self.out, exist_ok=True)
            dump_yaml(cfg, os.path.join(self.out, "config.yaml"))

        ckpt, ckpt_line = checkpointing
        model = with_lora(build_transformer(cfg.model, seed=cfg.run.seed, checkpointing=ckpt), cfg.model, seed=cfg.run.seed)
        apply_fp8(model, cfg.model, env.device, self.log)  # float8 matmuls, or a float8-stored LoRA base
        attention, sdpa = auto_attention(cfg, env, model.config, self.log)  # auto on CUDA: timed once (rank 0)
        self.attention = set_attention(model, attention, device=env.device, sdpa_backend=sdpa)
        self.block = apply_block_backend(model, cfg.kernels.block, device=env.device,
                                         zero_stage=cfg.deepspeed.zero_stage)
        self.layout = build_layout(env, cfg, model)  # DP x SP; everything data-related is keyed by the DP rank
        apply_compile(model, cfg.model.compile, cfg.model.compile_backend)  # last: LoRA, the processors and the SP forward are in place
        noise_backend = resolve_backend(cfg.kernels.noise, env.device, "kernels.noise")
        # Counted before the engine: ZeRO-3 leaves empty placeholders in the module.
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in trainable_parameters(model))
        self.engine = build_engine(cfg, model, self.resolved, self.layout.mpu)
        self.steps, self.stop = StepRunner(self), StopAgreement()  # no host sync in a steady-state step
        self.ema = ShardedEMA(self.engine, cfg.train.ema) if cfg.train.ema.decay > 0 else None
        # A LoRA checkpoint holds no base weights, so it records which base it was trained on.
        self.base = base_identity(cfg) if lora_enabled(cfg.model) else None

        # Counters that a checkpoint carries.
        self.step = 0  # optimizer steps taken
        self.position = 0  # global micro-batches drawn by all ranks together (one per DP rank per round)
        self.skipped = 0  # micro-batches dropped for a non-finite loss
        self.bad_by_worker: dict = {}

        self.log(f"{n_params / 1e6:.2f}M parameters ({n_train / 1e6:.3f}M trainable) | "
                 f"ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision} | {env.world_size} rank(s) "
                 f"({self.layout.describe()}) on {env.device.type} | attention: {self.attention} | "
                 f"block: {self.block} | noise: {noise_backend}")
        if self.ema is not None:
            self.log(f"EMA of the trainable weights: {self.ema.local_bytes / 2**20:.2f} MiB fp32 on this rank")
        self.checkpointer = Checkpointer(os.path.join(self.out, "checkpoints"), cfg.checkpoint.keep_last, env,
                                         trainable_only=lora_enabled(cfg.model))
        if cfg.checkpoint.resume:
            self._resume()

        c = model.config
        expect = {"channels": c.out_channels, "text_dim": c.text_embed_dim, "text_len": c.max_text_seq_length}
        self.dataset = LatentDataset(
            cfg.data.latent_shards, rank=self.layout.dp_rank, world_size=self.layout.dp_size,
            batch_size=cfg.train.micro_batch_size,
            seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled,
            max_bad_fraction=cfg.data.max_bad_fraction, min_samples_for_bad_check=cfg.data.min_samples_for_bad_check,
            expect=expect, start_batch=self.position // self.layout.dp_size, start_global=self.position,
            num_workers=cfg.data.num_workers, allow_pipe=cfg.data.allow_pipe, order=cfg.data.order,
            remote_cfg=cfg.data.remote,
        )
        empty = load_empty_prompt(cfg.data.latent_shards, cfg.data.remote)
        self.objective = Objective(self.cfg, env.device, empty.to(env.device) if empty is not None else None,
                                   noise_backend, self.layout)
        self.telemetry = StepLogger(cfg, env, self.engine.module.config, checkpointing=ckpt)
        self.writer = self.telemetry.writer  # rank 0 only; None elsewhere
        if ckpt_line:
            self.log(ckpt_line)
        if ckpt_line and self.writer is not None:
            self.writer.add_text("run/gradient_checkpointing", ckpt_line, self.step)
        self.keys = KeyLog(self.out, env.rank) if cfg.data.log_keys else None
        self._preempt = 0  # the first stopping signal received, 0 for none
        self.validator = None
        if pairs is not None:
            from i2v.sample.validation import Validator

            self.validator = Validator(cfg, env, pairs, self.ema)

    # -- resume -------------------------------------------------------------------

    def _resume(self) -> None:
        removed = self.checkpointer.clean_orphans()
        tag, problems = self.checkpointer.choose(self.cfg.checkpoint.fallback_on_corrupt)
        for p in problems:
            self.log(f"warning: skipping corrupt checkpoint: {p}")
        if removed:
            self.log(f"removed unfinished checkpoint directories: {', '.join(removed)}")
        if tag is None:
            return
        path = os.path.join(self.checkpointer.root, tag)
        recorded = saved_client_state(path)
        check_engine_layout(self.cfg, recorded, path)
        check_resume(self.cfg, recorded, path, self.base)
        if (note := switch_note(recorded.get("config"), self.cfg.model)) is not None:
            self.log(note)
        state = self.checkpointer.load(self.engine, tag, self._reshard_blocker(), self.ema)
        self.step, self.position, self.skipped = state["step"], state["position"], state["skipped"]
        self.log(f"resumed from {tag}: step {self.step}, {self.position} global micro-batches consumed")

    def _reshard_blocker(self) -> str | None:
        """What, if anything, stops a resume at another world size (ZeRO state is resharded: i2v.checkpoint.reshard)."""
        if resolve_order(self.cfg.data.order, self.shard_urls) == "stream":
            return "the per-rank data streams (data.order=stream)"
        return None

    def _client_state(self) -> dict:
        # `param_groups`: each group's hyperparameters, set again after a resharded load (i2v.checkpoint.reshard);
        # `universal_checkpoint_info`: DeepSpeed's universal converter requires the entry, empty is enough.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        return {"step": self.step, "position": self.position, "skipped": self.skipped,
                "samples_seen": self.position * self.cfg.train.micro_batch_size,
                "world_size": self.env.world_size, "config": to_dict(self.cfg), "base": self.base,
                "param_groups": groups, "universal_checkpoint_info": {}, "encoders": self.encoders}

    def save(self) -> str:
        if self.lock is not None:
            self.lock.check()  # never commit into a folder another run has taken over
        return self.checkpointer.save(self.engine, self.step, self._client_state(), self.ema)

    def close(self) -> None:
        """Release the output folder (rank 0's lock)."""
        if self.lock is not None:
            self.lock.release()

    # -- the loop -----------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        handlers = {s: signal.signal(s, self._on_signal) for s in EXIT_CODES}
        try:
            self._loop()
            if cfg.checkpoint.export_on_finish:
                self._export()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.telemetry.close()

    def _export(self) -> None:
        from i2v.core.distributed import barrier
        from i2v.sample.export import export_pipeline

        if self.env.is_main:
            tag = os.path.join(self.checkpointer.root, self.checkpointer.committed_tags()[0])
            out = export_pipeline(self.cfg, tag, os.path.join(self.out, "export"))
            self.log(f"exported diffusers pipeline to {out}")
        barrier()

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._preempt == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if not self._preempt:  # the first signal decides the exit code; a launcher's SIGTERM may follow
            self._preempt = signum

    def _loop(self) -> None:
        cfg = self.cfg
        data = iter(make_loader(self.dataset, cfg.data.num_workers))
        self.engine.train()
        self.telemetry.start(self.step)
        first = True
        while self.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            # The micro-batches and the optimizer step, with the NaN guard (i2v.train.nan_guard).
            losses, wait = self.steps.run(data, first)
            first = False
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.step)
            self.telemetry.record_step(time.perf_counter() - t0, wait)

            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                bad = sum(sum(b["by_reason"].values()) for b in self.bad_by_worker.values())
                retries = sum(b.get("remote_retries", 0) for b in self.bad_by_worker.values())
                self.telemetry.log(self.step, torch.stack(losses).mean(), self.engine,
                                   {"skipped": self.skipped, "bad_samples": bad, "position": self.position,
                                    "remote_retries": retries})
            every = cfg.checkpoint.every_steps
            if (every and self.step % every == 0) or (self.step == cfg.train.max_steps and cfg.checkpoint.save_at_end):
                self.save()
            if self.validator is not None and self.step % cfg.validation.every_steps == 0:
                self.validator.run(self.step, self.engine, self.writer)
            # Every rank learns whether any rank was signalled, one step later (i2v.train.stop_signal); ranks
            # told differently agree on the larger code.
            code = self.stop.poll(EXIT_CODES.get(self._preempt, 0), last=self.step == cfg.train.max_steps)
            if code:
                if not (every and self.step % every == 0) and self.step != cfg.train.max_steps:
                    self.save()
                what = "interrupted" if code == INTERRUPTED_EXIT else "preempted"
                self.log(f"{what}: committed checkpoint at step {self.step}; exiting with {code}")
                raise SystemExit(code)

    def _count_skip(self, in_a_row: int) -> None:
        cfg = self.cfg
        self.skipped += 1
        self.log(f"step {self.step}: non-finite loss (or no usable sample) on some rank; micro-batch "
                 f"skipped ({in_a_row} in a row, {self.skipped} in total)")
        if self.writer:
            self.writer.add_scalar("train/skipped_micro_batches", self.skipped, self.step)
        if in_a_row >= cfg.train.max_consecutive_skips:
            raise TooManySkips(
                f"{in_a_row} consecutive micro-batches had a non-finite loss "
                f"(train.max_consecutive_skips={cfg.train.max_consecutive_skips}); stopping at step {self.step}"
            )

    def log(self, msg: str) -> None:
        if self.env.is_main:
            print(f"[i2v] {msg}", flush=True)

