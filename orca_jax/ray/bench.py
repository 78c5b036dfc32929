"""The shared-prefix benchmark of the global scheduler (docs/benchmarks.md, "Replicas"):
several system prompts, each shared by many requests, over N replicas, once per router policy,
each on fresh replicas (empty prefix caches). Reports the replicas' prefix-cache hit rate
(vllm:prefix_cache_hits / _queries, in prompt tokens, summed over replicas), requests per
replica and the wall time.

    python -m orca_jax.ray.bench --routers prefix round-robin        # the demo model, 2 replicas

The cache is made the scarce resource on purpose: all the system prompts together need more
KV pages than one replica has, half of them fit. Round-robin sends every system prompt to
every replica, whose caches then evict each other's prefixes; prefix affinity gives each
replica its own share of them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import time

ENGINE = ("--max-batch-size", "8", "--max-num-batched-tokens", "128", "--max-prefill-seqs", "4",
          "--max-model-len", "256", "--page-size", "16")


def system_prompts(tokenizer, n: int, num_tokens: int, seed: int = 0) -> list[str]:
    """`n` different passages of the demo corpus of at least `num_tokens` tokens each."""
    from ..demo_model import CORPUS
    words = CORPUS.read_text(encoding="utf-8").split()
    rng, out = random.Random(seed), []
    while len(out) < n:
        start, k = rng.randrange(len(words) - 4 * num_tokens), num_tokens // 2
        while len(tokenizer.encode(" ".join(words[start:start + k]))) < num_tokens:
            k += 8
        out.append(" ".join(words[start:start + k]))
    return out


def trace(systems: list[str], per_system: int, seed: int = 0) -> list[str]:
    """Every system prompt `per_system` times with a short question of its own, shuffled."""
    rng = random.Random(seed)
    prompts = [f"{s}\nQuestion {i}: {rng.randrange(10**6)}?" for s in systems for i in range(per_system)]
    rng.shuffle(prompts)
    return prompts


async def send(url: str, prompts: list[str], rate: float, max_tokens: int, seed: int = 0) -> int:
    """Poisson arrivals at `rate` requests/s; returns how many completed."""
    import aiohttp
    rng = random.Random(seed)

    async def one(session, prompt):
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
        async with session.post(url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=600)) as r:
            return r.status == 200
    async with aiohttp.ClientSession() as session:
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(one(session, p)))
            await asyncio.sleep(rng.expovariate(rate))
        return sum(await asyncio.gather(*tasks))


def scrape(url: str) -> dict[str, float]:
    """The aggregate prefix-cache counters and the decisions per replica and reason from /metrics."""
    import urllib.request
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in ('vllm:prefix_cache_hits_total{model_name="demo",replica="all"}',
                    'vllm:prefix_cache_queries_total{model_name="demo",replica="all"}'):
            out[name.split("{")[0].removeprefix("vllm:")] = float(value)
        elif name.startswith("orca_jax:router_decisions_total{"):
            replica = name.split('replica="')[1].split('"')[0]
            reason = name.split('reason="')[1].split('"')[0]
            out["to_" + replica] = out.get("to_" + replica, 0) + float(value)
            out["why_" + reason] = out.get("why_" + reason, 0) + float(value)
    return out


def run_one(router: str, model: str, args, prompts: list[str], port: int) -> dict:
    """Fresh replicas with `router`, the trace, the counters; the application is deleted after."""
    from ray import serve

    from .app import APP_NAME, ReplicasConfig, build
    t0 = time.perf_counter()
    serve.run(build(ReplicasConfig(model, "demo", args.replicas, ENGINE, router=router,
                                   num_cpus=args.replica_cpus, stats_period_s=0.5)),
              name=APP_NAME, route_prefix="/")
    url, up = f"http://127.0.0.1:{port}", time.perf_counter() - t0
    t0 = time.perf_counter()
    done = asyncio.run(send(url, prompts, args.rate, args.max_tokens, args.seed))
    wall = time.perf_counter() - t0
    time.sleep(3.0)  # two report periods: the replicas' counters reach the ingress
    m = scrape(url)
    serve.delete(APP_NAME)
    return {"router": router, "requests": len(prompts), "completed": done, "startup_s": round(up, 1),
            "wall_s": round(wall, 1), "prefix_hit_rate": round(m.get("prefix_cache_hits_total", 0)
                                                               / max(1.0, m.get("prefix_cache_queries_total", 0)), 3),
            "per_replica": sorted(int(v) for k, v in m.items() if k.startswith("to_")),
            "reasons": {k[4:]: int(v) for k, v in m.items() if k.startswith("why_")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orca_jax.ray.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--routers", nargs="+", default=["prefix", "round-robin"])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--systems", type=int, default=16, help="system prompts")
    p.add_argument("--per-system", type=int, default=8, help="requests per system prompt")
    p.add_argument("--system-tokens", type=int, default=176, help="tokens per system prompt")
    p.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--replica-cpus", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import ray
    from ray import serve

    from ..demo_model import ensure_demo_model
    from ..tokenizer import load_tokenizer
    model = ensure_demo_model()
    prompts = trace(system_prompts(load_tokenizer(model), args.systems, args.system_tokens, args.seed),
                    args.per_system, args.seed)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for router in args.routers:
            row = run_one(router, model, args, prompts, port)
            print(json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
