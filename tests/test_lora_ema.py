"""LoRA fine-tuning and the sharded EMA, through real 2-rank DeepSpeed runs of the tiny model.

Runs (tests/lora_runs.py): A, 2-rank ZeRO-2 LoRA + EMA 0.9 (shared with tests/test_resume.py);
B, 2-rank ZeRO-3 LoRA + EMA with warmup, start_step and update_every, validating with the EMA;
C, 2-rank ZeRO-2 full fine-tune + EMA. Each commits a checkpoint after every step, so the EMA
can be recomputed on one process from DeepSpeed's consolidation of each step's fp32 weights.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from latent_shards import make_latent_shards
from lora_runs import LORA, step_dir
from runs import ENV, TORCHRUN, losses, reference_gifs, spawn_ranks, tensorboard_events, train

from i2v.model.adapters import with_lora
from i2v.config import load_config
from i2v.plan.memory import ParamCounts, checkpoint_bytes
from i2v.model.transformer import build_transformer
from i2v.core.errors import CheckpointError, ConfigError

RUN_B = (*LORA, "deepspeed.zero_stage=3", "train.ema.decay=0.8", "train.ema.warmup=true", "train.ema.start_step=2",
         "train.ema.update_every=2", "train.max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=6",
         "validation.every_steps=3", "validation.weights=ema", "validation.num_inference_steps=2")
RUN_C = ("deepspeed.zero_stage=2", "train.micro_batch_size=2", "train.log_every=1", "train.ema.decay=0.9",
         "train.max_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=3")
STEPS = {"A": 8, "B": 6, "C": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """{name: run dir} of runs A (the session's), B and C, all three trained side by side."""
    root = tmp_path_factory.mktemp("lora_ema")
    shards = root / "latents"
    make_latent_shards(shards, shards=2, per_shard=8)
    image = root / "first.png"
    a = np.full((48, 80, 3), 40, np.uint8)
    a[10:30, 8:40] = 230
    Image.fromarray(a).save(image)
    pairs = f"validation.pairs=[{{image: '{image}', prompt: 'a bright box'}}]"
    procs = {}
    for name, over in (("B", (*RUN_B, pairs)), ("C", RUN_C)):
        cmd = [*TORCHRUN, "launcher/train.py", "--config", "configs/tiny.yaml", f"run.output_dir={root / name}",
               f"data.latent_shards={shards}", *over]
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    out = {"A": request.getfixturevalue("lora_run")["run"]}  # trained (if not yet) while B and C run
    for name, p in procs.items():
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-3000:]
        out[name] = str(root / name)
    return out


def _config(run):
    return load_config(os.path.join(run, "config.yaml"))


def _initial_trainable(cfg) -> dict:
    """The trainable weights before step 1, rebuilt from the config (seeded init, seeded adapters)."""
    model = with_lora(build_transformer(cfg.model, seed=cfg.run.seed), cfg.model, seed=cfg.run.seed)
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


def _tensor_bytes(path) -> int:
    """Bytes of the model and optimizer tensors in a checkpoint directory's files (the RNG states
    aside), each storage counted once per file."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from safetensors import safe_open

    total = 0
    files = [os.path.join(d, f) for d, _, names in os.walk(path) if os.path.basename(d) != "rng" for f in names]
    for file in files:
        if file.endswith(".pt"):
            seen = {}

            def walk(obj):
                if isinstance(obj, torch.Tensor):
                    seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
                elif isinstance(obj, dict):
                    for v in obj.values():
                        walk(v)
                elif isinstance(obj, (list, tuple)):
                    for v in obj:
                        walk(v)

            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                walk(torch.load(file, weights_only=True))
            total += sum(seen.values())
        elif file.endswith(".safetensors"):
            with safe_open(file, "pt") as f:
                total += sum(f.get_tensor(k).nbytes for k in f.keys())
    return total


# --------------------------------------------------------------------------- training


def test_lora_run_trains_the_adapters_only_and_its_checkpoints_are_under_half_a_full_runs(runs, lora_run):
    from i2v.checkpoint.reader import consolidated_state_dict

    run, full = runs["A"], runs["C"]
    cfg = _config(run)
    ls, _ = losses(run)
    assert len(ls) == 8 and all(np.isfinite(ls))
    init = _initial_trainable(cfg)
    blocks = cfg.model.arch["num_layers"]
    assert len(init) == blocks * 4 * 2 + 2  # blocks x 4 projections x (A, B), plus proj_out weight and bias
    trained = consolidated_state_dict(step_dir(run, 8))
    assert sorted(trained) == sorted(init)  # the checkpoint holds no frozen base weight
    assert all(not torch.equal(trained[k], init[k]) for k in init)  # every adapter and proj_out moved
    assert "0.17M parameters (0.005M trainable)" in lora_run["stdout"]
    saved = torch.load(os.path.join(step_dir(run, 8), "mp_rank_00_model_states.pt"), weights_only=True)
    assert sorted(saved["module"]) == sorted(init)
    assert saved["base"] == {"arch": cfg.model.arch, "seed": 0, "init_std": 0.2}
    lora_bytes, full_bytes = _dir_bytes(step_dir(run, 8)), _dir_bytes(step_dir(full, 3))
    assert lora_bytes < 0.5 * full_bytes, (lora_bytes, full_bytes)
    # The formula the memory benchmark prices real models with, against the tensors actually written.
    for path, c, lora in ((step_dir(run, 8), cfg, True), (step_dir(full, 3), _config(full), False)):
        counts = ParamCounts.of(with_lora(build_transformer(c.model, seed=c.run.seed), c.model))
        want = checkpoint_bytes(counts, c.deepspeed.zero_stage, c.deepspeed.precision, ema=True,
                                model_dtype=c.model.dtype, trainable_only=lora)
        held = _tensor_bytes(path)  # measured: 102,728 B against 102,720 (LoRA), 3,275,848 against 3,275,840
        assert abs(held - want) <= 0.01 * want, f"lora={lora}: formula {want:,} B, checkpoint tensors {held:,} B"


@pytest.mark.parametrize("name", ["A", "B", "C"])
def test_ema_equals_an_ema_of_the_consolidated_weights_after_each_step(runs, name):
    """ZeRO-2 LoRA, ZeRO-3 LoRA (warmup, start_step 2, every 2nd step) and ZeRO-2 full: the EMA the ranks
    kept of their own fragments equals, within fp32 rounding, one computed here from each step's
    consolidated fp32 weights."""
    from i2v.checkpoint.reader import consolidated_state_dict
    from i2v.model.ema import stitch

    run = runs[name]
    cfg = _config(run)
    e = cfg.train.ema
    ref, n = _initial_trainable(cfg), 0
    for step in range(1, STEPS[name] + 1):
        weights = consolidated_state_dict(step_dir(run, step))
        if step < e.start_step:
            d = 0.0
        elif (step - e.start_step) % e.update_every:
            continue
        else:
            d = min(e.decay, (1 + n) / (10 + n)) if e.warmup else e.decay
            n += 1
        ref = {k: d * v + (1 - d) * weights[k] for k, v in ref.items()}
    ema = stitch(step_dir(run, STEPS[name]))
    assert sorted(ema) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(ema[k], ref[k], rtol=1e-6, atol=1e-7)
    last = consolidated_state_dict(step_dir(run, STEPS[name]))
    assert any(not torch.allclose(ema[k], last[k], rtol=1e-3, atol=1e-5) for k in ref)  # an average, not a copy


def test_ema_shards_are_read_by_name_and_range_from_any_layout(runs, tmp_path):
    """The files are world-size-free: any element range reads back across the ranks' fragments, and a
    missing shard is an error naming the range it leaves uncovered."""
    from i2v.model.ema import EMAFiles, stitch

    ckpt = step_dir(runs["C"], 3)
    full = stitch(ckpt)
    files = EMAFiles.open(ckpt)
    split = [n for n, pieces in files.pieces.items() if len(pieces) == 2]
    assert split, "ZeRO-2 splits some parameter between the two ranks"
    name = split[0]
    (s0, e0, *_), (s1, e1, *_) = sorted(files.pieces[name])
    assert e0 == s1  # rank 0's fragment ends where rank 1's begins
    lo, hi = e0 - 3, e0 + 5  # a range another world size would own, across both files
    torch.testing.assert_close(files.read(name, lo, hi), full[name].reshape(-1)[lo:hi], rtol=0, atol=0)

    partial = tmp_path / "step"
    shutil.copytree(ckpt, partial)
    os.remove(partial / "ema" / "rank-00001.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"do not cover {name}[0:{e1}]")):
        stitch(str(partial))


# --------------------------------------------------------------------------- export


def _frames(pipe, image, prompt, negative, guidance=6.0):
    return pipe(image=image[None] * 0.5 + 0.5, prompt_embeds=prompt[None], negative_prompt_embeds=negative[None],
                height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(3), output_type="pt", return_dict=False)[0][0] * 2 - 1


@pytest.mark.parametrize("name", ["A", "B"])
def test_lora_exports_load_in_diffusers_and_generate_the_trained_models_frames(runs, name, tmp_path):
    """`--weights ema` (base pipeline + LoRA file, loaded with load_lora_weights) and `--merge-lora
    --weights ema` generate the same frames, which are i2v's sampler's on the trained model's EMA."""
    from diffusers import CogVideoXImageToVideoPipeline
    from safetensors import safe_open

    from i2v.checkpoint.reader import load_trained_transformer
    from i2v.model.encoders import build_text_encoder, build_vae
    from i2v.sample.export import export_pipeline
    from i2v.sample.sampling import sample_video
    from i2v.sample.setup import build_scheduler

    run = runs[name]
    cfg, ckpt = _config(run), step_dir(run, STEPS[name])
    lora_dir = export_pipeline(cfg, ckpt, str(tmp_path / "lora"), weights="ema")
    merged_dir = str(tmp_path / "merged")
    if name == "A":  # the launcher once, flags and all
        p = subprocess.run([sys.executable, "launcher/export.py", "--config", os.path.join(run, "config.yaml"),
                            "--checkpoint", os.path.join(run, "checkpoints"), "--out", merged_dir, "--weights", "ema",
                            "--merge-lora"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    else:
        export_pipeline(cfg, ckpt, merged_dir, weights="ema", merge_lora=True)
    assert os.path.isfile(os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))
    assert not os.path.exists(os.path.join(merged_dir, "pytorch_lora_weights.safetensors"))

    with safe_open(os.path.join(lora_dir, "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert len(keys) == cfg.model.arch["num_layers"] * 4 * 2  # blocks x 4 projections x (A, B)
        assert all(k.startswith("transformer.transformer_blocks.") for k in keys)
        assert not any("module." in k or ".default." in k for k in keys)
        assert all(f.get_tensor(k).numel() > 0 for k in keys)  # not the empty placeholders of ZeRO-3

    text = build_text_encoder(cfg)
    prompt, negative = text(["a bright box", ""])
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with_lora = CogVideoXImageToVideoPipeline.from_pretrained(lora_dir)
    with_lora.load_lora_weights(lora_dir)
    attn = with_lora.transformer.transformer_blocks[0].attn1
    assert list(attn.to_q.scaling.values()) == [2.0]  # alpha 8 / rank 4, from the file's metadata
    merged = CogVideoXImageToVideoPipeline.from_pretrained(merged_dir)
    base = CogVideoXImageToVideoPipeline.from_pretrained(lora_dir)  # the base (and trained proj_out) alone
    for pipe in (with_lora, merged, base):
        pipe.set_progress_bar_config(disable=True)
    f_lora, f_merged, f_base = (_frames(p, image, prompt, negative) for p in (with_lora, merged, base))

    model = load_trained_transformer(cfg, ckpt, weights="ema")
    ours = sample_video(model, build_vae(cfg), build_scheduler(cfg.diffusion), image, prompt, negative, num_frames=9,
                        num_inference_steps=2, guidance_scale=6.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(f_lora, f_merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_lora, ours, rtol=1e-5, atol=1e-5)
    assert (f_lora - f_base).abs().max() > 1e-3  # the adapters matter: a dropped LoRA file would fail above


def test_export_errors_name_what_is_missing(runs, tmp_path):
    from i2v.sample.export import export_pipeline

    with pytest.raises(ConfigError, match=r"--merge-lora: the run has no LoRA adapters \(model\.lora\.rank is 0\)"):
        export_pipeline(_config(runs["C"]), runs["C"] + "/checkpoints", str(tmp_path / "a"), merge_lora=True)
    no_ema = tmp_path / "step"
    shutil.copytree(step_dir(runs["C"], 3), no_ema)
    shutil.rmtree(no_ema / "ema")
    with pytest.raises(ConfigError, match=r"--weights ema: checkpoint .* holds no EMA \(train\.ema\.decay was 0\)"):
        export_pipeline(_config(runs["C"]), str(no_ema), str(tmp_path / "b"), weights="ema")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


# --------------------------------------------------------------------------- validation


def test_validation_samples_with_the_ema_at_zero3(runs):
    """Run B validated at steps 3 and 6 with `validation.weights: ema`: its TensorBoard GIF is the pair
    sampled here from the EMA stitched from that step's checkpoint, byte for byte."""
    run = runs["B"]
    events = tensorboard_events(run)
    for step in (3, 6):
        (ev,) = [e for e in events.Images("validation/pair-0") if e.step == step]
        assert ev.encoded_image_string == reference_gifs(run, step, weights="ema")[0]
    assert ev.encoded_image_string != reference_gifs(run, 6)[0]  # the live weights sample differently


# --------------------------------------------------------------------------- resume refusals


def test_resume_refuses_another_base_rank_or_layout(runs, lora_run, tmp_path):
    from i2v.model.adapters import base_identity, check_resume
    from i2v.checkpoint.commit import saved_client_state

    ckpt = step_dir(runs["A"], 8)
    recorded = saved_client_state(ckpt)
    config = os.path.join(runs["A"], "config.yaml")

    def check(*over):
        cfg = load_config(config, list(over))
        check_resume(cfg, recorded, ckpt, base_identity(cfg) if cfg.model.lora.rank else None)

    check()  # the run's own config resumes
    with pytest.raises(ConfigError, match=r"model\.lora\.rank: is 0, but checkpoint .* holds LoRA adapters \(rank 4\)"):
        check("model.lora.rank=0", "model.lora.extra_trainable=[]")
    with pytest.raises(ConfigError, match=r"model\.lora\.alpha: checkpoint has 8\.0, config has 16\.0"):
        check("model.lora.alpha=16")
    with pytest.raises(CheckpointError, match=r"trained on model\.arch .* run\.seed 0 .* this run's base is model\.arch "
                                              r".* run\.seed 5"):
        check("run.seed=5")
    full = step_dir(runs["C"], 3)
    cfg = load_config(config)
    with pytest.raises(ConfigError, match=r"model\.lora\.rank: is 4, but checkpoint .* is a full fine-tune"):
        check_resume(cfg, saved_client_state(full), full, base_identity(cfg))

    # Through the launcher: one line, exit 2, before any weight is loaded.
    out = tmp_path / "run"
    shutil.copytree(runs["A"], out)
    r = train([sys.executable], out, lora_run["shards"], *LORA, "train.ema.decay=0.9", "train.max_steps=9",
              "run.seed=5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "holds LoRA adapters trained on model.arch" in r.stderr.strip().splitlines()[-1]


def test_base_identity_of_a_pretrained_base_names_its_weight_files(tmp_path):
    from i2v.model.adapters import base_identity
    from i2v.model.transformer import build_transformer

    tiny = load_config(os.path.join(REPO, "configs", "tiny.yaml"))
    build_transformer(tiny.model, seed=0).save_pretrained(tmp_path / "t")
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      [f"model.pretrained={tmp_path / 't'}", "model.arch={}", "model.lora.rank=4"])
    ident = base_identity(cfg)
    (name, rec), = ident["files"].items()
    assert name == "diffusion_pytorch_model.safetensors"
    assert rec["size"] == os.path.getsize(tmp_path / "t" / name) and len(rec["sha256"]) == 64
    assert ident["config"]["num_layers"] == tiny.model.arch["num_layers"]
    shutil.copytree(tmp_path / "t", tmp_path / "moved")  # the same files elsewhere: the same base
    moved = base_identity(load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                                      [f"model.pretrained={tmp_path / 'moved'}", "model.arch={}", "model.lora.rank=4"]))
    assert moved["files"] == ident["files"] and moved["pretrained"] != ident["pretrained"]


# --------------------------------------------------------------------------- bf16, optimizer, no communication

CONTRACT = textwrap.dedent("""
    import os, sys, time, torch, torch.distributed as dist
    from i2v.config import load_config
    from i2v.core.distributed import init_distributed, shutdown
    from i2v.train.trainer import Trainer

    env = init_distributed()
    for stage in (2, 3):
        cfg = load_config("configs/tiny.yaml", sys.argv[1:] + [f"deepspeed.zero_stage={stage}",
                          f"run.output_dir={sys.argv[1].split('=')[1]}-z{stage}"])
        tr = Trainer(cfg, env)
        tr.train()
        module, opt = tr.engine.module, tr.engine.optimizer
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        lp = lambda p: p.ds_tensor if stage == 3 else p
        # bf16 everywhere in the module, never fp16: the frozen base too
        assert {lp(p).dtype for p in module.parameters()} == {torch.bfloat16}, stage
        # only the trainable parameters reach the optimizer, and its master copies are fp32
        groups = opt.fp16_groups if stage == 3 else opt.bit16_groups
        managed = {id(p) for g in groups for p in g}
        assert managed == {id(p) for n, p in module.named_parameters() if n in trainable}, stage
        masters = opt.fp32_partitioned_groups_flat if stage == 3 else opt.single_partition_of_fp32_groups
        assert {m.dtype for m in masters} == {torch.float32}
        n_trainable = sum(p.ds_numel if stage == 3 else p.numel() for n, p in module.named_parameters() if n in trainable)
        held = torch.tensor([sum(e.numel() for e in tr.ema.shadow)])
        dist.all_reduce(held)
        assert held.item() == n_trainable and all(e.dtype == torch.float32 for e in tr.ema.shadow)
        assert tr.ema.local_bytes <= 0.6 * 4 * n_trainable, (tr.ema.local_bytes, n_trainable)
        # an EMA update is local: rank 0 updates alone while rank 1 stays out of every collective
        flag = os.path.join(cfg.run.output_dir, "rank-0-updated")
        if env.rank == 0:
            for e in tr.ema.shadow:
                e.zero_()
            tr.ema.update(3)  # decay 0.9 from zero: 0.1 x this rank's fp32 master fragments
            assert all(torch.allclose(e, 0.1 * f.read().float()) for f, e in zip(tr.ema.fragments, tr.ema.shadow))
            open(flag, "w").close()
        else:
            deadline = time.time() + 120
            while not os.path.exists(flag):
                assert time.time() < deadline, "rank 0's EMA update never finished: it waits in a collective"
                time.sleep(0.1)
        dist.barrier()
        print(f"CONTRACT-OK stage {stage} rank {env.rank} ema {tr.ema.local_bytes} of {4 * n_trainable}", flush=True)
    shutdown()
""")


def test_bf16_lora_keeps_a_bf16_base_fp32_masters_and_a_communication_free_ema(tmp_path):
    shards = tmp_path / "latents"
    make_latent_shards(shards, shards=2, per_shard=4)
    script = tmp_path / "contract.py"
    script.write_text(CONTRACT)
    args = [sys.executable, str(script), f"run.output_dir={tmp_path / 'run'}", f"data.latent_shards={shards}", *LORA,
            "deepspeed.precision=bf16", "model.dtype=bf16", "train.ema.decay=0.9", "train.max_steps=1",
            "checkpoint.every_steps=0", "checkpoint.resume=false"]
    logs = [tmp_path / f"rank-{r}.log" for r in range(2)]
    procs = spawn_ranks(args, env=ENV, logs=logs)
    for p in procs:
        p.wait(timeout=300)
    for rank, (p, log) in enumerate(zip(procs, logs)):
        out = log.read_text()
        assert p.returncode == 0, out[-3000:]
        assert f"CONTRACT-OK stage 2 rank {rank}" in out and f"CONTRACT-OK stage 3 rank {rank}" in out
