"""Export to diffusers and the latent conventions shared with CogVideoXImageToVideoPipeline.

Two real tiny training runs (ZeRO-2 and ZeRO-3, 2 steps, one process each) are exported and
loaded back with `CogVideoXImageToVideoPipeline.from_pretrained`. The convention tests hook the
pipeline's transformer to capture the input it builds and compare its image half with what the
precompute job and the training step construct from the same image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from latent_shards import make_latent_shards
from random_vae import RANDOM_VAE
from runs import subprocess_env

from i2v.core import diffusion
from i2v.config import load_config
from i2v.core.errors import CheckpointError, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
SUBPROCESS_TIMEOUT = 240


def _train_cmd(out, shards, stage):
    return [sys.executable, os.path.join(REPO, "launcher", "train.py"), "--config", TINY,
            f"run.output_dir={out}", f"data.latent_shards={shards}", "train.max_steps=2", "train.warmup_steps=0",
            "train.micro_batch_size=2", "train.log_every=1", f"deepspeed.zero_stage={stage}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{stage: run dir} of two finished 2-step runs, trained side by side; ZeRO-3 exports on finish."""
    root = tmp_path_factory.mktemp("export_runs")
    shards = str(root / "latents")
    make_latent_shards(shards, shards=2, per_shard=4)
    procs = {}
    for stage in (2, 3):
        out = str(root / f"zero{stage}")
        cmd = _train_cmd(out, shards, stage) + (["checkpoint.export_on_finish=true"] if stage == 3 else [])
        procs[stage] = (out, subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(PYTHONPATH=REPO),
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    result = {}
    for stage, (out, p) in procs.items():
        log, _ = p.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert p.returncode == 0, log[-3000:]
        result[stage] = out
    return result


def _checkpoint(run):
    return os.path.join(run, "checkpoints", "step-00000002")


def _image(seed=0, size=64):
    rng = np.random.default_rng(seed)
    a = np.zeros((size, size, 3), np.uint8)
    a[...] = rng.integers(0, 255, 3)
    a[size // 4: size // 2, size // 4: 3 * size // 4] = 255
    return Image.fromarray(a)


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("stage", [2, 3])
def test_export_loads_in_pipeline_and_generates(runs, stage, tmp_path):
    from diffusers import CogVideoXImageToVideoPipeline

    from i2v.checkpoint.reader import consolidated_state_dict
    from i2v.model.encoders import build_text_encoder
    from i2v.sample.export import export_pipeline
    from i2v.model.transformer import build_transformer

    run = runs[stage]
    ckpt = _checkpoint(run)
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    saved = torch.load(os.path.join(ckpt, name), map_location="cpu", weights_only=True)
    assert saved["ds_config"]["zero_optimization"]["stage"] == stage
    cfg = load_config(os.path.join(run, "config.yaml"))
    out = export_pipeline(cfg, ckpt, str(tmp_path / "pipe"))
    assert out == str(tmp_path / "pipe") and not os.path.exists(out + ".tmp")

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(out)
    # The exported transformer holds exactly DeepSpeed's fp32 consolidation, and it is trained (not init).
    state = consolidated_state_dict(ckpt)
    exported = pipe.transformer.state_dict()
    assert set(exported) == set(state)
    for k, v in state.items():
        assert torch.equal(exported[k], v), k
    init = build_transformer(cfg.model, seed=cfg.run.seed).state_dict()
    assert any(not torch.equal(init[k], state[k]) for k in state)

    # Scheduler: the run's schedule, CogVideoX's sampling settings, the same alpha_bar as training.
    sc = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "CogVideoXDDIMScheduler"
    assert (sc.prediction_type, sc.timestep_spacing, sc.snr_shift_scale, sc.rescale_betas_zero_snr) == (
        "v_prediction", "trailing", cfg.diffusion.snr_shift_scale, True)
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), diffusion.alphas_cumprod(cfg.diffusion),
                               rtol=1e-5, atol=1e-7)

    # Tokenizer and text encoder: the pipeline encodes a prompt as the precompute job did.
    prompt = "a red ball moving left"
    text = build_text_encoder(cfg)
    n = cfg.precompute.text_encoder.max_length
    kw = dict(padding="max_length", max_length=n, truncation=True, add_special_tokens=True, return_tensors="pt")
    assert torch.equal(pipe.tokenizer(prompt, **kw).input_ids, text.tokenizer(prompt, **kw).input_ids)
    ours = text([prompt])
    theirs, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=n,
                                   device=torch.device("cpu"))
    torch.testing.assert_close(theirs.float(), ours, rtol=1e-5, atol=1e-5)  # attention kernels may differ

    video = pipe(image=_image(), prompt=prompt, num_frames=9, height=64, width=64, num_inference_steps=2,
                 guidance_scale=6.0, max_sequence_length=n, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 9, 3, 64, 64)
    assert torch.isfinite(video).all()


def test_export_on_finish_writes_the_final_weights(runs):
    from diffusers import CogVideoXTransformer3DModel

    from i2v.checkpoint.reader import consolidated_state_dict

    run = runs[3]
    out = os.path.join(run, "export")
    info = json.load(open(os.path.join(out, "i2v_export.json")))
    assert info["step"] == 2 and info["checkpoint"] == _checkpoint(run)
    exported = CogVideoXTransformer3DModel.from_pretrained(os.path.join(out, "transformer")).state_dict()
    for k, v in consolidated_state_dict(_checkpoint(run)).items():
        assert torch.equal(exported[k], v), k


def test_export_cli_replaces_atomically_and_reports_errors(runs, tmp_path):
    run = runs[3]
    config = os.path.join(run, "config.yaml")
    out = tmp_path / "pipe"
    cli = [sys.executable, os.path.join(REPO, "launcher", "export.py"), "--config", config]

    # The checkpoints/ root resolves to its newest commit; an existing export is replaced whole.
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    (out / "stale.txt").write_text("from an older export")
    p = subprocess.run(cli + ["--checkpoint", os.path.join(run, "checkpoints"), "--out", str(out)], cwd=REPO,
                       env=subprocess_env(PYTHONPATH=REPO), capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["README.md", "i2v_export.json", "model_index.json", "scheduler", "text_encoder",
                                       "tokenizer", "transformer", "vae"]
    assert not os.path.exists(f"{out}.tmp") and not os.path.exists(f"{out}.old")

    missing = tmp_path / "nope" / "step-00000002"
    p = subprocess.run(cli + ["--checkpoint", str(missing), "--out", str(tmp_path / "x")], cwd=REPO,
                       env=subprocess_env(PYTHONPATH=REPO), capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == f"error: --checkpoint: directory not found: {missing}"
    assert not os.path.exists(tmp_path / "x")


def test_export_refuses_mismatched_config_and_foreign_output(runs, tmp_path):
    from i2v.sample.export import export_pipeline

    run = runs[2]
    config = os.path.join(run, "config.yaml")
    ckpt = _checkpoint(run)
    layers = load_config(config).model.arch["num_layers"]
    cfg = load_config(config, [f"model.arch.num_layers={layers + 1}"])
    mismatch = rf"model\.arch: checkpoint has .*'num_layers': {layers}.*config has .*'num_layers': {layers + 1}"
    with pytest.raises(ConfigError, match=mismatch):
        export_pipeline(cfg, ckpt, str(tmp_path / "a"))
    cfg = load_config(config, ["diffusion.snr_shift_scale=1.0"])
    with pytest.raises(ConfigError, match=r"diffusion\.snr_shift_scale: checkpoint has 3\.0, config has 1\.0"):
        export_pipeline(cfg, ckpt, str(tmp_path / "b"))
    cfg = load_config(config, ["run.seed=7"])  # the inline T5 would be different random weights
    with pytest.raises(ConfigError, match=r"precompute\.text_encoder: this run names an inline arch, seed 7 .*"
                                          r"made with an inline arch, seed 0"):
        export_pipeline(cfg, ckpt, str(tmp_path / "c"))
    cfg = load_config(config)
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        export_pipeline(cfg, os.path.join(run, "tensorboard"), str(tmp_path / "d"))
    foreign = tmp_path / "important"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an exported pipeline"):
        export_pipeline(cfg, ckpt, str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not any(os.path.exists(tmp_path / n) for n in "abcd")


# --------------------------------------------------------------------------- conventions


VARIANTS = {
    # CogVideoX 1.0 (5B-I2V): image latents times the scaling factor, no time patching.
    "cogvideox-1.0": {"vae": {}, "model": {}},
    # CogVideoX 1.5: invert_scale_latents (image latents divided by the factor), patch_size_t 2, ofs.
    "cogvideox-1.5": {"vae": {"invert_scale_latents": True, "scaling_factor": 0.7},
                      "model": {"patch_size_t": 2, "ofs_embed_dim": 32, "patch_bias": False}},
}


def _yaml(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


def _variant_config(name, tmp_path):
    v = VARIANTS[name]
    over = [f"run.output_dir={tmp_path}", "precompute.latents=sample"]
    over += RANDOM_VAE + [f"precompute.vae.arch.{k}={_yaml(val)}" for k, val in v["vae"].items()]
    over += [f"model.arch.{k}={_yaml(val)}" for k, val in v["model"].items()]
    if "ofs_embed_dim" in v["model"]:
        over.append("diffusion.ofs=2.0")
    return load_config(TINY, over)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_image_latent_convention_matches_pipeline(variant, tmp_path):
    """The pipeline's transformer input, image half, equals ours built from the precompute job's latent."""
    from diffusers import CogVideoXImageToVideoPipeline

    from i2v.data_prep.precompute import Precompute
    from i2v.sample.export import build_pipeline
    from i2v.kernels.noise import inject_noise
    from i2v.model.transformer import build_transformer

    cfg = _variant_config(variant, tmp_path)
    job = Precompute(cfg)  # the encoders exactly as the precompute job builds them
    pipe = build_pipeline(cfg, build_transformer(cfg.model, seed=0).eval())
    assert isinstance(pipe, CogVideoXImageToVideoPipeline)
    assert pipe.vae.config.invert_scale_latents == bool(VARIANTS[variant]["vae"].get("invert_scale_latents"))

    captured = []

    def grab(module, args, kwargs):
        if not captured:
            captured.append({k: kwargs[k].clone() if torch.is_tensor(kwargs[k]) else kwargs[k]
                             for k in ("hidden_states", "ofs")})

    hook = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    image, seed = _image(3), 1234
    n = cfg.precompute.text_encoder.max_length
    result = pipe(image=image, prompt="a blue disk", num_frames=9, height=64, width=64, num_inference_steps=1,
                  guidance_scale=6.0, max_sequence_length=n, output_type="latent",
                  generator=torch.Generator().manual_seed(seed)).frames
    hook.remove()
    hidden = captured[0]["hidden_states"]  # [2 (uncond, cond), F, 2C, h, w]
    c = cfg.model.arch["out_channels"]
    frames = hidden.shape[1]

    # Ours: the precompute job's image latent of the noise-free first frame (sigma = 0), from the
    # same generator the pipeline's VAE posterior sample used (its first draw).
    pixels = pipe.video_processor.preprocess(image, height=64, width=64)[0]
    first = job.noisy_first_frames("shard", "key", pixels, torch.zeros(1))
    torch.testing.assert_close(first[0], pixels, rtol=0, atol=0)
    posterior = job._latents(first.unsqueeze(2), [torch.Generator().manual_seed(seed)])
    image_latents = posterior * job.image_scale  # [1, 1, C, h, w]
    sf = float(pipe.vae.config.scaling_factor)
    expected_scale = 1 / sf if pipe.vae.config.invert_scale_latents else sf
    assert job.image_scale == pytest.approx(expected_scale)

    x_t = torch.randn(1, frames, c, *hidden.shape[-2:])
    ours = diffusion.model_input(x_t, image_latents)
    for half in hidden:  # CFG keeps the image condition in both halves
        torch.testing.assert_close(half[:, c:], ours[0, :, c:], rtol=0, atol=0)
    assert hidden[:, 1:, c:].abs().max() == 0  # one image frame, zeros after, in both variants
    # The training step's own construction (torch and Triton noise backends) agrees.
    one = torch.ones(1)
    for backend in ("torch", "triton"):
        mi, _ = inject_noise(x_t, image_latents, one * 0.5, one * 0.5, seed=0, offset=0, backend=backend)
        torch.testing.assert_close(mi[0, :, c:], hidden[1, :, c:], rtol=0, atol=0)

    # Video latents: the precompute job's scaled latents decode through the pipeline to the VAE's own decode.
    clip = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    unscaled = job._latents(clip, [torch.Generator().manual_seed(6)])  # [1, f, C, h, w]
    stored = unscaled * job.scaling_factor
    with torch.no_grad():
        torch.testing.assert_close(pipe.decode_latents(stored), pipe.vae.decode(unscaled.permute(0, 2, 1, 3, 4)).sample,
                                   rtol=1e-5, atol=1e-5)
    # 1.5: the padding latent frame is kept in latent output and dropped before decoding, so the
    # decoded clip has the requested 9 frames.
    assert result.shape == (1, frames, c, cfg.model.arch["sample_height"], cfg.model.arch["sample_width"])
    video = pipe(image=image, prompt="a blue disk", num_frames=9, height=64, width=64, num_inference_steps=1,
                 guidance_scale=1.0, max_sequence_length=n, output_type="pt",
                 generator=torch.Generator().manual_seed(seed)).frames
    assert video.shape == (1, 9, 3, 64, 64)

    if variant == "cogvideox-1.5":
        # 9 frames -> 3 latent frames, padded to 4 for patch_size_t 2; the ofs input is 2.0.
        assert frames == 4
        assert float(captured[0]["ofs"].flatten()[0]) == cfg.diffusion.ofs == 2.0
    else:
        assert frames == 3 and captured[0]["ofs"] is None
