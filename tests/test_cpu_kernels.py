"""The CPU kernels (models/cpu_kernels.py: attention over pages, dense layers over packed
weights): built with the system's compiler, checked against the XLA paths they replace, and
chosen by "auto" only where they fit."""
import platform
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from orca_jax.config import EngineConfig
from orca_jax.engine import Engine
from orca_jax.models import PRESETS, cpu_kernels, family
from orca_jax.models.attention import _in_window, _pages_softmax, _softmax_init, write_kv
from orca_jax.plan import PagedKV
from orca_jax.request import SamplingParams
from orca_jax.runner import resolve_attention_backend, resolve_matmul_backend
from orca_jax.sampling import masked_argmax
from orca_jax.sharding.mesh import single_device_mesh

needs_kernel = pytest.mark.skipif(cpu_kernels.load() is not None, reason=str(cpu_kernels.load()))


def _xla(q, k_pages, v_pages, table, pos, window, scale):
    """The XLA path's decode attention (what backend "xla" runs), normalised."""
    n_pages = -(-(int(pos.max()) + 1) // k_pages.shape[2])
    _, d, acc = _pages_softmax(q, k_pages, v_pages, table, n_pages, lambda idx: _in_window(pos, idx, window),
                               scale, _softmax_init(q))
    return acc / d[..., None]


def _step_rows(rng, N, heads, kv_heads, head_dim, page, P, W):
    """A decode step of N rows over random pages: each row its own pages (a block table of W),
    a position, and its new key and value written there; the last row is padding (position
    past the pool: dropped, nothing attended)."""
    k_pages = jnp.asarray(rng.standard_normal((kv_heads, P, page, head_dim), np.float32))
    v_pages = jnp.asarray(rng.standard_normal((kv_heads, P, page, head_dim), np.float32))
    table = rng.permutation(P)[:N * W].reshape(N, W).astype(np.int32)
    pos = rng.integers(0, W * page, N).astype(np.int32)
    pos[0], pos[1] = 0, W * page - 1
    kv_index = table[np.arange(N), pos // page] * page + pos % page
    kv_index[-1], pos[-1] = P * page, -1
    q, k, v = (rng.standard_normal((N, h, head_dim)).astype(np.float32) for h in (heads, kv_heads, kv_heads))
    return q, k, v, k_pages, v_pages, jnp.asarray(table), jnp.asarray(pos), jnp.asarray(kv_index)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim,page,window", [
    (12, 12, 64, 64, None),   # GPT-2 small's shape
    (8, 2, 32, 16, None),     # grouped-query: 4 query heads per KV head
    (4, 1, 16, 8, 13),        # multi-query, a sliding window that starts mid-page
    (6, 3, 24, 32, 1),        # a window of one position; head dim not a power of two
])
@pytest.mark.parametrize("layout", ["apart", "one array"])
def test_kernel_equals_the_xla_path(heads, kv_heads, head_dim, page, window, layout):
    """The kernel writes the step's keys and values as XLA's scatter does and then attends as
    the XLA path does, reading q, k, v from three arrays or from one array holding them side
    by side (GPT-2's c_attn output)."""
    rng = np.random.default_rng(heads + page)
    N, P, W = 9, 60, 6
    q, k, v, k_pages, v_pages, table, pos, kv_index = _step_rows(rng, N, heads, kv_heads, head_dim, page, P, W)
    scale = head_dim ** -0.5
    lo = jnp.zeros_like(pos) if window is None else pos - window + 1
    meta = types.SimpleNamespace(kv_index=kv_index)  # all write_kv reads of the plan
    want_k, want_v = write_kv(k_pages, jnp.asarray(k), meta), write_kv(v_pages, jnp.asarray(v), meta)
    G = heads // kv_heads
    want = _xla(jnp.asarray(q).reshape(N, kv_heads, G, head_dim), want_k, want_v, table, pos, window, scale)
    if layout == "apart":  # k and v with a spare head in front: read from head 1
        spare = np.full_like(k[:, :1], np.nan)
        src, first = (q, np.concatenate([spare, k], 1), np.concatenate([spare, v], 1)), (0, 1, 1)
    else:
        qkv = np.concatenate([q, k, v], axis=1)  # [N, H + 2 Hkv, K]
        src, first = (qkv, qkv, qkv), (0, heads, heads + kv_heads)
    run = jax.jit(lambda s, kp, vp: cpu_kernels.attend(*s, kp, vp, kv_index, table, lo, pos + 1, scale, heads, first))
    out, got_k, got_v = run(tuple(map(jnp.asarray, src)), k_pages, v_pages)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
    np.testing.assert_allclose(out[:-1].reshape(N - 1, kv_heads, G, head_dim), want[:-1], rtol=2e-5, atol=2e-6)
    assert not np.asarray(out[-1]).any()  # the padding row attends to nothing: zeros, not NaN


@needs_kernel
def test_the_kernel_writes_the_pages_in_place():
    """In a jitted step that donates the pages the kernel writes into their buffers, not into
    copies (a copy of every layer's pages per step would cost more than the attention)."""
    rng = np.random.default_rng(0)
    q, k, v, k_pages, v_pages, table, pos, kv_index = _step_rows(rng, 5, 2, 2, 16, 8, 7, 1)
    step = jax.jit(lambda kp, vp: cpu_kernels.attend(q, k, v, kp, vp, kv_index, table, pos * 0, pos + 1, 0.25, 2),
                   donate_argnums=(0, 1))
    src_k, src_v = jnp.array(k_pages), jnp.array(v_pages)
    ptrs = src_k.unsafe_buffer_pointer(), src_v.unsafe_buffer_pointer()
    _, got_k, got_v = step(src_k, src_v)
    assert (got_k.unsafe_buffer_pointer(), got_v.unsafe_buffer_pointer()) == ptrs and src_k.is_deleted()
    meta = types.SimpleNamespace(kv_index=kv_index)
    np.testing.assert_array_equal(got_k, write_kv(k_pages, jnp.asarray(k), meta))


@needs_kernel
@pytest.mark.parametrize("preset,changes,budget", [
    ("gpt2-tiny", {}, 512),                        # whole prompts in one step, then decode
    ("gpt2-tiny", {}, 16),                         # prompts in 16-token chunks: rows read history
    ("llama-tiny", {"sliding_window": 12}, 24),    # grouped-query, a window across chunks
])
def test_engine_tokens_and_logprobs_match_the_xla_backend(preset, changes, budget):
    """Greedy tokens and their logprobs through whole engines (prefill, chunked prefill over
    history, a shared prefix from the prefix cache, decode across page boundaries), all on
    XLA and all on the CPU kernels (attention, dense layers, the greedy pick): the same
    random model."""
    c = PRESETS[preset].replace(**changes)
    params = family(c).init_params(c)
    rng = np.random.default_rng(0)
    shared = rng.integers(0, c.vocab_size, 20).tolist()
    prompts = [rng.integers(0, c.vocab_size, n).tolist() for n in (3, 17, 40, 9)] + [shared + [5, 6], shared + [7]]
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=0)
    runs = {}
    for backend in ("xla", "cpu"):
        eng = Engine.build(c, params, EngineConfig(max_batch_size=4, max_model_len=96, page_size=16, warmup=False,
                                                   max_num_batched_tokens=budget, max_prefill_seqs=4,
                                                   kv_memory=int(2e7), attention_backend=backend,
                                                   matmul_backend=backend))
        assert eng.runner.attention == eng.runner.matmul == backend
        assert eng.runner._argmax() is (cpu_kernels.argmax_rows if backend == "cpu" else masked_argmax)
        reqs = [eng.add_request(p, sp) for p in prompts]
        while eng.has_unfinished():
            eng.step()
        runs[backend] = [(r.output_ids, [lp["logprob"] for lp in r.logprobs]) for r in reqs]
    for (tx, lx), (tc, lc) in zip(runs["xla"], runs["cpu"]):
        assert tc == tx
        np.testing.assert_allclose(lc, lx, atol=1e-4)


def test_auto_picks_the_kernel_only_where_it_fits(monkeypatch):
    kv = PagedKV.make(8, 16, 128)
    mesh = single_device_mesh()
    expected = "cpu" if cpu_kernels.load() is None else "xla"
    assert resolve_attention_backend("auto", mesh, kv, 64) == expected
    assert resolve_attention_backend("auto", mesh, kv, 64, dtype=jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="float32"):
        resolve_attention_backend("cpu", mesh, kv, 64, dtype=jnp.bfloat16)
    assert resolve_matmul_backend("auto", mesh) == expected
    assert resolve_matmul_backend("auto", mesh, jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="float32"):
        resolve_matmul_backend("cpu", mesh, jnp.bfloat16)


def test_without_a_compiler_auto_keeps_xla_and_cpu_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ORCA_JAX_KERNEL_CACHE", str(tmp_path))
    kv, mesh = PagedKV.make(8, 16, 128), single_device_mesh()
    assert resolve_attention_backend("auto", mesh, kv, 64) == "xla"
    assert resolve_matmul_backend("auto", mesh) == "xla"
    with pytest.raises(ValueError, match="no C.. compiler"):
        resolve_attention_backend("cpu", mesh, kv, 64)
    with pytest.raises(ValueError, match="--matmul-backend cpu: no C.. compiler"):
        resolve_matmul_backend("cpu", mesh)


# ----------------------------------------------------------------------------- dense layers

@needs_kernel
@pytest.mark.parametrize("shape,n_in,rows,bias", [
    ((64, 3, 4, 16), 1, 5, True),     # GPT-2's fused qkv: [D, 3, H, K]
    ((4, 16, 64), 2, 9, True),        # an output projection: [H, K, D], two input dims
    ((33, 70), 1, 17, False),         # odd sizes: a partial last panel, a tail tile of 1 row
    ((48, 96), 1, 1, True),           # one decode row
    ((40, 500), 1, 64, False),        # 64 rows: eight full tiles
    ((2500, 40), 1, 19, True),        # a long K (a down projection's), 19 rows: a tail tile of 3
])
def test_packed_matmul_equals_the_einsum(shape, n_in, rows, bias):
    rng = np.random.default_rng(rows)
    w = jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:n_in])))  # outputs ~ 1
    b = jnp.asarray(rng.standard_normal(shape[n_in:], np.float32)) if bias else None
    x = jnp.asarray(rng.standard_normal((rows, *shape[:n_in]), np.float32))
    packed = jax.jit(cpu_kernels.pack, static_argnums=1)(w, n_in)
    P = cpu_kernels.PANEL
    assert packed.panels.shape == (-(-np.prod(shape[n_in:]) // P), np.prod(shape[:n_in]), P)
    got = jax.jit(cpu_kernels.matmul)(x, packed, b)
    want = jnp.tensordot(x, w, n_in, precision="highest") + (0 if b is None else b)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_tied_table_packed_as_the_head_still_embeds():
    table = jnp.asarray(np.random.default_rng(0).standard_normal((100, 24), np.float32))
    P = cpu_kernels.PANEL
    ids = jnp.array([0, P - 1, P, 99, 2 * P, P - 1])  # panel edges
    np.testing.assert_array_equal(cpu_kernels.table_rows(cpu_kernels.pack(table.T, 1), ids), table[ids])


@needs_kernel
@pytest.mark.parametrize("preset,changes", [
    ("gpt2-tiny", {}),                                        # tied head, fused qkv, biases
    ("llama-tiny", {"tie_embeddings": False}),                # gated MLP, own LM head
    ("llama-tiny", dict(mlp="plain", activation="gelu_new", qkv_bias=True, o_bias=True, mlp_bias=True,
                        norm="layer", norm_bias=True, parallel_residual=True, lm_head_bias=True,
                        tie_embeddings=False)),                # GPT-NeoX / GPT-J-like: biases everywhere
])
def test_engine_with_packed_weights_matches_xla_matmuls(preset, changes):
    """Greedy tokens and logprobs through whole engines (prefill and decode) with the dense
    layers on the kernel and on XLA; the packed weights replace the arrays (no second copy)."""
    c = PRESETS[preset].replace(**changes)
    params = family(c).init_params(c)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, c.vocab_size, n).tolist() for n in (3, 17, 40, 9, 1)]
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=0)
    runs = {}
    for backend in ("xla", "cpu"):
        eng = Engine.build(c, params, EngineConfig(max_batch_size=4, max_model_len=96, page_size=16, warmup=False,
                                                   kv_memory=int(2e7), matmul_backend=backend))
        assert eng.runner.matmul == backend
        leaves = jax.tree.leaves(eng.runner._params, is_leaf=lambda x: isinstance(x, cpu_kernels.PackedWeight))
        packed = [x for x in leaves if isinstance(x, cpu_kernels.PackedWeight)]
        # every dense weight ("kernel") of every layer, and the head: none left to XLA
        paths = jax.tree_util.tree_flatten_with_path(
            eng.runner._params, is_leaf=lambda x: isinstance(x, cpu_kernels.PackedWeight))[0]
        kernels = [x for path, x in paths if "kernel" in jax.tree_util.keystr(path)]
        tied = family(c).head_key(c)[-1] != "kernel"  # the head is the embedding table
        assert len(packed) == (len(kernels) + tied if backend == "cpu" else 0)
        n_bytes = sum(x.panels.nbytes if isinstance(x, cpu_kernels.PackedWeight) else x.nbytes for x in leaves)
        reqs = [eng.add_request(p, sp) for p in prompts]
        while eng.has_unfinished():
            eng.step()
        runs[backend] = n_bytes, [(r.output_ids, [lp["logprob"] for lp in r.logprobs]) for r in reqs]
    (bytes_xla, xla), (bytes_cpu, cpu) = runs["xla"], runs["cpu"]
    assert bytes_xla <= bytes_cpu <= bytes_xla * 1.1  # panels pad the columns to whole panels; no second copy
    for (tx, lx), (tc, lc) in zip(xla, cpu):
        assert tc == tx
        np.testing.assert_allclose(lc, lx, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("V", [7, 17, 1025, 50257])
def test_greedy_argmax_kernel_equals_the_xla_pick(V):
    """argmax_rows (the sampling program's greedy pick with the kernels) returns what
    `sampling.masked_argmax` does: the first index on ties, never a banned id (the padding, ids
    >= V, ignored), 0 for a row whose allowed entries are all -inf. With NaN logits it
    picks the first allowed NaN, as numpy's and torch's argmax do (XLA's two-stage pick
    depends on which block holds the NaN there)."""
    rng = np.random.default_rng(V)
    R, NB = 12, 5
    x = rng.integers(-3, 3, (R, V)).astype(np.float32)   # many ties
    banned = np.full((R, NB), 2**30, np.int32)           # padding: out of range
    x[0] = -np.inf                                       # all -inf: 0
    x[1, -1] = 9.0                                       # the max in the vector loop's tail
    x[2, [V // 2, V - 1]] = 9.0                          # tied maxima: the first wins
    x[3, [1, V - 1]] = 9.0
    banned[3, 0] = 1                                     # the first maximum banned: the second
    x[4, 0] = 9.0
    banned[4, 0] = 0                                     # the only maximum banned: the next best
    x[5, [2, V - 2]] = np.nan                            # NaN: the first one
    x[6, [0, V - 1]] = np.nan
    banned[6, 0] = 0                                     # a banned NaN does not count
    x[7] = -np.inf
    x[7, V - 1] = 1.0
    banned[7, 0] = V - 1                                 # all allowed entries -inf: 0
    x[8, :] = 5.0                                        # all equal, the first ones banned
    banned[8, :3] = [0, 1, 2]
    got = jax.jit(cpu_kernels.argmax_rows)(jnp.asarray(x), jnp.asarray(banned))
    want = jax.jit(masked_argmax)(jnp.asarray(x), jnp.asarray(banned))
    finite = [r for r in range(R) if r not in (5, 6)]
    np.testing.assert_array_equal(np.asarray(got)[finite], np.asarray(want)[finite])
    assert got[3] == V - 1 and got[4] != 0 and got[5] == 2 and got[6] == V - 1 and got[8] == 3


def test_huge_pages_back_the_buffers_and_keep_their_bytes():
    """`huge_pages` (what the runner does to its weights and KV pages on CPU) changes only the
    backing: every byte stays and buffers smaller than a huge page are left alone. In a fresh
    process on a Linux 6.1+ kernel with transparent huge pages not "never", a 12 MiB buffer
    ends up in them (collapsing is best-effort: the kernel refuses a range now and then)."""
    rng = np.random.default_rng(0)
    big = jnp.asarray(rng.standard_normal((3 << 20,), np.float32))   # 12 MiB
    small = jnp.asarray(rng.standard_normal((1000,), np.float32))
    want = np.asarray(big).copy(), np.asarray(small).copy()
    done = cpu_kernels.huge_pages({"big": big, "small": small, "not an array": 3})
    np.testing.assert_array_equal(big, want[0])
    np.testing.assert_array_equal(small, want[1])
    assert done % cpu_kernels.HUGE_PAGE == 0 and done <= big.nbytes + 2 * cpu_kernels.HUGE_PAGE
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    release = tuple(int(x) for x in re.findall(r"\d+", platform.release())[:2])
    if platform.system() == "Linux" and release >= (6, 1) and thp.exists() and "[never]" not in thp.read_text():
        code = ("import numpy as np, jax.numpy as jnp; from orca_jax.models import cpu_kernels as ck; "
                "print(ck.huge_pages(jnp.asarray(np.ones(3 << 20, np.float32))))")
        # the kernel may refuse a collapse now and then (EAGAIN, EINVAL): one of three fresh tries
        fresh = [int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.split()[-1]) for _ in range(3)]
        assert all(f == 0 or big.nbytes - 2 * cpu_kernels.HUGE_PAGE <= f <= big.nbytes + 2 * cpu_kernels.HUGE_PAGE
                   for f in fresh), fresh  # all of the buffer or nothing
        if not any(fresh):
            pytest.skip("the kernel refused MADV_COLLAPSE in 3 fresh processes (best-effort)")


@needs_kernel
@pytest.mark.parametrize("rms,bias,shape", [(False, True, (64, 768)), (False, False, (5, 3, 40)),
                                            (True, False, (7, 4, 64)), (True, False, (1, 4096))])
def test_norm_kernel_equals_the_xla_norms(rms, bias, shape):
    """LayerNorm (with and without bias) and RMSNorm (over the last dim of 2-D and 3-D rows,
    as the q/k norms take them) through the kernel, against models/layers.py's XLA forms."""
    from orca_jax.models.layers import layer_norm, rms_norm
    rng = np.random.default_rng(shape[-1])
    x = jnp.asarray(rng.standard_normal(shape, np.float32) * 3 + 1)
    p = {"scale": jnp.asarray(rng.standard_normal(shape[-1:], np.float32))}
    if bias:
        p["bias"] = jnp.asarray(rng.standard_normal(shape[-1:], np.float32))
    fn = rms_norm if rms else layer_norm
    want = fn(x, p, 1e-5)
    got = jax.jit(fn, static_argnums=2)(x, cpu_kernels.NormWeights(p["scale"], p.get("bias")), 1e-5)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("gelu,residual", [(True, False), (False, True), (True, True)])
def test_packed_matmul_epilogue_equals_gelu_then_residual(gelu, residual):
    """The kernel's epilogue (what layers.linear fuses: a tanh GELU, then + residual) against
    XLA's jax.nn.gelu(approximate=True) and add, over outputs from -12 to 12 (GELU's tails)
    and a partial last panel."""
    rng = np.random.default_rng(int(gelu) + 2 * int(residual))
    K, N, T = 40, 70, 11
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 4 / np.sqrt(K))
    b = jnp.asarray(rng.standard_normal(N, np.float32))
    x = jnp.asarray(rng.standard_normal((T, K), np.float32)).at[0].set(0.0)
    r = jnp.asarray(rng.standard_normal((T, N), np.float32)) if residual else None
    got = jax.jit(cpu_kernels.matmul, static_argnums=3)(x, cpu_kernels.pack(w, 1), b, gelu, r)
    want = jnp.dot(x, w, precision="highest") + b
    want = jax.nn.gelu(want, approximate=True) if gelu else want
    want = want + r if residual else want
    assert float(jnp.abs(jnp.dot(x, w) + b).max()) > 8  # reaches the tails
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
