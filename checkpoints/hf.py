"""Hugging Face checkpoints: `convert_hf` picks the converter from `config.json`, and the pieces
every converter shares (the weight files, a safetensors reader, the dtype to keep).

    convert_hf("path/to/hf-dir", "ckpt/out")     # GPT-2, Llama, Mistral, Qwen2/3, GPT-NeoX, GPT-J, OPT

The family comes from config.json's `architectures` (first entry), else its `model_type`;
anything else is refused with the list of what is supported. We never read pickled PyTorch
files: unpickling runs arbitrary code from the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError, UnsupportedCheckpointError

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


def supported_architectures() -> dict[str, str]:
    """HF `architectures` name -> the model_type it is converted as."""
    from .hf_decoder import FAMILIES
    out = {"GPT2LMHeadModel": "gpt2"}
    for fam in FAMILIES.values():
        out.update({a: fam.model_type for a in fam.architectures})
    return out


def family_of(hf: dict, source: str = "config.json") -> str:
    """The model_type a HF config converts as: from `architectures`, else `model_type`."""
    supported = supported_architectures()
    archs = hf.get("architectures") or []
    if archs and archs[0] in supported:
        return supported[archs[0]]
    if not archs and hf.get("model_type") in set(supported.values()):
        return hf["model_type"]
    what = f"architectures {archs}" if archs else f"model_type {hf.get('model_type')!r}"
    raise UnsupportedCheckpointError(f"{source}: {what} is not supported; supported architectures: "
                                     f"{', '.join(sorted(supported))}")


def convert_hf(src_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
               progress: bool = True, *, overwrite: bool = False):
    """Converts a Hugging Face model directory (config.json + safetensors) into an orca-jax
    checkpoint, keeping the weights' dtype unless `dtype` is given; tokenizer files are
    copied. Returns the model config."""
    src = Path(src_dir)
    hf = read_hf_config(src)
    if family_of(hf, str(src / "config.json")) == "gpt2":
        from .hf_gpt2 import convert_hf_gpt2
        return convert_hf_gpt2(src, out_dir, dtype, progress, overwrite=overwrite)
    from .hf_decoder import convert_hf_decoder
    return convert_hf_decoder(src, out_dir, dtype, progress, overwrite=overwrite)
