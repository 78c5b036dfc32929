"""`orca-jax bench stages`: do pipeline stages work at the same time? Measured, per device.

    orca-jax bench stages --preset gpt2-small --meshes "data=1;tensor=2;pipeline=2"

For each mesh: the same offline burst through the engine (tokens/s, timed without the
profiler), then a short profiled run (`jax.profiler`) whose trace gives every program
execution's start and end on every device. From those:

* busy[stage]    fraction of the profiled window some device of the stage runs a program;
* overlap        fraction of the window where two or more stages are busy at once: > 0 only if
                 iterations overlap across stages (stage 0 of N+1 while stage 1 runs N);
* overlapped_starts  busy periods of stage 0 that began while the last stage was busy (stage 0
                 starting iteration N+1 while the last stage still runs N), of stage0_periods.

On CPU the mesh's devices are virtual (`--xla_force_host_platform_device_count`, set here
when jax is not imported yet) and share the machine's cores: overlap shows the stages running
concurrently, not that they get faster. See docs/benchmarks.md.
"""
from __future__ import annotations

import glob
import json
import math
import os
import tempfile
import time
from pathlib import Path

from ..cli.flags import add_engine_flags


def add_parser(wsub) -> None:
    w = wsub.add_parser("stages", help="per-device activity of pipeline stages (profiled)",
                        description=__doc__.splitlines()[0])
    w.add_argument("--preset", default="gpt2-small", help="shape of the random model")
    w.add_argument("--hf-model", default=None, help="a Hugging Face GPT-2 directory instead")
    w.add_argument("--meshes", default="data=1;tensor=2;pipeline=2", help="';'-separated mesh specs")
    w.add_argument("--requests", type=int, default=32)
    w.add_argument("--prompt-len", default="64")
    w.add_argument("--output-len", default="32")
    w.add_argument("--profile-requests", type=int, default=16, help="requests in the profiled run")
    w.add_argument("--profile-output-len", type=int, default=8)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--out", default="bench-results/stages", help="results folder")
    add_engine_flags(w)
    w.set_defaults(fn=cmd_stages, max_batch_size=32, layout="megatron")


def cmd_stages(args) -> int:
    specs = [s.strip() for s in args.meshes.split(";") if s.strip()]
    from ..sharding.mesh import parse_mesh_spec
    need = max(math.prod(parse_mesh_spec(s).values()) for s in specs)
    import jax
    if "device_count" not in os.environ.get("XLA_FLAGS", ""):
        try:  # virtual CPU devices for the meshes (no effect on GPUs); only before JAX starts
            jax.config.update("jax_num_cpu_devices", max(need, jax.config.jax_num_cpu_devices))
        except RuntimeError:
            pass  # already started: make_mesh says how many devices there are

    from ..sharding.mesh import make_mesh
    from . import workloads
    from .metrics import summarize
    from .run import converted_checkpoint, engine_config, random_hf_checkpoint
    from .systems import Clock, EngineSystem

    hf_dir = args.hf_model or random_hf_checkpoint(args.preset)
    ckpt = converted_checkpoint(hf_dir)
    from ..checkpoints.store import load_config
    vocab = load_config(ckpt).vocab_size
    trace = workloads.offline(args.requests, args.prompt_len, args.output_len, vocab, args.seed)
    short = workloads.offline(args.profile_requests, args.prompt_len, str(args.profile_output_len),
                              vocab, args.seed + 1)
    ec = engine_config(args, trace)
    results = []
    for spec in specs:
        t0 = time.perf_counter()
        system = EngineSystem(spec, ckpt, ec, dtype=args.dtype, mesh=make_mesh(spec), layout=args.layout)
        system.warm(trace)
        print(f"[{spec}] ready in {time.perf_counter() - t0:.0f} s", flush=True)
        records, info = system.run(trace, Clock())
        metrics = summarize(records)
        with tempfile.TemporaryDirectory() as d:
            jax.profiler.start_trace(d)
            system.run(short, Clock())
            jax.profiler.stop_trace()
            activity = stage_activity(_xplane(d), _stage_devices(system.engine))
        row = {"mesh": spec, "layout": args.layout, "stages": system.engine.runner.n_stages,
               "output_throughput": metrics["output_throughput"],
               "mean_batch_size": info["mean_batch_size"], "iterations": info["iterations"], **activity}
        results.append(row)
        print(f"[{spec}] {row['output_throughput']:.1f} out tok/s, mean batch {row['mean_batch_size']:.1f}; "
              f"busy per stage {[round(b, 2) for b in row['busy']]}, overlap {row['overlap']:.2f}, "
              f"stage-0 starts during the last stage {row['overlapped_starts']}/{row['stage0_periods']}", flush=True)
        system.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"preset": args.preset, "hf_model": args.hf_model,
                                                  "devices": str(jax.devices()[0].platform),
                                                  "results": results}, indent=2))
    print(f"wrote {out / 'results.json'}")
    return 0


def _xplane(trace_dir: str) -> str:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
    return paths[-1]


def _stage_devices(engine) -> list[set[int]]:
    return [{d.id for d in st.mesh.devices.flat} for st in engine.runner.stages]


def program_runs(xplane_path: str) -> list[tuple[int, float, float]]:
    """(device id, start s, end s) of every program execution in a profiler trace: the span of
    the events XLA tags with the same (device_ordinal, run_id)."""
    import jax
    spans: dict[tuple[int, int], list[float]] = {}
    for plane in jax.profiler.ProfileData.from_file(xplane_path).planes:
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                if "device_ordinal" not in stats or "run_id" not in stats:
                    continue
                key = (int(stats["device_ordinal"]), int(stats["run_id"]))
                s, t = e.start_ns / 1e9, (e.start_ns + e.duration_ns) / 1e9
                span = spans.setdefault(key, [s, t])
                span[0], span[1] = min(span[0], s), max(span[1], t)
    return sorted((dev, s, t) for (dev, _), (s, t) in spans.items())


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, t in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], t)
        else:
            out.append([s, t])
    return [(s, t) for s, t in out]


def _length(intervals) -> float:
    return sum(t - s for s, t in intervals)


def stage_activity(xplane_path: str, stage_devices: list[set[int]]) -> dict:
    """`stage_activity_from_runs` of a profiler trace."""
    return stage_activity_from_runs(program_runs(xplane_path), stage_devices)


def stage_activity_from_runs(runs: list[tuple[int, float, float]], stage_devices: list[set[int]]) -> dict:
    """Busy fraction of each stage, the fraction of time two or more stages are busy, and how
    many busy periods of stage 0 began while the last stage was busy."""
    per_stage = [_union([(s, t) for d, s, t in runs if d in devs]) for devs in stage_devices]
    if not any(per_stage):
        raise RuntimeError("the profile holds no program executions on the stages' devices")
    start = min(iv[0][0] for iv in per_stage if iv)
    end = max(iv[-1][1] for iv in per_stage if iv)
    window = end - start
    # time covered by >= 2 stages: sweep over the union boundaries
    edges = sorted([(s, 1) for iv in per_stage for s, _ in iv] + [(t, -1) for iv in per_stage for _, t in iv])
    depth, last, both = 0, start, 0.0
    for x, step in edges:
        if depth >= 2:
            both += x - last
        depth, last = depth + step, x
    first, final = per_stage[0], per_stage[-1]
    overlapped = sum(any(s2 < s < t2 for s2, t2 in final) for s, _ in first) if len(per_stage) > 1 else 0
    return {"window_s": window, "busy": [_length(iv) / window for iv in per_stage],
            "overlap": both / window, "overlapped_starts": overlapped, "stage0_periods": len(first)}
