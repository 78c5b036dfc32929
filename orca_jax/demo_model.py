"""The embedded demo model: `gpt2-tiny` with random weights and a small trained tokenizer.

Lets `orca-jax demo`, the docs and the tests run with no download: the first call builds it
in a few seconds under ``$ORCA_JAX_HOME/demo-gpt2-tiny`` (default ``~/.cache/orca-jax``) and
later calls reuse it. Everything is deterministic: weights from seed 0, a byte-level BPE
tokenizer trained on `demo_corpus.txt` (shipped with the package) with `<|endoftext|>` as id 0,
the preset's bos/eos id.

Creation is atomic: the model is built in a temporary sibling directory and renamed into
place, so concurrent first calls from several processes never see or leave a half-written
model (one rename wins; the others find the finished directory and discard their copy).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .checkpoints.errors import CheckpointError
from .checkpoints.store import load_config, save_checkpoint
from .models.gpt2 import PRESETS, init_params

DEMO_PRESET = "gpt2-tiny"
DEMO_DIRNAME = "demo-gpt2-tiny"
EOS = "<|endoftext|>"
CORPUS = Path(__file__).with_name("demo_corpus.txt")


def orca_home() -> Path:
    """Where orca-jax keeps generated files: $ORCA_JAX_HOME, default ~/.cache/orca-jax."""
    return Path(os.environ.get("ORCA_JAX_HOME") or "~/.cache/orca-jax").expanduser()


def train_demo_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """GPT-2-style byte-level BPE trained on the embedded corpus; `<|endoftext|>` is id 0."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS.read_text(encoding="utf-8")], trainer)
    return tok


def _is_current(path: Path) -> bool:
    """A finished demo model built from the current preset."""
    try:
        return (load_config(path) == PRESETS[DEMO_PRESET] and (path / "params").is_dir()
                and (path / "tokenizer.json").is_file())
    except CheckpointError:
        return False


def _build(out: Path) -> None:
    config = PRESETS[DEMO_PRESET]
    tok = train_demo_tokenizer(config.vocab_size)
    assert tok.token_to_id(EOS) == config.eos_token_id == config.bos_token_id
    tok.save(str(out / "tokenizer.json"))
    # Lets HF's AutoTokenizer read the directory too.
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
        "unk_token": EOS, "model_max_length": config.n_positions}, indent=2) + "\n")
    save_checkpoint(out, config, _demo_params(config))


def _demo_params(config) -> dict:
    """`init_params(config, seed=0)`, made on the CPU backend with XLA optimisations off.

    Eagerly or under a default jit, compiling the threefry RNG for each parameter shape takes
    5-6 s on a small CPU; at optimisation level 0 it takes ~1 s. The random bits are
    identical; the normal transform may differ from an optimised build in the last ulp. Building
    on CPU keeps the weights the same whichever accelerator the machine has; a process without
    the CPU backend (JAX_PLATFORMS=cuda) builds them on its default device.
    """
    with jax.default_device(_cpu_device()):
        init = jax.jit(lambda: init_params(config, seed=0)).lower()
        return init.compile(compiler_options={"xla_backend_optimization_level": 0})()


def _cpu_device():
    """The first CPU device, or None (the default device) where JAX_PLATFORMS leaves none."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def ensure_demo_model(path: str | os.PathLike | None = None) -> str:
    """Path of the demo checkpoint, building it first if it is missing or stale."""
    target = Path(path) if path else orca_home() / DEMO_DIRNAME
    if _is_current(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the model is not secret
    try:
        _build(tmp)
        if target.exists() and not _is_current(target):
            # Stale (older preset) or interrupted by something other than us: move it aside.
            # Renames keep the swap atomic for readers; a concurrent process may win the race.
            try:
                os.rename(target, tmp.with_name(tmp.name + "-old"))
            except OSError:
                pass
        try:
            os.rename(tmp, target)  # fails if another process finished first
        except OSError:
            if not _is_current(target):
                raise CheckpointError(f"could not create the demo model at {target}; "
                                      "remove that directory and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.with_name(tmp.name + "-old"), ignore_errors=True)
    return str(target)
