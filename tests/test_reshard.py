"""Resume at another world size: ZeRO-1/2/3 state resharded through DeepSpeed's universal form.

A 2-rank run (global batch 12 = micro-batch 2 x accumulation 3 x 2 ranks) is stopped at step 6 and
resumed on 3 ranks (accumulation 2) and on 1 rank (accumulation 6). Steps 7-12 must log the losses of
the uninterrupted run, and the state as loaded must be the state as saved.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from runs import ENV, losses, train

TAG = "step-00000006"
# Constant LR and weight decay on, so the two parameter groups differ (train.no_decay): a load that
# mixed up their hyperparameters would change the trajectory.
RESHARD = ("train.max_steps=12", "train.log_every=1", "checkpoint.every_steps=6", "checkpoint.keep_last=2",
           "train.micro_batch_size=2", "train.global_batch_size=12", "train.lr_schedule=constant",
           "train.warmup_steps=0", "train.weight_decay=0.01", "run.deterministic=true")

# The 3-rank resume: after the Trainer has loaded the 2-rank checkpoint, the state is saved as it is
# (at this world size) into another directory, then training goes on.
RESUME_AND_SAVE = textwrap.dedent("""
    import sys
    from i2v.checkpoint.checkpointer import Checkpointer
    from i2v.config import load_config
    from i2v.core.distributed import init_distributed, shutdown
    from i2v.train.trainer import Trainer

    env = init_distributed()
    tr = Trainer(load_config("configs/tiny.yaml", sys.argv[2:]), env)
    kept = tr.checkpointer
    tr.checkpointer = Checkpointer(sys.argv[1], 1, env)
    tr.save()
    tr.checkpointer = kept
    tr.train()
    shutdown()
""")


def stopped_at_step_6(ref, run):
    """A copy of the finished run `ref` as it was when step 6 had just been committed."""
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step-00000012")
    (run / "checkpoints" / "latest").write_text(TAG)
    with open(run / "metrics.jsonl") as f:
        kept = [line for line in f if json.loads(line)["step"] <= 6]
    (run / "metrics.jsonl").write_text("".join(kept))


def universal_tensors(path):
    """Every fp32 master weight, Adam moment and step of a universal checkpoint, by parameter name."""
    out = {}
    zero = os.path.join(path, "zero")
    for name in sorted(os.listdir(zero)):
        if os.path.isdir(os.path.join(zero, name)):
            for f in sorted(os.listdir(os.path.join(zero, name))):
                state = torch.load(os.path.join(zero, name, f), map_location="cpu", weights_only=False)
                out[f"{name}/{f}"] = state["param"] if isinstance(state, dict) else state
    return out


def assert_losses_follow(ref, run):
    ref_losses, _ = losses(ref)
    run_losses, records = losses(run)
    assert sorted(records) == list(range(1, 13))
    for step in range(7, 13):
        assert run_losses[step - 1] == pytest.approx(ref_losses[step - 1], rel=1e-5, abs=0), step


# ZeRO-2 is left out: it shares ZeRO-1's optimizer (DeepSpeedZeroOptimizer) and so its checkpoint files and
# their conversion; it differs in when gradients are partitioned, which no saved state shows.
@pytest.mark.parametrize("stage", [1, 3])
def test_zero_resume_on_3_and_on_1_rank_follows_the_2_rank_trajectory(tmp_path, shards, stage):
    from i2v.checkpoint.commit import saved_client_state
    from i2v.checkpoint.reshard import convert, universal_path

    common = (*RESHARD, f"deepspeed.zero_stage={stage}")
    ref = tmp_path / "ref"
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = train(two, ref, shards, *common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 rank(s)" in r.stdout
    groups = saved_client_state(str(ref / "checkpoints" / TAG))["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]

    # 3 ranks: converted once, loaded; the state as loaded, saved again at 3 ranks, is the state as saved
    on3, saved3 = tmp_path / "on3", tmp_path / "saved3"
    stopped_at_step_6(ref, on3)
    script = tmp_path / "resume_and_save.py"
    script.write_text(RESUME_AND_SAVE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", str(script),
           str(saved3), f"run.output_dir={on3}", f"data.latent_shards={shards}", *common]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"converting {on3 / 'checkpoints' / TAG} (written by 2 rank(s))" in r.stdout
    assert f"resumed from {TAG}: step 6, 36 global micro-batches consumed" in r.stdout and "3 rank(s)" in r.stdout
    assert_losses_follow(ref, on3)
    loaded = universal_tensors(convert(str(saved3), TAG, log=lambda m: None))
    written = universal_tensors(universal_path(str(on3 / "checkpoints"), TAG))
    assert sorted(loaded) == sorted(written) and any(k.endswith("exp_avg_sq.pt") for k in loaded)
    assert all(torch.equal(loaded[k], written[k]) for k in loaded), [k for k in loaded if not torch.equal(loaded[k], written[k])]
    # a parameter whose size 3 ranks do not divide was among them
    assert any(v.numel() % 3 for k, v in loaded.items() if k.endswith("fp32.pt"))

    # 1 rank, plain python
    on1 = tmp_path / "on1"
    stopped_at_step_6(ref, on1)
    r = train([sys.executable], on1, shards, *common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {TAG}: step 6, 36 global micro-batches consumed" in r.stdout and "1 rank(s)" in r.stdout
    assert_losses_follow(ref, on1)


def test_offline_conversion_commits_once_and_a_corrupt_or_stale_one_is_made_again(tmp_path, shards):
    from i2v.checkpoint.reshard import convert, converted, universal_path

    out = tmp_path / "run"
    r = train([sys.executable], out, shards, "train.max_steps=2", "checkpoint.every_steps=2", "train.micro_batch_size=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root, tag = str(out / "checkpoints"), "step-00000002"
    (out / "checkpoints" / "universal" / f"tmp-{tag}").mkdir(parents=True)  # a conversion killed half-way

    def reshard(*args):
        return subprocess.run([sys.executable, "launcher/reshard.py", *args], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=300)

    r = reshard("--checkpoint", root)  # the checkpoints/ root: its newest commit
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    final = universal_path(root, tag)
    assert f"universal checkpoint: {final}" in r.stdout and converted(root, tag) == final
    assert sorted(os.listdir(os.path.dirname(final))) == [tag]  # no tmp- left, no latest_universal
    said = []
    assert convert(root, tag, log=said.append) == final and said == [f"universal form of {tag} already committed: {final}"]

    # a truncated file, then a conversion recorded from another copy of the tag: neither is used, both are redone
    victim = os.path.join(final, "zero", "proj_out.weight", "exp_avg.pt")
    with open(victim, "r+b") as f:
        f.truncate(10)
    assert converted(root, tag) is None
    said.clear()
    assert convert(root, tag, log=said.append) == final and said[0].startswith("converting")
    marker = os.path.join(final, "COMMITTED.json")
    record = json.loads(open(marker).read())
    record["source_marker_sha256"] = "0" * 64
    open(marker, "w").write(json.dumps(record))
    assert converted(root, tag) is None
    said.clear()
    assert convert(root, tag, log=said.append) == final and said[0].startswith("converting")
    assert converted(root, tag) == final

    r = reshard("--checkpoint", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "not a checkpoint directory" in r.stderr and "Traceback" not in r.stderr
