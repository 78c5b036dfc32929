"""Compiling the step programs: the persistent compilation cache ($ORCA_JAX_COMPILE_CACHE)
lets a restart load the warm-up programs the first start compiled (each start a fresh
process, as a restarted server is), and warm-up stops with advice before XLA:CPU's memory
maps reach the kernel's limit."""
import itertools
import json
import os
import subprocess
import sys

import pytest

START = r"""
import json, sys
import jax
from jax import monitoring
from orca_jax import LLM, SamplingParams

events = {}
monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
llm = LLM(sys.argv[1], max_batch_size=4, max_num_batched_tokens=64, max_prefill_seqs=2,
          max_model_len=64, kv_memory=1 << 22)
out = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
print(json.dumps({"hits": events.get("/jax/compilation_cache/cache_hits", 0),
                  "misses": events.get("/jax/compilation_cache/cache_misses", 0),
                  "tokens": out[0].token_ids}))
"""


def start(model_dir, cache_dir) -> dict:
    env = dict(os.environ, ORCA_JAX_COMPILE_CACHE=str(cache_dir), XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", START, str(model_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_restart_loads_the_warm_up_programs_from_the_cache(demo_model_dir, tmp_path):
    cache = tmp_path / "xla"
    first = start(demo_model_dir, cache)
    written = list(cache.glob("*-cache"))
    assert first["hits"] == 0 and first["misses"] > 0
    assert written, "the first start wrote nothing to the compilation cache"
    second = start(demo_model_dir, cache)
    assert second["tokens"] == first["tokens"]
    # every program the first start persisted (those slower than 0.5 s to compile) is loaded
    assert second["hits"] >= len(written)


def test_warm_up_stops_with_advice_before_the_memory_map_limit(monkeypatch):
    """XLA:CPU maps 3 memory regions per compiled kernel; past vm.max_map_count the process
    dies in the compiler (a deep model's programs get there). Warm-up extrapolates from the
    programs compiled so far and stops first, saying what to change."""
    from orca_jax import runner
    from orca_jax.config import EngineConfig
    from orca_jax.engine import Engine
    from orca_jax.models.gpt2 import GPTConfig, init_params

    if runner.memory_maps() is None:
        pytest.skip("no /proc/self/maps here")
    # Each compiled program maps 1000 more regions, against a limit of 10000: warm-up must
    # stop after its first programs, from the extrapolation. (Counted, not read from
    # /proc/self/maps: how many regions a compile adds depends on what the process compiled
    # and freed before, down to none when XLA reuses freed regions.)
    calls = itertools.count()
    monkeypatch.setattr(runner, "memory_maps", lambda: (1000 + 1000 * next(calls), 10000))
    cfg = GPTConfig(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    ec = EngineConfig(max_batch_size=8, max_num_batched_tokens=64, max_prefill_seqs=4,
                      max_model_len=128, kv_memory=1 << 22)
    with pytest.raises(RuntimeError, match=r"vm\.max_map_count=\d+ .*sysctl"):
        Engine.build(cfg, init_params(cfg), ec)
