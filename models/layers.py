"""Numerics shared by the model families: dense layers, norms, activations, rotary position
embeddings.

Each follows the Hugging Face implementation it replaces, in float32 where HF upcasts, so that
fp32 logits agree within 1e-4 and bf16 models round where HF's do.

Legend: T rows, H heads, K head dim, R rotary dims (R <= K).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .cpu_kernels import NormWeights, PackedWeight, matmul, norm, table_rows

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

ACTIVATIONS = {
    # HF "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast": 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))).
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the packed kernel's fused GELU


# ----------------------------------------------------------------------------- dense layers
# A weight is either an array (XLA's einsum) or, with --matmul-backend cpu, a PackedWeight that
# step.runtime_params made at start-up (the C++ kernel, models/cpu_kernels.py).

def linear(x: jax.Array, p: dict, eq: str, activation: str | None = None,
           residual: jax.Array | None = None) -> jax.Array:
    """The dense layer p = {"kernel": [*in, *out], "bias"?: [*out]} on x [T, *in] (`eq` the
    einsum of x and kernel), then `activation` (a name in ACTIVATIONS) and + `residual`
    [T, *out]: [T, *out]. A packed weight runs both in the kernel's epilogue where it has
    them (a tanh GELU, the residual)."""
    w = p["kernel"]
    if isinstance(w, PackedWeight):
        gelu = activation in TANH_GELUS
        if gelu or activation is None:
            return matmul(x, w, p.get("bias"), gelu=gelu, residual=residual)
        y = matmul(x, w, p.get("bias"))
    else:
        y = jnp.einsum(eq, x, w)
        y = y + p["bias"] if "bias" in p else y
    y = ACTIVATIONS[activation](y) if activation else y
    return y if residual is None else y + residual


def embedding(table, ids: jax.Array) -> jax.Array:
    """Rows `ids` [T] of an embedding table [V, D] (packed when it is also the tied LM head)."""
    return table_rows(table, ids) if isinstance(table, PackedWeight) else table[ids]


def head_logits(h: jax.Array, table) -> jax.Array:
    """The LM head: h [R, D] against the table [V, D] (or its packed transpose): float32 logits
    [R, V]."""
    if isinstance(table, PackedWeight):
        return matmul(h, table)
    return jnp.einsum("rd,vd->rv", h, table, preferred_element_type=jnp.float32)


def layer_norm(x: jax.Array, p: dict | NormWeights, eps: float) -> jax.Array:
    """LayerNorm in float32 whatever the activation dtype (as HF does under autocast); `p`
    holds `scale` and, optionally, `bias` (NormWeights: the CPU kernel, float32)."""
    if isinstance(p, NormWeights):
        return norm(x, p, eps, rms=False)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x: jax.Array, p: dict | NormWeights, eps: float) -> jax.Array:
    """RMSNorm as HF's LlamaRMSNorm: normalised in float32, cast back to x's dtype, then scaled
    (NormWeights: the CPU kernel, float32)."""
    if isinstance(p, NormWeights):
        return norm(x, p, eps, rms=True)
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)).astype(x.dtype)
    return p["scale"] * y


# ----------------------------------------------------------------------------- rotary embeddings

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_inv_freq(dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies [R/2] (float32) of R = `dim` rotary dims, with HF's static scalings
    (modeling_rope_utils: "linear" divides them by `factor`, "llama3" smooths long wavelengths).
    "dynamic" is per position: see `rope_angles`."""
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_angles(positions: jax.Array, dim: int, theta: float, scaling: dict | None) -> jax.Array:
    """Rotation angles [T, R/2] (float32) of each row's position.

    "dynamic" (dynamic NTK): a row at position p uses the base HF computes for a sequence of
    p + 1 tokens, max(p + 1, trained context) (its default frequencies inside the trained
    context). That is what HF applies when it decodes token by token; for a prompt longer than
    the trained context HF rotates every prompt token with the prompt's length instead."""
    pos = positions.astype(jnp.float32)[:, None]                                     # [T, 1]
    if (scaling or {}).get("rope_type") != "dynamic":
        return pos * jnp.asarray(rope_inv_freq(dim, theta, scaling))
    factor, trained = scaling["factor"], scaling["original_max_position_embeddings"]
    seq = jnp.maximum(pos + 1, trained)
    base = theta * (factor * seq / trained - (factor - 1)) ** (dim / (dim - 2))      # [T, 1]
    expo = jnp.asarray(np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)  # [R/2]
    return pos / base ** expo


def apply_rope(x: jax.Array, angles: jax.Array, interleaved: bool) -> jax.Array:
    """Rotates the first R = 2 * angles.shape[-1] dims of every head of x [T, H, K]: pairs
    (i, i + R/2) (GPT-NeoX / Llama "rotate_half") or, `interleaved`, (2i, 2i + 1) (GPT-J)."""
    R = 2 * angles.shape[-1]
    cos = jnp.cos(angles)[:, None, :].astype(x.dtype)                           # [T, 1, R/2]
    sin = jnp.sin(angles)[:, None, :].astype(x.dtype)
    rot, rest = x[..., :R], x[..., R:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    else:
        x1, x2 = rot[..., :R // 2], rot[..., R // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out, rest], axis=-1) if R < x.shape[-1] else out
