"""Soak: Poisson arrivals for minutes against a real `orca-jax serve` process (not in CI).

    ORCA_JAX_SOAK_MINUTES=10 ORCA_JAX_SOAK_RATE=10 python -m pytest -m slow -s tests/test_server_soak.py

Three quarters of the requests stream over gRPC, a quarter over HTTP (OpenAI SSE). Checks:
zero lost (every request finishes with its full token count), and the server's resident memory
flat after warm-up. Prints a markdown row for docs/benchmarks.md (and appends it to
$ORCA_JAX_SOAK_REPORT when set).
"""
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

MINUTES = float(os.environ.get("ORCA_JAX_SOAK_MINUTES", "10"))
RATE = float(os.environ.get("ORCA_JAX_SOAK_RATE", "10"))        # requests per second
ENGINE_FLAGS = ["--max-batch-size", "16", "--max-num-batched-tokens", "128", "--max-prefill-seqs", "8",
                "--max-model-len", "128", "--max-waiting", "4096"]
CORPUS = (Path(__file__).parent.parent / "orca_jax" / "demo_corpus.txt").read_text().split()
GROWTH_LIMIT_MIB = 32.0


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@pytest.mark.slow
def test_soak_poisson_zero_lost_flat_memory(demo_model_dir):
    psutil = pytest.importorskip("psutil", reason="the soak reads the server's RSS with psutil")
    import aiohttp

    from orca_jax.client import AsyncClient
    from orca_jax.tokenizer import load_tokenizer

    proc = subprocess.Popen(
        [sys.executable, "-m", "orca_jax.cli", "serve", "--model", demo_model_dir, "--grpc-port", "0",
         "--http-port", "0", "--served-model-name", "demo", *ENGINE_FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        while "ready" not in line:
            assert proc.poll() is None, "server exited during start-up"
            line = proc.stdout.readline()
        parts = dict(p.split("=", 1) for p in line.split() if "=" in p)
        target, url = parts["grpc"], parts["http"]
        server = psutil.Process(proc.pid)
        rng = random.Random(0)
        duration = 60 * MINUTES
        rss: list[tuple[float, float]] = []
        results, errors = [], []

        tok = load_tokenizer(demo_model_dir)

        def make():  # prompt + output within the 128-token context
            k = rng.randint(1, 40)
            s = rng.randrange(len(CORPUS) - k)
            prompt = " ".join(CORPUS[s:s + k])
            return prompt, min(rng.randint(8, 64), 128 - len(tok.encode(prompt))), rng.randrange(2**31)

        async def grpc_one(client, prompt, n, seed):
            t0, first, got = time.perf_counter(), None, 0
            async for d in client.stream(prompt, max_tokens=n, temperature=0.8, seed=seed, ignore_eos=True):
                if first is None and d.token_ids:
                    first = time.perf_counter()
                got = d.usage.completion_tokens
            return t0, first, time.perf_counter(), got, n

        async def http_one(session, prompt, n, seed):
            t0, first, got = time.perf_counter(), None, 0
            body = {"model": "demo", "prompt": prompt, "max_tokens": n, "temperature": 0.8, "seed": seed,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            async with session.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and first is None:
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        got = chunk["usage"]["completion_tokens"]
            return t0, first, time.perf_counter(), got, n

        async def run():
            async with AsyncClient(target, timeout=600) as client, \
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
                async def one(kind, *a):
                    try:
                        results.append((kind, await (grpc_one(client, *a) if kind == "grpc"
                                                     else http_one(session, *a))))
                    except Exception as e:  # noqa: BLE001 - counted as lost
                        errors.append(repr(e))

                async def sample():
                    while True:
                        rss.append((time.monotonic(), server.memory_info().rss / 2**20))
                        await asyncio.sleep(5)

                sampler = asyncio.create_task(sample())
                tasks, start = [], time.monotonic()
                next_at = start
                while next_at < start + duration:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    kind = "grpc" if rng.random() < 0.75 else "http"
                    tasks.append(asyncio.create_task(one(kind, *make())))
                    next_at += rng.expovariate(RATE)
                await asyncio.gather(*tasks)
                await asyncio.sleep(5)
                sampler.cancel()
                return len(tasks), time.monotonic() - start

        sent, wall = asyncio.run(run())
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

    complete = [r for _, r in results if r[3] == r[4]]
    lost = sent - len(complete)
    t_start = rss[0][0]
    warm = [m for t, m in rss if t - t_start >= 0.2 * duration]  # after the first fifth
    growth = warm[-1] - warm[0]
    slope = statistics.linear_regression([t for t, _ in rss if t - t_start >= 0.2 * duration], warm).slope * 60
    ttft = [r[1] - r[0] for _, r in results]
    e2e = [r[2] - r[0] for _, r in results]
    tokens = sum(r[3] for _, r in results)
    row = (f"| {time.strftime('%Y-%m-%d')} | {MINUTES:g} min | {RATE:g}/s Poisson | {sent} "
           f"({sum(k == 'grpc' for k, _ in results)} gRPC, {sum(k == 'http' for k, _ in results)} HTTP) "
           f"| {lost} | {tokens / wall:.0f} | {1000 * pct(ttft, .5):.0f} / {1000 * pct(ttft, .99):.0f} "
           f"| {1000 * pct(e2e, .5):.0f} / {1000 * pct(e2e, .99):.0f} "
           f"| {rss[0][1]:.0f} → {warm[0]:.0f} → {warm[-1]:.0f} ({slope:+.2f} MiB/min) |")
    print("\n" + row)
    if os.environ.get("ORCA_JAX_SOAK_REPORT"):
        with open(os.environ["ORCA_JAX_SOAK_REPORT"], "a") as f:
            f.write(row + "\n")
    assert not errors, errors[:5]
    assert lost == 0
    assert growth < GROWTH_LIMIT_MIB, f"RSS grew {growth:.1f} MiB after warm-up: {rss}"
