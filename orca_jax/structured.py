"""Structured output: a grammar per request, enforced as a token mask on the device.

A request's `SamplingParams.structured` names a constraint (vLLM's `structured_outputs` and
OpenAI's `response_format`): a JSON schema, any JSON object, a regex, a choice of strings or a
Lark grammar. llguidance (a kept library made for this, as in vLLM and SGLang) compiles it
against the model's tokenizer; each request gets its own matcher, which the host advances by
every sampled token and asks, before each of the request's steps, for the set of tokens that
keep the output valid: a bitmask of [ceil(V / 32)] 32-bit words (bit t%32 of word t//32 set:
token t allowed). The sampler applies it on the device (`sampling.sample`).

`allowed_token_ids` become the same kind of bitmask (one per params, cached), so the device
sees one mask per row whatever made it. A step without any constrained row sends no mask at
all (zero-width arrays: a separate, warmed-up sampling program), so unconstrained traffic pays
nothing. A constrained request is not scheduled while its previous token is still on the
device (its mask needs that token), so it advances every other iteration when the engine
keeps one step in flight.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Literal, Sequence

import numpy as np

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or grammar's size limit
MAX_LOGIT_BIAS = 300       # logit_bias entries (OpenAI's limit): the sampler's [R, 300] columns


class GrammarError(ValueError):
    """The constraint does not compile (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Structured:
    """What a request's output must match. `spec`: the JSON schema (as compact JSON text), the
    regex, the choices (a JSON list of strings) or the Lark grammar; "" for json_object."""

    kind: Literal["json", "json_object", "regex", "choice", "grammar"]
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"structured must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str) or len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"structured {self.kind} must be a string of at most {MAX_SPEC_CHARS} characters")

    def grammar(self) -> str:
        """llguidance's grammar text for this constraint."""
        from llguidance import LLMatcher
        # JSON without optional whitespace (vLLM's disable_any_whitespace): a model, random
        # weights above all, cannot then spend its max_tokens on blanks inside the object.
        compact = {"whitespace_flexible": False}
        if self.kind == "json":
            return LLMatcher.grammar_from_json_schema(self.spec, defaults=compact)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=compact)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in json.loads(self.spec)))
        return LLMatcher.grammar_from_lark(self.spec)


def mask_words(vocab_size: int) -> int:
    """32-bit words of one row's token bitmask."""
    return (vocab_size + 31) // 32


def allowed_mask(token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """[W] int32 bitmask with exactly `token_ids` set."""
    bits = np.zeros(mask_words(vocab_size) * 32, bool)
    bits[np.asarray(token_ids, np.int64)] = True
    return np.packbits(bits.reshape(-1, 32)[:, ::-1], axis=1).view(">u4").astype(np.uint32).view(np.int32)[:, 0]


class Grammars:
    """The model's tokenizer as llguidance sees it (built once, ~1 s for a 50k vocabulary) and
    the per-request matchers made with it."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, list(eos_token_ids)

    @functools.cached_property
    def tokenizer(self):
        import llguidance
        inner = getattr(self._tokenizer, "_tok", None)  # tokenizer.HFTokenizer's tokenizers.Tokenizer
        if inner is None:
            raise GrammarError("structured output needs a Hugging Face `tokenizers` tokenizer "
                               "(tokenizer.json or vocab.json + merges.txt) in the checkpoint")
        # The model's EOS ids that the tokenizer has (a checkpoint may pair a larger model
        # vocabulary with a smaller tokenizer), else the tokenizer's own.
        eos = [t for t in self._eos if t < inner.get_vocab_size(with_added_tokens=True)]
        return llguidance.LLTokenizer(inner.to_str(), n_vocab=self.vocab_size,
                                      eos_token=eos or getattr(self._tokenizer, "eos_token_id", None))

    def check(self, structured: Structured) -> None:
        """GrammarError when the constraint does not compile. Servers call it in a worker
        thread before submitting, so the engine thread finds the compiled matcher cached."""
        self.matcher(structured)

    def matcher(self, structured: Structured) -> "Matcher":
        """A fresh matcher: a copy of the constraint's compiled one (compiling a schema takes
        milliseconds, copying microseconds; the last few constraints are kept)."""
        compiled = self._compiled(structured)
        if compiled.is_error():
            raise GrammarError(compiled.get_error())
        return Matcher(compiled.deep_copy())

    @functools.lru_cache(maxsize=64)
    def _compiled(self, structured: Structured):
        from llguidance import LLMatcher
        try:
            return LLMatcher(self.tokenizer, structured.grammar(), log_level=0)
        except (ValueError, TypeError) as e:
            raise GrammarError(str(e)) from None


class Matcher:
    """One request's grammar state: advanced by each sampled token, asked for the next mask."""

    def __init__(self, m):
        self._m = m

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed-token bitmask into `row` ([W] int32, C-contiguous)."""
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.size * row.itemsize)

    def consume(self, token_id: int) -> str | None:
        """Advance by a sampled token; the error, if the token broke the grammar."""
        if self._m.is_stopped():  # complete: what follows (EOS) is past the grammar
            return None
        if not self._m.consume_token(int(token_id)):
            return self._m.get_error() or f"token {token_id} does not fit the grammar"
        return None


def constraint_tensors(reqs: Sequence, num_rows: int, vocab_size: int) -> dict:
    """The constrained sampling program's extra inputs for a step whose sampling rows are
    `reqs` (Requests; rows past them are padding): `allow` [R, W] i32 bitmask (all ones for
    unconstrained rows), `bias_ids` [R, K] i32 (`vocab_size` pads: out of range, dropped) and
    `bias` [R, K] f32, with K = MAX_LOGIT_BIAS."""
    allow = np.full((num_rows, mask_words(vocab_size)), -1, np.int32)
    bias_ids = np.full((num_rows, MAX_LOGIT_BIAS), vocab_size, np.int32)
    bias = np.zeros((num_rows, MAX_LOGIT_BIAS), np.float32)
    for i, req in enumerate(reqs):
        p = req.params
        if req.matcher is not None:
            req.matcher.fill(allow[i])
        if p.allowed_token_ids:
            allow[i] &= _allowed(p.allowed_token_ids, vocab_size)
        if p.logit_bias:
            ids, values = zip(*p.logit_bias)
            bias_ids[i, :len(ids)] = ids
            bias[i, :len(ids)] = values
    return {"allow": allow, "bias_ids": bias_ids, "bias": bias}


@functools.lru_cache(maxsize=256)
def _allowed(token_ids: tuple[int, ...], vocab_size: int) -> np.ndarray:
    return allowed_mask(token_ids, vocab_size)
