"""`orca-jax bench`: is orca-jax worth it on this hardware? One run, every system, one report.

    workloads.py  seeded traces (offline, orca, sharegpt-like), saved as JSON   (no JAX)
    metrics.py    vLLM-definition metrics from per-request timelines, FLOPs, SLO sweeps (no JAX)
    systems.py    orca-jax (iteration / static), HF generate, vLLM peer; the arrival loop
    report.py     JSON report, Markdown tables, matplotlib plots
    run.py        the command: checkpoint -> trace -> ceiling -> systems -> report
    stages.py     `bench stages`: per-device activity of pipeline stages (profiled)
    latency.py    `bench latency`: time per output token vs the floors (decode_step.py), host
                  time per iteration over an instant device (host.py)
    vllm_offline.py  the vLLM peer's driver, run under vLLM's own Python

See docs/benchmarks.md for how to read the results.
"""
from .run import cmd_bench

__all__ = ["cmd_bench"]
