"""Named sharding layouts: logical axis -> mesh axis rules (levanter-style).

A parameter or buffer declares the *logical* axes of each dimension (each model family's
`param_axes`, models/, and `KV_AXES` in `models/attention.py`); a `Layout` maps those names to mesh
axes. Trying a new layout is a new entry in `LAYOUTS` or a small JSON/TOML rules file
(`load_layout`, format in docs/distributed.md), never a code change in the model or engine.

A rule maps a logical axis to one mesh axis (``"tensor"``), to several (``("data", "tensor")``:
the dimension splits over their product, in that order), or to None (replicated).

Resolution rules of `Layout.resolve` / `spec_for`, chosen so that every layout is valid on
every mesh:
* a mesh axis missing from the mesh, or of size 1, means "replicated" for that dimension;
* a mesh axis is used at most once per array (the first dimension that asks gets it);
* a mesh axis whose size (times the axes already chosen for the dimension) does not divide
  the dimension is skipped (XLA's `NamedSharding` requires even tiling; e.g. GPT-2's vocab
  50257 cannot split over 4 devices, so it stays replicated).

`resolve` is pure Python over a ``{axis: size}`` dict, so `sharding/plan.py` computes the
same placement as the engine without a device.
"""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path
from typing import Mapping, Union

import jax

from ..models.attention import KV_AXES
from ..models import decoder, family, gpt2

MeshAxes = Union[str, tuple[str, ...], None]  # what one dimension is split over


def _logical_names() -> frozenset[str]:
    trees = [gpt2.PARAM_AXES, decoder.param_axes(decoder.DecoderConfig(qk_norm=True, qkv_bias=True))]
    leaves = jax.tree.leaves(trees, is_leaf=lambda x: isinstance(x, tuple))
    return frozenset(a for axes in [*leaves, KV_AXES] for a in axes if a is not None)


# Every logical axis name a rule may mention: a typo in a rules file is an error, not a
# silently replicated dimension.
LOGICAL_AXES = _logical_names()


@dataclasses.dataclass(frozen=True)
class Layout:
    """A named set of logical-axis rules."""

    name: str                                   # key in LAYOUTS, shown in logs and `plan`
    rules: tuple[tuple[str, MeshAxes], ...]     # (logical axis, mesh axis/axes or None); first match wins
    description: str = ""                       # one line for `orca-jax plan` and the docs

    def mesh_axis(self, logical: str | None) -> MeshAxes:
        for name, mesh_axis in self.rules:
            if name == logical:
                return mesh_axis
        return None

    def resolve(self, logical_axes: tuple[str | None, ...], mesh_shape: Mapping[str, int],
                shape: tuple[int, ...] | None = None) -> tuple[MeshAxes, ...]:
        """Mesh axes of each dimension (a PartitionSpec's entries) on a mesh of `mesh_shape`."""
        used: set[str] = set()
        out: list[MeshAxes] = []
        for i, logical in enumerate(logical_axes):
            want = self.mesh_axis(logical)
            want = (want,) if isinstance(want, str) else tuple(want or ())
            chosen, n = [], 1
            for axis in want:
                size = mesh_shape.get(axis, 1)
                if size == 1 or axis in used or (shape is not None and shape[i] % (n * size)):
                    continue
                chosen.append(axis)
                n *= size
            used.update(chosen)
            out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
        return tuple(out)

    def to_dict(self) -> dict:
        """The rules-file form of this layout (see `load_layout`)."""
        rules = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.rules}
        return {"name": self.name, "description": self.description, "rules": rules}


_TP = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"))
# Pipeline stages: the stacked layer axis splits into contiguous blocks, stage p holding layers
# [p L/P, (p+1) L/P) and their KV (Orca §4.3, inter-layer parallelism; sharding/pipeline.py).
# The engine always runs a `pipeline` axis as stages (see `pipelined`); the rule is spelled out
# here so that `orca-jax plan` and the rules files read the same as what runs.
_PP = (("layers", "pipeline"),)

LAYOUTS: dict[str, Layout] = {
    "replicated": Layout("replicated", (), "every device holds everything (data parallel only)"),
    # Megatron-LM tensor parallelism (Shoeybi et al. 2019, §3): QKV columns and MLP-in columns
    # split by head / hidden unit, out-projections split by rows, so each block needs one
    # all-reduce after attention and one after the MLP. The (tied) embedding splits by vocab.
    # The KV buffer splits by head like the QKV projection, so attention needs no collective.
    "megatron": Layout("megatron", _TP + (("vocab", "tensor"),) + _PP,
                       "Megatron tensor parallelism over `tensor` (heads, MLP, vocab); layers over `pipeline`"),
    # Same without splitting the embedding: no all-reduce after the token lookup and no
    # all-gather of the [R, V] logits before sampling, at the cost of V*D bytes on every device.
    "megatron-vocab-replicated": Layout(
        "megatron-vocab-replicated", _TP + _PP,
        "Megatron over `tensor` but the embedding / LM head replicated; layers over `pipeline`"),
    # Small models: every device holds all the weights and a share of the KV pages, so the
    # batch can grow with the number of devices. Every device still computes every row
    # (activations are not split); the per-page KV reads become local masked gathers plus an
    # all-reduce of the gathered page (GSPMD), so this trades link traffic for KV memory.
    "slots": Layout("slots", (("pages", ("data", "tensor")),),
                    "weights replicated; KV pages split over `data` x `tensor`"),
}


def pipelined(layout: str | Layout) -> Layout:
    """`layout` as the engine runs it on a mesh with a `pipeline` axis: layers split into
    stages over it whatever the layout's own rule for "layers" (the other rules then place
    each stage's arrays on its sub-mesh)."""
    layout = get_layout(layout)
    rules = tuple(r for r in layout.rules if r[0] != "layers")
    return dataclasses.replace(layout, rules=_PP + rules)


def get_layout(layout: str | Path | Layout) -> Layout:
    """A shipped layout by name, a `Layout`, or a rules file (``*.json`` / ``*.toml``)."""
    if isinstance(layout, Layout):
        return layout
    key = str(layout)
    if key in LAYOUTS:
        return LAYOUTS[key]
    if key.endswith((".json", ".toml")) or Path(key).is_file():
        return load_layout(key)
    raise ValueError(f"unknown layout {key!r}; known: {sorted(LAYOUTS)}, or a path to a "
                     ".json/.toml rules file (see docs/distributed.md)")


_FILE_KEYS = {"name", "description", "base", "rules"}


def layout_from_dict(d: Mapping, default_name: str = "custom") -> Layout:
    """A Layout from the rules-file form::

        {"name": "my-layout", "base": "megatron", "description": "...",
         "rules": {"vocab": null, "pages": "data", "mlp": ["tensor", "data"]}}

    `base` (optional) starts from a shipped layout's rules; `rules` then add to or override
    them, one entry per logical axis: a mesh axis name, a list of them, or null / an empty
    list (replicated; TOML has no null).
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"a layout must be a table/object, got {type(d).__name__}")
    extra = set(d) - _FILE_KEYS
    if extra:
        raise ValueError(f"unknown layout keys {sorted(extra)}; allowed: {sorted(_FILE_KEYS)}")
    rules: dict[str, MeshAxes] = {}
    if d.get("base") is not None:
        if d["base"] not in LAYOUTS:
            raise ValueError(f"layout base {d['base']!r} is not a shipped layout: {sorted(LAYOUTS)}")
        rules.update(LAYOUTS[d["base"]].rules)
    given = d.get("rules", {})
    if not isinstance(given, Mapping):
        raise ValueError("layout 'rules' must map logical axis -> mesh axis, list of mesh axes, or null")
    for logical, axes in given.items():
        if logical == "slots":
            raise ValueError("the KV logical axis 'slots' is now 'pages' (the KV cache is paged, "
                             "docs/kv-cache.md): rename it in the layout rules")
        if logical not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {logical!r} in layout rules; known: {sorted(LOGICAL_AXES)}")
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            names = axes
        elif axes is None or isinstance(axes, str):
            names = () if axes is None else (axes,)
        else:
            raise ValueError(f"rule for {logical!r} must be a mesh axis name, a list of them, or null; got {axes!r}")
        for a in names:
            if not isinstance(a, str) or not re.fullmatch(r"[A-Za-z_]\w*", a):
                raise ValueError(f"mesh axis {a!r} (rule for {logical!r}) is not an identifier")
        if len(set(names)) != len(names):
            raise ValueError(f"rule for {logical!r} names a mesh axis twice: {axes!r}")
        rules[logical] = axes
    name = d.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ValueError(f"layout name must be a non-empty string, got {name!r}")
    return Layout(name, tuple(rules.items()), str(d.get("description", "")))


def load_layout(path: str | Path) -> Layout:
    """A Layout from a JSON or TOML rules file (format: `layout_from_dict`)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"layout file {p} does not exist")
    text = p.read_text()
    try:
        d = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"layout file {p} is not valid {p.suffix.lstrip('.').upper() or 'JSON'}: {e}") from e
    try:
        return layout_from_dict(d, default_name=p.stem)
    except ValueError as e:
        raise ValueError(f"layout file {p}: {e}") from e


def spec_for(logical_axes: tuple[str | None, ...], layout: str | Layout, mesh: jax.sharding.Mesh,
             shape: tuple[int, ...] | None = None) -> jax.P:
    """PartitionSpec for an array whose dimensions have `logical_axes` (and `shape`, if known)."""
    return jax.P(*get_layout(layout).resolve(logical_axes, dict(mesh.shape), shape))


def param_shardings(config, mesh: jax.sharding.Mesh, layout: str | Layout) -> dict:
    """Tree of `NamedSharding` matching the params tree (the family's `param_axes`)."""
    layout = get_layout(layout)
    model = family(config)
    shapes = model.abstract_params(config)
    return jax.tree.map(
        lambda axes, a: jax.NamedSharding(mesh, spec_for(axes, layout, mesh, a.shape)),
        model.param_axes(config), shapes, is_leaf=lambda x: isinstance(x, tuple))
