"""`orca-jax bench {offline,orca,sharegpt-like}`: one command, every system, one report.

    1. checkpoint: --hf-model, or a random-weight --preset saved once by transformers; the
       same weights are converted for orca-jax, so every system runs the same checkpoint
    2. trace: generated from the seed (or --trace FILE) and saved as DIR/trace.json
    3. the machine's fp32 matmul ceiling, measured now (for MFU)
    4. each system in turn: build, warm up, run the trace (offline) or every rate of the sweep
       (online), release it; a progress bar per run
    5. DIR/results.json, DIR/<workload>.png, and Markdown tables on stdout
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import shutil
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ..cli.flags import add_engine_flags, engine_fields, off_flag
from ..cli.flags import engine_config as flag_config
from . import report, workloads
from .metrics import parse_slos, request_flops, summarize, summarize_aggregate
from .systems import (SYSTEMS, VLLM_DRIVER, Clock, EngineSystem, HFSystem, matmul_ceiling_gflops,
                      passive_omp, run_vllm_offline, vllm_skip_reason)

ENGINE_EPILOG = ("Engine flags apply to both orca-jax systems alike, with the engine's defaults; "
                 "--max-model-len defaults to the longest prompt + output. --policy and --no-warmup "
                 "are ignored: each system sets its policy and every engine is warmed up before "
                 "timing. See docs/benchmarks.md.")
DEFAULT_SYSTEMS = {"offline": "orca,static,hf,vllm", "orca": "orca,static,hf", "sharegpt-like": "orca,static,hf",
                   "shared-prefix": "orca,orca-nocache"}
# The orca-jax systems: the engine flags with these changes.
ENGINE_SYSTEMS = {"orca": {}, "static": {"policy": "static"}, "orca-reserve": {"kv_admission": "reserve"},
                  "orca-nocache": {"enable_prefix_caching": False}}


def add_parser(sub):
    """`orca-jax bench WORKLOAD`; returns the workloads' subparsers (`stages` joins them)."""
    p = sub.add_parser("bench", help="compare orca-jax with baselines (offline throughput, online rate sweeps)",
                       description="Benchmarks: offline / orca / sharegpt-like compare every system on one "
                                   "seeded trace; stages and latency measure orca-jax alone. See "
                                   "docs/benchmarks.md.")
    wsub = p.add_subparsers(dest="workload", required=True)
    helps = {"offline": "N requests at t=0 (the peers' workload): tokens/s of every system",
             "orca": "the Orca paper's trace (Poisson arrivals, uniform lengths): a rate sweep",
             "sharegpt-like": "Poisson arrivals, heavy-tailed (log-normal) lengths: a rate sweep",
             "shared-prefix": "Poisson arrivals of one system prompt + short questions: a rate sweep"}
    for kind in workloads.KINDS:
        w = wsub.add_parser(kind, help=helps[kind], description=helps[kind], epilog=ENGINE_EPILOG)
        g = w.add_argument_group("model")
        g.add_argument("--hf-model", default=None,
                       help="Hugging Face model directory (any supported family); default: a random-weight --preset model")
        g.add_argument("--preset", default="gpt2-small", help="shape of the random model (orca_jax.models.PRESETS: GPT-2 and Llama shapes)")
        g = w.add_argument_group("workload")
        g.add_argument("--requests", type=int, default=64 if kind == "offline" else 32)
        g.add_argument("--seed", type=int, default=0, help="seeds the trace (lengths, arrivals, token ids)")
        g.add_argument("--trace", default=None, help="replay a saved trace.json instead of generating one")
        if kind == "offline":
            g.add_argument("--prompt-len", default="128", help="N (fixed) or LO:HI (uniform)")
            g.add_argument("--output-len", default="64", help="N (fixed) or LO:HI (uniform)")
        else:
            g.add_argument("--rates", default="0.5,1,2,4", help="comma list of arrival rates (req/s) to sweep")
            g.add_argument("--slo", type=float, default=None,
                           help="median normalized latency SLO (ms/token) for the max-throughput "
                                f"comparison; default {report.AUTO_SLO_FACTOR:g}x orca's at the lowest rate")
            g.add_argument("--wall-clock", action="store_true",
                           help="sleep through idle gaps instead of skipping them (same timeline, slower)")
            g.add_argument("--max-tokens", type=int, default=None,
                           help="orca-jax systems: every request asks for this many tokens and stops "
                                "at its output length (as at an EOS): what reserve admission must "
                                "reserve (default: exactly its output length)")
        if kind == "orca":
            g.add_argument("--prompt-len", default="32:512", help="LO:HI uniform (the paper: 32:512)")
            g.add_argument("--output-len", default="1:128", help="LO:HI uniform (the paper: 1:128)")
        if kind == "shared-prefix":
            g.add_argument("--prefix-len", type=int, default=256, help="tokens of the shared system prompt")
            g.add_argument("--question-len", default="16:48", help="LO:HI uniform, after the prefix")
            g.add_argument("--output-len", default="16:64", help="LO:HI uniform")
        if kind == "sharegpt-like":
            g.add_argument("--prompt-median", type=float, default=96)
            g.add_argument("--output-median", type=float, default=48)
            g.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of both lengths")
            g.add_argument("--prompt-len", default="4:512", help="LO:HI clip range")
            g.add_argument("--output-len", default="1:256", help="LO:HI clip range")
        g = w.add_argument_group("systems")
        g.add_argument("--systems", default=DEFAULT_SYSTEMS[kind], help=f"comma list of {','.join(SYSTEMS)}")
        g.add_argument("--hf-batch-size", type=int, default=None, help="HF static batch size (default: --max-batch-size)")
        g.add_argument("--vllm-python", default="/tmp/peer-vllm/bin/python",
                       help="python of a venv with vLLM's CPU build (docs/benchmarks.md)")
        g = w.add_argument_group("output")
        g.add_argument("--out", default=None, help="results folder (default: bench-results/<workload>)")
        g.add_argument("--plot", default=None, help="PNG path (default: <out>/<workload>.png)")
        g.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                       help="SLOs for goodput, as vLLM's --goodput: ttft, tpot, e2el, norm (normalized "
                            "latency); online default: norm:<the sweep's SLO>")
        g.add_argument("--no-progress", dest="progress", action="store_false")
        add_engine_flags(w)
        w.set_defaults(fn=cmd_bench)
    return wsub


# -- set-up ------------------------------------------------------------------------------------

def random_hf_checkpoint(preset: str, seed: int = 0) -> str:
    """A random-weight HF model of a preset's shape (transformers' init), saved once: GPT-2
    presets as GPT2LMHeadModel, the Llama-shaped ones (models/decoder.py) as LlamaForCausalLM."""
    from ..demo_model import orca_home
    from ..models import PRESETS
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    home = orca_home()
    path = home / f"hf-random-{preset}-seed{seed}"
    if (path / "config.json").exists():
        return str(path)
    import torch
    import transformers
    c = PRESETS[preset]
    torch.manual_seed(seed)
    if c.architecture == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id))
    else:
        assert c.model_type == "llama", c.model_type
        rope = {"rope_type": "default", **c.rope, "rope_theta": c.rope_theta}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, max_position_embeddings=c.max_positions,
            rms_norm_eps=c.norm_eps, rope_parameters=rope, tie_word_embeddings=c.tie_embeddings,
            bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id))
    _build_once(path, lambda d: model.save_pretrained(d, safe_serialization=True))
    return str(path)


def _build_once(target: Path, build) -> None:
    """`build(folder)` in a temporary folder beside `target`, then one rename: a concurrent
    first run keeps one complete copy, and the temporary folder never stays behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        work = tmp / target.name
        build(work)
        work.chmod(0o755)  # mkdtemp-like permissions would hide it from other users
        try:
            os.replace(work, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_checkpoint(hf_dir: str) -> str:
    """The orca-jax conversion of `hf_dir`, cached by path and file times."""
    from ..checkpoints.hf import convert_hf
    from ..demo_model import orca_home
    src = Path(hf_dir).resolve()
    key = hashlib.sha1(str(src).encode())
    for f in sorted(src.iterdir()):
        key.update(f"{f.name}:{f.stat().st_mtime_ns}".encode())
    out = orca_home() / "bench-checkpoints" / f"{src.name}-{key.hexdigest()[:10]}"
    if not (out / "config.json").exists():
        _build_once(out, lambda d: convert_hf(src, d, progress=False))
    return str(out)


def make_trace(args, vocab_size: int) -> workloads.Trace:
    if args.trace:
        t = workloads.Trace.load(args.trace)
        if t.kind != args.workload:
            raise ValueError(f"{args.trace} is a {t.kind!r} trace, not {args.workload!r}")
        return t
    if args.workload == "offline":
        return workloads.offline(args.requests, args.prompt_len, args.output_len, vocab_size, args.seed)
    if args.workload == "orca":
        return workloads.orca(args.requests, vocab_size, args.seed, args.prompt_len, args.output_len)
    if args.workload == "shared-prefix":
        return workloads.shared_prefix(args.requests, vocab_size, args.seed, args.prefix_len,
                                       args.question_len, args.output_len)
    return workloads.sharegpt_like(args.requests, vocab_size, args.seed, args.prompt_median,
                                   args.output_median, args.sigma, args.prompt_len, args.output_len)


def engine_config(args, trace: workloads.Trace, system: str = "orca"):
    """The EngineConfig of an orca-jax system: the engine flags, with the waiting queue and the
    context length fitted to the trace, and the system's own changes (ENGINE_SYSTEMS). The
    static policy forms a whole batch of up to max_batch_size requests and prefills it over as
    many iterations as the token budget needs, so the engine's defaults serve every system."""
    longest = max(trace.max_total_len, trace.max_prompt_len + (getattr(args, "max_tokens", None) or 0))
    fitted = dict(policy="iteration", max_waiting=max(args.max_waiting, len(trace)),
                  max_model_len=args.max_model_len or longest, warmup=True)
    return dataclasses.replace(flag_config(args), **(fitted | ENGINE_SYSTEMS[system]))


def command_line(args) -> str:
    """The full command, every default spelled out, so a run can be repeated exactly."""
    skip = {"fn", "cmd", "workload", "verbose", "progress", "warmup", "policy"}  # per system, or no effect
    on_by_default = {f.name for f, kind in engine_fields() if kind is bool}  # flags --no-X
    parts = ["orca-jax", "bench", args.workload]
    for k, v in sorted(vars(args).items()):
        if k in on_by_default and k not in skip:
            if v is False:
                parts.append(off_flag(k))
            continue
        if k in skip or v is None or v is False or v == []:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif isinstance(v, list):
            parts += [flag, *map(str, v)]
        else:
            parts += [flag, str(v)]
    return shlex.join(parts)


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


def machine_info(ceiling: dict) -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import jax
    info = {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "matmul_gflops": ceiling}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def _progress(args, total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=not args.progress,
                dynamic_ncols=True)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the command -------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    import logging
    logging.getLogger("orca_jax").setLevel(logging.WARNING)  # the report says it all
    omp_set_here = passive_omp()  # before anything imports torch
    online = args.workload != "offline"
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    slos = parse_slos(args.goodput)
    rates = [float(r) for r in args.rates.split(",")] if online else [None]
    if online and min(rates) <= 0:
        raise ValueError(f"--rates must be positive numbers, got {args.rates!r}")
    out_dir = Path(args.out or Path("bench-results") / args.workload)
    out_dir.mkdir(parents=True, exist_ok=True)

    hf_dir, ckpt, cfg, base = _prepare(args, out_dir)
    _log("measuring the fp32 matmul ceiling ...")
    ceiling = matmul_ceiling_gflops()
    runs, described, timelines = _run_in_process(args, [s for s in systems if s != "vllm"], rates,
                                                 hf_dir, ckpt, base, slos)
    if "vllm" in systems:  # the peer runs with the caller's own environment
        env = {k: v for k, v in os.environ.items() if not (omp_set_here and k == "OMP_WAIT_POLICY")}
        r = _run_vllm(args, hf_dir, base, env)
        if r is not None:
            runs.append(r)
            described["vllm"] = {"script": r["info"].pop("script"), "python": args.vllm_python}
    if not runs:
        raise ValueError("no system produced a result")
    flops = {}
    for r in runs:
        key = tuple(r.pop("lengths"))
        if key not in flops:
            flops[key] = sum(request_flops(cfg, p, o) for p, o in key)
        r["model_flops"] = flops[key]
        r["achieved_gflops"] = flops[key] / r["metrics"]["duration_s"] / 1e9
        r["mfu"] = r["achieved_gflops"] / ceiling["ceiling"]

    sweep = report.sweep_summary(runs, args.slo) if online else None
    if online and not slos:  # goodput against the sweep's SLO, request by request
        for r, records in zip(runs, timelines):
            r["metrics"]["goodput"] = summarize(records, {"norm": sweep["slo_normalized_latency_ms"]})["goodput"]
    rep = {
        "schema": report.SCHEMA, "command": command_line(args),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "machine": machine_info(ceiling),
        "model": {"hf_dir": hf_dir, "checkpoint": ckpt, "preset": None if args.hf_model else args.preset,
                  "params": cfg.num_params(), "dtype": args.dtype or cfg.dtype, "model_type": cfg.model_type,
                  "n_layer": cfg.num_layers, "n_embd": cfg.hidden_size, "n_head": cfg.num_heads,
                  "n_kv_head": cfg.num_kv_heads, "vocab_size": cfg.vocab_size},
        "workload": {**base.summary(), "rates": rates if online else None,
                     "trace_file": str(out_dir / "trace.json")},
        "engine": dataclasses.asdict(engine_config(args, base))
        | {"per_system": ENGINE_SYSTEMS, "mesh": args.mesh or "one device", "layout": args.layout},
        "systems": described, "runs": runs, "sweep": sweep}
    report.write_json(rep, out_dir / "results.json")
    _print_report(args, rep, base, out_dir)
    return 0


def _prepare(args, out_dir: Path):
    """The HF checkpoint, its orca-jax conversion, its config, and the saved trace."""
    from ..checkpoints.store import load_config
    hf_dir = args.hf_model or random_hf_checkpoint(args.preset)
    _log(f"model: {hf_dir}")
    ckpt = converted_checkpoint(hf_dir)
    cfg = load_config(ckpt)
    base = make_trace(args, cfg.vocab_size)
    if base.max_total_len > cfg.max_positions:
        raise ValueError(f"the trace needs {base.max_total_len} positions (prompt + output) but the model "
                         f"has {cfg.max_positions}; lower --prompt-len/--output-len")
    if base.max_prompt_len + (getattr(args, "max_tokens", None) or 0) > cfg.max_positions:
        raise ValueError(f"--max-tokens {args.max_tokens} after a {base.max_prompt_len}-token prompt is "
                         f"over the model's {cfg.max_positions} positions")
    if max(t for r in base.requests for t in r.prompt_ids) >= cfg.vocab_size:
        raise ValueError(f"the trace has token ids outside the model's vocabulary ({cfg.vocab_size})")
    base.save(out_dir / "trace.json")
    return hf_dir, ckpt, cfg, base


def _run_in_process(args, names, rates, hf_dir, ckpt, base, slos):
    """Build and warm every in-process system, then run them rate by rate, interleaved, so a
    change in the machine's background load mid-run hits all systems alike."""
    from ..cli.flags import placement
    mesh, layout = placement(args)
    built, described = {}, {}
    for name in names:
        _log(f"{name}: building {SYSTEMS[name]} ...")
        t0 = time.perf_counter()
        if name in ENGINE_SYSTEMS:
            built[name] = EngineSystem(name, ckpt, engine_config(args, base, name), dtype=args.dtype,
                                       mesh=mesh, layout=layout, max_tokens=getattr(args, "max_tokens", None))
        else:
            built[name] = HFSystem(hf_dir, args.hf_batch_size or args.max_batch_size)
        built[name].warm(base)
        described[name] = built[name].describe()
        _log(f"{name}: ready in {time.perf_counter() - t0:.0f} s (load, compile, warm-up)")
    runs, timelines = [], []
    for rate in rates:
        trace = base if rate is None else base.at_rate(rate)
        for name, system in built.items():
            desc = name + (f" @ {rate:g} req/s" if rate is not None else "")
            with _progress(args, len(trace), desc) as bar:
                records, info = system.run(trace, Clock(skip_idle=not getattr(args, "wall_clock", False)), bar)
            runs.append({"system": name, "label": SYSTEMS[name], "rate": rate,
                         "metrics": summarize(records, slos), "info": info,
                         "lengths": [(r.prompt_len, r.output_len) for r in records if r.completed]})
            timelines.append(records)
    for system in built.values():
        system.close()
    built.clear()
    gc.collect()
    order = sorted(range(len(runs)), key=lambda i: list(SYSTEMS).index(runs[i]["system"]))  # stable
    return [runs[i] for i in order], described, [timelines[i] for i in order]


def _run_vllm(args, hf_dir: str, base: workloads.Trace, env: dict) -> dict | None:
    why = vllm_skip_reason(args.vllm_python, base)
    if why:
        _log(f"vllm: skipped: {why}")
        return None
    _log(f"vllm: running {VLLM_DRIVER.name} under {args.vllm_python} (it starts its own engine: minutes) ...")
    t0 = time.perf_counter()
    try:
        r = run_vllm_offline(args.vllm_python, hf_dir, base, env)
    except RuntimeError as e:
        _log(f"vllm: failed: {e}")
        return None
    n_in = sum(q.prompt_len for q in base.requests)
    return {"system": "vllm", "label": SYSTEMS["vllm"], "rate": None,
            "metrics": summarize_aggregate(r["seconds"], r["requests"], n_in, r["output_tokens"]),
            "info": {"peer_output": r, "wall_seconds": time.perf_counter() - t0, "script": str(VLLM_DRIVER)},
            "lengths": [(q.prompt_len, q.output_len) for q in base.requests]}


def _print_report(args, rep: dict, base: workloads.Trace, out_dir: Path) -> None:
    online, runs, sweep = rep["sweep"] is not None, rep["runs"], rep["sweep"]
    labels = dict(SYSTEMS)
    model_name = rep["model"]["preset"] or Path(rep["model"]["hf_dir"]).name
    title = (f"{model_name} ({rep['model']['dtype']}), {args.workload}, {len(base)} requests; "
             f"{os.cpu_count()} CPUs; {rep['date'][:10]}")
    plot = Path(args.plot or out_dir / f"{args.workload}.png")
    try:
        if online:
            report.plot_sweep(sweep, labels, title, plot)
        else:
            report.plot_offline(runs, title, plot)
    except ImportError:
        _log("no plot: matplotlib is not installed (pip install 'orca-jax[bench]')")
        plot = None
    p, o, c = rep["workload"]["prompt_len"], rep["workload"]["output_len"], rep["machine"]["matmul_gflops"]
    print(f"\n## orca-jax bench {args.workload}: {model_name}, {len(base)} requests "
          f"(prompt {p['min']}-{p['max']}, output {o['min']}-{o['max']} tokens)\n")
    print(f"fp32 matmul ceiling: {c['ceiling']:.0f} GFLOP/s (XLA {c['xla']:.0f}"
          + (f", torch {c['torch']:.0f}" if c["torch"] else "") + ")\n")
    print(report.sweep_table(runs) if online else report.offline_table(runs))
    if online:
        print("\n" + report.sweep_text(sweep, labels))
    print(f"\nresults: {out_dir / 'results.json'}  trace: {out_dir / 'trace.json'}  plot: {plot or '-'}")


