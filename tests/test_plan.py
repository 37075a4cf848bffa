"""The planner on the shipped real configs, with no weights present: figures, verdicts, errors."""

import runpy
import sys

import pytest

from conftest import REPO
from i2v.config import load_config
from i2v.plan.planner import GiB, make_plan


def plan_command(capsys, monkeypatch, *argv):
    """launcher/plan.py as a user runs it, in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["launcher/plan.py", *argv])
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "launcher" / "plan.py"), run_name="__main__")
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_5b_config_plans_as_shipped_without_weights(capsys, monkeypatch):
    assert not (REPO / "models" / "CogVideoX-5b-I2V").exists()
    code, out, _ = plan_command(capsys, monkeypatch, "--config", "configs/cogvideox-5b-i2v.yaml",
                                "--gpus", "8", "--gpu-mem-gb", "80")
    assert code == 0
    assert "5,570,479,680 total" in out and "17,776 tokens" in out
    assert "0.9966 PFLOP per sample" in out and "7.973 PFLOP per optimizer step" in out
    assert "verdict     FITS" in out


def test_too_small_gpus_do_not_fit_and_the_plan_names_what_would():
    cfg = load_config(REPO / "configs" / "cogvideox-5b-i2v.yaml", ["model.gradient_checkpointing=false"])
    plan = make_plan(cfg, gpus=8, gpu_mem_gb=40)
    assert not plan.fits
    assert plan.checkpointing == "none" and plan.reason == "configured"
    assert plan.activations["none"].peak > 10 * plan.activations["all"].peak  # what checkpointing buys at 17,776 tokens
    assert plan.activations["all"].peak < plan.activations["selective"].peak < plan.activations["none"].peak
    from i2v.plan.planner import alternatives

    assert alternatives(cfg, plan)[0].startswith("model.gradient_checkpointing=auto (picks ")


def test_zero3_and_offload_move_state_off_the_gpu():
    cfg = load_config(REPO / "configs" / "cogvideox-5b-i2v.yaml")
    zero2 = make_plan(cfg, 8, 80).state
    cfg3 = load_config(REPO / "configs" / "cogvideox-5b-i2v.yaml", ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true"])
    zero3 = make_plan(cfg3, 8, 80).state
    counts = make_plan(cfg3, 8, 80).counts
    params = counts.total
    assert zero2.weights == 2 * (params + counts.buffers) and zero2.optimizer == 12 * params // 8
    # ZeRO-3 shards the weights but keeps small parameters (norms, biases) and buffers whole on every rank.
    assert zero3.weights == 2 * (params - counts.small) // 8 + 2 * (counts.small + counts.buffers)
    assert zero3.optimizer == 0 and zero3.host == 12 * params // 8
    assert zero3.device < zero2.device / 3


def test_15_config_plans_its_padded_latent_frames():
    plan = make_plan(load_config(REPO / "configs" / "cogvideox-1.5-5b-i2v.yaml"), 8, 80)
    assert plan.latent == (21, 96, 170)
    assert (plan.flops.text_tokens, plan.flops.video_tokens) == (226, 11 * 48 * 85)  # 21 latent frames -> 22 -> 11


def test_config_without_an_architecture_is_an_error_naming_it(capsys, monkeypatch):
    code, out, err = plan_command(capsys, monkeypatch, "--config", "configs/cogvideox-5b-i2v.yaml", "model.arch_file=null")
    assert code == 2 and out == ""
    assert err.startswith("error: model.pretrained: models/CogVideoX-5b-I2V/transformer/config.json not found")
    assert "model.arch_file" in err and len(err.strip().splitlines()) == 1
    code, _, err = plan_command(capsys, monkeypatch, "--config", "configs/cogvideox-5b-i2v.yaml", "--gpus", "0")
    assert code == 2 and "--gpus" in err


def test_plan_memory_figures_are_the_memory_model_of_the_tiny_config():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    plan = make_plan(cfg, gpus=1, gpu_mem_gb=4)
    assert plan.counts.total == plan.counts.trainable > 0 and plan.fits
    # DeepSpeed's 5e8-element fp32 reduction bucket dwarfs a tiny model's own state.
    assert plan.state.buckets == 2_000_000_000
    assert plan.peak_bytes == plan.state.device + plan.activations["none"].peak < 4 * GiB


def test_lora_config_plans_the_adapters_as_the_only_trainable_state(capsys, monkeypatch):
    code, out, _ = plan_command(capsys, monkeypatch, "--config", "configs/cogvideox-5b-i2v-lora.yaml", "--gpus", "8",
                                "--gpu-mem-gb", "80", "train.ema.decay=0.999")
    assert code == 0
    # r128 on to_q/k/v/out of 42 blocks at width 3072: 42 x 4 x 128 x (3072 + 3072)
    assert "5,702,600,256 total, 132,120,576 trainable (5,570,479,680 frozen)" in out
    plan = make_plan(load_config(REPO / "configs" / "cogvideox-5b-i2v-lora.yaml", ["train.ema.decay=0.999"]), 8, 80)
    t = plan.counts.trainable
    assert plan.state.optimizer == 12 * t // 8 and plan.state.ema == 4 * t // 8 and plan.state.gradients == 2 * t // 8
    assert "EMA" in out and "verdict     FITS" in out


def test_tiny_plan_counts_the_video_tokens_of_its_real_latents(capsys, monkeypatch, tmp_path):
    """configs/tiny.yaml's VAE compresses 4x in space: the planner prices the latents precompute writes."""
    from i2v.data.latents import LatentDataset
    from i2v.data.synthetic import make_clips
    from i2v.data_prep.make_shards import make_shards
    from i2v.data_prep.precompute import run
    from i2v.model.flops import video_tokens

    make_clips(str(tmp_path / "clips"), 2, frames=9)
    make_shards(str(tmp_path / "clips"), str(tmp_path / "shards"), 2, progress=False)
    monkeypatch.chdir(REPO)  # the config names its VAE relative to the repository
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.video_shards={tmp_path / 'shards'}",
                                                      f"data.latent_shards={tmp_path / 'latents'}"])
    run(cfg, progress=False)
    latents = next(iter(LatentDataset(str(tmp_path / "latents"), batch_size=1, resampled=False, shuffle_buffer=0)))
    frames, _, height, width = latents["video_latents"].shape[1:]
    assert (frames, height, width) == (3, 16, 16)  # 9 frames at 64 x 64, 4x in time and space

    plan = make_plan(cfg, gpus=1, gpu_mem_gb=4)
    tokens = video_tokens(plan.arch, frames, height, width)
    assert plan.latent == (frames, height, width) and plan.flops.video_tokens == tokens == 192
    code, out, _ = plan_command(capsys, monkeypatch, "--config", "configs/tiny.yaml")
    assert code == 0 and f"latents 3 x 16 x 16: 8 text + {tokens} video" in out
