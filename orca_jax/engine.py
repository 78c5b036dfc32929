"""The engine: schedule -> run one jitted step -> post-process, one iteration at a time.

    Engine.step():  batch = scheduler.schedule()        # Orca Algorithm 1 (host)
                    plan  = build_plan(batch, buckets)  # padded numpy arrays (host)
                    dispatch run_step(plan)             # asynchronous: the device starts
                    read back the PREVIOUS step's ids   # host work overlaps device work
                    detokenize, stop checks, finish     # requests leave the batch at once

On a mesh with a `pipeline` axis the step runs as one program per stage (sharding/pipeline.py)
and up to `n_stages` iterations are in flight, each with different requests (Orca §4.3).

Everything with a shape is allocated once at start-up: the KV buffer (sized from a memory
budget), and one compiled program per bucket shape, all compiled by `warmup()`. A compile
after warm-up is a performance bug; `num_compiles` counts traces of the step so tests can
assert there are none.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
import uuid
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .models.gpt2 import GPTConfig
from .sharding.layouts import Layout, get_layout, param_shardings, pipelined
from .sharding.mesh import single_device_mesh
from .sharding.pipeline import Stage, local_stage_params, local_stages, split_stages, stage_keys
from .sharding.plan import fit_kv_slots, kv_bytes_per_device, kv_placement
from .plan import Buckets, StepPlan, build_plan
from .request import FinishReason, Request, RequestOutput, SamplingParams, Usage
from .sampling import SampleOutput, SamplingTensors
from .scheduler import Batch, Scheduler, SchedulerConfig
from .step import DeviceState, device_put_inputs, init_device_state, run_sample, run_step
from .tokenizer import ByteTokenizer, IncrementalDetokenizer, StopStringMatcher, load_tokenizer

log = logging.getLogger("orca_jax")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine knobs (the CLI flags of `serve`, `generate` and `bench`)."""

    max_batch_size: int = 64                # Orca's max_bs: requests per iteration
    max_num_batched_tokens: int = 512       # token budget per iteration (chunked prefill)
    max_prefill_seqs: int = 16              # prompt segments per iteration
    max_waiting: int = 1024                 # waiting-queue bound (then QueueFullError)
    policy: Literal["iteration", "static"] = "iteration"  # static = request-level baseline
    max_model_len: int | None = None        # tokens per KV slot; None = the model's n_positions
    kv_memory: int | None = None            # KV budget in bytes; None = kv_memory_fraction
    kv_memory_fraction: float = 0.5         # of free accelerator memory (CPU: of physical RAM)
    warmup: bool = True                     # compile every bucket program at start-up
    seed: int = 0                           # draws the seeds of requests that give none

    def __post_init__(self):
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_memory is not None and self.kv_memory <= 0:
            raise ValueError(f"kv_memory must be a positive number of bytes, got {self.kv_memory}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")


def enable_compile_cache() -> str | None:
    """Persist compiled programs across processes (JAX's compilation cache), so only the first
    start-up of a model and bucket set pays for warm-up. $ORCA_JAX_COMPILE_CACHE picks the
    folder (default ~/.cache/orca-jax/xla); "off" disables it."""
    path = os.environ.get("ORCA_JAX_COMPILE_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "orca-jax", "xla"))
    if path == "off":
        return None
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def kv_budget_bytes(cfg: EngineConfig, device) -> int:
    if cfg.kv_memory is not None:
        return cfg.kv_memory
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:  # accelerators: a fraction of what the weights left free
        return int(cfg.kv_memory_fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(cfg.kv_memory_fraction * ram)


@dataclasses.dataclass
class EngineStats:
    iterations: int = 0
    tokens: int = 0                  # real tokens computed (prompt + decode)
    padded_tokens: int = 0           # rows computed including bucket padding
    host_seconds: float = 0.0        # scheduling, packing, dispatch and post-processing
    device_wait_seconds: float = 0.0  # blocked on the device's results
    batch_size_sum: int = 0          # requests per iteration, summed (mean = sum / iterations)
    last_batch_size: int = 0
    max_batch_size_seen: int = 0


@dataclasses.dataclass
class _Output:
    """Per-request detokenization state."""

    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    text: str = ""
    sent_tokens: int = 0
    sent_text: int = 0


@dataclasses.dataclass
class _InFlight:
    batch: Batch
    plan: StepPlan
    out: SampleOutput | concurrent.futures.Future  # device arrays, or the last stage's reply
    want_logprobs: bool


class Engine:
    def __init__(self, config: GPTConfig, params, engine_config: EngineConfig = EngineConfig(),
                 tokenizer=None, mesh: jax.sharding.Mesh | None = None,
                 layout: str | Layout = "replicated",
                 peers=None):
        """`params` (a pure dict) are placed on `mesh` (default: one device) by the sharding
        `layout`; the KV buffer follows the same layout; step inputs are replicated. A
        `pipeline` axis of the mesh splits the layers into stages (sharding/pipeline.py).
        `peers` (sharding/multihost.py `Leader`): the other processes of a multi-process mesh;
        `peers.send_plan(plan, sampling)` runs before every dispatch (warm-up included), and
        when the pipeline's later stages live in other processes, `peers.forward(x)` hands
        them stage 0's activations and returns a future of the last stage's sampled ids."""
        enable_compile_cache()
        self.model_config = config
        self.config = ec = engine_config
        self.tokenizer = tokenizer or ByteTokenizer()
        self.eos_token_id = (config.eos_token_id if config.eos_token_id is not None
                              else self.tokenizer.eos_token_id)
        self.mesh = mesh or single_device_mesh()
        self.layout = get_layout(layout)
        self.peers = peers
        if {d.process_index for d in self.mesh.devices.flat} != set(range(jax.process_count())):
            raise ValueError(f"the mesh {dict(self.mesh.shape)} does not span the devices of all "
                             f"{jax.process_count()} processes; give --mesh over every process's "
                             "devices (e.g. tensor=N x devices per process)")
        self.stages: list[Stage] = split_stages(self.mesh, config.n_layer)
        self.n_stages = len(self.stages)
        # Several processes and stages: each process runs its own stage (sharding/pipeline.py).
        self.local_stages = local_stages(self.stages)
        self.remote_stages = len(self.local_stages) < self.n_stages
        stage_config = config.replace(n_layer=config.n_layer // self.n_stages)
        self._params = []  # per local stage: the sub-tree it holds, on its sub-mesh
        for st in self.local_stages:
            sh = param_shardings(stage_config, st.mesh, self.layout)
            self._params.append(local_stage_params(params, st, {k: sh[k] for k in stage_keys(st)}))
        del params

        self.max_len = min(ec.max_model_len or config.n_positions, config.n_positions)
        # Slots: as many as the per-device budget holds (a layout may split them over devices).
        budget = kv_budget_bytes(ec, next(d for d in self.mesh.devices.flat  # one of this process's
                                          if d.process_index == jax.process_index()))
        itemsize = jnp.dtype(config.jnp_dtype).itemsize
        kv_layout = pipelined(self.layout)
        self.num_slots = fit_kv_slots(config, kv_layout, self.mesh.shape, self.max_len,
                                         budget, ec.max_batch_size, itemsize)
        if jax.process_count() > 1:  # every process must allocate the same buffer
            from jax.experimental import multihost_utils
            self.num_slots = int(np.min(multihost_utils.process_allgather(np.int32(self.num_slots))))
        if self.num_slots < 1:
            one = kv_bytes_per_device(config, kv_layout, self.mesh.shape, 1, self.max_len, itemsize)
            raise ValueError(f"the KV memory budget ({budget} bytes) is smaller than one slot "
                             f"({one} bytes for max_model_len={self.max_len}); raise "
                             "--kv-memory or lower --max-model-len")
        self.kv_bytes = kv_bytes_per_device(config, kv_layout, self.mesh.shape, self.num_slots,
                                            self.max_len, itemsize)
        sched_cfg = SchedulerConfig(
            max_batch_size=self.num_slots,
            max_num_batched_tokens=max(ec.max_num_batched_tokens, self.num_slots),
            max_prefill_seqs=min(ec.max_prefill_seqs, self.num_slots),
            max_waiting=ec.max_waiting, policy=ec.policy, n_workers=self.n_stages)
        self.scheduler = Scheduler(sched_cfg, self.num_slots, self.max_len)
        self.buckets = Buckets.make(sched_cfg.max_batch_size, sched_cfg.max_num_batched_tokens,
                                    sched_cfg.max_prefill_seqs)
        self._states: list[DeviceState] = []
        for st in self.local_stages:
            kv_spec = kv_placement(stage_config, self.layout, dict(st.mesh.shape), self.num_slots,
                                   self.max_len, itemsize).spec
            self._states.append(init_device_state(
                stage_config.n_layer, self.num_slots, self.max_len, config.n_head, config.head_dim,
                config.jnp_dtype, NamedSharding(st.mesh, P(*kv_spec)), st.replicated, slot_state=st.last))
        self.num_compiles = 0
        # One forward program per stage (per bucket shape). Outputs keep the state's shardings,
        # so each step's donated buffers are reused in place.
        self._steps = []
        for st, state in zip(self.local_stages, self._states):
            state_sh = jax.tree.map(lambda x: x.sharding, state)
            fn = functools.partial(self._traced_step, stage_config, st.first, st.last)
            self._steps.append(jax.jit(fn, donate_argnames=("state",),
                                       out_shardings=(state_sh, st.replicated)))
        self._sample = jax.jit(self._traced_sample, donate_argnames=("state",),
                               out_shardings=(jax.tree.map(lambda x: x.sharding, self._states[-1]),
                                              self.local_stages[-1].replicated))
        # Iterations whose results are not read back yet: 1 (the host prepares N+1 while the
        # device runs N) or, with pipeline stages, n_stages - 1 besides the one being launched.
        self._keep_in_flight = max(1, self.n_stages - 1)
        self._rng = np.random.default_rng(ec.seed)
        self._outputs: dict[str, _Output] = {}
        self._requests: dict[str, Request] = {}
        self._held: list[RequestOutput] = []    # static policy: finals wait for the batch
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        self.stats = EngineStats()
        self.warmup_seconds = 0.0
        log.info("KV buffer: %d slots x %d tokens (%.1f MiB per device), %d step programs x %d "
                 "stage(s)", self.num_slots, self.max_len, self.kv_bytes / 2**20,
                 len(self.buckets.shapes()), self.n_stages)
        if ec.warmup:
            self.warmup()

    @classmethod
    def from_checkpoint(cls, path: str, engine_config: EngineConfig = EngineConfig(),
                        dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                        layout: str | Layout = "replicated", peers=None) -> "Engine":
        """Restores the parameters straight into the layout's shardings on `mesh`."""
        from .checkpoints.store import load_checkpoint
        mesh = mesh or single_device_mesh()
        # pipelined: each stage's layers are restored onto that stage's devices only
        config, params = load_checkpoint(path, mesh=mesh, layout=pipelined(layout), dtype=dtype)
        return cls(config, params, engine_config, tokenizer=load_tokenizer(path), mesh=mesh,
                   layout=layout, peers=peers)

    # -- compiled step ----------------------------------------------------------------------

    def _traced_step(self, config, first, last, params, state, inp, x):
        self.num_compiles += 1  # runs at trace time only: one per compiled program
        return run_step(config, params, state, inp, x, first=first, last=last)

    def _traced_sample(self, state, logits, inp):
        self.num_compiles += 1
        return run_sample(state, logits, inp)

    def run_plan(self, plan: StepPlan, sampling: SamplingTensors, x=None):
        """Dispatch one iteration (asynchronous): every local stage in turn, then sampling.
        Returns the sampled ids (a SampleOutput of device arrays) or, when later stages run in
        other processes, a future of them. Followers of a multi-process mesh call this with
        the leader's plans (and, on a later stage, the previous stage's activations `x`);
        everyone else goes through `step`."""
        if self.peers is not None:
            self.peers.send_plan(plan, sampling)
        # x: activations [T, D] handed from stage to stage; the last stage's logits
        for i, st in enumerate(self.local_stages):
            step_in, sample_in = device_put_inputs(plan, sampling if st.last else None, st.replicated)
            if x is not None:
                x = jax.device_put(x, st.replicated)
            self._states[i], x = self._steps[i](self._params[i], self._states[i], step_in, x)
        if not self.local_stages[-1].last:
            return self.peers.forward(x)
        self._states[-1], out = self._sample(self._states[-1], x, sample_in)
        return out

    def warmup(self) -> None:
        """Compile the program of every bucket shape now, not while serving."""
        t0 = time.perf_counter()
        replies = []  # later stages in other processes compile theirs too: wait for them
        for td, tp in self.buckets.shapes():
            plan = _dummy_plan(td, tp, self.buckets, self.num_slots, self.n_stages > 1)
            out = self.run_plan(plan, SamplingTensors.from_params([], [], [], len(plan.sample_rows)))
            if isinstance(out, concurrent.futures.Future):
                replies.append(out)
        for fut in replies:
            fut.result()
        jax.block_until_ready(self._states)
        self.warmup_seconds = time.perf_counter() - t0
        log.info("warm-up: %d programs in %.1f s", self.num_compiles, self.warmup_seconds)

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
        self.scheduler.add(req)
        self._requests[rid] = req
        self._outputs[rid] = _Output(IncrementalDetokenizer(self.tokenizer, ids),
                                     StopStringMatcher(params.stop, params.include_stop_str_in_output))
        return req

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT,
              error: str | None = None) -> RequestOutput | None:
        """Stop a request now: its slot is free for the next iteration's schedule()."""
        req = self._requests.get(request_id)
        if req is None or req.finished:
            return None
        req.error = error
        self.scheduler.finish(req, reason)
        return self._final_output(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._in_flight) or bool(self._held)

    # -- one iteration ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the deltas of every request that made progress."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch:
            self._in_flight.append(self._launch(batch))
        outputs: list[RequestOutput] = []
        if len(self._in_flight) > self._keep_in_flight or (self._in_flight and not batch):
            outputs = self._process(self._in_flight.popleft())
        if self.config.policy == "static":
            outputs = self._hold_finals(outputs)
        self.stats.host_seconds += time.perf_counter() - t0
        return outputs

    def _launch(self, batch: Batch) -> _InFlight:
        plan = build_plan(batch, self.buckets, self.num_slots, host_decode_tokens=self.n_stages > 1)
        rows = plan.rows
        sampling = SamplingTensors.from_params(
            [r.request.params for r in rows], [r.request.seed for r in rows],
            [r.index for r in rows], len(plan.sample_rows), self.eos_token_id)
        out = self.run_plan(plan, sampling)
        want_lp = bool(sampling.any_logprobs)
        self.stats.iterations += 1
        self.stats.tokens += plan.num_tokens
        self.stats.padded_tokens += plan.num_decode + plan.num_prefill
        n = len(batch.decodes) + len(batch.prefills)
        self.stats.batch_size_sum += n
        self.stats.last_batch_size = n
        self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, n)
        return _InFlight(batch, plan, out, want_lp)

    def _process(self, f: _InFlight) -> list[RequestOutput]:
        t0 = time.perf_counter()
        out = f.out.result() if isinstance(f.out, concurrent.futures.Future) else f.out
        ids = np.asarray(out.ids)
        lps = [np.asarray(x) for x in (out.logprob, out.top_ids, out.top_logprobs)] if f.want_logprobs else None
        self.stats.device_wait_seconds += time.perf_counter() - t0
        self.scheduler.complete(f.batch)
        now = time.monotonic()
        outs = []
        for i, row in enumerate(f.plan.rows):
            req = row.request
            if req.finished:  # aborted, or stopped while this step was in flight
                continue
            tok = int(ids[i])
            req.output_ids.append(tok)
            if req.first_token_time is None:
                req.first_token_time = now
            n_lp = req.params.logprobs
            if n_lp is not None:
                top = {int(t): float(v) for t, v in zip(lps[1][i, :n_lp], lps[2][i, :n_lp])}
                req.logprobs.append({"token_id": tok, "logprob": float(lps[0][i]), "top": top})
            outs.append(self._advance(req, tok))
        return outs

    def _advance(self, req: Request, tok: int) -> RequestOutput:
        """Detokenize the new token, check every stop condition, emit a delta."""
        p, o = req.params, self._outputs[req.request_id]
        n = len(req.output_ids)
        eos = self.eos_token_id
        stop_id = n > p.min_tokens and (tok in p.stop_token_ids or (tok == eos and not p.ignore_eos))
        stopped = False
        if not stop_id:  # a stop token stays in token_ids but not in the text
            delta = o.detok.push([tok])
            if n > p.min_tokens:  # vLLM: no stop check of any kind before min_tokens
                delta, stopped = o.stops.push(delta)
            o.text += delta
        reason = FinishReason.STOP if stop_id or stopped else None
        if reason is None and n >= p.max_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            if not stopped:  # text held back (partial character, stop-string prefix) goes out now
                emit, _ = o.stops.push(o.detok.flush())
                o.text += emit + o.stops.flush()
            self.scheduler.finish(req, reason)
            return self._final_output(req)
        return self._delta(req, finished=False)

    def _delta(self, req: Request, finished: bool) -> RequestOutput:
        o = self._outputs[req.request_id]
        new_ids = req.output_ids[o.sent_tokens:]
        new_text = o.text[o.sent_text:]
        new_lp = req.logprobs[o.sent_tokens:] if req.params.logprobs is not None else None
        o.sent_tokens, o.sent_text = len(req.output_ids), len(o.text)
        return RequestOutput(req.request_id, new_ids, new_text, finished, req.finish_reason,
                             Usage(req.prompt_len, len(req.output_ids)), new_lp, req.error,
                             self._metrics(req) if finished else None)

    def _final_output(self, req: Request) -> RequestOutput:
        req.finish_time = time.monotonic()
        out = self._delta(req, finished=True)
        del self._outputs[req.request_id], self._requests[req.request_id]
        return out

    def _metrics(self, req: Request) -> dict:
        return {"arrival_time": req.arrival_time, "first_token_time": req.first_token_time,
                "finish_time": req.finish_time}

    def _hold_finals(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Static batching returns a batch's results only when all of it is done (the
        request-level baseline of the paper, FasterTransformer-style)."""
        self._held += [o for o in outputs if o.finished]
        outputs = [o for o in outputs if not o.finished]
        if not self.scheduler.running and self._held:
            outputs, self._held = outputs + self._held, []
        return outputs

    # -- introspection ------------------------------------------------------------------------

    @property
    def device_states(self) -> list[DeviceState]:
        """Each local stage's state (one entry without pipeline stages)."""
        return self._states


def _dummy_plan(td: int, tp: int, buckets: Buckets, num_slots: int, host_tokens: bool) -> StepPlan:
    """An all-padding plan of shape (td, tp): compiles a bucket's program, writes nothing."""
    R = buckets.num_sample_rows(td, tp)
    z = lambda n: np.zeros(n, np.int32)
    return StepPlan(num_decode=td, num_prefill=tp, prefill_tokens=z(tp),
                    slot=np.full(td + tp, num_slots, np.int32), pos=z(td + tp),
                    seg=np.full(tp, -1, np.int32), dec_blocks=np.int32(1), hist_seg=np.int32(-2),
                    hist_slot=np.int32(0), hist_len=np.int32(0), hist_blocks=np.int32(0),
                    sample_rows=z(R), sample_slot=np.full(R, num_slots, np.int32),
                    sample_pos=z(R), prompt_len=z(R), rows=[], num_tokens=0,
                    decode_tokens=z(td) if host_tokens else None)
