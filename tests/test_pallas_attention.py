"""The Pallas paged decode attention (models/pallas_attention.py), run in Pallas interpret mode
on CPU against a float64 numpy reference. Legend: N rows, H heads, K head dim, P pages,
B positions per page, W pages per block table."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orca_jax.models.pallas_attention import MAX_K_SPLITS, kernel_params, paged_decode_attention


def reference(q, k_pages, v_pages, block_tables, lengths, scale):
    """Gather each row's pages, mask positions >= length, softmax in float64. [N, H, K]
    (padding rows, length 0, stay zero)."""
    q, k_pages, v_pages = (np.asarray(a, np.float64) for a in (q, k_pages, v_pages))
    n, h, k = q.shape
    out = np.zeros((n, h, k))
    for row, (table, length) in enumerate(zip(block_tables, lengths)):
        if length == 0:
            continue
        keys = k_pages[:, table].reshape(h, -1, k)[:, :length]  # [H, length, K]
        values = v_pages[:, table].reshape(h, -1, k)[:, :length]  # [H, length, K]
        logits = np.einsum("hk,hsk->hs", q[row], keys) * scale  # [H, length]
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        out[row] = np.einsum("hs,hsk->hk", weights / weights.sum(-1, keepdims=True), values)
    return out


def make_case(seed, heads, page_size, head_dim, pages_per_row, dtype=np.float32):
    """Rows of lengths 1, a partial page, a full page, several pages, W * B, and a padding row
    (length 0, last). Pages are shuffled (non-contiguous, out of order); the cache has a few
    pages more than one table needs, and rows share the pool."""
    rng = np.random.default_rng(seed)
    num_pages = pages_per_row + 3  # P
    lengths = np.array([1, page_size // 2 + 3, page_size, 2 * page_size + 5,
                        pages_per_row * page_size, 0], np.int32)  # [N]
    tables = np.stack([rng.permutation(num_pages)[:pages_per_row] for _ in lengths])  # [N, W]
    tables = tables.astype(np.int32)
    k_pages = rng.standard_normal((heads, num_pages, page_size, head_dim)).astype(dtype)  # [H, P, B, K]
    v_pages = rng.standard_normal((heads, num_pages, page_size, head_dim)).astype(dtype)  # [H, P, B, K]
    q = (2 * rng.standard_normal((len(lengths), heads, head_dim))).astype(dtype)  # [N, H, K]
    return q, k_pages, v_pages, tables, lengths


# (H, B, K, W): W chosen so that the tables need padding and the context splits into several
# compute blocks (B=16: 8 pages a block, W=20 -> 3 splits, padded to 24; B=64: 2 pages a block,
# W=5 -> 3 splits, padded to 6); the last case is GPT-2-like head count / head dim.
CASES = [(4, 16, 32, 20), (12, 64, 32, 5), (25, 32, 64, 3)]


@pytest.mark.parametrize("heads,page_size,head_dim,pages_per_row", CASES)
def test_matches_reference(heads, page_size, head_dim, pages_per_row):
    q, k_pages, v_pages, tables, lengths = make_case(0, heads, page_size, head_dim, pages_per_row)
    scale = head_dim ** -0.5
    out = np.asarray(paged_decode_attention(q, k_pages, v_pages, tables, lengths, scale, interpret=True))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(out).all()  # the padding row included; its values are never read
    want = reference(q, k_pages, v_pages, tables, lengths, scale)
    np.testing.assert_allclose(out[:-1], want[:-1], rtol=1e-5, atol=1e-5)


def test_under_jit_with_traced_tables_and_bfloat16_cache():
    """Inside jit, block tables and lengths are traced; a bfloat16 q and cache give bfloat16
    results (q in a different dtype from the cache comes back in q's dtype)."""
    q, k_pages, v_pages, tables, lengths = make_case(1, 4, 16, 32, 4)
    k16, v16 = jnp.asarray(k_pages, jnp.bfloat16), jnp.asarray(v_pages, jnp.bfloat16)
    step = jax.jit(lambda q, t, n: paged_decode_attention(q, k16, v16, t, n, 32 ** -0.5, interpret=True))
    out = step(q, tables, lengths)  # q float32, cache bfloat16
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    want = reference(q, k16.astype(jnp.float32), v16.astype(jnp.float32), tables, lengths, 32 ** -0.5)
    np.testing.assert_allclose(np.asarray(out)[:-1], want[:-1], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_kernel_params_fit_the_kernel(page_size):
    """For every table width: the padded width splits into k_splits partitions of whole compute
    blocks (the kernel asserts both), and a compute block is a power of two pages."""
    for pages_per_row in range(1, 300):
        pages_per_block, k_splits, padded = kernel_params(pages_per_row, page_size)
        assert pages_per_row <= padded < pages_per_row + k_splits * pages_per_block
        assert padded % k_splits == 0 and (padded // k_splits) % pages_per_block == 0
        assert 1 <= k_splits <= MAX_K_SPLITS
        assert pages_per_block & (pages_per_block - 1) == 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("heads,page_size,head_dim,pages_per_row",
                         [(12, 16, 64, 64), (25, 64, 32, 7), (4, 32, 32, 1)])
def test_lowers_to_triton_for_cuda(heads, page_size, head_dim, pages_per_row, dtype):
    """Lowering for CUDA needs no GPU and checks what interpret mode does not: Triton's
    power-of-two load shapes and same-dtype dots (one Triton custom call per invocation)."""
    n = 8
    step = jax.jit(lambda q, k, v, t, l: paged_decode_attention(q, k, v, t, l, head_dim ** -0.5))
    cache = jax.ShapeDtypeStruct((heads, 100, page_size, head_dim), dtype)  # [H, P, B, K]
    lowered = step.trace(
        jax.ShapeDtypeStruct((n, heads, head_dim), jnp.float32), cache, cache,
        jax.ShapeDtypeStruct((n, pages_per_row), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.int32),
    ).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("custom_call @__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("groups", [1, 3])
def test_matches_the_xla_decode_path(groups):
    """The engine's two decode paths agree: models/attention.py `attend` (XLA, what CPU runs)
    and the Pallas kernel (what `--attention-backend pallas` runs on CUDA), here in interpret
    mode, over the same pages, block tables and positions (decode row i attends to [0, pos]);
    `groups` query heads per KV head (3: grouped-query attention, 12 query heads on 4 KV heads)."""
    from orca_jax.models.attention import attend
    from orca_jax.plan import AttnMeta
    heads, page_size, head_dim, width = 4, 16, 32, 5
    q, k_pages, v_pages, tables, lengths = make_case(7, heads, page_size, head_dim, width)
    q = np.repeat(q, groups, axis=1) * np.linspace(0.5, 1.5, heads * groups, dtype=np.float32)[None, :, None]
    real = lengths > 0
    q, tables, lengths = q[real], tables[real], lengths[real]
    n, i32 = len(lengths), np.int32
    meta = AttnMeta(slot=np.zeros(n, i32), pos=lengths - 1, kv_index=np.zeros(n, i32),
                    seg=np.zeros(0, i32), block_table=tables, dec_blocks=i32(width),
                    hist_table=np.zeros((0, width), i32), hist_len=np.zeros(0, i32),
                    hist_row0=np.zeros(0, i32), hist_rows=np.zeros(0, i32), num_hist=i32(0),
                    seg_table=np.zeros((0, width), i32), num_decode=n)
    meta = jax.tree.map(jnp.asarray, meta)  # device arrays, as inside the step program
    scale = head_dim ** -0.5
    xla = attend(jnp.asarray(q), None, None, jnp.asarray(k_pages), jnp.asarray(v_pages), meta, scale)
    pallas = paged_decode_attention(q, k_pages, v_pages, tables, lengths, scale, interpret=True)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(pallas), rtol=1e-5, atol=1e-5)
