"""Errors that name the problem. The CLI prints them as one line and exits non-zero."""


class FmoeError(Exception):
    """Base class: a user-facing error with a one-line message."""


class ConfigError(FmoeError, ValueError):
    """A config.json that fmoe cannot use (unknown model_type, missing or invalid field). Also a
    ValueError, as HF transformers raises for a config it cannot use."""


class CheckpointError(FmoeError):
    """A missing, corrupt or mismatched checkpoint file or tensor."""


class ModelNotFoundError(FmoeError, OSError):
    """A path that does not exist, or a hub id that cannot be fetched (offline, not cached).
    Also an OSError, as HF transformers raises for a model it cannot find."""


class ExpertReadError(CheckpointError):
    """Reading a routed expert failed while serving (I/O error, truncated store, checksum).
    It fails the requests that needed the expert; the read is retried on the next need."""
