"""Train the I2V DiT: `python|torchrun|deepspeed launcher/train.py --config FILE [key=value ...]`."""

import os

from i2v.core.cli import run
from i2v.config import check_validation, parse_args, resolve


def main():
    cfg, _ = parse_args(description=__doc__)  # config errors surface before any process group starts
    # torchrun and the deepspeed launcher set WORLD_SIZE: a global batch that does not fit it fails here too.
    resolve(cfg, int(os.environ.get("WORLD_SIZE", "1")))

    from i2v.checkpoint.commit import finished_step
    from i2v.data.lineage import resolve_for_training

    main_rank = os.environ.get("RANK", "0") == "0"
    # The VAE and text encoder are the ones that made the latents (or the run stops here, exit 2).
    for line in resolve_for_training(cfg):
        if main_rank:
            print(f"[i2v] {line}", flush=True)
    check_validation(cfg, training=True)  # against the adopted VAE, still before any process group
    done = finished_step(cfg)
    if done is not None:
        if main_rank:
            print(f"[i2v] {cfg.run.output_dir} already finished: its newest checkpoint is step {done} and "
                  f"train.max_steps is {cfg.train.max_steps}; nothing to do (raise train.max_steps to go on)",
                  flush=True)
        return 0

    from i2v.core.distributed import init_distributed, shutdown
    from i2v.plan.planner import checkpointing_at_start
    from i2v.train.trainer import Trainer

    # `model.gradient_checkpointing: auto` is decided here, by the memory model, on this rank's device.
    checkpointing = checkpointing_at_start(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    env = init_distributed()
    trainer = None
    try:
        trainer = Trainer(cfg, env, checkpointing=checkpointing)
        trainer.train()
    except BaseException:
        shutdown(clean=False)
        raise
    finally:
        if trainer is not None:
            trainer.close()
    shutdown()


if __name__ == "__main__":
    run(main)
