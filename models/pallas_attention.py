"""Decode attention over a paged KV cache with the Pallas GPU (Triton) paged-attention kernel.

This is the CUDA decode path of ``--attention-backend pallas``: each decode row (one query
token per sequence) attends to the first ``length`` positions of its context, which live in
pages of a per-layer cache laid out ``[H, P, B, K]``, scattered as the row's block table says.
The kernel is ``jax.experimental.pallas.ops.gpu.paged_attention.paged_attention``; on CPU it
only runs in Pallas interpret mode (``interpret=True``), which is how the tests check it.

Legend: N decode rows, H heads, K head dim, P pages in the cache, B positions per page,
W pages in a block table (its width).

What the kernel needs, and what this wrapper does about it:

* it does not scale the logits: q is multiplied by ``scale`` here (in float32) first;
* its dots need both operands in one dtype (Triton), so q goes in in the cache's dtype and the
  output is cast back to q's dtype; logits, softmax statistics and the running output are
  float32 inside the kernel, but each split's partial output is stored in the cache dtype
  (so a bfloat16 cache gives bfloat16-accurate results, and on GPU a float32 cache runs its
  dots in TF32: the kernel uses the default dot precision);
* ``block_h`` (query heads per program) must be a multiple of 16: heads are a grid axis of
  the kernel and block_h only tiles the query heads *per KV head* (1 here, multi-head
  attention), which the kernel pads to 16 rows itself, so any H works with block_h = 16;
* ``W`` must split into ``k_splits`` partitions of a whole number of compute blocks of
  ``pages_per_compute_block`` pages: the block table is padded with page 0 to a multiple of
  ``k_splits * pages_per_compute_block`` (padded pages lie past every length, so the kernel
  skips or masks them; lengths are clamped to W * B to keep it so);
* a row of length 0 skips every partition and comes out as 0 / (0 + eps) = 0 (finite);
* on GPU (Triton) every load must have a power-of-two size, so B and K must be powers of two
  (interpret mode has no such limit; tests/test_pallas_attention.py lowers for CUDA to check).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

# Kernel parameters, chosen for GPUs (not tuned on hardware yet):
BLOCK_H = 16  # smallest legal block_h; tensor-core dots need M >= 16 anyway
BLOCK_K_TOKENS = 128  # positions per compute block (one [16, 128] logits tile per loop step)
MAX_K_SPLITS = 16  # the kernel's default: splits a long context across up to 16 programs
NUM_WARPS, NUM_STAGES = 8, 2  # the kernel's defaults


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def kernel_params(pages_per_row: int, page_size: int) -> tuple[int, int, int]:
    """`(pages_per_compute_block, k_splits, padded W)` for a block table of `pages_per_row` pages.

    A compute block holds BLOCK_K_TOKENS positions (fewer when the whole table is shorter);
    a power of two pages, so that with a power-of-two page size Triton's block shapes are
    powers of two. Each split is one compute block, up to MAX_K_SPLITS splits.
    """
    pages_per_block = min(max(1, BLOCK_K_TOKENS // page_size), _next_pow2(pages_per_row))
    k_splits = min(MAX_K_SPLITS, -(-pages_per_row // pages_per_block))
    chunk = k_splits * pages_per_block
    return pages_per_block, k_splits, -(-pages_per_row // chunk) * chunk


def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, scale, *, interpret=False):
    """q [N, H, K] (one query row per sequence, any float dtype), k_pages/v_pages [H, P, B, K],
    block_tables [N, W] int32 (page ids of each row's context, in order; entries past a row's
    length are arbitrary but in range), lengths [N] int32 (positions 0..length-1 are attended;
    a padding row has length 0 and its output is never read but must not be NaN/crash).
    Returns [N, H, K] in q's dtype: softmax(q·k * scale) · v over each row's first `lengths` positions.

    Works under `jax.jit` with traced `block_tables`, `lengths` (and `scale`); shapes are static.
    """
    page_size = k_pages.shape[2]  # B
    pages_per_row = block_tables.shape[1]  # W
    pages_per_block, k_splits, padded_w = kernel_params(pages_per_row, page_size)

    q_scaled = (q.astype(jnp.float32) * scale).astype(k_pages.dtype)  # [N, H, K]
    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, padded_w - pages_per_row)))  # [N, W']
    lengths = jnp.minimum(lengths.astype(jnp.int32), pages_per_row * page_size)  # [N]
    out = paged_attention(
        q_scaled, k_pages, v_pages, tables, lengths,
        block_h=BLOCK_H, pages_per_compute_block=pages_per_block, k_splits=k_splits,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=interpret,
    )  # [N, H, K]
    return out.astype(q.dtype)
