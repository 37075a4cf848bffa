"""Errors a user can cause. Launchers print them as one clear line, never a traceback."""


class I2VError(Exception):
    """Base class for mistakes in input: config, paths, data. Exit code 2."""

    exit_code = 2


class ConfigError(I2VError):
    """A config key is unknown, mistyped, missing or inconsistent with another."""


class DataError(I2VError):
    """A shard, sample or file is missing, malformed, or too many samples are bad."""


class CheckpointError(I2VError):
    """A checkpoint is missing, corrupt, or cannot be loaded into this run."""
