"""Device sampling: greedy, seeded draws, filters, penalties and logprobs against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orca_jax.request import MAX_LOGPROBS, SamplingParams
from orca_jax.plan import SamplingTensors
from orca_jax.sampling import filter_logits, sample

V = 16
sample_jit = jax.jit(sample)


def make_logits(rows, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(size=(rows, V)).astype(np.float32) * scale


def tensors(params, seeds=None, steps=None, rows=None):
    seeds = seeds if seeds is not None else [0] * len(params)
    steps = steps if steps is not None else [0] * len(params)
    return SamplingTensors.from_params(params, seeds, steps, rows or len(params))


def run(logits, st, history=None, prompt_len=None, hist_len=None):
    if history is None:  # no penalties asked: any history will do
        R = len(logits)
        history, prompt_len, hist_len = np.zeros((R, 1), np.int32), np.ones(R, np.int32), np.ones(R, np.int32)
    history = jnp.asarray(history)  # row r's history is slot r
    return jax.device_get(sample_jit(jnp.asarray(logits), st, history, jnp.arange(history.shape[0]),
                                     prompt_len, hist_len))


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_greedy_is_argmax():
    logits = make_logits(5)
    out = run(logits, tensors([SamplingParams(temperature=0.0)] * 3, rows=5))
    np.testing.assert_array_equal(out.ids, logits.argmax(-1))
    np.testing.assert_array_equal(out.logprob, 0)  # nobody asked for logprobs: not computed


def test_greedy_takes_the_first_of_tied_maxima():
    logits = np.zeros((3, V), np.float32)
    logits[0, [9, 3, 12]] = 2.0
    logits[1, [V - 1, V - 2]] = 1.0
    logits[2] = -np.inf                       # everything banned: argmax says 0
    out = run(logits, tensors([SamplingParams(temperature=0.0)] * 3))
    np.testing.assert_array_equal(out.ids, [3, V - 2, 0])


def test_greedy_row_in_sampling_batch_is_argmax():
    logits = make_logits(4, scale=0.1)  # flat: sampling rows would rarely hit the argmax
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.0, top_k=3),
              SamplingParams(temperature=2.0), None]
    st = tensors(params, seeds=[1, 2, 3, 0])
    assert st.any_random and st.any_filter
    for step in range(20):
        out = run(logits, tensors(params, seeds=[1, 2, 3, 0], steps=[step] * 4))
        np.testing.assert_array_equal(out.ids[[1, 3]], logits[[1, 3]].argmax(-1))


def test_draw_depends_only_on_seed_and_step():
    logits = make_logits(1, scale=0.2)
    p = SamplingParams(temperature=1.0)
    alone = [run(logits, tensors([p], seeds=[7], steps=[s])).ids[0] for s in range(10)]
    # Same row at position 5 of a batch with other seeds, filters and penalties (other flags).
    others = [SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.3),
              SamplingParams(temperature=0.0), None, SamplingParams(temperature=1.0, min_p=0.2), None]
    batch_logits = np.concatenate([make_logits(5, seed=1), logits, make_logits(2, seed=2)])
    hist = np.zeros((8, 4), np.int32)
    zeros = np.zeros(8, np.int32)
    for s in range(10):
        st = tensors(others + [p], seeds=[1, 2, 3, 4, 5, 7], steps=[s] * 6, rows=8)
        assert st.any_penalty and st.any_filter
        out = run(batch_logits, st, hist, zeros, zeros)
        assert out.ids[5] == alone[s]


def test_different_seeds_and_steps_differ():
    logits = make_logits(1, scale=0.1)
    draws = lambda seed: [run(logits, tensors([SamplingParams()], [seed], [s])).ids[0]
                          for s in range(20)]
    a, b = draws(1), draws(2)
    assert a != b and len(set(a)) > 3


def test_seed_words_match_jax_random_key():
    # The [R, 2] (high, low) seed words are exactly the threefry key `jax.random.key(seed)`.
    st = tensors([SamplingParams()], seeds=[12345])
    key = jax.random.wrap_key_data(jnp.asarray(st.seed[0]), impl="threefry2x32")
    np.testing.assert_array_equal(jax.random.key_data(key),
                                  jax.random.key_data(jax.random.key(12345)))
    assert tuple(tensors([SamplingParams()], seeds=[(3 << 32) | 9]).seed[0]) == (3, 9)


def empirical(logits_row, params, n=2000, seed=11):
    st = tensors([params] * n, seeds=[seed] * n, steps=list(range(n)))
    ids = run(np.repeat(logits_row[None], n, 0), st).ids
    return np.bincount(ids, minlength=V) / n


def assert_chi_square(freq, probs, n=2000):
    """Pearson's statistic below the chi-square 99.9th percentile (Wilson-Hilferty, z=3.09).
    The draws are seeded, so this cannot flake; it guards against a biased sampler."""
    support = probs > 0
    assert freq[~support].sum() == 0, "sampled a filtered-out token"
    stat = (n * (freq[support] - probs[support]) ** 2 / probs[support]).sum()
    k = support.sum() - 1
    assert stat < k * (1 - 2 / (9 * k) + 3.09 * np.sqrt(2 / (9 * k))) ** 3, (stat, k)
    return k


def test_temperature_one_matches_softmax():
    row = make_logits(1, seed=3, scale=1.0)[0]
    assert_chi_square(empirical(row, SamplingParams(temperature=1.0)), np.exp(log_softmax(row)))


def np_filter(scaled, top_k, top_p, min_p):
    """Reference: HF TopK → TopP (ascending cumsum, remove mass <= 1 - p) → MinP warpers."""
    x = scaled.astype(np.float64).copy()
    if top_k:
        x[x < np.sort(x)[::-1][min(top_k, V) - 1]] = -np.inf
    order = np.argsort(x, kind="stable")
    probs = np.exp(log_softmax(x[order]))
    remove = np.cumsum(probs) <= 1 - top_p
    remove[-1] = False
    x[order[remove]] = -np.inf
    probs = np.exp(log_softmax(x))
    x[probs < min_p * probs.max()] = -np.inf
    return x


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.7, 0.0),
                                               (0, 1.0, 0.1), (5, 0.8, 0.05), (1, 0.5, 0.0),
                                               (0, 1e-6, 0.0), (20, 0.95, 1.0)])
def test_filter_matches_hf_reference(top_k, top_p, min_p):
    scaled = make_logits(6, seed=4)
    got = jax.jit(filter_logits)(scaled, jnp.full(6, top_k), jnp.full(6, top_p, jnp.float32),
                                 jnp.full(6, min_p, jnp.float32))
    for row, g in zip(scaled, np.asarray(got)):
        want = np_filter(row, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(g), np.isfinite(want))
        assert np.isfinite(g).sum() >= 1


def test_filter_keeps_ties_and_never_nans():
    scaled = np.array([[5.0, 5.0, 1.0, 1.0] + [-1e30] * (V - 4),
                       [1e30] + [-1e30] * (V - 1)], np.float32)
    got = np.asarray(jax.jit(filter_logits)(scaled, jnp.array([1, 1]), jnp.array([0.1, 0.1]),
                                   jnp.array([0.5, 1.0])))
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(np.isfinite(got[0]), [True, True] + [False] * (V - 2))
    np.testing.assert_array_equal(np.isfinite(got[1]), [True] + [False] * (V - 1))


def test_filtered_sampling_matches_renormalised_distribution():
    row = make_logits(1, seed=5, scale=1.0)[0]
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.8, min_p=0.05)
    kept = np_filter(row / 0.7, 8, 0.8, 0.05)
    assert 1 < assert_chi_square(empirical(row, params), np.exp(log_softmax(kept))) < V - 1


@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
                                    SamplingParams(min_p=1.0)])
def test_filters_that_leave_one_token_are_argmax(params):
    logits = make_logits(8)
    st = tensors([params] * 8, seeds=list(range(8)))
    np.testing.assert_array_equal(run(logits, st).ids, logits.argmax(-1))


def test_top_k_two_stays_in_top_two():
    row = make_logits(1, seed=6, scale=0.3)[0]
    freq = empirical(row, SamplingParams(top_k=2), n=500)
    top2 = np.argsort(row)[-2:]
    assert freq[top2].sum() == 1.0 and (freq[top2] > 0).all()


def test_min_p_filters():
    row = np.log(np.array([0.5, 0.3, 0.1, 0.06] + [0.04 / (V - 4)] * (V - 4), np.float32))
    freq = empirical(row, SamplingParams(min_p=0.25), n=500)  # keeps p >= 0.125
    assert freq[:2].sum() == 1.0 and (freq[:2] > 0).all()


def np_penalties(logits, history, prompt_len, hist_len, rep, pres, freq):
    """HF RepetitionPenaltyLogitsProcessor over prompt+output, then OpenAI's formula."""
    out = logits.astype(np.float64).copy()
    seen = set(history[:hist_len])
    counts = np.bincount(history[prompt_len:hist_len], minlength=V)
    for t in seen:
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    return out - freq * counts - pres * (counts > 0)


def test_penalties_match_reference_formulas():
    rng = np.random.default_rng(7)
    R, M = 5, 12
    logits = make_logits(R, seed=8)
    history = rng.integers(0, V, size=(R, M)).astype(np.int32)
    history[:, -2:] = [-5, 999]  # garbage past hist_len must be ignored
    prompt_len = np.array([3, 4, 0, 5, 2], np.int32)
    hist_len = np.array([8, 4, 6, 10, 2], np.int32)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5),
              SamplingParams(temperature=0.0, repetition_penalty=0.7, presence_penalty=-0.5,
                             frequency_penalty=2.0),
              SamplingParams(temperature=0.0, frequency_penalty=-1.0), None]
    st = tensors(params, rows=R)
    assert st.any_penalty and not st.any_random
    from orca_jax.sampling import apply_penalties
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), st, history, prompt_len, hist_len))
    for r, p in enumerate(params + [None] * (R - len(params))):
        p = p or SamplingParams()
        want = np_penalties(logits[r], history[r], prompt_len[r], hist_len[r],
                            p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-6)
    out = run(logits, st, history, prompt_len, hist_len)
    np.testing.assert_array_equal(out.ids, got.argmax(-1))


def test_logprobs_are_raw_log_softmax_and_sorted():
    logits = make_logits(4, seed=9)
    logits[0, :3] = logits[0].max() + 1  # a three-way tie for the top
    params = [SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=2.0),
              SamplingParams(temperature=1.0, logprobs=0), None, SamplingParams(logprobs=2)]
    st = tensors(params, seeds=[1, 2, 0, 3])
    assert st.any_logprobs
    N = min(MAX_LOGPROBS, V)
    hist = np.tile(np.arange(6, dtype=np.int32), (4, 1))
    out = run(logits, st, hist, np.full(4, 3, np.int32), np.full(4, 6, np.int32))
    want = log_softmax(logits.astype(np.float64))  # raw: penalties do not change logprobs
    np.testing.assert_allclose(out.logprob, want[np.arange(4), out.ids], rtol=1e-5, atol=1e-5)
    assert out.top_ids.shape == (4, N) and out.top_logprobs.shape == (4, N)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(want, out.top_ids, 1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.top_logprobs, -np.sort(-want, axis=1)[:, :N], rtol=1e-5, atol=1e-5)
    assert list(out.top_ids[0, :3]) == [0, 1, 2]  # ties: lowest id first


def test_from_params_padding_and_flags():
    st = SamplingTensors.from_params([None, SamplingParams(temperature=0.0, top_k=5, logprobs=7)],
                                     [9, 1 << 40], [0, 3], num_rows=4)
    assert not st.any_random and not st.any_filter and not st.any_penalty  # greedy ignores filters
    assert st.any_logprobs
    np.testing.assert_array_equal(st.temperature, 0)
    np.testing.assert_array_equal(st.top_p, 1)
    np.testing.assert_array_equal(st.repetition_penalty, 1)
    np.testing.assert_array_equal(st.seed, [[0, 0], [256, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(st.step, [0, 3, 0, 0])
    assert st.temperature.dtype == np.float32 and st.top_k.dtype == np.int32
    assert st.seed.dtype == np.uint32 and st.step.dtype == np.int32
    st = tensors([SamplingParams(), SamplingParams(presence_penalty=0.1, temperature=0.0)], rows=3)
    assert st.any_random and st.any_penalty and not st.any_filter and not st.any_logprobs
    assert tensors([SamplingParams(min_p=0.1)]).any_filter
    with pytest.raises(ValueError):
        tensors([SamplingParams()] * 3, rows=2)


def test_no_recompile_across_param_values():
    traces = []

    @jax.jit
    def step(logits, st, hist, plen, hlen):
        traces.append(1)
        return sample(logits, st, hist, jnp.arange(hist.shape[0]), plen, hlen)

    logits = jnp.asarray(make_logits(4))
    hist, lens = jnp.zeros((4, 3), jnp.int32), jnp.full(4, 2, jnp.int32)
    mixes = [[SamplingParams(temperature=0.0)],  # every flag off
             [SamplingParams(temperature=1.0)],
             [SamplingParams(temperature=0.0, presence_penalty=0.5)],
             [SamplingParams(temperature=0.7, top_p=0.9, logprobs=3)]]
    for i in range(5):  # flags are runtime values: every mix runs the one program
        mixes.append([SamplingParams(temperature=0.5 + i, top_k=i + 1, top_p=0.9 - 0.1 * i, seed=i,
                                     repetition_penalty=1.0 + 0.1 * (i + 1), logprobs=2 + i % 4)] * 3)
    for i, params in enumerate(mixes):
        st = tensors(params, seeds=[i, i + 1, i + 2][:len(params)], steps=[i] * len(params), rows=4)
        out = step(logits, st, hist, lens, lens)
        if not st.any_random and not st.any_penalty:
            np.testing.assert_array_equal(out.ids, np.asarray(logits).argmax(-1))
    assert len(traces) == 1
    assert step._cache_size() == 1


@pytest.mark.parametrize("V", [7, 1024, 1025, 3000, 50257])
def test_argmax_first_is_top1_first_on_ties(V):
    """The greedy pick (two passes over blocks) equals lax.top_k's first index on ties, with
    ties across and inside blocks, a partial last block and a row of all -inf (all banned)."""
    from orca_jax.sampling import argmax_first
    x = np.random.default_rng(V).integers(-3, 3, (16, V)).astype(np.float32)
    x[0] = -np.inf
    x[1, -1] = 9.0                       # the max in the partial last block
    x[2, [V // 2, V - 1]] = 9.0          # tied maxima in different blocks: the first wins
    got = jax.jit(argmax_first)(jnp.asarray(x))
    np.testing.assert_array_equal(got, jax.lax.top_k(jnp.asarray(x), 1)[1][:, 0])
