"""Bucket-aware chunking on and off, interleaved in one process on one engine.

    python -m orca_jax.bench.chunking_ab --rate 0.4 --requests 30 --rounds 2

The machine is shared and noisy, so both settings run on the same engine in the same minutes:
one engine (random-weight `--preset`, default EngineConfig, prefix caching off so every run
does the same work) replays one Poisson trace (prompts and outputs uniform like `vllm bench
serve`'s random dataset: 272 +- 88 % and 64 +- 88 % tokens) in wall-clock time, alternately
with the scheduler's prefill buckets cleared (what --no-bucket-chunking does) and set. One
JSON line per run: rows computed with and without padding, TTFT, TPOT, ITL, E2EL. See
docs/benchmarks.md ("Bucket-aware chunking").
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from ..engine import EngineConfig
from . import workloads
from .metrics import summarize
from .run import converted_checkpoint, random_hf_checkpoint
from .systems import Clock, EngineSystem


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--rate", type=float, default=0.4, help="requests/s of the Poisson arrivals")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=1024)
    args = ap.parse_args(argv)
    ckpt = converted_checkpoint(random_hf_checkpoint(args.preset))
    system = EngineSystem("orca", ckpt, EngineConfig(max_model_len=args.max_model_len,
                                                     enable_prefix_caching=False))
    vocab = system.engine.model_config.vocab_size
    trace = workloads.orca(args.requests, vocab, seed=0, prompt_len="33:511", output_len="8:120").at_rate(args.rate)
    system.warm(trace)
    sched = system.engine.scheduler
    on = sched.config
    settings = {"off": dataclasses.replace(on, prefill_buckets=()), "on": on}
    for rnd in range(args.rounds):
        for name, config in settings.items():
            sched.config = config
            records, info = system.run(trace, Clock(skip_idle=False))
            s = summarize(records)
            row = {"round": rnd, "bucket_chunking": name, "iterations": info["iterations"],
                   "rows": info["tokens"], "rows_padded": info["padded_tokens"],
                   **{k: {q: round(s[k][q], 1) for q in ("p50", "p99")}
                      for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")}}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
