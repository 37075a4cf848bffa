"""Train the I2V DiT: `python|torchrun|deepspeed launcher/train.py --config FILE [key=value ...]`."""

from i2v.cli import run
from i2v.config import parse_args


def main():
    cfg, _ = parse_args(description=__doc__)  # config errors surface before any process group starts

    from i2v.distributed import init_distributed, shutdown
    from i2v.trainer import Trainer

    env = init_distributed()
    try:
        Trainer(cfg, env).train()
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown()


if __name__ == "__main__":
    run(main)
