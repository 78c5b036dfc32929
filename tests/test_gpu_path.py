"""What the engine compiles for GPUs, checked on CPU (docs/gpu.md).

On XLA:GPU a `while` whose trip count is only known at run time and a `conditional` copy their
predicate to the host and wait for the device to reach it, every time: a step would stall
on the host hundreds of times and lose the overlap of "prepare N+1 while N runs". The GPU path
(`--attention-backend xla-static` or `pallas`, `--sampling-control host`, what `auto` picks on
CUDA) has neither; these tests compile it here and read its HLO, check it gives the device
path's tokens, and check the other GPU defaults: full float32 matmul precision for float32
models (NVIDIA GPUs would run them in TF32) and the backend choice.
"""
from __future__ import annotations

import dataclasses
import re
import threading
import types

import jax
import numpy as np
import pytest
from helpers import converted_gpt2

from orca_jax.engine import Engine, EngineConfig
from orca_jax.models import cpu_kernels
from orca_jax.plan import SAMPLING_SWITCHES, PagedKV, SamplingTensors, warmup_plan
from orca_jax.request import SamplingParams
from orca_jax.runner import kv_budget_bytes, resolve_attention_backend, resolve_controls

V = 1001
# The XLA CPU path (runtime trip counts, conds): what the GPU path must not compile. (The CPU
# default, the C++ kernels, has no attention loops either: tests/test_cpu_kernels.py.) No CPU
# kernel on either, as on a GPU: XLA's attention, dense layers and greedy pick.
CPU = EngineConfig(max_batch_size=8, max_num_batched_tokens=32, max_prefill_seqs=4, kv_memory=int(32e6),
                   attention_backend="xla", matmul_backend="xla")
GPU_PATH = dataclasses.replace(CPU, attention_backend="xla-static", sampling_control="host")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return converted_gpt2(tmp_path_factory.mktemp("gpu-path"), seed=3, n_positions=256, n_embd=64, n_head=4)


@pytest.fixture(scope="module")
def engines(ckpt):
    """(the CPU path, the GPU path) over one checkpoint, both warmed up."""
    return Engine.from_checkpoint(ckpt, CPU), Engine.from_checkpoint(ckpt, GPU_PATH)


def _while_loops(hlo: str) -> tuple[int, int]:
    """(while loops, those whose trip count XLA knows at compile time) in compiled HLO text."""
    loops = [line for line in hlo.splitlines() if re.search(r"\bwhile\(", line)]
    return len(loops), sum("known_trip_count" in line for line in loops)


def _full_sampling(rows: int) -> SamplingTensors:
    st = SamplingTensors.from_params([], [], [], rows)
    return dataclasses.replace(st, **dict.fromkeys(SAMPLING_SWITCHES, np.True_))


def test_gpu_path_step_and_sampler_have_no_runtime_loops_or_conditionals(engines):
    """Every program of the largest mixed bucket (decode rows, prefill rows with history
    segments, sampling with every stage on): on the GPU path, no `conditional` and every
    `while` with a known trip count; the CPU path has both (so the check can fail)."""
    for eng, gpu in zip(engines, (False, True)):
        r, b = eng.runner, eng.buckets
        plan = warmup_plan(b.decode[-1], b.prefill[-1], b, r.num_slots, r.kv, r.host_decode_tokens)
        step, sample = r.compiled_step(0, plan), r.compiled_sample(plan, _full_sampling(plan.num_sample_rows))
        loops, known = _while_loops(step)
        if gpu:
            assert loops == known, f"{loops - known} while loops with a runtime trip count"
            assert "conditional(" not in step and "conditional(" not in sample
            assert _while_loops(sample)[0] == _while_loops(sample)[1]
        else:
            assert loops > known and "conditional(" in sample


def _workload(rng):
    """Prompts that share prefixes (prefix-cache hits: history read from pages), long ones
    (chunked over iterations), and every kind of sampling."""
    base = rng.integers(0, V, 70).tolist()
    kinds = [dict(temperature=0.0), dict(temperature=0.0, logprobs=3),
             dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=11),
             dict(temperature=1.1, seed=5, logprobs=2),
             dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
             dict(temperature=0.0, min_tokens=4)]
    work = []
    for i in range(18):
        prompt = base[:int(rng.integers(40, 70))] + rng.integers(0, V, int(rng.integers(1, 90))).tolist()
        work.append((prompt, SamplingParams(max_tokens=int(rng.integers(1, 12)), ignore_eos=True, **kinds[i % 6])))
    return work


def _run(eng: Engine, work):
    out, reqs = {}, []
    for i, (prompt, sp) in enumerate(work):
        reqs.append(eng.add_request(prompt, sp))
        if i % 5 == 4:  # requests join while others run
            for o in eng.step():
                out.setdefault(o.request_id, []).append(o)
    while eng.has_unfinished():
        for o in eng.step():
            out.setdefault(o.request_id, []).append(o)
    ids = lambda rid: [t for o in out[rid] for t in o.token_ids]
    lps = lambda rid: [lp["logprob"] for o in out[rid] for lp in o.logprobs or []]
    return [(ids(r.request_id), lps(r.request_id)) for r in reqs]


def test_gpu_path_gives_the_cpu_paths_tokens_and_compiles_nothing_more(engines):
    """Same tokens (greedy, seeded samples, penalties, min_tokens) and logprobs from both paths
    over a workload that reads history from pages; the GPU path's greedy and full sampling
    programs were all compiled at warm-up."""
    cpu, gpu = engines
    work = _workload(np.random.default_rng(0))
    before = gpu.runner.num_compiles
    want, got = _run(cpu, work), _run(gpu, work)
    assert gpu.runner.num_compiles == before, "the GPU path compiled a program after warm-up"
    assert gpu.pool.hits > 0, "no prompt read a cached prefix from the pages"
    for (ids_w, lp_w), (ids_g, lp_g) in zip(want, got):
        assert ids_g == ids_w
        np.testing.assert_allclose(lp_g, lp_w, atol=1e-5, rtol=0)


def test_warmup_compiles_in_parallel_threads_before_the_first_iteration(ckpt):
    """Warm-up lowers every program, compiles them in a thread pool, then runs one iteration
    per shape from jit's cache: no compile happens on the dispatching thread."""
    eng = Engine.from_checkpoint(ckpt, dataclasses.replace(GPU_PATH, max_num_batched_tokens=16, warmup=False))
    threads = []
    listener = lambda name, *_, **__: threads.append(threading.current_thread().name) \
        if name == "/jax/core/compile/backend_compile_duration" else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        eng.runner.warmup(eng.buckets)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    programs = len(eng.buckets.shapes()) + 4 * len({warmup_plan(d, p, eng.buckets, eng.num_slots, eng.kv).num_sample_rows
                                                     for d, p in eng.buckets.shapes()})
    assert eng.runner.num_compiles == programs  # every step shape; greedy and full per R, each also constrained
    times = eng.runner.warmup_times  # each program's compile time, by name
    assert len(times) == programs and all(t > 0 for t in times.values())
    assert {"step Td=1 Tp=0", "sample R=1 greedy", "sample R=1 full", "sample R=1 greedy constrained",
            "sample R=1 full constrained"} <= set(times)
    assert len(threads) == programs and all(t.startswith("orca-compile") for t in threads), threads


def test_float32_models_run_full_precision_matmuls(engines, ckpt):
    """auto: float32 models at HIGHEST (TF32 off on NVIDIA GPUs), 16-bit ones at DEFAULT; the
    flag overrides it. The compiled step's dots say which."""
    assert resolve_controls(CPU, "gpu", np.float32) == ("host", "highest")
    assert resolve_controls(CPU, "cpu", jax.numpy.bfloat16) == ("device", "default")
    assert resolve_controls(dataclasses.replace(CPU, matmul_precision="high"), "gpu", np.float32)[1] == "high"
    eng = engines[0]
    b, r = eng.buckets, eng.runner
    plan = warmup_plan(b.decode[1], 0, b, r.num_slots, r.kv, r.host_decode_tokens)
    dots = re.findall(r"operand_precision=\{(\w+),", r.compiled_step(0, plan))
    assert dots and set(dots) == {"highest"}


def _mesh(platform: str):
    return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]), shape={}, size=1)


def test_attention_backend_auto_per_platform_dtype_and_window():
    kv = PagedKV.make(64, 16, 256)
    auto = lambda platform, **kw: resolve_attention_backend("auto", _mesh(platform), kv, 64, **kw)
    assert auto("cpu") == ("cpu" if cpu_kernels.load() is None else "xla")  # the C++ kernel, if it builds
    assert auto("cpu", dtype=jax.numpy.bfloat16) == "xla"
    assert auto("gpu", dtype=jax.numpy.bfloat16) == "pallas"
    assert auto("gpu", dtype=np.float32) == "xla-static"  # the kernel's dots would run in TF32
    assert auto("gpu", dtype=jax.numpy.bfloat16, sliding_window=40) == "xla-static"
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        resolve_attention_backend("pallas", _mesh("cpu"), kv, 64)
    assert resolve_attention_backend("xla-static", _mesh("cpu"), kv, 64) == "xla-static"


def _device(platform: str, stats):
    return types.SimpleNamespace(platform=platform, id=0, memory_stats=lambda: stats)


def test_kv_budget_on_accelerators_is_most_of_what_the_allocator_has_left():
    """GPU: 0.9 of XLA's pool after the weights by default (not half, not host RAM); the flag
    and --kv-memory override; no pool limit (platform allocator) asks for --kv-memory."""
    gib = 2**30
    gpu = _device("gpu", {"bytes_limit": 100 * gib, "bytes_in_use": 20 * gib})
    assert kv_budget_bytes(EngineConfig(), gpu) == int(0.9 * 80 * gib)
    assert kv_budget_bytes(EngineConfig(kv_memory_fraction=0.5), gpu) == 40 * gib
    assert kv_budget_bytes(EngineConfig(kv_memory=gib), gpu) == gib
    with pytest.raises(ValueError, match="--kv-memory"):
        kv_budget_bytes(EngineConfig(), _device("gpu", {"bytes_in_use": 0}))
    ram = kv_budget_bytes(EngineConfig(), _device("cpu", None))
    assert 0 < ram < 2**50
