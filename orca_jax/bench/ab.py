"""Steady decode of this tree against an older commit, or of its variants, interleaved in one process.

    python -m orca_jax.bench.ab --old 6334c17 --batches 1,16,64 --prompt 400 --page-sizes 16,64
    python -m orca_jax.bench.ab --attention-backends xla,cpu --batches 1,16,64 --prompt 400
    python -m orca_jax.bench.ab --matmul-backends xla,cpu --batches 1,4,16,64

The machine is shared and noisy, so two engines are compared in the same process and the
same minutes: the old commit is extracted (`git archive`) into a temporary folder and imported
as the package `orca_old`; both build GPT-2 (random weights, `--preset`) from the same
parameters, and for each round and batch every engine in turn decodes: `batch` requests of
`--prompt` random tokens are prefilled completely, then `--steps` engine steps are timed. The
median over `--rounds` is printed per engine and batch. This tree runs once per
combination of `--page-sizes`, `--attention-backends` and `--matmul-backends` entries (no
`--old`: only these). Results go to
`--out` as JSON. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def import_old(commit: str, into: Path):
    """The package of `commit`, importable as `orca_old` (its subpackages moved inside)."""
    tree = into / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    pkg = tree / "orca_old"
    (tree / "orca_jax").rename(pkg)
    for sub in ("models", "sharding", "checkpoints"):
        (tree / sub).rename(pkg / sub)
    for f in pkg.rglob("*.py"):
        f.write_text(f.read_text().replace("orca_jax", "orca_old"))
    sys.path.insert(0, str(tree))
    import orca_old.config
    import orca_old.engine
    return orca_old


def decode_ms(eng, batch: int, prompt: int, steps: int, seed: int) -> float:
    """Milliseconds per engine step with `batch` requests decoding after a `prompt`-token prefill."""
    from ..request import SamplingParams
    rng = np.random.default_rng(seed)
    sp = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    reqs = [eng.add_request(rng.integers(0, eng.model_config.vocab_size, prompt).tolist(), sp)
            for _ in range(batch)]
    while min(len(r.output_ids) for r in reqs) < 2:  # prefill done, decode under way
        eng.step()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    dt = (time.perf_counter() - t) / steps
    for r in reqs:
        eng.abort(r.request_id)
    while eng.has_unfinished():
        eng.step()
    return dt * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", help="the commit to compare against (none: only this tree's variants)")
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (the context decode reads)")
    p.add_argument("--page-sizes", default="64", help="this tree's --page-size values to run")
    p.add_argument("--attention-backends", default="auto", help="this tree's --attention-backend values to run")
    p.add_argument("--matmul-backends", default="auto", help="this tree's --matmul-backend values to run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="bench-results/ab.json")
    args = p.parse_args(argv)
    from ..config import EngineConfig
    from ..engine import Engine, freeze_startup_heap
    from ..models import PRESETS, family
    batches = [int(b) for b in args.batches.split(",")]
    c = PRESETS[args.preset]
    params = family(c).init_params(c)
    common = dict(max_batch_size=max(batches), max_model_len=args.prompt + args.steps + 16,
                  kv_memory=int(4e9), warmup=False)
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        if args.old:
            old = import_old(args.old, Path(tmp))
            engines[args.old] = old.engine.Engine.build(c, params, old.config.EngineConfig(**common))
        for size, attention, matmul in itertools.product(args.page_sizes.split(","),
                                                         args.attention_backends.split(","),
                                                         args.matmul_backends.split(",")):
            name = (f"pages of {size}" + (f", attention {attention}" if attention != "auto" else "")
                    + (f", matmul {matmul}" if matmul != "auto" else ""))
            engines[name] = Engine.build(c, params, EngineConfig(**common, page_size=int(size),
                                                                 attention_backend=attention,
                                                                 matmul_backend=matmul))
        freeze_startup_heap()
        times = {name: {b: [] for b in batches} for name in engines}
        for rnd in range(args.rounds):
            for b in batches:
                for name, eng in engines.items():
                    times[name][b].append(decode_ms(eng, b, args.prompt, args.steps, seed=rnd))
    for b in batches:
        print(f"batch {b}, context ~{args.prompt + args.steps // 2}: "
              + "  ".join(f"{name} {np.median(times[name][b]):.1f} ms" for name in engines), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "ms_per_step": times}, indent=1))


if __name__ == "__main__":
    main()
