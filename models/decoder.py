"""A configurable GPT-style decoder: Llama, Mistral, Qwen2/3, GPT-NeoX, GPT-J and OPT.

These families differ in a handful of choices, each a field of `DecoderConfig`, so one
readable block serves them all (checkpoints/hf_decoder.py maps each family's HF config and
tensors onto it):

| family      | norm  | MLP          | positions                 | attention                     | residual          |
|-------------|-------|--------------|---------------------------|-------------------------------|-------------------|
| Llama       | RMS   | SwiGLU       | RoPE half-split (scaled)  | GQA                           | sequential        |
| Mistral     | RMS   | SwiGLU       | RoPE half-split           | GQA, sliding window           | sequential        |
| Qwen2       | RMS   | SwiGLU       | RoPE half-split           | GQA, QKV biases               | sequential        |
| Qwen3       | RMS   | SwiGLU       | RoPE half-split           | GQA, RMSNorm on q and k heads | sequential        |
| GPT-NeoX    | Layer | GELU         | RoPE half-split, partial  | MHA, biases                   | parallel, 2 norms |
| GPT-J       | Layer | GELU (tanh)  | RoPE interleaved, partial | MHA, no biases                | parallel, 1 norm  |
| OPT         | Layer | ReLU         | learned, offset 2         | MHA, biases                   | sequential        |

Like models/gpt2.py: pure functions over a params dict whose layer parameters are stacked on
a leading L axis (checkpoints, layouts and pipeline stages split that axis) and run unrolled
over per-layer arrays (`unstack_layers`, once at start-up); `embed`, `decoder` and `lm_head`
are what a pipeline stage runs. Every parameter has logical axes (`param_axes`), so the
sharding layouts apply unchanged: query heads over `heads`, KV heads over `kv_heads` (each
split over `tensor` when the mesh axis divides it, else replicated).

Legend: T tokens, D model width, H query heads, Hkv KV heads, K head dim, F MLP width,
V vocab, L layers, R rows that need logits.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp

from .attention import AttnMeta, KVCache, write_attend
from .gpt2 import unstack_layers
from .layers import (ACTIVATIONS, DTYPES, ROPE_TYPES, apply_rope, embedding, head_logits, layer_norm, linear,
                     rms_norm, rope_angles)

ARCHITECTURE = "decoder"  # the `architecture` of its config.json
LAYERS = "layers"         # the stacked-layers subtree of the params
# Each layer's dense weights [*in, *out] -> how many leading dims are inputs (what
# step.runtime_params packs for --matmul-backend cpu), and where the LM head's [V, D] table is.
LINEAR_INPUTS = {("attn", "q"): 1, ("attn", "k"): 1, ("attn", "v"): 1, ("attn", "o"): 2,
                 ("mlp", "up"): 1, ("mlp", "gate"): 1, ("mlp", "down"): 1}
# Each layer's norms (those it has) and the final one (their params as the norm kernel takes
# them, too).
LAYER_NORMS = (("attn_norm",), ("mlp_norm",), ("attn", "q_norm"), ("attn", "k_norm"))
FINAL_NORM = ("final_norm",)


def head_key(config) -> tuple[str, str]:
    return ("embed", "embedding") if config.tie_embeddings else ("lm_head", "kernel")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and numerics of one decoder model (see the table in the module docstring)."""

    model_type: str = "llama"         # the HF model_type it was converted from (shown to clients)
    vocab_size: int = 32000           # V
    hidden_size: int = 4096           # D
    num_layers: int = 32              # L
    num_heads: int = 32               # H: query heads
    num_kv_heads: int | None = None   # Hkv: key/value heads (None: H); H must be a multiple
    head_dim: int | None = None       # K (None: D / H)
    intermediate_size: int = 11008    # F
    max_positions: int = 4096         # longest context (learned positions: rows of the table)
    norm: str = "rms"                 # "rms" (RMSNorm) or "layer" (LayerNorm)
    norm_eps: float = 1e-5
    norm_bias: bool = False           # LayerNorm with a bias
    mlp: str = "gated"                # "gated" (act(x W_gate) * x W_up, W_down) or "plain"
    activation: str = "silu"          # a key of layers.ACTIVATIONS
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False             # RMSNorm over each q and k head (Qwen3)
    parallel_residual: bool = False   # x + attn(norm1 x) + mlp(norm2 x) (GPT-NeoX, GPT-J)
    shared_norm: bool = False         # parallel residual with one norm for both (GPT-J)
    positions: str = "rope"           # "rope" or "learned"
    position_offset: int = 0          # learned positions: row of position 0 (OPT: 2)
    rotary_dim: int | None = None     # R: rotated dims per head (None: K; partial rotary < K)
    rope_interleaved: bool = False    # rotate pairs (2i, 2i+1) (GPT-J), else (i, i + R/2)
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # HF rope parameters: rope_type, factor, ...
    sliding_window: int | None = None  # attend to the last W positions only (Mistral)
    tie_embeddings: bool = True       # the LM head is the token embedding
    lm_head_bias: bool = False        # GPT-J
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # further end-of-sequence ids (config.json may list several)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DecoderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        checks = [("norm", ("rms", "layer")), ("mlp", ("gated", "plain")), ("positions", ("rope", "learned")),
                  ("activation", tuple(ACTIVATIONS)), ("dtype", tuple(DTYPES))]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"DecoderConfig.{name}={getattr(self, name)!r}; supported: {sorted(allowed)}")
        if self.positions == "rope":
            R = self.rope_dim
            if R % 2 or not 0 < R <= self.head_dim:
                raise ValueError(f"rotary_dim={R} must be even and in (0, head_dim={self.head_dim}]")
            kind = self.rope.get("rope_type", "default")
            if kind not in ROPE_TYPES:
                raise ValueError(f"rope scaling {kind!r} is not supported; supported: {list(ROPE_TYPES)}")
            need = {"linear": ["factor"], "dynamic": ["factor", "original_max_position_embeddings"],
                    "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
            missing = [k for k in need.get(kind, []) if k not in self.rope]
            if missing:
                raise ValueError(f"rope scaling {kind!r} needs {missing}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")

    architecture = ARCHITECTURE

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def rope(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def layer_matmul_params(self) -> int:
        """Matmul weights of one layer (2 FLOPs each per token): q, k, v, o and the MLP."""
        D, K = self.hidden_size, self.head_dim
        return D * K * (2 * self.num_heads + 2 * self.num_kv_heads) + (3 if self.mlp == "gated" else 2) * D * self.mlp_dim

    def num_params(self) -> int:
        return sum(math.prod(shape) for shape, _, _ in jax.tree.leaves(param_spec(self), is_leaf=_is_spec))

    def replace(self, **changes) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        return json.dumps({"architecture": ARCHITECTURE, **d}, indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["rope_scaling"] = tuple(sorted(dict(d.get("rope_scaling") or {}).items()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)


def _llama3(factor, original):
    return (("factor", factor), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", original), ("rope_type", "llama3"))


_LLAMA3 = dict(model_type="llama", vocab_size=128256, rope_theta=500000.0, bos_token_id=128000,
               eos_token_id=128001, tie_embeddings=False)
PRESETS: dict[str, DecoderConfig] = {
    # Small Llama shape for CPU runs and tests (random weights; heads not a power of two).
    "llama-tiny": DecoderConfig(vocab_size=4096, hidden_size=144, num_layers=4, num_heads=6, num_kv_heads=2,
                                intermediate_size=384, max_positions=256, bos_token_id=0, eos_token_id=0),
    # HuggingFaceTB/SmolLM-135M: a Llama of GPT-2-small's size (9 heads, 3 KV heads, tied).
    "smollm-135m": DecoderConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                 intermediate_size=1536, max_positions=2048, bos_token_id=0, eos_token_id=0),
    # TinyLlama/TinyLlama-1.1B: the ~1B Llama shape of the bench (32000 vocab, 4 KV heads).
    "tinyllama-1.1b": DecoderConfig(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
                                    num_kv_heads=4, intermediate_size=5632, max_positions=2048,
                                    tie_embeddings=False, bos_token_id=1, eos_token_id=2),
    # meta-llama/Llama-3.2-1B (tied embeddings, llama3 rope scaling to 128K).
    "llama-3.2-1b": DecoderConfig(**{**_LLAMA3, "tie_embeddings": True}, hidden_size=2048, num_layers=16,
                                  num_heads=32, num_kv_heads=8, intermediate_size=8192, max_positions=131072,
                                  rope_scaling=_llama3(32.0, 8192)),
    # meta-llama/Meta-Llama-3-8B and -70B (8K context).
    "llama-3-8b": DecoderConfig(**_LLAMA3, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                intermediate_size=14336, max_positions=8192),
    "llama-3-70b": DecoderConfig(**_LLAMA3, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                                 intermediate_size=28672, max_positions=8192),
}


# ----------------------------------------------------------------------------- parameters

def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], tuple)


def param_spec(c: DecoderConfig) -> dict:
    """Every parameter as (shape, logical axes, init): the one table from which the params,
    their logical axes and their count are derived. Optional parts are absent, not zero."""
    L, D, H, Hkv, K, F, V = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                             c.intermediate_size, c.vocab_size)
    lay = lambda shape, axes, init="normal": ((L, *shape), ("layers", *axes), init)

    def linear(shape, axes, bias_shape, bias_axes, bias: bool) -> dict:
        return {"kernel": lay(shape, axes), **({"bias": lay(bias_shape, bias_axes, "zeros")} if bias else {})}

    def norm(n=D, axis="embed", stacked=True) -> dict:
        make = lay if stacked else (lambda shape, axes, init: (shape, axes, init))
        out = {"scale": make((n,), (axis,), "ones")}
        if c.norm == "layer" and c.norm_bias:
            out["bias"] = make((n,), (axis,), "zeros")
        return out

    attn = {"q": linear((D, H, K), ("embed", "heads", "head_dim"), (H, K), ("heads", "head_dim"), c.qkv_bias),
            "k": linear((D, Hkv, K), ("embed", "kv_heads", "head_dim"), (Hkv, K), ("kv_heads", "head_dim"), c.qkv_bias),
            "v": linear((D, Hkv, K), ("embed", "kv_heads", "head_dim"), (Hkv, K), ("kv_heads", "head_dim"), c.qkv_bias),
            "o": linear((H, K, D), ("heads", "head_dim", "embed"), (D,), ("embed",), c.o_bias)}
    if c.qk_norm:
        attn["q_norm"] = norm(K, "head_dim")
        attn["k_norm"] = norm(K, "head_dim")
    mlp = {"up": linear((D, F), ("embed", "mlp"), (F,), ("mlp",), c.mlp_bias),
           "down": linear((F, D), ("mlp", "embed"), (D,), ("embed",), c.mlp_bias)}
    if c.mlp == "gated":
        mlp["gate"] = linear((D, F), ("embed", "mlp"), (F,), ("mlp",), c.mlp_bias)
    layers = {"attn_norm": norm(), "attn": attn, "mlp": mlp}
    if not c.shared_norm:
        layers["mlp_norm"] = norm()
    spec = {"embed": {"embedding": ((V, D), ("vocab", "embed"), "normal")}, LAYERS: layers,
            "final_norm": norm(stacked=False)}
    if c.positions == "learned":
        spec["pos_embed"] = {"embedding": ((c.max_positions + c.position_offset, D), (None, "embed"), "normal")}
    if not c.tie_embeddings:
        spec["lm_head"] = {"kernel": ((V, D), ("vocab", "embed"), "normal")}
        if c.lm_head_bias:
            spec["lm_head"]["bias"] = ((V,), ("vocab",), "zeros")
    return spec


def param_axes(c: DecoderConfig) -> dict:
    """Logical axes of every parameter (same tree as the params)."""
    return jax.tree.map(lambda s: s[1], param_spec(c), is_leaf=_is_spec)


def init_params(c: DecoderConfig, seed: int = 0) -> dict:
    """Random parameters (normal, std 0.02; norms 1, biases 0), deterministic in `seed`."""
    specs, treedef = jax.tree.flatten(param_spec(c), is_leaf=_is_spec)
    keys = jax.random.split(jax.random.key(seed), len(specs))
    make = {"normal": lambda k, s: 0.02 * jax.random.normal(k, s, c.jnp_dtype),
            "ones": lambda k, s: jnp.ones(s, c.jnp_dtype), "zeros": lambda k, s: jnp.zeros(s, c.jnp_dtype)}
    return jax.tree.unflatten(treedef, [make[init](k, shape) for k, (shape, _, init) in zip(keys, specs)])


def abstract_params(c: DecoderConfig) -> dict:
    """Shapes and dtypes of the params (jax.ShapeDtypeStruct leaves), allocating nothing."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], c.jnp_dtype), param_spec(c), is_leaf=_is_spec)


def stage_keys(c: DecoderConfig, first: bool, last: bool) -> tuple[str, ...]:
    """Top-level params a pipeline stage holds: the embeddings (first), its layers, the final
    norm and the LM head (last; the token embedding again when they are tied)."""
    keys = (("embed",) + (("pos_embed",) if c.positions == "learned" else ())) if first else ()
    keys += (LAYERS,)
    if last:
        keys += ("final_norm",) + (("lm_head",) if not c.tie_embeddings else () if first else ("embed",))
    return keys


# ----------------------------------------------------------------------------- forward pass

def _norm(c: DecoderConfig, x: jax.Array, p: dict) -> jax.Array:
    return rms_norm(x, p, c.norm_eps) if c.norm == "rms" else layer_norm(x, p, c.norm_eps)


def attention(c: DecoderConfig, p: dict, h: jax.Array, angles, k_pages, v_pages, meta: AttnMeta,
              backend: str, residual: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Self-attention of rows h [T, D] added to `residual` [T, D]; writes their K, V into the
    layer's pages [Hkv, P, B, K]."""
    q = linear(h, p["q"], "td,dhk->thk")                                        # [T, H, K]
    k = linear(h, p["k"], "td,dhk->thk")                                        # [T, Hkv, K]
    v = linear(h, p["v"], "td,dhk->thk")
    if c.qk_norm:
        q, k = rms_norm(q, p["q_norm"], c.norm_eps), rms_norm(k, p["k_norm"], c.norm_eps)
    if angles is not None:
        q, k = apply_rope(q, angles, c.rope_interleaved), apply_rope(k, angles, c.rope_interleaved)
    a, k_pages, v_pages = write_attend(q, k, v, k_pages, v_pages, meta, c.head_dim ** -0.5, backend,
                                       c.sliding_window)                        # [T, H, K]
    return linear(a, p["o"], "thk,hkd->td", residual=residual), k_pages, v_pages  # [T, D]


def mlp(c: DecoderConfig, p: dict, h: jax.Array, residual: jax.Array) -> jax.Array:
    """The MLP of rows h [T, D] added to `residual` [T, D]."""
    if c.mlp == "gated":
        up = linear(h, p["gate"], "td,df->tf", activation=c.activation) * linear(h, p["up"], "td,df->tf")
    else:
        up = linear(h, p["up"], "td,df->tf", activation=c.activation)          # [T, F]
    return linear(up, p["down"], "tf,fd->td", residual=residual)                # [T, D]


def block(c: DecoderConfig, p: dict, x: jax.Array, angles, k_pages, v_pages, meta: AttnMeta,
          backend: str = "xla") -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer (params `p` of that layer) on rows x [T, D]."""
    h = _norm(c, x, p["attn_norm"])
    xa, k_pages, v_pages = attention(c, p["attn"], h, angles, k_pages, v_pages, meta, backend, residual=x)
    if c.parallel_residual:  # both branches read x: x + attention + MLP
        return mlp(c, p["mlp"], h if c.shared_norm else _norm(c, x, p["mlp_norm"]), residual=xa), k_pages, v_pages
    return mlp(c, p["mlp"], _norm(c, xa, p["mlp_norm"]), residual=xa), k_pages, v_pages


def embed(c: DecoderConfig, params: dict, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Token (+ learned position) embeddings of T rows: [T, D]."""
    x = embedding(params["embed"]["embedding"], tokens)
    if c.positions == "learned":
        x = x + params["pos_embed"]["embedding"][positions + c.position_offset]
    return x


def decoder(c: DecoderConfig, layers: list[dict], x: jax.Array, kv: KVCache, meta: AttnMeta,
            attention: str = "xla") -> tuple[jax.Array, KVCache]:
    """The layers `layers` (one params dict each) over x [T, D], unrolled; layer l reads and
    writes layer l of kv. The rotary angles are computed once for all layers."""
    angles = (rope_angles(meta.pos, c.rope_dim, c.rope_theta, c.rope)
              if c.positions == "rope" else None)                                # [T, R/2]
    ks, vs = list(kv.k), list(kv.v)
    for l, p in enumerate(layers):
        x, ks[l], vs[l] = block(c, p, x, angles, ks[l], vs[l], meta, attention)
    return x, KVCache(k=tuple(ks), v=tuple(vs))


def lm_head(c: DecoderConfig, params: dict, x: jax.Array) -> jax.Array:
    """Final norm and the LM head on x [R, D]: float32 logits [R, V]."""
    h = _norm(c, x, params["final_norm"])
    head = params["embed"]["embedding"] if c.tie_embeddings else params["lm_head"]["kernel"]
    logits = head_logits(h, head)
    if not c.tie_embeddings and "bias" in params["lm_head"]:
        logits = logits + params["lm_head"]["bias"].astype(jnp.float32)
    return logits


__all__ = ["DecoderConfig", "PRESETS", "param_axes", "init_params", "abstract_params", "stage_keys",
           "embed", "decoder", "lm_head", "unstack_layers", "LAYERS", "ARCHITECTURE"]
