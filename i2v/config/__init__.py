"""The run configuration: `schema` (the typed tree, its field docs and the checks that need only the
tree), `loader` (YAML, overrides, the command line) and `resolved` (the values derived from the tree
and the world size). The names below are the public interface."""

from i2v.config.loader import dump_yaml, from_dict, load_config, parse_args, to_dict
from i2v.config.resolved import Resolved, accumulation_steps, resolve
from i2v.config.schema import (
    REQUIRED, CheckpointConfig, Config, DataConfig, DeepSpeedConfig, DiffusionConfig, EMAConfig, KernelsConfig,
    LoRAConfig, ModelConfig, ParallelConfig, PrecomputeConfig, RemoteConfig, RunConfig, TextEncoderConfig,
    TrainConfig, VAEConfig, ValidationConfig, VideoConfig, check_sequence_parallel, check_validation, doc,
    get_dotted,
)

__all__ = [
    "REQUIRED", "CheckpointConfig", "Config", "DataConfig", "DeepSpeedConfig", "DiffusionConfig", "EMAConfig",
    "KernelsConfig", "LoRAConfig", "ModelConfig", "ParallelConfig", "PrecomputeConfig", "RemoteConfig", "Resolved",
    "RunConfig", "TextEncoderConfig", "TrainConfig", "VAEConfig", "ValidationConfig", "VideoConfig",
    "accumulation_steps", "check_sequence_parallel", "check_validation", "doc", "dump_yaml", "from_dict", "get_dotted", "load_config",
    "parse_args", "resolve", "to_dict",
]
