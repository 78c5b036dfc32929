"""StepPlan: one iteration's `Batch` packed into padded numpy arrays (host side, no JAX).

Rows are laid out `[Td decode rows | Tp prefill rows]`, each count padded up to a bucket so
that the number of compiled step programs stays small and every one of them is compiled at
warm-up. Context lengths are not shapes: attention loops over BLOCK-sized pieces of the KV
buffer with a runtime trip count. The rows that sample (every decode row, and the last row of
each chunk that completes a prompt) are gathered for the LM head: `R = Td + min(Tp,
max_prefill_seqs)` rows, rounded up to a power of two.

Padding conventions (see models/attention.py): slot S (one past the last slot) drops a KV
write; position 0; segment -1; sample slot S drops the sampled-token write.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .request import Request
from .scheduler import Batch

BLOCK = 64  # must equal orca_jax.models.attention.BLOCK (checked by the step module)


def _geometric(lo: int, hi: int, factor: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= factor
    return tuple(out) + (hi,)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The padded row counts a step can have; every (decode, prefill) pair is one program."""

    decode: tuple[int, ...]    # Td choices, 0 first
    prefill: tuple[int, ...]   # Tp choices, 0 first
    max_prefill_seqs: int

    @staticmethod
    def make(max_batch_size: int, max_num_batched_tokens: int, max_prefill_seqs: int,
             min_decode: int = 8, min_prefill: int = 16) -> "Buckets":
        """Decode rows: 8, 16, 32, ... (below ~8 rows a step is bound by reading the weights,
        so fewer rows cost the same); prefill rows: 16, 64, 256, ... (x4: a full budget is the
        common case under load). Each program costs seconds to compile on CPU."""
        return Buckets(decode=(0,) + _geometric(min(min_decode, max_batch_size), max_batch_size, 2),
                       prefill=(0,) + _geometric(min(min_prefill, max_num_batched_tokens),
                                                 max_num_batched_tokens, 4),
                       max_prefill_seqs=max_prefill_seqs)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (Td, Tp) a step can take: what warm-up compiles."""
        return [(d, p) for d in self.decode for p in self.prefill if d or p]

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


@dataclasses.dataclass(frozen=True)
class SampleRow:
    request: Request
    index: int        # which output token this row samples (0 = the first new token)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Padded arrays of one step plus the host bookkeeping to read its results back."""

    num_decode: int                    # Td (static)
    num_prefill: int                   # Tp (static)
    prefill_tokens: np.ndarray         # [Tp] int32 (decode rows read their token on device)
    slot: np.ndarray                   # [T] int32
    pos: np.ndarray                    # [T] int32
    seg: np.ndarray                    # [Tp] int32
    dec_blocks: np.int32
    hist_seg: np.int32
    hist_slot: np.int32
    hist_len: np.int32
    hist_blocks: np.int32
    sample_rows: np.ndarray            # [R] int32 row of each sampling row (0 for padding)
    sample_slot: np.ndarray            # [R] int32 (S for padding: no write)
    sample_pos: np.ndarray             # [R] int32 position of the row's input token
    prompt_len: np.ndarray             # [R] int32
    rows: list[SampleRow]              # the real sampling rows, in order
    num_tokens: int                    # real (unpadded) tokens
    decode_tokens: np.ndarray | None = None  # [Td] int32 (pipelined engines; else read on device)


def build_plan(batch: Batch, buckets: Buckets, num_slots: int,
               host_decode_tokens: bool = False) -> StepPlan:
    """`host_decode_tokens`: send each decode row's input token (its request's last output
    token, which the host must already have: pipelined engines) instead of reading it on device."""
    S = num_slots
    td = Buckets.pick(len(batch.decodes), buckets.decode)
    tp = Buckets.pick(sum(c.length for c in batch.prefills), buckets.prefill)
    R = buckets.num_sample_rows(td, tp)
    slot = np.full(td + tp, S, np.int32)
    pos = np.zeros(td + tp, np.int32)
    seg = np.full(tp, -1, np.int32)
    tokens = np.zeros(tp, np.int32)
    sample_rows = np.zeros(R, np.int32)
    sample_slot = np.full(R, S, np.int32)
    sample_pos = np.zeros(R, np.int32)
    prompt_len = np.zeros(R, np.int32)
    rows: list[SampleRow] = []

    def add_sample(row: int, req: Request, p: int, index: int):
        i = len(rows)
        sample_rows[i], sample_slot[i], sample_pos[i], prompt_len[i] = row, req.slot, p, req.prompt_len
        rows.append(SampleRow(req, index))

    # Decode rows: position num_computed - 1 (the scheduler already advanced it).
    for i, req in enumerate(batch.decodes):
        p = req.num_computed - 1
        slot[i], pos[i] = req.slot, p
        add_sample(i, req, p, p - req.prompt_len + 1)
    dec_blocks = -(-(int(pos[:len(batch.decodes)].max()) + 1) // BLOCK) if batch.decodes else 0

    hist_seg, hist_slot, hist_len = -2, 0, 0
    row = td
    for s, c in enumerate(batch.prefills):
        req = c.request
        rng = slice(row, row + c.length)
        slot[rng], pos[rng], seg[rng.start - td:rng.stop - td] = req.slot, np.arange(c.start, c.start + c.length), s
        tokens[rng.start - td:rng.stop - td] = req.prompt_ids[c.start:c.start + c.length]
        if c.start > 0:
            assert hist_seg == -2, "two chunks continue a prompt in one step"
            hist_seg, hist_slot, hist_len = s, req.slot, c.start
        if c.completes_prompt:
            add_sample(row + c.length - 1, req, c.start + c.length - 1, 0)
        row += c.length
    return StepPlan(
        num_decode=td, num_prefill=tp, prefill_tokens=tokens, slot=slot, pos=pos, seg=seg,
        dec_blocks=np.int32(dec_blocks), hist_seg=np.int32(hist_seg), hist_slot=np.int32(hist_slot),
        hist_len=np.int32(hist_len), hist_blocks=np.int32(-(-hist_len // BLOCK)),
        sample_rows=sample_rows, sample_slot=sample_slot, sample_pos=sample_pos,
        prompt_len=prompt_len, rows=rows, num_tokens=batch.num_tokens,
        decode_tokens=_decode_tokens(batch, td) if host_decode_tokens else None)


def _decode_tokens(batch: Batch, td: int) -> np.ndarray:
    out = np.zeros(td, np.int32)
    # the token at position num_computed - 1 (IndexError if its iteration is still in flight)
    out[:len(batch.decodes)] = [r.output_ids[r.num_computed - 1 - r.prompt_len] for r in batch.decodes]
    return out
