"""Selective-batching attention over a preallocated KV buffer (Orca, OSDI'22, §4.2).

Every weight-bearing op of a step runs on the flattened token matrix; only attention is split
per request, because each request attends to its own keys and values. A step's T rows are
laid out as ``[Td decode rows | Tp prefill rows]``:

* decode rows (one token per request) read their whole history from the KV buffer, up to the
  step's context bucket ``C`` (never ``max_len``);
* prefill rows attend causally within their own segment (a prompt or a chunk of one) of this
  step; at most one segment per step continues a chunked prompt and also reads the first
  ``hist_len`` positions of its slot from the buffer (chunked prefill).

Legend: T tokens, Td/Tp decode/prefill rows, H heads, K head dim, L layers, S slots,
M max length of a slot, C context bucket (static).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The KV buffer: allocated once, donated to every step and updated in place."""

    k: jax.Array  # [L, S, M, H, K]
    v: jax.Array  # [L, S, M, H, K]

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def shape(num_layers: int, num_slots: int, max_len: int, num_heads: int, head_dim: int):
        return (num_layers, num_slots, max_len, num_heads, head_dim)

    @staticmethod
    def zeros(num_layers, num_slots, max_len, num_heads, head_dim, dtype, sharding=None) -> "KVCache":
        shape = KVCache.shape(num_layers, num_slots, max_len, num_heads, head_dim)
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return KVCache(k=make(), v=make())


# Logical axes of the KV buffer, mapped to mesh axes by a sharding layout.
KV_AXES = ("layers", "slots", "length", "kv_heads", "head_dim")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["slot", "pos", "seg", "hist_seg", "hist_slot", "hist_len"],
    meta_fields=["num_decode", "ctx"],
)
@dataclasses.dataclass(frozen=True)
class AttnMeta:
    """Per-step attention metadata, padded to the step's bucket shape.

    Padding rows have ``slot == S`` (out of range: their KV writes are dropped) and
    ``seg == -1``; their outputs are computed but never read.
    """

    slot: jax.Array       # [T] int32 slot of each row
    pos: jax.Array        # [T] int32 absolute position of each row
    seg: jax.Array        # [Tp] int32 segment (request) id of each prefill row
    hist_seg: jax.Array   # [] int32 segment that continues a chunked prompt (-2: none)
    hist_slot: jax.Array  # [] int32 its slot
    hist_len: jax.Array   # [] int32 its positions already in the buffer (0: none)
    num_decode: int       # Td, static
    ctx: int              # C, static: context bucket, >= every decode row's pos + 1 and hist_len


def write_kv(kv_layer: jax.Array, l: jax.Array, new: jax.Array, meta: AttnMeta) -> jax.Array:
    """Scatters this step's rows `new` [T,H,K] into layer `l` of `kv_layer` [L,S,M,H,K]."""
    return kv_layer.at[l, meta.slot, meta.pos].set(new.astype(kv_layer.dtype), mode="drop")


def _softmax_weights(scores: jax.Array, mask: jax.Array) -> jax.Array:
    scores = jnp.where(mask, scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def attend(q, k_new, v_new, kv: KVCache, l, meta: AttnMeta, scale: float) -> jax.Array:
    """Attention for one layer; `kv` already holds this step's keys and values.

    q, k_new, v_new: [T, H, K]. Returns [T, H, K] in q's dtype.
    """
    Td, C = meta.num_decode, meta.ctx
    f32 = jnp.float32
    outs = []
    if Td:
        # Decode rows: gather each request's own history, [Td, C, H, K].
        slot = meta.slot[:Td]
        kd = kv.k[l, slot, :C]
        vd = kv.v[l, slot, :C]
        s = jnp.einsum("thk,tchk->thc", q[:Td], kd, preferred_element_type=f32) * scale
        mask = jnp.arange(C)[None, None, :] <= meta.pos[:Td, None, None]  # [Td, 1, C]
        p = _softmax_weights(s, mask)
        outs.append(jnp.einsum("thc,tchk->thk", p.astype(vd.dtype), vd, preferred_element_type=f32))
    if q.shape[0] > Td:
        outs.append(_prefill_attend(q[Td:], k_new[Td:], v_new[Td:], kv, l, meta, scale))
    return jnp.concatenate(outs, axis=0).astype(q.dtype)


def _prefill_attend(q, k, v, kv: KVCache, l, meta: AttnMeta, scale: float) -> jax.Array:
    """Prefill rows [Tp, H, K]: causal within each segment, plus one optional chunk history."""
    f32 = jnp.float32
    C = meta.ctx
    seg, pos = meta.seg, meta.pos[meta.num_decode:]
    s_local = jnp.einsum("thk,uhk->thu", q, k, preferred_element_type=f32) * scale  # [Tp, H, Tp]
    m_local = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])      # [Tp, Tp]
    m_local = m_local[:, None, :]

    def local_only():
        p = _softmax_weights(s_local, m_local)
        return jnp.einsum("thu,uhk->thk", p.astype(v.dtype), v, preferred_element_type=f32)

    def with_history():
        # The continuing segment also reads positions [0, hist_len) of its slot: [C, H, K].
        kh = kv.k[l, meta.hist_slot, :C]
        vh = kv.v[l, meta.hist_slot, :C]
        s_hist = jnp.einsum("thk,chk->thc", q, kh, preferred_element_type=f32) * scale
        m_hist = (seg == meta.hist_seg)[:, None, None] & (jnp.arange(C) < meta.hist_len)[None, None, :]
        p = _softmax_weights(jnp.concatenate([s_hist, s_local], -1),
                             jnp.concatenate([jnp.broadcast_to(m_hist, s_hist.shape),
                                              jnp.broadcast_to(m_local, s_local.shape)], -1))
        p_hist, p_local = p[..., :C], p[..., C:]
        return (jnp.einsum("thc,chk->thk", p_hist.astype(vh.dtype), vh, preferred_element_type=f32)
                + jnp.einsum("thu,uhk->thk", p_local.astype(v.dtype), v, preferred_element_type=f32))

    return jax.lax.cond(meta.hist_len > 0, with_history, local_only)
