"""The engine core: one iteration at a time, as in the paper (Orca Algorithm 1).

    Engine.step():  batch = scheduler.schedule()        # pick this iteration's work (host)
                    plan  = build_plan(batch, buckets)  # padded numpy arrays (host)
                    runner.run(plan, sampling)          # asynchronous: the device starts
                    runner.fetch(PREVIOUS iteration)    # host work overlaps device work
                    output processor: detokenize, stop checks, deltas; finished requests
                    leave the batch at once
                    -> StepResult(outputs, batch)

Three parts, three files: the scheduler (scheduler.py) picks work and owns the KV pages (kv_pages.py); the
runner (runner.py) owns everything on the device (parameters, KV buffer, compiled programs,
other processes); the output processor (outputs.py) turns sampled ids into deltas. The core
here holds the request registry and wires them together; it never touches JAX, so tests run
it over a fake runner (tests/fake_model.py).

With pipeline stages up to `n_stages` iterations are in flight, each with different requests
(Orca §4.3); otherwise one, whose results are read while the next one runs.
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import time
import uuid
from typing import Callable, Iterator, Sequence

import numpy as np

from .config import EngineConfig, scheduler_config
from .outputs import OutputProcessor, Sampled
from .plan import Buckets, SamplingTensors, StepPlan, build_plan
from .request import FinishReason, Request, RequestOutput, SamplingParams
from .kv_pages import PagePool, SwapSpace
from .scheduler import Batch, Scheduler
from .structured import Grammars, constraint_tensors
from .tokenizer import ByteTokenizer, load_tokenizer

log = logging.getLogger("orca_jax")


def freeze_startup_heap() -> None:
    """Take everything alive now (JAX, the model, compiled programs: ~270k objects) out of the
    garbage collector's reach: a full collection over it took ~145 ms here, a pause of every
    stream whenever one ran (vLLM and SGLang do the same after start-up). For the process that
    serves, once its engine is built: a library Engine does not call it, or every engine a
    process dropped afterwards would stay alive for good."""
    gc.collect()
    gc.freeze()

# Rough costs for choosing swap or recompute per preempted request (SwapSpace): host copy
# bandwidth out and back, and the matmul rate of a prefill, per platform.
HOST_COPY_BYTES_PER_S = {"cpu": 5e9, "gpu": 2e10}
PREFILL_FLOPS_PER_S = {"cpu": 1.5e11, "gpu": 2e14}
SWAP_FIXED_S = 2e-3  # a swap waits for the device once


def swap_space(config: EngineConfig, model_config, kv, platform: str) -> SwapSpace | None:
    """The host tier of `--swap-space` GiB: its room in pages (K and V of every layer, whole
    heads) and its cost model, estimated from the model's KV bytes and FLOPs per token."""
    if not config.swap_space:
        return None
    platform = "gpu" if platform == "gpu" else "cpu"
    itemsize = 2 if model_config.dtype in ("bfloat16", "float16") else 4
    kv_per_token = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * itemsize
    capacity = int(config.swap_space * 2**30) // (kv_per_token * kv.page_size)
    return SwapSpace(capacity, 2 * kv_per_token / HOST_COPY_BYTES_PER_S[platform],
                     2 * model_config.num_params() / PREFILL_FLOPS_PER_S[platform], SWAP_FIXED_S,
                     config.preemption_mode)


def eos_token_ids(model_config, tokenizer) -> tuple[int, ...]:
    """Every id that ends a sequence (unless ignore_eos), as vLLM stops: the model config's
    (config.json may list several), generation_config.json's, else the tokenizer's EOS."""
    ids = [model_config.eos_token_id, *getattr(model_config, "eos_token_ids", ()),
           *getattr(tokenizer, "generation_eos_ids", ())]
    ids = [i for i in dict.fromkeys(ids) if i is not None and 0 <= i < model_config.vocab_size]
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return tuple(ids)


ISOLATED_IN_A_ROW = 3  # one-request iterations blamed in a row before the engine is at fault


@dataclasses.dataclass
class EngineStats:
    iterations: int = 0
    tokens: int = 0                  # real tokens computed (prompt + decode)
    padded_tokens: int = 0           # rows computed including bucket padding
    host_seconds: float = 0.0        # scheduling, packing, dispatch and post-processing
    device_wait_seconds: float = 0.0  # blocked on the device's results
    batch_size_sum: int = 0          # requests per iteration, summed (mean = sum / iterations)
    max_batch_size_seen: int = 0


@dataclasses.dataclass(slots=True)
class StepResult:
    """What one `Engine.step()` did: iterate it for the outputs."""

    outputs: list[RequestOutput]     # deltas of every request that made progress
    batch: Batch | None = None       # the iteration launched by this step (None: none)

    def __iter__(self) -> Iterator[RequestOutput]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)

    @property
    def batch_size(self) -> int:
        """Requests in the launched iteration (0: the step only read results back)."""
        return len(self.batch.decodes) + len(self.batch.prefills) if self.batch else 0

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens if self.batch else 0


@dataclasses.dataclass(slots=True)
class _InFlight:
    batch: Batch
    plan: StepPlan
    out: object          # what runner.run returned: device arrays, or a future of them
    want_logprobs: bool


class Engine:
    # Tests inject a failure into one request's part of an iteration with this:
    # `fault_hook(stage, request)`, stage "prepare" (its host inputs) or "output" (its token's
    # post-processing), called for every request of every iteration when set.
    fault_hook: Callable[[str, Request], None] | None = None

    def __init__(self, runner, engine_config: EngineConfig = EngineConfig(), tokenizer=None):
        """`runner`: a ModelRunner (runner.py), or anything with its interface (tests: a fake).
        `Engine.build` and `Engine.from_checkpoint` make the runner too."""
        self.runner = runner
        self.config = engine_config
        self.model_config = runner.model_config
        self.tokenizer = tokenizer or ByteTokenizer()
        self.num_slots, self.max_len, self.kv = runner.num_slots, runner.max_len, runner.kv
        sched = scheduler_config(engine_config, runner.num_slots, runner.n_stages)
        self.buckets = Buckets.make(sched.max_batch_size, sched.max_num_batched_tokens,
                                    sched.max_prefill_seqs)
        if engine_config.bucket_chunking:  # chunks cut back to fit them
            sched = dataclasses.replace(sched, prefill_buckets=self.buckets.prefill[1:])
        self.pool = PagePool(self.kv.num_pages, self.kv.page_size, engine_config.enable_prefix_caching)
        self.scheduler = Scheduler(sched, runner.num_slots, runner.max_len, self.pool,
                                   swap_space(engine_config, self.model_config, self.kv,
                                              getattr(runner, "platform", "cpu")))
        self.eos_token_ids = eos_token_ids(self.model_config, self.tokenizer)
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.output = OutputProcessor(self.tokenizer, self.eos_token_ids,
                                      static=engine_config.policy == "static")
        # Structured output: the tokenizer as llguidance sees it, built on the first grammar.
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self._rng = np.random.default_rng(engine_config.seed)
        self._requests: dict[str, Request] = {}
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        self._blamed_in_a_row = 0  # iterations in a row whose every request was blamed (_isolate)
        self._sampling = None  # (the rows' requests, their SamplingTensors, any constrained) of the last iteration
        self.stats = EngineStats()
        log.info("KV cache: %d pages x %d tokens = %d tokens of KV (%.1f MiB per device), %s "
                 "admission, prefix caching %s; %d sequences of up to %d tokens; %d step programs "
                 "x %d stage(s)", self.kv.num_pages, self.kv.page_size,
                 self.kv.num_pages * self.kv.page_size, getattr(runner, "kv_bytes", 0) / 2**20,
                 engine_config.kv_admission, "on" if engine_config.enable_prefix_caching else "off",
                 self.num_slots, self.max_len, len(self.buckets.shapes()), runner.n_stages)
        if engine_config.warmup:
            runner.warmup(self.buckets)

    @classmethod
    def build(cls, config, params, engine_config: EngineConfig = EngineConfig(), tokenizer=None,
              mesh=None, layout="replicated", peers=None) -> "Engine":
        """An engine over a ModelRunner that places `params` on `mesh` by `layout` (runner.py)."""
        from .runner import ModelRunner
        runner = ModelRunner(config, params, engine_config, mesh=mesh, layout=layout, peers=peers)
        return cls(runner, engine_config, tokenizer)

    @classmethod
    def from_checkpoint(cls, path: str, engine_config: EngineConfig = EngineConfig(),
                        dtype: str | None = None, mesh=None, layout="replicated",
                        peers=None) -> "Engine":
        """Restores the parameters straight into the layout's shardings on `mesh`."""
        from .checkpoints.store import load_checkpoint
        from .sharding.layouts import pipelined
        from .sharding.mesh import single_device_mesh
        mesh = mesh or single_device_mesh()
        # pipelined: each stage's layers are restored onto that stage's devices only
        config, params = load_checkpoint(path, mesh=mesh, layout=pipelined(layout), dtype=dtype)
        return cls.build(config, params, engine_config, load_tokenizer(path), mesh, layout, peers)

    # -- requests in and out ----------------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None) -> Request:
        """Queue a request. Raises ValueError (bad input) or QueueFullError (try later)."""
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                 f"[0, {self.model_config.vocab_size})")
        rid = request_id or uuid.uuid4().hex
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**63))
        req = Request(request_id=rid, prompt_ids=ids, params=params, seed=seed, prompt=text)
        if params.structured is not None:
            req.matcher = self.grammars.matcher(params.structured)  # GrammarError: a ValueError
        self.scheduler.add(req)
        self._requests[rid] = req
        self.output.add(req)
        return req

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT,
              error: str | None = None) -> RequestOutput | None:
        """Stop a request now: its pages are free for the next iteration's schedule()."""
        req = self._requests.get(request_id)
        if req is None or req.finished:
            return None
        req.error = error
        return self._finish(req, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._in_flight) or self.output.has_held()

    @property
    def num_in_flight(self) -> int:
        """Iterations launched whose results are not read back yet."""
        return len(self._in_flight)

    def _finish(self, req: Request, reason: FinishReason) -> RequestOutput:
        self.scheduler.finish(req, reason)
        self._requests.pop(req.request_id, None)
        return self.output.final(req)

    # -- one iteration ----------------------------------------------------------------------

    def step(self) -> StepResult:
        """Run one iteration; returns the deltas of every request that made progress and the
        batch it launched.

        A failure that can be pinned on requests (their host inputs or their outputs) fails
        those requests with FinishReason.ERROR and the iteration goes on without them; any
        other exception (the device step itself) propagates: the engine is broken."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch.swap_out or batch.swap_in:
            self._swap(batch)
        outputs: list[RequestOutput] = []
        launched = None
        if batch:
            launched, outputs = self._launch(batch)
            if launched is not None:
                self._in_flight.append(launched)
        if len(self._in_flight) > self.runner.keep_in_flight or (self._in_flight and not batch):
            outputs += self._process(self._in_flight.popleft())
        outputs = self.output.hold_finals(outputs, batch_done=not self.scheduler.running)
        self.stats.host_seconds += time.perf_counter() - t0
        return StepResult(outputs, launched.batch if launched is not None else None)

    def _swap(self, batch: Batch) -> None:
        """Copy preempted requests' pages to host memory (before their pages are reused by
        this step), and resumed ones' back into their new pages with their tokens."""
        for req, pages in batch.swap_out:
            req.swapped = self.runner.swap_out(pages)
        for req in batch.swap_in:
            # Every token is back: the KV holds positions [0, num_scheduled) and the last
            # output (position num_scheduled) is the next input; the history row gets them all.
            known = req.prompt_len + len(req.output_ids)
            self.runner.swap_in(req.swapped, req.pages, req.slot,
                                req.token_ids(0, min(req.num_scheduled + 1, known)),
                                req.output_ids[-1] if req.output_ids else 0)
            req.swapped = None

    def _prepare(self, batch: Batch) -> tuple[StepPlan, SamplingTensors]:
        """The iteration's host inputs: the padded plan and the sampling rows (numpy)."""
        if self.fault_hook is not None:
            for req in batch.requests():
                self.fault_hook("prepare", req)
        plan = build_plan(batch, self.buckets, self.num_slots, self.kv, self.runner.host_decode_tokens)
        rows = plan.rows
        reqs = [r.request for r in rows]
        params, steps = [r.params for r in reqs], [r.index for r in rows]
        last = self._sampling
        # The very same Request objects in the same rows as last iteration (not just their
        # ids: a finished request's id may be given again, with other params). Requests
        # compare by identity (eq=False): the list comparison runs in C.
        if (last is not None and last[0] == reqs and last[1].step.shape[0] == plan.num_sample_rows):
            sampling, constrained = last[1].next_step(params, steps, self.eos_token_ids), last[2]
        else:
            sampling = SamplingTensors.from_params(params, [r.seed for r in reqs], steps,
                                                   plan.num_sample_rows, self.eos_token_ids)
            constrained = any(p.constrained for p in params)
        if constrained:  # masks change every step: never reused
            sampling = dataclasses.replace(sampling, **constraint_tensors(
                reqs, plan.num_sample_rows, self.model_config.vocab_size))
        self._sampling = (reqs, sampling, constrained)
        return plan, sampling

    def _launch(self, batch: Batch) -> tuple[_InFlight | None, list[RequestOutput]]:
        failed: list[RequestOutput] = []
        try:
            plan, sampling = self._prepare(batch)
            self._blamed_in_a_row = 0
        except Exception as e:  # whose inputs? prepare each request alone to find out
            batch, failed = self._isolate(batch, e)
            if not batch:
                return None, failed
            plan, sampling = self._prepare(batch)  # fails again: not the requests' fault
        out = self.runner.run(plan, sampling)
        self.scheduler.launched(batch)
        st, n = self.stats, len(batch.decodes) + len(batch.prefills)
        st.iterations += 1
        st.tokens += plan.num_tokens
        st.padded_tokens += plan.num_decode + plan.num_prefill
        st.batch_size_sum += n
        st.max_batch_size_seen = max(st.max_batch_size_seen, n)
        return _InFlight(batch, plan, out, bool(sampling.any_logprobs)), failed

    def _isolate(self, batch: Batch, error: Exception) -> tuple[Batch, list[RequestOutput]]:
        """The requests whose inputs alone reproduce `error` fail; the rest of the batch goes
        on. If none does, or every request of a batch of several does, or every request has
        been blamed in ISOLATED_IN_A_ROW iterations running, the engine, not a request, is at
        fault, and `error` propagates."""
        culprits = {}
        for req in batch.decodes:
            culprits[req] = _raises(self._prepare, Batch([req], []))
        for c in batch.prefills:
            culprits[c.request] = _raises(self._prepare, Batch([], [c]))
        culprits = {r: e for r, e in culprits.items() if e is not None}
        everyone = len(culprits) == len(batch.decodes) + len(batch.prefills)
        self._blamed_in_a_row = self._blamed_in_a_row + 1 if everyone else 0
        if not culprits or (everyone and len(culprits) > 1) or self._blamed_in_a_row >= ISOLATED_IN_A_ROW:
            raise error
        failed = [self._fail_request(r, e) for r, e in culprits.items()]
        rest = Batch([r for r in batch.decodes if r not in culprits],
                     [c for c in batch.prefills if c.request not in culprits])
        return rest, failed

    def _fail_request(self, req: Request, error: Exception) -> RequestOutput:
        log.error("request %s failed: %s", req.request_id, error, exc_info=error)
        req.error = f"{type(error).__name__}: {error}"
        if req.finished:  # it finished while its final output was being made, which never left
            req.finish_reason = FinishReason.ERROR
            self._requests.pop(req.request_id, None)
            return self.output.final(req)
        return self._finish(req, FinishReason.ERROR)

    def _process(self, f: _InFlight) -> list[RequestOutput]:
        """Read an iteration's results back; each request takes its token and may finish."""
        t0 = time.perf_counter()
        sampled = self.runner.fetch(f.out, f.want_logprobs)
        self.stats.device_wait_seconds += time.perf_counter() - t0
        self.scheduler.iteration_done(f.batch)
        # The output processor takes the common decode token inline, any other row through
        # `_append_row`; with a fault hook set (tests), every row, so that each calls the hook.
        return self.output.append_rows(f.plan.rows, sampled, time.monotonic(), self._append_row,
                                       fast=self.fault_hook is None)

    def _append_row(self, req: Request, sampled: Sampled, row: int, now: float) -> RequestOutput:
        """Row `row`'s token for `req`: its delta, or its final output if it stops now."""
        try:
            if self.fault_hook is not None:
                self.fault_hook("output", req)
            reason, delta = self.output.append(req, sampled, row, now)
            return delta if reason is None else self._finish(req, reason)
        except Exception as e:  # this request's output (detokenizer, stop strings): it alone fails
            return self._fail_request(req, e)


def _raises(fn, *args) -> Exception | None:
    try:
        fn(*args)
    except Exception as e:
        e.__suppress_context__ = True  # raised while handling the batch's error: log it alone
        return e
    return None
