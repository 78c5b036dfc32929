"""Hugging Face checkpoints -> orca-jax: `convert_hf` picks the converter from config.json.

    convert_hf("path/to/hf-dir", "ckpt/out")     # GPT-2, Llama, Mistral, Qwen2/3, GPT-NeoX, GPT-J, OPT

The family comes from config.json's `architectures` (first entry), else its `model_type`;
anything else is refused with the list of what is supported (docs/models.md).
"""
from __future__ import annotations

from pathlib import Path

from .errors import UnsupportedCheckpointError
from .hf_decoder import FAMILIES, convert_hf_decoder
from .hf_files import read_hf_config
from .hf_gpt2 import convert_hf_gpt2


def supported_architectures() -> dict[str, str]:
    """HF `architectures` name -> the model_type it is converted as."""
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
        return convert_hf_gpt2(src, out_dir, dtype, progress, overwrite=overwrite)
    return convert_hf_decoder(src, out_dir, dtype, progress, overwrite=overwrite)
