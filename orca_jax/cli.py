"""`orca-jax` command line: convert, generate, bench, serve, demo, plan.

Each subcommand has --help. Heavy imports (jax, flax) happen inside the subcommands so that
`orca-jax --help` is instant.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The EngineConfig fields as flags (shared by generate, serve and bench)."""
    g = p.add_argument_group("engine")
    g.add_argument("--max-batch-size", type=int, default=64, help="requests per iteration (Orca's max_bs)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="token budget per iteration; longer prompts are prefilled in chunks")
    g.add_argument("--max-prefill-seqs", type=int, default=16, help="prompt segments per iteration")
    g.add_argument("--max-waiting", type=int, default=1024, help="waiting-queue bound")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="tokens per KV slot (default: the model's n_positions)")
    g.add_argument("--kv-memory", type=float, default=None,
                   help="KV buffer budget in bytes (e.g. 2e9); default: --kv-memory-fraction")
    g.add_argument("--kv-memory-fraction", type=float, default=0.5,
                   help="fraction of free device memory (CPU: of RAM) for the KV buffer")
    g.add_argument("--policy", choices=["iteration", "static"], default="iteration",
                   help="iteration-level scheduling (Orca) or the static request-level baseline")
    g.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="compile bucket programs lazily instead of at start-up")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="cast parameters (default: as stored)")
    g = p.add_argument_group("distributed (docs/distributed.md)")
    g.add_argument("--mesh", default=None,
                   help="device mesh, e.g. tensor=4 or tensor=2,pipeline=2 (default: one device). "
                        "CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N gives N devices")
    g.add_argument("--layout", default="megatron",
                   help="sharding layout: replicated, megatron, megatron-vocab-replicated, slots, "
                        "or a .json/.toml rules file (default: megatron)")


def add_multiprocess_flags(p: argparse.ArgumentParser) -> None:
    """Several processes, one mesh (launch/: local.sh, slurm.sbatch, k8s/)."""
    g = p.add_argument_group("several processes (docs/launch.md)")
    g.add_argument("--coordinator", default=os.environ.get("ORCA_JAX_COORDINATOR"),
                   help="HOST:PORT of process 0's JAX coordinator ($ORCA_JAX_COORDINATOR)")
    g.add_argument("--num-processes", type=int, default=int(os.environ.get("ORCA_JAX_NUM_PROCESSES", 1)),
                   help="processes in the group ($ORCA_JAX_NUM_PROCESSES; default 1)")
    g.add_argument("--process-id", type=int, default=int(os.environ.get("ORCA_JAX_PROCESS_ID", 0)),
                   help="this process's index; 0 schedules and serves ($ORCA_JAX_PROCESS_ID)")
    g.add_argument("--control-port", type=int, default=None,
                   help="port on process 0 for the per-iteration plans (default: coordinator port + 1)")


def placement(args):
    """(mesh, layout) from --mesh / --layout."""
    from .sharding.layouts import get_layout
    from .sharding.mesh import make_mesh
    return (make_mesh(args.mesh) if args.mesh else None), get_layout(args.layout)


def build_engine(args, model: str, cfg=None, peers=None):
    """`Engine.from_checkpoint` with the engine and distributed flags (`cfg`: instead of
    `engine_config(args)`)."""
    from .engine import Engine
    mesh, layout = placement(args)
    return Engine.from_checkpoint(model, cfg or engine_config(args), dtype=args.dtype, mesh=mesh,
                                  layout=layout, peers=peers)


def engine_config(args):
    from .engine import EngineConfig
    return EngineConfig(
        max_batch_size=args.max_batch_size, max_num_batched_tokens=args.max_num_batched_tokens,
        max_prefill_seqs=min(args.max_prefill_seqs, args.max_batch_size),
        max_waiting=args.max_waiting, policy=args.policy, max_model_len=args.max_model_len,
        kv_memory=int(args.kv_memory) if args.kv_memory else None,
        kv_memory_fraction=args.kv_memory_fraction, warmup=args.warmup)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args):
    from .request import SamplingParams
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def cmd_convert(args) -> int:
    from .checkpoints.hf_gpt2 import convert_hf_gpt2
    if args.source != "hf":
        raise SystemExit(f"unsupported --from {args.source!r}; supported: hf")
    cfg = convert_hf_gpt2(args.path, args.out, dtype=args.dtype, progress=not args.quiet)
    print(f"wrote {args.out}: GPT-2 with {cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head} heads, "
          f"vocab {cfg.vocab_size}, {cfg.num_params() / 1e6:.1f}M parameters ({cfg.dtype})")
    return 0


def cmd_generate(args) -> int:
    if args.server:
        from .serve_cli import cmd_generate_remote
        return cmd_generate_remote(args)
    params = sampling_params(args)
    prompts = list(args.prompt)
    for ids in args.prompt_ids:
        prompts.append([int(t) for t in ids.split(",") if t.strip()])
    if not prompts:
        raise SystemExit("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    model = args.model
    if model is None:
        from .demo_model import ensure_demo_model
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

    p = sub.add_parser("convert", help="convert a Hugging Face GPT-2 checkpoint to Orbax")
    p.add_argument("--from", dest="source", default="hf", help="source format (hf)")
    p.add_argument("path", help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
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

    from . import bench, plan_cli, serve_cli
    bench.add_parser(sub)
    serve_cli.add_parsers(sub)  # serve, demo
    plan_cli.add_parser(sub)

    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("orca_jax").setLevel(logging.INFO)  # KV slots, programs, warm-up time
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax is chatty at INFO
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"orca-jax {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
