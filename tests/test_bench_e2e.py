"""A tiny end-to-end `orca-jax bench` (seconds): every system runs, the report has its schema."""
import json

import pytest

from orca_jax.bench import report
from orca_jax.cli import main

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def check_report(rep: dict, systems: set[str], rates) -> None:
    assert set(report.REPORT_KEYS) <= set(rep)
    assert rep["schema"] == report.SCHEMA
    assert rep["command"].startswith("orca-jax bench ")
    assert rep["machine"]["matmul_gflops"]["ceiling"] > 0
    assert {r["system"] for r in rep["runs"]} == systems
    assert sorted({r["rate"] for r in rep["runs"]}, key=str) == sorted(rates, key=str)
    for r in rep["runs"]:
        assert set(report.RUN_KEYS) <= set(r)
        m = r["metrics"]
        assert set(report.METRIC_KEYS) <= set(m)
        assert m["completed"] == rep["workload"]["requests"] and m["failed"] == 0
        assert m["total_output_tokens"] == rep["workload"]["output_len"]["total"]
        for k in ("ttft_ms", "e2el_ms", "normalized_latency_ms"):
            assert set(m[k]) == {"mean", "median", "std", "p50", "p90", "p99"}
            assert m[k]["median"] > 0
        assert 0 < r["mfu"] < 1 and r["model_flops"] > 0
        if r["system"] in ("orca", "static"):
            assert r["info"]["compiles_during_run"] == 0  # everything compiled at warm-up


# The same engine shapes in every run, so compiled programs are shared through the cache.
ENGINE = ["--max-batch-size", "2", "--max-model-len", "16", "--max-num-batched-tokens", "16", "--no-progress"]


def test_bench_offline_and_online(tmp_path, monkeypatch, hf_gpt2_dir, capsys):
    monkeypatch.setenv("ORCA_JAX_HOME", str(tmp_path / "home"))
    hf, _ = hf_gpt2_dir()
    out = tmp_path / "off"
    assert main(["bench", "offline", "--hf-model", str(hf), "--requests", "4", "--prompt-len", "6",
                 "--output-len", "3", "--systems", "orca,static,hf,vllm",
                 "--vllm-python", str(tmp_path / "no-such-python"), "--out", str(out), *ENGINE]) == 0
    printed = capsys.readouterr()
    assert "vllm: skipped" in printed.err
    assert "| orca-jax iteration-level |" in printed.out
    rep = json.loads((out / "results.json").read_text())
    check_report(rep, {"orca", "static", "hf"}, [None])
    assert rep["sweep"] is None
    assert (out / "offline.png").read_bytes()[:4] == b"\x89PNG"
    trace = json.loads((out / "trace.json").read_text())
    assert len(trace["requests"]) == 4

    out = tmp_path / "on"
    assert main(["bench", "orca", "--hf-model", str(hf), "--requests", "5", "--prompt-len", "4:8",
                 "--output-len", "1:4", "--rates", "4,40", "--systems", "orca,static",
                 "--goodput", "norm:10000", "--out", str(out), "--plot", str(tmp_path / "sweep.png"),
                 *ENGINE]) == 0
    rep = json.loads((out / "results.json").read_text())
    check_report(rep, {"orca", "static"}, [4.0, 40.0])
    assert all(r["metrics"]["goodput"]["good_requests"] == 5 for r in rep["runs"])
    s = rep["sweep"]
    assert set(s["curves"]) == {"orca", "static"} and len(s["curves"]["orca"]) == 2
    assert s["slo_normalized_latency_ms"] > 0 and "orca_vs_static" in s["ratios"]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "Max throughput with median normalized latency" in capsys.readouterr().out

    # Replaying the saved trace gives the same workload (HF only: no compiles).
    assert main(["bench", "orca", "--hf-model", str(hf), "--trace", str(out / "trace.json"),
                 "--rates", "40", "--systems", "hf", "--out", str(tmp_path / "replay"), *ENGINE]) == 0
    again = json.loads((tmp_path / "replay" / "results.json").read_text())
    assert again["workload"]["prompt_len"] == rep["workload"]["prompt_len"]
    # Without --goodput, online goodput is against the sweep's normalized-latency SLO.
    assert again["runs"][0]["metrics"]["goodput"]["slos_ms"] == {"norm": again["sweep"]["slo_normalized_latency_ms"]}


def test_bench_rejects_bad_input(tmp_path, monkeypatch, hf_gpt2_dir, capsys):
    monkeypatch.setenv("ORCA_JAX_HOME", str(tmp_path / "home"))
    hf, _ = hf_gpt2_dir()  # n_positions = 32
    args = ["bench", "offline", "--hf-model", str(hf), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args + ["--prompt-len", "30", "--output-len", "8"]) == 2
    assert "positions" in capsys.readouterr().err
    assert main(args + ["--systems", "orca,tgi"]) == 2
    assert "unknown system" in capsys.readouterr().err
    assert main(args + ["--goodput", "ttft"]) == 2
