"""The output processor: sampled token ids -> what a caller sees (host side, no JAX).

For each request it keeps an incremental detokenizer and a stop-string matcher; for each new
token it decides whether the request stops (EOS, a stop token, a stop string, max_tokens) and
makes the delta: the new ids, the new text (minus a held-back partial character or stop-string
prefix), logprobs, usage, and timing metrics on the final one. Under the `static` policy it
holds finished requests back until their whole batch is done (the paper's request-level
baseline). The engine core (engine.py) calls it; it never touches the scheduler.
"""
from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Sequence

import numpy as np

from .request import FinishReason, Request, RequestOutput, Usage
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


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: Sequence[int], static: bool = False):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.static = static
        self._outputs: dict[str, _Output] = {}
        self._held: list[RequestOutput] = []    # static policy: finals wait for the batch

    def add(self, req: Request) -> None:
        p = req.params
        self._outputs[req.request_id] = _Output(IncrementalDetokenizer(self.tokenizer, req.prompt_ids),
                                                StopStringMatcher(p.stop_automaton, p.include_stop_str_in_output))

    def has_held(self) -> bool:
        return bool(self._held)

    def append(self, req: Request, sampled: Sampled, row: int,
               now: float) -> tuple[FinishReason | None, RequestOutput | None]:
        """Take row `row`'s token: record it (and its logprobs), detokenize it; returns why the
        request stops now (None: it goes on) and, when it goes on, its delta. Once per token
        of every running request: one dictionary lookup, no other call on the common path."""
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
