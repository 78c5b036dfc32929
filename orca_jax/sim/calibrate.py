"""Calibration: the simulator against the real engine on this machine (GPT-2 small, fp32).

    orca-jax simulate --calibrate --preset gpt2-small --requests 32 --rates 1,2,4

One run, ceilings and steps measured together (the machine is shared: background load moves
both, so the ceilings are taken between the sweep points, and medians are reported):

1. the real engine (`orca-jax bench`'s EngineSystem, same checkpoint, trace and clock) runs
   the trace at every rate, its runner timed: an iteration's time is from when it was
   dispatched (or the previous one finished, if later) to when its sampled ids were back;
2. this machine's ceilings (read GB/s, matmul GFLOP/s: bench/decode_step.py `ceilings`)
   before each rate and after the last; a rate's steps are priced at the lower of the
   ceilings around it (`cpu-here` at that time);
3. fit `Efficiency` (compute and memory shares of the roofline, how the compute share grows
   with a step's rows and where it saturates, the attention loop's time per KV position read,
   a fixed per-step overhead: six numbers, all physically motivated)
   to the measured iterations; report predicted vs measured median time per bucket shape;
4. the simulator, with that fit, runs the same trace at the same rates: measured vs simulated
   throughput and median normalized latency per rate.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import statistics
import time

import numpy as np

from ..bench.metrics import summarize
from ..plan import StepPlan
from .accelerators import cpu_accelerator, measure_cpu
from .cost import Efficiency, StepCost, StepWork

ONE_DEVICE = "tensor=1"


def plan_work(plan: StepPlan, page_size: int) -> StepWork:
    """The counts of a real step (what the XLA CPU backend computes: cost.py `step_work`
    with `padded_attention`), read from its padded plan."""
    meta = plan.inputs.meta
    td, tp = plan.num_decode, plan.num_prefill
    dec = td * int(meta.dec_blocks) * page_size
    n = int(meta.num_hist)
    hist = int(meta.hist_len[:n].sum())
    hist_pairs = int((meta.hist_len[:n] * meta.hist_rows[:n]).sum())
    return StepWork(rows=td + tp, sampled=plan.num_sample_rows, pairs=dec + tp * tp + hist_pairs,
                    kv_read=dec + hist)


class TimedRunner:
    """The engine's runner with every iteration timed (`times`: (Td, Tp), work, seconds).
    Everything else is the runner's own (`__getattr__`)."""

    def __init__(self, runner, page_size: int):
        self._runner, self._page_size = runner, page_size
        self._pending: collections.deque = collections.deque()
        self._last_done = 0.0
        self.times: list[tuple[tuple[int, int], StepWork, float]] = []

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def run(self, plan: StepPlan, sampling, x=None):
        t = time.perf_counter()
        out = self._runner.run(plan, sampling)
        self._pending.append((t, (plan.num_decode, plan.num_prefill), plan_work(plan, self._page_size)))
        return out

    def fetch(self, out, logprobs: bool):
        got = self._runner.fetch(out, logprobs)
        now = time.perf_counter()
        t, shape, work = self._pending.popleft()
        self.times.append((shape, work, now - max(t, self._last_done)))
        self._last_done = now
        return got


SATURATION_ROWS = (16, 32, 64, 128, 256, 512)  # where the compute share may stop growing


def fit_efficiency(samples: list[tuple[StepCost, StepWork, float]]) -> Efficiency:
    """The compute share (its growth with the rows, and where that stops), the memory share,
    the attention loop's cost per KV position and the fixed overhead that minimise the mean
    relative error of the predicted step times, each bucket shape (rows) weighing the same
    however many steps it had, each step priced at the ceilings measured around it (its
    `StepCost`). A grid, refined once around the best; for each point the overhead is the
    median of what the rest leaves unexplained (>= 0)."""
    flops = np.array([c.flops(w) / c.peak_flops for c, w, _ in samples])
    byts = np.array([c.bytes(w) / c.bandwidth for c, w, _ in samples])
    kv = np.array([w.kv_read for _, w, _ in samples], float)
    rows = np.array([max(w.rows, 2) for _, w, _ in samples])  # Efficiency.compute_at's law
    t = np.array([s for _, _, s in samples])
    count = collections.Counter((w.rows, w.sampled) for _, w, _ in samples)
    weight = np.array([1 / count[w.rows, w.sampled] for _, w, _ in samples])
    weight /= weight.sum()

    def search(ecs, ems, alphas, sats, aks):
        best = (np.inf, Efficiency())
        for sat, a in itertools.product(sats, alphas):
            compute = flops / (np.minimum(rows, sat) / sat) ** a
            for ec, em in itertools.product(ecs, ems):
                roof = np.maximum(compute / ec, byts / em)
                for ak in aks:
                    base = roof + ak * kv
                    over = max(0.0, float(np.median(t - base)))
                    err = float(weight @ (np.abs(base + over - t) / t))
                    if err < best[0]:
                        best = (err, Efficiency(float(ec), float(em), over, float(a), int(sat), float(ak)))
        return best[1]

    grid = np.geomspace(0.02, 10.0, 24)
    c = search(grid, grid, np.linspace(0.0, 1.0, 11), SATURATION_ROWS, np.concatenate([[0.0], np.geomspace(1e-8, 1e-4, 17)]))
    fine = lambda x: np.geomspace(x / 1.15, x * 1.15, 9)  # noqa: E731
    aks = [0.0] if not c.attention_s_per_kv else np.geomspace(c.attention_s_per_kv / 1.5, c.attention_s_per_kv * 1.5, 7)
    return search(fine(c.compute), fine(c.memory), np.clip(c.rows_exponent + np.linspace(-0.05, 0.05, 5), 0, None),
                  (c.saturation_rows,), aks)


def bucket_table(eff: Efficiency, times, costs: list[StepCost]) -> list[dict]:
    """Per bucket shape (Td, Tp): iterations, median measured and predicted ms, the error."""
    by = collections.defaultdict(list)
    for shape, work, s, k in times:
        by[shape].append((costs[k].stage_s(work, eff), s))
    rows = []
    for (td, tp), v in sorted(by.items()):
        pred, meas = statistics.median(p for p, _ in v), statistics.median(m for _, m in v)
        rows.append({"decode_rows": td, "prefill_rows": tp, "iterations": len(v), "measured_ms": meas * 1e3,
                     "predicted_ms": pred * 1e3, "error": pred / meas - 1})
    return rows


def measure_engine(args, trace, rates, engine_config):
    """Runs the real engine over the trace at each rate (bench/systems.py `EngineSystem`),
    timed, with the machine's ceilings measured before each rate and after the last. Returns
    (runs as `orca-jax bench` reports them, per-iteration times ((Td, Tp), work, seconds, rate
    index), the ceilings (len(rates) + 1 Accelerators), its KV pages, its max_len)."""
    from ..bench.run import converted_checkpoint, random_hf_checkpoint
    from ..bench.systems import Clock, EngineSystem
    system = EngineSystem("orca", converted_checkpoint(random_hf_checkpoint(args.preset)), engine_config)
    system.warm(trace)
    eng = system.engine
    timer = TimedRunner(eng.runner, eng.kv.page_size)
    eng.runner = timer
    runs, ceilings, times = [], [], []
    for k, rate in enumerate(rates):
        ceilings.append(measure_cpu())
        records, info = system.run(trace.at_rate(rate), Clock())
        runs.append({"system": "orca", "label": "measured", "rate": rate, "metrics": summarize(records),
                     "info": info})
        times += [(*t, k) for t in timer.times]
        timer.times.clear()
    ceilings.append(measure_cpu())
    pages, max_len = eng.kv.num_pages, eng.max_len
    system.close()
    return runs, times, ceilings, pages, max_len


def calibrate(args, trace, rates, engine_config) -> dict:
    """Steps 1-5 of the module docstring; returns every number (JSON-able)."""
    from .run import SimConfig, Simulator
    runs, times, ceilings, pages, max_len = measure_engine(args, trace, rates, engine_config)
    # each rate's steps at the lower of the ceilings measured just before and just after it
    costs = [StepCost.build(args.preset, ONE_DEVICE, "replicated",
                            cpu_accelerator(min(a.hbm_bw, b.hbm_bw), min(a.flops_32, b.flops_32)), "float32")
             for a, b in zip(ceilings, ceilings[1:])]
    eff = fit_efficiency([(costs[k], w, s) for _, w, s, k in times])
    sim_runs = []
    for rate, cost in zip(rates, costs):
        res = Simulator(SimConfig(engine_config, cost, eff, pages, max_len, padded_attention=True)).run(
            trace.at_rate(rate))
        sim_runs.append({"system": "sim", "label": "simulated", "rate": rate,
                         "metrics": summarize(res.records), "info": res.info})
    # for later simulations (`--calibration`): the machine at its median measured speed
    cpu_here = {"read_gbs": statistics.median(a.hbm_bw for a in ceilings) / 1e9,
                "matmul_gflops": statistics.median(a.flops_32 for a in ceilings) / 1e9}
    return {"ceilings": {"read_gbs": [a.hbm_bw / 1e9 for a in ceilings],
                         "matmul_gflops": [a.flops_32 / 1e9 for a in ceilings]}, "cpu_here": cpu_here,
            "efficiency": dataclasses.asdict(eff), "kv_pages": pages,
            "buckets": bucket_table(eff, times, costs), "iterations": len(times),
            "measured_iterations": [[*shape, dataclasses.asdict(w), s, k] for shape, w, s, k in times],
            "runs": runs + sim_runs, "sweep": sweep_agreement(runs, sim_runs)}


def sweep_agreement(measured: list[dict], simulated: list[dict]) -> list[dict]:
    """Per rate: measured and simulated throughput and median normalized latency."""
    out = []
    for m, s in zip(measured, simulated):
        mt, st = m["metrics"]["request_throughput"], s["metrics"]["request_throughput"]
        ml = m["metrics"]["normalized_latency_ms"]["median"]
        sl = s["metrics"]["normalized_latency_ms"]["median"]
        out.append({"rate": m["rate"], "measured_req_s": mt, "simulated_req_s": st,
                    "throughput_error": st / mt - 1, "measured_norm_latency_ms": ml,
                    "simulated_norm_latency_ms": sl, "latency_error": sl / ml - 1})
    return out


def plot_calibration(r: dict, title: str, path) -> None:
    """The measured and the simulated sweep on one figure (bench/report.py `plot_sweep`)."""
    from ..bench import report
    sweep = report.sweep_summary(r["runs"], None)
    sweep["ratios"] = {}
    report.plot_sweep(sweep, {"orca": "measured (the engine)", "sim": "simulated (fitted cost model)"}, title, path)


def format_calibration(r: dict) -> str:
    c, e = r["ceilings"], r["efficiency"]
    lines = [f"ceilings before each rate and at the end: read {' / '.join(f'{x:.1f}' for x in c['read_gbs'])} "
             f"GB/s, matmul {' / '.join(f'{x:.0f}' for x in c['matmul_gflops'])} GFLOP/s",
             f"fitted on {r['iterations']} iterations: compute {e['compute']:.2f} x peak, memory "
             f"{e['memory']:.2f} x bandwidth, overhead {e['overhead_s'] * 1e3:.1f} ms per step, compute share "
             f"x (min(max(rows, 2), {e['saturation_rows']}) / {e['saturation_rows']}) ** {e['rows_exponent']:.2f}, "
             f"attention {e.get('attention_s_per_kv', 0.0) * 1e9:.0f} ns per KV position read", "",
             "| Td | Tp | iterations | measured ms (median) | predicted ms | error |", "|---|---|---|---|---|---|"]
    lines += [f"| {b['decode_rows']} | {b['prefill_rows']} | {b['iterations']} | {b['measured_ms']:.1f} | "
              f"{b['predicted_ms']:.1f} | {b['error']:+.0%} |" for b in r["buckets"]]
    lines += ["", "| rate (req/s) | measured req/s | simulated req/s | error | measured norm. lat. (ms/tok) | "
                  "simulated | error |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['rate']:g} | {s['measured_req_s']:.2f} | {s['simulated_req_s']:.2f} | {s['throughput_error']:+.0%} "
              f"| {s['measured_norm_latency_ms']:.0f} | {s['simulated_norm_latency_ms']:.0f} | {s['latency_error']:+.0%} |"
              for s in r["sweep"]]
    return "\n".join(lines)
