"""Selective-batching attention over a preallocated KV buffer (Orca, OSDI'22, §4.2).

Every weight-bearing op of a step runs on the flattened token matrix; only attention is split
per request, because each request attends to its own keys and values. A step's T rows are
laid out as ``[Td decode rows | Tp prefill rows]``:

* decode rows (one token per request) read their whole history from the KV buffer, in
  BLOCK-sized pieces up to the step's longest context (a runtime trip count, never ``max_len``);
* prefill rows attend causally within their own segment (a prompt or a chunk of one) of this
  step; at most one segment per step continues a chunked prompt and also reads the first
  ``prefix_len`` positions of its slot from the buffer (chunked prefill).

Legend: T tokens, Td/Tp decode/prefill rows, H heads, K head dim, L layers, S slots,
M max length of a slot, B positions per attention block.

Layout `[L, S, H, M, K]` (heads before positions), chosen by measuring on CPU: a block of one
slot is H contiguous runs of B*K values, copied by one `dynamic_slice` per row (XLA's
element-wise gather over (slot, position) pairs was 3.7x slower), and the score einsum then
needs no transpose (2.8x faster than over `[S, M, H, K]` blocks).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..plan import BLOCK, AttnMeta  # the plan's conventions (also PAD_SEG, NO_PREFIX_SEG)

jax.tree_util.register_dataclass(AttnMeta)  # defined with the plan, host side (no JAX there)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The KV buffer: allocated once, donated to every step and updated in place."""

    k: jax.Array  # [L, S, H, M, K]
    v: jax.Array  # [L, S, H, M, K]

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @staticmethod
    def shape(num_layers: int, num_slots: int, max_len: int, num_heads: int, head_dim: int):
        """A slot holds at least `max_len` positions, rounded up to whole attention blocks."""
        return (num_layers, num_slots, num_heads, -(-max_len // BLOCK) * BLOCK, head_dim)

    @staticmethod
    def zeros(num_layers, num_slots, max_len, num_heads, head_dim, dtype, sharding=None) -> "KVCache":
        shape = KVCache.shape(num_layers, num_slots, max_len, num_heads, head_dim)
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return KVCache(k=make(), v=make())


# Logical axes of the KV buffer, mapped to mesh axes by a sharding layout.
KV_AXES = ("layers", "slots", "kv_heads", "length", "head_dim")


def write_kv(kv_layer: jax.Array, l: int, new: jax.Array, meta: AttnMeta) -> jax.Array:
    """Scatters this step's rows `new` [T,H,K] into layer `l` of `kv_layer` [L,S,H,M,K]."""
    return kv_layer.at[l, meta.slot, :, meta.pos].set(new.astype(kv_layer.dtype), mode="drop")


def _block(buf: jax.Array, l, slot, start) -> jax.Array:
    """Positions [start, start + B) of one slot: [H, B, K] (clamped at the end of the slot;
    the caller masks positions past its context)."""
    H, K = buf.shape[2], buf.shape[4]
    return jax.lax.dynamic_slice(buf, (l, slot, 0, start, 0), (1, 1, H, BLOCK, K))[0, 0]


def _blocks_softmax(q, kv: KVCache, l, slot, n_blocks, valid, scale, init):
    """Online softmax (flash-decoding) of q [N,H,K] over `n_blocks` BLOCK-sized pieces of the
    buffer rows `slot` ([N] or a scalar); `valid(idx [B]) -> bool [N,B]` masks positions.
    `init` = (running max [N,H], denominator [N,H], numerator [N,H,K]), all float32."""
    f32 = jnp.float32
    per_row = jnp.ndim(slot) == 1

    def body(i, carry):
        m, d, acc = carry
        start = i * BLOCK                # slots are whole blocks long (KVCache.shape)
        idx = start + jnp.arange(BLOCK)                              # [B]
        if per_row:
            kb = jax.vmap(lambda s: _block(kv.k, l, s, start))(slot)  # [N, H, B, K]
            vb = jax.vmap(lambda s: _block(kv.v, l, s, start))(slot)
            s = jnp.einsum("nhk,nhbk->nhb", q, kb, preferred_element_type=f32) * scale
        else:
            kb, vb = _block(kv.k, l, slot, start), _block(kv.v, l, slot, start)  # [H, B, K]
            s = jnp.einsum("nhk,hbk->nhb", q, kb, preferred_element_type=f32) * scale
        s = jnp.where(valid(idx)[:, None, :], s, -jnp.inf)          # [N, H, B]
        m_new = jnp.maximum(m, s.max(-1))
        # Rows that have seen no valid position yet keep m = -inf; guard exp(-inf - -inf).
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])                          # [N, H, B]
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        d = d * corr + p.sum(-1)
        eq = "nhb,nhbk->nhk" if per_row else "nhb,hbk->nhk"
        acc = acc * corr[..., None] + jnp.einsum(eq, p.astype(vb.dtype), vb, preferred_element_type=f32)
        return m_new, d, acc

    return jax.lax.fori_loop(0, n_blocks, body, init)


def attend(q, k_new, v_new, kv: KVCache, l, meta: AttnMeta, scale: float) -> jax.Array:
    """Attention for one layer; `kv` already holds this step's keys and values.

    q, k_new, v_new: [T, H, K]. Returns [T, H, K] in q's dtype.
    """
    Td = meta.num_decode
    f32 = jnp.float32
    outs = []
    if Td:
        # Decode rows read their own history [0, pos] from the buffer, block by block.
        qd, pos = q[:Td], meta.pos[:Td]
        H, K = q.shape[1:]
        init = (jnp.full((Td, H), -jnp.inf, f32), jnp.zeros((Td, H), f32), jnp.zeros((Td, H, K), f32))
        _, d, acc = _blocks_softmax(qd, kv, l, meta.slot[:Td], meta.dec_blocks,
                                    lambda idx: idx[None, :] <= pos[:, None], scale, init)
        outs.append(acc / d[..., None])
    if q.shape[0] > Td:
        outs.append(_prefill_attend(q[Td:], k_new[Td:], v_new[Td:], kv, l, meta, scale))
    return jnp.concatenate(outs, axis=0).astype(q.dtype)


def _prefill_attend(q, k, v, kv: KVCache, l, meta: AttnMeta, scale: float) -> jax.Array:
    """Prefill rows [Tp, H, K]: causal within each segment of this step, then, for the one
    segment that continues a chunked prompt, its first prefix_len positions from the buffer."""
    f32 = jnp.float32
    seg, pos = meta.seg, meta.pos[meta.num_decode:]
    s = jnp.einsum("thk,uhk->thu", q, k, preferred_element_type=f32) * scale    # [Tp, H, Tp]
    mask = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])       # [Tp, Tp]
    s = jnp.where(mask[:, None, :], s, -jnp.inf)
    m = s.max(-1)                     # finite: every row sees at least itself
    p = jnp.exp(s - m[..., None])
    init = (m, p.sum(-1), jnp.einsum("thu,uhk->thk", p.astype(v.dtype), v, preferred_element_type=f32))
    in_prefix = seg == meta.prefix_seg
    _, d, acc = _blocks_softmax(q, kv, l, meta.prefix_slot, meta.prefix_blocks,
                                lambda idx: in_prefix[:, None] & (idx[None, :] < meta.prefix_len),
                                scale, init)
    return acc / d[..., None]
