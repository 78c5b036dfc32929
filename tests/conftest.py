"""Test-wide set-up: 8 virtual CPU devices (must be set before jax is imported)."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled step programs persist across the test processes (orca_jax.runner.enable_compile_cache):
# engines and servers that later tests build with the same shapes load their programs instead
# of compiling them. tests/test_compile_cache.py checks the cache itself.
os.environ.setdefault("ORCA_JAX_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "orca-jax-test-xla"))


import pytest  # noqa: E402  (after the environment set-up above)


@pytest.fixture
def hf_gpt2_dir(tmp_path):
    """Factory: `hf_gpt2_dir(name="hf", seed=0, **GPT2Config overrides) -> (path, torch model)`."""
    from helpers import make_hf_gpt2

    def make(name: str = "hf", seed: int = 0, **overrides):
        path = tmp_path / name
        return path, make_hf_gpt2(path, seed=seed, **overrides)

    return make


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The embedded demo checkpoint (gpt2-tiny + trained tokenizer), built once per session."""
    from orca_jax.demo_model import ensure_demo_model

    return ensure_demo_model(tmp_path_factory.mktemp("orca_home") / "demo-gpt2-tiny")
