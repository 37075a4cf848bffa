"""Sequence parallelism (i2v/model/parallel.py) against the single-rank maths, through the real trainer.

One process launch builds several trainers in turn (start-up dominates on a CPU), and one
reference run serves several comparisons:
- 1 rank (ZeRO-2) is the reference of SP 2 on 2 ranks at ZeRO 0, 1, 2 and 3, with gradient
  checkpointing, and with the Triton kernel;
- DP 2 on 2 ranks (ZeRO-2) is the reference of DP 2 x SP 2 on 4 ranks at ZeRO 1, 2 and 3.
Compared: every logged step's loss over 10 steps and every parameter's gradient after the first
micro-batch (relative 1e-5). The model starts from a checkpoint whose output layer is not zero
(the inline init zeroes it, which would leave every other gradient of the first step at zero).
The latents hold two clip sizes, 3x4x4 = 48 and 3x3x3 = 27 video tokens: SP 2 pads the second.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from latent_shards import make_latent_shards
from runs import (TORCHRUN, losses, pairs_override, reference_gifs, spawn_ranks, tensorboard_events, train,
                  validation_images, with_fault)

from i2v.config import load_config

STEPS = 10
# Small ZeRO buckets: in deterministic mode torch fills every new tensor, and DeepSpeed's default
# 5e8-element buckets then cost ~2 s per ZeRO-1/2 step on a CPU.
COMMON = (f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.log_every=1", "checkpoint.every_steps=4",
          "checkpoint.keep_last=5", "run.deterministic=true", "kernels.attention=torch", "model.arch={}",
          "train.grad_clip=0.1",  # below the gradient norms, so every step is clipped: the norm must be right too
          "deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000000, allgather_bucket_size: 1000000}}")

RUNS_SCRIPT = textwrap.dedent("""
    # Trains each run of the spec in turn with the real Trainer; the first micro-batch's full
    # gradients are read just before DeepSpeed's first optimizer step.
    import gc, json, os, sys
    from deepspeed.utils import safe_get_full_grad
    from safetensors.torch import save_file
    from i2v.config import load_config
    from i2v.core.distributed import init_distributed, shutdown
    from i2v.train.trainer import Trainer

    spec = json.loads(sys.argv[1])
    env = init_distributed()
    for run in spec["runs"]:
        out = os.path.join(spec["root"], run["name"])
        cfg = load_config("configs/tiny.yaml", spec["common"] + run["overrides"] + [f"run.output_dir={out}"])
        tr = Trainer(cfg, env)
        engine, step = tr.engine, tr.engine.step

        def first_step(*args, **kwargs):
            grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
            if env.is_main:
                save_file({n: g.detach().float().contiguous() for n, g in grads.items()}, os.path.join(out, "grads.safetensors"))
            engine.step = step
            return step(*args, **kwargs)

        engine.step = first_step
        tr.train()
        del tr, engine, step, first_step
        gc.collect()
    print("RUNS-OK", env.rank, flush=True)
    shutdown()
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    shards = root / "latents"
    make_latent_shards(shards, shards=2, per_shard=8)
    make_latent_shards(shards, shards=2, per_shard=8, first_shard=2, height=6, width=6)
    # The tiny architecture, every weight random (the output layer included), as a diffusers directory.
    from i2v.model.transformer import build_transformer

    model = build_transformer(load_config(REPO / "configs" / "tiny.yaml").model, seed=0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(root / "transformer")
    script = root / "runs.py"
    script.write_text(RUNS_SCRIPT)
    common = [*COMMON, f"data.latent_shards={shards}", f"model.pretrained={root / 'transformer'}"]
    return root, script, common


def launch(setup, world, runs, timeout=900):
    root, script, common = setup
    spec = {"root": str(root), "common": common, "runs": [{"name": n, "overrides": list(o)} for n, o in runs]}
    procs = spawn_ranks([sys.executable, str(script), json.dumps(spec)], world=world)
    results = [p.communicate(timeout=timeout) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0 and f"RUNS-OK {rank}" in out, f"rank {rank}:\n{out[-3000:]}\n{err[-5000:]}"
    return {name: root / name for name, _ in runs}


@pytest.fixture(scope="module")
def one_rank(setup):
    return launch(setup, 1, [("ref", ["deepspeed.zero_stage=2"]),
                             ("ref-triton", ["deepspeed.zero_stage=2", "kernels.attention=triton", "train.max_steps=3"])])


@pytest.fixture(scope="module")
def two_ranks(setup):
    # DP runs first: DeepSpeed keeps the last engine's mpu in a module global, and an engine built
    # without one does not reset it.
    sp2 = [(f"sp2-zero{z}", [f"deepspeed.zero_stage={z}", "parallel.sequence_parallel_size=2"]) for z in (0, 1, 2, 3)]
    triton = ("sp2-triton", ["deepspeed.zero_stage=2", "parallel.sequence_parallel_size=2", "kernels.attention=triton",
                             "train.max_steps=3"])
    checkpointed = ("sp2-checkpointed", ["deepspeed.zero_stage=2", "parallel.sequence_parallel_size=2",
                                         "model.gradient_checkpointing=true", "train.max_steps=3"])
    partial = [(f"sp2-checkpointed-{what}", ["deepspeed.zero_stage=2", "parallel.sequence_parallel_size=2",
                                              f"model.gradient_checkpointing={what}", "train.max_steps=3"])
               for what in ("selective", "1")]
    return launch(setup, 2, [("dp2", ["deepspeed.zero_stage=2"]), *sp2, triton, checkpointed, *partial])


@pytest.fixture(scope="module")
def four_ranks(setup):
    return launch(setup, 4, [(f"dp2sp2-zero{z}", [f"deepspeed.zero_stage={z}", "parallel.sequence_parallel_size=2"])
                             for z in (1, 2, 3)])


def assert_same_training(run, ref, steps=STEPS, grad_norm=True):
    (got, records), (want, ref_records) = losses(run), losses(ref)
    assert len(got) == steps
    for step, (a, b) in enumerate(zip(got, want), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"{run.name} step {step}: loss {a!r} vs {b!r}"
        if grad_norm:  # DeepSpeed reports none at ZeRO-0
            a, b = records[step]["grad_norm"], ref_records[step]["grad_norm"]
            assert abs(a - b) <= 1e-5 * b, f"{run.name} step {step}: gradient norm {a!r} vs {b!r}"
    grads, ref_grads = load_file(run / "grads.safetensors"), load_file(ref / "grads.safetensors")
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert g.norm() > 0, f"{name}: zero reference gradient tests nothing"
        err = (grads[name] - g).norm() / g.norm()
        assert err <= 1e-5, f"{run.name} {name}: gradient relative error {err:.2e}"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sp2_on_two_ranks_trains_like_one_rank(one_rank, two_ranks, stage):
    assert_same_training(two_ranks[f"sp2-zero{stage}"], one_rank["ref"], grad_norm=stage > 0)


def test_sp2_with_the_triton_kernel_trains_like_one_rank(one_rank, two_ranks):
    # The attention kernels under the Triton interpreter. The fused block (kernels.block) stays torch here: its ops are
    # per token, and tests/test_fused_block.py checks them; under the interpreter they tripled this file's time.
    assert_same_training(two_ranks["sp2-triton"], one_rank["ref-triton"], steps=3)


def test_sp2_with_gradient_checkpointing_trains_like_one_rank(one_rank, two_ranks):
    # Backward recomputes each block's forward, its all-to-alls included.
    assert_same_training(two_ranks["sp2-checkpointed"], one_rank["ref"], steps=3)


@pytest.mark.parametrize("what", ["selective", "1"])
def test_sp2_with_selective_or_first_block_checkpointing_trains_like_one_rank(one_rank, two_ranks, what):
    # Selective: the all-to-alls between the kept projections and the kept attention core rerun in backward;
    # 1: only the first block recomputes (the per-block decision of the SP block loop).
    assert_same_training(two_ranks[f"sp2-checkpointed-{what}"], one_rank["ref"], steps=3)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_dp2_sp2_on_four_ranks_trains_like_dp2(two_ranks, four_ranks, stage):
    assert_same_training(four_ranks[f"dp2sp2-zero{stage}"], two_ranks["dp2"])


def test_data_position_counts_each_micro_batch_once_and_checkpoints_are_plain(two_ranks, four_ranks):
    # SP 2 on 2 ranks is one data-parallel replica: one global micro-batch per step.
    records = losses(two_ranks["sp2-zero2"])[1]
    assert [records[s]["position"] for s in range(1, STEPS + 1)] == list(range(1, STEPS + 1))
    assert [losses(four_ranks["dp2sp2-zero2"])[1][s]["position"] for s in (1, STEPS)] == [2, 2 * STEPS]
    client = torch.load(two_ranks["sp2-zero2"] / "checkpoints" / "step-00000004" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=True)
    assert client["position"] == 4 and client["samples_seen"] == 8
    # ZeRO partitions over both ranks, and no weight is split: the layout of a plain 2-rank checkpoint.
    assert client["dp_world_size"] == 2 and client["checkpoint_parallel_dimensions"] == {"pp_degree": 1, "tp_degree": 1}


def test_sigkill_and_relaunch_at_the_same_layout_is_bit_exact_and_validation_samples(setup, two_ranks, tmp_path):
    """SP 2 at ZeRO-2, rank 1 killed after a backward at step 6; the relaunch samples validation videos at step 8.

    Each rank samples its own validation pairs with the plain (unsharded) forward; the videos must
    equal samples made here from the consolidated step-8 checkpoint, and sampling must not change training.
    """
    root, _, common = setup
    run = tmp_path / "run"
    layout = ("deepspeed.zero_stage=2", "parallel.sequence_parallel_size=2")
    r = train(TORCHRUN, run, root / "latents", *common, *layout, env=with_fault("1:6:after_backward:kill"))
    assert r.returncode != 0
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004"
    images = validation_images(str(tmp_path / "images"), 2)
    r = train(TORCHRUN, run, root / "latents", *common, *layout, "validation.every_steps=8",
              "validation.num_inference_steps=2", pairs_override(images))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step-00000004" in r.stdout and "(1 DP x 2 SP)" in r.stdout
    assert losses(run)[0] == losses(two_ranks["sp2-zero2"])[0]  # exact, every step

    assert "validation at step 8: 2/2 videos" in r.stdout
    reference = reference_gifs(str(run), 8)
    ea = tensorboard_events(str(run))
    for i in (0, 1):
        (event,) = ea.Images(f"validation/pair-{i}")
        assert event.encoded_image_string == reference[i], f"pair {i} differs from the checkpoint's own sample"
