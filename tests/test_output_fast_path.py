"""`OutputProcessor.append_rows`: its inline path for the common decode token makes exactly what
the per-row `append` makes (deltas, text, finish and stop reasons), token for token.

The real `Engine` runs over a runner whose "device" samples scripted tokens (each request's
script, by output index) with the demo model's byte-level BPE tokenizer, once as it is and once
with a no-op fault hook, which sends every row through the per-row path (engine.py `_process`).
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from orca_jax.config import EngineConfig
from orca_jax.engine import Engine
from orca_jax.kv_pages import PAGE_SIZE, pages_for
from orca_jax.outputs import Sampled
from orca_jax.plan import PagedKV
from orca_jax.request import MAX_LOGPROBS, FinishReason, SamplingParams
from orca_jax.tokenizer import load_tokenizer

MAX_LEN = 256


class ScriptedRunner:
    """The runner interface (runner.py); row i samples `scripts[request_id][index]`."""

    def __init__(self, tokenizer, scripts: dict[str, list[int]], num_slots: int, keep_in_flight: int):
        self.model_config = types.SimpleNamespace(vocab_size=tokenizer.vocab_size,
                                                  eos_token_id=tokenizer.eos_token_id)
        self.num_slots, self.max_len, self.n_stages = num_slots, MAX_LEN, 1
        self.kv = PagedKV.make(num_slots * pages_for(MAX_LEN, PAGE_SIZE), PAGE_SIZE, MAX_LEN)
        self.keep_in_flight, self.host_decode_tokens, self.num_compiles = keep_in_flight, False, 0
        self.scripts = scripts

    def warmup(self, buckets) -> None:
        pass

    def run(self, plan, sampling) -> np.ndarray:
        ids = np.zeros(plan.num_sample_rows, np.int32)
        for i, (req, index) in enumerate(plan.rows):
            script = self.scripts[req.request_id]
            ids[i] = script[index % len(script)]
        return ids

    def fetch(self, ids: np.ndarray, logprobs: bool) -> Sampled:
        if not logprobs:
            return Sampled(ids.tolist(), None, None, None)
        top_ids = (ids[:, None] + np.arange(MAX_LOGPROBS)).astype(np.int32)
        top_lp = (-0.25 * np.arange(MAX_LOGPROBS) - (ids[:, None] % 7) / 8).astype(np.float32)
        return Sampled(ids.tolist(), top_lp[:, 0] - 0.5, top_ids, top_lp)


@pytest.fixture(scope="module")
def tok(demo_model_dir):
    t = load_tokenizer(demo_model_dir)
    assert t.token_bytes is not None and t.eos_token_id is not None  # byte-level, with an EOS
    return t


def _workload(tok) -> list[tuple[str, list[int], SamplingParams]]:
    """(request id, token script, params): every case of `append` next to plain decoding."""
    eos = tok.eos_token_id
    enc = tok.encode
    text = enc("hello world, this is plain text")               # he|l|lo| world|,| this|...
    para = enc("one two\n\nthree four")                          # ...|\n|\n|...
    utf8 = enc("héllo wörld 😀 ünïcödé")                        # é, ö, 😀 split over byte tokens
    near = enc("abc wxy wxz wxyz end")                           # " w" starts "wxyz" three times
    cases = [
        ("plain", text, dict(max_tokens=len(text))),
        ("stop-across-tokens", text, dict(stop=["lo wor"])),
        ("stop-included", para, dict(stop=["\n\n"], include_stop_str_in_output=True)),
        ("stop-excluded", para, dict(stop=["\n\n"])),
        ("stop-near-misses", near, dict(stop=["wxyz"])),
        ("stop-near-misses-included", near, dict(stop=["wxyz"], include_stop_str_in_output=True)),
        ("stop-unmatched", text, dict(stop=["zzz", "plainer"], max_tokens=len(text))),
        ("stop-token-id", text, dict(stop_token_ids=[text[4]])),
        ("eos", text[:3] + [eos] + text[3:], dict()),
        ("eos-ignored", text[:3] + [eos] + text[3:], dict(ignore_eos=True, max_tokens=len(text) + 1)),
        ("min-tokens", [eos] + text[:2] + [text[4]] + text, dict(min_tokens=5, stop_token_ids=[text[4]],
                                                                 stop=["hel"])),
        ("max-tokens", text, dict(max_tokens=3)),
        ("max-tokens-1", text, dict(max_tokens=1)),
        ("logprobs", text, dict(logprobs=3, max_tokens=len(text))),
        ("logprobs-0", para, dict(logprobs=0, stop=["\n\n"])),
        ("utf8", utf8, dict(max_tokens=len(utf8))),
        ("utf8-stop", utf8, dict(stop=["ünï"], max_tokens=len(utf8))),
        ("utf8-cut-mid-character", utf8, dict(max_tokens=13)),   # ends inside 😀: dropped
        ("utf8-stop-id-mid-character", utf8, dict(stop_token_ids=[utf8[2]])),
    ]
    return [(rid, script, SamplingParams(temperature=0.0, **kw)) for rid, script, kw in cases]


def _random_workload(tok, seed: int, n: int) -> list[tuple[str, list[int], SamplingParams]]:
    """Random token soup (byte tokens 128..255 are parts of characters) with random stops."""
    rng = np.random.default_rng(seed)
    pieces = ["a", "b", "ab", "é", "\n", "😀", " the"]
    out = []
    for k in range(n):
        script = rng.integers(1, tok.vocab_size, int(rng.integers(4, 40))).tolist()
        for j in rng.integers(0, len(script), 3):  # parts of characters, EOS
            script[j] = int(rng.choice([128, 159, 195, 226, tok.eos_token_id]))
        kw = dict(max_tokens=int(rng.integers(1, 48)), ignore_eos=bool(rng.integers(2)),
                  include_stop_str_in_output=bool(rng.integers(2)))
        kw["min_tokens"] = int(rng.integers(0, kw["max_tokens"] + 1)) if rng.integers(3) == 0 else 0
        if rng.integers(2):
            kw["stop"] = ["".join(rng.choice(pieces, int(rng.integers(1, 3)))) for _ in range(2)]
        if rng.integers(4) == 0:
            kw["stop_token_ids"] = [script[int(rng.integers(len(script)))]]
        if rng.integers(4) == 0:
            kw["logprobs"] = int(rng.integers(0, 4))
        out.append((f"rand{k}", script, SamplingParams(temperature=0.0, **kw)))
    return out


def _run(tok, workload, fast: bool, keep_in_flight: int, slots: int = 8):
    """Every step's outputs (as comparable tuples) and which requests have a first-token time
    after it, and how many rows took the per-row path."""
    runner = ScriptedRunner(tok, {rid: s for rid, s, _ in workload}, slots, keep_in_flight)
    engine = Engine(runner, EngineConfig(max_batch_size=slots, max_num_batched_tokens=64,
                                         max_model_len=MAX_LEN, warmup=False), tok)
    if not fast:
        engine.fault_hook = lambda stage, req: None  # every row through `_append_row`
    per_row = [0]
    output = engine._append_row

    def counted(*args):
        per_row[0] += 1
        return output(*args)

    engine._append_row = counted
    reqs = [engine.add_request(tok.encode("a prompt"), params, request_id=rid) for rid, _, params in workload]
    steps, timed = [], []
    while engine.has_unfinished():
        steps.append([(o.request_id, list(o.token_ids), o.text, o.finished, o.finish_reason,
                       (o.usage.prompt_tokens, o.usage.completion_tokens), o.logprobs, o.error,
                       o.stop_reason, o.metrics and sorted((k, v is None) for k, v in o.metrics.items()))
                      for o in engine.step()])
        timed.append([r.first_token_time is not None for r in reqs])
        assert len(steps) < 1000, "requests that never finish"
    return (steps, timed), per_row[0]


def _final(steps) -> dict[str, tuple]:
    """Per request: all its tokens, all its text, and how it finished."""
    acc: dict[str, list] = {}
    for outs in steps:
        for rid, ids, text, finished, reason, usage, _, error, stop_reason, _ in outs:
            a = acc.setdefault(rid, [[], "", None, None, None])
            a[0] += ids
            a[1] += text
            if finished:
                a[2:] = reason, stop_reason, error
    return {rid: tuple(a) for rid, a in acc.items()}


@pytest.mark.parametrize("keep_in_flight", [0, 1])
def test_fast_path_matches_per_row_append(tok, keep_in_flight):
    work = _workload(tok)
    fast, fast_per_row = _run(tok, work, fast=True, keep_in_flight=keep_in_flight)
    slow, slow_per_row = _run(tok, work, fast=False, keep_in_flight=keep_in_flight)
    assert fast == slow  # every delta of every step, in order
    fast, slow = fast[0], slow[0]
    rows = sum(len(outs) for outs in slow)
    # The inline path took its share of the rows, even in a workload of mostly edge cases.
    assert slow_per_row == rows and fast_per_row < 0.75 * rows

    final = _final(fast)
    text = "hello world, this is plain text"
    assert final["plain"][1:] == (text, FinishReason.LENGTH, None, None)
    assert final["stop-across-tokens"][1:3] == ("hel", FinishReason.STOP)
    assert final["stop-across-tokens"][3] == "lo wor"
    assert final["stop-included"][1:4] == ("one two\n\n", FinishReason.STOP, "\n\n")
    assert final["stop-excluded"][1] == "one two"
    assert final["stop-near-misses"][1:4] == ("abc wxy wxz ", FinishReason.STOP, "wxyz")
    assert final["stop-near-misses-included"][1] == "abc wxy wxz wxyz"
    assert final["stop-unmatched"][1:3] == (text, FinishReason.LENGTH)
    stop_id = tok.encode(text)[4]
    assert final["stop-token-id"][1:4] == ("hello world", FinishReason.STOP, stop_id)  # not its text
    assert final["eos"][1:4] == ("hello", FinishReason.STOP, None) and len(final["eos"][0]) == 4
    assert final["eos-ignored"][1:3] == (text, FinishReason.LENGTH)
    # before min_tokens (5) neither EOS, the stop id nor "hel" stops it; then the stop id does
    assert final["min-tokens"][0][-1] == stop_id and final["min-tokens"][2:4] == (FinishReason.STOP, stop_id)
    assert len(final["min-tokens"][0]) > 5
    assert final["max-tokens"][1:3] == ("hello", FinishReason.LENGTH)
    assert final["max-tokens-1"][1:3] == ("he", FinishReason.LENGTH)
    assert final["utf8"][1] == "héllo wörld 😀 ünïcödé"
    assert final["utf8-stop"][1:4] == ("héllo wörld 😀 ", FinishReason.STOP, "ünï")
    assert final["utf8-cut-mid-character"][1] == "héllo wörld "
    assert final["utf8-stop-id-mid-character"][1] == "h"  # its partial é never completes
    lp = [e for outs in fast for o in outs if o[0] == "logprobs" for e in o[6]]
    assert len(lp) == len(tok.encode(text)) and all(len(e["top"]) == 3 for e in lp)


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_matches_per_row_append_random(tok, seed):
    work = _random_workload(tok, seed, 40)  # more requests than slots: they come and go
    fast, fast_per_row = _run(tok, work, fast=True, keep_in_flight=seed % 2, slots=6)
    slow, _ = _run(tok, work, fast=False, keep_in_flight=seed % 2, slots=6)
    assert fast == slow
    assert fast_per_row < sum(len(outs) for outs in fast[0])


def test_output_failure_fails_only_its_request(tok):
    """Off the hook too, a request whose output raises fails alone (here its stop matcher, when
    the inline path hands its row over)."""
    work = _workload(tok)[:4]
    runner = ScriptedRunner(tok, {rid: s for rid, s, _ in work}, 8, 1)
    engine = Engine(runner, EngineConfig(max_batch_size=8, max_num_batched_tokens=64,
                                         max_model_len=MAX_LEN, warmup=False), tok)
    for rid, _, params in work:
        engine.add_request(tok.encode("a prompt"), params, request_id=rid)

    def broken(delta):
        raise RuntimeError("stop matcher broke")

    engine.output._outputs["stop-across-tokens"].stops.push = broken
    finals = {}
    while engine.has_unfinished():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert finals["stop-across-tokens"].finish_reason is FinishReason.ERROR
    assert "stop matcher broke" in finals["stop-across-tokens"].error
    assert {rid: o.finish_reason for rid, o in finals.items() if rid != "stop-across-tokens"} == {
        "plain": FinishReason.LENGTH, "stop-included": FinishReason.STOP, "stop-excluded": FinishReason.STOP}
