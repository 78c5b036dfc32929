"""GPT-2 architecture in Flax NNX: learned positions, pre-LN, GELU-tanh, tied embeddings.

Follows Hugging Face `modeling_gpt2.py` numerically; parameter names stay HF's
(`h.attn.c_attn.kernel`, ...). Layer parameters are stored stacked on a leading `L` axis (what
checkpoints hold and what sharding layouts and pipeline stages split) and run unrolled over
per-layer arrays, split once at start-up by `unstack_layers`: XLA CPU cannot fuse a slice of a
stacked array (a `lax.scan` step, or even a static index) into a dot, so it would copy every
layer's weights on every step: more than half of a batch-1 decode step (docs/benchmarks.md).

The forward pass takes a flattened step: T rows of (token, position) from any number of
requests, plus the KV buffer and attention metadata (see `attention.py`); it returns the
hidden states and the updated buffer. The LM head is a separate method, run only on the rows
that sample (nanoGPT does the same at inference: never logits for every prompt token).

Legend: T tokens, D model width, H heads, K head dim, F MLP width, V vocab, P positions,
L layers, R rows that need logits.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import AttnMeta, KVCache, write_attend
from .layers import ACTIVATIONS, DTYPES, embedding, head_logits, layer_norm, linear

ARCHITECTURE = "gpt2"  # the `architecture` of its config.json
LAYERS = "h"          # the stacked-layers subtree of the params
# Each layer's dense weights [*in, *out] -> how many leading dims are inputs (what
# step.runtime_params packs for --matmul-backend cpu), and where the LM head's [V, D] table is.
LINEAR_INPUTS = {("attn", "c_attn"): 1, ("attn", "c_proj"): 2, ("mlp", "c_fc"): 1, ("mlp", "c_proj"): 1}
# Each layer's norms and the final one (their params as the norm kernel takes them, too).
LAYER_NORMS = (("ln_1",), ("ln_2",))
FINAL_NORM = ("ln_f",)


def head_key(config) -> tuple[str, str]:
    return ("wte", "embedding")  # tied: the token embedding


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape and numerics of a GPT-2-style model."""

    vocab_size: int = 50257          # V: rows of the (tied) token embedding
    n_positions: int = 1024          # P: longest context the learned positions cover
    n_embd: int = 768                # D: model width
    n_layer: int = 12                # L: transformer blocks
    n_head: int = 12                 # H: attention heads; D must divide by H
    n_inner: int | None = None       # F: MLP width; None means 4 * D (GPT-2's default)
    layer_norm_epsilon: float = 1e-5  # LayerNorm epsilon, as in HF's config
    activation: str = "gelu_new"     # MLP activation, a key of ACTIVATIONS
    dtype: str = "float32"           # parameter and activation dtype: float32 or bfloat16
    bos_token_id: int | None = 50256  # begin-of-sequence id, if the tokenizer has one
    eos_token_id: int | None = 50256  # end-of-sequence id: generation stops there unless ignore_eos

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}; supported: {sorted(ACTIVATIONS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    architecture = ARCHITECTURE

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    # The names every family's config answers to (engine, sharding, plan, server).
    num_layers = property(lambda self: self.n_layer)
    num_heads = property(lambda self: self.n_head)
    num_kv_heads = property(lambda self: self.n_head)
    hidden_size = property(lambda self: self.n_embd)
    max_positions = property(lambda self: self.n_positions)
    model_type = "gpt2"
    eos_token_ids = ()  # GPT-2 configs name one end-of-sequence id

    @property
    def mlp_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def layer_matmul_params(self) -> int:
        """Matmul weights of one block (2 FLOPs each per token): QKV, out-projection, MLP."""
        return 4 * self.n_embd ** 2 + 2 * self.n_embd * self.mlp_dim

    def num_params(self) -> int:
        """Parameter count (the LM head is tied to `wte`, so it is not counted twice)."""
        D, F, L = self.n_embd, self.mlp_dim, self.n_layer
        per_layer = 4 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D)
        return self.vocab_size * D + self.n_positions * D + L * per_layer + 2 * D

    def replace(self, **changes) -> "GPTConfig":
        if "num_layers" in changes:
            changes["n_layer"] = changes.pop("num_layers")
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps({"architecture": "gpt2", **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


PRESETS: dict[str, GPTConfig] = {
    # Embedded demo model: small enough to create and compile in seconds on 2 CPU cores.
    "gpt2-tiny": GPTConfig(vocab_size=4096, n_positions=256, n_embd=128, n_layer=4, n_head=4,
                           bos_token_id=0, eos_token_id=0),
    "gpt2-small": GPTConfig(),
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPTConfig(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPTConfig(n_embd=1600, n_layer=48, n_head=25),
    # ~1B GPT-2-shaped config used for GPU figures.
    "gpt2-1b": GPTConfig(n_embd=2048, n_layer=20, n_head=16),
    # GPT-3 shapes (Brown et al. 2020, Table 2.1), GPT-2 block structure, 2048 positions.
    "gpt3-13b": GPTConfig(n_positions=2048, n_embd=5120, n_layer=40, n_head=40),
    "gpt3-175b": GPTConfig(n_positions=2048, n_embd=12288, n_layer=96, n_head=96),
    # Orca's largest evaluated model (Table 1 of the paper: 120 layers, hidden 15360).
    "gpt3-341b": GPTConfig(n_positions=2048, n_embd=15360, n_layer=120, n_head=120),
}

# Logical axes of every parameter (same tree as the params); a sharding layout maps them to
# mesh axes. None means "never sharded".
PARAM_AXES = {
    "wte": {"embedding": ("vocab", "embed")},
    "wpe": {"embedding": (None, "embed")},
    "h": {
        "ln_1": {"scale": ("layers", "embed"), "bias": ("layers", "embed")},
        "attn": {
            "c_attn": {"kernel": ("layers", "embed", None, "heads", "head_dim"),
                       "bias": ("layers", None, "heads", "head_dim")},
            "c_proj": {"kernel": ("layers", "heads", "head_dim", "embed"),
                       "bias": ("layers", "embed")},
        },
        "ln_2": {"scale": ("layers", "embed"), "bias": ("layers", "embed")},
        "mlp": {
            "c_fc": {"kernel": ("layers", "embed", "mlp"), "bias": ("layers", "mlp")},
            "c_proj": {"kernel": ("layers", "mlp", "embed"), "bias": ("layers", "embed")},
        },
    },
    "ln_f": {"scale": ("embed",), "bias": ("embed",)},
}


def param_axes(config: GPTConfig) -> dict:
    return PARAM_AXES


def stage_keys(config: GPTConfig, first: bool, last: bool) -> tuple[str, ...]:
    """Top-level params a pipeline stage holds: its layers, plus the embeddings (first) and
    ln_f and the tied LM head (last)."""
    return (("wte", "wpe") if first else ()) + ("h",) + (
        ("ln_f",) + (() if first else ("wte",)) if last else ())


class LayerNorm(nnx.Module):
    def __init__(self, shape: tuple[int, ...], dtype):
        self.scale = nnx.Param(jnp.ones(shape, dtype))
        self.bias = nnx.Param(jnp.zeros(shape, dtype))


class Linear(nnx.Module):
    def __init__(self, kernel_shape, bias_shape, dtype, rngs: nnx.Rngs, std: float):
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), kernel_shape, dtype))
        self.bias = nnx.Param(jnp.zeros(bias_shape, dtype))


class Attention(nnx.Module):
    def __init__(self, c: GPTConfig, rngs: nnx.Rngs, std: float):
        L, D, H, K, dt = c.n_layer, c.n_embd, c.n_head, c.head_dim, c.jnp_dtype
        self.c_attn = Linear((L, D, 3, H, K), (L, 3, H, K), dt, rngs, 0.02)
        self.c_proj = Linear((L, H, K, D), (L, D), dt, rngs, std)


class MLP(nnx.Module):
    def __init__(self, c: GPTConfig, rngs: nnx.Rngs, std: float):
        L, D, F, dt = c.n_layer, c.n_embd, c.mlp_dim, c.jnp_dtype
        self.c_fc = Linear((L, D, F), (L, F), dt, rngs, 0.02)
        self.c_proj = Linear((L, F, D), (L, D), dt, rngs, std)


class Blocks(nnx.Module):
    """All L transformer blocks, each parameter stacked on a leading layer axis."""

    def __init__(self, c: GPTConfig, rngs: nnx.Rngs):
        std_out = 0.02 / math.sqrt(2 * c.n_layer)  # GPT-2's scaled init of residual projections
        self.ln_1 = LayerNorm((c.n_layer, c.n_embd), c.jnp_dtype)
        self.attn = Attention(c, rngs, std_out)
        self.ln_2 = LayerNorm((c.n_layer, c.n_embd), c.jnp_dtype)
        self.mlp = MLP(c, rngs, std_out)


def block(c: GPTConfig, p: dict, x: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
          meta: AttnMeta, attention: str = "xla") -> tuple[jax.Array, jax.Array, jax.Array]:
    """A transformer block (params `p` of that layer) on rows x [T, D]; writes its K, V into
    the layer's pages [H, P, B, K] and returns them."""
    h = layer_norm(x, p["ln_1"], c.layer_norm_epsilon)
    qkv = linear(h, p["attn"]["c_attn"], "td,dahk->tahk")                       # [T, 3, H, K]
    a, k_pages, v_pages = write_attend(qkv, None, None, k_pages, v_pages, meta, 1.0 / math.sqrt(c.head_dim),
                                       attention)                              # [T, H, K]
    x = linear(a, p["attn"]["c_proj"], "thk,hkd->td", residual=x)
    h = layer_norm(x, p["ln_2"], c.layer_norm_epsilon)
    h = linear(h, p["mlp"]["c_fc"], "td,df->tf", activation=c.activation)     # [T, F]
    x = linear(h, p["mlp"]["c_proj"], "tf,fd->td", residual=x)                 # [T, D]
    return x, k_pages, v_pages


class GPT(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        dt = c.jnp_dtype
        self.wte = nnx.Embed(c.vocab_size, c.n_embd, dtype=dt, param_dtype=dt, rngs=rngs,
                             embedding_init=nnx.initializers.normal(0.02))
        self.wpe = nnx.Embed(c.n_positions, c.n_embd, dtype=dt, param_dtype=dt, rngs=rngs,
                             embedding_init=nnx.initializers.normal(0.01))
        self.h = Blocks(c, rngs)
        self.ln_f = LayerNorm((c.n_embd,), dt)

    def __call__(self, tokens: jax.Array, positions: jax.Array, kv: KVCache,
                 meta: AttnMeta) -> tuple[jax.Array, KVCache]:
        """tokens, positions: [T] int32. Returns hidden states [T, D] (before ln_f) and the
        KV buffer with this step's keys and values written in."""
        params = nnx.to_pure_dict(nnx.state(self))
        layers = unstack_layers(params["h"])
        return decoder(self.config, layers, embed(self.config, params, tokens, positions), kv, meta)

    def logits(self, x: jax.Array) -> jax.Array:
        """x: [R, D] hidden states of the rows that sample. Returns float32 logits [R, V]."""
        return lm_head(self.config, nnx.to_pure_dict(nnx.state(self)), x)


# The forward pass as pure functions over the params dict: a pipeline stage runs `embed` (first
# stage), `decoder` over its own layers, and `lm_head` (last stage).

def embed(config: GPTConfig, params: dict, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Token + position embeddings of T rows: [T, D]."""
    return embedding(params["wte"]["embedding"], tokens) + params["wpe"]["embedding"][positions]


def unstack_layers(h: dict) -> list[dict]:
    """Stacked layer params (every leaf [L, ...]: the checkpoint layout) -> L per-layer dicts.
    Run it once, outside the step: inside a jitted step the slices are copies."""
    n = jax.tree.leaves(h)[0].shape[0]
    return [jax.tree.map(lambda x: x[l], h) for l in range(n)]


def decoder(c: GPTConfig, layers: list[dict], x: jax.Array, kv: KVCache, meta: AttnMeta,
            attention: str = "xla") -> tuple[jax.Array, KVCache]:
    """The blocks `layers` (one params dict per layer) over x [T, D], unrolled; layer l reads
    and writes layer l of kv (L' = len(layers) arrays of pages)."""
    ks, vs = list(kv.k), list(kv.v)
    for l, p in enumerate(layers):
        x, ks[l], vs[l] = block(c, p, x, ks[l], vs[l], meta, attention)
    return x, KVCache(k=tuple(ks), v=tuple(vs))


def lm_head(c: GPTConfig, params: dict, x: jax.Array) -> jax.Array:
    """Final LayerNorm and the tied LM head on x [R, D]: float32 logits [R, V]."""
    h = layer_norm(x, params["ln_f"], c.layer_norm_epsilon)
    return head_logits(h, params["wte"]["embedding"])


def init_params(config: GPTConfig, seed: int = 0) -> dict:
    """Random parameters as a pure dict (the on-disk layout), deterministic in `seed`."""
    return nnx.to_pure_dict(nnx.state(GPT(config, rngs=nnx.Rngs(seed))))


def abstract_params(config: GPTConfig) -> dict:
    """Shapes and dtypes of the params (jax.ShapeDtypeStruct leaves), allocating nothing."""
    return jax.eval_shape(lambda: init_params(config))


def from_params(config: GPTConfig, params: dict) -> GPT:
    """A GPT module holding `params` (a pure dict, e.g. restored from Orbax)."""
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model
