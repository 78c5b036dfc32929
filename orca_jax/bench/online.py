"""`orca-jax bench online`: vLLM's own serving client against `orca-jax serve` and vLLM's server.

    orca-jax bench online --preset gpt2-small --rates 0.2,0.4,0.8 --systems orca,vllm

The same seeded trace (vLLM's `random` dataset: input 272 ± 88 %, output 64 ± 88 % tokens by
default, Poisson arrivals, greedy, EOS ignored) is sent by `vllm bench serve`
(`vllm_client.py`, under `--vllm-python`) to each server's OpenAI `/v1/completions`, one rate
after the other; each server is started once (a subprocess on a free port), waited for on
`/health`, and stopped. Both serve the same checkpoint: `--hf-model`, or a random-weight
`--preset` saved by `transformers` with the demo model's tokenizer (the client needs one),
converted for orca-jax. Reported per system and rate: vLLM's TTFT / TPOT / ITL / E2EL
percentiles, request and output throughput, and Orca's normalized latency (each request's
end-to-end latency over its output tokens, from the client's per-request latencies); then the
paper's figure (throughput vs median normalized latency) and the highest throughput of each
system whose median normalized latency stays within the SLO (default: 2x vLLM's at the
lowest rate, else orca-jax's). vLLM is needed for its client: install its CPU build as
docs/benchmarks.md says.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..cli.flags import add_engine_flags, engine_fields, off_flag
from . import report

CLIENT = Path(__file__).with_name("vllm_client.py")  # runs under vLLM's Python
SYSTEMS = {"orca": "orca-jax (iteration-level, OpenAI HTTP)", "vllm": "vLLM-CPU (its OpenAI server)"}
SLO_FACTOR = 2.0  # the SLO: this many times the reference's median normalized latency at the lowest rate


def add_parser(workloads) -> None:
    """Registers `online` on `orca-jax bench`'s subcommands."""
    w = workloads.add_parser("online", help="vLLM's `vllm bench serve` client against orca-jax's and "
                                            "vLLM's OpenAI servers: a rate sweep",
                             description=__doc__.splitlines()[0])
    g = w.add_argument_group("model")
    g.add_argument("--hf-model", default=None, help="Hugging Face model directory with tokenizer files; "
                                                    "default: a random-weight --preset model")
    g.add_argument("--preset", default="gpt2-small", help="shape of the random model (orca_jax.models.PRESETS)")
    g = w.add_argument_group("workload (vLLM's random dataset)")
    g.add_argument("--rates", default="0.2,0.4,0.8", help="comma list of Poisson arrival rates (req/s)")
    g.add_argument("--num-prompts", type=int, default=40)
    g.add_argument("--input-len", type=int, default=272)
    g.add_argument("--output-len", type=int, default=64)
    g.add_argument("--range-ratio", type=float, default=0.88, help="lengths uniform in len x (1 ± ratio)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--slo", type=float, default=None, help="median normalized latency SLO (ms/token); "
                   f"default {SLO_FACTOR:g}x vLLM's (else orca-jax's) at the lowest rate")
    g = w.add_argument_group("systems")
    g.add_argument("--systems", default="orca,vllm", help=f"comma list of {','.join(SYSTEMS)}")
    g.add_argument("--vllm-python", default="/tmp/peer-vllm/bin/python",
                   help="python of a venv with vLLM's CPU build: runs the client and vLLM's server")
    g.add_argument("--vllm-kv-gib", type=float, default=4, help="VLLM_CPU_KVCACHE_SPACE for vLLM's server")
    g.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for a server's /health")
    g = w.add_argument_group("output")
    g.add_argument("--out", default="bench-results/online", help="results folder")
    add_engine_flags(w)
    w.set_defaults(fn=cmd_online)


def serve_flags(args) -> list[str]:
    """The engine flags given on this command line, for `orca-jax serve`."""
    out = []
    for f, kind in engine_fields():
        v = getattr(args, f.name)
        if v == f.default:
            continue
        if kind is bool:
            out.append(off_flag(f.name) if not v else "")
        else:
            out += ["--" + f.name.replace("_", "-"), str(v)]
    for name in ("dtype", "mesh"):
        if getattr(args, name):
            out += [f"--{name}", getattr(args, name)]
    return [x for x in out if x] + ["--layout", args.layout]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was healthy; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the server was not healthy after {timeout:.0f} s; see {log}")


def server_command(system: str, args, hf_dir: str, ckpt: str, port: int) -> tuple[list[str], dict]:
    """(argv, environment) of one system's server, serving the model as `hf_dir` (the name the
    client asks for)."""
    env = dict(os.environ)
    if system == "orca":
        return ([sys.executable, "-m", "orca_jax.cli", "serve", "--model", ckpt, "--served-model-name", hf_dir,
                 "--http-port", str(port), "--grpc-port", str(_free_port()), *serve_flags(args)], env)
    env["VLLM_CPU_KVCACHE_SPACE"] = f"{args.vllm_kv_gib:g}"
    longest = int(args.input_len * (1 + args.range_ratio)) + int(args.output_len * (1 + args.range_ratio)) + 8
    return ([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_dir, "--dtype", "float32",
             "--max-model-len", str(max(longest, 256)), "--port", str(port)], env)


def client_command(args, hf_dir: str, port: int, rate: float, out_dir: Path, name: str) -> list[str]:
    """`vllm bench serve` on the random dataset at `rate`, per-request timings saved. The client
    runs in /tmp (away from a source tree it could import from), so its result folder is absolute."""
    return [args.vllm_python, str(CLIENT), "--backend", "vllm", "--model", hf_dir, "--tokenizer", hf_dir,
            "--base-url", f"http://127.0.0.1:{port}", "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--random-range-ratio", str(args.range_ratio), "--num-prompts", str(args.num_prompts),
            "--request-rate", f"{rate:g}", "--seed", str(args.seed), "--ignore-eos", "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--save-detailed", "--result-dir", str(Path(out_dir).resolve()), "--result-filename", name]


def normalized_latency_ms(result: dict) -> dict | None:
    """Orca's normalized latency from the client's per-request timings: end-to-end latency /
    output tokens, per successful request (output tokens > 0); median and p90."""
    import numpy as np
    per = [lat / n * 1e3 for lat, n in zip(result.get("latencies", []), result.get("output_lens", [])) if n and lat]
    if not per:
        return None
    return {"median": float(np.median(per)), "p90": float(np.percentile(per, 90))}


def run_result(system: str, rate: float, result: dict) -> dict:
    """One sweep point in the form bench/report.py reads."""
    m = {k: result.get(k) for k in ("completed", "request_throughput", "output_throughput", "duration")}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        m[f"{metric}_ms"] = {"median": result.get(f"median_{metric}_ms"), "p99": result.get(f"p99_{metric}_ms")}
    m["normalized_latency_ms"] = normalized_latency_ms(result)
    return {"system": system, "rate": rate, "metrics": m}


def ensure_tokenizer(hf_dir: str) -> None:
    """The client samples prompts through the model's tokenizer: a random-weight preset gets
    the demo model's (4096 tokens, all inside every preset's vocabulary)."""
    d = Path(hf_dir)
    if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file():
        return
    from ..demo_model import ensure_demo_model
    demo = Path(ensure_demo_model())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(demo / f, d / f)


def sweep(system: str, args, hf_dir: str, ckpt: str, rates: list[float], out: Path) -> list[dict]:
    port = _free_port()
    argv, env = server_command(system, args, hf_dir, ckpt, port)
    log = out / f"{system}-serve.log"
    print(f"{system}: starting {' '.join(argv[:6])} ... (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            t0 = time.monotonic()
            _wait_healthy(port, proc, args.startup_timeout, log)
            print(f"{system}: healthy after {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
            runs = []
            for rate in rates:
                name = f"{system}-rate{rate:g}.json"
                cmd = client_command(args, hf_dir, port, rate, out, name)
                done = subprocess.run(cmd, cwd="/tmp", capture_output=True, text=True)
                (out / f"{system}-rate{rate:g}-client.log").write_text(done.stdout + done.stderr)
                if done.returncode or not (out / name).is_file():
                    raise RuntimeError(f"vllm bench serve at rate {rate:g} against {system} exited with "
                                       f"{done.returncode} and left no {out / name}; its output is in "
                                       f"{out / name.replace('.json', '-client.log')}:\n{done.stderr[-2000:]}")
                runs.append(run_result(system, rate, json.loads((out / name).read_text())))
                m = runs[-1]["metrics"]
                print(f"{system} @ {rate:g} req/s: {m['completed']} done, {m['request_throughput']:.2f} req/s, "
                      f"TPOT p50 {m['tpot_ms']['median']:.0f} ms, E2EL p50 {m['e2el_ms']['median']:.0f} ms",
                      file=sys.stderr, flush=True)
            return runs
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def table(runs: list[dict]) -> str:
    rows = ["| system | rate (req/s) | done | req/s | out tok/s | TTFT p50 | TPOT p50 | ITL p50 | ITL p99 | "
            "E2EL p50 | norm. latency p50 (ms/tok) |", "|" + "---|" * 11]
    for r in runs:
        m, f = r["metrics"], report._f
        rows.append(f"| {SYSTEMS[r['system']]} | {r['rate']:g} | {m['completed']} | {f(m['request_throughput'], '{:.2f}')} "
                    f"| {f(m['output_throughput'])} | {f(m['ttft_ms']['median'], '{:.0f}')} | "
                    f"{f(m['tpot_ms']['median'], '{:.0f}')} | {f(m['itl_ms']['median'], '{:.0f}')} | "
                    f"{f(m['itl_ms']['p99'], '{:.0f}')} | {f(m['e2el_ms']['median'], '{:.0f}')} | "
                    f"{f(report._median(m['normalized_latency_ms']))} |")
    return "\n".join(rows)


def cmd_online(args) -> int:
    from .run import converted_checkpoint, git_commit, random_hf_checkpoint
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        raise ValueError(f"unknown systems {bad}; choose from {', '.join(SYSTEMS)}")
    if not os.path.exists(args.vllm_python):
        raise ValueError(f"{args.vllm_python} not found: `bench online` drives the servers with vLLM's own "
                         "client (`vllm bench serve`); install vLLM's CPU build (docs/benchmarks.md, "
                         "'Peers') or give --vllm-python")
    rates = sorted(float(r) for r in args.rates.split(",") if r)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = str(Path(args.hf_model or random_hf_checkpoint(args.preset)).resolve())
    if args.hf_model is None:
        ensure_tokenizer(hf_dir)
    ckpt = converted_checkpoint(hf_dir)
    runs = [r for s in systems for r in sweep(s, args, hf_dir, ckpt, rates, out)]
    curves = report.curves(runs)
    ref = "vllm" if "vllm" in curves else systems[0]
    lowest = curves[ref][0]["median_normalized_latency_ms"]
    slo, source = (args.slo, "--slo") if args.slo else (SLO_FACTOR * lowest, f"{SLO_FACTOR:g}x {ref}'s at "
                                                        f"{curves[ref][0]['rate']:g} req/s ({lowest:.1f} ms/token)")
    summary = report.sweep_summary(runs, slo)
    summary["slo_source"] = source
    rep = {"schema": report.SCHEMA, "command": " ".join(["orca-jax", "bench", "online", *sys.argv[3:]]),
           "commit": git_commit(), "hf_dir": hf_dir, "checkpoint": ckpt, "serve_flags": serve_flags(args),
           "runs": runs, "sweep": summary}
    report.write_json(rep, out / "results.json")
    report.plot_sweep(summary, SYSTEMS, f"bench online: {Path(hf_dir).name}, vLLM's random dataset "
                      f"({args.input_len}/{args.output_len} tokens ± {args.range_ratio:g})", out / "online.png")
    print(table(runs))
    print()
    print(report.sweep_text(summary, SYSTEMS))
    print(f"\nresults: {out / 'results.json'}  plot: {out / 'online.png'}")
    return 0
