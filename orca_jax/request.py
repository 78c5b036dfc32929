"""Requests as the host sees them: sampling parameters, per-request state, outputs.

Plain Python, no JAX: the scheduler and servers use these without touching a device.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
import numbers
import time
from typing import Sequence

from .stops import StopAutomaton, stop_automaton
from .structured import MAX_LOGIT_BIAS, Structured

# What one request may ask for (docs/serving.md, "Limits"). Every bound keeps a request's cost
# to the engine (device arrays, per-token host work) small and independent of hostile input.
MAX_LOGPROBS = 20          # top-N alternatives a request may ask for (OpenAI caps legacy completions at 5)
MAX_STOP_STRINGS = 32      # stop strings per request: their automaton (orca_jax/stops.py) is at
MAX_STOP_STRING_CHARS = 128  # most 4096 states, ~0.6 MiB, built in ~20 ms
MAX_STOP_TOKEN_IDS = 15    # EOS + these fill the sampler's MAX_BANNED = 16 columns
LOGIT_BIAS_LIMIT = 100.0   # a bias is clamped to [-100, 100] (vLLM, OpenAI)
INT32_MAX = 2**31 - 1      # integer fields become int32 device arrays
FLOAT32_MAX = 3.4028234663852886e38  # float fields become float32 device arrays
SEED_LIMIT = 2**63         # seeds are split into two uint32 words on device
GREEDY_BELOW = 1e-5        # vLLM's _SAMPLING_EPS: a smaller temperature samples greedily


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def valid_unicode(s: str) -> bool:
    """False for strings with lone surrogates (they have no UTF-8 form: JSON "\\ud800")."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop. Defaults follow vLLM's."""

    max_tokens: int = 16                    # new tokens to generate at most
    temperature: float = 1.0                # 0 means greedy (argmax)
    top_k: int = 0                          # keep the k most likely tokens; 0 = off
    top_p: float = 1.0                      # nucleus sampling mass in (0, 1]; 1 = off
    min_p: float = 0.0                      # drop tokens below min_p * p(max); 0 = off
    repetition_penalty: float = 1.0         # HF/CTRL penalty on prompt+output tokens; 1 = off
    presence_penalty: float = 0.0           # OpenAI: subtract once per token seen in the output
    frequency_penalty: float = 0.0          # OpenAI: subtract per occurrence in the output
    seed: int | None = None                 # same seed + prompt => same tokens, whatever the batch
    stop: tuple[str, ...] = ()              # stop strings (matched across token boundaries)
    stop_token_ids: tuple[int, ...] = ()    # extra ids that end generation
    ignore_eos: bool = False                # keep going past the model's EOS token
    min_tokens: int = 0                     # EOS/stop ids are not honoured before this many tokens
    logprobs: int | None = None             # None: no logprobs; N: sampled token's + top-N
    include_stop_str_in_output: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); a dict is accepted
    allowed_token_ids: tuple[int, ...] = ()  # only these may be sampled; () = any token
    structured: Structured | None = None     # the output must match it (orca_jax/structured.py)

    def __post_init__(self):
        self._constraints()
        # Accept lists from JSON/gRPC callers; store tuples so the params stay hashable.
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        _check("stop", isinstance(stop, (list, tuple)), "must be a string or a list of strings", stop)
        _check("stop_token_ids", isinstance(self.stop_token_ids, (list, tuple)),
               "must be a list of integers", self.stop_token_ids)
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        # Types first, so that every range check below compares numbers, and every number
        # that passes fits the int32/float32 device arrays the step builds from it.
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if not (v is None and name in ("seed", "logprobs")):
                _check(name, is_int(v), "must be an integer", v)
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            _check(name, _is_real(v) and math.isfinite(v) and abs(v) <= FLOAT32_MAX,
                   "must be a finite number (within float32's range)", v)
        for name in ("ignore_eos", "include_stop_str_in_output"):
            _check(name, isinstance(getattr(self, name), bool), "must be a boolean", getattr(self, name))
        _check("stop", all(isinstance(s, str) for s in self.stop), "must be a string or a list of strings",
               self.stop)
        _check("stop_token_ids", all(is_int(t) for t in self.stop_token_ids), "must be a list of integers",
               self.stop_token_ids)
        ids = self.stop_token_ids
        checks = [
            ("max_tokens", 1 <= self.max_tokens <= INT32_MAX, f"must be in [1, {INT32_MAX}]"),
            ("temperature", self.temperature >= 0.0, "must be >= 0"),
            ("top_k", 0 <= self.top_k <= INT32_MAX, f"must be in [0, {INT32_MAX}] (0 disables it)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be > 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
            ("seed", self.seed is None or 0 <= self.seed < SEED_LIMIT, "must be in [0, 2**63)"),
            ("stop", len(self.stop) <= MAX_STOP_STRINGS, f"takes at most {MAX_STOP_STRINGS} strings"),
            ("stop", all(self.stop), "must be non-empty strings"),
            ("stop", all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
             f"strings must be at most {MAX_STOP_STRING_CHARS} characters"),
            ("stop", all(valid_unicode(s) for s in self.stop), "must be valid Unicode (no lone surrogates)"),
            ("stop_token_ids", len(ids) <= MAX_STOP_TOKEN_IDS, f"takes at most {MAX_STOP_TOKEN_IDS} ids"),
            ("stop_token_ids", all(0 <= t <= INT32_MAX for t in ids),
             f"must be integers in [0, {INT32_MAX}]"),
        ]
        for name, ok, why in checks:
            _check(name, ok, why, getattr(self, name))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        if 0.0 < self.temperature < GREEDY_BELOW:  # 1/temperature would overflow the logits
            object.__setattr__(self, "temperature", 0.0)

    def _constraints(self) -> None:
        """logit_bias as sorted (id, bias) pairs (from OpenAI's {"id": bias} map too), biases
        clamped to [-100, 100]; allowed_token_ids as a tuple."""
        bias = self.logit_bias
        if isinstance(bias, dict):
            try:
                bias = [(int(k), v) for k, v in bias.items()]
            except (TypeError, ValueError):
                raise ValueError("logit_bias keys must be token ids (integers as strings), got "
                                 f"{list(bias)[:5]!r}") from None
        _check("logit_bias", isinstance(bias, (list, tuple)) and all(
            isinstance(e, (list, tuple)) and len(e) == 2 and is_int(e[0]) and _is_real(e[1])
            and math.isfinite(e[1]) for e in bias), "must map token ids to finite numbers", bias)
        _check("logit_bias", len(bias) <= MAX_LOGIT_BIAS, f"takes at most {MAX_LOGIT_BIAS} tokens", len(bias))
        _check("logit_bias", all(0 <= t <= INT32_MAX for t, _ in bias), "token ids must be >= 0", bias)
        clamp = lambda v: min(max(float(v), -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT)
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), clamp(v)) for t, v in bias)))
        ids = self.allowed_token_ids
        _check("allowed_token_ids", isinstance(ids, (list, tuple)) and all(is_int(t) and 0 <= t <= INT32_MAX
               for t in ids), "must be a list of token ids", ids)
        object.__setattr__(self, "allowed_token_ids", tuple(int(t) for t in ids))
        _check("structured", self.structured is None or isinstance(self.structured, Structured),
               "must be a Structured constraint", self.structured)

    @property
    def constrained(self) -> bool:
        """Some tokens are masked or biased for this request (the sampler's constrained program)."""
        return bool(self.logit_bias or self.allowed_token_ids or self.structured)

    @functools.cached_property
    def stop_automaton(self) -> StopAutomaton | None:
        """The stop strings' matcher, built on first use (servers: in a worker thread) and
        kept with the params, shared by requests with the same stop list."""
        return stop_automaton(self.stop) if self.stop else None


_INT_FIELDS = ("max_tokens", "top_k", "min_tokens", "logprobs", "seed")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")


def _check(name: str, ok: bool, why: str, value) -> None:
    """The one error of SamplingParams: a ValueError that starts with the field's name."""
    if not ok:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise ValueError(f"{name} {why}, got {shown}")


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop token id or a stop string
    LENGTH = "length"    # max_tokens reached (or the slot's max length)
    ABORT = "abort"      # cancelled by the client or the server
    ERROR = "error"      # the engine failed this request


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False, slots=True)  # identity: two requests are never "equal"
class Request:
    """One request's host-side state. Positions [0, num_scheduled) are in its KV pages
    (`pages`: its block table; kv_pages.py)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int                                  # params.seed, or one drawn at submission
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    prompt: str | None = None
    status: Status = Status.WAITING
    slot: int | None = None                     # its row of the device's per-sequence state
    pages: list[int] = dataclasses.field(default_factory=list)  # KV pages, in position order
    page_hashes: list[bytes] = dataclasses.field(default_factory=list)  # prefix-cache keys of its full pages
    num_registered: int = 0                     # of its pages, how many are offered to the prefix cache
    num_scheduled: int = 0                      # tokens whose KV has been scheduled into its pages
    num_cached_tokens: int = 0                  # prompt tokens found in the prefix cache (last admission)
    num_preemptions: int = 0
    swapped: object = None                      # its KV in host memory while preempted (the
                                                # runner's handle; kv_pages.py SwapSpace)
    num_swapped_pages: int = 0                  # pages it holds in the host tier
    in_flight: int = 0                         # scheduled iterations whose results are not back
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or string that ended it (not EOS)
    matcher: object = None                # its grammar's state (structured.Matcher), if it has one
    error: str | None = None
    first_scheduled_time: float | None = None  # monotonic; first admitted to the batch (kept
                                               # across preemptions: queue time ends here once)
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_len: int = dataclasses.field(init=False)  # read per row per iteration: a field

    prefill_len: int = dataclasses.field(init=False)  # tokens to prefill: the prompt, or after a
                                                    # preemption prompt + outputs (recomputed)

    def __post_init__(self):
        self.prompt_len = self.prefill_len = len(self.prompt_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output."""
        p = self.prompt_len
        if stop <= p:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:p] + self.output_ids[max(start - p, 0):stop - p]

    @property
    def max_total_len(self) -> int:
        """Prompt + max new tokens: what Orca's admission control reserves."""
        return self.prompt_len + self.params.max_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_scheduled < self.prefill_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclasses.dataclass(slots=True)  # not frozen: built per request per iteration, cheaply
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(slots=True)  # not frozen: built per request per iteration, cheaply
class RequestOutput:
    """A result (or, while streaming, a delta): what the APIs hand back to users."""

    request_id: str
    token_ids: Sequence[int]              # Engine.step / AsyncEngine: the new tokens (a delta);
                                          # LLM.generate: all of the request's tokens
    text: str                             # likewise
    finished: bool
    finish_reason: FinishReason | None
    usage: Usage
    logprobs: Sequence[dict] | None = None  # per token: {"token_id", "logprob", "top": {id: lp}}
    error: str | None = None
    metrics: dict | None = None           # arrival/first-scheduled/first-token/finish times (s, monotonic)
    stop_reason: int | str | None = None  # final output: the stop token id or string that ended it
