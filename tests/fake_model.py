"""A hand-computable fake model under the real engine loop (JetStream's mock-engine seam).

The "model" maps a sampling row's input token t to (t + 1) % V, so prompt [5] yields
6, 7, 8, ... and every expected output can be worked out by hand (`expected_output`).

`FakeDevice.run(plan)` consumes a `StepPlan` exactly as `orca_jax/step.py::run_step` does:

* decode rows read their input token from `last_token[slot]`, written by an EARLIER step;
  prefill rows read `plan.inputs.prefill_tokens`;
* every real row writes its token into its KV page position `kv_index` (here: a token log
  `kv[page, offset]`); padding rows point past the last page and write nothing;
* the rows named by `sample_rows` sample; each sampled id goes to `last_token[sample_slot]`
  (sample slot S = padding: dropped).

On top of that it checks what the attention kernel silently relies on (models/attention.py):
every row writes where its block table says, no two rows write one position, a segment that
does not start at 0 is a history entry (`hist_*`) whose earlier positions are all written, every
position a decode row reads through its block table is written, decode positions fit in
`dec_blocks` pages, and every sampling row is a decode row or the last row of a segment. A
broken plan fails loudly here instead of producing wrong numbers on a GPU.

`FakeRunner` puts FakeDevice behind the runner interface (orca_jax/runner.py `ModelRunner`:
warmup, run, fetch), so the real `Engine` (schedule -> build_plan -> run -> output processor)
drives it. `FakeEngine` is a test harness around that real engine: it records what each
iteration scheduled (`StepRecord`) and checks a finished request's KV. With `pipelined=True`
the engine dispatches step N+1 before it processes step N's ids (the real runner's
behaviour); otherwise the fake runner asks for each iteration's ids at once.
"""
from __future__ import annotations

import dataclasses
import types

import numpy as np

from orca_jax.config import EngineConfig
from orca_jax.engine import Engine
from orca_jax.outputs import Sampled
from orca_jax.plan import PAD_SEG, Buckets, PagedKV, StepPlan
from orca_jax.kv_pages import pool_pages_for
from orca_jax.request import FinishReason, Request, SamplingParams
from orca_jax.scheduler import Batch, SchedulerConfig

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
    """The device's state (a token log of every KV page position, each slot's last sampled
    token) and the fake step."""

    def __init__(self, num_slots: int, kv: PagedKV, buckets: Buckets, vocab: int = V):
        self.S, self.kv_geometry, self.buckets, self.vocab = num_slots, kv, buckets, vocab
        self.kv = np.full((kv.num_pages, kv.page_size), -1, np.int64)  # token whose K/V sits there
        self.last_token = np.zeros(num_slots, np.int64)
        self.steps = 0

    def read(self, table, n: int) -> list[int]:
        """Positions [0, n) of a sequence through its block table."""
        B = self.kv_geometry.page_size
        return [int(self.kv[table[p // B], p % B]) for p in range(n)]

    def _context(self, table, n: int, what: str) -> None:
        got = self.read(table, n)
        assert -1 not in got, f"{what}: positions [0, {n}) read pages never written: {got}"

    def run(self, plan: StepPlan) -> np.ndarray:
        S, td, tp, b = self.S, plan.num_decode, plan.num_prefill, self.buckets
        P, B, W = self.kv_geometry.num_pages, self.kv_geometry.page_size, self.kv_geometry.max_pages
        inp, meta, smp = plan.inputs, plan.inputs.meta, plan.sample
        R = b.num_sample_rows(td, tp)
        nh = min(b.max_prefill_seqs, tp)
        assert (td, tp) in b.shapes(), f"shape {(td, tp)} was not compiled at warm-up"
        assert meta.slot.shape == meta.pos.shape == meta.kv_index.shape == (td + tp,)
        assert inp.prefill_tokens.shape == meta.seg.shape == (tp,)
        assert meta.block_table.shape == (td, W) and meta.hist_table.shape == meta.seg_table.shape == (nh, W)
        assert meta.hist_len.shape == meta.hist_row0.shape == meta.hist_rows.shape == (nh,)
        for a in (inp.sample_rows, smp.sample_slot, smp.sample_pos, smp.prompt_len):
            assert a.shape == (R,) and a.dtype == np.int32
        for a in (meta.slot, meta.pos, meta.kv_index, meta.seg, inp.prefill_tokens, meta.block_table,
                  meta.hist_table, meta.seg_table):
            assert a.dtype == np.int32

        # Real rows first in each region; padding rows: slot S, no KV write, position 0, segment -1.
        real = meta.slot != S
        n_dec, n_pre = int(real[:td].sum()), int(real[td:].sum())
        assert real[:n_dec].all() and real[td:td + n_pre].all(), "padding row before a real row"
        assert (meta.kv_index[~real] == P * B).all(), "a padding row writes KV"
        assert ((meta.kv_index[real] >= 0) & (meta.kv_index[real] < P * B)).all()
        assert not meta.pos[n_dec:td].any() and not meta.pos[td + n_pre:].any(), "padding row with a position"
        assert (meta.seg[n_pre:] == PAD_SEG).all() and (meta.seg[:n_pre] >= 0).all()
        assert n_dec + n_pre == plan.num_tokens
        tokens = np.zeros(td + tp, np.int64)
        used_slots: list[int] = []
        writes: list[tuple[int, int]] = []   # (kv_index, token), applied before attention reads

        # Decode rows: the input is the slot's last sampled token; context [0, pos) via its table.
        for i in range(n_dec):
            s, p, table = int(meta.slot[i]), int(meta.pos[i]), meta.block_table[i]
            assert p >= 1 and p < meta.dec_blocks * B, f"decode position {p} outside dec_blocks"
            assert meta.kv_index[i] == table[p // B] * B + p % B, "decode row writes off its table"
            tokens[i] = self.last_token[s]
            writes.append((int(meta.kv_index[i]), tokens[i]))
            used_slots.append(s)

        # Prefill segments: contiguous, numbered 0, 1, 2, ... in row order; a segment that does
        # not start at 0 continues a sequence in its pages and is a history entry.
        segs = meta.seg[:n_pre]
        starts = [j for j in range(n_pre) if j == 0 or segs[j] != segs[j - 1]]
        assert list(segs[starts]) == list(range(len(starts))), f"segments out of order: {segs}"
        hist = {int(meta.hist_row0[h]): h for h in range(int(meta.num_hist))}
        seg_last_rows, n_hist = set(), 0
        for k, j0 in enumerate(starts):
            j1 = starts[k + 1] if k + 1 < len(starts) else n_pre
            rows = range(td + j0, td + j1)
            s, p0 = int(meta.slot[td + j0]), int(meta.pos[td + j0])
            assert (meta.slot[rows.start:rows.stop] == s).all(), f"segment {k} spans slots"
            assert (meta.pos[rows.start:rows.stop] == np.arange(p0, p0 + len(rows))).all()
            for r in rows:  # every segment's own table, as the CPU kernel reads it
                assert meta.kv_index[r] == meta.seg_table[k][meta.pos[r] // B] * B + meta.pos[r] % B
            if p0 > 0:  # continues a sequence already in its pages
                h = hist[j0]
                assert meta.hist_len[h] == p0 and meta.hist_rows[h] == len(rows)
                table = meta.hist_table[h]
                assert (table == meta.seg_table[k]).all(), "history table is not its segment's"
                self._context(table, p0, f"segment {k}")
                for r in rows:
                    assert meta.kv_index[r] == table[meta.pos[r] // B] * B + meta.pos[r] % B
                n_hist += 1
            for r in rows:
                tokens[r] = inp.prefill_tokens[r - td]
                writes.append((int(meta.kv_index[r]), tokens[r]))
            used_slots.append(s)
            seg_last_rows.add(rows.stop - 1)
        assert n_hist == meta.num_hist, "history entries do not match the continuing segments"
        assert len(set(used_slots)) == len(used_slots), f"a slot appears twice in one step: {used_slots}"
        assert len({i for i, _ in writes}) == len(writes), "two rows write one KV position"
        for i, tok in writes:
            self.kv[i // B, i % B] = tok
        for i in range(n_dec):  # every position a decode row attends to is written by now
            self._context(meta.block_table[i], int(meta.pos[i]) + 1, f"decode row {i}")

        # Sampling: every decode row, then the last rows of prompts that complete.
        n_samp = len(plan.rows)
        assert (smp.sample_slot[:n_samp] != S).all() and (smp.sample_slot[n_samp:] == S).all()
        assert list(inp.sample_rows[:n_dec]) == list(range(n_dec)), "every decode row samples"
        ids = np.zeros(R, np.int32)
        for r in range(R):
            row = int(inp.sample_rows[r])
            ids[r] = (tokens[row] + 1) % self.vocab          # the fake model
            if r >= n_samp:
                assert inp.sample_rows[r] == 0 and smp.sample_pos[r] == 0 and smp.prompt_len[r] == 0
                continue
            assert meta.slot[row] == smp.sample_slot[r] and meta.pos[row] == smp.sample_pos[r]
            if row >= td:
                assert row in seg_last_rows and smp.sample_pos[r] >= smp.prompt_len[r] - 1
            else:
                assert smp.sample_pos[r] >= smp.prompt_len[r]
            self.last_token[smp.sample_slot[r]] = ids[r]
        self.steps += 1
        return ids


class FakeRunner:
    """The runner interface over FakeDevice: `warmup(buckets)` "compiles" the bucket shapes
    (the device then refuses any other), `run` computes at once, `fetch` checks that every
    row's token is the one its request expects next."""

    def __init__(self, num_slots: int, max_len: int, vocab: int = V, eos_id: int | None = None,
                 synchronous: bool = False, num_pages: int | None = None, page_size: int = 16):
        """`num_pages` default: every slot's max_len, as the real runner caps the pool."""
        self.model_config = types.SimpleNamespace(vocab_size=vocab, eos_token_id=eos_id)
        self.num_slots, self.max_len, self.vocab = num_slots, max_len, vocab
        W = -(-max_len // page_size)
        self.kv = PagedKV.make(num_pages or pool_pages_for(num_slots * W), page_size, max_len)
        self.n_stages = 1
        self.keep_in_flight = 0 if synchronous else 1
        self.host_decode_tokens = False
        self.num_compiles = 0
        self.device: FakeDevice | None = None
        self.plans: list[StepPlan] = []

    def warmup(self, buckets: Buckets) -> None:
        self.device = FakeDevice(self.num_slots, self.kv, buckets, self.vocab)
        self.num_compiles = len(buckets.shapes())

    def run(self, plan: StepPlan, sampling) -> tuple[StepPlan, np.ndarray]:
        assert self.device is not None, "a step ran before warm-up"
        for row in plan.rows:
            assert row.index < row.request.params.max_tokens, "sampled past max_tokens"
        self.plans.append(plan)
        return plan, self.device.run(plan)

    def fetch(self, out: tuple[StepPlan, np.ndarray], logprobs: bool) -> Sampled:
        plan, ids = out
        for row in plan.rows:
            req = row.request
            assert req.finished or row.index == len(req.output_ids), (req.request_id, row.index, req.output_ids)
        return Sampled(ids.tolist(), None, None, None)


@dataclasses.dataclass
class StepRecord:
    """One `FakeEngine.step()`: the scheduler's state around `schedule()` and what it chose."""

    iteration: int                                  # 1-based
    waiting_before: list[str]                       # request ids, queue order
    running_before: list[tuple[str, int]]           # (id, num_scheduled) before schedule()
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
    """The real `Engine` over a FakeRunner, recording every iteration."""

    def __init__(self, config: SchedulerConfig, num_slots: int, max_len: int, *, vocab: int = V,
                 eos_id: int | None = None, pipelined: bool = False, buckets: Buckets | None = None,
                 num_pages: int | None = None, page_size: int = 16, prefix_caching: bool = False):
        """`num_slots` sequences at most (and by default KV pages for each at max_len)."""
        ec = EngineConfig(max_batch_size=config.max_batch_size,
                          max_num_batched_tokens=config.max_num_batched_tokens,
                          max_prefill_seqs=config.max_prefill_seqs, max_waiting=config.max_waiting,
                          policy=config.policy, warmup=buckets is None, page_size=page_size,
                          kv_admission=config.kv_admission, enable_prefix_caching=prefix_caching)
        # Like the real runner: no more sequences than max_batch_size.
        self.runner = FakeRunner(min(num_slots, config.max_batch_size), max_len, vocab, eos_id,
                                 synchronous=not pipelined, num_pages=num_pages, page_size=page_size)
        self.engine = Engine(self.runner, ec)
        self.pages: dict[str, list[int]] = {}  # each request's pages when it last let them go
        real_release = self.engine.scheduler._release

        def release(req: Request) -> None:
            self.pages[req.request_id] = list(req.pages)
            real_release(req)
        self.engine.scheduler._release = release
        if buckets is not None:  # other buckets than the engine's (odd minimum sizes)
            self.engine.buckets = buckets
            sched = self.engine.scheduler
            sched.config = dataclasses.replace(sched.config, prefill_buckets=buckets.prefill[1:])
            self.runner.warmup(buckets)
        self.scheduler, self.buckets = self.engine.scheduler, self.engine.buckets
        self.records: list[StepRecord] = []
        self.requests: dict[str, Request] = {}
        self.joined: dict[str, int] = {}   # id -> iteration it was first scheduled
        self.left: dict[str, int] = {}     # id -> iteration it finished (or was aborted after)
        self._scheduled = None             # the scheduler's state right after schedule()
        real_schedule = self.scheduler.schedule

        def schedule() -> Batch:  # observe the state between schedule() and the outputs
            batch = real_schedule()
            sch = self.scheduler
            self._scheduled = ({r.request_id: r.slot for r in sch.running}, sch.num_free_slots,
                               [r.request_id for r in sch.waiting])
            return batch
        self.scheduler.schedule = schedule

    @property
    def device(self) -> FakeDevice:
        return self.runner.device

    @property
    def iteration(self) -> int:
        return len(self.records)

    def submit(self, prompt: list[int], max_tokens: int = 4, rid: str | None = None) -> Request:
        rid = rid or f"r{len(self.requests)}"
        req = self.engine.add_request(list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0), rid)
        self.requests[rid] = req
        return req

    def abort(self, req: Request) -> None:
        if req.slot is not None and not req.finished:
            self._check_kv(req)
        self.engine.abort(req.request_id)
        self.left.setdefault(req.request_id, self.iteration)

    def busy(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> StepRecord:
        sch = self.scheduler
        waiting_before = [r.request_id for r in sch.waiting]
        running_before = [(r.request_id, r.num_scheduled) for r in sch.running]
        unfinished = [r for r in self.requests.values() if not r.finished]
        n_plans = len(self.runner.plans)
        result = self.engine.step()
        slots, free_slots, waiting_after = self._scheduled
        batch = result.batch or Batch([], [])
        running_ids = {rid for rid, _ in running_before}
        rec = StepRecord(
            iteration=self.iteration + 1, waiting_before=waiting_before, running_before=running_before,
            decodes=[r.request_id for r in batch.decodes],
            chunks=[(c.request.request_id, c.start, c.length) for c in batch.prefills],
            admitted=[rid for rid in slots if rid not in running_ids], num_tokens=batch.num_tokens,
            slots=slots, free_slots=free_slots, waiting_after=waiting_after,
            plan=self.runner.plans[-1] if len(self.runner.plans) > n_plans else None)
        self.records.append(rec)
        for rid in rec.admitted:
            self.joined[rid] = rec.iteration
        for req in unfinished:
            # (a request failed while its inputs were prepared never ran that iteration)
            if req.finished and req.finish_reason not in (FinishReason.ABORT, FinishReason.ERROR):
                self._check_kv(req)
                self.left[req.request_id] = rec.iteration
                rec.finished.append((req.request_id, req.finish_reason))
        return rec

    def _check_kv(self, req: Request) -> None:
        """Its pages hold prompt + outputs (each output is the next position's input)."""
        seq = req.prompt_ids + req.output_ids
        n = min(req.num_scheduled, len(seq))
        pages = req.pages or self.pages.get(req.request_id)
        if pages is None:  # admitted without pages yet (a static batch's zero-length chunk)
            assert n == 0, f"{req.request_id}: {n} tokens scheduled but no pages"
            return
        got = self.device.read(pages, n)
        assert got == seq[:n], f"{req.request_id}: KV pages {pages} hold {got}, expected {seq[:n]}"

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
