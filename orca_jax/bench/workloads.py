"""Benchmark workloads as seeded, replayable traces (host side: no JAX, no torch).

A `Trace` is a list of requests, each with an arrival time (seconds from the start of the
run), its prompt token ids and how many tokens it must generate (greedy, EOS ignored, so
every system produces exactly that many). Traces are saved as JSON next to the results, so a
later run (another machine, another commit) can replay the very same requests.

    offline        N requests at t=0; fixed or uniform lengths. Fixed-length prompts are drawn
                   with random.Random(seed), one randrange(vocab) per token (the draws of the
                   reference script vLLM was first measured with); bench/vllm_offline.py hands
                   vLLM the trace's very requests.
    orca           the synthetic trace of the Orca paper (OSDI'22, Sec. 6.2): Poisson arrivals,
                   prompt length uniform in [32, 512], output length uniform in [1, 128].
    sharegpt-like  Poisson arrivals, log-normal (heavy-tailed) prompt and output lengths: real
                   chat traffic has a long right tail. Not fitted to ShareGPT; the medians and
                   sigma are flags.
    shared-prefix  Poisson arrivals of one system prompt followed by a short question each
                   (uniform lengths): the workload prefix caching is for.

Online traces are generated at rate 1 req/s from unit-mean exponential gaps; `at_rate(r)`
divides every arrival time by r. So the points of a rate sweep are the same requests in the
same order, only closer together: comparable across rates and systems.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Sequence

import numpy as np

TRACE_FORMAT = "orca-jax-trace/1"
KINDS = ("offline", "orca", "sharegpt-like", "shared-prefix")


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival_s: float          # seconds after the start of the run
    prompt_ids: tuple[int, ...]
    output_len: int           # tokens to generate (EOS ignored)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclasses.dataclass(frozen=True)
class Trace:
    kind: str                            # one of KINDS
    seed: int
    vocab_size: int
    rate: float | None                   # requests/s of the Poisson arrivals; None: all at t=0
    params: dict                         # the generator's arguments, for the record
    requests: tuple[TraceRequest, ...]

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def max_total_len(self) -> int:
        """Longest prompt + output: the KV slot length every system needs."""
        return max(r.prompt_len + r.output_len for r in self.requests)

    @property
    def max_prompt_len(self) -> int:
        return max(r.prompt_len for r in self.requests)

    def at_rate(self, rate: float) -> "Trace":
        """The same requests with arrivals rescaled to `rate` requests/s."""
        if self.rate is None:
            raise ValueError("an offline trace has no arrival rate to rescale")
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        k = self.rate / rate
        reqs = tuple(dataclasses.replace(r, arrival_s=r.arrival_s * k) for r in self.requests)
        return dataclasses.replace(self, rate=rate, requests=reqs)

    def summary(self) -> dict:
        p = [r.prompt_len for r in self.requests]
        o = [r.output_len for r in self.requests]
        stats = lambda x: {"min": min(x), "mean": float(np.mean(x)), "median": float(np.median(x)),
                           "max": max(x), "total": int(sum(x))}
        return {"kind": self.kind, "requests": len(self), "seed": self.seed, "rate": self.rate,
                "vocab_size": self.vocab_size, "params": self.params,
                "prompt_len": stats(p), "output_len": stats(o)}

    # -- JSON -----------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"format": TRACE_FORMAT, "kind": self.kind, "seed": self.seed,
                "vocab_size": self.vocab_size, "rate": self.rate, "params": self.params,
                "requests": [{"arrival_s": r.arrival_s, "output_len": r.output_len,
                              "prompt_ids": list(r.prompt_ids)} for r in self.requests]}

    @staticmethod
    def from_json(d: dict) -> "Trace":
        if d.get("format") != TRACE_FORMAT:
            raise ValueError(f"not an orca-jax trace (format {d.get('format')!r}, expected {TRACE_FORMAT!r})")
        reqs = tuple(TraceRequest(float(r["arrival_s"]), tuple(int(t) for t in r["prompt_ids"]),
                                  int(r["output_len"])) for r in d["requests"])
        return Trace(d["kind"], int(d["seed"]), int(d["vocab_size"]),
                     None if d["rate"] is None else float(d["rate"]), dict(d["params"]), reqs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @staticmethod
    def load(path: str | Path) -> "Trace":
        return Trace.from_json(json.loads(Path(path).read_text()))


def parse_range(spec: str | int) -> tuple[int, int]:
    """'128' -> (128, 128) (fixed); '32:512' -> (32, 512) (inclusive bounds)."""
    s = str(spec)
    lo, _, hi = s.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"length {spec!r} is not N or LO:HI") from None
    if not 1 <= a <= b:
        raise ValueError(f"length range {spec!r} needs 1 <= LO <= HI")
    return a, b


def _prompts(lengths: Sequence[int], vocab: int, seed: int) -> list[tuple[int, ...]]:
    """The peers' draws: one random.Random(seed), randrange(vocab) per token, prompt by prompt."""
    rng = random.Random(seed)
    return [tuple(rng.randrange(vocab) for _ in range(n)) for n in lengths]


def _uniform(rng: np.random.Generator, rng_lo_hi: tuple[int, int], n: int) -> list[int]:
    lo, hi = rng_lo_hi
    if lo == hi:  # fixed: draw nothing, so the stream stays the peers' for fixed lengths
        return [lo] * n
    return [int(x) for x in rng.integers(lo, hi + 1, n)]


def _unit_poisson_arrivals(rng: np.random.Generator, n: int) -> list[float]:
    """Arrival times of a rate-1 Poisson process, the first request at t=0."""
    gaps = rng.exponential(1.0, n)
    return [0.0] + [float(t) for t in np.cumsum(gaps[:-1])]


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"a trace needs at least one request, got {n}")


def offline(n: int, prompt_len: str | int, output_len: str | int, vocab_size: int,
            seed: int = 0) -> Trace:
    """N requests at t=0 with fixed ('128') or uniform ('64:128') lengths."""
    _check_n(n)
    pr, orr = parse_range(prompt_len), parse_range(output_len)
    rng = np.random.default_rng(seed)
    plens, olens = _uniform(rng, pr, n), _uniform(rng, orr, n)
    reqs = tuple(TraceRequest(0.0, p, o) for p, o in zip(_prompts(plens, vocab_size, seed), olens))
    return Trace("offline", seed, vocab_size, None,
                 {"prompt_len": list(pr), "output_len": list(orr)}, reqs)


def orca(n: int, vocab_size: int, seed: int = 0, prompt_len: str = "32:512",
         output_len: str = "1:128") -> Trace:
    """The Orca paper's synthetic trace (at rate 1 req/s; see Trace.at_rate)."""
    _check_n(n)
    pr, orr = parse_range(prompt_len), parse_range(output_len)
    rng = np.random.default_rng(seed)
    arrivals = _unit_poisson_arrivals(rng, n)
    plens, olens = _uniform(rng, pr, n), _uniform(rng, orr, n)
    reqs = tuple(TraceRequest(a, p, o) for a, p, o in
                 zip(arrivals, _prompts(plens, vocab_size, seed), olens))
    return Trace("orca", seed, vocab_size, 1.0, {"prompt_len": list(pr), "output_len": list(orr)}, reqs)


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float,
                      lo_hi: tuple[int, int]) -> list[int]:
    """Heavy-tailed lengths: exp(N(ln median, sigma^2)), rounded, clipped to [lo, hi]."""
    if not median > 0 or not sigma >= 0:
        raise ValueError(f"log-normal lengths need median > 0 and sigma >= 0, got {median}, {sigma}")
    x = rng.lognormal(math.log(median), sigma, n)
    lo, hi = lo_hi
    return [int(v) for v in np.clip(np.rint(x), lo, hi)]


def sharegpt_like(n: int, vocab_size: int, seed: int = 0, prompt_median: float = 96,
                  output_median: float = 48, sigma: float = 1.0, prompt_len: str = "4:512",
                  output_len: str = "1:256") -> Trace:
    """Poisson arrivals (rate 1 req/s), log-normal prompt and output lengths."""
    _check_n(n)
    pr, orr = parse_range(prompt_len), parse_range(output_len)
    rng = np.random.default_rng(seed)
    arrivals = _unit_poisson_arrivals(rng, n)
    plens = lognormal_lengths(rng, n, prompt_median, sigma, pr)
    olens = lognormal_lengths(rng, n, output_median, sigma, orr)
    reqs = tuple(TraceRequest(a, p, o) for a, p, o in
                 zip(arrivals, _prompts(plens, vocab_size, seed), olens))
    return Trace("sharegpt-like", seed, vocab_size, 1.0,
                 {"prompt_median": prompt_median, "output_median": output_median, "sigma": sigma,
                  "prompt_len": list(pr), "output_len": list(orr)}, reqs)


def shared_prefix(n: int, vocab_size: int, seed: int = 0, prefix_len: int = 256,
                  question_len: str = "16:48", output_len: str = "16:64") -> Trace:
    """Poisson arrivals (rate 1 req/s) of one `prefix_len`-token system prompt + a question
    of uniform length each; uniform output lengths."""
    _check_n(n)
    if prefix_len < 1:
        raise ValueError(f"prefix_len must be >= 1, got {prefix_len}")
    qr, orr = parse_range(question_len), parse_range(output_len)
    rng = np.random.default_rng(seed)
    arrivals = _unit_poisson_arrivals(rng, n)
    qlens, olens = _uniform(rng, qr, n), _uniform(rng, orr, n)
    prefix = _prompts([prefix_len], vocab_size, seed + 1)[0]
    reqs = tuple(TraceRequest(a, prefix + q, o) for a, q, o in
                 zip(arrivals, _prompts(qlens, vocab_size, seed), olens))
    return Trace("shared-prefix", seed, vocab_size, 1.0,
                 {"prefix_len": prefix_len, "question_len": list(qr), "output_len": list(orr)}, reqs)
