"""The embedded demo model: built once, deterministic, reusable, loadable."""
import filecmp
import os
import shutil

import jax
import numpy as np

from orca_jax import demo_model
from orca_jax.checkpoints.store import load_checkpoint
from orca_jax.demo_model import ensure_demo_model
from orca_jax.models.gpt2 import PRESETS
from orca_jax.tokenizer import load_tokenizer


def test_demo_model_is_complete_and_loads(demo_model_dir):
    config, params = load_checkpoint(demo_model_dir)
    assert config == PRESETS["gpt2-tiny"]
    tok = load_tokenizer(demo_model_dir)
    assert tok.vocab_size == config.vocab_size == 4096
    assert tok.eos_token_id == config.eos_token_id == config.bos_token_id == 0
    text = "The orca swims in the sea."
    assert len(tok.encode(text)) < len(text) / 2 and tok.decode(tok.encode(text)) == text


def test_demo_model_is_reused_and_deterministic(demo_model_dir, tmp_path, monkeypatch):
    stamp = os.path.getmtime(os.path.join(demo_model_dir, "config.json"))
    assert ensure_demo_model(demo_model_dir) == str(demo_model_dir)      # no rebuild
    assert os.path.getmtime(os.path.join(demo_model_dir, "config.json")) == stamp
    monkeypatch.setenv("ORCA_JAX_HOME", str(tmp_path))
    other = ensure_demo_model()
    assert other == str(tmp_path / "demo-gpt2-tiny")
    assert filecmp.cmp(f"{other}/tokenizer.json", f"{demo_model_dir}/tokenizer.json", shallow=False)
    a, b = load_checkpoint(other)[1], load_checkpoint(demo_model_dir)[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [p.name for p in tmp_path.iterdir()] == ["demo-gpt2-tiny"]  # no temp dirs left


def test_concurrent_creation_keeps_the_first_finished_model(demo_model_dir, tmp_path, monkeypatch):
    """Another process finishes while we build: our rename fails, theirs is kept, ours removed."""
    target = tmp_path / "demo"
    real_build = demo_model._build

    def build_then_lose_the_race(out):
        real_build(out)
        shutil.copytree(demo_model_dir, target)

    monkeypatch.setattr(demo_model, "_build", build_then_lose_the_race)
    assert ensure_demo_model(target) == str(target)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert load_checkpoint(target)[0] == PRESETS["gpt2-tiny"]


def test_weights_build_without_a_cpu_backend(monkeypatch):
    """Under JAX_PLATFORMS=cuda there is no CPU backend: the weights are built on the default
    device instead of failing, with the same values (threefry bits do not depend on it)."""
    want = demo_model._demo_params(PRESETS["gpt2-tiny"])
    real = jax.devices

    def no_cpu(backend=None):
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu")
        return real(backend)

    monkeypatch.setattr(jax, "devices", no_cpu)
    got = demo_model._demo_params(PRESETS["gpt2-tiny"])
    jax.tree.map(np.testing.assert_array_equal, got, want)
