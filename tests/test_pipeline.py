"""Pipeline parallelism (sharding/pipeline.py): stages on sub-meshes, n_stages iterations in
flight with different requests, nothing compiled after warm-up, stages measured overlapping.

Greedy outputs on `pipeline=2` and `tensor=2,pipeline=2` equal the 1-device engine's under
every layout in tests/test_sharding.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from orca_jax.bench.stages import stage_activity_from_runs
from orca_jax.engine import Engine, EngineConfig
from orca_jax.models.gpt2 import GPTConfig, init_params
from orca_jax.kv_pages import PagePool
from orca_jax.request import Request, SamplingParams
from orca_jax.scheduler import Scheduler, SchedulerConfig
from orca_jax.sharding.mesh import make_mesh

CFG = GPTConfig(vocab_size=512, n_positions=128, n_embd=64, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)
EC = EngineConfig(max_batch_size=8, max_num_batched_tokens=32, max_prefill_seqs=4, max_model_len=128,
                  kv_memory=1 << 26, warmup=False)


def _req(rid: str, n: int, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), seed=0)


def test_scheduler_skips_requests_in_flight_with_several_workers():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_num_batched_tokens=64, max_prefill_seqs=4,
                                  n_stages=2), num_slots=4, max_len=64, pool=PagePool(16, 16))
    a, b = _req("a", 5), _req("b", 3)
    s.add(a)
    first = s.schedule()
    assert first.requests() == [a]
    s.add(b)
    second = s.schedule()            # `a` is in flight: only the newcomer runs
    assert second.requests() == [b]
    assert not s.schedule()          # both in flight: nothing to do until results are back
    s.iteration_done(first)
    third = s.schedule()
    assert third.decodes == [a] and not third.prefills
    s.iteration_done(second)
    assert s.schedule().decodes == [b]


def test_several_workers_split_the_requests_between_iterations():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_batched_tokens=64, max_prefill_seqs=8,
                                  n_stages=2), num_slots=8, max_len=64, pool=PagePool(32, 16))
    reqs = [_req(str(i), 3) for i in range(6)]
    for r in reqs:
        s.add(r)
    first, second = s.schedule(), s.schedule()
    assert first.requests() == reqs[:3] and second.requests() == reqs[3:]  # FCFS halves
    s.iteration_done(first)
    assert s.schedule().decodes == reqs[:3]


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_cut_prompts_and_preemptions_with_iterations_in_flight(n_stages):
    """Random arrivals, a small budget and a small KV pool (preemptions), n_stages iterations
    in flight (as the engine keeps them): every plan's rows write inside their own pages,
    no page is held twice, every request finishes and the pool is whole again."""
    from orca_jax.plan import Buckets, PagedKV, build_plan
    from orca_jax.request import FinishReason
    for seed in range(40):
        rng = np.random.default_rng(seed)
        cfg = SchedulerConfig(max_batch_size=8, max_num_batched_tokens=16, max_prefill_seqs=4,
                              n_stages=n_stages)
        kv = PagedKV.make(12, 16, 96)
        s = Scheduler(cfg, num_slots=8, max_len=96, pool=PagePool(kv.num_pages, kv.page_size))
        buckets = Buckets.make(8, 16, 4)
        in_flight, done, added = [], 0, 0
        for it in range(300):
            if added < 30 and rng.random() < 0.4:
                s.add(_req(str(added), int(rng.integers(1, 40)), int(rng.integers(1, 8))))
                added += 1
            batch = s.schedule()
            if batch:
                plan = build_plan(batch, buckets, 8, kv, host_decode_tokens=n_stages > 1)
                rows = plan.inputs.meta.kv_index[plan.inputs.meta.slot != 8]
                for r, i in zip(batch.decodes + [c.request for c in batch.prefills
                                                 for _ in range(c.length)], rows):
                    assert i // kv.page_size in r.pages
                s.pool.check([r.pages for r in s.running])
                in_flight.append((batch, plan))
            if in_flight and (len(in_flight) > max(1, n_stages - 1) or not batch):
                b, plan = in_flight.pop(0)
                s.iteration_done(b)
                for row in plan.rows:
                    if row.request.finished:
                        continue
                    row.request.output_ids.append(1)
                    if len(row.request.output_ids) >= row.request.params.max_tokens:
                        s.finish(row.request, FinishReason.LENGTH)
                        done += 1
        assert done == added, (seed, done, added)
        s.pool.check([])


def test_one_worker_reschedules_requests_in_flight():
    """Without stages the engine overlaps host and device by scheduling N+1 before N is back."""
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_num_batched_tokens=64, max_prefill_seqs=4),
                  num_slots=4, max_len=64, pool=PagePool(16, 16))
    a = _req("a", 5)
    s.add(a)
    s.schedule()
    assert s.schedule().decodes == [a]


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=3)


def test_stages_hold_their_layers_on_their_devices(params):
    eng = Engine.build(CFG, params, EC, mesh=make_mesh("tensor=2,pipeline=2"), layout="megatron")
    assert eng.runner.n_stages == 2 and [st.layers for st in eng.runner.stages] == [(0, 2), (2, 4)]
    assert set(eng.runner.params[0]) == {"wte", "wpe", "h"} and set(eng.runner.params[1]) == {"h", "ln_f", "wte"}
    for st, p, state in zip(eng.runner.stages, eng.runner.params, eng.runner.device_states):
        devices = set(st.mesh.devices.flat)
        assert len(devices) == 2
        assert len(p["h"]) == 2  # per-layer arrays of the stage's own layers
        for i, layer in enumerate(p["h"]):
            kernel = layer["mlp"]["c_fc"]["kernel"]                      # [D, F@tensor]
            assert set(kernel.sharding.device_set) == devices
            assert kernel.sharding.spec[1] == "tensor"  # megatron inside the stage
            stacked = params["h"]["mlp"]["c_fc"]["kernel"]              # [L, D, F]
            np.testing.assert_array_equal(np.asarray(kernel), stacked[st.layers[0] + i])
        assert len(state.kv.k) == 2  # its own layers' pages, [H@tensor, P, B, K] each
        for pages in state.kv.k + state.kv.v:
            assert set(pages.sharding.device_set) == devices and pages.sharding.spec[0] == "tensor"
        assert (state.history is None) == (not st.last)  # the sampling stage keeps the slot state
    assert not set(eng.runner.stages[0].mesh.devices.flat) & set(eng.runner.stages[1].mesh.devices.flat)


def test_iterations_in_flight_hold_different_requests(params):
    eng = Engine.build(CFG, params, EC, mesh=make_mesh("pipeline=2"), layout="megatron")
    batches, in_flight = [], []
    schedule = eng.scheduler.schedule

    def recording_schedule():
        b = schedule()
        batches.append({r.request_id for r in b.requests()})
        return b

    eng.scheduler.schedule = recording_schedule
    for i in range(6):
        eng.add_request(list(range(1, 4 + 3 * i)), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                        request_id=str(i))
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            done.setdefault(o.request_id, []).extend(o.token_ids)
        in_flight.append(eng.num_in_flight)
    assert all(len(v) == 6 for v in done.values()) and len(done) == 6
    assert max(in_flight) == 1  # after step() returns: one in flight, the next launched beside it
    assert max(len(b) for b in batches) <= 3  # each iteration takes half of the 6 requests
    for prev, cur in zip(batches, batches[1:]):
        assert not prev & cur, "consecutive iterations (both in flight) must not share a request"
    # both halves of the requests progress: iterations alternate between two groups
    assert sum(1 for b in batches if b) >= 2 * 6


def test_no_compiles_after_warmup_with_stages(params):
    eng = Engine.build(CFG, params, EngineConfig(**{**EC.__dict__, "warmup": True}), mesh=make_mesh("pipeline=2"),
                 layout="megatron")
    shapes = len(eng.buckets.shapes())
    compiled = eng.runner.num_compiles
    assert compiled >= 2 * shapes  # one program per stage and bucket shape, plus sampling
    for i in range(5):
        eng.add_request(list(range(1, 30 + 7 * i)), SamplingParams(max_tokens=9, temperature=0.8, seed=i))
    while eng.has_unfinished():
        eng.step()
    assert eng.runner.num_compiles == compiled


def test_stage_activity_counts_overlap():
    # device 0 = stage 0, device 1 = stage 1; stage 0 runs iteration 2 while stage 1 runs 1
    runs = [(0, 0.0, 1.0), (1, 1.0, 2.0), (0, 1.2, 2.2), (1, 2.2, 3.2), (0, 3.5, 4.0)]
    a = stage_activity_from_runs(runs, [{0}, {1}])
    assert a["window_s"] == pytest.approx(4.0)
    assert a["busy"] == pytest.approx([2.5 / 4, 2.0 / 4])
    assert a["overlap"] == pytest.approx(0.8 / 4)
    assert a["overlapped_starts"] == 1 and a["stage0_periods"] == 3


@pytest.mark.slow  # profiles a real pipelined engine (~30 s)
def test_profiled_stages_overlap(tmp_path):
    import glob

    import jax

    from orca_jax.bench.stages import stage_activity, _stage_devices
    cfg = GPTConfig(vocab_size=1024, n_positions=128, n_embd=256, n_layer=4, n_head=4)
    eng = Engine.build(cfg, init_params(cfg), EngineConfig(max_batch_size=16, max_num_batched_tokens=64, max_prefill_seqs=4,
                                                      max_model_len=128, kv_memory=1 << 27),
                 mesh=make_mesh("pipeline=2"), layout="megatron")
    for i in range(16):
        eng.add_request(list(range(1, 20 + i)), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    jax.profiler.start_trace(str(tmp_path))
    while eng.has_unfinished():
        eng.step()
    jax.profiler.stop_trace()
    path = glob.glob(str(tmp_path / "**" / "*.xplane.pb"), recursive=True)[0]
    a = stage_activity(path, _stage_devices(eng))
    assert a["overlap"] > 0.05 and a["overlapped_starts"] > 0, a
