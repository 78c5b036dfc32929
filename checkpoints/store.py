"""The on-disk checkpoint: ``config.json`` + an Orbax checkpoint of the params + tokenizer files.

    <dir>/config.json      the model config's to_json() (its `architecture` names the family)
    <dir>/params/          Orbax (StandardCheckpointer, OCDBT) of the pure params dict
    <dir>/tokenizer.json   ... copied from the source, if it had them

Restoring builds the abstract params tree (`abstract_params`, nothing allocated) with a
`NamedSharding` per leaf from a layout and passes it as Orbax's restore target, so each device
reads only its own shard straight from disk: no full host copy, no re-sharding afterwards
(DESIGN.md, "Current JAX / Flax idioms").
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ..models import FAMILIES, config_from_dict, family
from ..sharding.layouts import Layout, param_shardings
from ..sharding.mesh import single_device_mesh
from .errors import CheckpointError, CheckpointNotFoundError, TensorMismatchError, UnsupportedCheckpointError

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# Tokenizer-side files worth carrying along from a Hugging Face directory.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def _check_tree(config, params: dict) -> None:
    """Params must match the family's `abstract_params(config)` leaf for leaf: shape and dtype."""
    expected = family(config).abstract_params(config)
    exp_leaves = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    got_leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    name = jax.tree_util.keystr
    missing = sorted(name(k) for k in exp_leaves.keys() - got_leaves.keys())
    extra = sorted(name(k) for k in got_leaves.keys() - exp_leaves.keys())
    if missing or extra:
        raise TensorMismatchError(f"params do not match the config: missing {missing}, unexpected {extra}")
    for key, want in exp_leaves.items():
        got = got_leaves[key]
        if tuple(got.shape) != want.shape or got.dtype != want.dtype:
            raise TensorMismatchError(f"param {name(key)}: expected {want.shape} {want.dtype}, "
                                      f"got {tuple(got.shape)} {got.dtype}")


def save_checkpoint(out_dir: str | Path, config, params: dict,
                    tokenizer_files=(), *, overwrite: bool = False) -> Path:
    """Writes `params` (numpy or jax arrays) and `config` to `out_dir`; returns the path.

    config.json is written last, so a directory interrupted mid-save is not mistaken for a
    checkpoint by `load_config`.
    """
    out = Path(out_dir).absolute()
    if (out / PARAMS_DIR).exists() and not overwrite:
        raise CheckpointError(f"{out / PARAMS_DIR} already exists; pass overwrite=True to replace it")
    _check_tree(config, params)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)
    # The context manager closes the checkpointer (joins its async save thread) on exit.
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / PARAMS_DIR, params, force=overwrite)
        ckptr.wait_until_finished()
    for f in tokenizer_files:
        shutil.copyfile(f, out / Path(f).name)
    (out / CONFIG_FILE).write_text(config.to_json() + "\n")
    return out


def load_config(ckpt_dir: str | Path):
    """The model config of an orca-jax checkpoint directory."""
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointNotFoundError(f"{path} is not an orca-jax checkpoint: {cfg_file} is missing")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if "architecture" not in d:
        hint = (" It looks like a Hugging Face checkpoint; convert it first with "
                "`orca-jax convert`." if "model_type" in d else "")
        raise CheckpointError(f"{cfg_file} has no 'architecture' field, so {path} is not an "
                              f"orca-jax checkpoint.{hint}")
    if d["architecture"] not in FAMILIES:
        raise UnsupportedCheckpointError(f"{cfg_file}: architecture {d['architecture']!r} is not "
                                         f"supported (known: {sorted(FAMILIES)})")
    try:
        return config_from_dict(d)
    except (TypeError, ValueError) as e:
        raise UnsupportedCheckpointError(f"{cfg_file}: {e}") from e


def load_checkpoint(ckpt_dir: str | Path, mesh: jax.sharding.Mesh | None = None,
                    layout: str | Layout = "replicated", dtype: str | None = None) -> tuple[object, dict]:
    """Restores (config, params) with every leaf placed by `layout` on `mesh`.

    mesh: default a 1-device mesh on `jax.devices()[0]`.
    dtype: cast while restoring (e.g. a float32 checkpoint served in "bfloat16").
    """
    config = load_config(ckpt_dir)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    params_dir = Path(ckpt_dir).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointNotFoundError(f"{Path(ckpt_dir)} is not a complete checkpoint: {params_dir} is missing")
    shardings = param_shardings(config, mesh or single_device_mesh(), layout)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          family(config).abstract_params(config), shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(params_dir, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"could not restore params from {params_dir} for config "
                              f"{config}: {e}") from e
    return config, params
