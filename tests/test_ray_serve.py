"""End to end on a real local Ray: 2 replicas of the demo model behind the global scheduler
(orca_jax/ray). Slow (Ray start and two engine warm-ups: 1-3 minutes on 2 CPUs), so under
`-m slow` (the first test, the router's Serve glue over fake replicas, runs by default):

    python -m pytest -m slow tests/test_ray_serve.py

A Poisson trace is served completely by both replicas with every decision logged; /health
and /metrics cover every replica; a replica whose process is killed mid-run loses no request
silently (each completes or gets a clear 503 / SSE error), and its replacement serves again; gRPC's Generate and GetModelInfo go through Serve's gRPC proxy.
"""
import asyncio
import glob
import json
import os
import random
import signal
import socket
import time

import pytest

ray = pytest.importorskip("ray")
aiohttp = pytest.importorskip("aiohttp")



class _Replica:
    """What OrcaRequestRouter reads of Serve's RunningReplica."""

    def __init__(self, name, **stats):
        from ray.serve.request_router import ReplicaID
        from ray.serve._private.common import DeploymentID
        self.replica_id = ReplicaID(name, DeploymentID("OrcaEngine", "orca-jax"))
        self.routing_stats = {"max_running": 2, "kv_pages_total": 100, "kv_pages_free": 100, **stats}


def _pending(rid, key):
    from types import SimpleNamespace
    return SimpleNamespace(kwargs={"route": key}, metadata=SimpleNamespace(
        internal_request_id=rid, request_id=rid))


def test_router_glue_over_fake_replicas():
    """OrcaRequestRouter without a cluster: reports and the prompt's keys in, ranks out; a
    burst sharing a new prefix follows the first choice until that replica is overloaded;
    decisions are counted when Serve reports them routed; completion frees the count."""
    from orca_jax.ray import metrics
    from orca_jax.ray.router import OrcaRequestRouter
    from orca_jax.ray.routing import RouteKey, lookup_hashes

    router = OrcaRequestRouter.__new__(OrcaRequestRouter)  # Serve's constructor needs a controller
    router.initialize_state(policy="prefix", overload_margin=1.0)
    held = RouteKey(tuple(lookup_hashes(list(range(50)), 16)))
    a, b = _Replica("a"), _Replica("b", cached=list(held.hashes))

    ranks = asyncio.run(router.choose_replicas([a, b], _pending("r0", held)))
    assert [[r.replica_id.unique_id for r in rank] for rank in ranks] == [["b"], ["a"]]
    metrics.DECISIONS.clear()
    router.on_request_routed(_pending("r0", held), b.replica_id, None)
    assert metrics.DECISIONS == {("b", "prefix"): 1}

    new = RouteKey(tuple(lookup_hashes(list(range(100, 150)), 16)))  # b is busier now: a
    picks = [asyncio.run(router.choose_replicas([a, b], _pending(f"n{i}", new)))[0][0].replica_id.unique_id
             for i in range(5)]
    assert picks == ["a", "a", "a", "a", "b"]  # a's 4 pending choices (load 2) exceed b's 0.5 by > 1
    router.on_request_completed(b.replica_id, "r0")
    assert router.in_flight[b.replica_id] == set()


slow = pytest.mark.slow

ENGINE = ("--max-batch-size", "8", "--max-num-batched-tokens", "64", "--max-prefill-seqs", "4",
          "--max-model-len", "256", "--page-size", "16")
SYSTEMS = ["You are a helpful orca. Answer briefly and kindly, in the voice of a whale. " * 2,
           "The following is a transcript of a pod of orcas hunting near the coast. " * 2,
           "Translate the song of the humpback whale into plain English sentences. " * 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    from ray import serve

    from orca_jax.ray.app import ReplicasConfig
    from orca_jax.ray.cli import start
    port, grpc_port = _free_port(), _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start(ReplicasConfig(str(demo_model_dir), "demo", 2, ENGINE, num_cpus=0.5, stats_period_s=0.5),
              "127.0.0.1", port, grpc_port=grpc_port)
        yield f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


async def _get(session, url):
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
        return r.status, await r.text()


async def _complete(session, url, body, streaming: dict | None = None) -> dict:
    """One request's outcome: ok (finished, with its text) or error (status and message); a
    request that hangs or breaks the connection raises, failing the test. `streaming[name]`
    (an asyncio.Event) is set once a stream from replica `name` has its first text."""
    async with session.post(url + "/v1/completions", json=body,
                            timeout=aiohttp.ClientTimeout(total=180)) as r:
        replica = r.headers.get("x-orca-jax-replica")
        if r.status != 200:
            return {"ok": False, "status": r.status, "error": (await r.json())["error"]["message"]}
        if not body.get("stream"):
            choice = (await r.json())["choices"][0]
            return {"ok": choice["finish_reason"] == "length", "text": choice["text"]}
        text, done = "", False
        async for line in r.content:
            line = line.strip()
            if line == b"data: [DONE]":
                done = True
            elif line.startswith(b"data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    return {"ok": False, "status": 200, "error": event["error"]["message"], "text": text}
                text += event["choices"][0]["text"]
                if streaming is not None and replica in streaming:
                    streaming[replica].set()
        return {"ok": done, "text": text, **({} if done else {"error": "stream ended without [DONE]"})}


def _decisions(metrics_text: str) -> dict[tuple[str, str], float]:
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith("orca_jax:router_decisions_total{"):
            labels, value = line[len("orca_jax:router_decisions_total{"):].split("} ")
            kv = dict(p.split("=") for p in labels.split(","))
            out[kv["replica"].strip('"'), kv["reason"].strip('"')] = float(value)
    return out


def _per_replica(decisions) -> dict[str, float]:
    out: dict[str, float] = {}
    for (replica, _), n in decisions.items():
        out[replica] = out.get(replica, 0) + n
    return out


def _health(url) -> dict:
    async def get():
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/health", timeout=aiohttp.ClientTimeout(total=30)) as r:
                return {**(await r.json()), "http_status": r.status}
    return asyncio.run(get())


@slow
def test_health_counts_live_replicas(cluster):
    """First of the cluster tests: /health before any request (the router does not exist yet)."""
    deadline = time.monotonic() + 30
    while True:  # the replicas' first reports (pids) follow within a report period or two
        h = _health(cluster[0])
        if all(r["pid"] for r in h["by_replica"].values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert h["http_status"] == 200 and h["status"] == "ok" and h["replicas"] == 2 and h["healthy"] == 2
    assert all(r["pid"] for r in h["by_replica"].values())


@slow
def test_poisson_trace_served_by_both_replicas(cluster):
    cluster, _ = cluster
    rng = random.Random(0)
    n = 24

    async def run():
        async with aiohttp.ClientSession() as s:
            _, before = await _get(s, cluster + "/metrics")
            tasks = []
            for i in range(n):
                body = {"prompt": rng.choice(SYSTEMS) + f"Question {i}: where?", "ignore_eos": True,
                        "max_tokens": rng.randint(4, 12), "stream": i % 2 == 0, "seed": i}
                tasks.append(asyncio.create_task(_complete(s, cluster, body)))
                await asyncio.sleep(rng.expovariate(6.0))  # Poisson arrivals, 6 requests/s
            results = await asyncio.wait_for(asyncio.gather(*tasks), 300)
            await asyncio.sleep(2.0)  # one more report period: the counters catch up
            _, after = await _get(s, cluster + "/metrics")
            return results, _decisions(before), _decisions(after), after

    results, before, after, text = asyncio.run(run())
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]]
    routed = {k: v - before.get(k, 0) for k, v in after.items()}
    per_replica = _per_replica(routed)
    print(f"trace of {n}: decisions {routed}")  # shown with -s
    assert sum(per_replica.values()) == n
    assert len([r for r, c in per_replica.items() if c > 0]) == 2, routed   # both replicas used
    assert any(reason == "prefix" for (_, reason), c in routed.items() if c), routed
    # Every replica's vllm:* series and their aggregate on the one /metrics.
    for name in per_replica:
        assert f'vllm:num_requests_running{{model_name="demo",replica="{name}"}}' in text
    assert 'vllm:prefix_cache_hits_total{model_name="demo",replica="all"}' in text
    hits = [float(line.split()[-1]) for line in text.splitlines()
            if line.startswith('vllm:prefix_cache_hits_total{model_name="demo",replica="all"}')]
    assert hits[0] > 0  # shared system prompts were served from the replicas' prefix caches
    # The choices are logged (Serve's log file of the ingress replica).
    logs = "".join(open(p).read() for p in glob.glob("/tmp/ray/session_latest/logs/serve/*OrcaIngress*"))
    assert logs.count(" -> replica ") >= n


@slow
def test_grpc_generate_and_model_info(cluster):
    from orca_jax.client import AsyncClient

    async def run():
        async with AsyncClient(cluster[1]) as client:
            info = await client.model_info()
            outs = await asyncio.wait_for(asyncio.gather(*[
                client.generate(SYSTEMS[i % 3] + f" {i}", max_tokens=5, ignore_eos=True, seed=i)
                for i in range(4)]), 120)
            return info, outs

    info, outs = asyncio.run(run())
    assert info.model_name == "demo" and info.max_model_len == 256
    assert all(o.finish_reason == "length" and o.completion_tokens == 5 for o in outs), outs


@slow
def test_killed_replica_loses_no_request_and_is_replaced(cluster):
    cluster, _ = cluster
    before = _health(cluster)["by_replica"]
    victim, pid = next(iter(before.items()))[0], next(iter(before.values()))["pid"]

    async def burst(n, max_tokens, kill=False, shared=True):
        streaming = {victim: asyncio.Event()}
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(_complete(s, cluster, {
                "prompt": f"{SYSTEMS[i % 3] if shared else ''} number {i}", "max_tokens": max_tokens,
                "ignore_eos": True, "stream": i % 2 == 0, "seed": i}, streaming)) for i in range(n)]
            if kill:  # once one of its streams is under way: some die mid-stream, others before a byte
                await asyncio.wait_for(streaming[victim].wait(), 120)
                os.kill(pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 300)

    results = asyncio.run(burst(12, 64, kill=True))
    print(f"killed replica {victim} (pid {pid}): {sum(r['ok'] for r in results)} of {len(results)} "
          f"completed; errors: {[r['error'][:90] for r in results if not r['ok']]}")  # shown with -s
    for r in results:  # each completed, or failed with a clear, retriable error
        assert r["ok"] or ("retry" in r["error"] and r["status"] in (200, 503)), r
    assert sum(r["ok"] for r in results) >= 1
    assert any(not r["ok"] for r in results)  # the victim's started stream was cut, and said so

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        h = _health(cluster)
        if h["healthy"] == 2 and victim not in h["by_replica"]:
            break
        time.sleep(2)
    else:
        pytest.fail(f"no replacement replica within 300 s: {h}")
    fresh = (set(h["by_replica"]) - set(before)).pop()

    async def routed_to_fresh():
        async with aiohttp.ClientSession() as s:
            _, m0 = await _get(s, cluster + "/metrics")
            results = await burst(8, 4, shared=False)  # no prefix anywhere: least loaded
            _, m1 = await _get(s, cluster + "/metrics")
            return results, _per_replica(_decisions(m1)).get(fresh, 0) - _per_replica(_decisions(m0)).get(fresh, 0)

    results, to_fresh = asyncio.run(routed_to_fresh())
    print(f"replacement {fresh} up; it served {to_fresh} of {len(results)} new requests")  # -s
    assert all(r["ok"] for r in results), results
    assert to_fresh > 0
