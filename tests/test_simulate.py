"""The simulator (orca_jax/sim): the cost model's arithmetic by hand, the real scheduler on a
virtual clock behaving as the paper says, the command, and (slow) calibration on this machine."""
from __future__ import annotations

import json
import time

import pytest

from orca_jax.bench import workloads
from orca_jax.bench.metrics import summarize
from orca_jax.config import EngineConfig
from orca_jax.plan import PagedKV, build_plan
from orca_jax.sharding.plan import ACCELERATORS
from orca_jax.sim import paper
from orca_jax.sim.accelerators import cpu_accelerator
from orca_jax.sim.calibrate import fit_efficiency, plan_work
from orca_jax.sim.cost import Efficiency, StepCost, StepWork, step_work
from orca_jax.sim.run import SimConfig, Simulator, engine_parts
from orca_jax.sim.sweep import compare, run_sweep

A100 = ACCELERATORS["a100-40gb"]
VOCAB = 50257


@pytest.fixture(scope="module")
def gpt2_cost():
    return StepCost.build("gpt2-small", "tensor=1", "replicated", A100, "float32")


@pytest.fixture(scope="module")
def cost_13b():
    return StepCost.build("gpt3-13b", "tensor=1", "megatron", A100, "bfloat16")


def _sim(cost, pages=4000, **engine):
    ec = paper.paper_engine(engine.pop("max_batch_size", 16), engine.pop("policy", "iteration"), **engine)
    return Simulator(SimConfig(ec, cost, Efficiency(0.5, 0.7, 1e-3), pages, ec.max_model_len))


def test_cost_model_matches_hand_computed_gpt2_small(gpt2_cost):
    """GPT-2 small fp32: per layer 4D^2 + 8D^2 matmul weights (D = 768), 12 layers; the LM
    head is the tied 50257 x 768 embedding; K and V of 12 layers x 768 floats per token."""
    D, L, V = 768, 12, 50257
    matmul = L * (3 * D * D + D * D + 8 * D * D)   # QKV, out-proj, MLP up and down
    assert gpt2_cost.flops_per_row == 2 * matmul
    assert gpt2_cost.flops_per_sample == 2 * V * D
    assert gpt2_cost.flops_per_pair == 4 * D * L
    assert gpt2_cost.bytes_per_kv == gpt2_cost.bytes_per_row == 2 * D * L * 4
    # weights read once per step: every layer parameter (biases 3D + D + 4D + D, two
    # LayerNorms 4D), the head's embedding and final LayerNorm (not the position table: a
    # step gathers only its rows)
    weights = 4 * (matmul + L * 13 * D + V * D + 2 * D)
    assert gpt2_cost.bytes_fixed == weights
    w = StepWork(rows=64, sampled=64, pairs=64 * 300, kv_read=64 * 300)
    expect = 2 * matmul * 64 + 2 * V * D * 64 + 4 * D * L * 64 * 300
    assert gpt2_cost.flops(w) == expect
    # at A100 peak, memory-bound: the weights plus 64 x 300 positions of KV over 1555 GB/s
    t = gpt2_cost.stage_s(w, Efficiency())
    assert t == pytest.approx(max(expect / 156e12, (weights + 2 * D * L * 4 * (64 + 64 * 300)) / 1555e9))


def test_tensor_and_pipeline_split_the_work():
    """175B over tensor=8,pipeline=2: each device holds 1/16 of the layers' matmul weights and
    every row all-reduces twice per layer over NVLink; the hand-off goes over the network."""
    one = StepCost.build("gpt3-175b", "tensor=1", "megatron", A100)
    split = StepCost.build("gpt3-175b", "tensor=8,pipeline=2", "megatron", A100)
    assert split.stages == 2 and split.parallelism["tensor_link"] == "NVLink"
    assert split.flops_per_row == one.flops_per_row / 16
    D = 12288
    assert split.comm_s_per_row == pytest.approx(48 * 2 * D * 2 * (2 * 7 / 8) / A100.link_bw)
    assert split.handoff_s_per_row == pytest.approx(D * 2 / A100.net_bw)


def test_step_work_equals_what_the_plan_computes(gpt2_cost):
    """The simulator's counts of a scheduled batch (padded, as XLA CPU computes it) equal the
    counts read back from the real padded StepPlan of that batch (what calibration measures)."""
    cfg = SimConfig(EngineConfig(max_batch_size=8, max_model_len=256, page_size=16), gpt2_cost, Efficiency(),
                    200, 256)
    trace = workloads.offline(6, "20:70", "4", VOCAB, seed=3)
    sched, buckets = engine_parts(cfg)
    for k, r in enumerate(trace.requests):
        sched.add(_request(k, r))
    kv = PagedKV.make(200, 16, 256)
    for _ in range(4):
        batch = sched.schedule()
        plan = build_plan(batch, buckets, 8, kv)
        assert step_work(batch, buckets, 16, padded_attention=True) == plan_work(plan, 16)
        sched.iteration_done(batch)
        for req in batch.decodes + [c.request for c in batch.prefills if c.completes_prompt]:
            req.output_ids.append(0)


def _request(k, r):
    from orca_jax.request import Request, SamplingParams
    return Request(str(k), list(r.prompt_ids), SamplingParams(max_tokens=r.output_len, ignore_eos=True), k)


def test_iteration_level_beats_request_level_at_equal_latency(cost_13b):
    trace = workloads.orca(300, VOCAB, seed=0)
    systems = paper.systems(batch_sizes=(8,), max_model_len=640)
    rates = [0.5, 1, 2, 4, 8]
    runs = run_sweep(systems, trace, rates, lambda s: _sim(cost_13b, max_batch_size=8,
                                                           policy=s.engine.policy).cfg, paper.model_config("gpt3-13b"))
    sweep = compare(runs)
    ratio = sweep["ratios"]["iteration_vs_static"]
    assert ratio["ratio"] > 1.5, ratio
    for it, st in zip(runs[:len(rates)], runs[len(rates):]):  # at every rate, lower latency
        assert it["metrics"]["normalized_latency_ms"]["median"] < st["metrics"]["normalized_latency_ms"]["median"]


def test_larger_max_batch_raises_throughput_under_load(cost_13b):
    trace = workloads.orca(200, VOCAB, seed=1).at_rate(50)  # far beyond capacity: always full
    tput = [summarize(_sim(cost_13b, max_batch_size=b).run(trace).records)["request_throughput"]
            for b in (1, 4, 16)]
    assert tput[0] < tput[1] < tput[2]
    assert tput[2] > 3 * tput[0]


def test_reserve_admission_limits_the_batch_by_kv_pages(cost_13b):
    """Pages of 64 tokens; each request reserves prompt + output (<= 640 tokens: <= 10 pages),
    so 30 pages never hold more than 30 / 1 requests and, with >= 4 pages each here, <= 7."""
    trace = workloads.offline(40, "200:400", "32", VOCAB, seed=2)  # 232..432 tokens: 4..7 pages
    res = _sim(cost_13b, pages=30, max_batch_size=32).run(trace)
    assert 1 < res.info["max_batch_size_seen"] <= 30 // 4
    free = _sim(cost_13b, pages=4000, max_batch_size=32).run(trace)
    assert free.info["max_batch_size_seen"] > res.info["max_batch_size_seen"]
    assert all(r.output_len == 32 for r in res.records)


def test_on_demand_admits_more_than_reserve_with_long_max_tokens(cost_13b):
    """Every request asks for 512 tokens but stops at its output length: reserve holds pages
    for all 512, on demand only for what is written, so it runs more requests at once."""
    trace = workloads.orca(80, VOCAB, seed=4, output_len="8:32").at_rate(100)
    got = {}
    for kv in ("reserve", "on-demand"):
        ec = paper.paper_engine(32, "iteration", kv, max_model_len=1024)
        res = Simulator(SimConfig(ec, cost_13b, Efficiency(), 60, 1024), max_tokens=512).run(trace)
        got[kv] = res.info["mean_batch_size"]
    assert got["on-demand"] > 1.5 * got["reserve"]


def test_static_returns_a_batch_together(cost_13b):
    trace = workloads.offline(8, "64", "4:40", VOCAB, seed=5)
    res = _sim(cost_13b, max_batch_size=8, policy="static").run(trace)
    assert len({r.chunks[-1][0] for r in res.records}) == 1  # every last token at the same time
    res = _sim(cost_13b, max_batch_size=8).run(trace)
    assert len({r.chunks[-1][0] for r in res.records}) > 1   # iteration-level: each when done


def test_deterministic_for_a_seed(cost_13b):
    runs = [summarize(_sim(cost_13b).run(workloads.orca(100, VOCAB, seed=7).at_rate(3)).records)
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = summarize(_sim(cost_13b).run(workloads.orca(100, VOCAB, seed=8).at_rate(3)).records)
    assert other != runs[0]


def test_pipeline_keeps_n_stages_iterations_in_flight():
    """With 2 stages and a steady decode load, iterations start every stage interval, not
    every full latency: twice the throughput of one stage doing both halves in turn."""
    cost = StepCost.build("gpt3-175b", "tensor=8,pipeline=2", "megatron", A100)
    trace = workloads.offline(64, "32", "64", VOCAB, seed=6)
    ec = paper.paper_engine(64, "iteration")
    res = Simulator(SimConfig(ec, cost, Efficiency(), 2000, 640), keep_iterations=True).run(trace)
    assert res.info["max_batch_size_seen"] == 32      # each iteration takes half the requests
    steady = [s for td, tp, s in res.iterations if tp == 0]
    duration = summarize(res.records)["duration_s"]
    assert duration < 0.75 * sum(steady)              # iterations overlap


def test_ten_thousand_requests_in_under_a_minute(cost_13b):
    trace = workloads.orca(10_000, VOCAB, seed=0).at_rate(5)
    t0, c0 = time.perf_counter(), time.process_time()
    res = _sim(cost_13b, max_batch_size=32).run(trace)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"10,000 requests: {wall:.1f} s wall, {cpu:.1f} s CPU, {res.info['iterations']} iterations")
    assert summarize(res.records)["completed"] == 10_000
    assert cpu < 60


def test_fit_recovers_known_efficiencies():
    """Step times made with known efficiencies on a CPU-like device (30 GB/s, 200 GFLOP/s:
    small steps memory-bound, large ones compute-bound, the compute share growing with the
    rows, the attention loop costing time per KV position) are predicted back by the fit."""
    cost = StepCost.build("gpt2-small", "tensor=1", "replicated", cpu_accelerator(30e9, 200e9), "float32")
    eff = Efficiency(0.3, 0.6, 0.004, rows_exponent=0.3, attention_s_per_kv=2e-6)
    works = [StepWork(r, min(r, 16), r * 200, kv) for r in (1, 2, 8, 16, 64, 128, 256, 512) for kv in (r * 100, 4096)]
    fit = fit_efficiency([(cost, w, cost.stage_s(w, eff)) for w in works])
    assert fit.compute == pytest.approx(0.3, rel=0.03)
    assert fit.attention_s_per_kv == pytest.approx(2e-6, rel=0.15)  # the grid's step is x1.2
    # The weights dominate every small step's bytes, so the memory share and the overhead
    # trade off against each other (both are nearly constant): only their sum is pinned down.
    for w in works:
        assert cost.stage_s(w, fit) == pytest.approx(cost.stage_s(w, eff), rel=0.08)


def test_simulate_command(tmp_path, capsys):
    from orca_jax.cli.app import main
    out = tmp_path / "sim"
    assert main(["simulate", "--model", "gpt3-175b", "--mesh", "tensor=8,pipeline=2", "--accelerator",
                 "a100-40gb", "--workload", "orca", "--requests", "60", "--batch-sizes", "8",
                 "--rates", "0.5,2,8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "iteration-level / request-level throughput at equal latency" in text
    assert (out / "simulate.png").stat().st_size > 0
    rep = json.loads((out / "results.json").read_text())
    assert len(rep["runs"]) == 6 and rep["kv_pages"]["megatron"] == 827  # 52,928 tokens of KV
    assert workloads.Trace.load(out / "trace.json").kind == "orca"


@pytest.mark.slow
def test_calibration_against_the_engine(tmp_path):
    """Minutes: the real engine on GPT-2 small at two rates, then the fitted simulator."""
    from orca_jax.cli.app import main
    assert main(["simulate", "--calibrate", "--preset", "gpt2-small", "--workload", "orca", "--requests", "16",
                 "--prompt-len", "16:128", "--output-len", "1:64", "--rates", "1,4", "--max-batch-size", "16",
                 "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "calibration.json").read_text())
    assert all(abs(s["throughput_error"]) < 0.5 for s in r["sweep"])


def test_simulate_with_a_calibration_file(tmp_path, capsys):
    """`--calibration` runs on cpu-here with the file's (median) ceilings and fit,
    with attention priced as the XLA CPU backend computes it."""
    from orca_jax.cli.app import main
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"cpu_here": {"read_gbs": 15.0, "matmul_gflops": 90.0},
                               "efficiency": {"compute": 0.7, "memory": 1.5, "overhead_s": 0.001,
                                              "rows_exponent": 0.3}}))
    out = tmp_path / "sim"
    assert main(["simulate", "--model", "gpt2-small", "--calibration", str(cal), "--dtype", "float32",
                 "--policies", "iteration", "--batch-sizes", "16", "--requests", "20", "--prompt-len", "16:64",
                 "--output-len", "1:16", "--rates", "1,4", "--out", str(out)]) == 0
    assert "iteration-level / request-level" not in capsys.readouterr().out  # one policy: no ratio
    rep = json.loads((out / "results.json").read_text())
    assert rep["accelerator"] == "cpu-here" and rep["efficiency"]["rows_exponent"] == 0.3
    assert [r["metrics"]["completed"] for r in rep["runs"]] == [20, 20]
