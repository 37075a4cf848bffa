"""Validation videos during training: sample I2V clips from held-out (image, prompt) pairs.

Every `validation.every_steps` steps the trainer calls `Validator.run` on all ranks. Pair i is
sampled by rank i % world with `i2v.sample.sampling.sample_video` (the scheduler, guidance, image
latents and RoPE of diffusers' `CogVideoXImageToVideoPipeline`), written to
`run.output_dir/samples/step-NNNNNNNN/pair-I.mp4` by the rank that made it, gathered to rank 0
and logged to TensorBoard as an animated GIF under `validation/pair-I`.

Collectives, and why no rank can be left waiting in one:
- ZeRO-3 partitions the weights. Every rank enters the same sequence of `GatheredParameters`
  (one per top-level module or transformer block, in the same order everywhere), copies the full weights into a
  private replica (no DeepSpeed hooks) and releases them; sampling then
  runs on the replica without any collective, so ranks may do different numbers of pairs
  (rank r gets ceil((P - r) / world)). ZeRO 0-2 ranks hold full weights and sample in place.
  The replica costs one extra copy of the weights per rank for the duration of validation.
- `validation.weights: ema` then swaps the EMA of the trainable weights into the model it samples
  (the replica at ZeRO-3; the engine's module at ZeRO 0-2, whose live values come back bit for bit
  afterwards): one all-reduce per trainable parameter, the same sequence on every rank, before sampling.
- Sampling is bounded by `validation.timeout_s`: a forward pre-hook on the transformer and the
  VAE decoder aborts a pair once the deadline has passed (later pairs abort at their first
  forward), so the slowest rank reaches the next collective at most one transformer forward
  (or one decoder call) after the deadline. Keep `timeout_s` well below the process group's timeout (30 min).
- A pair that fails (e.g. out of memory) is reported with its rank and does not stop the
  others; training continues.
- Then the same fixed sequence on every rank: two gathers to rank 0 (fixed-shape uint8 videos,
  one status per slot; only tensors travel, nothing is pickled) and a closing barrier after
  rank 0 has written.

The prompts are encoded once (the T5 is freed afterwards) and the VAE is built once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time

import torch
import torch.distributed as dist

from i2v.config import Config, check_validation
from i2v.core.distributed import DistEnv, barrier
from i2v.core.errors import ConfigError

OK, TIMED_OUT, FAILED, EMPTY = 1, 2, 3, 0
STATUS = {OK: "ok", TIMED_OUT: "skipped: validation.timeout_s reached", FAILED: "failed", EMPTY: "empty"}


class _OutOfTime(Exception):
    pass


def sample_dir(output_dir: str, step: int) -> str:
    from i2v.checkpoint.commit import tag_for

    return os.path.join(output_dir, "samples", tag_for(step))


def load_pairs(cfg: Config) -> list[dict]:
    """The configured pairs with their images: each a readable image or video file (their form is
    checked with the config, `i2v.config.check_validation`)."""
    from i2v.data.frames import first_frame_pil

    check_validation(cfg, training=True)
    out = []
    for i, p in enumerate(cfg.validation.pairs):
        key = f"validation.pairs[{i}]"
        path = str(p["image"])
        if not os.path.isfile(path):
            raise ConfigError(f"{key}.image: file not found: {path}")
        image = first_frame_pil(path, f"{key}.image")  # an image, or a video's first frame
        out.append({"index": i, "image": image, "prompt": p["prompt"]})
    return out


class Validator:
    def __init__(self, cfg: Config, env: DistEnv, pairs: list[dict] | None = None, ema=None):
        """`pairs` as `load_pairs(cfg)` returns them (loaded here when not given); `ema`: the run's
        ShardedEMA, sampled with under `validation.weights: ema`."""
        from i2v.model import encoders
        from i2v.sample.setup import build_parts

        self.cfg, self.env, self.ema = cfg, env, ema
        v = cfg.validation
        self.num_frames = v.num_frames or cfg.data.video.frames  # a length and size the VAE takes: Config.validate
        self.height, self.width = cfg.data.video.height, cfg.data.video.width
        pairs = load_pairs(cfg) if pairs is None else pairs
        self.num_pairs = len(pairs)
        self.prompts = [p["prompt"] for p in pairs]
        self._described = False
        self.slots = -(-self.num_pairs // env.world_size)  # pairs per rank, rounded up: equal on every rank
        self.mine = [p for p in pairs if p["index"] % env.world_size == env.rank]
        self.fps = float(cfg.data.video.fps or 8)

        parts = build_parts(cfg, "ddim", env.device)  # the transformer is the engine's
        self.vae, self.scheduler, self.ofs = parts.vae, parts.scheduler, parts.ofs
        spatial = encoders.spatial_compression(self.vae)
        # Encoded once: the text encoder is not needed again and is dropped with this scope.
        prompts = [p["prompt"] for p in self.mine]
        embeds = parts.text(prompts + [""]).cpu()
        self.negative = embeds[-1]
        from diffusers.video_processor import VideoProcessor

        processor = VideoProcessor(vae_scale_factor=spatial)
        for p, e in zip(self.mine, embeds[:-1]):
            p["embeds"] = e
            # The pipeline's own preprocessing: resize to height x width, scale to [-1, 1].
            p["pixels"] = processor.preprocess(p.pop("image"), height=self.height, width=self.width)[0].float()
        del parts
        if env.device.type == "cuda":
            torch.cuda.empty_cache()  # return the encoder's memory before training resumes

    # -- the model to sample with ---------------------------------------------------

    def _replica(self, engine):
        """A hook-free full copy of a ZeRO-3 module (collective: every rank calls it once)."""
        import deepspeed

        from i2v.model.adapters import with_lora
        from i2v.model.transformer import set_attention

        src = engine.module
        params = dict(src.named_parameters())
        with torch.device("meta"):
            replica = with_lora(type(src).from_config(src.config), self.cfg.model)  # the same names as src
        for n, p in replica.named_parameters():
            p.data = p.data.to(params[n].dtype)  # still on meta: free
        replica = replica.to_empty(device=self.env.device)
        # Gathered one block at a time, so the peak is the replica plus one block, not two models.
        # Every rank walks the same names in the same order, so the gathers pair up across ranks.
        names = [n for n, _ in replica.named_parameters()]
        for _, group in itertools.groupby(names, key=_block_of):
            group = list(group)
            with deepspeed.zero.GatheredParameters([params[n] for n in group], modifier_rank=None):
                with torch.no_grad():
                    for n in group:
                        target = replica.get_parameter(n)
                        target.copy_(params[n].data.view(target.shape))
        buffers = dict(src.named_buffers())  # ZeRO-3 partitions parameters only
        with torch.no_grad():
            for name, b in replica.named_buffers():
                b.copy_(buffers[name])
        set_attention(replica, self.cfg.kernels.attention)
        return replica.requires_grad_(False).eval()

    # -- one round ------------------------------------------------------------------

    def run(self, step: int, engine, writer) -> None:
        from i2v.sample.sampling import sample_video, save_video
        from i2v.sample.tb_video import to_uint8_frames

        env, v = self.env, self.cfg.validation
        start = time.monotonic()
        deadline = start + v.timeout_s
        module = engine.module
        was_training = module.training
        zero3 = engine.zero_optimization_stage() == 3
        model = self._replica(engine) if zero3 else module
        model.eval()
        weights = contextlib.ExitStack()
        if v.weights == "ema":  # a collective (fragments summed across ranks): every rank swaps here
            weights.enter_context(self.ema.swapped_into(model, restore=not zero3))

        def check_deadline(*_):
            if time.monotonic() > deadline:
                raise _OutOfTime()

        hooks = [model.register_forward_pre_hook(check_deadline),
                 self.vae.decoder.register_forward_pre_hook(check_deadline)]
        videos = torch.zeros(self.slots, self.num_frames, self.height, self.width, 3, dtype=torch.uint8)
        status = torch.full((self.slots,), EMPTY, dtype=torch.int64)
        errors = {}
        out_dir = sample_dir(self.cfg.run.output_dir, step)
        rng_devices = [env.device] if env.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
                for slot, pair in enumerate(self.mine):
                    # Past the deadline the first transformer forward raises: one mechanism for all cases.
                    seed = _pair_seed(self.cfg.run.seed, pair["index"])
                    try:
                        frames = sample_video(
                            model, self.vae, self.scheduler, pair["pixels"].to(env.device), pair["embeds"],
                            self.negative, self.num_frames, v.num_inference_steps, v.guidance_scale,
                            torch.Generator().manual_seed(seed), ofs=self.ofs,
                        )
                        save_video(frames, os.path.join(out_dir, f"pair-{pair['index']}.mp4"), fps=int(self.fps))
                        videos[slot] = torch.from_numpy(to_uint8_frames(frames))
                        status[slot] = OK
                    except _OutOfTime:
                        status[slot] = TIMED_OUT
                    except Exception as e:  # noqa: BLE001 - one bad pair must not leave the other ranks waiting
                        status[slot] = FAILED
                        errors[pair["index"]] = f"{type(e).__name__}: {e}"
                        print(f"[rank {env.rank}] validation pair {pair['index']} failed at step {step}: "
                              f"{errors[pair['index']]}", file=sys.stderr, flush=True)
        finally:
            weights.close()  # the live weights are back in the engine's module
            for h in hooks:
                h.remove()
            del model
            module.train(was_training)
            if env.device.type == "cuda":
                torch.cuda.empty_cache()  # the replica and activations, before training resumes

        gathered = self._gather(videos, status)
        if env.is_main:
            self._write(step, writer, *gathered, time.monotonic() - start)
        barrier()

    def _gather(self, videos: torch.Tensor, status: torch.Tensor):
        """All ranks' slots on rank 0 ([world, slots, ...]); local only without a process group."""
        if not dist.is_initialized() or self.env.world_size == 1:
            return videos[None], status[None]
        device = self.env.device if dist.get_backend() == "nccl" else torch.device("cpu")
        v, s = videos.to(device), status.to(device)
        if self.env.is_main:
            vs = [torch.empty_like(v) for _ in range(self.env.world_size)]
            ss = [torch.empty_like(s) for _ in range(self.env.world_size)]
            dist.gather(v, vs, dst=0)
            dist.gather(s, ss, dst=0)
            return torch.stack(vs).cpu(), torch.stack(ss).cpu()
        dist.gather(v, None, dst=0)
        dist.gather(s, None, dst=0)
        return None, None

    def _write(self, step: int, writer, videos, status, seconds: float) -> None:
        from i2v.sample.tb_video import add_video

        world = self.env.world_size
        done, report = 0, []
        for i in range(self.num_pairs):
            rank, slot = i % world, i // world
            code = int(status[rank, slot])
            if code == OK:
                done += 1
                if writer is not None:
                    add_video(writer, f"validation/pair-{i}", videos[rank, slot].numpy(), step, fps=self.fps)
            else:
                report.append(f"pair {i} on rank {rank}: {STATUS.get(code, code)}")
        if writer is not None and not self._described:
            rows = "\n".join(f"| pair-{i} | {p.replace('|', '/')} |" for i, p in enumerate(self.prompts))
            writer.add_text("validation/prompts", "| video | prompt |\n|---|---|\n" + rows, step)
            self._described = True
        if writer is not None:
            writer.add_scalar("validation/seconds", seconds, step)
            writer.add_scalar("validation/completed_pairs", done, step)
            writer.flush()
        tail = f" ({'; '.join(report)})" if report else ""
        print(f"[i2v] validation at step {step}: {done}/{self.num_pairs} videos in {seconds:.1f} s "
              f"-> {sample_dir(self.cfg.run.output_dir, step)}{tail}", flush=True)


def _block_of(name: str) -> str:
    """`transformer_blocks.3.attn1.to_q.weight` -> `transformer_blocks.3`; `proj_out.bias` -> `proj_out`."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def _pair_seed(seed: int, index: int) -> int:
    """The same noise for a pair at every step, so its videos are comparable over training."""
    from i2v.core import seeding

    return seeding.seed("validation", seed, index)
