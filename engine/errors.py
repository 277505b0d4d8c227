"""Errors the engine raises for bad input. Each message is one line that names the file, field or
tensor and says what is wrong; the command line prints it as it is."""


class ConfigError(ValueError):
    """A config.json that cannot describe a Kimi Linear model."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded."""
