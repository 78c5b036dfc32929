"""HF GPT-2 conversion, Orbax round trips and sharded restore, checked against HF PyTorch.

Every model here is a random `transformers` GPT-2 with odd shapes (vocab 1001, 3 or 6 heads,
an explicit n_inner, 32 positions) so that a transposed or mis-split tensor cannot hide.
"""
import json
import shutil

import jax
import numpy as np
import pytest
from helpers import decode_logits, hf_logits, prefill_logits
from safetensors.numpy import load_file, save_file

from orca_jax.checkpoints import (CheckpointError, CheckpointNotFoundError, TensorMismatchError,
                                  UnsafeCheckpointError, UnsupportedCheckpointError)
from orca_jax.checkpoints.hf_gpt2 import config_from_hf, convert_hf_gpt2
from orca_jax.checkpoints.store import load_checkpoint, load_config, save_checkpoint
from orca_jax.models.gpt2 import GPTConfig, abstract_params
from orca_jax.sharding.layouts import spec_for
from orca_jax.sharding.mesh import make_mesh

PROMPT = np.random.RandomState(0).randint(0, 1000, size=20)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("overrides", [
    dict(),                                                       # 6 heads of 8, vocab 1001
    dict(n_head=3, n_inner=100, activation_function="gelu", layer_norm_epsilon=1e-6),
    dict(n_embd=32, n_head=4, n_layer=3, activation_function="relu", n_positions=24),
], ids=["h6", "h3-inner100-gelu", "h4-L3-relu"])
def test_matches_hf_prefill_and_decode(hf_gpt2_dir, tmp_path, overrides):
    src, hf = hf_gpt2_dir(**overrides)
    config = convert_hf_gpt2(src, tmp_path / "ckpt", progress=False)
    assert config.n_head == hf.config.n_head and config.mlp_dim == (hf.config.n_inner or 4 * hf.config.n_embd)
    config, params = load_checkpoint(tmp_path / "ckpt")
    ids = PROMPT[:min(len(PROMPT), config.n_positions)]
    ref = hf_logits(hf, ids)
    assert np.abs(ref).max() > 1.0  # logits are O(1): the tolerance below is meaningful
    np.testing.assert_allclose(prefill_logits(config, params, ids), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(decode_logits(config, params, ids), ref, atol=1e-4, rtol=0)


def test_bfloat16_conversion_within_tolerance(hf_gpt2_dir, tmp_path):
    """bf16 keeps 8 mantissa bits, so each op rounds at ~0.4% relative error and errors add up
    over layers. Measured on these random models (3 seeds x 3 shapes): max |logit error| is
    0.05-0.09 of the logits' standard deviation and argmax agrees on >= 91% of positions (random
    models often have near-tied top logits). The bounds leave ~2x margin."""
    src, hf = hf_gpt2_dir()
    config = convert_hf_gpt2(src, tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert config.dtype == "bfloat16"
    config, params = load_checkpoint(tmp_path / "bf16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    ref = hf_logits(hf, PROMPT)
    got = prefill_logits(config, params, PROMPT)
    assert np.abs(got - ref).max() <= 0.15 * ref.std()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_key_prefix_and_sharded_index_give_identical_params(hf_gpt2_dir, tmp_path):
    src, hf = hf_gpt2_dir()
    hf.transformer.save_pretrained(tmp_path / "base")               # keys without "transformer."
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")  # model.safetensors.index.json
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for name in ("ref", "base", "sharded"):
        convert_hf_gpt2(src if name == "ref" else tmp_path / name, tmp_path / f"out-{name}", progress=False)
    _, ref = load_checkpoint(tmp_path / "out-ref")
    for name in ("base", "sharded"):
        _assert_trees_equal(load_checkpoint(tmp_path / f"out-{name}")[1], ref)


def test_orbax_round_trip_and_dtype_cast(tmp_path):
    config = GPTConfig(vocab_size=300, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), abstract_params(config))
    save_checkpoint(tmp_path / "c", config, params, tokenizer_files=[])
    assert load_config(tmp_path / "c") == config
    loaded_config, loaded = load_checkpoint(tmp_path / "c")
    assert loaded_config == config
    _assert_trees_equal(loaded, params)
    cfg16, p16 = load_checkpoint(tmp_path / "c", dtype="bfloat16")
    assert cfg16.dtype == "bfloat16"
    _assert_trees_equal(p16, jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params))
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path / "c", config, params)
    save_checkpoint(tmp_path / "c", config, params, overwrite=True)
    with pytest.raises(TensorMismatchError, match=r"\['wte'\]\['embedding'\]: expected \(301, 32\) float32, got \(300, 32\)"):
        save_checkpoint(tmp_path / "d", config.replace(vocab_size=301), params)


@pytest.mark.parametrize("layout", ["replicated", "megatron"])
def test_restore_onto_4_device_mesh_gives_same_logits(hf_gpt2_dir, tmp_path, layout):
    # vocab 1000, 4 heads, MLP 128: every megatron axis divides by 4.
    src, hf = hf_gpt2_dir(vocab_size=1000, n_embd=32, n_head=4)
    convert_hf_gpt2(src, tmp_path / "ckpt", progress=False)
    mesh = make_mesh("tensor=4")
    config, params = load_checkpoint(tmp_path / "ckpt", mesh=mesh, layout=layout)
    kernel = params["h"]["attn"]["c_attn"]["kernel"]                  # [L, D, 3, H@tensor, K]
    heads = "tensor" if layout == "megatron" else None
    assert kernel.sharding == jax.NamedSharding(mesh, jax.P(None, None, None, heads, None))
    if layout == "megatron":
        assert {s.data.shape for s in kernel.addressable_shards} == {(2, 32, 3, 1, 8)}
        assert params["wte"]["embedding"].sharding.spec == jax.P("tensor", None)
    got = prefill_logits(config, params, PROMPT, kv_sharding=jax.NamedSharding(mesh, jax.P()))
    np.testing.assert_allclose(got, hf_logits(hf, PROMPT), atol=1e-4, rtol=0)


def test_megatron_falls_back_to_replication_where_a_dim_does_not_divide():
    mesh = make_mesh("data=2,tensor=4")
    assert spec_for(("vocab", "embed"), "megatron", mesh, (1001, 48)) == jax.P(None, None)
    assert spec_for(("vocab", "embed"), "megatron", mesh, (1000, 48)) == jax.P("tensor", None)
    assert spec_for(("layers", "embed", None, "heads", "head_dim"), "megatron", mesh,
                    (2, 48, 3, 6, 8)) == jax.P(None, None, None, None, None)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def hf_dir(hf_gpt2_dir):
    return hf_gpt2_dir(n_layer=1)[0]


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_missing_directory_config_and_weights(tmp_path, hf_dir):
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_hf_gpt2(hf_dir, tmp_path / "out", dtype="int8")
    with pytest.raises(CheckpointNotFoundError, match="nope.*does not exist"):
        convert_hf_gpt2(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_hf_gpt2(tmp_path / "empty", tmp_path / "out")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors"):
        convert_hf_gpt2(hf_dir, tmp_path / "out")


def test_refuses_pickled_weights(tmp_path, hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")  # never opened
    (hf_dir / "training_args.bin").write_bytes(b"")                      # not weights: not named
    with pytest.raises(UnsafeCheckpointError) as e:
        convert_hf_gpt2(hf_dir, tmp_path / "out")
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "arbitrary code" in msg and "safe_serialization=True" in msg
    assert "training_args" not in msg


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "llama", "model_type is 'llama'"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True"),
    ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn=True"),
    ("activation_function", "gelu_10", "activation_function='gelu_10'"),
    ("tie_word_embeddings", False, "tie_word_embeddings=False"),
    ("n_head", 5, "n_embd=48 is not divisible by n_head=5"),
])
def test_unsupported_options_name_the_field(tmp_path, hf_dir, field, value, match):
    _edit_config(hf_dir, **{field: value})
    with pytest.raises(UnsupportedCheckpointError, match=match):
        convert_hf_gpt2(hf_dir, tmp_path / "out")


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, hf_dir):
    _edit_config(hf_dir, n_positions=64)
    with pytest.raises(TensorMismatchError, match=r"transformer\.wpe\.weight has shape \(32, 48\).*\(64, 48\)"):
        convert_hf_gpt2(hf_dir, tmp_path / "out")


def test_missing_and_unexpected_tensors(tmp_path, hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "transformer.h.0.mlp.c_fc.bias"},
              hf_dir / "model.safetensors")
    with pytest.raises(TensorMismatchError, match=r"missing tensor transformer\.h\.0\.mlp\.c_fc\.bias"):
        convert_hf_gpt2(hf_dir, tmp_path / "out")
    save_file({**tensors, "transformer.h.1.ln_1.weight": tensors["transformer.h.0.ln_1.weight"]},
              hf_dir / "model.safetensors")
    with pytest.raises(TensorMismatchError, match=r"unexpected tensors.*transformer\.h\.1\.ln_1\.weight"):
        convert_hf_gpt2(hf_dir, tmp_path / "out")
    save_file({**tensors, "lm_head.weight": tensors["transformer.wte.weight"] + 1}, hf_dir / "model.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match="untied"):
        convert_hf_gpt2(hf_dir, tmp_path / "out")


def test_sharded_index_with_missing_shard(tmp_path, hf_gpt2_dir):
    src, hf = hf_gpt2_dir(n_layer=1)
    shutil.rmtree(src)
    hf.save_pretrained(src, max_shard_size="20KB")
    next(src.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"model\.safetensors\.index\.json lists model-00002"):
        convert_hf_gpt2(src, tmp_path / "out")


def test_load_checkpoint_rejects_non_checkpoints(tmp_path, hf_dir):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="not an orca-jax checkpoint"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="Hugging Face checkpoint; convert it first"):
        load_checkpoint(hf_dir)


def test_tokenizer_files_are_copied_and_token_ids_sanitised(tmp_path, hf_dir):
    (hf_dir / "vocab.json").write_text("{}")
    (hf_dir / "merges.txt").write_text("#version: 0.2\n")
    convert_hf_gpt2(hf_dir, tmp_path / "out", progress=False)
    assert {"vocab.json", "merges.txt", "generation_config.json", "config.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    # GPT2Config's default ids (50256) are outside a 1001-token vocab: no such token.
    c = config_from_hf({"model_type": "gpt2", "vocab_size": 1001, "n_embd": 48, "n_head": 6})
    assert c.bos_token_id is None and c.eos_token_id is None and c.dtype == "float32"
