"""`orca-jax bench latency`: the decode step against its floors and the host time, one JSON."""
import json
from pathlib import Path

from orca_jax.cli import main


def test_bench_latency_reports_steps_against_floors_and_host_time(tmp_path, capsys, demo_model_dir,
                                                                  monkeypatch):
    monkeypatch.setenv("ORCA_JAX_HOME", str(Path(demo_model_dir).parent))
    out = tmp_path / "lat"
    assert main(["bench", "latency", "--preset", "gpt2-tiny", "--batches", "1,3", "--rounds", "1",
                 "--steps", "2", "--running", "1,5", "--host-steps", "3", "--out", str(out)]) == 0
    rep = json.loads((out / "latency.json").read_text())
    assert [r["batch"] for r in rep["decode"]] == [1, 3]
    for r in rep["decode"]:
        assert r["decode_rows"] >= r["batch"] and r["floor_bound"] in ("read", "matmul")
        assert r["step_ms"] > 0 and r["floor_ms"] > 0 and r["ratio"] == r["step_ms"] / r["floor_ms"]
    assert [h["running"] for h in rep["host"]] == [1, 5] and all(h["median_ms"] > 0 for h in rep["host"])
    assert rep["bandwidth_gbs"][0] > 0 and rep["matmul_gflops"][0] > 0 and rep["machine"]["cpus"]
    printed = capsys.readouterr().out
    assert "batch   3 (bucket" in printed and "host,    5 running" in printed
