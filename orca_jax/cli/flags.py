"""Flags shared by the commands, and what they build: engine flags derived from
`EngineConfig`'s fields (one source for names, defaults and help), distributed placement,
several processes, sampling. Heavy imports (jax) stay inside the functions that build things,
so that `orca-jax --help` is instant."""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing


def _number(text: str) -> int:
    """An integer flag that also takes 2e9."""
    value = float(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text}")
    return int(value)


def off_flag(name: str) -> str:
    """The flag that turns off a boolean EngineConfig field (on by default): --no-X, where
    enable_X is --no-X too, as vLLM's --no-enable-prefix-caching is --no-prefix-caching here."""
    return "--no-" + name.removeprefix("enable_").replace("_", "-")


def engine_fields():
    """(field, resolved type) of every EngineConfig field that is a flag."""
    from ..config import EngineConfig
    hints = typing.get_type_hints(EngineConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(EngineConfig) if f.metadata.get("flag")]


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The EngineConfig fields as flags (generate, serve and bench), then --dtype, --mesh and
    --layout."""
    g = p.add_argument_group("engine")
    for f, kind in engine_fields():
        name, help_ = "--" + f.name.replace("_", "-"), f.metadata["help"]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if kind is bool:  # on by default: --no-X (enable_X: --no-X too, as vLLM's flags)
            g.add_argument(off_flag(f.name), dest=f.name, action="store_false",
                           help=f"turn off: {help_}")
        elif typing.get_origin(kind) is typing.Literal:
            g.add_argument(name, choices=list(args), default=f.default, help=help_)
        else:
            base = args[0] if args else kind
            g.add_argument(name, type=_number if base is int else base, default=f.default, help=help_)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast parameters (default: as stored)")
    g = p.add_argument_group("distributed (docs/distributed.md)")
    g.add_argument("--mesh", default=None,
                   help="device mesh, e.g. tensor=4 or tensor=2,pipeline=2 (default: one device). "
                        "CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N gives N devices")
    g.add_argument("--layout", default="megatron",
                   help="sharding layout: replicated, megatron, megatron-vocab-replicated, slots, "
                        "or a .json/.toml rules file (default: megatron)")


def engine_config(args):
    """The EngineConfig of the parsed engine flags."""
    from ..config import EngineConfig
    return EngineConfig(**{f.name: getattr(args, f.name) for f, _ in engine_fields()})


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
    from ..sharding.layouts import get_layout
    from ..sharding.mesh import make_mesh
    return (make_mesh(args.mesh) if args.mesh else None), get_layout(args.layout)


def build_engine(args, model: str, cfg=None, peers=None):
    """`Engine.from_checkpoint` with the engine and distributed flags (`cfg`: instead of
    `engine_config(args)`)."""
    from ..engine import Engine, freeze_startup_heap
    mesh, layout = placement(args)
    engine = Engine.from_checkpoint(model, cfg or engine_config(args), dtype=args.dtype, mesh=mesh,
                                    layout=layout, peers=peers)
    freeze_startup_heap()
    return engine


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
    from ..request import SamplingParams
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
