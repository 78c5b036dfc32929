"""`orca-jax plan`: what a model needs on a mesh of accelerators, worked out on paper.

    orca-jax plan --model gpt3-175b --mesh tensor=8,pipeline=2 --layout megatron \\
                  --accelerator a100-40gb --batch 64 --context 1024 --explain

Per-device parameter and KV bytes, the slots that fit, communication per iteration and a
roofline step time (sharding/plan.py). No device is touched; nothing is compiled.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _model(arg: str):
    """A preset name, an orca-jax checkpoint directory, or its config.json."""
    from ..checkpoints.errors import CheckpointError
    from ..checkpoints.store import load_config
    from ..models import PRESETS
    if arg in PRESETS:
        return PRESETS[arg], arg
    path = Path(arg)
    if not (path / "config.json").is_file() and not path.is_file():
        raise ValueError(f"--model {arg!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                         "nor an orca-jax checkpoint directory / config.json")
    try:
        return load_config(path if path.is_dir() else path.parent), str(path)
    except CheckpointError as e:
        raise ValueError(str(e)) from e


def cmd_plan(args) -> int:
    from ..sharding.plan import ACCELERATORS, format_plan, make_plan
    if args.list:
        from ..models import PRESETS
        from ..sharding.layouts import LAYOUTS
        print("models:       " + ", ".join(PRESETS))
        print("layouts:      " + ", ".join(f"{k} ({v.description})" for k, v in LAYOUTS.items()))
        print("accelerators: " + ", ".join(f"{k} ({a.name})" for k, a in ACCELERATORS.items()))
        return 0
    if not args.model or not args.mesh:
        raise ValueError("--model and --mesh are required (or --list)")
    config, name = _model(args.model)
    plan = make_plan(config, args.mesh, args.layout, args.accelerator, batch=args.batch,
                     context=args.context, dtype=args.dtype, prefill_tokens=args.prefill_tokens,
                     reserve=args.reserve, name=name)
    if args.json:
        if not args.explain:
            plan.pop("explain")
        json.dump(plan, sys.stdout, indent=2)
        print()
    else:
        print(format_plan(plan, explain=args.explain))
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Registers `plan` on the `orca-jax` subcommands (`sub` from `add_subparsers`)."""
    p = sub.add_parser("plan", help="per-device memory, communication and step time of a model on a mesh",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="preset (e.g. gpt3-175b) or an orca-jax checkpoint directory")
    p.add_argument("--mesh", help="mesh spec, e.g. tensor=8,pipeline=2")
    p.add_argument("--layout", default="megatron",
                   help="shipped layout name or a .json/.toml rules file (default: megatron)")
    p.add_argument("--accelerator", default="a100-40gb", type=str.lower,
                   help="a100-40gb, a100-80gb, h100 or h200 (default: a100-40gb, Orca's testbed)")
    p.add_argument("--batch", type=int, default=64, help="sequences in the KV pages, all micro-batches together (default 64)")
    p.add_argument("--context", type=int, default=None, help="tokens per slot (default: the model's positions)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="parameter, activation and KV dtype (default bfloat16)")
    p.add_argument("--prefill-tokens", type=int, default=512,
                   help="prompt tokens in the prefill iteration estimated (default 512, the engine's token budget)")
    p.add_argument("--reserve", type=float, default=0.1,
                   help="fraction of HBM kept for activations and the runtime (default 0.1)")
    p.add_argument("--explain", action="store_true", help="show the arithmetic")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--list", action="store_true", help="list presets, layouts and accelerators")
    p.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m orca_jax.cli.plan`), same flags as `orca-jax plan`."""
    ap = argparse.ArgumentParser(prog="orca-jax")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"orca-jax plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
