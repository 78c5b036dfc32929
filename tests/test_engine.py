"""The engine end to end: a random Hugging Face GPT-2 -> convert -> Engine, checked against HF.

One small random model (vocab 1001, not a multiple of 8; 256 positions; 2 layers) and a few
engines over it, built once per module (warm-up compiles every bucket program; the persistent
XLA cache of conftest makes re-runs cheap):

* `engine`: 8 slots, 32-token budget, 4 prompt segments per iteration (prompts over 32 tokens
  are chunked);
* `small_engine`: the same with a 16-token budget: much more chunking, and a bucket set that is
  a subset of `engine`'s, so its programs come out of the cache.

The checkpoint has no tokenizer files, so the engine uses byte-level ids (0..255 are UTF-8
bytes, larger ids decode to ''): text is predictable from token ids. Its EOS id is chosen at
build time as a token the model greedily produces for EOS_PROMPT, so EOS handling can be tested
on a random model. HF references run with no EOS at all (`ignore_eos` on our side).
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from helpers import hf_logits, make_hf_gpt2

from orca_jax import LLM
from orca_jax.checkpoints.hf_gpt2 import convert_hf_gpt2
from orca_jax.engine import Engine, EngineConfig
from orca_jax.request import FinishReason, SamplingParams, Status
from orca_jax.scheduler import QueueFullError
from orca_jax.tokenizer import ByteTokenizer

V, MAX_LEN = 1001, 256
MODEL = dict(vocab_size=V, n_positions=MAX_LEN, n_embd=64, n_layer=2, n_head=4)
MAIN = EngineConfig(max_batch_size=8, max_num_batched_tokens=32, max_prefill_seqs=4)
SMALL = dataclasses.replace(MAIN, max_num_batched_tokens=16)
EOS_PROMPT = [17, 400, 923, 5, 66, 1000, 251, 3, 812]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def prompt_of(rng, n: int) -> list[int]:
    return rng.integers(0, V, size=int(n)).tolist()


# -- the model and its HF references ---------------------------------------------------------


@contextlib.contextmanager
def _torch_one_thread():
    """torch on this 2-core box: one thread is ~8x faster for a model this small."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclasses.dataclass
class Model:
    ckpt: str
    hf: object = dataclasses.field(repr=False)  # transformers GPT2LMHeadModel (eval, CPU, float32)
    eos: int = -1                    # the checkpoint's EOS id
    eos_index: int = -1              # greedy(EOS_PROMPT)[eos_index] == eos, its first occurrence
    _refs: dict = dataclasses.field(default_factory=dict, repr=False)

    def greedy(self, prompt, n: int) -> list[int]:
        """HF `generate(do_sample=False)` of `prompt` alone: n new tokens, no EOS (memoised)."""
        key = tuple(int(t) for t in prompt)
        have = self._refs.get(key, [])
        if len(have) < n:
            ids = torch.tensor([key])
            with torch.no_grad(), _torch_one_thread():
                out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                       do_sample=False, pad_token_id=0)
            have = self._refs[key] = out[0, len(key):].tolist()
            assert len(have) == n, "the HF reference stopped early: it must not see an EOS id"
        return have[:n]

    def log_softmax(self, ids) -> np.ndarray:
        with _torch_one_thread():
            return torch.log_softmax(torch.tensor(hf_logits(self.hf, ids)), -1).numpy()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    d = tmp_path_factory.mktemp("engine-model")
    hf = make_hf_gpt2(d / "hf", seed=0, **MODEL)
    hf.generation_config.eos_token_id = None
    m = Model(str(d / "ckpt"), hf)
    out = m.greedy(EOS_PROMPT, 24)
    m.eos_index = next(i for i in range(4, 24) if out[i] not in out[:i])
    m.eos = out[m.eos_index]
    hf.config.eos_token_id = hf.generation_config.eos_token_id = m.eos
    hf.save_pretrained(d / "hf")
    hf.generation_config.eos_token_id = None  # references in memory never stop
    config = convert_hf_gpt2(d / "hf", d / "ckpt", progress=False)
    assert config.eos_token_id == m.eos and config.vocab_size == V
    return m


def make_engine(model: Model, config: EngineConfig) -> Engine:
    return Engine.from_checkpoint(model.ckpt, config)


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    eng = make_engine(model, MAIN)
    assert eng.num_slots == 8 and eng.max_len == MAX_LEN
    return eng


@pytest.fixture(scope="module")
def small_engine(model) -> Engine:
    return make_engine(model, SMALL)


@pytest.fixture
def idle(request):
    """Checks after a test that the engines it used are drained and every slot is free."""
    yield
    for name in ("engine", "small_engine"):
        if name in request.fixturenames:
            eng = request.getfixturevalue(name)
            assert not eng.has_unfinished()
            assert eng.scheduler.num_free_slots == eng.num_slots
            eng.pool.check([])  # every KV page free again (cached ones included)


# -- running the engine ------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    ids: list = dataclasses.field(default_factory=list)
    text: str = ""
    reason: FinishReason | None = None
    logprobs: list = dataclasses.field(default_factory=list)
    deltas: int = 0


def check_invariants(eng: Engine) -> None:
    """Admission never over-commits: every running request holds its own slot."""
    s = eng.scheduler
    slots = [r.slot for r in s.running]
    assert len(slots) <= eng.num_slots
    assert len(set(slots)) == len(slots), f"two running requests share a slot: {slots}"
    assert all(0 <= x < eng.num_slots for x in slots)
    assert s.num_free_slots + len(slots) == eng.num_slots


def step(eng: Engine, acc: dict) -> list:
    outs = eng.step()
    check_invariants(eng)
    for o in outs:
        r = acc.setdefault(o.request_id, Result())
        assert r.reason is None, f"{o.request_id}: an output after its final one"
        r.ids += o.token_ids
        r.text += o.text
        r.logprobs += o.logprobs or []
        r.deltas += 1
        if o.finished:
            r.reason = o.finish_reason
    return outs


def drain(eng: Engine, acc: dict | None = None, max_steps: int = 20_000) -> dict:
    acc = {} if acc is None else acc
    for _ in range(max_steps):
        if not eng.has_unfinished():
            return acc
        step(eng, acc)
    raise AssertionError("the engine did not finish its requests")


def run(eng: Engine, work: list[tuple[list[int] | str, SamplingParams]]) -> list[Result]:
    reqs = [eng.add_request(p, sp) for p, sp in work]
    acc = drain(eng)
    return [acc[r.request_id] for r in reqs]


def run_one(eng: Engine, prompt, params: SamplingParams) -> Result:
    return run(eng, [(prompt, params)])[0]


# -- iteration-level scheduling gives HF's tokens ------------------------------------------------


def test_48_staggered_requests_match_hf_generate(model, engine, idle):
    """Prompts of 1..255 tokens arriving at different iterations (joining a batch that is
    prefilling, chunking and decoding), each equal to HF `generate` of that prompt alone."""
    rng = np.random.default_rng(0)
    lengths = [1, 2, 3, 255, 224, 216] + np.linspace(4, 250, 42).astype(int).tolist()
    rng.shuffle(lengths)
    work = []
    for i, n in enumerate(lengths):
        room = MAX_LEN - n
        max_tokens = 40 if i % 4 == 0 and room >= 40 else min(room, int(rng.integers(1, 12)))
        work.append((prompt_of(rng, n), max_tokens))
    work.append((prompt_of(rng, 224), 32))  # prompt + max_tokens == the context, exactly
    assert sum(m >= 32 for _, m in work) >= 8

    before, acc, reqs = engine.runner.num_compiles, {}, []
    for wave in range(0, len(work), 7):
        for p, m in work[wave:wave + 7]:
            reqs.append(engine.add_request(p, greedy(m)))
        for _ in range(int(rng.integers(1, 6))):
            step(engine, acc)
    drain(engine, acc)

    assert engine.runner.num_compiles == before
    assert engine.stats.max_batch_size_seen >= 6  # many requests did share iterations
    for req, (p, m) in zip(reqs, work):
        got = acc[req.request_id]
        assert got.reason is FinishReason.LENGTH
        assert got.ids == model.greedy(p, m), f"prompt of {len(p)} tokens, max_tokens={m}"


def test_greedy_tokens_do_not_depend_on_batch_or_chunking(model, engine, small_engine, idle):
    """One request alone, in a full batch of 8 (joining mid-way), and with its prompt chunked
    over 16-token iterations: the same tokens, equal to HF's."""
    rng = np.random.default_rng(1)
    target, params = prompt_of(rng, 100), greedy(32)
    want = model.greedy(target, 32)

    def in_full_batch(eng):
        others = [eng.add_request(prompt_of(rng, n), greedy(int(rng.integers(20, 60))))
                  for n in rng.integers(1, 120, size=7)]
        acc = {}
        step(eng, acc)
        step(eng, acc)
        req = eng.add_request(target, params)
        drain(eng, acc)
        assert all(acc[o.request_id].reason is FinishReason.LENGTH for o in others)
        return acc[req.request_id].ids

    assert run_one(engine, target, params).ids == want
    assert in_full_batch(engine) == want
    assert run_one(small_engine, target, params).ids == want
    assert in_full_batch(small_engine) == want


def test_repetition_penalty_matches_hf_in_a_reused_slot(model, engine, idle):
    """The penalty reads the slot's token history on device: a slot reused after a longer
    request must not see that request's stale tokens."""
    rng = np.random.default_rng(2)
    prompt = prompt_of(rng, 12)
    with torch.no_grad(), _torch_one_thread():
        ids = torch.tensor([prompt])
        want = model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                 do_sample=False, repetition_penalty=1.8,
                                 pad_token_id=0)[0, 12:].tolist()
    params = greedy(24, repetition_penalty=1.8)
    assert run_one(engine, prompt, params).ids == want
    run_one(engine, prompt_of(rng, 200), greedy(40))  # fills slot 0's history with junk
    assert run_one(engine, prompt, params).ids == want


def test_requests_join_and_leave_at_iteration_granularity(model, engine, idle):
    """Orca's point: a request joins the running batch at the next iteration and leaves (its
    result returned) the iteration it finishes, without waiting for the others."""
    rng = np.random.default_rng(11)
    long_prompt, short_prompt = prompt_of(rng, 40), prompt_of(rng, 5)
    long = engine.add_request(long_prompt, greedy(40))
    acc = {}
    for _ in range(4):
        step(engine, acc)
    assert len(long.output_ids) >= 1  # decoding
    short = engine.add_request(short_prompt, greedy(3))
    step(engine, acc)
    assert short.status is Status.RUNNING and long.status is Status.RUNNING
    while short.request_id not in acc or acc[short.request_id].reason is None:
        step(engine, acc)
    assert not long.finished and engine.scheduler.num_free_slots == engine.num_slots - 1
    drain(engine, acc)
    assert acc[short.request_id].ids == model.greedy(short_prompt, 3)
    assert acc[long.request_id].ids == model.greedy(long_prompt, 40)


def test_a_request_id_given_again_samples_with_its_own_params(engine, idle):
    """The engine reuses last iteration's sampling tensors while the same requests fill the
    same rows; a finished request's id given again (other params), taking its row at once
    beside a long request, must not pick them up."""
    rng = np.random.default_rng(4)
    prompt, long_prompt = prompt_of(rng, 3), prompt_of(rng, 5)
    sampled = SamplingParams(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    want = run_one(engine, prompt, sampled).ids
    acc: dict = {}
    engine.add_request(long_prompt, greedy(40), request_id="long")
    engine.add_request(prompt, greedy(4), request_id="again")
    while "again" not in acc or acc["again"].reason is None:
        step(engine, acc)
    del acc["again"]
    engine.add_request(prompt, sampled, request_id="again")  # the same id, straight into the batch
    drain(engine, acc)
    assert acc["again"].ids == want


def test_seeded_sampling_reproducible_across_batch_compositions(engine, small_engine, idle):
    rng = np.random.default_rng(3)
    prompt = prompt_of(rng, 20)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)

    def mixed(eng):
        def noise():
            kind = rng.integers(3)
            return (greedy(int(rng.integers(1, 30))) if kind == 0 else
                    SamplingParams(temperature=float(rng.uniform(0.5, 1.5)), top_k=int(rng.integers(0, 50)),
                                   max_tokens=int(rng.integers(1, 30)), ignore_eos=True))
        for n in rng.integers(1, 80, size=4):
            eng.add_request(prompt_of(rng, n), noise())
        acc = {}
        for _ in range(int(rng.integers(1, 4))):
            step(eng, acc)
        req = eng.add_request(prompt, params)
        for n in rng.integers(1, 80, size=3):
            eng.add_request(prompt_of(rng, n), noise())
        return drain(eng, acc)[req.request_id].ids

    alone = run_one(engine, prompt, params).ids
    assert len(alone) == 24
    assert mixed(engine) == alone
    assert mixed(engine) == alone
    assert mixed(small_engine) == alone
    other_seed = run_one(engine, prompt, dataclasses.replace(params, seed=4321)).ids
    assert other_seed != alone  # the seed does matter
    unseeded = [run_one(engine, prompt, dataclasses.replace(params, seed=None)).ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # no seed: a fresh draw each time


# -- compiled programs and the KV buffer ---------------------------------------------------------


def _random_params(rng) -> SamplingParams:
    kw = dict(max_tokens=int(rng.integers(1, 7)), ignore_eos=bool(rng.integers(2)))
    if rng.random() < 0.3:
        kw["logprobs"] = int(rng.integers(0, 6))
    kind = rng.integers(4)
    if kind == 0:
        kw["temperature"] = 0.0
    elif kind == 1:
        kw.update(temperature=float(rng.uniform(0.2, 2.0)), top_k=int(rng.integers(0, 100)),
                  top_p=float(rng.uniform(0.3, 1.0)), min_p=float(rng.uniform(0, 0.2)),
                  seed=int(rng.integers(2**31)) if rng.random() < 0.5 else None)
    elif kind == 2:
        kw.update(temperature=float(rng.choice([0.0, 0.9])),
                  repetition_penalty=float(rng.uniform(0.8, 2.0)),
                  presence_penalty=float(rng.uniform(-1, 1)), frequency_penalty=float(rng.uniform(-1, 1)))
    else:
        kw.update(temperature=float(rng.choice([0.0, 1.0])), stop=("a", "xy"),
                  stop_token_ids=tuple(int(t) for t in rng.integers(0, V, size=3)))
        kw["min_tokens"] = int(rng.integers(0, kw["max_tokens"] + 1))
    return SamplingParams(**kw)


def _random_workload(eng: Engine, rng, n: int) -> None:
    before = eng.runner.num_compiles
    work = []
    for _ in range(n):
        lo, hi = [(1, 24), (24, 100), (100, 200)][rng.choice(3, p=[0.7, 0.25, 0.05])]
        length = rng.integers(lo, hi)
        work.append((prompt_of(rng, length), _random_params(rng)))
    acc, reqs = {}, []
    while work:
        for _ in range(min(len(work), int(rng.integers(0, 20)))):
            p, sp = work.pop()
            reqs.append((eng.add_request(p, sp), sp))
        for _ in range(int(rng.integers(1, 4))):
            step(eng, acc)
    drain(eng, acc)
    assert eng.runner.num_compiles == before, "a step program was compiled after warm-up"
    for req, sp in reqs:
        got = acc[req.request_id]
        assert got.reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert 1 <= len(got.ids) <= sp.max_tokens and all(0 <= t < V for t in got.ids)
        if got.reason is FinishReason.LENGTH:
            assert len(got.ids) == sp.max_tokens
        if sp.logprobs is not None:
            assert len(got.logprobs) == len(got.ids)
            assert all(len(lp["top"]) == sp.logprobs for lp in got.logprobs)


def test_no_compilation_after_warmup(engine, small_engine, idle):
    """500 random requests (lengths, greedy/sampled/penalties/logprobs/stops mixed, arriving
    at random iterations) run on the programs compiled at warm-up only."""
    rng = np.random.default_rng(4)
    _random_workload(engine, rng, 500)
    _random_workload(small_engine, rng, 100)


def test_kv_buffer_is_donated_not_copied(engine, idle):
    state = engine.runner.device_states[0]
    layers = [*state.kv.k, *state.kv.v]  # every layer's pages
    pointers = lambda kv: [x.unsafe_buffer_pointer() for x in (*kv.k, *kv.v)]
    ptrs = pointers(state.kv)
    engine.add_request(list(range(1, 60)), greedy(6))
    engine.add_request([5], greedy(6))
    acc = {}
    while engine.has_unfinished():
        step(engine, acc)
        assert pointers(engine.runner.device_states[0].kv) == ptrs
    assert all(x.is_deleted() for x in layers), "the step did not donate the KV pages"
    assert engine.stats.iterations > 5


# -- abort, admission and input validation --------------------------------------------------------


def test_abort_mid_prefill_frees_the_slot(model, small_engine, idle):
    eng, rng = small_engine, np.random.default_rng(5)
    long = eng.add_request(prompt_of(rng, 200), greedy(8))
    acc = {}
    step(eng, acc)
    step(eng, acc)
    assert long.status is Status.RUNNING and 0 < long.num_scheduled < long.prompt_len
    assert eng.scheduler.num_free_slots == eng.num_slots - 1
    slot = long.slot
    out = eng.abort(long.request_id)
    assert out.finished and out.finish_reason is FinishReason.ABORT and list(out.token_ids) == []
    assert eng.scheduler.num_free_slots == eng.num_slots
    assert eng.abort(long.request_id) is None  # aborting twice is a no-op
    # The next request takes the same slot at the next iteration, unaffected by what the
    # aborted prompt left in it.
    prompt = prompt_of(rng, 30)
    nxt = eng.add_request(prompt, greedy(10))
    step(eng, acc)
    assert nxt.status is Status.RUNNING and nxt.slot == slot
    drain(eng, acc)
    assert long.request_id not in acc  # nothing after the abort
    assert acc[nxt.request_id].ids == model.greedy(prompt, 10)


def test_abort_mid_decode_frees_the_slot_and_admits_the_next(model, engine, idle):
    rng = np.random.default_rng(6)
    reqs = [engine.add_request(prompt_of(rng, 10), greedy(60)) for _ in range(engine.num_slots)]
    waiting_prompt = prompt_of(rng, 7)
    waiting = engine.add_request(waiting_prompt, greedy(5))
    acc = {}
    while len(reqs[3].output_ids) < 3:
        step(engine, acc)
    assert waiting.status is Status.WAITING and engine.scheduler.num_free_slots == 0
    victim = reqs[3]
    victim_slot = victim.slot
    out = engine.abort(victim.request_id)
    assert out.finish_reason is FinishReason.ABORT and out.finished
    assert engine.scheduler.num_free_slots == 1
    step(engine, acc)  # the waiting request is admitted at the very next iteration
    assert waiting.status is Status.RUNNING and waiting.slot == victim_slot
    got = acc[victim.request_id]
    assert got.reason is None and 3 <= len(got.ids) < 60  # the final came from abort()
    for r in reqs:
        if r is not victim:
            engine.abort(r.request_id)
    drain(engine, acc)
    assert acc[waiting.request_id].ids == model.greedy(waiting_prompt, 5)


def test_abort_waiting_request(engine, idle):
    reqs = [engine.add_request([1, 2, 3], greedy(3)) for _ in range(engine.num_slots + 2)]
    out = engine.abort(reqs[-1].request_id)
    assert out.finish_reason is FinishReason.ABORT and reqs[-1].finished
    acc = drain(engine)
    assert reqs[-1].request_id not in acc
    assert all(acc[r.request_id].reason is FinishReason.LENGTH for r in reqs[:-1])


def test_bad_requests_raise_clear_value_errors(engine, idle):
    rng = np.random.default_rng(7)
    waiting = len(engine.scheduler.waiting)
    with pytest.raises(ValueError, match=r"257 tokens.* maximum context length (is|of) 256"):
        engine.add_request(prompt_of(rng, MAX_LEN + 1), greedy(1), request_id="r")
    with pytest.raises(ValueError, match=r"300 tokens.* maximum context length"):
        engine.add_request("x" * 300, greedy(1), request_id="r")  # text: bytes, not truncated
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request(prompt_of(rng, MAX_LEN), greedy(1), request_id="r")  # no room left
    with pytest.raises(ValueError, match=r"max_tokens=57 .* over the maximum context length of 256"):
        engine.add_request(prompt_of(rng, 200), greedy(57), request_id="r")
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 1001\)"):
        engine.add_request([1, V], greedy(1), request_id="r")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([-1, 5], greedy(1), request_id="r")
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], greedy(1), request_id="r")
    assert len(engine.scheduler.waiting) == waiting  # nothing was queued
    # The id of a refused request is free; prompt + max_tokens == the context is fine.
    ok = engine.add_request(prompt_of(rng, 200), greedy(56), request_id="r")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], greedy(1), request_id="r")
    engine.abort(ok.request_id)


def test_queue_full_beyond_max_waiting(model):
    eng = make_engine(model, dataclasses.replace(SMALL, max_waiting=3, max_model_len=128, warmup=False))
    assert eng.max_len == 128
    with pytest.raises(ValueError, match="maximum context length"):
        eng.add_request(list(range(1, 130)), greedy(1))  # max_model_len binds, not n_positions
    reqs = [eng.add_request([1, 2], greedy(2)) for _ in range(3)]
    with pytest.raises(QueueFullError, match="full"):
        eng.add_request([1, 2], greedy(2))
    eng.abort(reqs[0].request_id)
    eng.add_request([1, 2], greedy(2))  # room again
    assert eng.runner.num_compiles == 0


# -- stop conditions, logprobs -------------------------------------------------------------------


def test_eos_and_stop_token_ids_finish_with_stop(model, engine, idle):
    ref, k = model.greedy(EOS_PROMPT, 24), model.eos_index
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    eos = run_one(engine, EOS_PROMPT, plain)
    assert eos.ids == ref[:k + 1] and eos.reason is FinishReason.STOP  # EOS is kept in the ids
    assert run_one(engine, EOS_PROMPT, greedy(24)).ids == ref  # ignore_eos
    j = next(i for i in range(1, k) if ref[i] not in ref[:i])
    stop = run_one(engine, EOS_PROMPT, greedy(24, stop_token_ids=(ref[j], 999 if ref[j] != 999 else 998)))
    assert stop.ids == ref[:j + 1] and stop.reason is FinishReason.STOP
    length = run_one(engine, EOS_PROMPT, SamplingParams(temperature=0.0, max_tokens=k))
    assert length.ids == ref[:k] and length.reason is FinishReason.LENGTH


def test_min_tokens_defers_eos(model, engine, idle):
    ref, k = model.greedy(EOS_PROMPT, 24), model.eos_index
    got = run_one(engine, EOS_PROMPT, SamplingParams(temperature=0.0, max_tokens=24, min_tokens=k + 3))
    assert len(got.ids) >= k + 3 and got.ids[:k] == ref[:k]
    assert got.reason is FinishReason.LENGTH or got.ids[-1] == model.eos


def test_min_tokens_masks_eos_like_hf(model, engine, idle):
    m = model.eos_index + 3
    with torch.no_grad(), _torch_one_thread():
        ids = torch.tensor([EOS_PROMPT])
        want = model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                 min_new_tokens=m, eos_token_id=model.eos, do_sample=False,
                                 pad_token_id=0)[0, len(EOS_PROMPT):].tolist()
    got = run_one(engine, EOS_PROMPT, SamplingParams(temperature=0.0, max_tokens=24, min_tokens=m))
    assert model.eos not in got.ids[:m]
    assert got.ids == want


def _stop_string_case(model) -> tuple[list[int], list[int], str, int]:
    """A prompt whose greedy output has two printable ASCII bytes next to each other in its
    byte stream (ids over 255 are text-less and may sit between them): a 2-character stop
    string that is necessarily split over two or more tokens. Returns (prompt, 40-token
    reference, stop string, index of the token that completes it)."""
    rng = np.random.default_rng(8)
    for _ in range(60):
        prompt = prompt_of(rng, rng.integers(3, 30))
        ref = model.greedy(prompt, 40)
        stream = [(i, t) for i, t in enumerate(ref) if t < 256]
        for (i1, b1), (i2, b2) in zip(stream, stream[1:]):
            if i1 >= 2 and 32 <= b1 < 127 and 32 <= b2 < 127:
                return prompt, ref, chr(b1) + chr(b2), i2
    raise AssertionError("no greedy output with an ASCII pair; change the seed")


def test_stop_string_split_across_tokens(model, engine, idle):
    prompt, ref, stop, end = _stop_string_case(model)
    full = run_one(engine, prompt, greedy(40))
    assert full.ids == ref and full.reason is FinishReason.LENGTH
    # the whole output's text, less a trailing character it never completed (dropped, as vLLM)
    assert full.text == ByteTokenizer().decode(ref).rstrip("\ufffd")
    at = full.text.index(stop)

    got = run_one(engine, prompt, greedy(40, stop=(stop, "\x00never")))
    assert got.reason is FinishReason.STOP
    assert got.ids == ref[:end + 1]  # the token completing the stop string is the last one
    assert got.text == full.text[:at] and stop not in got.text

    incl = run_one(engine, prompt, greedy(40, stop=[stop], include_stop_str_in_output=True))
    assert incl.ids == ref[:end + 1] and incl.text == full.text[:at + len(stop)]

    # A stop-string prefix held back mid-stream is released when the request ends otherwise.
    held = run_one(engine, prompt, greedy(end, stop=[stop]))
    assert held.reason is FinishReason.LENGTH and held.text == full.text[:at + 1]


def test_logprobs_equal_hf_log_softmax(model, engine, idle):
    rng = np.random.default_rng(9)
    prompt, n = prompt_of(rng, 45), 8  # over the 32-token budget: the prompt is chunked
    got = run_one(engine, prompt, greedy(n, logprobs=5))
    ref = model.greedy(prompt, n)
    assert got.ids == ref and len(got.logprobs) == n
    lsm = model.log_softmax(prompt + ref[:-1])[len(prompt) - 1:]
    for i, lp in enumerate(got.logprobs):
        assert lp["token_id"] == ref[i]
        np.testing.assert_allclose(lp["logprob"], lsm[i, ref[i]], atol=1e-4, rtol=0)
        top = sorted(lp["top"].items(), key=lambda kv: -kv[1])
        want = np.argsort(-lsm[i], kind="stable")[:5]
        assert [t for t, _ in top] == want.tolist()
        np.testing.assert_allclose([x for _, x in top], lsm[i, want], atol=1e-4, rtol=0)

    # Sampled tokens report the logprob of the raw distribution (vLLM's default), and
    # logprobs=0 gives the sampled token's only.
    sp = SamplingParams(temperature=0.8, seed=7, max_tokens=n, ignore_eos=True, logprobs=0)
    got = run_one(engine, prompt, sp)
    lsm = model.log_softmax(prompt + got.ids[:-1])[len(prompt) - 1:]
    assert [lp["top"] for lp in got.logprobs] == [{}] * n
    np.testing.assert_allclose([lp["logprob"] for lp in got.logprobs],
                               lsm[np.arange(n), got.ids], atol=1e-4, rtol=0)
    assert run_one(engine, prompt, greedy(n)).logprobs == []  # none unless asked


# -- the static (request-level) baseline -------------------------------------------------------


def test_static_policy_waits_for_the_whole_batch(model, engine, idle):
    eng = make_engine(model, dataclasses.replace(SMALL, policy="static"))
    rng = np.random.default_rng(10)
    first = [(prompt_of(rng, 4), 3), (prompt_of(rng, 5), 9), (prompt_of(rng, 6), 6)]
    late = [(prompt_of(rng, 3), 4), (prompt_of(rng, 7), 2)]
    batch1 = [eng.add_request(p, greedy(m)) for p, m in first]
    acc, finals = {}, []
    step(eng, acc)
    assert all(r.status is Status.RUNNING for r in batch1)
    batch2 = [eng.add_request(p, greedy(m)) for p, m in late]
    while any(not r.finished for r in batch1):
        assert all(r.status is Status.WAITING for r in batch2), "a request joined a running static batch"
        finals.append({o.request_id for o in step(eng, acc) if o.finished})
    drain(eng, acc)
    # Request-level batching: the batch's results come back together, when all of it is done.
    assert finals[-1] == {r.request_id for r in batch1} and not any(finals[:-1])
    for r, (p, m) in zip(batch1 + batch2, first + late):
        assert acc[r.request_id].ids == model.greedy(p, m)
    assert not eng.has_unfinished()
    iteration = run(engine, [(p, greedy(m)) for p, m in first + late])
    assert [acc[r.request_id].ids for r in batch1 + batch2] == [r.ids for r in iteration]


# -- the offline API ---------------------------------------------------------------------------


def test_llm_generate_text_and_token_prompts(model):
    llm = LLM(model.ckpt, engine_config=dataclasses.replace(SMALL, warmup=False))
    prompts = ["Hello, world", [5, 900, 17], "Orca", list(range(300, 340))]
    outs = llm.generate(prompts, greedy(12), use_tqdm=False)
    assert len(outs) == 4
    tok = ByteTokenizer()
    for out, p in zip(outs, prompts):
        ids = tok.encode(p) if isinstance(p, str) else p
        assert list(out.token_ids) == model.greedy(ids, 12)
        assert out.text == tok.decode(out.token_ids).rstrip("\ufffd")  # an unfinished last character: dropped
        assert out.finished and out.finish_reason is FinishReason.LENGTH
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 12
    # per-prompt params, a single prompt, and an EOS stop through the offline API
    two = llm.generate([EOS_PROMPT, "x"], [SamplingParams(temperature=0.0, max_tokens=24), greedy(3)],
                       use_tqdm=False)
    assert two[0].finish_reason is FinishReason.STOP and two[0].token_ids[-1] == model.eos
    assert len(two[1].token_ids) == 3
    (one,) = llm.generate("Hello, world", greedy(12), use_tqdm=False)
    assert one.token_ids == outs[0].token_ids
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate(["a"], [greedy(1), greedy(1)], use_tqdm=False)


def test_engines_from_one_checkpoint_coexist(model, engine):
    """Regression: Engine.__init__ once took its device with `leaf.devices().pop()`, emptying the
    device set JAX caches on the checkpoint's mesh, so the next engine in the process failed."""
    cfg = dataclasses.replace(SMALL, warmup=False)
    a, b = Engine.from_checkpoint(model.ckpt, cfg), Engine.from_checkpoint(model.ckpt, cfg)
    prompt = [3, 1, 4, 1, 5]
    assert run_one(a, prompt, greedy(4)).ids == run_one(b, prompt, greedy(4)).ids \
        == run_one(engine, prompt, greedy(4)).ids == model.greedy(prompt, 4)


@pytest.mark.slow
def test_many_random_greedy_requests_match_hf(model, small_engine, idle):
    """`pytest -m slow`: 200 random greedy requests at random iterations through 16-token
    iterations (every long prompt chunked), each against HF `generate` alone."""
    rng = np.random.default_rng(12)
    work = []
    for _ in range(200):
        n = int(rng.integers(1, MAX_LEN))
        work.append((prompt_of(rng, n), int(rng.integers(1, min(48, MAX_LEN - n) + 1))))
    acc, reqs, todo = {}, [], list(work)
    while todo:
        for _ in range(min(len(todo), int(rng.integers(0, 6)))):
            p, m = todo.pop(0)
            reqs.append(small_engine.add_request(p, greedy(m)))
        step(small_engine, acc)
    drain(small_engine, acc)
    for req, (p, m) in zip(reqs, work):
        assert acc[req.request_id].ids == model.greedy(p, m), f"prompt of {len(p)} tokens"
