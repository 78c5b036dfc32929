"""Two processes on localhost, 2 virtual CPU devices each, one global `tensor=4` mesh.

Each process runs `jax.distributed.initialize` (gloo CPU collectives), places the same
parameters by the megatron layout (every tensor group spans both processes), and:

* computes prefill logits with the jitted model on the global mesh: they must equal the
  single-device logits computed here;
* serves the same greedy requests in lockstep (`sharding.multihost.lockstep_step`: process 0
  broadcasts arrivals and aborts, every scheduler decides the same): token ids equal a
  1-device engine's.

This file is also the worker: ``python tests/test_multihost.py PROCESS_ID N PORT OUT``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MODEL = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
EC = dict(max_batch_size=8, max_num_batched_tokens=64, max_prefill_seqs=4, max_model_len=128,
          warmup=False, kv_memory=1 << 28)
PROMPT = list(range(3, 43))
# (arrival iteration, prompt length, max new tokens)
SCHEDULE = [(0, 1, 6), (0, 17, 5), (0, 70, 4), (2, 5, 6), (3, 30, 3), (3, 8, 12)]
ABORTS = {5: ["5"]}  # iteration -> request ids aborted before it (a client went away)


def _params(config):
    """The same random host params in every process (numpy, seeded)."""
    import jax

    from orca_jax.models.gpt2 import abstract_params
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(a.dtype), abstract_params(config))


def _prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(1, MODEL["vocab_size"], size=n).tolist() for _, n, _ in SCHEDULE]


def _serve(engine, step) -> list[list[int]]:
    """Runs SCHEDULE and ABORTS through `step(arrivals, aborts) -> outputs`; returns each
    request's token ids."""
    from orca_jax.request import SamplingParams
    prompts, out, it = _prompts(), [[] for _ in SCHEDULE], 0
    while it <= max(a for a, _, _ in SCHEDULE) or engine.has_unfinished():
        arrivals = [(str(i), prompts[i], SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
                    for i, (a, _, m) in enumerate(SCHEDULE) if a == it]
        for o in step(arrivals, ABORTS.get(it, [])):
            out[int(o.request_id)].extend(o.token_ids)
        it += 1
    return out


def _worker(process_id: int, n: int, port: int, out: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).parent))
    from orca_jax.sharding import multihost
    multihost.initialize(f"127.0.0.1:{port}", n, process_id)

    import jax
    import jax.numpy as jnp
    from helpers import _forward, _kv
    from jax.experimental import multihost_utils

    from orca_jax.models.attention import AttnMeta

    from orca_jax.engine import Engine, EngineConfig
    from orca_jax.models.gpt2 import GPTConfig
    from orca_jax.sharding.layouts import param_shardings
    from orca_jax.sharding.mesh import make_mesh

    assert jax.process_count() == n and jax.device_count() == 2 * n
    config = GPTConfig(**MODEL)
    mesh = make_mesh("tensor=4")
    params = jax.device_put(_params(config), param_shardings(config, mesh, "megatron"))
    kernel = params["h"]["mlp"]["c_fc"]["kernel"]
    assert not kernel.is_fully_addressable  # each process holds 2 of the 4 shards
    # helpers.prefill_logits, but the result is a global array: gather it instead of np.asarray.
    T = len(PROMPT)
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    meta = AttnMeta(slot=i32([1] * T), pos=i32(range(T)), seg=i32([0] * T), dec_blocks=i32(0),
                    hist_seg=i32(-2), hist_slot=i32(0), hist_len=i32(0), hist_blocks=i32(0), num_decode=0)
    kv = _kv(config, 4, jax.NamedSharding(mesh, jax.P()))
    logits = multihost_utils.process_allgather(_forward(config, params)(PROMPT, kv, meta)[0], tiled=True)

    engine = Engine(config, _params(config), EngineConfig(**EC), mesh=mesh, layout="megatron")
    tokens = _serve(engine, lambda arrivals, aborts: multihost.lockstep_step(engine, arrivals, aborts))
    Path(out).write_text(json.dumps({"logits": np.asarray(logits).tolist(), "tokens": tokens}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two extra JAX processes compiling: ~40-70 s on 2 cores
def test_two_processes_one_global_mesh(tmp_path):
    import jax
    from helpers import prefill_logits

    from orca_jax.engine import Engine, EngineConfig
    from orca_jax.models.gpt2 import GPTConfig

    port, n = _free_port(), 2
    env = {**os.environ, "ORCA_JAX_COMPILE_CACHE": "off", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(n), str(port), str(tmp_path / f"{i}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(n)]

    config = GPTConfig(**MODEL)
    one = jax.devices()[0]
    with jax.default_device(one):
        want = prefill_logits(config, jax.device_put(_params(config), one), PROMPT)
    engine = Engine(config, _params(config), EngineConfig(**EC))

    def local_step(arrivals, aborts):
        for rid in aborts:
            engine.abort(rid)
        for rid, ids, params in arrivals:
            engine.add_request(ids, params, request_id=rid)
        return engine.step()

    want_tokens = _serve(engine, local_step)
    for r in results:
        np.testing.assert_allclose(np.asarray(r["logits"]), want, atol=2e-5, rtol=0)
        assert r["tokens"] == want_tokens
    assert 0 < len(want_tokens[5]) < 12  # the abort cut request 5 short    assert results[0]["tokens"] == results[1]["tokens"]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
