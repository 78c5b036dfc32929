"""What every Hugging Face converter shares: the weight files, a safetensors reader (bf16
included), the dtype to keep, config.json, and the check that every tensor is accounted for.
We never read pickled PyTorch files: unpickling runs arbitrary code from the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import (CheckpointError, CheckpointNotFoundError, TensorMismatchError, UnsafeCheckpointError,
                     UnsupportedCheckpointError)

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl")  # plus pytorch_model*.bin
# safetensors dtype -> numpy (bfloat16 through ml_dtypes: numpy has none).
_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
# The checkpoint dtypes we keep as they are (`orca-jax convert` without --dtype).
_KEPT = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class SafetensorsFile:
    """Read-only, memory-mapped tensors of one .safetensors file (any dtype, bf16 included):
    its JSON header says each tensor's dtype, shape and byte range."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.header = header
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if header else None

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def get_tensor(self, name: str) -> np.ndarray:
        h = self.header[name]
        if h["dtype"] not in _NP_DTYPES:
            raise UnsupportedCheckpointError(f"{self.path.name}: tensor {name} has dtype {h['dtype']}, "
                                             f"which is not supported ({sorted(_NP_DTYPES)})")
        a, b = h["data_offsets"]
        return self._data[a:b].view(_NP_DTYPES[h["dtype"]]).reshape(h["shape"])


def weight_files(src: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it (single file or sharded index)."""
    index = src / "model.safetensors.index.json"
    single = src / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: src / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointNotFoundError(f"{index.name} lists {f.name}, which is missing from {src}")
        return files
    if single.is_file():
        return {name: single for name in SafetensorsFile(single).keys()}
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES
                     or (p.name.startswith("pytorch_model") and p.suffix == ".bin"))
    if pickles:
        raise UnsafeCheckpointError(
            f"{src} has only pickled PyTorch weights ({', '.join(pickles)}) and no model.safetensors. "
            "Loading a pickle executes arbitrary code stored in the file, so orca-jax refuses to. "
            "Re-save it as safetensors where you trust it, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`.")
    raise CheckpointNotFoundError(f"no weights in {src}: expected model.safetensors or "
                                  "model.safetensors.index.json")


def open_files(files: dict[str, Path]) -> dict[Path, SafetensorsFile]:
    return {f: SafetensorsFile(f) for f in sorted(set(files.values()))}


def checkpoint_dtype(files: dict[str, Path], handles: dict[Path, SafetensorsFile]) -> str:
    """The dtype the checkpoint stores its floating-point weights in (float32 when mixed)."""
    kinds = {handles[f].dtype(n) for n, f in files.items() if handles[f].dtype(n) in _KEPT}
    return _KEPT[kinds.pop()] if len(kinds) == 1 else "float32"


def read_hf_config(src: Path) -> dict:
    if not src.is_dir():
        raise CheckpointNotFoundError(f"source directory {src} does not exist")
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise CheckpointNotFoundError(f"{cfg_file} is missing: a Hugging Face checkpoint directory "
                                      "needs its config.json")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e


def check_tensor_names(files, wanted: list[str], also_known: set[str], ignored, what: str) -> None:
    """Every tensor of the checkpoint is one we read (`wanted`), may read (`also_known`) or
    `ignored(name)` says is not a weight: an unexpected one would be silently dropped (e.g.
    more layers than config.json says). Then every wanted tensor must be there."""
    known = set(wanted) | also_known
    unexpected = sorted(n for n in files if n not in known and not ignored(n))
    if unexpected:
        raise TensorMismatchError(f"unexpected tensors for {what}: "
                                  f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    missing = [n for n in wanted if n not in files]
    if missing:
        raise TensorMismatchError(f"missing tensor {missing[0]}"
                                  f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} "
                                  "in the safetensors weights")
