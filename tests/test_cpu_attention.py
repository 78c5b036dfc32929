"""The CPU attention kernel (models/cpu_attention.py): built with the system's compiler,
checked against the XLA path it replaces, and chosen by "auto" only where it fits."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from orca_jax.config import EngineConfig
from orca_jax.engine import Engine
from orca_jax.models import PRESETS, cpu_attention, family
from orca_jax.models.attention import _in_window, _pages_softmax, _softmax_init
from orca_jax.plan import PagedKV
from orca_jax.request import SamplingParams
from orca_jax.runner import resolve_attention_backend
from orca_jax.sharding.mesh import single_device_mesh

needs_kernel = pytest.mark.skipif(cpu_attention.load() is not None, reason=str(cpu_attention.load()))


def _xla(q, k_pages, v_pages, table, pos, window, scale):
    """The XLA path's decode attention (what backend "xla" runs), normalised."""
    n_pages = -(-(int(pos.max()) + 1) // k_pages.shape[2])
    _, d, acc = _pages_softmax(q, k_pages, v_pages, table, n_pages, lambda idx: _in_window(pos, idx, window),
                               scale, _softmax_init(q))
    return acc / d[..., None]


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim,page,window", [
    (12, 12, 64, 64, None),   # GPT-2 small's shape
    (8, 2, 32, 16, None),     # grouped-query: 4 query heads per KV head
    (4, 1, 16, 8, 13),        # multi-query, a sliding window that starts mid-page
    (6, 3, 24, 32, 1),        # a window of one position; head dim not a power of two
])
def test_kernel_equals_the_xla_path(heads, kv_heads, head_dim, page, window):
    rng = np.random.default_rng(heads + page)
    P, W, N = 60, 6, 9
    k_pages = jnp.asarray(rng.standard_normal((kv_heads, P, page, head_dim), np.float32))
    v_pages = jnp.asarray(rng.standard_normal((kv_heads, P, page, head_dim), np.float32))
    table = jnp.asarray(rng.permutation(P)[:N * W].reshape(N, W).astype(np.int32))
    pos = jnp.asarray(rng.integers(0, W * page, N).astype(np.int32)).at[0].set(0).at[1].set(W * page - 1)
    q = jnp.asarray(rng.standard_normal((N, kv_heads, heads // kv_heads, head_dim), np.float32))
    scale = head_dim ** -0.5
    lo = jnp.zeros_like(pos) if window is None else pos - window + 1
    got = jax.jit(lambda *a: cpu_attention.paged_attention(*a, scale))(q, k_pages, v_pages, table, lo, pos + 1)
    np.testing.assert_allclose(got, _xla(q, k_pages, v_pages, table, pos, window, scale), rtol=2e-5, atol=2e-6)


@needs_kernel
def test_a_row_with_no_position_is_zero_not_nan():
    """Padding rows of a decode bucket must come out finite (their outputs are never read)."""
    k = jnp.ones((2, 4, 8, 16), jnp.float32)
    out = cpu_attention.paged_attention(jnp.ones((3, 2, 1, 16)), k, k, jnp.zeros((3, 2), jnp.int32),
                                               jnp.zeros(3, jnp.int32), jnp.array([0, 5, 0], jnp.int32), 0.25)
    assert np.isfinite(out).all() and not np.asarray(out[0]).any() and np.allclose(out[1], 1.0)


@needs_kernel
@pytest.mark.parametrize("preset,changes,budget", [
    ("gpt2-tiny", {}, 512),                        # whole prompts in one step, then decode
    ("gpt2-tiny", {}, 16),                         # prompts in 16-token chunks: rows read history
    ("llama-tiny", {"sliding_window": 12}, 24),    # grouped-query, a window across chunks
])
def test_engine_tokens_and_logprobs_match_the_xla_backend(preset, changes, budget):
    """Greedy tokens and their logprobs through whole engines (prefill, chunked prefill over
    history, a shared prefix from the prefix cache, decode across page boundaries), with one
    backend and the other: the same random model."""
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
                                                   kv_memory=int(2e7), attention_backend=backend))
        assert eng.runner.attention == backend
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
    expected = "cpu" if cpu_attention.load() is None else "xla"
    assert resolve_attention_backend("auto", mesh, kv, 64) == expected
    assert resolve_attention_backend("auto", mesh, kv, 64, dtype=jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="float32"):
        resolve_attention_backend("cpu", mesh, kv, 64, dtype=jnp.bfloat16)


def test_without_a_compiler_auto_keeps_xla_and_cpu_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_attention, "_loaded", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ORCA_JAX_KERNEL_CACHE", str(tmp_path))
    kv, mesh = PagedKV.make(8, 16, 128), single_device_mesh()
    assert resolve_attention_backend("auto", mesh, kv, 64) == "xla"
    with pytest.raises(ValueError, match="no C.. compiler"):
        resolve_attention_backend("cpu", mesh, kv, 64)
