"""Shared test helpers: random Hugging Face GPT-2 checkpoints and a plain runner for our model.

The HF models get non-trivial LayerNorm scales and biases (HF initialises them to 1 and 0,
which would hide a mis-mapped bias) and weights large enough that logits are O(1), so an
absolute tolerance means something.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from orca_jax.models import family
from orca_jax.models.attention import AttnMeta, KVCache

HF_DEFAULTS = dict(vocab_size=1001, n_positions=32, n_embd=48, n_layer=2, n_head=6,
                   bos_token_id=0, eos_token_id=0, initializer_range=0.2)


def make_hf_gpt2(path: Path, seed: int = 0, max_shard_size=None, **overrides):
    """Saves a random HF GPT2LMHeadModel to `path` (safetensors); returns the torch model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**HF_DEFAULTS, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def converted_gpt2(folder: Path, seed: int = 0, **overrides) -> str:
    """A random HF GPT-2 saved in `folder`/hf and converted to `folder`/ckpt; returns the latter."""
    from orca_jax.checkpoints.hf_gpt2 import convert_hf_gpt2
    make_hf_gpt2(folder / "hf", seed=seed, **overrides)
    convert_hf_gpt2(folder / "hf", folder / "ckpt", progress=False)
    return str(folder / "ckpt")


def hf_logits(model, ids) -> np.ndarray:
    """Reference logits [T, V] from HF PyTorch (float32, CPU)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)[None])).logits[0].float().numpy()


def _forward(config, params: dict):
    """A jitted (tokens, kv, meta) -> (logits [T, V], kv) of the model family's pure
    functions over `params` (layers split once)."""
    model = family(config)
    params = {**params, model.LAYERS: model.unstack_layers(params[model.LAYERS])}

    @jax.jit
    def fwd(params, tokens, kv, meta):
        x = model.embed(config, params, tokens, meta.pos)
        x, kv = model.decoder(config, params[model.LAYERS], x, kv, meta)
        return model.lm_head(config, params, x), kv

    return lambda tokens, kv, meta: fwd(params, jnp.asarray(tokens, jnp.int32), kv, meta)


PAGE = 16  # small pages: every context below spans several, scattered (_pages)


def _kv(config, sharding=None) -> KVCache:
    """A pool of 4 sequences' worth of pages."""
    return KVCache.zeros(config.num_layers, 4 * _width(config), PAGE, config.num_kv_heads, config.head_dim,
                         config.jnp_dtype, sharding=sharding)


def _width(config) -> int:
    return -(-config.max_positions // PAGE)


def _pages(config) -> np.ndarray:
    """The block table of the one sequence: pages taken out of order, from the pool's end."""
    W = _width(config)
    return (4 * W - 1 - 2 * np.arange(W)).astype(np.int32)


def prefill_logits(config, params: dict, ids, kv_sharding=None) -> np.ndarray:
    """Logits [T, V] of one whole prompt in a single prefill step."""
    T, i32 = len(ids), np.int32
    pos, table = np.arange(T, dtype=i32), _pages(config)
    meta = AttnMeta(slot=np.full(T, 1, i32), pos=pos, kv_index=table[pos // PAGE] * PAGE + pos % PAGE,
                    seg=np.zeros(T, i32), block_table=np.zeros((0, len(table)), i32), dec_blocks=i32(0),
                    hist_table=np.zeros((1, len(table)), i32), hist_len=np.zeros(1, i32),
                    hist_row0=np.zeros(1, i32), hist_rows=np.zeros(1, i32), num_hist=i32(0),
                    seg_table=table[None].astype(i32), num_decode=0)
    logits, _ = _forward(config, params)(ids, _kv(config, kv_sharding), meta)
    return np.asarray(logits, np.float32)


def decode_logits(config, params: dict, ids, kv_sharding=None) -> np.ndarray:
    """Logits [T, V] feeding `ids` one token per step through the KV pages.

    Each step has a second, padding row (its KV write points past the last page: dropped),
    as the engine pads decode batches.
    """
    fwd, kv = _forward(config, params), _kv(config, kv_sharding)
    table = _pages(config)
    out = []
    for p, tok in enumerate(ids):
        i32 = np.int32  # host arrays: no eager device ops per step
        meta = AttnMeta(slot=np.array([2, 4], i32), pos=np.array([p, 0], i32),
                        kv_index=np.array([table[p // PAGE] * PAGE + p % PAGE, kv.num_pages * PAGE], i32),
                        seg=np.zeros(0, i32), block_table=np.stack([table, np.zeros_like(table)]),
                        dec_blocks=i32(p // PAGE + 1), hist_table=np.zeros((0, len(table)), i32),
                        hist_len=np.zeros(0, i32), hist_row0=np.zeros(0, i32), hist_rows=np.zeros(0, i32),
                        num_hist=i32(0), seg_table=np.zeros((0, len(table)), i32), num_decode=2)
        logits, kv = fwd([tok, 0], kv, meta)
        out.append(np.asarray(logits[0], np.float32))
    return np.stack(out)
