"""The exception types users see: the CLI prints the message on one line and exits non-zero."""
from parallel.errors import ConfigError, TrainingError, TridentError  # noqa: F401


class CheckpointError(TridentError):
    """A missing, mis-shaped, foreign or half-written checkpoint."""


class DataError(TridentError):
    """A missing, malformed or empty dataset, or a tokenizer that does not fit the model."""


class RunFailed(TridentError):
    """A rank of a launched run died or failed (the launcher names it)."""
