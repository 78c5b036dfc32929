"""`orca-jax bench offline`: throughput of orca-jax against baselines on one checkpoint.

The offline workload is the one of ../shared/peers/vllm_cpu_offline.py: N requests at t=0,
random prompt token ids (seeded), greedy, EOS ignored, so every request makes exactly
--output-len tokens. Systems, measured one after the other in one run on the same weights:

  orca     orca-jax, iteration-level scheduling (Orca)
  static   orca-jax, request-level static batching (the paper's baseline policy)
  hf       Hugging Face `generate` in static batches of --hf-batch-size (CPU torch)
  vllm     vLLM's CPU build through ../shared/peers, when installed (--vllm-python)

Each system gets a warm-up run first (compiles, caches), then the timed run. Besides tokens/s
it prints the model FLOPs utilisation against this machine's fp32 matmul ceiling, measured in
the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure throughput against baselines")
    bsub = p.add_subparsers(dest="workload", required=True)
    o = bsub.add_parser("offline", help="N requests at t=0, fixed lengths (the peers' workload)")
    o.add_argument("--hf-model", default=None,
                   help="Hugging Face GPT-2 directory; default: a random-weight --preset model")
    o.add_argument("--preset", default="gpt2-small", help="shape of the random model (models.gpt2.PRESETS)")
    o.add_argument("--requests", type=int, default=64)
    o.add_argument("--prompt-len", type=int, default=128)
    o.add_argument("--output-len", type=int, default=64)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--systems", default="orca,static,hf", help="comma list of orca,static,hf,vllm")
    o.add_argument("--hf-batch-size", type=int, default=16)
    o.add_argument("--vllm-python", default="/tmp/peer-vllm/bin/python",
                   help="python of a vLLM CPU venv (../shared/peers/setup_vllm_cpu.sh)")
    o.add_argument("--out", default=None, help="write the results as JSON here")
    from .cli import add_engine_flags
    add_engine_flags(o)
    o.set_defaults(fn=cmd_offline)


def random_hf_checkpoint(preset: str, seed: int = 0) -> str:
    """A random-weight HF GPT-2 of a preset's shape, saved once under the cache folder."""
    from .demo_model import orca_home
    from .models.gpt2 import PRESETS
    home = str(orca_home())
    path = os.path.join(home, f"hf-random-{preset}-seed{seed}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    c = PRESETS[preset]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.n_positions,
                                       n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head))
    tmp = tempfile.mkdtemp(dir=home if os.path.isdir(home) else None)
    model.save_pretrained(tmp, safe_serialization=True)
    os.makedirs(home, exist_ok=True)
    os.replace(tmp, path)
    return path


def workload(n: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Same draws as the peers' script: random.Random(seed).randrange(vocab) per token."""
    import random
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(n)]


def matmul_ceiling_gflops(n: int = 1024, reps: int = 10) -> float:
    """fp32 GEMM throughput through XLA on this machine (the roofline's compute roof)."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, 768 * 4), jnp.float32)
    b = jnp.ones((768 * 4, 768), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * a.shape[1] * b.shape[1] / best / 1e9


def model_flops(cfg, n_req: int, prompt_len: int, output_len: int) -> float:
    """Matmul FLOPs of the workload: 2 x weights per token, the LM head only on sampled
    rows, attention scores and values over each token's context."""
    D, L, F, V = cfg.n_embd, cfg.n_layer, cfg.mlp_dim, cfg.vocab_size
    per_token = 2 * L * (4 * D * D + 2 * D * F)
    tokens = n_req * (prompt_len + output_len - 1)
    ctx = sum(range(1, prompt_len + output_len)) * n_req  # sum over tokens of context length
    return per_token * tokens + 2 * V * D * n_req * output_len + 4 * L * D * ctx


def run_engine(ckpt: str, args, policy: str, prompts) -> dict:
    from .cli import engine_config
    from .engine import Engine
    from .request import SamplingParams
    import dataclasses
    cfg = dataclasses.replace(engine_config(args), policy=policy,
                              max_model_len=args.max_model_len or args.prompt_len + args.output_len)
    eng = Engine.from_checkpoint(ckpt, cfg, dtype=args.dtype)
    sp = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    def go(ps):
        for p in ps:
            eng.add_request(p, sp)
        n = 0
        while eng.has_unfinished():
            n += sum(len(o.token_ids) for o in eng.step())
        return n

    go(prompts[:4])  # warm-up of the host path
    iters0, stats0 = eng.stats.iterations, (eng.stats.host_seconds, eng.stats.device_wait_seconds)
    t0 = time.perf_counter()
    n_out = go(prompts)
    dt = time.perf_counter() - t0
    return {"engine": f"orca-jax[{policy}]", "seconds": dt, "output_tokens": n_out,
            "iterations": eng.stats.iterations - iters0,
            "host_seconds": eng.stats.host_seconds - stats0[0],
            "device_wait_seconds": eng.stats.device_wait_seconds - stats0[1],
            "warmup_seconds": eng.warmup_seconds, "programs": eng.num_compiles,
            "kv_slots": eng.num_slots}


def run_hf(hf_dir: str, args, prompts) -> dict:
    import torch
    from transformers import GPT2LMHeadModel
    torch.set_num_threads(os.cpu_count() or 1)
    model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    B = args.hf_batch_size

    def go(ps):
        n = 0
        for i in range(0, len(ps), B):
            x = torch.tensor(ps[i:i + B])
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                     max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                                     pad_token_id=0)
            n += (out.shape[1] - x.shape[1]) * x.shape[0]
        return n

    go(prompts[:2])
    t0 = time.perf_counter()
    n_out = go(prompts)
    return {"engine": f"hf-transformers[static bs={B}]", "seconds": time.perf_counter() - t0,
            "output_tokens": n_out}


def run_vllm(hf_dir: str, args) -> dict | None:
    script = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers", "vllm_cpu_offline.py")
    for cand in (script, os.path.join(os.getcwd(), "..", "shared", "peers", "vllm_cpu_offline.py")):
        if os.path.exists(cand):
            script = cand
            break
    if not (os.path.exists(args.vllm_python) and os.path.exists(script)):
        print(f"vllm: skipped ({args.vllm_python} or {script} missing; see ../shared/peers)", file=sys.stderr)
        return None
    out = subprocess.run([args.vllm_python, script, hf_dir, "--requests", str(args.requests),
                          "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len),
                          "--seed", str(args.seed)], capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
        print(f"vllm: failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    r = json.loads(lines[-1])
    return {"engine": "vllm-cpu", "seconds": r["seconds"], "output_tokens": r["output_tokens"]}


def cmd_offline(args) -> int:
    from .checkpoints.hf_gpt2 import convert_hf_gpt2
    from .checkpoints.store import load_config
    hf_dir = args.hf_model or random_hf_checkpoint(args.preset, args.seed)
    ckpt = os.path.join(tempfile.gettempdir(), "orca-jax-bench", os.path.basename(os.path.abspath(hf_dir)))
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        convert_hf_gpt2(hf_dir, ckpt, progress=False)
    cfg = load_config(ckpt)
    prompts = workload(args.requests, args.prompt_len, cfg.vocab_size, args.seed)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    results = []
    for s in systems:
        print(f"running {s} ...", file=sys.stderr, flush=True)
        if s in ("orca", "static"):
            r = run_engine(ckpt, args, "iteration" if s == "orca" else "static", prompts)
        elif s == "hf":
            r = run_hf(hf_dir, args, prompts)
        elif s == "vllm":
            r = run_vllm(hf_dir, args)
        else:
            raise ValueError(f"unknown system {s!r}; choose from orca, static, hf, vllm")
        if r is not None:
            r["output_tok_per_s"] = r["output_tokens"] / r["seconds"]
            results.append(r)
    ceiling = matmul_ceiling_gflops()
    flops = model_flops(cfg, args.requests, args.prompt_len, args.output_len)
    for r in results:
        r["achieved_gflops"] = flops / r["seconds"] / 1e9
        r["mfu_vs_matmul_ceiling"] = r["achieved_gflops"] / ceiling
    report = {"workload": {"kind": "offline", "requests": args.requests, "prompt_len": args.prompt_len,
                           "output_len": args.output_len, "seed": args.seed, "model": hf_dir,
                           "preset": None if args.hf_model else args.preset},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "matmul_ceiling_gflops": ceiling},
              "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    base = next((r for r in results if r["engine"].startswith("orca-jax[iteration")), None)
    print(f"\noffline: {args.requests} x {args.prompt_len}-token prompts -> {args.output_len} tokens; "
          f"fp32 matmul ceiling {ceiling:.0f} GFLOP/s\n")
    print("| system | seconds | output tok/s | GFLOP/s | of ceiling | orca-jax speed-up |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base else "-"
        print(f"| {r['engine']} | {r['seconds']:.1f} | {r['output_tok_per_s']:.1f} | "
              f"{r['achieved_gflops']:.0f} | {100 * r['mfu_vs_matmul_ceiling']:.0f}% | {ratio} |")
    for r in results:
        if "host_seconds" in r:
            print(f"{r['engine']}: {r['iterations']} iterations; host work "
                  f"{r['host_seconds'] - r['device_wait_seconds']:.2f} s, blocked on the device "
                  f"{r['device_wait_seconds']:.1f} s; "
                  f"{r['programs']} programs, warm-up {r['warmup_seconds']:.0f} s")
    return 0
