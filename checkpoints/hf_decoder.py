"""Hugging Face Llama, Mistral, Qwen2, Qwen3, GPT-NeoX, GPT-J and OPT -> orca-jax (models/decoder.py).

Each family is a `Family`: which HF configs it reads (`architectures`, `model_type`), how its
config.json maps onto `DecoderConfig` (options we do not run are refused by name), and one
table of tensors: (HF name, our path, HF shape, transform), per layer with `{i}`. Shapes are
products of dimension letters from the legend, checked before anything is written.

Transforms: "=" reshape only; "T" transpose a torch Linear weight [out, in] to our
[in, ...out] layout; "qkv0" / "qkv1" / "qkv2" take q, k or v out of GPT-NeoX's fused
query_key_value, whose rows are ordered (head, q/k/v, dim).

Legend: V vocab, D width, H heads, G KV heads, K head dim, F MLP width, P learned positions
(OPT: plus its offset of 2), L layers.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..models.decoder import DecoderConfig, abstract_params
from ..models.layers import ACTIVATIONS, DTYPES
from .errors import TensorMismatchError, UnsupportedCheckpointError
from .hf_files import check_tensor_names, checkpoint_dtype, open_files, read_hf_config, weight_files
from .store import TOKENIZER_FILES, save_checkpoint


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str                          # HF model_type
    architectures: tuple[str, ...]           # HF `architectures` names converted as this family
    config: Callable[[dict], dict]           # HF config.json -> DecoderConfig fields
    tensors: Callable[[DecoderConfig], list]  # (HF name, our path, HF shape, transform)
    prefixes: tuple[str, ...]                # of the HF tensor names, tried in order


def _get(hf: dict, *names, default=None):
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    return default


def _refuse(hf: dict, options: dict) -> None:
    """Options we do not run, as {field: value we implement}: a different value is refused."""
    for field, want in options.items():
        if field in hf and hf[field] is not None and hf[field] != want:
            raise UnsupportedCheckpointError(f"{field}={hf[field]!r} is not supported "
                                             f"(orca-jax implements {field}={want!r})")


def _rope(hf: dict, theta_default: float) -> dict:
    """rope_theta and scaling from either spelling: `rope_theta` + `rope_scaling` (checkpoints
    on the Hub) or `rope_parameters` (transformers 5). Linear and dynamic scaling stretch the
    context to max_position_embeddings x factor (vLLM's rule); llama3 configs already give
    the stretched length."""
    params = dict(_get(hf, "rope_parameters", "rope_scaling", default={}) or {})
    theta = params.pop("rope_theta", None) or _get(hf, "rope_theta", "rotary_emb_base", default=theta_default)
    params.pop("partial_rotary_factor", None)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind in ("yarn", "longrope", "proportional") or kind.startswith("dynamic") and kind != "dynamic":
        raise UnsupportedCheckpointError(f"rope scaling {kind!r} is not supported "
                                         "(supported: default, linear, dynamic, llama3)")
    scaling, out = {}, {}
    trained = _get(hf, "max_position_embeddings", "n_positions")
    if kind != "default":
        scaling = {"rope_type": kind, "factor": float(params["factor"])}
        if kind == "llama3":
            scaling.update(low_freq_factor=float(params["low_freq_factor"]),
                           high_freq_factor=float(params["high_freq_factor"]),
                           original_max_position_embeddings=int(params["original_max_position_embeddings"]))
        else:
            out["max_positions"] = int(trained * scaling["factor"])
        if kind == "dynamic":
            scaling["original_max_position_embeddings"] = int(trained)
    return {**out, "rope_theta": float(theta), "rope_scaling": tuple(sorted(scaling.items()))}


def _common(hf: dict) -> dict:
    eos = hf.get("eos_token_id")
    return {"model_type": hf.get("model_type", "?"), "vocab_size": hf["vocab_size"],
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_id": eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None,
            "extra_eos_token_ids": tuple(eos[1:]) if isinstance(eos, list) else ()}


# ----------------------------------------------------------------------------- Llama-shaped

def _llama_config(hf: dict) -> dict:
    kind = hf.get("model_type")
    _refuse(hf, {"use_sliding_window": False} if kind in ("qwen2", "qwen3") else {})
    bias = bool(hf.get("attention_bias", False))
    return {**_common(hf), "max_positions": hf["max_position_embeddings"], **_rope(hf, 10000.0),
            "hidden_size": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
            "num_heads": hf["num_attention_heads"],
            "num_kv_heads": _get(hf, "num_key_value_heads", "num_attention_heads"),
            "head_dim": hf.get("head_dim"), "intermediate_size": hf["intermediate_size"],
            "norm": "rms", "norm_eps": hf.get("rms_norm_eps", 1e-6),
            "mlp": "gated", "activation": hf.get("hidden_act", "silu"),
            "qkv_bias": True if kind == "qwen2" else bias, "o_bias": False if kind == "qwen2" else bias,
            "mlp_bias": bool(hf.get("mlp_bias", False)), "qk_norm": kind == "qwen3",
            "sliding_window": hf.get("sliding_window") if kind == "mistral" else None,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}


def _llama_tensors(c: DecoderConfig) -> list:
    lin = lambda hf, ours, out, inn, bias: [(f"layers.{{i}}.{hf}.weight", f"layers.{ours}.kernel", f"{out} {inn}", "T")] + (
        [(f"layers.{{i}}.{hf}.bias", f"layers.{ours}.bias", out, "=")] if bias else [])
    t = [("embed_tokens.weight", "embed.embedding", "V D", "="), ("norm.weight", "final_norm.scale", "D", "="),
         ("layers.{i}.input_layernorm.weight", "layers.attn_norm.scale", "D", "="),
         ("layers.{i}.post_attention_layernorm.weight", "layers.mlp_norm.scale", "D", "=")]
    t += lin("self_attn.q_proj", "attn.q", "HK", "D", c.qkv_bias) + lin("self_attn.k_proj", "attn.k", "GK", "D", c.qkv_bias)
    t += lin("self_attn.v_proj", "attn.v", "GK", "D", c.qkv_bias) + lin("self_attn.o_proj", "attn.o", "D", "HK", c.o_bias)
    t += lin("mlp.gate_proj", "mlp.gate", "F", "D", c.mlp_bias) + lin("mlp.up_proj", "mlp.up", "F", "D", c.mlp_bias)
    t += lin("mlp.down_proj", "mlp.down", "D", "F", c.mlp_bias)
    if c.qk_norm:
        t += [("layers.{i}.self_attn.q_norm.weight", "layers.attn.q_norm.scale", "K", "="),
              ("layers.{i}.self_attn.k_norm.weight", "layers.attn.k_norm.scale", "K", "=")]
    return t


# ----------------------------------------------------------------------------- GPT-NeoX, GPT-J, OPT

def _neox_config(hf: dict) -> dict:
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    pct = _get(hf, "partial_rotary_factor", default=None)
    pct = pct if pct is not None else (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    return {**_common(hf), "max_positions": hf["max_position_embeddings"], **_rope(hf, 10000.0),
            "hidden_size": D, "num_layers": hf["num_hidden_layers"],
            "num_heads": H, "intermediate_size": hf["intermediate_size"], "norm": "layer", "norm_bias": True,
            "norm_eps": hf.get("layer_norm_eps", 1e-5), "mlp": "plain", "activation": hf.get("hidden_act", "gelu"),
            "qkv_bias": hf.get("attention_bias", True), "o_bias": hf.get("attention_bias", True), "mlp_bias": True,
            "parallel_residual": hf.get("use_parallel_residual", True), "rotary_dim": int(D // H * pct),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}


def _neox_tensors(c: DecoderConfig) -> list:
    t = [("embed_in.weight", "embed.embedding", "V D", "="), ("final_layer_norm.weight", "final_norm.scale", "D", "="),
         ("final_layer_norm.bias", "final_norm.bias", "D", "=")]
    for hf, ours in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
        t += [(f"layers.{{i}}.{hf}.weight", f"layers.{ours}.scale", "D", "="),
              (f"layers.{{i}}.{hf}.bias", f"layers.{ours}.bias", "D", "=")]
    for j, name in enumerate("qkv"):
        t.append(("layers.{i}.attention.query_key_value.weight", f"layers.attn.{name}.kernel", "3HK D", f"qkv{j}"))
        if c.qkv_bias:
            t.append(("layers.{i}.attention.query_key_value.bias", f"layers.attn.{name}.bias", "3HK", f"qkv{j}"))
    t += [("layers.{i}.attention.dense.weight", "layers.attn.o.kernel", "D HK", "T"),
          ("layers.{i}.mlp.dense_h_to_4h.weight", "layers.mlp.up.kernel", "F D", "T"),
          ("layers.{i}.mlp.dense_h_to_4h.bias", "layers.mlp.up.bias", "F", "="),
          ("layers.{i}.mlp.dense_4h_to_h.weight", "layers.mlp.down.kernel", "D F", "T"),
          ("layers.{i}.mlp.dense_4h_to_h.bias", "layers.mlp.down.bias", "D", "=")]
    if c.o_bias:
        t.append(("layers.{i}.attention.dense.bias", "layers.attn.o.bias", "D", "="))
    return t


def _gptj_config(hf: dict) -> dict:
    D, H = hf["n_embd"], hf["n_head"]
    return {**_common(hf), "hidden_size": D, "num_layers": hf["n_layer"], "num_heads": H,
            "intermediate_size": hf.get("n_inner") or 4 * D, "max_positions": hf["n_positions"],
            "norm": "layer", "norm_bias": True, "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "mlp": "plain",
            "activation": hf.get("activation_function", "gelu_new"), "mlp_bias": True,
            "parallel_residual": True, "shared_norm": True, "rotary_dim": hf.get("rotary_dim") or D // H,
            "rope_interleaved": True, "rope_theta": 10000.0,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "lm_head_bias": True}


def _gptj_tensors(c: DecoderConfig) -> list:
    t = [("wte.weight", "embed.embedding", "V D", "="), ("ln_f.weight", "final_norm.scale", "D", "="),
         ("ln_f.bias", "final_norm.bias", "D", "="),
         ("h.{i}.ln_1.weight", "layers.attn_norm.scale", "D", "="), ("h.{i}.ln_1.bias", "layers.attn_norm.bias", "D", "="),
         ("h.{i}.mlp.fc_in.weight", "layers.mlp.up.kernel", "F D", "T"), ("h.{i}.mlp.fc_in.bias", "layers.mlp.up.bias", "F", "="),
         ("h.{i}.mlp.fc_out.weight", "layers.mlp.down.kernel", "D F", "T"),
         ("h.{i}.mlp.fc_out.bias", "layers.mlp.down.bias", "D", "="),
         ("h.{i}.attn.out_proj.weight", "layers.attn.o.kernel", "D HK", "T")]
    t += [(f"h.{{i}}.attn.{n}_proj.weight", f"layers.attn.{n}.kernel", "HK D", "T") for n in "qkv"]
    return t


def _opt_config(hf: dict) -> dict:
    _refuse(hf, {"do_layer_norm_before": True, "_remove_final_layer_norm": False,
                 "layer_norm_elementwise_affine": True, "word_embed_proj_dim": hf["hidden_size"]})
    bias = hf.get("enable_bias", True)
    return {**_common(hf), "hidden_size": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
            "num_heads": hf["num_attention_heads"], "intermediate_size": hf["ffn_dim"],
            "max_positions": hf["max_position_embeddings"], "norm": "layer", "norm_bias": True, "norm_eps": 1e-5,
            "mlp": "plain", "activation": hf.get("activation_function", "relu"), "qkv_bias": bias, "o_bias": bias,
            "mlp_bias": bias, "positions": "learned", "position_offset": 2,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True))}


def _opt_tensors(c: DecoderConfig) -> list:
    t = [("embed_tokens.weight", "embed.embedding", "V D", "="),
         ("embed_positions.weight", "pos_embed.embedding", "P D", "="),
         ("final_layer_norm.weight", "final_norm.scale", "D", "="),
         ("final_layer_norm.bias", "final_norm.bias", "D", "=")]
    for hf, ours in (("self_attn_layer_norm", "attn_norm"), ("final_layer_norm", "mlp_norm")):
        t += [(f"layers.{{i}}.{hf}.weight", f"layers.{ours}.scale", "D", "="),
              (f"layers.{{i}}.{hf}.bias", f"layers.{ours}.bias", "D", "=")]
    for hf, ours, out, inn in (("self_attn.q_proj", "attn.q", "HK", "D"), ("self_attn.k_proj", "attn.k", "HK", "D"),
                               ("self_attn.v_proj", "attn.v", "HK", "D"), ("self_attn.out_proj", "attn.o", "D", "HK"),
                               ("fc1", "mlp.up", "F", "D"), ("fc2", "mlp.down", "D", "F")):
        t.append((f"layers.{{i}}.{hf}.weight", f"layers.{ours}.kernel", f"{out} {inn}", "T"))
        if c.qkv_bias:
            t.append((f"layers.{{i}}.{hf}.bias", f"layers.{ours}.bias", out, "="))
    return t


FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("llama", ("LlamaForCausalLM",), _llama_config, _llama_tensors, ("model.", "")),
    Family("mistral", ("MistralForCausalLM",), _llama_config, _llama_tensors, ("model.", "")),
    Family("qwen2", ("Qwen2ForCausalLM",), _llama_config, _llama_tensors, ("model.", "")),
    Family("qwen3", ("Qwen3ForCausalLM",), _llama_config, _llama_tensors, ("model.", "")),
    Family("gpt_neox", ("GPTNeoXForCausalLM",), _neox_config, _neox_tensors, ("gpt_neox.", "")),
    Family("gptj", ("GPTJForCausalLM",), _gptj_config, _gptj_tensors, ("transformer.", "")),
    Family("opt", ("OPTForCausalLM",), _opt_config, _opt_tensors, ("model.decoder.", "decoder.", "")),
]}
# LM-head tensor names (untied heads, or a tied copy saved anyway), per family.
LM_HEADS = {"gpt_neox": ("embed_out", "lm_head")}
# Buffers some checkpoints carry that are not weights.
IGNORED = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|\.attention\.bias|\.attention\.masked_bias|"
                     r"rotary_emb\.inv_freq)$")


def _family(hf: dict, source: str) -> Family:
    """The family of a HF config: by `architectures`, else `model_type`."""
    archs = hf.get("architectures") or []
    for fam in FAMILIES.values():
        if (archs and archs[0] in fam.architectures) or (not archs and hf.get("model_type") == fam.model_type):
            return fam
    raise UnsupportedCheckpointError(f"{source}: {archs or hf.get('model_type')!r} is not one of "
                                     f"{sorted(a for f in FAMILIES.values() for a in f.architectures)}")


def config_from_hf(hf: dict, dtype: str | None = None, source: str = "config.json") -> DecoderConfig:
    """Our DecoderConfig from a HF config.json dict of a supported family."""
    fam = _family(hf, source)
    try:
        fields = fam.config(hf)
        act = fields.get("activation")
        if act not in ACTIVATIONS:
            raise UnsupportedCheckpointError(f"activation {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        extra = fields.pop("extra_eos_token_ids")
        fields["eos_token_ids"] = tuple(t for t in extra if 0 <= t < fields["vocab_size"])
        for name in ("bos_token_id", "eos_token_id"):
            if fields[name] is not None and not 0 <= fields[name] < fields["vocab_size"]:
                fields[name] = None
        return DecoderConfig(**fields, dtype=dtype or "float32")
    except (UnsupportedCheckpointError, ValueError, KeyError) as e:
        msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise UnsupportedCheckpointError(f"{source}: {msg}") from e


def _dims(spec: str, c: DecoderConfig) -> tuple[int, ...]:
    """'3HK D' -> (3 * H * K, D) for config `c`."""
    d = {"V": c.vocab_size, "D": c.hidden_size, "H": c.num_heads, "G": c.num_kv_heads, "K": c.head_dim,
         "F": c.intermediate_size, "P": c.max_positions + c.position_offset}
    out = []
    for tok in spec.split():
        mult, letters = re.fullmatch(r"(\d*)([A-Z]*)", tok).groups()
        out.append((int(mult) if mult else 1) * math.prod(d[ch] for ch in letters))
    return tuple(out)


def _transform(x: np.ndarray, how: str, shape: tuple[int, ...], c: DecoderConfig) -> np.ndarray:
    """HF tensor x -> our per-layer shape `shape`."""
    if how == "T":
        return x.T.reshape(shape)
    if how.startswith("qkv"):
        j = int(how[3:])
        if x.ndim == 1:                                                        # [3HK] bias
            return x.reshape(c.num_heads, 3, c.head_dim)[:, j]
        return x.reshape(c.num_heads, 3, c.head_dim, -1)[:, j].transpose(2, 0, 1)  # [D, H, K]
    return x.reshape(shape)


def load_hf_decoder_params(src: Path, c: DecoderConfig, progress: bool = True) -> dict:
    """Reads the safetensors weights of `src` into our params tree (numpy, dtype `c.dtype`)."""
    fam = FAMILIES[c.model_type]
    files = weight_files(src)
    handles = open_files(files)
    embed = next(t[0] for t in fam.tensors(c) if t[1] == "embed.embedding")
    prefix = next((p for p in fam.prefixes if p + embed in files), None)
    if prefix is None:
        raise TensorMismatchError(f"no {embed} in the safetensors weights (tried the prefixes {list(fam.prefixes)})")
    entries = []  # (HF name, our path, HF shape, transform, layer)
    for hf, ours, spec, how in fam.tensors(c):
        layers = range(c.num_layers) if "{i}" in hf else [None]
        entries += [(prefix + hf.format(i=i), ours, spec, how, i) for i in layers]
    heads = [p + n + ".weight" for n in (*LM_HEADS.get(c.model_type, ()), "lm_head") for p in ("", prefix)]
    head = next((n for n in heads if n in files), None)
    if not c.tie_embeddings:
        if head is None:
            raise TensorMismatchError(f"config.json has untied embeddings but there is no LM head ({heads[0]})")
        entries.append((head, "lm_head.kernel", "V D", "=", None))
        if c.lm_head_bias:
            entries.append((head.replace(".weight", ".bias"), "lm_head.bias", "V", "=", None))
    check_tensor_names(files, [e[0] for e in entries], {head} if head else set(), IGNORED.fullmatch,
                       f"a {c.model_type} model with {c.num_layers} layers")

    dtype = DTYPES[c.dtype]
    shapes = abstract_params(c)
    params: dict = {}
    for hf_name, ours, spec, how, layer in tqdm(entries, desc="converting", unit="tensor", disable=not progress):
        x = handles[files[hf_name]].get_tensor(hf_name)
        if x.shape != _dims(spec, c):
            raise TensorMismatchError(f"tensor {hf_name} has shape {x.shape}, but config.json implies "
                                      f"{_dims(spec, c)} ({spec})")
        *parents, leaf = ours.split(".")
        node, want = params, shapes
        for key in parents:
            node, want = node.setdefault(key, {}), want[key]
        want = want[leaf].shape
        x = _transform(x, how, want[1:] if layer is not None else want, c).astype(dtype)
        if layer is None:
            node[leaf] = x
        else:
            node.setdefault(leaf, np.zeros(want, dtype))[layer] = x            # [L, ...]
    if c.tie_embeddings and head is not None:
        if not np.array_equal(handles[files[head]].get_tensor(head).astype(dtype), params["embed"]["embedding"]):
            raise UnsupportedCheckpointError(f"{head} differs from {embed}, but config.json says "
                                             "tie_word_embeddings: true")
    return params


def convert_hf_decoder(src_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                       progress: bool = True, *, overwrite: bool = False) -> DecoderConfig:
    """Converts a HF directory of a `FAMILIES` model into an orca-jax checkpoint (dtype: the
    weights' own unless given). Tokenizer files present in `src_dir` are copied."""
    src = Path(src_dir)
    hf = read_hf_config(src)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    files = weight_files(src)
    config = config_from_hf(hf, dtype or checkpoint_dtype(files, open_files(files)), str(src / "config.json"))
    params = load_hf_decoder_params(src, config, progress)
    tokenizer_files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    save_checkpoint(out_dir, config, params, tokenizer_files, overwrite=overwrite)
    return config
