"""Faults, kills and resume: every fault is injected with I2V_FAULT (see i2v/core/faults.py)."""

import os
import signal
import sys
import textwrap
import time

from lora_runs import RUN_A, step_dir
from runs import TORCHRUN, losses, spawn_ranks, train, with_fault

EXACT = ("train.max_steps=12", "train.log_every=1", "checkpoint.every_steps=4", "run.deterministic=true",
         "train.micro_batch_size=2", "checkpoint.keep_last=5", "deepspeed.zero_stage=2")


def test_sigkill_anywhere_then_relaunch_is_bit_exact_and_stream_or_zero_stage_changes_are_refused(tmp_path, shards):
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = train(TORCHRUN, ref, shards, *EXACT)
    assert r.returncode == 0, r.stderr[-3000:]

    # 1. rank 1 is SIGKILLed after a backward at step 6 (last commit: step 4)
    r = train(TORCHRUN, run, shards, *EXACT, env=with_fault("1:6:after_backward:kill"))
    assert r.returncode != 0
    assert sorted(os.listdir(run / "checkpoints"))[:2] == ["latest", "step-00000004"]
    # 2. the relaunch is killed in the middle of writing the step-8 checkpoint, before its commit marker
    r = train(TORCHRUN, run, shards, *EXACT, env=with_fault("0:8:mid_checkpoint:kill"))
    assert r.returncode != 0
    assert (run / "checkpoints" / "tmp-step-00000008").is_dir()
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004"
    # 3. the same command again finishes; the orphan is removed
    r = train(TORCHRUN, run, shards, *EXACT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step-00000004" in r.stdout and "tmp-step-00000008" in r.stdout
    assert not (run / "checkpoints" / "tmp-step-00000008").exists()

    ref_losses, ref_records = losses(ref)
    run_losses, run_records = losses(run)
    assert len(ref_losses) == 12
    assert run_losses == ref_losses  # exact float equality, every step
    assert run_records[12]["skipped"] == 0

    # 4. per-rank data streams cannot continue at another world size: a clear error, not a silent restart
    # (ZeRO state itself is resharded: tests/test_reshard.py)
    r = train([sys.executable], run, shards, *EXACT[1:], "train.max_steps=14", "data.order=stream")
    assert r.returncode == 2
    assert "written by 2 rank(s), this run has 1" in r.stderr and "data.order=stream" in r.stderr
    assert "Traceback" not in r.stderr
    # 5. nor can another ZeRO stage or precision load its optimizer state: refused before any loading
    r = train([sys.executable], run, shards, *EXACT[1:], "train.max_steps=14", "deepspeed.zero_stage=3",
              "deepspeed.precision=bf16")
    assert r.returncode == 2
    assert ("deepspeed.zero_stage: checkpoint has 2, this run has 3; deepspeed.precision: checkpoint has 'fp32', "
            "this run has 'bf16'") in r.stderr and "resume with deepspeed.zero_stage=2 deepspeed.precision=fp32" in r.stderr
    assert "Traceback" not in r.stderr and "resumed from" not in r.stdout


def test_lora_sigkill_then_relaunch_is_bit_exact_with_its_ema(tmp_path, lora_run):
    """LoRA + EMA (run A of tests/lora_runs.py): the resumed run logs the same losses and ends with the
    same adapters and the same EMA shards, bit for bit, as the uninterrupted one."""
    import torch
    from safetensors import safe_open

    from i2v.checkpoint.reader import consolidated_state_dict

    run, ref = tmp_path / "run", lora_run["run"]
    # rank 1 is SIGKILLed after a backward of the sixth step (last commit: step 5)
    r = train(TORCHRUN, run, lora_run["shards"], *RUN_A, env=with_fault("1:5:after_backward:kill"))
    assert r.returncode != 0
    assert (run / "checkpoints" / "latest").read_text() == "step-00000005"
    r = train(TORCHRUN, run, lora_run["shards"], *RUN_A)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step-00000005" in r.stdout

    assert losses(run)[0] == losses(ref)[0]  # exact float equality, all 8 steps
    ema_dir = os.path.join(step_dir(ref, 8), "ema")
    assert sorted(os.listdir(ema_dir)) == ["rank-00000.safetensors", "rank-00001.safetensors"]
    for name in os.listdir(ema_dir):  # (not the bytes: safetensors writes its metadata map in any order)
        with safe_open(os.path.join(ema_dir, name), "pt") as a, \
                safe_open(os.path.join(step_dir(run, 8), "ema", name), "pt") as b:
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys()), name
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()), name
    mine, theirs = consolidated_state_dict(step_dir(run, 8)), consolidated_state_dict(step_dir(ref, 8))
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_world_size_change_continues_the_global_sample_order_at_zero0(tmp_path, shards):
    """With unpartitioned optimizer state and the global order, 2 ranks -> 1 continues where they stopped."""
    out = tmp_path / "run"
    common = ("deepspeed.zero_stage=0", "train.log_every=1", "checkpoint.every_steps=3", "train.micro_batch_size=2")
    r = train(TORCHRUN, out, shards, "train.max_steps=3", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    r = train([sys.executable], out, shards, "train.max_steps=5", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step-00000003: step 3, 6 global micro-batches consumed" in r.stdout
    _, records = losses(out)
    assert sorted(records) == [1, 2, 3, 4, 5]
    # global micro-batches consumed after each step: 2 per step on 2 ranks, then 1 per step on 1 rank,
    # contiguous, so none is trained twice and none is skipped (each position is one micro-batch)
    assert [records[s]["position"] for s in range(1, 6)] == [2, 4, 6, 7, 8]


def test_sigterm_on_one_rank_commits_a_checkpoint_and_exits_143(tmp_path, shards):
    out = tmp_path / "run"
    args = [sys.executable, "launcher/train.py", "--config", "configs/tiny.yaml", f"run.output_dir={out}",
            f"data.latent_shards={shards}", "train.max_steps=500", "train.log_every=1", "checkpoint.every_steps=0"]
    procs = spawn_ranks(args)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)  # only rank 1 is told: the ranks must agree among themselves
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], results[0][1][-2000:]
    latest = (out / "checkpoints" / "latest").read_text()
    assert (out / "checkpoints" / latest / "COMMITTED.json").is_file()
    step = int(latest.split("-")[1])
    assert 3 <= step < 500
    assert f"preempted: committed checkpoint at step {step}" in results[0][0]


NAN_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from i2v.config import load_config
    from i2v.core.distributed import init_distributed
    from i2v.train.trainer import Trainer, TooManySkips

    cfg = load_config("configs/tiny.yaml", sys.argv[1:])
    env = init_distributed()
    tr = Trainer(cfg, env)
    tr.train()                                   # 2 clean steps
    def snapshot():
        params = {n: p.detach().clone() for n, p in tr.engine.module.named_parameters()}
        opt = tr.engine.optimizer.optimizer.state
        state = [(k, v.clone()) for s in opt.values() for k, v in s.items() if torch.is_tensor(v)]
        return params, state
    params, state = snapshot()
    assert state, "optimizer has state after two steps"
    os.environ["I2V_FAULT"] = "1:2:nan_loss"   # rank 1 only
    cfg.train.max_steps, cfg.train.max_consecutive_skips = 4, 1
    try:
        tr.train()
        raise SystemExit("expected TooManySkips")
    except TooManySkips as e:
        assert "train.max_consecutive_skips=1" in str(e)
    params2, state2 = snapshot()
    assert all(torch.equal(params[n], params2[n]) for n in params), "parameters changed"
    assert len(state) == len(state2) and all(k == k2 and torch.equal(a, b) for (k, a), (k2, b) in zip(state, state2))
    assert tr.engine.global_steps == 2 and tr.skipped == 1 and tr.step == 2
    cfg.train.max_consecutive_skips = 3         # now the same fault is skipped and training goes on
    tr.train()
    assert tr.step == 4 and tr.engine.global_steps == 4 and tr.skipped == 2
    print(f"NAN-GUARD-OK rank {env.rank}", flush=True)
    from i2v.core.distributed import shutdown
    shutdown()
""")


def test_nan_on_one_rank_skips_everywhere_and_leaves_state_untouched(tmp_path, shards):
    script = tmp_path / "nan_guard.py"
    script.write_text(NAN_SCRIPT)
    args = [sys.executable, str(script), f"run.output_dir={tmp_path / 'run'}", f"data.latent_shards={shards}",
            "train.max_steps=2", "train.warmup_steps=0", "checkpoint.every_steps=0", "checkpoint.resume=false",
            "train.log_every=1"]
    procs = spawn_ranks(args)
    results = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, err[-3000:]
        assert f"NAN-GUARD-OK rank {rank}" in out
    assert "non-finite loss (or no usable sample) on some rank" in results[0][0]


def test_consecutive_nan_skips_abort_with_distinct_exit_code(tmp_path, shards):
    r = train([sys.executable], tmp_path / "run", shards, "train.max_steps=3", "train.warmup_steps=0",
              "train.max_consecutive_skips=1",
              env=with_fault("0:1:nan_loss"))
    assert r.returncode == 3
    assert "consecutive micro-batches had a non-finite loss" in r.stderr and "Traceback" not in r.stderr


def test_keep_last_and_corrupt_checkpoint_fallback(tmp_path, shards):
    out = tmp_path / "run"
    common = ("train.log_every=1", "checkpoint.every_steps=2", "checkpoint.keep_last=2")
    r = train([sys.executable], out, shards, "train.max_steps=8", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert sorted(p for p in os.listdir(ckpts) if p.startswith("step-")) == ["step-00000006", "step-00000008"]

    # truncate a file of the newest checkpoint
    victim = ckpts / "step-00000008" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    r = train([sys.executable], out, shards, "train.max_steps=10", "checkpoint.fallback_on_corrupt=false", *common)
    assert r.returncode == 2
    assert "mp_rank_00_model_states.pt is 100 bytes" in r.stderr and "fallback_on_corrupt" in r.stderr

    r = train([sys.executable], out, shards, "train.max_steps=10", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping corrupt checkpoint" in r.stdout and "resumed from step-00000006" in r.stdout
    # keep_last=2 keeps the two newest committed ones
    assert sorted(p for p in os.listdir(ckpts) if p.startswith("step-")) == ["step-00000008", "step-00000010"]
    assert (ckpts / "latest").read_text() == "step-00000010"
