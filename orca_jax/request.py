"""Requests as the host sees them: sampling parameters, per-request state, outputs.

Plain Python, no JAX: the scheduler and servers use these without touching a device.
"""
from __future__ import annotations

import dataclasses
import enum
import time
from typing import Sequence

MAX_LOGPROBS = 20  # top-N alternatives a request may ask for (OpenAI caps legacy completions at 5)


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

    def __post_init__(self):
        # Accept lists from JSON/gRPC callers; store tuples so the params stay hashable.
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0.0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be > 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in [0, 2**63)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", len(self.stop_token_ids) <= 15, "takes at most 15 ids"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop token id or a stop string
    LENGTH = "length"    # max_tokens reached (or the slot's max length)
    ABORT = "abort"      # cancelled by the client or the server
    ERROR = "error"      # the engine failed this request


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)  # identity: two requests are never "equal"
class Request:
    """One request's host-side state. Positions [0, num_computed) are in its KV slot."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int                                  # params.seed, or one drawn at submission
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    prompt: str | None = None
    status: Status = Status.WAITING
    slot: int | None = None
    num_computed: int = 0                      # tokens whose KV has been scheduled into the slot
    in_flight: int = 0                         # scheduled iterations whose results are not back
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def max_total_len(self) -> int:
        """Prompt + max new tokens: what Orca's admission control reserves."""
        return self.prompt_len + self.params.max_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True)
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
    metrics: dict | None = None           # arrival/first-token/finish times (seconds, monotonic)
