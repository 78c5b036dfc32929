"""`orca-jax bench online` (orca_jax/bench/online.py): the pieces that need no vLLM.

The sweep itself runs vLLM's client, which CI does not install; docs/benchmarks.md records a
run. Here: the serve command carries the engine flags given, vLLM's result JSON becomes the
report's sweep points (normalized latency per request), and a missing vLLM is a clear error.
"""
import argparse

import pytest

from orca_jax.bench import online
from orca_jax.cli import main


def parse(argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    online.add_parser(sub)
    return ap.parse_args(["online", *argv])


def test_serve_command_carries_the_engine_flags_given():
    args = parse(["--max-batch-size", "16", "--no-prefix-caching", "--kv-admission", "reserve"])
    argv, _ = online.server_command("orca", args, "/hf", "/ckpt", 8123)
    assert argv[1:4] == ["-m", "orca_jax.cli", "serve"] and argv[argv.index("--model") + 1] == "/ckpt"
    assert argv[argv.index("--served-model-name") + 1] == "/hf" and argv[argv.index("--http-port") + 1] == "8123"
    flags = online.serve_flags(args)
    assert flags == ["--max-batch-size", "16", "--kv-admission", "reserve", "--no-prefix-caching",
                     "--layout", "megatron"]
    assert online.serve_flags(parse([])) == ["--layout", "megatron"]  # defaults are not repeated
    vllm, env = online.server_command("vllm", args, "/hf", "/ckpt", 8124)
    assert vllm[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    # 272 x 1.88 + 64 x 1.88 + 8 positions: the longest request of the random dataset fits
    assert int(vllm[vllm.index("--max-model-len") + 1]) >= 272 * 1.88 + 64 * 1.88


def test_client_result_becomes_a_sweep_point():
    result = {"completed": 3, "request_throughput": 0.38, "output_throughput": 24.0, "duration": 8.0,
              "median_ttft_ms": 600.0, "p99_ttft_ms": 900.0, "median_tpot_ms": 50.0, "p99_tpot_ms": 70.0,
              "median_itl_ms": 45.0, "p99_itl_ms": 500.0, "median_e2el_ms": 4000.0, "p99_e2el_ms": 9000.0,
              "latencies": [2.0, 4.0, 0.0], "output_lens": [40, 50, 0]}
    r = online.run_result("orca", 0.4, result)
    assert r["system"] == "orca" and r["rate"] == 0.4
    m = r["metrics"]
    assert m["tpot_ms"] == {"median": 50.0, "p99": 70.0} and m["completed"] == 3
    # per request: 2.0 s / 40 = 50 ms/token, 4.0 / 50 = 80; the failed one (0 tokens) is left out
    assert m["normalized_latency_ms"]["median"] == pytest.approx(65.0)
    text = online.table([r])
    assert "| orca-jax (iteration-level, OpenAI HTTP) | 0.4 | 3 | 0.38 |" in text
    assert online.normalized_latency_ms({"latencies": [], "output_lens": []}) is None


def test_client_command_is_vllms_random_dataset(tmp_path, monkeypatch):
    args = parse(["--rates", "0.4", "--num-prompts", "7"])
    monkeypatch.chdir(tmp_path)
    # The client runs in /tmp: the default --out (relative) must still name this folder.
    cmd = online.client_command(args, "/hf", 8000, 0.4, online.Path("bench-results/online"), "x.json")
    assert cmd[cmd.index("--result-dir") + 1] == str(tmp_path / "bench-results" / "online")
    assert cmd[1] == str(online.CLIENT) and "--save-detailed" in cmd and "--ignore-eos" in cmd
    assert cmd[cmd.index("--request-rate") + 1] == "0.4" and cmd[cmd.index("--num-prompts") + 1] == "7"
    assert "orca_jax" not in "".join(ln for ln in online.CLIENT.read_text().splitlines() if ln.startswith(("import", "from")))


def test_missing_vllm_is_a_clear_error(tmp_path, capsys):
    rc = main(["bench", "online", "--vllm-python", str(tmp_path / "nope" / "python"), "--out", str(tmp_path)])
    assert rc == 2 and "vLLM's own client" in capsys.readouterr().err
    rc = main(["bench", "online", "--systems", "sglang", "--out", str(tmp_path)])
    assert rc == 2 and "unknown systems ['sglang']" in capsys.readouterr().err
