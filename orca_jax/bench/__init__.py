"""`orca-jax bench`: is orca-jax worth it on this hardware? One run, every system, one report.

    workloads.py  seeded traces (offline, orca, sharegpt-like), saved as JSON   (no JAX)
    metrics.py    vLLM-definition metrics from per-request timelines, FLOPs, SLO sweeps (no JAX)
    systems.py    orca-jax (iteration / static), HF generate, vLLM peer; the arrival loop
    report.py     JSON report, Markdown tables, matplotlib plots
    run.py        the command: checkpoint -> trace -> ceiling -> systems -> report

See docs/benchmarks.md for how to read the results.
"""
from .run import cmd_bench

__all__ = ["cmd_bench"]
