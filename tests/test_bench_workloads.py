"""Benchmark workloads: seeded, the right shapes, the peers' draws, JSON round trip."""
import json
import random

import numpy as np
import pytest

from orca_jax.bench import workloads
from orca_jax.bench.workloads import Trace, parse_range


def peers_prompts(n, prompt_len, vocab, seed):
    """The reference vLLM script's draws (random.Random(seed), one randrange per token), copied."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(n)]


def test_offline_fixed_is_the_peers_workload():
    t = workloads.offline(5, 12, 7, vocab_size=1000, seed=3)
    assert [list(r.prompt_ids) for r in t.requests] == peers_prompts(5, 12, 1000, 3)
    assert all(r.arrival_s == 0.0 and r.output_len == 7 for r in t.requests)
    assert t.rate is None and t.kind == "offline" and len(t) == 5
    assert (t.max_prompt_len, t.max_total_len) == (12, 19)


def test_offline_uniform_lengths():
    t = workloads.offline(200, "4:9", "1:3", vocab_size=50, seed=0)
    plens = {r.prompt_len for r in t.requests}
    assert plens == set(range(4, 10))  # 200 draws cover all 6 values
    assert {r.output_len for r in t.requests} == {1, 2, 3}
    assert all(0 <= tok < 50 for r in t.requests for tok in r.prompt_ids)


@pytest.mark.parametrize("make", [
    lambda s: workloads.offline(20, "4:64", "1:16", 100, s),
    lambda s: workloads.orca(20, 100, s),
    lambda s: workloads.sharegpt_like(20, 100, s),
])
def test_seeded(make):
    assert make(1) == make(1)
    assert make(1).requests != make(2).requests


def test_orca_trace_shape():
    t = workloads.orca(2000, vocab_size=100, seed=0)
    arr = np.array([r.arrival_s for r in t.requests])
    assert arr[0] == 0.0 and np.all(np.diff(arr) >= 0)
    assert t.rate == 1.0
    assert np.mean(np.diff(arr)) == pytest.approx(1.0, rel=0.1)  # Poisson at 1 req/s
    p = np.array([r.prompt_len for r in t.requests])
    o = np.array([r.output_len for r in t.requests])
    assert (p.min(), p.max(), o.min(), o.max()) == (32, 512, 1, 128)  # the paper's ranges, inclusive
    assert p.mean() == pytest.approx(272, rel=0.05) and o.mean() == pytest.approx(64.5, rel=0.05)
    small = workloads.orca(50, 100, 0, prompt_len="8:16", output_len="2:4")
    assert all(8 <= r.prompt_len <= 16 and 2 <= r.output_len <= 4 for r in small.requests)


def test_at_rate_rescales_arrivals_only():
    t = workloads.orca(30, vocab_size=100, seed=0)
    t4 = t.at_rate(4.0)
    assert t4.rate == 4.0
    for a, b in zip(t.requests, t4.requests):
        assert b.arrival_s == a.arrival_s / 4.0
        assert (a.prompt_ids, a.output_len) == (b.prompt_ids, b.output_len)
    assert t4.at_rate(1.0).requests == t.requests
    with pytest.raises(ValueError):
        workloads.offline(2, 4, 4, 100).at_rate(1.0)
    with pytest.raises(ValueError):
        t.at_rate(0.0)


def test_sharegpt_like_is_heavy_tailed():
    t = workloads.sharegpt_like(3000, vocab_size=100, seed=0, prompt_median=64, output_median=32,
                                sigma=1.0, prompt_len="4:1000", output_len="1:1000")
    p = np.array([r.prompt_len for r in t.requests])
    o = np.array([r.output_len for r in t.requests])
    assert np.median(p) == pytest.approx(64, rel=0.1) and np.median(o) == pytest.approx(32, rel=0.1)
    # Log-normal with sigma 1: mean = median * e^0.5 (~1.65x) and a long right tail.
    assert p.mean() / np.median(p) == pytest.approx(np.exp(0.5), rel=0.1)
    assert np.percentile(p, 99) > 8 * np.median(p)
    clipped = workloads.sharegpt_like(500, 100, 0, prompt_len="16:128", output_len="2:64")
    assert all(16 <= r.prompt_len <= 128 and 2 <= r.output_len <= 64 for r in clipped.requests)


def test_shared_prefix_is_one_system_prompt_and_short_questions():
    t = workloads.shared_prefix(20, 1000, seed=3, prefix_len=100, question_len="5:9", output_len="2:4")
    prefix = t.requests[0].prompt_ids[:100]
    assert all(r.prompt_ids[:100] == prefix and 105 <= r.prompt_len <= 109 for r in t.requests)
    assert len({r.prompt_ids[100:] for r in t.requests}) == 20          # the questions differ
    assert all(2 <= r.output_len <= 4 for r in t.requests) and t.requests[0].arrival_s == 0.0
    assert workloads.shared_prefix(20, 1000, seed=3, prefix_len=100, question_len="5:9",
                                   output_len="2:4") == t            # seeded


def test_save_load_round_trip(tmp_path):
    for t in (workloads.offline(3, 5, 2, 100, 0), workloads.orca(4, 100, 1).at_rate(2.5),
              workloads.sharegpt_like(4, 100, 2)):
        t.save(tmp_path / "t.json")
        back = Trace.load(tmp_path / "t.json")
        assert back == t
        assert back.summary() == t.summary()
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["format"] == workloads.TRACE_FORMAT and set(d["requests"][0]) == {"arrival_s", "output_len", "prompt_ids"}
    d["format"] = "something-else"
    with pytest.raises(ValueError, match="not an orca-jax trace"):
        Trace.from_json(d)


def test_parse_range():
    assert parse_range("128") == (128, 128)
    assert parse_range(7) == (7, 7)
    assert parse_range("32:512") == (32, 512)
    for bad in ("0", "9:3", "a:b", "1:2:3"):
        with pytest.raises(ValueError):
            parse_range(bad)
    with pytest.raises(ValueError):
        workloads.orca(0, 100)


def parse_bench(argv):
    import argparse

    from orca_jax.bench.run import add_parser
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="cmd"))
    return ap.parse_args(["bench", *argv])


def test_cli_builds_each_workload(tmp_path):
    from orca_jax.bench.run import command_line, make_trace
    t = make_trace(parse_bench(["offline"]), 50257)
    assert (len(t), t.max_prompt_len, t.max_total_len) == (64, 128, 192)  # the peers' defaults
    t = make_trace(parse_bench(["orca", "--requests", "300"]), 1000)
    assert t.params == {"prompt_len": [32, 512], "output_len": [1, 128]}
    args = parse_bench(["sharegpt-like", "--requests", "50", "--prompt-median", "20", "--prompt-len", "2:64"])
    t = make_trace(args, 1000)
    assert t.kind == "sharegpt-like" and all(2 <= r.prompt_len <= 64 for r in t.requests)
    # The recorded command line parses back to the same arguments.
    again = parse_bench(command_line(args).split()[2:])
    assert vars(again) == vars(args)
    t.save(tmp_path / "t.json")
    assert make_trace(parse_bench(["sharegpt-like", "--trace", str(tmp_path / "t.json")]), 1000) == t
    with pytest.raises(ValueError, match="not 'orca'"):
        make_trace(parse_bench(["orca", "--trace", str(tmp_path / "t.json")]), 1000)
