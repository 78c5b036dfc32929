"""Benchmark results: the sweep analysis, Markdown tables, JSON and matplotlib plots.

The JSON report (schema `orca-jax-bench/1`) holds everything needed to redraw a figure or
recompute a number: the machine (with its measured matmul ceiling), the model, the
workload summary (the trace itself is saved beside it), the engine knobs, and one entry per
(system, rate) run with vLLM-style metrics. `REPORT_KEYS` and `RUN_KEYS` are the schema's
required keys (tests/test_bench_e2e.py checks them).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from .metrics import max_throughput_under_slo, throughput_ratio
from .systems import SYSTEMS

SCHEMA = "orca-jax-bench/1"
REPORT_KEYS = ("schema", "command", "date", "commit", "machine", "model", "workload", "engine",
               "systems", "runs", "sweep")
RUN_KEYS = ("system", "label", "rate", "metrics", "info", "model_flops", "achieved_gflops", "mfu")
METRIC_KEYS = ("completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
               "request_throughput", "output_throughput", "total_token_throughput", "ttft_ms",
               "tpot_ms", "itl_ms", "e2el_ms", "normalized_latency_ms", "goodput")
AUTO_SLO_FACTOR = 3.0  # auto SLO: this many times orca's median normalized latency at the lowest rate


def _median(stats: dict | None, key: str = "median") -> float | None:
    return None if stats is None else stats[key]


def curves(runs: Sequence[dict]) -> dict[str, list[dict]]:
    """Per system, its sweep points in order of offered rate."""
    out: dict[str, list[dict]] = {}
    for r in sorted((r for r in runs if r["rate"] is not None), key=lambda r: r["rate"]):
        m = r["metrics"]
        out.setdefault(r["system"], []).append({
            "rate": r["rate"], "request_throughput": m["request_throughput"],
            "output_throughput": m["output_throughput"],
            "median_normalized_latency_ms": _median(m["normalized_latency_ms"])})
    return out


def auto_slo(cs: dict[str, list[dict]]) -> tuple[float, str]:
    ref = "orca" if "orca" in cs else next(iter(cs))
    base = cs[ref][0]["median_normalized_latency_ms"]
    return AUTO_SLO_FACTOR * base, (f"auto: {AUTO_SLO_FACTOR:g} x the median normalized latency of "
                                    f"{ref} at its lowest rate ({base:.1f} ms/token)")


def sweep_summary(runs: Sequence[dict], slo_ms: float | None) -> dict:
    """Max request throughput of each system with median normalized latency <= the SLO, and
    the ratios of orca-jax iteration-level against each baseline."""
    cs = curves(runs)
    if slo_ms is None:
        slo_ms, source = auto_slo(cs)
    else:
        source = "--slo"
    best = {s: max_throughput_under_slo(
        [(p["request_throughput"], p["median_normalized_latency_ms"]) for p in pts], slo_ms)
        for s, pts in cs.items()}
    ratios = {f"orca_vs_{s}": throughput_ratio(best["orca"], best[s])
              for s in best if s != "orca" and "orca" in best}
    return {"x": "request throughput (req/s)", "y": "median normalized latency (ms/token)",
            "slo_normalized_latency_ms": slo_ms, "slo_source": source, "curves": cs,
            "max_throughput_under_slo": best, "ratios": ratios}


# -- Markdown ----------------------------------------------------------------------------------

def _f(x, fmt="{:.1f}", scale=1.0) -> str:
    return "-" if x is None else fmt.format(x * scale)


def offline_table(runs: Sequence[dict]) -> str:
    base = next((r for r in runs if r["system"] == "orca"), None)
    rows = ["| system | req/s | output tok/s | total tok/s | TTFT p50 (s) | TPOT p50 (ms) | "
            "E2E p50 (s) | norm. latency p50 (ms/tok) | GFLOP/s | MFU | orca-jax speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r["metrics"]
        speed = (f"{r['metrics']['duration_s'] / base['metrics']['duration_s']:.2f}x" if base else "-")
        rows.append(
            f"| {r['label']} | {m['request_throughput']:.2f} | {m['output_throughput']:.1f} | "
            f"{m['total_token_throughput']:.1f} | {_f(_median(m['ttft_ms']), '{:.2f}', 1e-3)} | "
            f"{_f(_median(m['tpot_ms']))} | {_f(_median(m['e2el_ms']), '{:.2f}', 1e-3)} | "
            f"{_f(_median(m['normalized_latency_ms']))} | {r['achieved_gflops']:.1f} | "
            f"{100 * r['mfu']:.1f}% | {speed} |")
    return "\n".join(rows)


def sweep_table(runs: Sequence[dict]) -> str:
    rows = ["| system | rate (req/s) | throughput (req/s) | output tok/s | TTFT p50 / p99 (s) | "
            "TPOT p50 (ms) | ITL p50 (ms) | E2E p50 / p99 (s) | norm. latency p50 (ms/tok) | "
            "mean batch | goodput (req/s) | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (list(SYSTEMS).index(r["system"]), r["rate"] or 0)):
        m, g = r["metrics"], r["metrics"]["goodput"]
        t, e = m["ttft_ms"], m["e2el_ms"]
        rows.append(
            f"| {r['label']} | {r['rate']:g} | {m['request_throughput']:.2f} | "
            f"{m['output_throughput']:.1f} | {t['median'] / 1e3:.2f} / {t['p99'] / 1e3:.2f} | "
            f"{_f(_median(m['tpot_ms']))} | {_f(_median(m['itl_ms']))} | "
            f"{e['median'] / 1e3:.2f} / {e['p99'] / 1e3:.2f} | "
            f"{_median(m['normalized_latency_ms']):.1f} | {r['info'].get('mean_batch_size', 0):.1f} | "
            f"{_f(g and g['request_goodput'], '{:.2f}')} | {100 * r['mfu']:.1f}% |")
    return "\n".join(rows)


def sweep_text(sweep: dict, labels: dict[str, str]) -> str:
    slo = sweep["slo_normalized_latency_ms"]
    lines = [f"Max throughput with median normalized latency <= {slo:.1f} ms/token "
             f"({sweep['slo_source']}):", ""]
    for s, b in sweep["max_throughput_under_slo"].items():
        if b is None:
            lines.append(f"- {labels[s]}: never met the SLO in this sweep")
        else:
            more = "; still under the SLO at the highest rate, so at least this" if b["lower_bound"] else ""
            lines.append(f"- {labels[s]}: {b['throughput']:.2f} req/s ({b['how']}{more})")
    for k, v in sweep["ratios"].items():
        other = labels[k.removeprefix("orca_vs_")]
        val = "n/a" if v["ratio"] is None else f"{v['ratio']:.2f}x"
        lines.append(f"- iteration-level / {other}: **{val}** ({v['note']})")
    return "\n".join(lines)


# -- files ---------------------------------------------------------------------------------------

def write_json(report: dict, path: str | Path) -> None:
    def clean(x):  # JSON has no inf/nan
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    Path(path).write_text(json.dumps(clean(report), indent=1))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_sweep(sweep: dict, labels: dict[str, str], title: str, path: str | Path) -> None:
    """The paper's Figure 10/11 shape: median normalized latency against throughput."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for s, pts in sweep["curves"].items():
        xs = [p["request_throughput"] for p in pts]
        ys = [p["median_normalized_latency_ms"] for p in pts]
        line, = ax.plot(xs, ys, marker="o", label=labels[s])
        for p, x, y in zip(pts, xs, ys):  # the offered rate beside each point
            ax.annotate(f"{p['rate']:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=6, color=line.get_color())
        b = sweep["max_throughput_under_slo"].get(s)
        if b is not None:  # the max throughput within the SLO
            ax.plot([b["throughput"]], [b["latency"]], marker="*", markersize=13,
                    color=line.get_color(), markeredgecolor="black", linestyle="none")
    ax.axhline(sweep["slo_normalized_latency_ms"], color="grey", linestyle="--", linewidth=1,
               label=f"SLO {sweep['slo_normalized_latency_ms']:.0f} ms/token")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda y, _: f"{y:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("median normalized latency (ms/token)")
    ax.set_title(title + "\n(numbers: offered rate in req/s; stars: max throughput within the SLO)",
                 fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_offline(runs: Sequence[dict], title: str, path: str | Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    names = [r["label"] for r in runs]
    vals = [r["metrics"]["output_throughput"] for r in runs]
    bars = ax.barh(names[::-1], vals[::-1])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xlabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
