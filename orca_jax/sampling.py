"""Token sampling on the device, inside the jitted engine step.

Pure, jittable, vectorised over rows (R = rows that sample, V = vocabulary), no host sync.
The order of operations and each formula follow vLLM's sampler (and HF's logits processors):

  raw logits ── logprobs: log_softmax of the RAW logits (vLLM's default "raw_logprobs")
      │
  penalties      repetition (HF/CTRL, over prompt+output), then frequency and presence
      │          (OpenAI, over the output only) — vLLM `apply_penalties`
      ├── greedy rows (temperature 0): argmax, first index on ties (exact, no RNG)
  / temperature
  top-k → top-p → min-p   HF warper order; each keeps every token tied with its cut-off value
      │                   (HF/vLLM compare against a threshold), so ties are deterministic
  categorical   key = fold_in(key(seed), step): a row's draw depends only on its own seed and
                step, never on batch composition or row index (what `SamplingParams.seed` promises)

Batch-wide switches in `SamplingTensors` (any_penalty, any_filter, any_random, any_logprobs)
skip the stages no row needs, so a batch of greedy requests runs a plain argmax: no sort, no
RNG, no [R, V] scatter. Who reads them is the `variant` (`--sampling-control`):

* None (device control, CPU): `lax.cond`s on the runtime switches, one program per row bucket
  for every mix of parameters (a static flag per combination would be 16 programs);
* "greedy" / "full" (host control, GPU): the host picks one of two programs per row bucket,
  a plain argmax or every stage unconditionally (neutral parameters leave a row's token
  exactly as the skipped stage would). No conditional: XLA:GPU copies a `cond`'s predicate
  to the host and waits for the device to reach it, which would stall every step.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from orca_jax.plan import SamplingTensors
from orca_jax.request import MAX_LOGPROBS

# Top logprobs are always computed MAX_LOGPROBS wide (when any row asks): one shape, one
# program; the host slices each request's own N back out.

# The host builds SamplingTensors (numpy, plan.py); here they become a pytree for the programs.
jax.tree_util.register_dataclass(SamplingTensors)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["ids", "logprob", "top_ids", "top_logprobs"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    ids: jax.Array           # [R] i32 sampled token ids
    logprob: jax.Array       # [R] f32 log_softmax(raw logits)[ids]; zeros when no row asked
    top_ids: jax.Array       # [R, N] i32 most likely ids, best first (lowest id first on ties);
                             # N = MAX_LOGPROBS
    top_logprobs: jax.Array  # [R, N] f32 their raw logprobs


def apply_penalties(logits: jax.Array, st: SamplingTensors, token_history: jax.Array,
                    prompt_len: jax.Array, hist_len: jax.Array) -> jax.Array:
    """vLLM `apply_penalties`. Token counts come from a scatter-add of the history into
    [R, V] per mask (prompt+output, output) (never a one-hot [R, M, V]); garbage positions are dropped."""
    R, V = logits.shape
    pos = jnp.arange(token_history.shape[1])[None, :]                      # [1, M]
    seen = pos < hist_len[:, None]                                         # [R, M] prompt+output
    output = seen & (pos >= prompt_len[:, None])                           # [R, M] output only
    ids = jnp.where(seen, token_history, V)                                # V: out of range
    rows = jnp.arange(R)[:, None]
    scatter = lambda w: jnp.zeros((R, V), jnp.int32).at[rows, ids].add(w, mode="drop")
    seen_any = scatter(seen.astype(jnp.int32)) > 0                         # [R, V]
    out_count = scatter(output.astype(jnp.int32)).astype(jnp.float32)      # [R, V]
    rep = st.repetition_penalty[:, None]
    # HF RepetitionPenaltyLogitsProcessor / CTRL (arXiv:1909.05858): shrink toward zero.
    logits = jnp.where(seen_any, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - st.frequency_penalty[:, None] * out_count
    return logits - st.presence_penalty[:, None] * (out_count > 0)


def filter_logits(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  min_p: jax.Array) -> jax.Array:
    """Mask [R, V] temperature-scaled logits to -inf outside top-k, then top-p, then min-p.

    One descending sort gives each cut-off as a value threshold, so no inverse permutation.
    top-p keeps the smallest prefix whose mass reaches p (HF/vLLM: a token goes when the mass
    strictly above it is already >= p), so the top token always stays. min-p compares with
    the max probability, which renormalising after top-k/top-p does not change, so it is a
    plain log-space test: logit >= max + log(min_p).
    """
    V = scaled.shape[-1]
    desc = jnp.sort(scaled, axis=-1, descending=True)                      # [R, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_k = desc >= jnp.take_along_axis(desc, k[:, None] - 1, axis=-1)      # ties with k-th stay
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
    # Exclusive cumsum by shifting (not cumsum - probs) so it is exactly monotone.
    mass_above = jnp.concatenate([jnp.zeros_like(probs[:, :1]), jnp.cumsum(probs, -1)[:, :-1]], -1)
    keep = in_k & ((mass_above < top_p[:, None]) | (top_p[:, None] >= 1))  # a prefix of desc
    n_keep = jnp.maximum(keep.sum(-1), 1)
    threshold = jnp.take_along_axis(desc, n_keep[:, None] - 1, axis=-1)   # [R, 1]
    keep = (scaled >= threshold) & (scaled - desc[:, :1] >= jnp.log(min_p)[:, None])
    return jnp.where(keep, scaled, -jnp.inf)


def constrain(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """[R, V] logits with the tokens outside each row's bitmask at -inf (structured output,
    allowed_token_ids) and its logit_bias added."""
    R, V = logits.shape
    t = jnp.arange(V, dtype=jnp.int32)
    words = jnp.take(st.allow, t // 32, axis=1)                            # [R, V] i32
    allowed = (jax.lax.shift_right_logical(words, jnp.broadcast_to(t % 32, words.shape)) & 1) == 1
    x = jnp.where(allowed, logits, -jnp.inf)
    return x.at[jnp.arange(R)[:, None], st.bias_ids].add(st.bias, mode="drop")


ARGMAX_BLOCK = 1024  # vocabulary entries per block of `argmax_first`


def argmax_first(x: jax.Array) -> jax.Array:
    """[R] int32 index of each row's maximum of x [R, V], the first one on ties (lax.top_k's
    order), in two passes: the max of each block of ARGMAX_BLOCK entries (one read of x),
    then the index inside the first block that holds the row's max (a [R, ARGMAX_BLOCK]
    gather). XLA:CPU's one-pass argmax and top-1 are slower over a vocabulary-wide row:
    the greedy sampling program at R = 64, V = 50257 took 4.2 ms with top-1, 1.6 ms with
    this (a padded [R, n, B] form of the same idea took 11 ms: XLA copies the padding)."""
    R, V = x.shape
    n = V // ARGMAX_BLOCK                                                       # whole blocks
    maxima = x[:, :n * ARGMAX_BLOCK].reshape(R, n, ARGMAX_BLOCK).max(-1)        # [R, n]
    if V % ARGMAX_BLOCK:
        maxima = jnp.concatenate([maxima, x[:, n * ARGMAX_BLOCK:].max(-1, keepdims=True)], -1)
    first = jnp.argmax(maxima, -1)                                              # [R] block
    idx = first[:, None] * ARGMAX_BLOCK + jnp.arange(ARGMAX_BLOCK)[None]        # [R, B]
    vals = jnp.where(idx < V, jnp.take_along_axis(x, jnp.minimum(idx, V - 1), -1), -jnp.inf)
    return (first * ARGMAX_BLOCK + jnp.argmax(vals, -1)).astype(jnp.int32)


def ban(x: jax.Array, banned: jax.Array) -> jax.Array:
    """x [R, V] with each row's banned ids [R, NB] (ids >= 0; those >= V, the padding, are
    dropped) at -inf: min_tokens holds back EOS and the stop ids."""
    return x.at[jnp.arange(x.shape[0])[:, None], banned].set(-jnp.inf, mode="drop")


def masked_argmax(x: jax.Array, banned: jax.Array) -> jax.Array:
    """[R] int32 argmax of each row of x [R, V] that is not one of its banned ids [R, NB]:
    `argmax_first` of `ban(x, banned)`."""
    return argmax_first(ban(x, banned))


def sample(logits: jax.Array, st: SamplingTensors, history: jax.Array, slots: jax.Array,
           prompt_len: jax.Array, hist_len: jax.Array, variant: str | None = None,
           argmax=masked_argmax) -> SampleOutput:
    """Pick one token per row of [R, V] float32 logits. The token history of each row (slot
    `slots[r]` of `history` [S, M]; lengths [R], [R]) is gathered and read only when some row
    has a penalty: a greedy batch copies none of it. `variant`: who switches the optional
    stages (module docstring). `argmax(x, banned)`: the greedy pick, `masked_argmax` or the
    CPU kernel library's `argmax_rows` (the same picks but for NaN logits)."""
    assert variant in (None, "greedy", "full"), variant

    def gate(switch, on, off):
        if variant is None:
            return jax.lax.cond(switch, on, off)
        return on() if variant == "full" else off()

    R = logits.shape[0]
    N = min(MAX_LOGPROBS, logits.shape[1])
    logits = logits.astype(jnp.float32)
    # Masks and biases after the raw logprobs, before the penalties (vLLM's order); only in
    # the constrained program (a static shape: W > 0).
    x = constrain(logits, st) if st.allow.shape[1] else logits
    x = gate(st.any_penalty,
                     lambda: apply_penalties(x, st, jnp.take(history, slots, axis=0, mode="clip"),
                                             prompt_len, hist_len),
                     lambda: x)
    greedy = argmax(x, st.banned)  # never a banned id: min_tokens

    def draw():
        random = st.temperature > 0
        scaled = ban(x, st.banned) / jnp.where(random, st.temperature, 1.0)[:, None]
        scaled = gate(st.any_filter,
                              lambda: filter_logits(scaled, st.top_k, st.top_p, st.min_p),
                              lambda: scaled)
        keys = jax.random.wrap_key_data(st.seed.astype(jnp.uint32), impl="threefry2x32")
        keys = jax.vmap(jax.random.fold_in)(keys, st.step)                 # [R] keys
        drawn = jax.vmap(jax.random.categorical)(keys, scaled)             # Gumbel-max per row
        return jnp.where(random, drawn.astype(jnp.int32), greedy)

    ids = gate(st.any_random, draw, lambda: greedy)

    def logprobs():
        logp = jax.nn.log_softmax(logits, axis=-1)                         # [R, V] raw
        top_logprobs, top_ids = jax.lax.top_k(logp, N)                     # [R, N], ties: low id
        return (jnp.take_along_axis(logp, ids[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32),
                top_logprobs)

    none = lambda: (jnp.zeros((R,), jnp.float32), jnp.zeros((R, N), jnp.int32), jnp.zeros((R, N), jnp.float32))
    return SampleOutput(ids, *gate(st.any_logprobs, logprobs, none))
