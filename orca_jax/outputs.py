"""The output processor: sampled token ids -> what a caller sees (host side, no JAX).

For each request it keeps an incremental detokenizer and a stop-string matcher; for each new
token it decides whether the request stops (EOS, a stop token, a stop string, max_tokens) and
makes the delta: the new ids, the new text (minus a held-back partial character or stop-string
prefix), logprobs, usage, and timing metrics on the final one. `append_rows` takes a whole
iteration's rows, the common decode token inline (per-row work is most of the host's time at
hundreds of running requests). Under the `static` policy it holds finished requests back
until their whole batch is done (the paper's request-level baseline). The engine core
(engine.py) calls it; it never touches the scheduler.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple, Sequence

import numpy as np

from .plan import SampleRow
from .request import FinishReason, Request, RequestOutput, Status, Usage
from .stops import StopStringMatcher
from .tokenizer import IncrementalDetokenizer


class Sampled(NamedTuple):
    """One iteration's results on the host, one entry per sampling row."""

    ids: list[int]                         # [R] sampled token ids
    logprob: np.ndarray | None             # [R] f32 (None: no row asked for logprobs)
    top_ids: np.ndarray | None             # [R, MAX_LOGPROBS] int32
    top_logprobs: np.ndarray | None        # [R, MAX_LOGPROBS] f32


@dataclasses.dataclass(slots=True)
class _Output:
    """Per-request detokenization state."""

    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    unsent: str = ""         # text made since the last delta
    sent_tokens: int = 0
    # For `append_rows`, fixed for the request's life: below how many output tokens its
    # tokens may take the inline path (max_tokens; 0 without a byte-level detokenizer or with
    # logprobs), and the ids that may stop it (EOS and stop ids, whatever min_tokens says).
    inline_below: int = 0
    stop_ids: frozenset = frozenset()


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: Sequence[int], static: bool = False):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.static = static
        self._outputs: dict[str, _Output] = {}
        self._held: list[RequestOutput] = []    # static policy: finals wait for the batch
        # Each id's bytes, as every request's IncrementalDetokenizer has them (None: the
        # tokenizer is not byte-level, and `append_rows` has no inline path).
        self._token_bytes = getattr(tokenizer, "token_bytes", None)

    def add(self, req: Request) -> None:
        p = req.params
        inline = self._token_bytes is not None and p.logprobs is None
        self._outputs[req.request_id] = _Output(
            IncrementalDetokenizer(self.tokenizer, req.prompt_ids),
            StopStringMatcher(p.stop_automaton, p.include_stop_str_in_output),
            inline_below=p.max_tokens if inline else 0,
            stop_ids=self.eos_token_ids | frozenset(p.stop_token_ids))

    def has_held(self) -> bool:
        return bool(self._held)

    def append_rows(self, rows: Sequence[SampleRow], sampled: Sampled, now: float,
                    append: Callable[[Request, Sampled, int, float], RequestOutput],
                    fast: bool = True) -> list[RequestOutput]:
        """Every row's token, in row order, for the requests not finished yet: their outputs
        (a delta, or the final output of a request that stops). `append(req, sampled, row,
        now)` is the caller's per-row path around `self.append` (the engine's: finish the
        request if it stops, fail it alone if its output raises).

        This is `append` (just below: keep the two in step) specialised to the common decode
        token: neither the request's first token nor its max_tokens-th, no EOS or stop id, of
        a request with no grammar and no logprobs, whose byte-level detokenizer holds nothing
        back, whose bytes are whole characters, in which no stop string starts while none is
        half-matched. For it `append`, `_check_stop` and `_delta` only extend the output ids
        and text and make a delta (before min_tokens too: the stop checks skipped there would
        pass), so that is done here inline: a fraction of the cost per row, which matters at
        hundreds of rows. Nothing on that path can raise. Every other row goes through
        `append`, and every row when not `fast`."""
        outs = []
        ids, outputs, table, FINISHED = sampled.ids, self._outputs, self._token_bytes, Status.FINISHED
        n_table = len(table) if table is not None else 0
        for i, (req, _) in enumerate(rows):
            if req.status is FINISHED:  # aborted, or stopped while this step was in flight
                continue
            tok, o = ids[i], outputs.get(req.request_id)
            n = len(req.output_ids) + 1  # its output tokens, this one included
            if (fast and o is not None and n < o.inline_below and req.matcher is None
                    and req.first_token_time is not None and tok not in o.stop_ids
                    and not o.detok.pending and not (stops := o.stops).state and not stops.stopped):
                try:  # IncrementalDetokenizer.push_one with nothing pending
                    text = (table[tok] if 0 <= tok < n_table else b"").decode("utf-8")
                except UnicodeDecodeError:  # part of a character: `append` holds it back
                    text = None
                if text is not None and (stops.auto is None or stops.auto.first.isdisjoint(text)):
                    req.output_ids.append(tok)
                    text, sent, o.unsent, o.sent_tokens = o.unsent + text, o.sent_tokens, "", n
                    outs.append(RequestOutput(req.request_id, req.output_ids[sent:], text, False,
                                              req.finish_reason, Usage(req.prompt_len, n), None, req.error))
                    continue
            outs.append(append(req, sampled, i, now))
        return outs

    def append(self, req: Request, sampled: Sampled, row: int,
               now: float) -> tuple[FinishReason | None, RequestOutput | None]:
        """Take row `row`'s token: record it (and its logprobs), detokenize it; returns why the
        request stops now (None: it goes on) and, when it goes on, its delta. Every token of
        every running request that `append_rows` does not take inline (keep the two in step)."""
        tok = sampled.ids[row]
        req.output_ids.append(tok)
        if req.matcher is not None:  # its grammar's next mask follows this token
            broke = req.matcher.consume(tok)
            if broke is not None:  # cannot happen with the mask applied: say so, do not go on
                req.error = f"structured output: {broke}"
                return FinishReason.ERROR, None
        if req.first_token_time is None:
            req.first_token_time = now
        n_lp = req.params.logprobs
        if n_lp is not None:
            top = {int(t): float(v) for t, v in zip(sampled.top_ids[row, :n_lp], sampled.top_logprobs[row, :n_lp])}
            req.logprobs.append({"token_id": tok, "logprob": float(sampled.logprob[row]), "top": top})
        o = self._outputs[req.request_id]
        reason = self._check_stop(req, o, tok)
        return reason, (self._delta(req, o, finished=False) if reason is None else None)

    def _check_stop(self, req: Request, o: _Output, tok: int) -> FinishReason | None:
        p = req.params
        n = len(req.output_ids)
        stop_id = n > p.min_tokens and (tok in p.stop_token_ids or (tok in self.eos_token_ids and not p.ignore_eos))
        stopped = False
        if not stop_id:  # a stop token stays in token_ids but not in the text
            delta = o.detok.push_one(tok)
            if n > p.min_tokens:  # vLLM: no stop check of any kind before min_tokens
                delta, stopped = o.stops.push(delta)
            o.unsent += delta
        reason = FinishReason.STOP if stop_id or stopped else None
        if reason is not None:  # which stop token id or string (vLLM's stop_reason; EOS: None)
            req.stop_reason = o.stops.matched if stopped else tok if tok in p.stop_token_ids else None
        if reason is None and n >= p.max_tokens:
            reason = FinishReason.LENGTH
        if reason is not None and not stopped:  # held-back text (a partial character, a
            emit, _ = o.stops.push(o.detok.flush())  # stop-string prefix) goes out now
            o.unsent += emit + o.stops.flush()
        return reason

    def final(self, req: Request) -> RequestOutput:
        """The last delta of a finished (stopped, aborted or failed) request; forgets it."""
        req.finish_time = time.monotonic()
        o = self._outputs.pop(req.request_id, None)
        if o is None:  # it finished while its final output was being made, which never left
            return RequestOutput(req.request_id, [], "", True, req.finish_reason,
                                 Usage(req.prompt_len, len(req.output_ids)), error=req.error,
                                 metrics=_metrics(req))
        return self._delta(req, o, finished=True)

    def _delta(self, req: Request, o: _Output, finished: bool) -> RequestOutput:
        n = len(req.output_ids)
        new_ids = req.output_ids[o.sent_tokens:]
        new_lp = req.logprobs[o.sent_tokens:] if req.params.logprobs is not None else None
        text, o.unsent, o.sent_tokens = o.unsent, "", n
        return RequestOutput(req.request_id, new_ids, text, finished, req.finish_reason,
                             Usage(req.prompt_len, n), new_lp, req.error,
                             _metrics(req) if finished else None, req.stop_reason if finished else None)

    def hold_finals(self, outputs: list[RequestOutput], batch_done: bool) -> list[RequestOutput]:
        """Static batching returns a batch's results only when all of it is done (the
        request-level baseline of the paper, FasterTransformer-style); failures go out at once."""
        if not self.static:
            return outputs
        hold = [o.finished and o.finish_reason is not FinishReason.ERROR for o in outputs]
        self._held += [o for o, h in zip(outputs, hold) if h]
        outputs = [o for o, h in zip(outputs, hold) if not h]
        if batch_done and self._held:
            outputs, self._held = outputs + self._held, []
        return outputs


def _metrics(req: Request) -> dict:
    return {"arrival_time": req.arrival_time, "first_scheduled_time": req.first_scheduled_time,
            "first_token_time": req.first_token_time, "finish_time": req.finish_time}
