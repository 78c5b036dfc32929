"""Paged KV memory end to end: a random Hugging Face GPT-2 -> convert -> Engine, checked
against HF greedy under a KV budget of 4 sequences of max_model_len = 256 (16 pages of 64).

* on-demand admission runs many more short requests at once than that budget has sequences;
* long requests outgrow the pool: preempted (recompute, or swap to host memory) and resumed
  with exactly the tokens HF makes; `reserve` (Orca's) never preempts;
* a shared 192-token prefix is served from the prefix cache, with unchanged outputs;
* every page is free again afterwards.

All engines share one budget and bucket set and skip warm-up: each compiles only the shapes it
runs, once (the persistent XLA cache of conftest serves them to the next engine).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import make_hf_gpt2

from orca_jax.checkpoints.hf_gpt2 import convert_hf_gpt2
from orca_jax.engine import Engine, EngineConfig
from orca_jax.kv_pages import pool_pages_for, watermark_pages
from orca_jax.request import SamplingParams
from orca_jax.sharding.plan import kv_bytes_per_device, slot_state_bytes

V, MAX_LEN, PAGE = 1001, 256, 64
MODEL = dict(vocab_size=V, n_positions=MAX_LEN, n_embd=64, n_layer=2, n_head=4)
SEQS = 4  # the budget holds this many sequences of MAX_LEN


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("paged-model")
    hf = make_hf_gpt2(d / "hf", seed=3, **MODEL)
    hf.generation_config.eos_token_id = None
    config = convert_hf_gpt2(d / "hf", d / "ckpt", progress=False)
    return str(d / "ckpt"), hf, config


def hf_greedy(hf, prompt, n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def config(model_config, **kw) -> EngineConfig:
    budget = (kv_bytes_per_device(model_config, "replicated", {}, SEQS * MAX_LEN // PAGE, PAGE, 4)
              + slot_state_bytes(32, MAX_LEN, PAGE))
    base = EngineConfig(max_batch_size=32, max_num_batched_tokens=256, max_prefill_seqs=8,
                        max_model_len=MAX_LEN, kv_memory=budget, page_size=PAGE, warmup=False)
    return dataclasses.replace(base, **kw)


def run(engine: Engine, prompts, max_tokens: int, each=None, **sampling) -> tuple[list[list[int]], int]:
    """Greedy outputs of every prompt, and the largest batch an iteration ran."""
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **sampling)
    reqs = [engine.add_request(p, sp) for p in prompts]
    most = 0
    while engine.has_unfinished():
        most = max(most, engine.step().batch_size)
        if each is not None:
            each(engine)
    engine.pool.check([])  # every page free again, cached ones included
    assert engine.pool.num_free == engine.pool.num_pages
    return [r.output_ids for r in reqs], most


def held_pages_check(engine: Engine) -> None:
    engine.pool.check([r.pages for r in engine.scheduler.running])


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, V, 40).tolist() for _ in range(32)]


def test_budget_is_sixteen_pages(ckpt):
    path, _, mc = ckpt
    eng = Engine.from_checkpoint(path, config(mc))
    assert (eng.kv.num_pages, eng.kv.page_size, eng.kv.max_pages) == (16, 64, 4)


def test_every_slot_fills_at_max_model_len_beside_the_watermark(ckpt):
    """A pool capped at what the slots can hold still admits the last slot's request: the
    admission watermark comes on top (64 slots x 1 page used to leave one request waiting
    until the others finished)."""
    path, _, mc = ckpt
    eng = Engine.from_checkpoint(path, EngineConfig(max_batch_size=4, max_model_len=64, page_size=64,
                                                    kv_memory=int(1e9), warmup=False))
    assert eng.kv.num_pages == 5  # 4 slots x 1 page + the 1-page watermark
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    reqs = [eng.add_request(list(range(i, i + 32)), sp) for i in range(4)]
    for _ in range(4):  # prompts over two steps (the token budget), then decode
        eng.step()
    assert all(r.output_ids for r in reqs), "a request waited with every slot's page free"


def test_pool_pages_for_is_the_smallest_pool_that_holds_the_pages_beside_the_watermark():
    """`orca-jax plan` calls it in a search over slot counts: it must answer at once for a
    pool of millions of pages (a linear walk took 2 minutes for one plan)."""
    for held in [*range(1, 2000), 10**5 + 7, 333_333, 7 * 10**6]:
        n = pool_pages_for(held)
        assert n - watermark_pages(n) >= held and (n - 1) - watermark_pages(n - 1) < held, held


def test_on_demand_runs_many_short_requests_at_once(ckpt, prompts):
    path, hf, mc = ckpt
    eng = Engine.from_checkpoint(path, config(mc))
    outs, most = run(eng, prompts, 24, held_pages_check)
    assert most >= 12, f"at most {most} requests ran at once with pages for {SEQS} sequences"
    assert eng.scheduler.num_preemptions == 0
    for p, got in zip(prompts, outs):
        assert got == hf_greedy(hf, p, 24)


@pytest.mark.parametrize("kw, preempted", [
    (dict(), "recompute"),
    (dict(swap_space=0.01, preemption_mode="swap"), "swap"),
    (dict(kv_admission="reserve"), None),
])
def test_long_requests_preempt_and_resume_token_exact(ckpt, prompts, kw, preempted):
    path, hf, mc = ckpt
    eng = Engine.from_checkpoint(path, config(mc, **kw))
    outs, most = run(eng, prompts[:8], 200, held_pages_check)
    s = eng.scheduler
    # Prefix-cache lookups count each request's first admission only (not a resumed one
    # finding its own pages: vLLM keeps those apart too).
    assert eng.pool.queries == sum(len(p) for p in prompts[:8])
    if preempted is None:
        assert s.num_preemptions == 0 and most <= SEQS
    else:
        assert s.num_preemptions > 0
        assert (s.num_swapped_out > 0) == (preempted == "swap")
        assert s.num_swapped == 0 and s.swap_used_pages() == 0  # the host tier is empty again
    for p, got in zip(prompts[:8], outs):
        assert got == hf_greedy(hf, p, 200)


def test_preempted_requests_keep_their_penalties_and_seeded_samples(ckpt, prompts):
    """Penalties read each sequence's token history on the device, and sampling is keyed by
    seed and token index: a request resumed by recompute or from host memory (its history row
    rebuilt) makes the tokens of a run that was never preempted."""
    path, _, mc = ckpt
    sampling = dict(repetition_penalty=1.3, presence_penalty=0.4)
    outs = {}
    for name, kw in [("reserve", dict(kv_admission="reserve")), ("recompute", dict()),
                     ("swap", dict(swap_space=0.01, preemption_mode="swap"))]:
        eng = Engine.from_checkpoint(path, config(mc, **kw))
        outs[name], _ = run(eng, prompts[:6], 200, **sampling)
        assert (eng.scheduler.num_preemptions > 0) == (name != "reserve")
        seeded = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=200, ignore_eos=True, seed=11)
        reqs = [eng.add_request(p, seeded) for p in prompts[6:12]]
        while eng.has_unfinished():
            eng.step()
        outs[name + "-seeded"] = [r.output_ids for r in reqs]
    assert outs["recompute"] == outs["reserve"] and outs["swap"] == outs["reserve"]
    assert outs["recompute-seeded"] == outs["reserve-seeded"] == outs["swap-seeded"]


def test_shared_prefix_hits_the_cache_with_unchanged_outputs(ckpt):
    path, _, mc = ckpt
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, V, 192).tolist()
    prompts = [prefix + rng.integers(0, V, 8).tolist() for _ in range(16)]
    results = {}
    for caching in (True, False):
        eng = Engine.from_checkpoint(path, config(mc, enable_prefix_caching=caching))
        first, _ = run(eng, prompts[:1], 8)
        q0, h0 = eng.pool.queries, eng.pool.hits
        rest, _ = run(eng, prompts[1:], 8, held_pages_check)
        results[caching] = first + rest
        if caching:
            queried, hit = eng.pool.queries - q0, eng.pool.hits - h0
            assert queried == 15 * 200 and hit >= 0.7 * queried, (queried, hit)
        else:
            assert eng.pool.queries == eng.pool.hits == 0
    assert results[True] == results[False]
