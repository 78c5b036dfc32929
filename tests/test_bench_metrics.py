"""Benchmark metrics on hand-made timelines: every expected number is worked out by hand."""
import math

import numpy as np
import pytest

from orca_jax.bench import report
from orca_jax.bench.metrics import (RequestRecord, max_throughput_under_slo, meets_slos, parse_slos,
                                    request_flops, stats_ms, summarize, summarize_aggregate,
                                    throughput_ratio)


def timeline():
    """Three requests (times in s):
    A arrives 0.0, tokens at 1.0, 1.5, and two at 2.5 -> TTFT 1.0, E2E 2.5, ITL 0.5 1.0, TPOT 1.5/3
    B arrives 1.0, one token at 2.0                  -> TTFT 1.0, E2E 1.0, no ITL, no TPOT
    C arrives 2.0, tokens at 2.5, 3.0, 3.5, 4.0      -> TTFT 0.5, E2E 2.0, ITL 0.5 x3, TPOT 0.5
    """
    a = RequestRecord(0.0, 10, [(1.0, 1), (1.5, 1), (2.5, 2)])
    b = RequestRecord(1.0, 20, [(2.0, 1)])
    c = RequestRecord(2.0, 30, [(2.5, 1), (3.0, 1), (3.5, 1), (4.0, 1)])
    return a, b, c


def test_per_request_definitions():
    a, b, c = timeline()
    assert (a.output_len, a.ttft, a.latency, a.itl, a.tpot) == (4, 1.0, 2.5, [0.5, 1.0], 0.5)
    assert a.normalized_latency == 0.625
    assert (b.output_len, b.ttft, b.latency, b.itl, b.tpot, b.normalized_latency) == (1, 1.0, 1.0, [], None, 1.0)
    assert (c.ttft, c.latency, c.itl, c.tpot, c.normalized_latency) == (0.5, 2.0, [0.5, 0.5, 0.5], 0.5, 0.5)


def test_summarize_exact_numbers():
    m = summarize(timeline())
    # The run spans the first arrival (0.0) to the last token (4.0).
    assert m["duration_s"] == 4.0
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 0, 60, 9)
    assert m["request_throughput"] == 0.75
    assert m["output_throughput"] == 2.25
    assert m["total_token_throughput"] == 17.25
    # E2E 2500, 1000, 2000 ms: sorted 1000 2000 2500; p90 at rank 1.8 -> 2000 + 0.8 * 500.
    e = m["e2el_ms"]
    assert (e["median"], e["p50"], e["p90"], e["p99"]) == (2000.0, 2000.0, 2400.0, 2490.0)
    assert e["mean"] == pytest.approx(5500 / 3)
    # ITL pooled over requests: 500 1000 500 500 500 ms -> mean 600, std 200, p90 rank 3.6 -> 800.
    i = m["itl_ms"]
    assert (i["mean"], i["median"], i["std"], i["p90"], i["p99"]) == (600.0, 500.0, 200.0, 800.0, 980.0)
    # TPOT skips the 1-token request: 500, 500.
    assert m["tpot_ms"] == {"mean": 500.0, "median": 500.0, "std": 0.0, "p50": 500.0, "p90": 500.0, "p99": 500.0}
    t = m["ttft_ms"]
    assert (t["median"], t["p90"]) == (1000.0, 1000.0)
    assert t["mean"] == pytest.approx(2500 / 3)
    # Normalized latency 625, 1000, 500 ms/token.
    assert m["normalized_latency_ms"]["median"] == 625.0
    assert m["normalized_latency_ms"]["mean"] == pytest.approx(2125 / 3)
    assert m["goodput"] is None


def test_stats_match_numpy_percentile():
    x = [0.003, 0.001, 0.010, 0.002, 0.007]
    s = stats_ms(x, percentiles=(25, 75))
    assert s["p25"] == pytest.approx(np.percentile(np.array(x) * 1000, 25))
    assert s["p75"] == pytest.approx(np.percentile(np.array(x) * 1000, 75))
    assert stats_ms([]) is None


@pytest.mark.parametrize("slos, good", [
    ({"ttft": 900}, 1),                    # only C (500 ms) meets it
    ({"tpot": 500, "e2el": 2000}, 2),      # A's E2E is 2500; B's TPOT counts as 0 (vLLM)
    ({"norm": 600}, 1),                    # 625, 1000, 500 ms/token
    ({"ttft": 1000, "e2el": 2500}, 3),     # bounds are inclusive
])
def test_goodput(slos, good):
    m = summarize(timeline(), slos)
    assert m["goodput"] == {"slos_ms": slos, "good_requests": good, "request_goodput": good / 4.0}


def test_unfinished_requests_count_as_failed():
    a, b, c = timeline()
    m = summarize([a, RequestRecord(0.5, 7), c])
    assert (m["completed"], m["failed"], m["total_input_tokens"]) == (2, 1, 40)
    with pytest.raises(ValueError, match="no request completed"):
        summarize([RequestRecord(0.0, 3)])


def test_parse_slos():
    assert parse_slos(["ttft:500", "tpot:12.5", "norm:80"]) == {"ttft": 500.0, "tpot": 12.5, "norm": 80.0}
    for bad in ("ttft", "speed:3", "ttft:x", "e2el:0"):
        with pytest.raises(ValueError):
            parse_slos([bad])
    a, _, _ = timeline()
    assert meets_slos(a, {}) is True


def test_aggregate_only():
    m = summarize_aggregate(8.0, 4, 400, 200)
    assert (m["request_throughput"], m["output_throughput"], m["total_token_throughput"]) == (0.5, 25.0, 75.0)
    assert m["ttft_ms"] is None and m["normalized_latency_ms"] is None


def test_request_flops_by_hand():
    from orca_jax.models import PRESETS
    from orca_jax.models.gpt2 import GPTConfig
    # L=1, D=2, F=8, V=10; prompt 3, output 2 -> 4 tokens fed.
    # weights 2*(4*4 + 2*2*8)*4 = 384; head 2*10*2*2 = 80; attention 4*1*2*(1+2+3+4) = 80.
    tiny = GPTConfig(vocab_size=10, n_positions=8, n_embd=2, n_layer=1, n_head=1, n_inner=8)
    assert request_flops(tiny, 3, 2) == 544.0
    # GPT-2 small, one decode token at context 1: ~2 x 85M weights + 2 x 38.6M LM head.
    f = request_flops(PRESETS["gpt2-small"], 1, 1)
    assert f == 2 * 12 * (4 * 768**2 + 2 * 768 * 3072) + 2 * 50257 * 768 + 4 * 12 * 768
    # Llama-3-8B: grouped-query K and V (8 of 32 heads) and a gated MLP; 7.5B params in layers.
    c = PRESETS["llama-3-8b"]
    assert c.layer_matmul_params == 4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 14336
    assert abs(c.num_params() - 8.03e9) < 0.01e9


def test_max_throughput_under_slo():
    pts = [(1.0, 10.0), (2.0, 20.0), (3.0, 60.0)]
    # Crosses 40 between (2, 20) and (3, 60): 2 + (40 - 20) / (60 - 20) * 1 = 2.5.
    assert max_throughput_under_slo(pts, 40.0) == {"throughput": 2.5, "latency": 40.0, "how": "interpolated",
                                                   "lower_bound": False}
    assert max_throughput_under_slo(pts, 20.0) == {"throughput": 2.0, "latency": 20.0, "how": "measured",
                                                   "lower_bound": False}
    assert max_throughput_under_slo(pts, 100.0) == {"throughput": 3.0, "latency": 60.0, "how": "measured",
                                                    "lower_bound": True}
    assert max_throughput_under_slo(pts, 5.0) is None
    # Overloaded: throughput falls past the knee; the best measured point wins.
    pts = [(1.0, 10.0), (3.0, 20.0), (2.5, 50.0)]
    assert max_throughput_under_slo(pts, 30.0)["throughput"] == 3.0


def test_throughput_ratio_notes():
    a = {"throughput": 3.0, "lower_bound": False}
    b = {"throughput": 1.5, "lower_bound": False}
    assert throughput_ratio(a, b)["ratio"] == 2.0
    assert "lower bound" in throughput_ratio({**a, "lower_bound": True}, b)["note"]
    assert "upper bound" in throughput_ratio(a, {**b, "lower_bound": True})["note"]
    assert throughput_ratio(a, None)["ratio"] is None
    assert throughput_ratio(None, b)["ratio"] is None


def _run(system, rate, tput, norm_ms):
    lat = {"mean": norm_ms, "median": norm_ms, "std": 0.0, "p50": norm_ms, "p90": norm_ms, "p99": norm_ms}
    m = {**summarize_aggregate(10.0, 10, 100, 100), "request_throughput": tput,
         "normalized_latency_ms": lat, "ttft_ms": lat, "e2el_ms": lat}
    return {"system": system, "label": system, "rate": rate, "metrics": m, "info": {},
            "model_flops": 0.0, "achieved_gflops": 0.0, "mfu": 0.0}


def test_sweep_summary_and_plot(tmp_path):
    runs = [_run("orca", 1, 1.0, 10.0), _run("orca", 4, 4.0, 20.0), _run("orca", 8, 6.0, 80.0),
            _run("static", 1, 1.0, 12.0), _run("static", 4, 2.0, 100.0), _run("static", 8, 2.0, 300.0)]
    s = report.sweep_summary(runs, None)
    # auto SLO: 3 x orca's 10 ms/token at its lowest rate.
    assert s["slo_normalized_latency_ms"] == 30.0
    # orca crosses 30 between (4, 20) and (6, 80): 4 + 10/60 * 2; static between (1, 12) and (2, 100).
    assert s["max_throughput_under_slo"]["orca"]["throughput"] == pytest.approx(4 + 2 / 6)
    assert s["max_throughput_under_slo"]["static"]["throughput"] == pytest.approx(1 + 18 / 88)
    assert s["ratios"]["orca_vs_static"]["ratio"] == pytest.approx((4 + 2 / 6) / (1 + 18 / 88))
    assert report.sweep_summary(runs, 15.0)["max_throughput_under_slo"]["static"]["throughput"] == pytest.approx(1 + 3 / 88)
    labels = {"orca": "orca", "static": "static"}
    assert "**" in report.sweep_text(s, labels)
    assert report.sweep_table(runs).count("\n") == len(runs) + 1
    pytest.importorskip("matplotlib")
    report.plot_sweep(s, labels, "t", tmp_path / "s.png")
    report.plot_offline(runs[:2], "t", tmp_path / "o.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "o.png").stat().st_size > 0


def test_json_has_no_infinities(tmp_path):
    report.write_json({"x": math.inf, "y": [math.nan, 1.0]}, tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text().replace(" ", "").replace("\n", "") == '{"x":null,"y":[null,1.0]}'
