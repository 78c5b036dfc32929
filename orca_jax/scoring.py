"""Prompt log-probabilities: what the model gives each prompt token, for lm-eval-style scoring
(OpenAI `echo` + `logprobs` + `max_tokens: 0`, vLLM's `prompt_logprobs`).

    scorer = PromptScorer(engine)
    scorer(ids, top_n=5)   # [None, {"token_id", "logprob", "rank", "top"}, ...] per position

Token i's entry is the log-softmax (float32) of the model's logits at position i - 1; the first
token has none. It runs the engine's own weights through the engine's own step (`run_step`,
one pure-prefill request per chunk, planned by `build_plan` on the engine's prefill buckets)
but never touches the engine's KV pages or requests: each call writes the prompt's K and V into
a private page pool (`pool`: the prompt's pages rounded up to a power of two; allocated per
call, freed when it returns), so the engine keeps stepping meanwhile from its own thread (JAX
dispatch is thread-safe) and several calls may run at once. Unlike a serving step, the LM head runs on
every prompt row, in blocks of ROW_BLOCK rows (a [T, V] float32 matrix of a long prompt and a
large vocabulary would be gigabytes); the log-softmax, the prompt token's rank and the top
MAX_LOGPROBS alternatives are computed on device, and only those come back.

A prompt longer than the largest prefill bucket runs in chunks of that size, each attending to
the earlier ones through the private pages, as a chunked prefill does in the engine.

Compiles: one program per (pipeline stage, pool size, prefill bucket) a prompt uses, cached by
jit; prompts up to one largest chunk all use the smallest pool, so they need one program per
bucket. The first scoring request of each compiles it, unless `warmup()` ran (the server may
call it at start-up). Multi-process engines are not supported: their followers run only the plans the
leader broadcasts, so `supported()` says why and the server answers 400 with it.

Legend: T prefill rows of a chunk (a bucket), D model width, V vocab, N = MAX_LOGPROBS.
"""
from __future__ import annotations

import functools
import threading

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
        self.page_size = r.kv.page_size
        self.max_pages = pages_for(r.max_len, self.page_size)  # W: a block table's width
        self.num_compiles = 0  # traces of the scoring programs (the engine's count is apart)
        self._lock = threading.Lock()
        self._programs: dict[int, list] = {}  # pool pages P -> per local stage (program, allocator)

    def supported(self) -> str | None:
        """None, or why this engine cannot score prompts."""
        r = self.runner
        if jax.process_count() > 1 or r.peers is not None or len(r.local_stages) != r.n_stages:
            return (f"this engine spans {jax.process_count()} processes, whose followers run only "
                    "the steps the leader broadcasts; scoring runs in one process")
        return None

    def __call__(self, ids: list[int], top_n: int) -> list[dict | None]:
        """Per prompt position: None for the first token (nothing predicts it), then for token i
        {"token_id": ids[i], "logprob": float, "rank": int (1 = most likely), "top": {token_id:
        logprob, ...: `top_n` entries, best first}}: the log-softmax of the model's logits at
        position i - 1, float32. Raises ValueError on a bad prompt or `top_n`."""
        ids = self._check(ids, top_n)
        chunk = self.buckets.prefill[-1]
        kv = self.pool(len(ids))
        stages = self._stages(kv)
        kvs = [alloc() for _, alloc in stages]
        request = Request("score", ids, SamplingParams(max_tokens=1), seed=0, slot=0,
                          pages=list(range(pages_for(len(ids), self.page_size))))
        out: list[dict | None] = [None]
        for start in range(0, len(ids), chunk):
            length = min(chunk, len(ids) - start)
            plan = build_plan(Batch([], [Chunk(request, start, length)]), self.buckets, 1, kv,
                              host_decode_tokens=True)
            targets = np.zeros(plan.num_prefill, np.int32)
            nxt = ids[start + 1:start + length + 1]  # row j predicts token start + j + 1
            targets[:len(nxt)] = nxt
            kvs, scores = self._run(stages, kvs, plan.inputs, targets)
            out += _entries(nxt, *(np.asarray(a) for a in scores), top_n)
        return out

    def pool(self, num_tokens: int) -> PagedKV:
        """The private page pool of a prompt of `num_tokens`: its pages rounded up to a power of
        two, and to at least one largest chunk's (at most max_model_len's). A pool for
        max_model_len every time would hold, for a long-context model, gigabytes for a short
        prompt; rounding keeps the number of pool shapes, hence of programs, at log2 of it."""
        need = max(pages_for(num_tokens, self.page_size), pages_for(self.buckets.prefill[-1], self.page_size))
        return PagedKV(min(1 << (need - 1).bit_length(), self.max_pages), self.page_size, self.max_pages)

    def warmup(self, max_tokens: int | None = None) -> None:
        """Compile (by running an all-padding chunk of) every prefill bucket's program now for
        every pool that prompts of up to `max_tokens` (default max_model_len) use, so that
        none of them compiles while serving."""
        sizes = {self.pool(n).num_pages: self.pool(n)
                 for n in range(1, (max_tokens or self.runner.max_len) + 1, self.page_size)}
        for kv in sizes.values():
            stages = self._stages(kv)
            for tp in self.buckets.prefill[1:]:
                plan = warmup_plan(0, tp, self.buckets, 1, kv, host_decode_tokens=True)
                _, scores = self._run(stages, [alloc() for _, alloc in stages], plan.inputs,
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

    def _run(self, stages: list, kvs: list[KVCache], inputs: StepInputs, targets: np.ndarray):
        """One chunk through every stage: (the stages' updated pages, the last stage's scores)."""
        x, new = None, []
        for st, params, (program, _), kv in zip(self.runner.local_stages, self.runner.params, stages, kvs):
            inp = jax.device_put((inputs, targets), st.replicated)
            x = None if x is None else jax.device_put(x, st.replicated)
            kv, x = program(params, kv, *inp, x)
            new.append(kv)
        return new, x

    def _stages(self, kv: PagedKV) -> list:
        """Per local stage, (its scoring program, its private pages' allocator) for pools of
        `kv`'s size, made once (jit compiles each on first use, per prefill bucket)."""
        with self._lock:
            if kv.num_pages not in self._programs:
                self._programs[kv.num_pages] = [self._jit_stage(st, kv) for st in self.runner.local_stages]
            return self._programs[kv.num_pages]

    def _jit_stage(self, st, pool: PagedKV):
        """The pages are placed like the engine's (`kv_placement` on the stage's sub-mesh) and
        donated to each chunk."""
        r, c = self.runner, self.config
        spec = kv_placement(r.stage_config, r.layout, dict(st.mesh.shape), pool.num_pages,
                            pool.page_size, jnp.dtype(c.jnp_dtype).itemsize).spec[1:]
        kv_sharding = jax.NamedSharding(st.mesh, jax.P(*spec))
        shape = KVCache.shape(pool.num_pages, pool.page_size, c.num_kv_heads, c.head_dim)
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

    def block(args):  # ROW_BLOCK rows at a time (lax.map), the LM head as one matmul
        hb, tb = args                                                        # [B, D], [B]
        lsm = jax.nn.log_softmax(model.lm_head(config, params, hb), axis=-1)  # [B, V] f32
        lp = jnp.take_along_axis(lsm, tb[:, None], axis=-1)[:, 0]            # [B]
        rank = 1 + jnp.sum(lsm > lp[:, None], axis=-1, dtype=jnp.int32)
        top_lp, top_ids = jax.lax.top_k(lsm, n)                               # [B, N]
        return lp, rank, top_ids.astype(jnp.int32), top_lp

    T = h.shape[0]
    B = min(ROW_BLOCK, T)
    blocks = -(-T // B)
    hb = jnp.pad(h, ((0, blocks * B - T), (0, 0))).reshape(blocks, B, h.shape[1])
    tb = jnp.pad(targets, (0, blocks * B - T)).reshape(blocks, B)
    return tuple(x.reshape(blocks * B, *x.shape[2:])[:T] for x in jax.lax.map(block, (hb, tb)))


def _entries(targets, lp, rank, top_ids, top_lp, top_n: int) -> list[dict]:
    """Host side: the per-token dicts of one chunk's real rows (one per target)."""
    lp, rank = lp.tolist(), rank.tolist()
    top_ids, top_lp = top_ids[:, :top_n].tolist(), top_lp[:, :top_n].tolist()
    return [{"token_id": t, "logprob": lp[j], "rank": rank[j], "top": dict(zip(top_ids[j], top_lp[j]))}
            for j, t in enumerate(targets)]


__all__ = ["PromptScorer", "score_rows", "ROW_BLOCK"]
