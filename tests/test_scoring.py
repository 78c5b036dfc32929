"""Prompt log-probabilities (orca_jax/scoring.py) against Hugging Face.

A small random GPT-2 (and a Llama) converted as `orca-jax convert` does; engines with prefill
buckets (16, 32), so a 100-token prompt runs in 4 chunks over the scorer's private pages. Each
prompt token's log-probability, rank and top alternatives equal those of HF's
`log_softmax(model(ids).logits)` (fp32, within 1e-4), on one device and on tensor / pipeline
meshes; an engine generating greedily at the same time still produces HF's tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import threading

import numpy as np
import pytest
from helpers import converted_gpt2, hf_logits
from test_families import make_hf

from orca_jax.checkpoints.hf import convert_hf
from orca_jax.engine import Engine, EngineConfig
from orca_jax.llm import LLM
from orca_jax.request import MAX_LOGPROBS, SamplingParams
from orca_jax.scoring import PromptScorer
from orca_jax.sharding.mesh import make_mesh

V, MAX_LEN = 1001, 128
# Pages of 24 positions: chunks of 32 start mid-page; W = 6 pages. The scorer's pools: 2 pages
# for prompts up to one chunk, else 4, capped at 6 (scoring.PromptScorer.pool).
EC = EngineConfig(max_batch_size=4, max_num_batched_tokens=32, max_prefill_seqs=2, max_model_len=MAX_LEN,
                  page_size=24, kv_memory=int(16e6), warmup=False)
LENGTHS = (1, 2, 17, 100, MAX_LEN)  # one token (nothing to score), one bucket, two buckets, 4 chunks, full


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(HF model, converted checkpoint dir, an engine over it, its scorer): shared, so the
    scoring programs compile once for the module."""
    d = tmp_path_factory.mktemp("gpt2")
    ckpt = converted_gpt2(d, n_positions=MAX_LEN)
    from transformers import GPT2LMHeadModel
    engine = Engine.from_checkpoint(ckpt, EC)
    return GPT2LMHeadModel.from_pretrained(d / "hf").eval(), ckpt, engine, PromptScorer(engine)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    hf = make_hf(d / "hf", "llama", max_position_embeddings=MAX_LEN)
    convert_hf(d / "hf", d / "ckpt", progress=False)
    return hf, str(d / "ckpt")


def _prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed + n).integers(0, V, n).tolist()


@functools.lru_cache(maxsize=16)
def _hf_logprobs(hf, ids: tuple[int, ...]) -> np.ndarray:
    """HF's log_softmax(model(ids).logits) [n, V], fp32."""
    import torch
    return torch.log_softmax(torch.tensor(hf_logits(hf, ids)), -1).numpy()


def _check(hf, scorer: PromptScorer, ids: list[int], top_n: int = 5) -> float:
    """Compare one prompt's entries with HF's; returns max |logprob diff|."""
    got = scorer(ids, top_n)
    assert len(got) == len(ids) and got[0] is None
    if len(ids) == 1:
        return 0.0
    ref = _hf_logprobs(hf, tuple(ids))[:-1]                                      # [n-1, V]
    targets = np.array(ids[1:])
    ref_lp = ref[np.arange(len(targets)), targets]
    lp = np.array([e["logprob"] for e in got[1:]])
    np.testing.assert_allclose(lp, ref_lp, atol=1e-4, rtol=0)
    assert [e["token_id"] for e in got[1:]] == ids[1:]
    assert [e["rank"] for e in got[1:]] == (1 + (ref > ref_lp[:, None]).sum(-1)).tolist()
    order = np.argsort(-ref, axis=-1, kind="stable")[:, :top_n]
    for e, best, row in zip(got[1:], order, ref):
        assert list(e["top"]) == best.tolist()               # best first
        np.testing.assert_allclose(list(e["top"].values()), row[best], atol=1e-4, rtol=0)
    return float(np.abs(lp - ref_lp).max())


def test_gpt2_prompt_logprobs_match_hf_chunked_and_not(gpt2):
    hf, _, engine, scorer = gpt2
    assert engine.buckets.prefill == (0, 16, 32)
    assert scorer.supported() is None
    assert [scorer.pool(n).num_pages for n in (1, 32, 33, 96, 97, 128)] == [2, 2, 2, 4, 6, 6]
    diffs = [_check(hf, scorer, _prompt(n)) for n in LENGTHS]
    assert max(diffs) < 1e-4
    assert scorer.num_compiles == 4            # buckets 16 and 32 of pools of 2 and 6 pages
    _check(hf, scorer, _prompt(70, seed=1), top_n=0)   # top_n 0: rank and logprob only
    assert scorer([3, 4], MAX_LOGPROBS)[1]["top"].__len__() == MAX_LOGPROBS
    assert scorer.num_compiles == 4 + 2        # the 70 tokens: a pool of 4 pages
    for bad, top_n in (([], 1), ([V], 1), ([1] * (MAX_LEN + 1), 1), ([1, 2], MAX_LOGPROBS + 1)):
        with pytest.raises(ValueError):
            scorer(bad, top_n)


@pytest.mark.parametrize("backend", ["xla", "xla-static"])
def test_llama_prompt_logprobs_match_hf(llama, backend):
    """Both attention paths of prefill rows: CPU's (runtime trip counts) and the GPU path's
    static shapes (tests/test_gpu_path.py)."""
    hf, ckpt = llama
    scorer = PromptScorer(Engine.from_checkpoint(ckpt, dataclasses.replace(EC, attention_backend=backend)))
    assert scorer.runner.attention == backend
    assert max(_check(hf, scorer, _prompt(n)) for n in (17, 100)) < 1e-4


def test_on_a_tensor_and_pipeline_mesh(llama):
    """megatron on tensor=2,pipeline=2: 2 KV heads split over tensor=2 (the private pages
    too), 2 stages of one layer, the activations handed from one to the other."""
    hf, ckpt = llama
    engine = Engine.from_checkpoint(ckpt, EC, mesh=make_mesh("tensor=2,pipeline=2"), layout="megatron")
    scorer = PromptScorer(engine)
    assert scorer.supported() is None and len(scorer._stages(scorer.pool(1))) == engine.runner.n_stages == 2
    _check(hf, scorer, _prompt(70))


def test_scoring_while_the_engine_generates(gpt2):
    """Greedy requests stepped by another thread while prompts are scored (and their private
    pages written) here: the tokens are still HF's, the scores still right."""
    import torch
    hf, _, engine, scorer = gpt2
    scorer.warmup()  # every pool and bucket (the first test compiled most)
    assert scorer.num_compiles == 6
    work = [(_prompt(n, seed=5), 8) for n in (3, 40)]
    got: dict[str, list[int]] = {}

    def generate():
        reqs = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
                for p, m in work]
        got.update({r.request_id: [] for r in reqs})
        while engine.has_unfinished():
            for o in engine.step():
                got[o.request_id] += o.token_ids
        got["order"] = [r.request_id for r in reqs]

    generate()  # once alone first: its step programs compile before the concurrent run
    thread = threading.Thread(target=generate)
    thread.start()
    scored = 0
    while thread.is_alive() or scored < 2:  # for as long as the engine runs
        _check(hf, scorer, _prompt((100, 50)[scored % 2], seed=9))
        scored += 1
    thread.join()
    assert scorer.num_compiles == 6  # warm-up compiled every pool and bucket
    for (prompt, m), rid in zip(work, got["order"]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=m, min_new_tokens=m,
                              do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert got[rid] == ref


def test_offline_llm_prompt_logprobs(gpt2):
    hf, ckpt, _, _ = gpt2
    llm = LLM(ckpt, engine_config=EC)
    a, b = _prompt(20), _prompt(5)
    out = llm.prompt_logprobs([a, b], top_n=2)
    assert [len(o) for o in out] == [20, 5]
    assert out[0] == llm.prompt_logprobs(a, top_n=2)[0]
    _check(hf, llm.scorer, b, top_n=2)
    (text,) = llm.prompt_logprobs("hi there")  # text: tokenized by the engine's tokenizer
    assert [e and e["token_id"] for e in text] == [None, *llm.tokenizer.encode("hi there")[1:]]
