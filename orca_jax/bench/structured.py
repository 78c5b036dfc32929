"""What structured output costs per token: free vs constrained decoding on one engine.

    python -m orca_jax.bench.structured [--model DIR] [--batch 8] [--tokens 64] [--rounds 3]

One engine (default: the embedded demo model, whose tokenizer llguidance reads), the same B
prompts decoded T tokens each (EOS ignored), interleaved in rounds so the shared machine's
noise falls on every setting alike: all rows free; one row under a regex and the rest free;
every row under the regex. The regex (`[a-z ,.]{1,N}`) never ends early, so every row makes
exactly T tokens. Per setting: wall time per iteration and time per output token (median over
rows and rounds) for the constrained rows and the free ones; and, measured apart, the host's
cost per token of a matcher (mask fill + advance) for that regex and for a JSON schema. One
JSON object per setting, then a summary line. docs/serving.md ("Structured output") has the
numbers of this machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from ..llm import LLM
from ..engine import EngineConfig
from ..request import SamplingParams
from ..structured import Structured, mask_words

REGEX = "[a-z ,.]{1,4000}"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}


def host_cost(llm: LLM, structured: Structured, tokens: int) -> float:
    """Microseconds per token of one matcher: fill its mask, then advance by an allowed token."""
    g = llm.engine.grammars
    m = g.matcher(structured)
    row = np.zeros(mask_words(g.vocab_size), np.int32)
    rng = np.random.default_rng(0)
    t0, n = time.perf_counter(), 0
    for n in range(1, tokens + 1):
        m.fill(row)
        allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:g.vocab_size])
        if allowed.size == 0 or m.consume(int(rng.choice(allowed))) is not None:
            break
    return (time.perf_counter() - t0) / max(n, 1) * 1e6


def run(llm: LLM, batch: int, tokens: int, constrained: int) -> dict:
    """`batch` requests of `tokens` tokens, the first `constrained` of them under REGEX."""
    regex = Structured("regex", REGEX)
    params = [SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                             structured=regex if i < constrained else None) for i in range(batch)]
    steps0 = llm.engine.stats.iterations
    t0 = time.perf_counter()
    outs = llm.generate([f"Request {i}: the orca" for i in range(batch)], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tpot = [(o.metrics["finish_time"] - o.metrics["first_token_time"]) / max(len(o.token_ids) - 1, 1)
            for o in outs]
    assert all(len(o.token_ids) == tokens for o in outs)
    return {"constrained_rows": constrained, "wall_s": wall,
            "ms_per_iteration": wall / max(llm.engine.stats.iterations - steps0, 1) * 1e3,
            "tpot_ms_constrained": [t * 1e3 for t in tpot[:constrained]],
            "tpot_ms_free": [t * 1e3 for t in tpot[constrained:]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    llm = LLM(args.model, engine_config=EngineConfig(max_model_len=256))
    print(json.dumps({"host_us_per_token": {"regex": host_cost(llm, Structured("regex", REGEX), 200),
                                            "json": host_cost(llm, Structured("json", json.dumps(SCHEMA)), 200)}}))
    settings = (0, 1, args.batch)
    results = {k: [] for k in settings}
    run(llm, args.batch, 4, 1)  # the constrained programs' first run (they are compiled already)
    for _ in range(args.rounds):
        for k in settings:
            results[k].append(r := run(llm, args.batch, args.tokens, k))
            print(json.dumps(r))
    med = lambda xs: statistics.median(xs) if xs else None
    summary = {f"rows_constrained={k}": {
        "ms_per_iteration": med([r["ms_per_iteration"] for r in rs]),
        "tpot_ms_constrained": med([t for r in rs for t in r["tpot_ms_constrained"]]),
        "tpot_ms_free": med([t for r in rs for t in r["tpot_ms_free"]])} for k, rs in results.items()}
    print(json.dumps({"summary": summary, "batch": args.batch, "tokens": args.tokens}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
