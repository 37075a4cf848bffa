"""The LoRA + EMA training runs shared by tests/test_lora_ema.py and tests/test_resume.py (started with
`train` of tests/runs.py).

The tiny model's random init is scaled up (model.init_std 0.2) so that its attention branch, and
with it the adapters, visibly moves the output; with the default init the adapters' effect on the
sampled frames is near fp32 rounding and an export test could not tell right from wrong.
"""

from __future__ import annotations

import os

LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.extra_trainable=[proj_out]", "model.init_std=0.2",
        "train.lr=1e-2", "train.micro_batch_size=2", "train.log_every=1", "deepspeed.zero_stage=2")
# Run A: 2-rank ZeRO-2 LoRA with train.ema.decay=0.9, a commit after every step (the EMA test
# rebuilds the EMA from each step's consolidated weights), deterministic (the resume test's reference).
RUN_A = (*LORA, "train.ema.decay=0.9", "train.max_steps=8", "checkpoint.every_steps=1", "checkpoint.keep_last=8",
         "run.deterministic=true")


def step_dir(run, step: int) -> str:
    from i2v.checkpoint.commit import tag_for

    return os.path.join(run, "checkpoints", tag_for(step))
