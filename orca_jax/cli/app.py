"""`orca-jax` command line: convert, generate, bench, serve, demo, plan, simulate.

Each subcommand has --help. Heavy imports (jax, flax) happen inside the subcommands so that
`orca-jax --help` is instant.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..bench import gpu_check as bench_gpu_check
from ..bench import latency as bench_latency
from ..bench import online as bench_online
from ..bench import run as bench_run
from ..bench import stages as bench_stages
from ..sim import cli as sim_cli
from . import plan, serve
from .flags import add_engine_flags, add_sampling_flags, build_engine, sampling_params


def cmd_convert(args) -> int:
    from ..checkpoints.hf import convert_hf
    if args.source != "hf":
        raise SystemExit(f"unsupported --from {args.source!r}; supported: hf")
    cfg = convert_hf(args.path, args.out, dtype=args.dtype, progress=not args.quiet)
    heads = f"{cfg.num_heads} heads" + (f" ({cfg.num_kv_heads} KV heads)" if cfg.num_kv_heads != cfg.num_heads else "")
    print(f"wrote {args.out}: {cfg.model_type} with {cfg.num_layers} layers, d={cfg.hidden_size}, {heads}, "
          f"vocab {cfg.vocab_size}, {cfg.num_params() / 1e6:.1f}M parameters ({cfg.dtype})")
    return 0


def cmd_generate(args) -> int:
    if args.server:
        return serve.cmd_generate_remote(args)
    params = sampling_params(args)
    prompts = list(args.prompt)
    for ids in args.prompt_ids:
        prompts.append([int(t) for t in ids.split(",") if t.strip()])
    if not prompts:
        raise SystemExit("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    model = args.model
    if model is None:
        from ..demo_model import ensure_demo_model
        model = ensure_demo_model()
        print(f"(no --model: using the embedded demo model at {model}; its weights are random)",
              file=sys.stderr)
    engine = build_engine(args, model)
    reqs = [engine.add_request(p, params) for p in prompts]
    index = {r.request_id: i for i, r in enumerate(reqs)}
    texts = [""] * len(reqs)
    stream = len(reqs) == 1
    while engine.has_unfinished():
        for out in engine.step():
            i = index[out.request_id]
            texts[i] += out.text
            if stream:
                print(out.text, end="", flush=True)
            if out.finished and not stream:
                print(f"--- [{i}] {prompts[i]!r} ({out.finish_reason.value}, "
                      f"{out.usage.completion_tokens} tokens)\n{texts[i]}")
            elif out.finished:
                print(f"\n--- {out.finish_reason.value}, {out.usage.completion_tokens} tokens", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="orca-jax", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="log details of every library")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint (GPT-2, Llama, Mistral, Qwen2/3, "
                                       "GPT-NeoX, GPT-J, OPT) to Orbax")
    p.add_argument("--from", dest="source", default="hf", help="source format (hf)")
    p.add_argument("path", help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="stored dtype (default: the checkpoint's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("generate", help="generate text offline with the engine")
    p.add_argument("--model", default=None, help="checkpoint directory (default: embedded demo model)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[], help="prompt token ids, comma-separated")
    add_sampling_flags(p)
    add_engine_flags(p)
    p.add_argument("--warmup", dest="warmup", action="store_true",
                   help="compile every bucket program first (a one-shot run only needs a few)")
    p.set_defaults(fn=cmd_generate, warmup=False)

    p.add_argument("--server", default=None,
                   help="HOST:PORT of a running `orca-jax serve` (gRPC): stream from it instead")

    workloads = bench_run.add_parser(sub)  # bench offline|orca|sharegpt-like|stages|latency
    bench_stages.add_parser(workloads)
    bench_latency.add_parser(workloads)
    bench_online.add_parser(workloads)
    bench_gpu_check.add_parser(workloads)
    serve.add_parsers(sub)  # serve, demo
    plan.add_parser(sub)
    sim_cli.add_parser(sub)

    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("orca_jax").setLevel(logging.INFO)  # KV pages, programs, warm-up time
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax is chatty at INFO
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"orca-jax {args.cmd}: error: {e}", file=sys.stderr)
        return 2


