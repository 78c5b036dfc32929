"""Rate sweeps of simulated systems, read the way `orca-jax bench` reads measured ones.

A *system* is one engine configuration (iteration-level or request-level scheduling, a max
batch size, a KV admission policy, a layout); each runs the same trace at every rate. The runs
have `orca-jax bench`'s JSON form (bench/report.py `RUN_KEYS`), so `report.sweep_summary`,
`sweep_table` and `plot_sweep` draw the paper's figure (throughput vs median normalized
latency) from simulated runs exactly as from measured ones.

The headline number is the paper's: the highest throughput iteration-level scheduling
sustains within a latency SLO over the highest the request-level baseline sustains within the
same SLO (each the best of its max batch sizes), `metrics.throughput_ratio`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from ..bench import report
from ..bench.metrics import request_flops, summarize, throughput_ratio
from ..bench.workloads import Trace
from ..config import EngineConfig
from .run import SimConfig, Simulator


@dataclasses.dataclass(frozen=True)
class System:
    name: str               # key in the report ("iteration-bs32")
    label: str              # legend of the plot
    engine: EngineConfig
    layout: str = "megatron"  # sharding layout: a shipped name or a rules file


def run_sweep(systems: Sequence[System], trace: Trace, rates: Sequence[float],
              make_config: Callable[[System], SimConfig], model_config,
              max_tokens: int | None = None) -> list[dict]:
    """Every system at every rate, as `orca-jax bench` runs (MFU against all devices' peak)."""
    runs = []
    flops = sum(request_flops(model_config, r.prompt_len, r.output_len) for r in trace.requests)
    for s in systems:
        cfg = make_config(s)
        peak = cfg.cost.peak_flops * cfg.cost.parallelism["devices"]
        for rate in rates:
            res = Simulator(cfg, max_tokens).run(trace.at_rate(rate))
            m = summarize(res.records)
            runs.append({"system": s.name, "label": s.label, "policy": s.engine.policy, "rate": rate,
                         "metrics": m, "info": res.info,
                         "model_flops": flops, "achieved_gflops": flops / m["duration_s"] / 1e9,
                         "mfu": flops / m["duration_s"] / peak})
    return runs


def compare(runs: list[dict], slo_ms: float | None = None) -> dict:
    """The sweep summary (bench/report.py) plus the iteration-level / request-level ratio at
    equal latency. Default SLO: `report.AUTO_SLO_FACTOR` x the lowest median normalized
    latency any iteration-level system (else any system) has at the lowest rate (the bench's
    rule). With one policy only, `ratios` is empty."""
    curves = report.curves(runs)
    policy = {r["system"]: r["policy"] for r in runs}
    if slo_ms is None:
        ref = "iteration" if "iteration" in policy.values() else "static"
        base = min(pts[0]["median_normalized_latency_ms"] for s, pts in curves.items() if policy[s] == ref)
        slo_ms, source = report.AUTO_SLO_FACTOR * base, (
            f"auto: {report.AUTO_SLO_FACTOR:g} x the lowest median normalized latency of a {ref}-level "
            f"system at the lowest rate ({base:.1f} ms/token)")
    else:
        source = "--slo"
    sweep = report.sweep_summary(runs, slo_ms)
    sweep["slo_source"] = source
    sweep["ratios"] = {}
    if set(policy.values()) != {"iteration", "static"}:
        return sweep
    best = {}
    for kind in ("iteration", "static"):
        points = [(s, b) for s, b in sweep["max_throughput_under_slo"].items() if policy[s] == kind and b]
        best[kind] = max(points, key=lambda sb: sb[1]["throughput"], default=(None, None))
    ratio = throughput_ratio(best["iteration"][1], best["static"][1])
    sweep["ratios"] = {"iteration_vs_static": ratio | {"iteration": best["iteration"][0],
                                                        "static": best["static"][0]}}
    return sweep


def table(runs: list[dict]) -> str:
    """One row per (system, rate): bench/report.py's columns that a simulation has."""
    rows = ["| system | rate (req/s) | throughput (req/s) | output tok/s | TTFT p50 (s) | TPOT p50 (ms) | "
            "norm. latency p50 (ms/tok) | mean batch | preemptions | MFU |", "|" + "---|" * 10]
    for r in runs:
        m, f = r["metrics"], report._f
        rows.append(f"| {r['label']} | {r['rate']:g} | {m['request_throughput']:.2f} | {m['output_throughput']:.0f} | "
                    f"{m['ttft_ms']['median'] / 1e3:.2f} | {f(report._median(m['tpot_ms']))} | "
                    f"{m['normalized_latency_ms']['median']:.1f} | {r['info']['mean_batch_size']:.1f} | "
                    f"{r['info']['preemptions']} | {100 * r['mfu']:.1f}% |")
    return "\n".join(rows)


def summary_text(sweep: dict, labels: dict[str, str]) -> str:
    """The bench's lines (max throughput of each system within the SLO), then the ratio at
    equal latency."""
    text = report.sweep_text({**sweep, "ratios": {}}, labels)
    if not sweep["ratios"]:
        return text
    r = sweep["ratios"]["iteration_vs_static"]
    val = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    return (text
            + f"\niteration-level / request-level throughput at equal latency: {val} "
              f"({labels.get(r['iteration'], '-')} vs {labels.get(r['static'], '-')}; {r['note']})")
