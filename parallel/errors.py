"""The user-facing error types. They live in the library so that `parallel/` raises the same errors the
CLI reports on one line (engine/errors.py adds the engine's own)."""


class TridentError(Exception):
    """A user-facing error (bad config, bad checkpoint, bad data, a diverged run). Never a bug in trident."""


class ConfigError(TridentError):
    """An invalid or inconsistent configuration."""


class TrainingError(TridentError):
    """A run that cannot go on (e.g. the fp16 loss scale fell below its minimum)."""
