"""Checkpoint errors: one base class, each also a built-in type so generic handlers still work.

Messages name the file, field or tensor at fault, because a user converting a checkpoint
cannot see inside our loader.
"""


class CheckpointError(Exception):
    """Base of every error raised while reading, converting or restoring a checkpoint."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A directory, config file or weights file is missing, or a directory is not a checkpoint."""


class UnsupportedCheckpointError(CheckpointError, ValueError):
    """The checkpoint is valid but uses an architecture or option this converter does not run."""


class UnsafeCheckpointError(CheckpointError, ValueError):
    """Only pickled weights (`pytorch_model.bin`, `.pt`, `.pth`) are present; we never unpickle."""


class TensorMismatchError(CheckpointError, ValueError):
    """A tensor is missing, unexpected, or has the wrong shape for the config."""
