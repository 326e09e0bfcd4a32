"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class TridentError(Exception):
    """A user-facing error (bad config, bad checkpoint, bad data). Never a bug in trident itself."""


class ConfigError(TridentError):
    """An invalid or inconsistent configuration."""


class CheckpointError(TridentError):
    """A missing, mis-shaped, foreign or half-written checkpoint."""


class DataError(TridentError):
    """A missing, malformed or empty dataset, or a tokenizer that does not fit the model."""
