"""StepPlan: one iteration's `Batch` packed into padded numpy arrays (host side, no JAX). The
inputs of the step programs are defined here, once: `AttnMeta` (attention), `StepInputs` (the
forward program), `SampleInputs` (sampling); the device side registers them as pytrees
(models/attention.py, step.py), and inside the programs their fields are device arrays.

Rows are laid out `[Td decode rows | Tp prefill rows]`, each count padded up to a bucket so
that the number of compiled step programs stays small and every one of them is compiled at
warm-up. Context lengths are not shapes: attention loops over a sequence's pages with a
runtime trip count. The rows that sample (every decode row, and the last row of
each chunk that completes a prompt) are gathered for the LM head: `R = Td + min(Tp,
max_prefill_seqs)` rows, rounded up to a power of two.

KV memory is paged (orca_jax/kv_pages.py): each row carries the flat index of the page
position its K and V go to, decode rows their request's block table, and prefill segments that
continue a sequence already in pages (chunked prompts, cached prefixes) theirs.

Padding conventions (see models/attention.py): slot S (one past the last slot) drops a
per-sequence write and kv_index P * B (one past the last page) a KV write; position 0; segment
PAD_SEG; sample slot S drops the sampled-token write.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple, Sequence

import numpy as np

from .kv_pages import pages_for
from .request import MAX_STOP_TOKEN_IDS, Request, SamplingParams
from .scheduler import Batch

# The conventions of a plan, which the attention kernel (models/attention.py) reads:
PAD_SEG = -1      # the segment of a padding prefill row


def _geometric(lo: int, hi: int, factor: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= factor
    return tuple(out) + (hi,)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The padded row counts a step can have; each (decode, prefill) pair is one program."""

    decode: tuple[int, ...]    # Td choices, 0 first
    prefill: tuple[int, ...]   # Tp choices, 0 first
    max_prefill_seqs: int
    min_mixed_decode: int = 1  # a step with prefill rows pads its decode rows to at least this

    @staticmethod
    def make(max_batch_size: int, max_num_batched_tokens: int, max_prefill_seqs: int,
             min_decode: int = 1, min_prefill: int = 16, min_mixed_decode: int = 8) -> "Buckets":
        """Decode rows: 1, 2, 4, 8, ... (on XLA CPU 8 rows cost 1.5-2.5x one row: a small
        batch must not pay for padding, docs/benchmarks.md); prefill rows: 16, 64, 256, ... (x4: a
        full budget is the common case under load). Next to >= 16 prefill rows, fewer than
        `min_mixed_decode` decode rows save little, so steps with both use only the decode
        buckets from there up: 3 x len(prefill) fewer programs, each seconds to compile."""
        return Buckets(decode=(0,) + _geometric(min(min_decode, max_batch_size), max_batch_size, 2),
                       prefill=(0,) + _geometric(min(min_prefill, max_num_batched_tokens),
                                                 max_num_batched_tokens, 4),
                       max_prefill_seqs=max_prefill_seqs,
                       min_mixed_decode=min(min_mixed_decode, max_batch_size))

    def shapes(self) -> list[tuple[int, int]]:
        """Every (Td, Tp) a step can take: what warm-up compiles."""
        return [(d, p) for d in self.decode for p in self.prefill
                if (d or p) and not (p and 0 < d < self.min_mixed_decode)]

    def decode_rows(self, n: int, tp: int) -> int:
        """Td of a step with `n` decode rows and `tp` padded prefill rows."""
        return self.pick(max(n, self.min_mixed_decode) if n and tp else n, self.decode)

    def num_sample_rows(self, td: int, tp: int) -> int:
        """R: rows that may sample, padded to a power of two. Sampling is its own program
        per R (it compiles slowly: sort, RNG), shared by every (Td, Tp) with that R."""
        n = td + min(tp, self.max_prefill_seqs)
        return 1 << (n - 1).bit_length()

    @staticmethod
    def pick(n: int, choices: tuple[int, ...]) -> int:
        for b in choices:
            if b >= n:
                return b
        raise ValueError(f"{n} rows exceed the largest bucket {choices[-1]}")


class SampleRow(NamedTuple):  # a tuple: one is made per request per iteration
    request: Request
    index: int        # which output token this row samples (0 = the first new token)


@dataclasses.dataclass(frozen=True)
class PagedKV:
    """The geometry of the KV page pool that plans index (models/attention.py `KVCache`)."""

    num_pages: int    # P: pages per layer
    page_size: int    # B: positions per page (also the attention kernel's block)
    max_pages: int    # W: pages of the longest sequence (max_model_len / B, rounded up): the
                      # width of a block table

    @staticmethod
    def make(num_pages: int, page_size: int, max_len: int) -> "PagedKV":
        return PagedKV(num_pages, page_size, pages_for(max_len, page_size))


@dataclasses.dataclass(frozen=True)
class AttnMeta:
    """Per-step attention metadata, padded to the step's bucket shape (numpy on the host,
    device arrays inside the programs).

    Padding rows have ``slot == S`` and ``kv_index == P * B`` (out of range: their writes are
    dropped), ``pos == 0`` and ``seg == PAD_SEG``; their outputs are computed but never read.
    Context lengths are runtime values (loop trip counts over pages), so they add no compiled
    programs: only the row counts Td and Tp are shapes (and the fixed widths W and Nh).
    """

    slot: np.ndarray           # [T] int32 sequence slot of each row (per-sequence device state)
    pos: np.ndarray            # [T] int32 absolute position of each row
    kv_index: np.ndarray       # [T] int32 where its K and V go: page * B + pos % B
    seg: np.ndarray            # [Tp] int32 segment (request) id of each prefill row
    block_table: np.ndarray    # [Td, W] int32 pages of each decode row's sequence (0 past its end)
    dec_blocks: np.ndarray     # [] int32 pages the decode rows read: ceil(max(pos + 1) / B)
    # Prefill segments whose first positions are already in their pages (an earlier chunk of
    # the prompt, or a cached prefix), packed first: Nh = min(max_prefill_seqs, Tp) entries.
    hist_table: np.ndarray     # [Nh, W] int32 their pages
    hist_len: np.ndarray       # [Nh] int32 positions already in the pages (the segment starts there)
    hist_row0: np.ndarray      # [Nh] int32 first prefill row of the segment
    hist_rows: np.ndarray      # [Nh] int32 its rows in this step
    num_hist: np.ndarray       # [] int32 how many entries are real
    seg_table: np.ndarray      # [Nh, W] int32 pages of every prefill segment's sequence, in segment
                               # order (what the CPU kernel reads prefill rows through)
    num_decode: int = dataclasses.field(metadata=dict(static=True))  # Td, a shape


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What the forward program needs: one per (Td, Tp) bucket."""

    prefill_tokens: np.ndarray  # [Tp] int32
    meta: AttnMeta
    sample_rows: np.ndarray     # [R] int32 rows whose logits are computed
    decode_tokens: np.ndarray | None = None  # [Td] int32 from the host; None: read last_token


@dataclasses.dataclass(frozen=True)
class SampleInputs:
    """What the sampling program needs: one per R bucket."""

    sample_slot: np.ndarray  # [R] int32 (S: padding, writes dropped)
    sample_pos: np.ndarray   # [R] int32 position of each row's input token
    prompt_len: np.ndarray   # [R] int32
    sampling: SamplingTensors | None


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step: the programs' inputs (numpy, padded to the step's bucket) plus the host
    bookkeeping to read its results back."""

    inputs: StepInputs
    sample: SampleInputs               # its `sampling` is None: the runner adds the parameters
    rows: list[SampleRow]              # the real sampling rows, in order
    num_tokens: int                    # real (unpadded) tokens

    @property
    def num_decode(self) -> int:       # Td (static)
        return self.inputs.meta.num_decode

    @property
    def num_prefill(self) -> int:      # Tp (static)
        return len(self.inputs.prefill_tokens)

    @property
    def num_sample_rows(self) -> int:  # R (static)
        return len(self.sample.sample_slot)


def build_plan(batch: Batch, buckets: Buckets, num_slots: int, kv: PagedKV,
               host_decode_tokens: bool = False, shape: tuple[int, int] | None = None) -> StepPlan:
    """`host_decode_tokens`: send each decode row's input token (its request's last output
    token, which the host must already have: pipelined engines) instead of reading it on device.
    `shape`: (Td, Tp) to pad to instead of the batch's buckets."""
    S, B, W = num_slots, kv.page_size, kv.max_pages
    if shape is None:
        tp = Buckets.pick(sum(c.length for c in batch.prefills), buckets.prefill)
        td = buckets.decode_rows(len(batch.decodes), tp)
    else:
        td, tp = shape
    R = buckets.num_sample_rows(td, tp)
    nh = min(buckets.max_prefill_seqs, tp)
    slot = np.full(td + tp, S, np.int32)
    pos = np.zeros(td + tp, np.int32)
    kv_index = np.full(td + tp, kv.num_pages * B, np.int32)
    seg = np.full(tp, PAD_SEG, np.int32)
    tokens = np.zeros(tp, np.int32)
    block_table = np.zeros((td, W), np.int32)
    hist_table = np.zeros((nh, W), np.int32)
    seg_table = np.zeros((nh, W), np.int32)
    hist = np.zeros((3, nh), np.int32)  # hist_len, hist_row0, hist_rows
    sample_rows = np.zeros(R, np.int32)
    sample_slot = np.full(R, S, np.int32)
    sample_pos = np.zeros(R, np.int32)
    prompt_len = np.zeros(R, np.int32)
    rows: list[SampleRow] = []

    # Decode rows: position num_scheduled - 1 (the scheduler already advanced it), each samples.
    decodes = batch.decodes
    nd = len(decodes)
    if nd:  # one pass over the rows (this runs for every running request every iteration)
        cols = [(r.num_scheduled - 1, r.prompt_len, r.slot, r.pages[(r.num_scheduled - 1) // B], len(r.pages))
                for r in decodes]  # fromiter over the values: np.array(cols) takes twice the time
        cols = np.fromiter(itertools.chain.from_iterable(cols), np.int32, 5 * nd).reshape(nd, 5).T  # [5, nd]
        dec_pos, dec_plen, n_pages = cols[0], cols[1], cols[4]
        slot[:nd] = sample_slot[:nd] = cols[2]
        pos[:nd] = sample_pos[:nd] = dec_pos
        kv_index[:nd] = cols[3] * B + dec_pos % B
        # Every row's pages in one scatter: row i, columns 0..len(pages_i)-1 (row-major order
        # of the mask is the order of `flat`).
        flat = np.fromiter(itertools.chain.from_iterable(r.pages for r in decodes), np.int32, int(n_pages.sum()))
        block_table[:nd][np.arange(W) < n_pages[:, None]] = flat
        prompt_len[:nd] = dec_plen
        sample_rows[:nd] = np.arange(nd)
        # SampleRows made by tuple.__new__, in C (SampleRow(...) runs a Python __new__ per row:
        # twice the time)
        rows += map(tuple.__new__, itertools.repeat(SampleRow, nd),
                    zip(decodes, (dec_pos - dec_plen + 1).tolist()))
    dec_blocks = pages_for(int(pos[:nd].max()) + 1, B) if nd else 0

    row, nhist = td, 0
    for s, c in enumerate(batch.prefills):
        req = c.request
        rng = slice(row, row + c.length)
        p = np.arange(c.start, c.start + c.length, dtype=np.int32)
        slot[rng], pos[rng], seg[rng.start - td:rng.stop - td] = req.slot, p, s
        kv_index[rng] = np.asarray(req.pages, np.int32)[p // B] * B + p % B
        tokens[rng.start - td:rng.stop - td] = req.token_ids(c.start, c.start + c.length)
        seg_table[s, :len(req.pages)] = req.pages
        if c.start > 0:  # its first positions are in its pages already
            hist_table[nhist, :len(req.pages)] = req.pages
            hist[:, nhist] = c.start, row - td, c.length
            nhist += 1
        if c.completes_prompt:
            i = len(rows)
            sample_rows[i], sample_slot[i], sample_pos[i] = row + c.length - 1, req.slot, p[-1]
            prompt_len[i] = req.prompt_len
            rows.append(SampleRow(req, req.prefill_len - req.prompt_len))
        row += c.length
    meta = AttnMeta(slot=slot, pos=pos, kv_index=kv_index, seg=seg, block_table=block_table,
                    dec_blocks=np.int32(dec_blocks), hist_table=hist_table, hist_len=hist[0],
                    hist_row0=hist[1], hist_rows=hist[2], num_hist=np.int32(nhist), seg_table=seg_table,
                    num_decode=td)
    decode_tokens = _decode_tokens(batch, td) if host_decode_tokens else None
    return StepPlan(inputs=StepInputs(tokens, meta, sample_rows, decode_tokens),
                    sample=SampleInputs(sample_slot, sample_pos, prompt_len, None),
                    rows=rows, num_tokens=batch.num_tokens)


def warmup_plan(td: int, tp: int, buckets: Buckets, num_slots: int, kv: PagedKV,
                host_decode_tokens: bool = False) -> StepPlan:
    """An all-padding plan of shape (Td, Tp): runs (compiles) a bucket's program, writes nothing."""
    return build_plan(Batch([], []), buckets, num_slots, kv, host_decode_tokens, shape=(td, tp))


def _decode_tokens(batch: Batch, td: int) -> np.ndarray:
    out = np.zeros(td, np.int32)
    # the token at position num_scheduled - 1 (IndexError if its iteration is still in flight)
    out[:len(batch.decodes)] = [r.output_ids[r.num_scheduled - 1 - r.prompt_len] for r in batch.decodes]
    return out


# -- the sampling rows of a step -------------------------------------------------------------

MAX_EOS = 4  # end-of-sequence ids a model may have (Llama 3.1 has 3)
MAX_BANNED = MAX_STOP_TOKEN_IDS + MAX_EOS  # EOS ids + the stop_token_ids, masked before min_tokens
NO_ID = 2**30         # padding of `banned`: out of range, so the masking scatter drops it
# The batch-wide switches of the sampler's optional stages (SamplingTensors fields).
SAMPLING_SWITCHES = ("any_random", "any_penalty", "any_filter", "any_logprobs")

@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters of one step, built on the host (numpy) and read by the
    sampler (sampling.py, which registers this class as a pytree). Padding rows are greedy
    with no penalties."""

    temperature: np.ndarray        # [R] f32, 0 => greedy
    top_k: np.ndarray              # [R] i32, 0 => off
    top_p: np.ndarray              # [R] f32, 1 => off
    min_p: np.ndarray              # [R] f32, 0 => off
    repetition_penalty: np.ndarray # [R] f32, 1 => off
    presence_penalty: np.ndarray   # [R] f32, 0 => off
    frequency_penalty: np.ndarray  # [R] f32, 0 => off
    seed: np.ndarray               # [R, 2] u32: (high, low) words of the 63-bit request seed
    step: np.ndarray               # [R] i32: index of the token being generated (0 = first)
    banned: np.ndarray             # [R, MAX_BANNED] i32: ids masked out before min_tokens
                                   # (EOS ids and stop ids; NO_ID pads)
    any_random: np.ndarray         # [] bool: some row has temperature > 0
    any_penalty: np.ndarray        # [] bool: some row has a penalty
    any_filter: np.ndarray         # [] bool: some sampling row uses top_k/top_p/min_p
    any_logprobs: np.ndarray       # [] bool: some row wants logprobs (sampled + top MAX_LOGPROBS)
    # Constrained steps only (structured.constraint_tensors); zero-width otherwise, which is
    # another (warmed-up) sampling program: unconstrained batches never touch a mask.
    allow: np.ndarray              # [R, W] i32 token bitmask, W = ceil(V / 32)
    bias_ids: np.ndarray           # [R, K] i32 logit_bias ids (out of range: none)
    bias: np.ndarray               # [R, K] f32 their biases

    @staticmethod
    def from_params(params_list: list[SamplingParams | None], seeds: list[int], steps: list[int],
                    num_rows: int, eos_token_ids: Sequence[int] = ()) -> SamplingTensors:
        """Host-side builder (numpy): row i takes params_list[i]; None and rows past the list
        are greedy padding. Flags only count rows that need them: filters on a greedy row
        cannot change its argmax, so they do not switch on the sort. Until a row has made
        `min_tokens` tokens, its EOS ids (unless ignore_eos) and stop ids cannot be drawn (vLLM's
        and HF's min_new_tokens semantics)."""
        if len(params_list) > num_rows:
            raise ValueError(f"{len(params_list)} rows of params for {num_rows} rows")
        ps = [p or _PADDING for p in params_list] + [_PADDING] * (num_rows - len(params_list))
        n = len(params_list)
        live = np.array([p is not None for p in params_list] + [False] * (num_rows - n), bool)
        seed = np.zeros((num_rows, 2), np.uint32)
        s64 = np.array(seeds[:n], np.uint64)
        seed[:n, 0], seed[:n, 1] = s64 >> np.uint64(32), s64 & np.uint64(0xFFFFFFFF)
        seed[~live] = 0
        step, banned = SamplingTensors._per_step(params_list, steps, num_rows, eos_token_ids)
        # One pass over the rows; top_k (< 2**31) is exact in float64.
        cols = np.array([(p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty,
                          p.presence_penalty, p.frequency_penalty) for p in ps], np.float64).T
        temperature, top_p, min_p, rep, pres, freq = cols[[0, 2, 3, 4, 5, 6]].astype(np.float32)
        top_k = cols[1].astype(np.int32)
        random = temperature > 0
        filtered = random & ((top_k > 0) | (top_p < 1) | (min_p > 0))
        return SamplingTensors(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep,
            presence_penalty=pres, frequency_penalty=freq, seed=seed, step=step, banned=banned,
            any_random=np.bool_(random.any()),
            any_penalty=np.bool_(((rep != 1) | (pres != 0) | (freq != 0)).any()),
            any_filter=np.bool_(filtered.any()),
            any_logprobs=np.bool_(any(p is not None and p.logprobs is not None for p in params_list)),
            allow=np.zeros((num_rows, 0), np.int32), bias_ids=np.zeros((num_rows, 0), np.int32),
            bias=np.zeros((num_rows, 0), np.float32))

    def next_step(self, params_list: list[SamplingParams | None], steps: list[int],
                  eos_token_ids: Sequence[int] = ()) -> SamplingTensors:
        """These tensors for the same rows one iteration later: only `step` and `banned`
        change (a steady decode batch keeps its rows, so the engine builds the rest once)."""
        step, banned = self._per_step(params_list, steps, len(self.step), eos_token_ids)
        return dataclasses.replace(self, step=step, banned=banned)

    @staticmethod
    def _per_step(params_list, steps, num_rows, eos_token_ids) -> tuple[np.ndarray, np.ndarray]:
        """(step [R], banned [R, MAX_BANNED]): what changes from one iteration to the next."""
        n = len(params_list)
        step = np.zeros((num_rows,), np.int32)
        step[:n] = steps[:n]
        banned = np.full((num_rows, MAX_BANNED), NO_ID, np.int32)
        for i, p in enumerate(params_list):  # one pass over the rows, each test cheap and rarely true
            if p is None:  # a padding row
                step[i] = 0
            elif p.min_tokens and steps[i] < p.min_tokens:  # only before min_tokens
                ids = list(p.stop_token_ids)
                if not p.ignore_eos:
                    ids += eos_token_ids[:MAX_EOS]
                banned[i, :len(ids)] = ids
        return step, banned


_PADDING = SamplingParams(temperature=0.0)
