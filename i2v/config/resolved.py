"""What a validated config means at one world size: `resolve(cfg, world_size)`.

`Config` holds what the user wrote and is never changed by the checks; the values that follow
from it and the number of ranks (the data-parallel size, the gradient accumulation, the samples
per optimizer step) live here, computed in one place. So the config a run writes (its
config.yaml, the one in each checkpoint) keeps `train.grad_accum_steps` unset when the user left
it unset, and a resume on another world size derives it again from `train.global_batch_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

from i2v.config.schema import Config, TrainConfig, check_sequence_parallel
from i2v.core.errors import ConfigError


@dataclass(frozen=True)
class Resolved:
    world_size: int
    sequence_parallel_size: int
    dp_size: int  # data-parallel replicas: world_size / sequence_parallel_size
    grad_accum_steps: int  # micro-batches per rank per optimizer step
    global_batch_size: int  # samples per optimizer step over all ranks


def resolve(cfg: Config, world_size: int) -> Resolved:
    """The derived values of `cfg` on `world_size` ranks; a ConfigError names the key that does not fit."""
    sp = cfg.parallel.sequence_parallel_size
    check_sequence_parallel(sp, world_size)
    dp_size = world_size // sp
    accum = accumulation_steps(cfg.train, world_size, sp)
    return Resolved(world_size=world_size, sequence_parallel_size=sp, dp_size=dp_size, grad_accum_steps=accum,
                    global_batch_size=cfg.train.micro_batch_size * accum * dp_size)


def accumulation_steps(t: TrainConfig, world_size: int, sp: int = 1) -> int:
    """train.grad_accum_steps at this world size (data-parallel size world / sp): as given, or derived
    from train.global_batch_size."""
    dp_size = world_size // sp
    what = f"data-parallel size (world {world_size} / sequence parallel {sp})" if sp > 1 else "world size"
    if t.grad_accum_steps is None:
        if t.global_batch_size is None:
            return 1
        per_round = t.micro_batch_size * dp_size
        if t.global_batch_size % per_round:
            raise ConfigError(
                f"train.global_batch_size: {t.global_batch_size} is not a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x {what} ({dp_size}); choose a world size or micro-batch size that "
                "divides it, or set train.grad_accum_steps"
            )
        return t.global_batch_size // per_round
    got = t.micro_batch_size * t.grad_accum_steps * dp_size
    if t.global_batch_size is not None and got != t.global_batch_size:
        raise ConfigError(
            f"train.global_batch_size: is {t.global_batch_size}, but train.micro_batch_size "
            f"({t.micro_batch_size}) x train.grad_accum_steps ({t.grad_accum_steps}) x {what} "
            f"({dp_size}) = {got}; make them agree, or drop train.grad_accum_steps to derive it"
        )
    return t.grad_accum_steps
