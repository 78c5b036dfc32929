"""`python -m orca_jax.bench.host`: the real engine's host path over an instant device."""
from orca_jax.bench import host
from orca_jax.tokenizer import load_tokenizer


def test_host_bench_times_real_iterations(demo_model_dir, capsys):
    times = host.host_step_times(load_tokenizer(demo_model_dir), running=8, steps=5)
    assert len(times) == 5 and (times > 0).all()
    assert host.main(["--running", "1,3", "--steps", "3", "--model", demo_model_dir]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["1", "3"] and all("ms per iteration" in l for l in out)
