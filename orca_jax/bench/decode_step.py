"""A decode step against this machine's floors, measured in one run.

    python -m orca_jax.bench.decode_step --preset gpt2-small --batches 1,8,64

Ceilings, best of 7, taken before and after the steps (the lower of each sets the floors):
read bandwidth = a jitted sum over 1 GiB; matmul = a jitted 2048^3 matmul in the model's dtype.
For each batch B: B requests (32 random prompt tokens, greedy, EOS ignored) decode in steady
state; one number per round is the wall time of `--steps` engine.step() calls / steps (host
work overlapped with the device, as when serving); the median over `--rounds` is reported.
A step's floor is max((weights + KV it attends over) / bandwidth, FLOPs / matmul ceiling).
Random weights; no checkpoint needed. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..config import EngineConfig
from ..engine import Engine, freeze_startup_heap
from ..kv_pages import pages_for
from ..models import PRESETS, family
from ..request import SamplingParams

PROMPT = 32


def _best(f, *args, n: int = 7) -> float:
    f(*args).block_until_ready()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return min(times)


def ceilings(dtype) -> tuple[float, float]:
    """(read bytes/s, matmul FLOP/s) of this machine through XLA; the matmul at the precision
    the engine runs `dtype` at (float32: full float32, not a GPU's TF32)."""
    big = jnp.ones((1 << 28,), jnp.float32)                                  # 1 GiB
    bandwidth = big.nbytes / _best(jax.jit(jnp.sum), big)
    a = jnp.ones((2048, 2048), dtype)
    with jax.default_matmul_precision("highest" if jnp.dtype(dtype) == jnp.float32 else "default"):
        matmul = jax.jit(lambda x: x @ x)
        return bandwidth, 2 * 2048**3 / _best(matmul, a)


def floors(c, batch: int, context: int, bandwidth: float, flops: float) -> dict:
    """A decode step's two floors in seconds: its weights (layers + LM head) and the
    batch's KV read once at `bandwidth`, and its matmul FLOPs at `flops`."""
    L, D, V, size = c.num_layers, c.hidden_size, c.vocab_size, jnp.dtype(c.jnp_dtype).itemsize
    HK, KVD = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    weights = (L * c.layer_matmul_params + V * D) * size
    kv = batch * context * L * 2 * KVD * size
    matmul = 2 * batch * (L * c.layer_matmul_params + D * V) + 4 * batch * context * HK * L
    return {"read": (weights + kv) / bandwidth, "matmul": matmul / flops}


def step_seconds(eng: Engine, batch: int, rounds: int, steps: int, seed: int = 0) -> tuple[float, int]:
    """Median over rounds of the time per engine.step() with `batch` requests decoding, and
    the longest context they reached (in whole KV pages)."""
    rng = np.random.default_rng(seed)
    sp = SamplingParams(temperature=0.0, max_tokens=3 + rounds * steps, ignore_eos=True)
    reqs = [eng.add_request(rng.integers(0, eng.model_config.vocab_size, PROMPT).tolist(), sp)
            for _ in range(batch)]
    for _ in range(3):  # prefill and the first decode steps
        eng.step()
    per_round = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        per_round.append((time.perf_counter() - t) / steps)
    for r in reqs:
        eng.abort(r.request_id)
    while eng.has_unfinished():
        eng.step()
    B = eng.kv.page_size
    return float(np.median(per_round)), pages_for(PROMPT + 3 + rounds * steps, B) * B


def measure(preset: str, batches: list[int], rounds: int = 7, steps: int = 8,
            page_size: int = EngineConfig.page_size) -> dict:
    """Ceilings (before and after) and, per batch, the steady decode step against its floor."""
    c = PRESETS[preset]
    start = ceilings(c.jnp_dtype)
    ec = EngineConfig(max_batch_size=max(batches), max_model_len=256, kv_memory=int(4e9), warmup=False,
                      page_size=page_size)
    eng = Engine.build(c, family(c).init_params(c), ec)
    freeze_startup_heap()  # as `serve` does once its engine is built
    times = {b: step_seconds(eng, b, rounds, steps) for b in batches}
    end = ceilings(c.jnp_dtype)
    bandwidth, flops = min(start[0], end[0]), min(start[1], end[1])
    rows = []
    for b, (t, context) in times.items():
        f = floors(c, b, context, bandwidth, flops)
        bound = max(f, key=f.get)
        rows.append({"batch": b, "decode_rows": eng.buckets.decode_rows(b, 0), "context": context,
                     "step_ms": t * 1e3, "floor_ms": f[bound] * 1e3, "floor_bound": bound,
                     "ratio": t / f[bound]})
    return {"preset": preset, "rounds": rounds, "steps": steps, "page_size": page_size,
            "bandwidth_gbs": [start[0] / 1e9, end[0] / 1e9], "matmul_gflops": [start[1] / 1e9, end[1] / 1e9],
            "decode": rows}


def print_report(r: dict) -> None:
    bw, mm = r["bandwidth_gbs"], r["matmul_gflops"]
    print(f"{r['preset']} (KV pages of {r['page_size']}): bandwidth {bw[0]:.1f} / {bw[1]:.1f} GB/s, matmul {mm[0]:.0f} / {mm[1]:.0f} "
          f"GFLOP/s (start / end, best of 7)")
    for row in r["decode"]:
        print(f"batch {row['batch']:3d} (bucket {row['decode_rows']:3d} rows): {row['step_ms']:7.1f} ms per "
              f"step = per output token, floor {row['floor_ms']:6.1f} ms ({row['floor_bound']}, KV context "
              f"{row['context']}), {row['ratio']:.2f}x  [median of {r['rounds']} rounds x {r['steps']} steps]")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=8, help="engine steps per round")
    p.add_argument("--page-size", type=int, default=EngineConfig.page_size)
    args = p.parse_args(argv)
    print_report(measure(args.preset, [int(b) for b in args.batches.split(",")], args.rounds, args.steps,
                         args.page_size))


if __name__ == "__main__":
    main()
