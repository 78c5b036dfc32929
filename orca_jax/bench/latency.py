"""`orca-jax bench latency`: time per output token against this machine's floors, and host time.

    orca-jax bench latency --preset gpt2-small --batches 1,4,16,64 --running 1,16,64,256

Two parts, in one run:
* decode (decode_step.py): B requests decode in steady state on the real engine and a
  random-weight `--preset` model; a step's wall time is each request's time per output token
  (ITL = TPOT here: every step samples one token per request). Each batch is reported with
  the decode bucket it ran in and against its floor, max(weights + KV read at the measured
  bandwidth, FLOPs at the measured matmul ceiling), ceilings taken before and after.
* host (host.py): the real `Engine.step()` over a runner whose device answers at once, with
  N requests running: the host's share of an iteration, which must stay below a GPU's step
  time or the device waits.
Writes `<out>/latency.json` with every number and the machine. See docs/benchmarks.md.
"""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def add_parser(wsub) -> None:
    w = wsub.add_parser("latency", help="time per output token vs this machine's floors; host time "
                                        "per iteration", description=__doc__.splitlines()[0])
    w.add_argument("--preset", default="gpt2-small", help="shape of the random model (orca_jax.models.PRESETS: GPT-2 and Llama shapes)")
    w.add_argument("--batches", default="1,4,16,64", help="decoding requests per step, comma-separated")
    w.add_argument("--rounds", type=int, default=7, help="timed rounds per batch (median reported)")
    w.add_argument("--steps", type=int, default=8, help="engine steps per round")
    w.add_argument("--running", default="1,16,64,256",
                   help="running requests for the host part, comma-separated ('' skips it)")
    w.add_argument("--host-steps", type=int, default=200, help="iterations timed per running count")
    w.add_argument("--out", default="bench-results/latency", help="results folder")
    w.set_defaults(fn=cmd_latency)


def cmd_latency(args) -> int:
    from . import decode_step, host
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor() or platform.machine()}}
    report.update(decode_step.measure(args.preset, ints(args.batches), args.rounds, args.steps))
    decode_step.print_report(report)
    report["host"] = []
    if ints(args.running):
        from ..demo_model import ensure_demo_model
        from ..tokenizer import load_tokenizer
        tokenizer = load_tokenizer(ensure_demo_model())
        for n in ints(args.running):
            t = host.host_step_times(tokenizer, n, args.host_steps) * 1e3
            row = {"running": n, "median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                   "iterations": args.host_steps}
            report["host"].append(row)
            print(f"host, {n:4d} running: {row['median_ms']:.3f} ms per iteration (p90 {row['p90_ms']:.3f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'latency.json'}")
    return 0
