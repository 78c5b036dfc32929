"""Prompt log-probabilities: what the model gives each prompt token, for lm-eval-style scoring
(OpenAI `echo` + `logprobs` + `max_tokens: 0`, vLLM's `prompt_logprobs`).

    scorer = PromptScorer(engine)
    scorer(ids, top_n=5)   # [None, {"token_id", "logprob", "rank", "top"}, ...] per position

Token i's entry is the log-softmax (float32) of the model's logits at position i - 1; the first
token has none. It runs the engine's own weights through the engine's own step (`run_step`,
one pure-prefill request per chunk, planned by `build_plan` on the engine's prefill buckets)
but never touches the engine's KV pages or requests: each call writes the prompt's K and V into
a private page pool sized for one sequence of `max_model_len` (allocated per call, freed when it
returns), so the engine keeps stepping meanwhile from its own thread (JAX dispatch is
thread-safe) and several calls may run at once. Unlike a serving step, the LM head runs on
every prompt row, in blocks of ROW_BLOCK rows (a [T, V] float32 matrix of a long prompt and a
large vocabulary would be gigabytes); the log-softmax, the prompt token's rank and the top
MAX_LOGPROBS alternatives are computed on device, and only those come back.

A prompt longer than the largest prefill bucket runs in chunks of that size, each attending to
the earlier ones through the private pages, as a chunked prefill does in the engine.

Compiles: one program per (pipeline stage, prefill bucket) a prompt uses, cached by jit. The
first scoring request of each bucket compiles it, unless `warmup()` ran (the server may call it
at start-up). Multi-process engines are not supported: their followers run only the plans the
leader broadcasts, so `supported()` says why and the server answers 400 with it.

Legend: T prefill rows of a chunk (a bucket), D model width, V vocab, N = MAX_LOGPROBS.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .kv_pages import pages_for
from .models import family
from .models.attention import KVCache
from .plan import PagedKV, StepInputs, build_plan, warmup_plan
from .request import MAX_LOGPROBS, Request, SamplingParams
from .scheduler import Batch, Chunk
from .sharding.plan import kv_placement
from .step import DeviceState, run_step

ROW_BLOCK = 256  # rows per LM-head block: [256, V] f32 logits at a time (50 MB for GPT-2's vocab)


class PromptScorer:
    def __init__(self, engine):
        """`engine`: an `orca_jax.engine.Engine`; its runner's parameters, mesh, attention
        backend and matmul precision are used as they are."""
        self.runner = r = engine.runner
        self.buckets = engine.buckets
        self.config = r.model_config
        self.vocab_size = self.config.vocab_size
        # One sequence of max_model_len, in a pool of its own.
        self.kv = PagedKV.make(pages_for(r.max_len, r.kv.page_size), r.kv.page_size, r.max_len)
        self.num_compiles = 0  # traces of the scoring programs (the engine's count is apart)
        self._stages = [self._jit_stage(st) for st in r.local_stages]

    def supported(self) -> str | None:
        """None, or why this engine cannot score prompts."""
        r = self.runner
        if jax.process_count() > 1 or r.peers is not None or len(r.local_stages) != r.n_stages:
            return ("prompt log-probabilities are computed in one process; this engine spans "
                    f"{jax.process_count()} processes, whose followers run only the leader's steps")
        return None

    def __call__(self, ids: list[int], top_n: int) -> list[dict | None]:
        """Per prompt position: None for the first token (nothing predicts it), then for token i
        {"token_id": ids[i], "logprob": float, "rank": int (1 = most likely), "top": {token_id:
        logprob, ...: `top_n` entries, best first}}: the log-softmax of the model's logits at
        position i - 1, float32. Raises ValueError on a bad prompt or `top_n`."""
        ids = self._check(ids, top_n)
        chunk = self.buckets.prefill[-1]
        kvs = [alloc() for _, alloc in self._stages]
        request = Request("score", ids, SamplingParams(max_tokens=1), seed=0, slot=0,
                          pages=list(range(pages_for(len(ids), self.kv.page_size))))
        out: list[dict | None] = [None]
        for start in range(0, len(ids), chunk):
            length = min(chunk, len(ids) - start)
            plan = build_plan(Batch([], [Chunk(request, start, length)]), self.buckets, 1, self.kv,
                              host_decode_tokens=True)
            targets = np.zeros(plan.num_prefill, np.int32)
            nxt = ids[start + 1:start + length + 1]  # row j predicts token start + j + 1
            targets[:len(nxt)] = nxt
            kvs, scores = self._run(kvs, plan.inputs, targets)
            out += _entries(nxt, *(np.asarray(a) for a in scores), top_n)
        return out

    def warmup(self) -> None:
        """Compile (by running an all-padding chunk of) every prefill bucket's program now,
        so that no scoring request compiles."""
        for tp in self.buckets.prefill[1:]:
            plan = warmup_plan(0, tp, self.buckets, 1, self.kv, host_decode_tokens=True)
            _, scores = self._run([alloc() for _, alloc in self._stages], plan.inputs,
                                  np.zeros(tp, np.int32))
            jax.block_until_ready(scores)

    def _check(self, ids, top_n) -> list[int]:
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > self.runner.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than max_model_len={self.runner.max_len}")
        if not 0 <= top_n <= MAX_LOGPROBS:
            raise ValueError(f"top_n must be in [0, {MAX_LOGPROBS}], got {top_n}")
        return ids

    def _run(self, kvs: list[KVCache], inputs: StepInputs, targets: np.ndarray):
        """One chunk through every stage: (the stages' updated pages, the last stage's scores)."""
        x, new = None, []
        for st, params, (program, _), kv in zip(self.runner.local_stages, self.runner.params,
                                                self._stages, kvs):
            inp = jax.device_put((inputs, targets), st.replicated)
            x = None if x is None else jax.device_put(x, st.replicated)
            kv, x = program(params, kv, *inp, x)
            new.append(kv)
        return new, x

    def _jit_stage(self, st):
        """(the stage's scoring program, its private pages' allocator): the pages are placed
        like the engine's (`kv_placement` on the stage's sub-mesh) and donated to each chunk."""
        r, c = self.runner, self.config
        spec = kv_placement(r.stage_config, r.layout, dict(st.mesh.shape), self.kv.num_pages,
                            self.kv.page_size, jnp.dtype(c.jnp_dtype).itemsize).spec[1:]
        kv_sharding = jax.NamedSharding(st.mesh, jax.P(*spec))
        shape = KVCache.shape(self.kv.num_pages, self.kv.page_size, c.num_kv_heads, c.head_dim)
        n = r.stage_config.num_layers
        alloc = jax.jit(lambda: KVCache(k=tuple(jnp.zeros(shape, c.jnp_dtype) for _ in range(n)),
                                        v=tuple(jnp.zeros(shape, c.jnp_dtype) for _ in range(n))),
                        out_shardings=kv_sharding)
        fn = functools.partial(self._traced, st.first, st.last)
        program = jax.jit(fn, donate_argnames=("kv",), out_shardings=(kv_sharding, st.replicated))
        return program, alloc

    def _traced(self, first: bool, last: bool, params, kv, inp: StepInputs, targets, x):
        """A stage over one chunk's rows; the last stage scores them: (lp [T], rank [T],
        top_ids [T, N], top_lp [T, N])."""
        self.num_compiles += 1  # at trace time only
        r = self.runner
        with jax.default_matmul_precision(r.matmul_precision):
            # last=False: the final hidden states of every row [T, D], not only sampling rows'
            state, h = run_step(r.stage_config, params, DeviceState(kv, None, None), inp, x,
                                first=first, last=False, attention=r.attention)
            if not last:
                return state.kv, h
            return state.kv, score_rows(r.stage_config, params, h, targets)


def score_rows(config, params: dict, h: jax.Array, targets: jax.Array):
    """LM head + log-softmax over rows h [T, D], ROW_BLOCK rows at a time: each row's
    log-probability of its target token, the target's rank among all V (1 + how many are
    strictly more likely, as vLLM ranks), and the top N (ids, log-probabilities)."""
    model = family(config)
    n = min(MAX_LOGPROBS, config.vocab_size)

    def row(args):  # one row; lax.map vmaps it over blocks of ROW_BLOCK rows
        hr, target = args                                                    # [D], []
        lsm = jax.nn.log_softmax(model.lm_head(config, params, hr[None])[0])  # [V] f32
        lp = lsm[target]
        rank = 1 + jnp.sum(lsm > lp, dtype=jnp.int32)
        top_lp, top_ids = jax.lax.top_k(lsm, n)                               # [N]
        return lp, rank, top_ids.astype(jnp.int32), top_lp

    return jax.lax.map(row, (h, targets), batch_size=min(ROW_BLOCK, h.shape[0]))


def _entries(targets, lp, rank, top_ids, top_lp, top_n: int) -> list[dict]:
    """Host side: the per-token dicts of one chunk's real rows (one per target)."""
    lp, rank = lp.tolist(), rank.tolist()
    top_ids, top_lp = top_ids[:, :top_n].tolist(), top_lp[:, :top_n].tolist()
    return [{"token_id": t, "logprob": lp[j], "rank": rank[j], "top": dict(zip(top_ids[j], top_lp[j]))}
            for j, t in enumerate(targets)]


__all__ = ["PromptScorer", "score_rows", "ROW_BLOCK"]
