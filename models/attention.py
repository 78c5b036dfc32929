"""Selective-batching attention over a paged KV cache (Orca, OSDI'22, §4.2; vLLM's pages).

Every weight-bearing op of a step runs on the flattened token matrix; only attention is split
per request, because each request attends to its own keys and values. A step's T rows are
laid out as ``[Td decode rows | Tp prefill rows]``; `write_attend` first writes every row's K
and V to its page position (`write_kv`, `meta.kv_index`), then `attend`s:

* decode rows (one token per request) read their whole history through their block table,
  one page at a time up to the step's longest context (a runtime trip count, never `max_len`);
* prefill rows attend causally within their own segment (a prompt, or a chunk of one) of this
  step, densely; a segment that continues a sequence already in its pages (an earlier chunk,
  or a prefix found in the prefix cache) also reads those positions through its block table,
  in tiles of HIST_TILE rows (runtime trip counts over segments, tiles and pages).

That is backend "xla". Backend "cpu" (the CPU default for float32 on one device) sends the
layer's write and every row to one C++ kernel instead (cpu_kernels.py): decode and prefill
rows alike read their own sequence's positions through its table (prefill rows:
`seg_table`), no gathered copies of the pages, no dense scores across the step's prefill
rows. On GPUs a runtime trip count costs a host round trip per
trip (XLA:GPU copies the loop predicate to the host), so backends "xla-static" and "pallas"
use static shapes instead: whole block tables gathered at once and masked (`_table_softmax`),
history tiles a fixed number (`_history_static`); "pallas" sends decode rows to the kernel.

Legend: T tokens, Td/Tp decode/prefill rows, H query heads, Hkv KV heads (G = H / Hkv query
heads share one: grouped-query attention), K head dim, L layers, P pages, B positions per
page, W pages per sequence.

Layout: per layer `[H, P, B, K]` (heads before pages), what the Pallas GPU paged-attention
kernel reads (`pallas_attention.py`), and on CPU the layout measured best for the XLA path:
a page of one sequence is H contiguous runs of B*K values, copied by one `dynamic_slice` per
row (an element-wise gather over (page, position) pairs was 3.7x slower), and the score einsum
then needs no transpose (2.8x faster than over `[P, B, H, K]` pages).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..plan import AttnMeta  # the plan's conventions (also PAD_SEG)

jax.tree_util.register_dataclass(AttnMeta)  # defined with the plan, host side (no JAX there)


# Prefill rows per history tile. Measured (docs/benchmarks.md, "Paged KV"): a 1000-token
# prompt in 256-token chunks took 1.16x the slot layout's time with tiles of 16 rows (many
# small loop trips), 1.08x with 64, 1.04x with 128; 64 wastes less on the short segments that
# follow a cached prefix (a tile computes all its rows).
HIST_TILE = 64


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The KV page pool: one array of pages per layer, allocated once, donated to every step
    and updated in place."""

    k: tuple[jax.Array, ...]  # L x [Hkv, P, B, K]
    v: tuple[jax.Array, ...]  # L x [Hkv, P, B, K]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @staticmethod
    def shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """One layer's K (or V) pages."""
        return (num_kv_heads, num_pages, page_size, head_dim)

    @staticmethod
    def zeros(num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype, sharding=None) -> "KVCache":
        shape = KVCache.shape(num_pages, page_size, num_kv_heads, head_dim)
        make = jax.jit(lambda: tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                       out_shardings=sharding)
        return KVCache(k=make(), v=make())


# Logical axes of one layer's pages, mapped to mesh axes by a sharding layout.
KV_AXES = ("kv_heads", "pages", "page_size", "head_dim")


def write_kv(pages: jax.Array, new: jax.Array, meta: AttnMeta) -> jax.Array:
    """Scatters this step's rows `new` [T,H,K] into one layer's `pages` [H,P,B,K] at
    `meta.kv_index` (padding rows point past the last page: dropped)."""
    B = pages.shape[2]
    return pages.at[:, meta.kv_index // B, meta.kv_index % B].set(
        new.swapaxes(0, 1).astype(pages.dtype), mode="drop")


def write_attend(q, k, v, k_pages, v_pages, meta: AttnMeta, scale: float, backend: str = "xla",
                 window: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's attention: writes this step's keys and values k, v [T, Hkv, K] into the
    layer's pages [Hkv, P, B, K] (`write_kv`), then `attend`s the queries q [T, H, K].
    Returns (output [T, H, K] in q's dtype, k_pages, v_pages). With k and v None, q is one
    projection's [T, 3, H, K] output of all three (GPT-2's c_attn; H = Hkv). Backend "cpu"
    runs it all in one kernel (`cpu_kernels.attend`) that reads q, k and v where they lie:
    XLA:CPU's scatter is an element-wise loop (≈ 7 ms a step of GPT-2 small at 64 rows), and
    each slice of q, k, v a copy (≈ 1.9 ms)."""
    fused = k is None
    H = q.shape[-2]
    if backend == "cpu":
        # Every row, decode or prefill, reads positions [lo, pos] of its own sequence through
        # its table (this step's keys are in the pages first): no [Tp, Tp] scores.
        from .cpu_kernels import attend as kernel
        T, Td = q.shape[0], meta.num_decode
        tables = meta.block_table
        if T > Td:  # prefill rows: their segment's table (padding rows: segment 0's, never read)
            seg_rows = jnp.take(meta.seg_table, jnp.maximum(meta.seg, 0), axis=0, mode="clip")  # [Tp, W]
            tables = jnp.concatenate([tables, seg_rows])                                  # [T, W]
        lo = jnp.zeros_like(meta.pos) if window is None else meta.pos - window + 1  # as _in_window
        if fused:  # [T, 3H, K]: a bitcast on one device
            q = q.reshape(T, 3 * H, q.shape[-1])
        src, first = ((q, q, q), (0, H, 2 * H)) if fused else ((q, k, v), (0, 0, 0))
        out, k_pages, v_pages = kernel(*src, k_pages, v_pages, meta.kv_index, tables, lo, meta.pos + 1,
                                       scale, H, first)
        return out.astype(q.dtype), k_pages, v_pages
    if fused:
        q, k, v = q[:, 0], q[:, 1], q[:, 2]
    k_pages, v_pages = write_kv(k_pages, k, meta), write_kv(v_pages, v, meta)
    return attend(q, k, v, k_pages, v_pages, meta, scale, backend, window), k_pages, v_pages


def _page(pages: jax.Array, page) -> jax.Array:
    """One page [H, B, K] of one layer's `pages` [H, P, B, K]."""
    H, _, B, K = pages.shape
    return jax.lax.dynamic_slice(pages, (0, page, 0, 0), (H, 1, B, K))[:, 0]


def _fold(carry, s, values):
    """Online-softmax step (flash attention): merge scores s [N, Hkv, G, M] (masked: -inf;
    any leading dims) into carry = (running max [N,Hkv,G], denominator [N,Hkv,G], numerator
    [N,Hkv,G,K]), f32; `values(p)` is the numerator's increment, p [N,Hkv,G,M] times the
    positions' values."""
    m, d, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    # Rows that have seen no valid position yet keep m = -inf; guard exp(-inf - -inf).
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])                              # [N, Hkv, G, M]
    corr = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
    return m_new, d * corr + p.sum(-1), acc * corr[..., None] + values(p)


def _pv(eq: str, p, vb, swap: tuple[int, int] | None = None):
    """p (f32) in vb's dtype times vb, accumulated in f32. `swap`: axes of p exchanged before
    and after, so that the batch dims lead in the same order on both sides: XLA:CPU's dot
    thunk rejects some bfloat16 x bfloat16 -> float32 dots whose batch dims do not (on this
    AMD host without AVX-512, "nhgb,hbk->nhgk" and "nrhgm,nhmk->nrhgk" alone, jitted)."""
    p = p.astype(vb.dtype)
    if swap is None:
        return jnp.einsum(eq, p, vb, preferred_element_type=jnp.float32)
    return jnp.einsum(eq, p.swapaxes(*swap), vb, preferred_element_type=jnp.float32).swapaxes(*swap)


def _pages_softmax(q, k_pages, v_pages, table, n_pages, valid, scale, init):
    """Online softmax (flash-decoding) of q [N,Hkv,G,K] (G query heads per KV head) over the
    first `n_pages` pages of `table` ([N, W]: each row its own, or [W]: shared by the rows);
    `valid(idx [B]) -> bool [N,B]` masks positions. `init`: the `_fold` carry."""
    B = k_pages.shape[2]
    per_row = table.ndim == 2

    def body(i, carry):
        idx = i * B + jnp.arange(B)                                              # [B]
        if per_row:
            kb = jax.vmap(lambda p: _page(k_pages, p))(table[:, i])              # [N, Hkv, B, K]
            vb = jax.vmap(lambda p: _page(v_pages, p))(table[:, i])
            s = jnp.einsum("nhgk,nhbk->nhgb", q, kb, preferred_element_type=jnp.float32) * scale
        else:
            kb, vb = _page(k_pages, table[i]), _page(v_pages, table[i])           # [Hkv, B, K]
            s = jnp.einsum("nhgk,hbk->nhgb", q, kb, preferred_element_type=jnp.float32) * scale
        s = jnp.where(valid(idx)[:, None, None, :], s, -jnp.inf)   # [N, Hkv, G, B]
        if per_row:
            return _fold(carry, s, lambda p: _pv("nhgb,nhbk->nhgk", p, vb))
        return _fold(carry, s, lambda p: _pv("hngb,hbk->hngk", p, vb, swap=(0, 1)))

    return jax.lax.fori_loop(0, n_pages, body, init)


def _table_softmax(q, k_pages, v_pages, table, valid, scale, init):
    """`_pages_softmax` with static shapes (backends xla-static and pallas): q [N, R, Hkv, G, K]
    is N groups of R rows, group n reading every page of its table [N, W] in one gather
    ([N, Hkv, W*B, K]); `valid(idx [W*B]) -> bool [N, R, W*B]` masks what a row may not see;
    `init`: the `_fold` carry ([N, R, ...]). No loop, so XLA:GPU never copies a trip count to
    the host and waits; the price is reading all W pages of a table, not just the context."""
    Hkv, _, B, K = k_pages.shape
    N, W = table.shape
    gather = lambda pages: pages[:, table].reshape(Hkv, N, W * B, K).swapaxes(0, 1)  # [N, Hkv, W*B, K]
    kb, vb = gather(k_pages), gather(v_pages)
    s = jnp.einsum("nrhgk,nhmk->nrhgm", q, kb, preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid(jnp.arange(W * B))[:, :, None, None, :], s, -jnp.inf)   # [N, R, Hkv, G, W*B]
    return _fold(init, s, lambda p: _pv("nhrgm,nhmk->nhrgk", p, vb, swap=(1, 2)))


def _in_window(pos, idx, window: int | None):
    """Key positions `idx` [B] a query at `pos` [N] may see: all up to it, or with a sliding
    `window` the last `window` (HF: q - k < window)."""
    ok = idx[None, :] <= pos[:, None]
    return ok if window is None else ok & (idx[None, :] > pos[:, None] - window)


def attend(q, k_new, v_new, k_pages, v_pages, meta: AttnMeta, scale: float,
           backend: str = "xla", window: int | None = None) -> jax.Array:
    """Attention for one layer; its `k_pages`, `v_pages` [Hkv,P,B,K] already hold this step's
    keys and values. q: [T, H, K]; k_new, v_new: [T, Hkv, K] (H a multiple of Hkv: grouped-
    and multi-query attention). Returns [T, H, K] in q's dtype. `backend`: "xla" loops over
    pages as far as the step's longest context (runtime trip counts: least work, for CPU);
    "xla-static" reads whole block tables with static shapes (no loop: XLA:GPU would copy each
    runtime trip count to the host and wait); "pallas": decode rows through the Pallas GPU
    kernel (pallas_attention.py), history as xla-static. `window`: sliding-window attention
    (each query sees its last `window` positions; Mistral)."""
    Td = meta.num_decode
    T, H, K = q.shape
    Hkv = k_pages.shape[0]
    outs = []
    if Td and backend == "pallas":
        from .pallas_attention import paged_decode_attention
        outs.append(paged_decode_attention(q[:Td], k_pages, v_pages, meta.block_table,
                                           meta.pos[:Td] + 1, scale).reshape(Td, Hkv, H // Hkv, K))
    q = q.reshape(T, Hkv, H // Hkv, K)                                          # [T, Hkv, G, K]
    static = backend != "xla"
    if Td and backend != "pallas":
        # Decode rows read their own history [0, pos] through their block tables.
        qd, pos = q[:Td], meta.pos[:Td]
        if static:  # each row a group of one
            init = _softmax_init(qd[:, None])
            _, d, acc = _table_softmax(qd[:, None], k_pages, v_pages, meta.block_table,
                                       lambda idx: _in_window(pos, idx, window)[:, None], scale, init)
            d, acc = d[:, 0], acc[:, 0]
        else:
            _, d, acc = _pages_softmax(qd, k_pages, v_pages, meta.block_table, meta.dec_blocks,
                                       lambda idx: _in_window(pos, idx, window), scale, _softmax_init(qd))
        outs.append(acc / d[..., None])
    if T > Td:
        outs.append(_prefill_attend(q[Td:], k_new[Td:], v_new[Td:], k_pages, v_pages, meta, scale,
                                    window, static))
    return jnp.concatenate(outs, axis=0).reshape(T, H, K).astype(q.dtype)


def _softmax_init(q):
    """The `_fold` carry before any position: max -inf, denominator 0, numerator 0 (f32)."""
    f32 = jnp.float32
    return jnp.full(q.shape[:-1], -jnp.inf, f32), jnp.zeros(q.shape[:-1], f32), jnp.zeros(q.shape, f32)


def _prefill_attend(q, k, v, k_pages, v_pages, meta: AttnMeta, scale: float, window,
                    static: bool = False) -> jax.Array:
    """Prefill rows q [Tp, Hkv, G, K] (k, v [Tp, Hkv, K]): causal within each segment of this
    step, then, for segments that continue a sequence, its first hist_len positions from the pages."""
    f32 = jnp.float32
    seg, pos = meta.seg, meta.pos[meta.num_decode:]
    s = jnp.einsum("thgk,uhk->thgu", q, k, preferred_element_type=f32) * scale  # [Tp, Hkv, G, Tp]
    mask = (seg[:, None] == seg[None, :]) & _in_window(pos, pos, window)         # [Tp, Tp]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    m = s.max(-1)                     # finite: every row sees at least itself
    p = jnp.exp(s - m[..., None])
    state = (m, p.sum(-1), jnp.einsum("thgu,uhk->thgk", p.astype(v.dtype), v, preferred_element_type=f32))
    history = _history_static if static else _history
    _, d, acc = history(q, k_pages, v_pages, meta, scale, state, pos, window)
    return acc / d[..., None]


def _history(q, k_pages, v_pages, meta: AttnMeta, scale: float, state, pos, window):
    """Folds into `state` (softmax state of the Tp prefill rows) each history segment's
    positions [0, hist_len) read from its pages, HIST_TILE rows at a time: the work is the
    segment's rows times its history, not every prefill row's."""
    Tp, B = q.shape[0], k_pages.shape[2]
    n_tile = min(HIST_TILE, Tp)

    def segment(j, state):
        r0, n, hist, table = meta.hist_row0[j], meta.hist_rows[j], meta.hist_len[j], meta.hist_table[j]

        def tile(t, state):
            first = r0 + t * n_tile
            start = jnp.minimum(first, Tp - n_tile)   # a tile at the end is shifted back...
            rows = start + jnp.arange(n_tile)
            live = (rows >= first) & (rows < r0 + n)  # ...and masks rows already done
            cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, n_tile)
            valid = lambda idx: live[:, None] & (idx[None, :] < hist) & _in_window(cut(pos), idx, window)
            out = _pages_softmax(cut(q), k_pages, v_pages, table, -(-hist // B), valid, scale,
                                 tuple(map(cut, state)))
            return tuple(jax.lax.dynamic_update_slice_in_dim(x, o, start, 0) for x, o in zip(state, out))

        return jax.lax.fori_loop(0, -(-n // n_tile), tile, state)

    return jax.lax.fori_loop(0, meta.num_hist, segment, state)


def _history_static(q, k_pages, v_pages, meta: AttnMeta, scale: float, state, pos, window):
    """`_history` with static shapes: the segments' rows cut into a fixed number of tiles of
    HIST_TILE rows (each segment's tiles as `_history` cuts them; unused tiles have no live
    rows), every tile reading its segment's whole block table at once (`_table_softmax`)."""
    Tp, Nh = q.shape[0], meta.hist_len.shape[0]
    n_tile = min(HIST_TILE, Tp)
    NT = -(-Tp // n_tile) + Nh  # each segment's ceil(rows / n_tile) tiles, summed, fit
    n_tiles = jnp.where(jnp.arange(Nh) < meta.num_hist, -(-meta.hist_rows // n_tile), 0)  # [Nh]
    ends = jnp.cumsum(n_tiles)
    t = jnp.arange(NT)
    j = jnp.minimum(jnp.searchsorted(ends, t, side="right"), Nh - 1)      # [NT] the tile's segment
    first = meta.hist_row0[j] + (t - ends[j] + n_tiles[j]) * n_tile        # [NT]
    start = jnp.minimum(first, Tp - n_tile)   # a tile at the end is shifted back...
    rows = start[:, None] + jnp.arange(n_tile)                             # [NT, n_tile]
    live = ((t < ends[-1])[:, None] & (rows >= first[:, None])             # ...and masks rows done
            & (rows < (meta.hist_row0[j] + meta.hist_rows[j])[:, None]))
    hist = meta.hist_len[j]

    def valid(idx):                                                       # [NT, n_tile, W*B]
        seen = _in_window(pos[rows].reshape(-1), idx, window).reshape(*rows.shape, -1)
        return live[..., None] & (idx < hist[:, None, None]) & seen

    out = _table_softmax(q[rows], k_pages, v_pages, meta.hist_table[j], valid, scale,
                         tuple(x[rows] for x in state))
    dest = jnp.where(live, rows, Tp)          # each live row once; the rest dropped
    return tuple(x.at[dest].set(o, mode="drop") for x, o in zip(state, out))
