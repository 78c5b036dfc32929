"""vLLM's metrics on a real server on loopback (demo model): the per-request phases, inter-token
latency, tokens per iteration, the `engine` label and the process collectors; and the gRPC
`stop_reason` of the final response.

One small server for the module; each test reads the deltas of the series it checks, so the
tests do not depend on each other's requests.
"""
import json
from concurrent.futures import ThreadPoolExecutor
import re
import time
import urllib.request

import pytest

from orca_jax import LLM
from orca_jax.async_engine import AsyncEngine
from orca_jax.client import Client
from orca_jax.engine import EngineConfig
from orca_jax.request import FinishReason, RequestOutput, Usage
from orca_jax.server import BackgroundServer, ServerConfig
from orca_jax.server.grpc_api import response
from test_scheduler import cfg, request, scheduler

MODEL = "metrics"
LABELS = f'{{engine="0",model_name="{MODEL}"}}'
ENGINE = EngineConfig(max_batch_size=4, max_num_batched_tokens=32, max_prefill_seqs=2,
                      max_model_len=64, max_waiting=16)
NEW_HISTOGRAMS = ["vllm:inter_token_latency_seconds", "vllm:request_time_per_output_token_seconds",
                  "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                  "vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds",
                  "vllm:iteration_tokens_total"]


@pytest.fixture(scope="module")
def served(demo_model_dir):
    engine = AsyncEngine(LLM(demo_model_dir, engine_config=ENGINE).engine).start()
    bg = BackgroundServer(engine, ServerConfig(grpc_port=0, http_port=0), MODEL).start()
    yield bg
    bg.stop()
    engine.shutdown()


def scrape(served) -> str:
    with urllib.request.urlopen(served.http_url + "/metrics", timeout=30) as r:
        return r.read().decode()


def value(text: str, name: str, labels: str = LABELS) -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} missing from /metrics"
    return float(m.group(1))


def series(served) -> dict[str, float]:
    """The _sum and _count of every histogram read below, and the counters, after every
    request sent so far has been counted (finals are counted on the engine thread, a moment
    after the client may have its answer)."""
    text = scrape(served)
    names = [f"{h}_{part}" for h in NEW_HISTOGRAMS + ["vllm:e2e_request_latency_seconds",
                                                      "vllm:time_per_output_token_seconds",
                                                      "orca_jax:iteration_batch_size"]
             for part in ("sum", "count")]
    names += ["vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"]
    return {n: value(text, n) for n in names}


def settled(served, before: dict, requests: int) -> dict:
    """`series` once the e2e histogram has counted `requests` more finished requests."""
    deadline = time.monotonic() + 10
    while True:
        now = series(served)
        if now["vllm:e2e_request_latency_seconds_count"] - before["vllm:e2e_request_latency_seconds_count"] \
                >= requests or time.monotonic() > deadline:
            return {k: now[k] - before[k] for k in now}
        time.sleep(0.02)


def complete(served, body: dict) -> dict:
    req = urllib.request.Request(served.http_url + "/v1/completions", json.dumps({"model": MODEL, **body}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_new_series_carry_model_and_engine_labels_and_process_collectors_are_there(served):
    with Client(served.grpc_target, timeout=30) as c:
        c.generate("The orca", max_tokens=4, temperature=0, ignore_eos=True)
    settled(served, {k: 0.0 for k in series(served)}, 1)
    text = scrape(served)
    for name in NEW_HISTOGRAMS:
        assert re.search(rf'^{re.escape(name)}_bucket{{engine="0",le="[^"]+",model_name="{MODEL}"}} ',
                         text, re.M), name
        assert value(text, name + "_count") > 0, name
    samples = [line for line in text.splitlines() if line.startswith(("vllm:", "orca_jax:"))]
    unlabelled = [s for s in samples if 'engine="0"' not in s or f'model_name="{MODEL}"' not in s]
    assert samples and not unlabelled, unlabelled[:3]
    for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"]:
        assert float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)) > 0, name
    assert re.search(r"^python_info\{", text, re.M) and re.search(r"^python_gc_collections_total\{", text, re.M)
    # vLLM's bucket edges: ITL from 10 ms, iteration tokens from 1, phases from 0.3 s.
    assert f'vllm:inter_token_latency_seconds_bucket{{engine="0",le="0.01",model_name="{MODEL}"}}' in text
    assert f'vllm:iteration_tokens_total_bucket{{engine="0",le="16384.0",model_name="{MODEL}"}}' in text
    assert f'vllm:request_queue_time_seconds_bucket{{engine="0",le="7680.0",model_name="{MODEL}"}}' in text


def test_phases_split_e2e_and_inter_token_latency_counts_every_gap(served):
    """Three requests at once (they share prefill slots): queue + prefill + decode = e2e,
    prefill + decode = inference, one inter-token observation per gap between tokens."""
    before = series(served)
    lengths = [1, 5, 9]
    with Client(served.grpc_target, timeout=60) as c, ThreadPoolExecutor(len(lengths)) as pool:
        outs = list(pool.map(lambda i: c.generate(f"The orca number {i} swims", max_tokens=lengths[i],
                                                  temperature=0, ignore_eos=True), range(len(lengths))))
    assert [o.completion_tokens for o in outs] == lengths
    d = settled(served, before, len(lengths))
    e2e = d["vllm:e2e_request_latency_seconds_sum"]
    phases = sum(d[f"vllm:request_{p}_time_seconds_sum"] for p in ("queue", "prefill", "decode"))
    assert d["vllm:e2e_request_latency_seconds_count"] == len(lengths) and e2e > 0
    assert phases == pytest.approx(e2e, rel=1e-6, abs=1e-9)
    assert d["vllm:request_inference_time_seconds_sum"] == pytest.approx(
        d["vllm:request_prefill_time_seconds_sum"] + d["vllm:request_decode_time_seconds_sum"], rel=1e-6)
    for p in ("queue", "prefill", "decode", "inference"):
        assert d[f"vllm:request_{p}_time_seconds_count"] == len(lengths), p
    assert d["vllm:request_time_per_output_token_seconds_count"] == len(lengths)
    gaps = sum(n - 1 for n in lengths)
    assert d["vllm:inter_token_latency_seconds_count"] == gaps
    assert d["vllm:time_per_output_token_seconds_count"] == gaps  # vLLM's deprecated alias
    # Gaps are read by the server, decode is timed by the engine: close, both within e2e.
    assert 0 < d["vllm:inter_token_latency_seconds_sum"] <= e2e
    assert d["vllm:request_decode_time_seconds_sum"] <= e2e


def test_inter_token_latency_over_an_http_stream(served):
    before = series(served)
    req = urllib.request.Request(served.http_url + "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "The orca", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
         "stream": True}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert b"[DONE]" in r.read()
    d = settled(served, before, 1)
    assert d["vllm:inter_token_latency_seconds_count"] == 5


def test_iteration_tokens_count_what_each_iteration_computed(served):
    """Every prompt token not found in the prefix cache is computed once, and every generated
    token but the last is fed back once: that is the sum over the iterations."""
    before = series(served)
    outs = [complete(served, {"prompt": f"orca pod {i} " * (i + 1), "max_tokens": m, "temperature": 0,
                              "ignore_eos": True}) for i, m in enumerate([3, 7])]
    d = settled(served, before, 2)
    prompt = sum(o["usage"]["prompt_tokens"] for o in outs)
    generated = sum(o["usage"]["completion_tokens"] for o in outs)
    assert d["vllm:prompt_tokens_total"] == prompt and d["vllm:generation_tokens_total"] == generated
    computed = prompt - d["vllm:prefix_cache_hits_total"] + generated - len(outs)
    assert d["vllm:iteration_tokens_total_sum"] == computed
    assert d["vllm:iteration_tokens_total_count"] == d["orca_jax:iteration_batch_size_count"] > 0


# -- gRPC stop_reason ---------------------------------------------------------------------


def test_grpc_stop_reason_names_the_stop_string_or_token_id(served):
    with Client(served.grpc_target, timeout=30) as c:
        free = c.generate("The orca", max_tokens=12, temperature=0, ignore_eos=True)
        assert free.finish_reason == "length" and free.stop_reason is None
        deltas = list(c.stream("The orca", max_tokens=12, temperature=0, ignore_eos=True))
        assert all(d.WhichOneof("stop_reason") is None for d in deltas)

        stop_id = free.token_ids[3]
        by_id = list(c.stream("The orca", max_tokens=12, temperature=0, stop_token_ids=[stop_id]))
        last = by_id[-1]
        assert last.finish_reason == 1 and last.WhichOneof("stop_reason") == "stop_token_id"
        assert last.stop_token_id == stop_id
        assert all(d.WhichOneof("stop_reason") is None for d in by_id[:-1])

        word = free.text.strip().split()[1]
        by_text = c.generate("The orca", max_tokens=12, temperature=0, ignore_eos=True, stop=[word])
        assert by_text.finish_reason == "stop" and by_text.stop_reason == word
        assert word not in by_text.text


def test_grpc_stop_reason_is_absent_for_eos_and_length():
    """EOS (a STOP with no stop_reason) cannot be forced on the demo model: the response
    builder directly, for both finishes without a named stop."""
    for reason in (FinishReason.STOP, FinishReason.LENGTH):
        r = response(RequestOutput("r", [7], "x", True, reason, Usage(1, 1), stop_reason=None))
        assert r.WhichOneof("stop_reason") is None and not r.HasField("stop_string")
    assert response(RequestOutput("r", [7], "", True, FinishReason.STOP, Usage(1, 1),
                                  stop_reason=0)).WhichOneof("stop_reason") == "stop_token_id"


# -- the scheduler's first-scheduled timestamp ---------------------------------------------


def test_first_scheduled_time_is_set_once_and_kept_across_preemption():
    """a and b fill a 3-page pool; b is preempted by a's growth and later re-admitted: its
    first_scheduled_time stays the first admission's."""
    sch = scheduler(cfg(), num_slots=2, max_len=12, num_pages=3)
    a, b = request("a", [1, 2, 3, 4], 8), request("b", [5, 6, 7, 8], 8)
    sch.add(a)
    sch.add(b)
    assert a.first_scheduled_time is None
    first = sch.schedule()
    t_b = b.first_scheduled_time
    assert a.arrival_time <= a.first_scheduled_time <= t_b is not None
    sch.iteration_done(first)
    a.output_ids.append(5)
    b.output_ids.append(9)
    sch.iteration_done(sch.schedule())  # b is preempted here (the pool is short)
    assert b.num_preemptions == 1
    sch.finish(a, FinishReason.LENGTH)
    while b not in sch.running:
        sch.iteration_done(sch.schedule())
    assert b.first_scheduled_time == t_b
