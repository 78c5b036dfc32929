"""Checkpoint converters (Hugging Face safetensors) and Orbax save/restore with target shardings.

Only the error types are imported here, so `import orca_jax.checkpoints` stays light; import
`orca_jax.checkpoints.store` / `.hf_gpt2` for the functions.
"""
from .errors import (CheckpointError, CheckpointNotFoundError, TensorMismatchError,
                     UnsafeCheckpointError, UnsupportedCheckpointError)

__all__ = ["CheckpointError", "CheckpointNotFoundError", "TensorMismatchError",
           "UnsafeCheckpointError", "UnsupportedCheckpointError"]
