"""Serving metrics from per-request timelines, with vLLM's definitions (host side, no JAX).

Every system in a benchmark is reduced to the same record per request: when the client sent
it, and when each piece of its output reached the client ((time, tokens) "chunks"). From
those, exactly as vLLM's `benchmarks/serve.py` (`calculate_metrics`) computes them:

    TTFT          first chunk - arrival
    E2E latency   last chunk - arrival
    ITL           gaps between consecutive chunks, pooled over all requests
    TPOT          (E2E - TTFT) / (output tokens - 1), for requests with > 1 output token
    throughput    completed requests, output tokens, prompt + output tokens per second of
                  the run (first arrival to last completion)
    goodput       requests/s that met every given SLO (TPOT of a 1-token request counts as 0)

plus Orca's normalized latency (OSDI'22, Sec. 6.2): E2E latency / output tokens, per request.
Statistics: mean, median, population std and percentiles with numpy's linear interpolation
(np.percentile), times in milliseconds.

The sweep helpers find the largest throughput a system sustains under a latency SLO, the
number behind the paper's "36.9x at the same latency".
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)
SLO_KEYS = {"ttft": "TTFT", "tpot": "TPOT", "e2el": "E2E latency", "norm": "normalized latency"}


@dataclasses.dataclass
class RequestRecord:
    """What a client saw of one request. Times in seconds from the start of the run."""

    arrival: float
    prompt_len: int
    chunks: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (time, new tokens)

    def add(self, t: float, n_tokens: int) -> None:
        if n_tokens > 0:
            self.chunks.append((t, n_tokens))

    @property
    def output_len(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def completed(self) -> bool:
        return bool(self.chunks)

    @property
    def ttft(self) -> float:
        return self.chunks[0][0] - self.arrival

    @property
    def latency(self) -> float:
        return self.chunks[-1][0] - self.arrival

    @property
    def itl(self) -> list[float]:
        return [b[0] - a[0] for a, b in zip(self.chunks, self.chunks[1:])]

    @property
    def tpot(self) -> float | None:
        n = self.output_len
        return (self.latency - self.ttft) / (n - 1) if n > 1 else None

    @property
    def normalized_latency(self) -> float:
        return self.latency / self.output_len


def stats_ms(values_s: Sequence[float], percentiles: Sequence[int] = PERCENTILES) -> dict | None:
    """mean/median/std/pNN of values in seconds, reported in milliseconds; None if empty."""
    if not values_s:
        return None
    x = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {"mean": float(np.mean(x)), "median": float(np.median(x)), "std": float(np.std(x))}
    out.update({f"p{p}": float(np.percentile(x, p)) for p in percentiles})
    return out


def parse_slos(specs: Sequence[str]) -> dict[str, float]:
    """['ttft:500', 'tpot:100'] -> {'ttft': 500.0, 'tpot': 100.0} (milliseconds), as vLLM's --goodput."""
    out = {}
    for s in specs:
        k, sep, v = s.partition(":")
        if not sep or k not in SLO_KEYS:
            raise ValueError(f"SLO {s!r} is not KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            ms = float(v)
        except ValueError:
            raise ValueError(f"SLO {s!r}: {v!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"SLO {s!r} must be > 0 ms")
        out[k] = ms
    return out


def meets_slos(r: RequestRecord, slos_ms: dict[str, float]) -> bool:
    got = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency, "norm": r.normalized_latency}
    return all(got[k] * 1000.0 <= v for k, v in slos_ms.items())


def summarize(records: Sequence[RequestRecord], slos_ms: dict[str, float] | None = None,
              percentiles: Sequence[int] = PERCENTILES) -> dict:
    """The metrics of one run (one system on one trace)."""
    done = [r for r in records if r.completed]
    if not done:
        raise ValueError("no request completed: nothing to measure")
    start = min(r.arrival for r in records)
    duration = max(r.chunks[-1][0] for r in done) - start
    n_in = sum(r.prompt_len for r in done)
    n_out = sum(r.output_len for r in done)
    out = {
        "completed": len(done), "failed": len(records) - len(done),
        "duration_s": duration, "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": len(done) / duration, "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        "ttft_ms": stats_ms([r.ttft for r in done], percentiles),
        "tpot_ms": stats_ms([r.tpot for r in done if r.tpot is not None], percentiles),
        "itl_ms": stats_ms([g for r in done for g in r.itl], percentiles),
        "e2el_ms": stats_ms([r.latency for r in done], percentiles),
        "normalized_latency_ms": stats_ms([r.normalized_latency for r in done], percentiles),
        "goodput": None,
    }
    if slos_ms:
        good = sum(meets_slos(r, slos_ms) for r in done)
        out["goodput"] = {"slos_ms": dict(slos_ms), "good_requests": good,
                          "request_goodput": good / duration}
    return out


def summarize_aggregate(duration: float, requests: int, input_tokens: int, output_tokens: int) -> dict:
    """Throughput only, for a system that reports no per-request times (vLLM's offline script)."""
    return {"completed": requests, "failed": 0, "duration_s": duration,
            "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
            "request_throughput": requests / duration, "output_throughput": output_tokens / duration,
            "total_token_throughput": (input_tokens + output_tokens) / duration,
            "ttft_ms": None, "tpot_ms": None, "itl_ms": None, "e2el_ms": None,
            "normalized_latency_ms": None, "goodput": None}


# -- model FLOPs ------------------------------------------------------------------------------

def request_flops(c, prompt_len: int, output_len: int) -> float:
    """Matmul FLOPs one request needs on model config `c`, counting useful work only (no
    padding): prompt + output - 1 tokens go through the layers (the last sampled token is
    never fed back), 2 FLOPs per layer matmul weight; the LM head runs once per output token;
    attention scores and values cost 4 * H * K FLOPs per layer per (token, context position) pair."""
    L, D, V, HK = c.num_layers, c.hidden_size, c.vocab_size, c.num_heads * c.head_dim
    fed = prompt_len + output_len - 1
    weights = 2 * L * c.layer_matmul_params * fed
    head = 2 * V * D * output_len
    attention = 4 * L * HK * fed * (fed + 1) // 2  # token j attends to j + 1 positions
    return float(weights + head + attention)


# -- rate sweeps -------------------------------------------------------------------------------

def max_throughput_under_slo(points: Sequence[tuple[float, float]], slo: float) -> dict | None:
    """Largest throughput at which a system's latency stays within `slo`.

    points: (throughput, latency) of one system, in order of increasing offered rate.
    Candidates are the measured points within the SLO and, where the curve crosses the SLO
    between two consecutive points, the throughput linearly interpolated at latency == slo.
    Returns {"throughput", "latency", "how": "measured"|"interpolated", "lower_bound"} or None
    when no point meets the SLO. lower_bound is True when the highest-rate point still meets it: the
    sweep did not reach the system's limit, so the true maximum is at least this.
    """
    best = None
    for i, (tput, lat) in enumerate(points):
        if lat <= slo and (best is None or tput > best[0]):
            best = (tput, lat, "measured")
        if i + 1 < len(points):
            t2, l2 = points[i + 1]
            if lat <= slo < l2:
                x = tput + (slo - lat) / (l2 - lat) * (t2 - tput)
                if best is None or x > best[0]:
                    best = (x, slo, "interpolated")
    if best is None:
        return None
    return {"throughput": best[0], "latency": best[1], "how": best[2],
            "lower_bound": points[-1][1] <= slo}


def throughput_ratio(num: dict | None, den: dict | None) -> dict:
    """num / den of two max_throughput_under_slo results, with what the number can claim."""
    if num is None:
        return {"ratio": None, "note": "the first system never met the SLO in this sweep"}
    if den is None:
        return {"ratio": None, "note": "the second system never met the SLO in this sweep, so the "
                                       "ratio is unbounded here: lower the rates or raise the SLO"}
    ratio = num["throughput"] / den["throughput"]
    if num["lower_bound"] and den["lower_bound"]:
        note = "neither system reached its limit in this sweep: raise the rates"
    elif num["lower_bound"]:
        note = "a lower bound: the first system had not reached its limit"
    elif den["lower_bound"]:
        note = "an upper bound: the second system had not reached its limit"
    else:
        note = "both systems reached the SLO within the sweep"
    return {"ratio": ratio, "note": note}
