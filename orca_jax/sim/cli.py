"""`orca-jax simulate`: the engine's scheduler at cluster scale, on a cost model.

    orca-jax simulate --model gpt3-175b --mesh tensor=8,pipeline=2 --accelerator a100-40gb \\
                      --workload orca

Runs iteration-level and request-level scheduling at each max batch size over the workload
at a sweep of rates (default: fractions of the estimated capacity), prints the bench's tables
and the iteration-level / request-level throughput ratio at equal median normalized latency,
and writes DIR/results.json, DIR/trace.json and the plot. `--layouts` and `--kv-admission`
take comma lists to compare sharding layouts and admission policies on the same trace;
`--calibrate` measures the real engine on this machine instead (calibrate.py).
See docs/simulation.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

from ..bench import report, workloads
from . import paper

WORKLOADS = ("orca", "sharegpt-like", "shared-prefix", "offline")


def add_parser(sub) -> argparse.ArgumentParser:
    """Registers `simulate` on the `orca-jax` subcommands."""
    p = sub.add_parser("simulate", help="the real scheduler on a cost model of a cluster: "
                       "throughput vs latency without the hardware", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and devices")
    g.add_argument("--model", default="gpt3-175b", help="a preset or one of the paper's (gpt3-13b, "
                   "gpt3-101b, gpt3-175b, gpt3-341b); default gpt3-175b")
    g.add_argument("--mesh", default=None, help="e.g. tensor=8,pipeline=2 (default: the paper's for its "
                   "models, else tensor=1)")
    g.add_argument("--layouts", default="megatron", help="comma list of layouts (names or rules files)")
    g.add_argument("--accelerator", default=paper.ACCELERATOR, type=str.lower,
                   help="a100-40gb, a100-80gb, h100, h200, or cpu-here (measured now)")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    g.add_argument("--calibration", default=None, metavar="FILE",
                   help="a calibration.json of --calibrate: cpu-here with its ceilings and fitted efficiency")
    g.add_argument("--efficiency", default=None, metavar="COMPUTE,MEMORY,OVERHEAD_MS",
                   help="share of peak FLOP/s and bandwidth a step reaches, fixed ms per step "
                        "(default: 0.5,0.7,1 on GPUs; measure with --calibrate for cpu-here)")
    g = p.add_argument_group("engine (every system)")
    g.add_argument("--policies", default="iteration,static", help="comma list: iteration, static")
    g.add_argument("--batch-sizes", default=",".join(map(str, paper.MAX_BATCH_SIZES)),
                   help="comma list of max batch sizes")
    g.add_argument("--kv-admission", default="reserve", help="comma list: reserve (Orca's), on-demand")
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--page-size", type=int, default=64)
    g.add_argument("--kv-pages", type=int, default=None,
                   help="KV pages per device (default: what fits after the weights in 90%% of memory)")
    g.add_argument("--prefix-caching", action="store_true", help="on (the paper has none)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="every request asks for this many tokens (reserve admission reserves them) "
                        "and stops at its output length")
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default="orca")
    g.add_argument("--trace", default=None, help="replay a saved trace.json (e.g. from orca-jax bench)")
    g.add_argument("--requests", type=int, default=1000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prompt-len", default=paper.PROMPT_LEN, help="LO:HI uniform (orca, offline)")
    g.add_argument("--output-len", default=paper.OUTPUT_LEN, help="LO:HI uniform (orca, offline)")
    g.add_argument("--rates", default="auto", help="comma list of req/s, or auto (fractions of the "
                   "estimated capacity)")
    g.add_argument("--slo", type=float, default=None, help="median normalized latency SLO, ms/token")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="sim-results", help="results folder")
    g.add_argument("--plot", default=None, help="PNG path (default: <out>/simulate.png)")
    g = p.add_argument_group("calibration (this machine, the real engine)")
    g.add_argument("--calibrate", action="store_true", help="measure the engine and fit cpu-here (minutes)")
    g.add_argument("--preset", default="gpt2-small", help="the model --calibrate measures")
    g.add_argument("--max-batch-size", type=int, default=64, help="--calibrate's engine")
    p.set_defaults(fn=cmd_simulate)
    return p


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _words(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def make_trace(args, vocab_size: int) -> workloads.Trace:
    if args.trace:
        return workloads.Trace.load(args.trace)
    if args.workload == "orca":
        return workloads.orca(args.requests, vocab_size, args.seed, args.prompt_len, args.output_len)
    if args.workload == "offline":
        return workloads.offline(args.requests, args.prompt_len, args.output_len, vocab_size, args.seed)
    if args.workload == "shared-prefix":
        return workloads.shared_prefix(args.requests, vocab_size, args.seed)
    return workloads.sharegpt_like(args.requests, vocab_size, args.seed)


def make_systems(args, max_len: int) -> list:
    """Every combination of the comma lists (sweep.py `System`s); names and labels show only
    what varies."""
    from .sweep import System
    axes = {"policy": _words(args.policies), "bs": _ints(args.batch_sizes),
            "kv": _words(args.kv_admission), "layout": _words(args.layouts)}
    out = []
    for policy, bs, kv, layout in itertools.product(*axes.values()):
        ec = paper.paper_engine(bs, policy, kv, max_len, page_size=args.page_size,
                                max_num_batched_tokens=max(args.max_num_batched_tokens, bs),
                                enable_prefix_caching=args.prefix_caching)
        parts = {"policy": policy, "bs": f"bs{bs}", "kv": kv, "layout": Path(layout).stem}
        name = "-".join(v for k, v in parts.items() if k == "policy" or len(axes[k]) > 1)
        label = ", ".join([{"iteration": "iteration-level", "static": "request-level"}[policy]]
                          + [f"max batch {bs}"] * (len(axes["bs"]) > 1)
                          + [f"{kv} KV"] * (len(axes["kv"]) > 1) + [parts["layout"]] * (len(axes["layout"]) > 1))
        out.append(System(name, label, ec, layout))
    return out


def device(args):
    """(accelerator, Efficiency): --calibration's cpu-here (its median measured ceilings, its
    fit), else the named accelerator with --efficiency or the defaults."""
    from .accelerators import cpu_accelerator
    from .cost import GPU_EFFICIENCY, Efficiency
    if args.calibration:
        cal = json.loads(Path(args.calibration).read_text())
        c = cal["cpu_here"]
        acc = cpu_accelerator(c["read_gbs"] * 1e9, c["matmul_gflops"] * 1e9)
        return acc, Efficiency(**cal["efficiency"])
    if args.efficiency:
        c, m, o = (float(x) for x in args.efficiency.split(","))
        return args.accelerator, Efficiency(c, m, o / 1e3)
    return args.accelerator, Efficiency() if args.accelerator == "cpu-here" else GPU_EFFICIENCY


def cmd_simulate(args) -> int:
    if args.calibrate:
        return _cmd_calibrate(args)
    from .model import SimModel
    t0 = time.perf_counter()
    acc, eff = device(args)
    model = SimModel.build(args.model, args.mesh or paper.MESHES.get(args.model, "tensor=1"),
                           acc, args.dtype, eff, args.kv_pages, args.page_size)
    trace = make_trace(args, model.config.vocab_size)
    # the longest request, or prompt + --max-tokens (bench/run.py `engine_config`)
    max_len = min(max(trace.max_total_len, trace.max_prompt_len + (args.max_tokens or 0)),
                  model.config.max_positions)
    systems = make_systems(args, max_len)
    rates = model.auto_rates(trace, systems) if args.rates == "auto" else [float(r) for r in _words(args.rates)]
    from .sweep import compare, run_sweep, summary_text, table
    runs = run_sweep(systems, trace, rates, model.sim_config, model.config, args.max_tokens)
    sweep = compare(runs, args.slo)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace.save(out / "trace.json")
    labels = {s.name: s.label for s in systems}
    rep = {"schema": report.SCHEMA, "command": "orca-jax simulate " + " ".join(sys.argv[2:]),
           "model": args.model, "mesh": model.mesh, "accelerator": model.accelerator.name,
           "dtype": args.dtype, "efficiency": dataclasses.asdict(model.efficiency),
           "kv_pages": {s.layout: model.pages(s.layout) for s in systems}, "workload": trace.summary(), "rates": rates,
           "systems": {s.name: {"label": s.label, "layout": s.layout, "engine": dataclasses.asdict(s.engine)}
                       for s in systems}, "runs": runs, "sweep": sweep,
           "wall_seconds": time.perf_counter() - t0}
    report.write_json(rep, out / "results.json")
    plot = Path(args.plot or out / "simulate.png")
    title = (f"simulated: {args.model} on {model.mesh} x {model.accelerator.name}, {trace.kind}, "
             f"{len(trace)} requests")
    report.plot_sweep(sweep, labels, title, plot)
    print(f"## orca-jax simulate: {title}\n")
    print(table(runs) + "\n")
    print(summary_text(sweep, labels))
    print(f"\nresults: {out / 'results.json'}  plot: {plot}  ({rep['wall_seconds']:.1f} s)")
    return 0


def _cmd_calibrate(args) -> int:
    from ..config import EngineConfig
    from .calibrate import calibrate, format_calibration, plot_calibration
    trace = make_trace(args, paper.model_config(args.preset).vocab_size)
    rates = [1.0, 2.0, 4.0] if args.rates == "auto" else [float(r) for r in _words(args.rates)]
    ec = EngineConfig(max_batch_size=args.max_batch_size, max_num_batched_tokens=args.max_num_batched_tokens,
                      max_model_len=trace.max_total_len, max_waiting=max(1024, len(trace)),
                      page_size=args.page_size, warmup=True,
                      attention_backend="xla")  # the attention whose work cost.py counts for cpu-here
    r = calibrate(args, trace, rates, ec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(r, indent=1, default=str))
    plot = Path(args.plot or out / "calibration.png")
    plot_calibration(r, f"calibration: {args.preset} on this machine, {trace.kind}, {len(trace)} requests", plot)
    print(format_calibration(r))
    print(f"\nresults: {out / 'calibration.json'}  plot: {plot}")
    return 0

