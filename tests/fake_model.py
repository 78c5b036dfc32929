"""A hand-computable fake engine loop over the real `Scheduler` and `build_plan` (no JAX).

The "model" maps a sampling row's input token t to (t + 1) % V, so prompt [5] yields
6, 7, 8, ... and every expected output can be worked out by hand (`expected_output`).

`FakeDevice.run(plan)` consumes a `StepPlan` exactly as `orca_jax/step.py::run_step` does:

* decode rows read their input token from `last_token[slot]`, written by an EARLIER step;
  prefill rows read `plan.prefill_tokens`;
* every real row writes its token into the slot's KV (here: a token log `kv[slot, pos]`);
  padding rows have slot S (= num_slots) and write nothing;
* the rows named by `sample_rows` sample; each sampled id goes to `last_token[sample_slot]`
  (sample slot S = padding: dropped).

On top of that it checks what the attention kernel silently relies on (models/attention.py):
a slot's KV grows by contiguous appends, a fresh prompt starts at position 0, a continuing
chunk is the plan's `hist_*` segment and starts exactly where its slot's KV ends, decode
positions fit in `dec_blocks` blocks, and every sampling row is a decode row or the last row of
a segment. A broken plan fails loudly here instead of producing wrong numbers on a GPU.

`FakeEngine` is the engine loop (orca_jax/engine.py `Engine.step`): schedule -> build_plan ->
run -> process the sampled ids (append to `Request.output_ids`; finish with LENGTH at
max_tokens or STOP at `eos_id`). With `pipelined=True` it dispatches step N+1 before it
processes step N's ids, as the real engine does.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from orca_jax.plan import BLOCK, Buckets, StepPlan, build_plan
from orca_jax.request import FinishReason, Request, SamplingParams
from orca_jax.scheduler import Scheduler, SchedulerConfig

V = 97  # fake vocabulary size


def expected_output(prompt: list[int], max_tokens: int, vocab: int = V, eos_id: int | None = None) -> list[int]:
    """What the fake model generates: last prompt token + 1, + 2, ... (mod V), up to EOS."""
    out, t = [], prompt[-1]
    while len(out) < max_tokens:
        t = (t + 1) % vocab
        out.append(t)
        if t == eos_id:
            break
    return out


class FakeDevice:
    """Per-slot state of the device (KV token log, last sampled token) and the fake step."""

    def __init__(self, num_slots: int, max_len: int, buckets: Buckets, vocab: int = V):
        self.S, self.max_len, self.buckets, self.vocab = num_slots, max_len, buckets, vocab
        self.kv = np.full((num_slots, max_len), -1, np.int64)   # token whose K/V sits at [slot, pos]
        self.kv_len = np.zeros(num_slots, np.int64)              # valid prefix of each slot
        self.last_token = np.zeros(num_slots, np.int64)
        self.steps = 0

    def _append(self, s: int, p: int, tok: int) -> None:
        assert 0 <= s < self.S, f"real row with slot {s} outside [0, {self.S})"
        assert p == self.kv_len[s], f"slot {s}: row at position {p} but its KV holds {self.kv_len[s]} tokens"
        assert p < self.max_len, f"slot {s}: position {p} past max_len {self.max_len}"
        self.kv[s, p], self.kv_len[s] = tok, p + 1

    def run(self, plan: StepPlan) -> np.ndarray:
        S, td, tp, b = self.S, plan.num_decode, plan.num_prefill, self.buckets
        R = b.num_sample_rows(td, tp)
        assert (td, tp) in b.shapes(), f"shape {(td, tp)} was not compiled at warm-up"
        assert plan.slot.shape == plan.pos.shape == (td + tp,)
        assert plan.prefill_tokens.shape == plan.seg.shape == (tp,)
        for a in (plan.sample_rows, plan.sample_slot, plan.sample_pos, plan.prompt_len):
            assert a.shape == (R,) and a.dtype == np.int32
        for a in (plan.slot, plan.pos, plan.seg, plan.prefill_tokens):
            assert a.dtype == np.int32

        # Real rows first in each region; padding rows: slot S, position 0, segment -1.
        real = plan.slot != S
        n_dec, n_pre = int(real[:td].sum()), int(real[td:].sum())
        assert real[:n_dec].all() and real[td:td + n_pre].all(), "padding row before a real row"
        assert not plan.pos[n_dec:td].any() and not plan.pos[td + n_pre:].any(), "padding row with a position"
        assert (plan.seg[n_pre:] == -1).all() and (plan.seg[:n_pre] >= 0).all()
        assert n_dec + n_pre == plan.num_tokens
        tokens = np.zeros(td + tp, np.int64)
        used_slots: list[int] = []

        # Decode rows: the input is the slot's last sampled token; context is its KV [0, pos).
        for i in range(n_dec):
            s, p = int(plan.slot[i]), int(plan.pos[i])
            assert p >= 1 and p < plan.dec_blocks * BLOCK, f"decode position {p} outside dec_blocks"
            tokens[i] = self.last_token[s]
            self._append(s, p, tokens[i])
            used_slots.append(s)

        # Prefill segments: contiguous, numbered 0, 1, 2, ... in row order.
        segs = plan.seg[:n_pre]
        starts = [j for j in range(n_pre) if j == 0 or segs[j] != segs[j - 1]]
        assert list(segs[starts]) == list(range(len(starts))), f"segments out of order: {segs}"
        assert plan.hist_seg == -2 or 0 <= plan.hist_seg < len(starts)
        if plan.hist_seg == -2:
            assert plan.hist_len == 0 and plan.hist_blocks == 0
        seg_last_rows = set()
        for k, j0 in enumerate(starts):
            j1 = starts[k + 1] if k + 1 < len(starts) else n_pre
            rows = range(td + j0, td + j1)
            s, p0 = int(plan.slot[td + j0]), int(plan.pos[td + j0])
            assert (plan.slot[rows.start:rows.stop] == s).all(), f"segment {k} spans slots"
            assert (plan.pos[rows.start:rows.stop] == np.arange(p0, p0 + len(rows))).all()
            if k == plan.hist_seg:  # continues a prompt already partly in the slot
                assert s == plan.hist_slot and p0 == plan.hist_len > 0
                assert plan.hist_blocks == -(-int(plan.hist_len) // BLOCK)
            else:  # a fresh prompt: whatever the slot held before is dead
                assert p0 == 0, f"segment {k} starts at {p0} but is not the hist segment"
                self.kv_len[s] = 0
            for r in rows:
                tokens[r] = plan.prefill_tokens[r - td]
                self._append(s, int(plan.pos[r]), tokens[r])
            used_slots.append(s)
            seg_last_rows.add(rows.stop - 1)
        assert len(set(used_slots)) == len(used_slots), f"a slot appears twice in one step: {used_slots}"

        # Sampling: every decode row, then the last rows of prompts that complete.
        n_samp = len(plan.rows)
        assert (plan.sample_slot[:n_samp] != S).all() and (plan.sample_slot[n_samp:] == S).all()
        assert list(plan.sample_rows[:n_dec]) == list(range(n_dec)), "every decode row samples"
        ids = np.zeros(R, np.int32)
        for r in range(R):
            row = int(plan.sample_rows[r])
            ids[r] = (tokens[row] + 1) % self.vocab          # the fake model
            if r >= n_samp:
                assert plan.sample_rows[r] == 0 and plan.sample_pos[r] == 0 and plan.prompt_len[r] == 0
                continue
            assert plan.slot[row] == plan.sample_slot[r] and plan.pos[row] == plan.sample_pos[r]
            if row >= td:
                assert row in seg_last_rows and plan.sample_pos[r] == plan.prompt_len[r] - 1
            else:
                assert plan.sample_pos[r] >= plan.prompt_len[r]
            self.last_token[plan.sample_slot[r]] = ids[r]
        self.steps += 1
        return ids


@dataclasses.dataclass
class StepRecord:
    """One `FakeEngine.step()`: the scheduler's state around `schedule()` and what it chose."""

    iteration: int                                  # 1-based
    waiting_before: list[str]                       # request ids, queue order
    running_before: list[tuple[str, int]]           # (id, num_computed) before schedule()
    decodes: list[str]
    chunks: list[tuple[str, int, int]]              # (id, start, length)
    admitted: list[str]                             # joined the batch this iteration
    num_tokens: int
    slots: dict[str, int]                           # slot of each running request after schedule()
    free_slots: int                                 # after schedule()
    waiting_after: list[str]
    plan: StepPlan | None
    finished: list[tuple[str, FinishReason]] = dataclasses.field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.decodes) + len(self.chunks)


class FakeEngine:
    def __init__(self, config: SchedulerConfig, num_slots: int, max_len: int, *, vocab: int = V,
                 eos_id: int | None = None, pipelined: bool = False, buckets: Buckets | None = None):
        self.scheduler = Scheduler(config, num_slots, max_len)
        self.buckets = buckets or Buckets.make(config.max_batch_size, config.max_num_batched_tokens,
                                               config.max_prefill_seqs)
        self.device = FakeDevice(num_slots, max_len, self.buckets, vocab)
        self.vocab, self.eos_id, self.pipelined = vocab, eos_id, pipelined
        self.records: list[StepRecord] = []
        self.requests: dict[str, Request] = {}
        self.joined: dict[str, int] = {}   # id -> iteration it was first scheduled
        self.left: dict[str, int] = {}     # id -> iteration it finished (or was aborted after)
        self._in_flight: tuple[StepPlan, np.ndarray] | None = None

    @property
    def iteration(self) -> int:
        return len(self.records)

    def submit(self, prompt: list[int], max_tokens: int = 4, rid: str | None = None) -> Request:
        rid = rid or f"r{len(self.requests)}"
        req = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0), seed=0)
        self.scheduler.add(req)
        self.requests[rid] = req
        return req

    def abort(self, req: Request) -> None:
        if req.slot is not None and not req.finished:
            self._check_kv(req)
        self.scheduler.finish(req, FinishReason.ABORT)
        self.left.setdefault(req.request_id, self.iteration)

    def busy(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def step(self) -> StepRecord:
        sch = self.scheduler
        waiting_before = [r.request_id for r in sch.waiting]
        running_before = [(r.request_id, r.num_computed) for r in sch.running]
        batch = sch.schedule()
        running_ids = {rid for rid, _ in running_before}
        rec = StepRecord(
            iteration=self.iteration + 1, waiting_before=waiting_before, running_before=running_before,
            decodes=[r.request_id for r in batch.decodes],
            chunks=[(c.request.request_id, c.start, c.length) for c in batch.prefills],
            admitted=[r.request_id for r in sch.running if r.request_id not in running_ids],
            num_tokens=batch.num_tokens, slots={r.request_id: r.slot for r in sch.running},
            free_slots=sch.num_free_slots, waiting_after=[r.request_id for r in sch.waiting], plan=None)
        self.records.append(rec)
        for rid in rec.admitted:
            self.joined[rid] = rec.iteration
        launched = None
        if batch:
            rec.plan = build_plan(batch, self.buckets, sch.num_slots)
            for row in rec.plan.rows:
                assert row.index < row.request.params.max_tokens, "sampled past max_tokens"
            launched = (rec.plan, self.device.run(rec.plan))  # "dispatch": the device runs in order
        if self.pipelined:  # step N+1 is on the device before step N's ids are read
            previous, self._in_flight = self._in_flight, launched
        else:
            previous = launched
        if previous is not None:
            rec.finished = self._process(*previous)
        return rec

    def _process(self, plan: StepPlan, ids: np.ndarray) -> list[tuple[str, FinishReason]]:
        finished = []
        for i, row in enumerate(plan.rows):
            req = row.request
            if req.finished:  # aborted, or stopped while this step was in flight
                continue
            assert row.index == len(req.output_ids), (req.request_id, row.index, req.output_ids)
            tok = int(ids[i])
            req.output_ids.append(tok)
            reason = (FinishReason.STOP if tok == self.eos_id else
                      FinishReason.LENGTH if len(req.output_ids) == req.params.max_tokens else None)
            if reason is not None:
                self._check_kv(req)
                self.scheduler.finish(req, reason)
                self.left[req.request_id] = self.iteration
                finished.append((req.request_id, reason))
        return finished

    def _check_kv(self, req: Request) -> None:
        """The slot holds prompt + outputs (each output is the next position's input)."""
        seq = req.prompt_ids + req.output_ids
        n = min(req.num_computed, len(seq))
        got = list(self.device.kv[req.slot, :n])
        assert got == seq[:n], f"{req.request_id}: KV slot {req.slot} holds {got}, expected {seq[:n]}"

    def run(self, arrivals: dict[int, list[tuple]] | None = None, max_iterations: int = 10_000) -> list[StepRecord]:
        """Step until idle. `arrivals[i]` = [(prompt, max_tokens, id), ...] submitted just
        before iteration i (1-based) is scheduled."""
        arrivals = dict(arrivals or {})
        while self.busy() or any(i > self.iteration for i in arrivals):
            for args in arrivals.pop(self.iteration + 1, []):
                self.submit(*args)
            self.step()
            assert self.iteration < max_iterations, "the engine loop does not terminate"
        return self.records
