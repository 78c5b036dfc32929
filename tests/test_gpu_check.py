"""`orca-jax bench gpu-check --quick`: the prepared GPU run, every phase on CPU, so it cannot rot
before a GPU session runs it (docs/gpu.md)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orca_jax.bench.gpu_check import FP32_TOL, PHASES, QUICK, agreement, scan_hlo


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, demo_model_dir):
    """One `--quick` run in a fresh process (its own compile cache, as on a GPU machine)."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, ORCA_JAX_HOME=str(Path(demo_model_dir).parent), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "orca_jax.cli", "bench", "gpu-check", "--quick",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    results = {p: json.loads((out / f"{p}.json").read_text()) for p in PHASES if (out / f"{p}.json").exists()}
    return proc, out, results


def test_every_phase_writes_its_json_and_passes(quick_run):
    proc, out, r = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(r) == sorted(PHASES)
    assert {p: r[p]["status"] for p in PHASES} == {**dict.fromkeys(PHASES, "ok"), "pallas": "skipped"}
    assert r["pallas"]["summary"] == "skipped: no GPU"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0][1:] for ln in lines] == list(PHASES)  # one line per phase, in order
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [] and summary["quick"] and list(summary["phases"]) == list(PHASES)


def test_devices_model_and_numerics_report_real_values(quick_run):
    _, _, r = quick_run
    dev = r["devices"]
    assert dev["backend"] == "cpu" and dev["devices"] and dev["jax"] and dev["jaxlib"]
    assert "jax_default_matmul_precision" in dev["config"] and "XLA_FLAGS" in dev["env"]
    m = r["model"]
    assert m["spec"] == QUICK.model and m["hf_dir"] and m["params"] > 0 and m["stored_dtype"] == "float32"
    num = r["numerics"]
    f32, bf16 = num["float32"], num["bfloat16"]
    assert num["steps"] == QUICK.numerics_steps and f32["compared_logprobs"] >= 20 * QUICK.numerics_steps
    assert 0 < f32["max_abs_logprob_diff"] <= FP32_TOL and f32["greedy_equal_steps"] == QUICK.numerics_steps
    assert f32["tokens"] == f32["hf_argmax"]
    assert bf16["max_abs_logprob_diff"] > f32["max_abs_logprob_diff"]  # bfloat16 really ran
    assert f32["matmul_precision"]


def test_warmup_donation_and_restart(quick_run):
    _, _, r = quick_run
    w = r["warmup"]
    assert w["programs"] >= w["bucket_shapes"] > 0 and w["warmup_seconds"] > 0
    assert w["compiles_after_warmup"] == 0 and w["mixed_run"]["output_tokens"] > 0
    d = r["donation"]
    assert d["steps"] > 3 and d["kv_arrays"] > 0 and d["kv_pointer_changes"] == 0 and d["old_kv_deleted"]
    rs = r["restart"]
    assert rs["first"]["warmup_seconds"] == w["warmup_seconds"]
    assert rs["cache_entries"] > 0 and rs["restart"]["cache_hits"] > 0
    assert rs["restart"]["programs"] == w["programs"]


def test_throughput_host_and_hlo(quick_run):
    _, out, r = quick_run
    t = r["throughput"]
    assert t["offline"]["output_throughput"] > 0 and t["offline"]["compiles_during_run"] == 0
    assert [row["batch"] for row in t["decode"]] == list(QUICK.batches)
    assert all(row["step_ms"] > 0 and row["floor_ms"] > 0 and row["floor_bound"] in ("read", "matmul")
               for row in t["decode"])
    assert t["bandwidth_gbs"] > 0 and t["matmul_gflops"] > 0
    h = r["host"]
    assert h["engine"]["iterations"] > 0 and h["engine"]["host_ms"]["median"] > 0
    assert h["profile"]["program_runs_per_step"] > 0 and h["profile"]["device_busy_ms_per_step"] > 0
    assert h["profile"]["device_planes"] == []  # CPU: no device plane, so no copies are claimed
    assert [x["running"] for x in h["host_only"]] == list(QUICK.host_only)
    progs = r["hlo"]["programs"]
    assert "decode_td1" in progs and all(p["instructions"] > 0 for p in progs.values())
    assert scan_hlo((out / "hlo-decode-td1.txt").read_text()) == progs["decode_td1"]


def test_hlo_scan_tells_static_loops_from_runtime_ones():
    import jax
    import jax.numpy as jnp
    loop = lambda n: jax.jit(lambda x, m: jax.lax.fori_loop(0, m if n is None else n, lambda i, c: c * 2 + i, x))
    hlo = lambda f, *a: f.lower(*a).compile().as_text()
    assert scan_hlo(hlo(loop(5), jnp.ones(3), 0)) | {"instructions": 0} == {
        "instructions": 0, "while": 1, "while_unknown_trip_count": 0, "conditional": 0}
    assert scan_hlo(hlo(loop(None), jnp.ones(3), 5))["while_unknown_trip_count"] == 1
    cond = jax.jit(lambda x, p: jax.lax.cond(p, lambda: x + 1, lambda: x * 2))
    assert scan_hlo(hlo(cond, jnp.ones(3), True))["conditional"] == 1


def test_backend_agreement_compares_the_log_probs_both_runs_report():
    a = {"tokens": [[3, 4]], "logprobs": [[{3: -0.5, 7: -1.0}, {4: -0.2}]]}
    b = {"tokens": [[3, 4]], "logprobs": [[{3: -0.52, 9: -3.0}, {4: -0.2, 1: -2.0}]]}
    got = agreement(a, b)
    assert got["tokens_equal"] and got["compared_logprobs"] == 2
    assert abs(got["max_abs_logprob_diff"] - 0.02) < 1e-9
    assert agreement(a, {"tokens": [[3, 5]], "logprobs": [[{}]]})["max_abs_logprob_diff"] == float("inf")
