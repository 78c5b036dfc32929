"""Hugging Face GPT-2 (safetensors) -> orca-jax checkpoint.

One table maps every HF tensor to our parameter path and shape (STYLE.md, principle 9);
names stay recognisably HF's. HF's `Conv1D` stores weights as [in, out] already, so no
transpose is needed; the only reshapes split the fused QKV columns [D, 3D] into [D, 3, H, K]
and the attention out-projection rows [D, D] into [H, K, D] (HF `modeling_gpt2.py`,
`GPT2Attention._split_heads`: column j of c_attn is (qkv j // D, head (j % D) // K, dim j % K)).

Tensors are read one at a time, memory-mapped (`hf.SafetensorsFile`), and written
into preallocated [L, ...] stacks, so peak host memory is about one copy of the model.
We never read pickled PyTorch files: unpickling runs arbitrary code from the file.

Legend: V vocab, P positions, D width, H heads, K head dim, F MLP width, L layers.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..models.gpt2 import ACTIVATIONS, DTYPES, GPTConfig
from .errors import TensorMismatchError, UnsupportedCheckpointError
from .hf_files import check_tensor_names, checkpoint_dtype, open_files, read_hf_config, weight_files
from .store import TOKENIZER_FILES, save_checkpoint

# (HF name, our path, HF shape, our shape). Shapes are dimension letters from the legend; a
# leading number multiplies ("3D" = 3 * D).
GLOBAL_TENSORS = [
    ("wte.weight", "wte.embedding", "V D", "V D"),
    ("wpe.weight", "wpe.embedding", "P D", "P D"),
    ("ln_f.weight", "ln_f.scale", "D", "D"),
    ("ln_f.bias", "ln_f.bias", "D", "D"),
]
# Per block `h.{i}.`; stacked on a leading L axis in our tree.
LAYER_TENSORS = [
    ("ln_1.weight", "h.ln_1.scale", "D", "D"),
    ("ln_1.bias", "h.ln_1.bias", "D", "D"),
    ("attn.c_attn.weight", "h.attn.c_attn.kernel", "D 3D", "D 3 H K"),
    ("attn.c_attn.bias", "h.attn.c_attn.bias", "3D", "3 H K"),
    ("attn.c_proj.weight", "h.attn.c_proj.kernel", "D D", "H K D"),
    ("attn.c_proj.bias", "h.attn.c_proj.bias", "D", "D"),
    ("ln_2.weight", "h.ln_2.scale", "D", "D"),
    ("ln_2.bias", "h.ln_2.bias", "D", "D"),
    ("mlp.c_fc.weight", "h.mlp.c_fc.kernel", "D F", "D F"),
    ("mlp.c_fc.bias", "h.mlp.c_fc.bias", "F", "F"),
    ("mlp.c_proj.weight", "h.mlp.c_proj.kernel", "F D", "F D"),
    ("mlp.c_proj.bias", "h.mlp.c_proj.bias", "D", "D"),
]
# Buffers older transformers versions saved (causal mask, -1e4 fill): not weights.
IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
LM_HEAD = "lm_head.weight"  # tied to wte in GPT-2; checked equal if present

# HF GPT2Config options that change the computation; (field, value our model implements).
REQUIRED_OPTIONS = [
    ("scale_attn_by_inverse_layer_idx", False),
    ("reorder_and_upcast_attn", False),
    ("scale_attn_weights", True),
    ("add_cross_attention", False),
    ("tie_word_embeddings", True),
]


def _shape(spec: str, c: GPTConfig) -> tuple[int, ...]:
    dims = {"V": c.vocab_size, "P": c.n_positions, "D": c.n_embd, "H": c.n_head,
            "K": c.head_dim, "F": c.mlp_dim}
    out = []
    for tok in spec.split():
        mult, letter = re.fullmatch(r"(\d*)([A-Z]?)", tok).groups()
        out.append((int(mult) if mult else 1) * (dims[letter] if letter else 1))
    return tuple(out)


def config_from_hf(hf: dict, dtype: str | None = None, source: str = "config.json") -> GPTConfig:
    """Our GPTConfig from a HF GPT-2 `config.json` dict; refuses options we do not implement."""
    if hf.get("model_type") != "gpt2":
        raise UnsupportedCheckpointError(f"{source}: model_type is {hf.get('model_type')!r}; "
                                         "only 'gpt2' checkpoints can be converted")
    for field, want in REQUIRED_OPTIONS:
        if field in hf and hf[field] != want:
            raise UnsupportedCheckpointError(f"{source}: {field}={hf[field]!r} is not supported "
                                             f"(this converter implements {field}={want!r})")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise UnsupportedCheckpointError(f"{source}: activation_function={act!r} is not supported; "
                                         f"supported: {sorted(ACTIVATIONS)}")
    vocab = hf.get("vocab_size", 50257)

    def token_id(name):
        # GPT2Config defaults bos/eos to 50256 even for small vocabularies; an id the model
        # can never produce means "no such token".
        tid = hf.get(name, 50256)
        if isinstance(tid, list):  # newer configs allow several; GPTConfig keeps one
            tid = tid[0] if tid else None
        return tid if tid is not None and 0 <= tid < vocab else None

    try:
        return GPTConfig(
            vocab_size=vocab,
            n_positions=hf.get("n_positions", 1024),
            n_embd=hf.get("n_embd", 768),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_inner=hf.get("n_inner"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            activation=act,
            dtype=dtype or "float32",
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
        )
    except ValueError as e:
        raise UnsupportedCheckpointError(f"{source}: {e}") from e


def _entries(files: dict[str, Path], c: GPTConfig) -> list[tuple[str, str, str, str, int | None]]:
    """(HF name, our path, HF shape, our shape, layer or None) for every tensor to read.

    Refuses tensors the model would silently drop (e.g. more blocks than n_layer)."""
    prefix = "transformer." if any(n.startswith("transformer.") for n in files) else ""
    entries = [(prefix + hf, ours, hs, os_, None) for hf, ours, hs, os_ in GLOBAL_TENSORS]
    entries += [(f"{prefix}h.{i}.{hf}", ours, hs, os_, i)
                for i in range(c.n_layer) for hf, ours, hs, os_ in LAYER_TENSORS]
    check_tensor_names(files, [e[0] for e in entries], {LM_HEAD},
                       lambda n: IGNORED.fullmatch(n.removeprefix(prefix)), f"a GPT-2 LM with n_layer={c.n_layer}")
    return entries


def load_hf_gpt2_params(src: Path, c: GPTConfig, progress: bool = True) -> dict:
    """Reads the safetensors weights of `src` into our params tree (numpy, dtype `c.dtype`)."""
    files = weight_files(src)
    entries = _entries(files, c)
    dtype = DTYPES[c.dtype]
    params: dict = {}
    handles = open_files(files)
    for hf_name, ours, hf_spec, our_spec, layer in tqdm(
            entries, desc="converting", unit="tensor", disable=not progress):
        x = handles[files[hf_name]].get_tensor(hf_name)
        want = _shape(hf_spec, c)
        if x.shape != want:
            raise TensorMismatchError(f"tensor {hf_name} has shape {x.shape}, but config.json "
                                      f"implies {want} ({hf_spec})")
        x = x.reshape(_shape(our_spec, c)).astype(dtype)
        *parents, leaf = ours.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        if layer is None:
            node[leaf] = x
        else:
            if leaf not in node:
                node[leaf] = np.zeros((c.n_layer, *x.shape), dtype)  # [L, ...]
            node[leaf][layer] = x
    if LM_HEAD in files:
        head = handles[files[LM_HEAD]].get_tensor(LM_HEAD).astype(dtype)
        if not np.array_equal(head, params["wte"]["embedding"]):
            raise UnsupportedCheckpointError(f"{LM_HEAD} differs from wte.weight: untied LM "
                                             "heads are not supported")
    return params


def convert_hf_gpt2(src_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                    progress: bool = True, *, overwrite: bool = False) -> GPTConfig:
    """Converts a HF GPT-2 directory (config.json + safetensors) into an orca-jax checkpoint.

    dtype: "float32", "bfloat16" or "float16" for the stored params (default: the weights' own).
    Returns the model's GPTConfig. Tokenizer files present in `src_dir` are copied.
    """
    src = Path(src_dir)
    hf_config = read_hf_config(src)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype is None:
        files = weight_files(src)
        dtype = checkpoint_dtype(files, open_files(files))
    config = config_from_hf(hf_config, dtype, source=str(src / "config.json"))
    params = load_hf_gpt2_params(src, config, progress)
    tokenizer_files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    save_checkpoint(out_dir, config, params, tokenizer_files, overwrite=overwrite)
    return config
