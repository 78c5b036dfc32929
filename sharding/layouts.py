"""Named sharding layouts: logical axis -> mesh axis rules (levanter-style).

A parameter or buffer declares the *logical* axes of each dimension (`PARAM_AXES` in
`models/gpt2.py`, `KV_AXES` in `models/attention.py`); a `Layout` maps those names to mesh
axes. Trying a new layout is a new entry in `LAYOUTS`, never a code change in the model.

Resolution rules of `spec_for`, chosen so that every layout is valid on every mesh:
* a mesh axis missing from the mesh, or of size 1, means "replicated" for that dimension;
* a mesh axis is used at most once per array (the first dimension that asks gets it);
* a dimension whose size the mesh axis does not divide stays replicated (XLA's `NamedSharding`
  requires even tiling; e.g. GPT-2's vocab 50257 cannot split over 4 devices).
"""
from __future__ import annotations

import dataclasses

import jax

from ..models.gpt2 import PARAM_AXES, GPTConfig, abstract_params


@dataclasses.dataclass(frozen=True)
class Layout:
    """A named set of logical-axis rules."""

    name: str                                   # key in LAYOUTS, shown in logs and `plan`
    rules: tuple[tuple[str, str | None], ...]   # (logical axis, mesh axis or None); first match wins

    def mesh_axis(self, logical: str | None) -> str | None:
        for name, mesh_axis in self.rules:
            if name == logical:
                return mesh_axis
        return None


LAYOUTS: dict[str, Layout] = {
    # Every device holds everything (data parallel only).
    "replicated": Layout("replicated", ()),
    # Megatron-LM tensor parallelism (Shoeybi et al. 2019, §3): QKV columns and MLP-in columns
    # split by head / hidden unit, out-projections split by rows, so each block needs one
    # all-reduce after attention and one after the MLP. The (tied) embedding splits by vocab.
    "megatron": Layout("megatron", (("heads", "tensor"), ("kv_heads", "tensor"),
                                    ("mlp", "tensor"), ("vocab", "tensor"))),
}


def get_layout(layout: str | Layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


def spec_for(logical_axes: tuple[str | None, ...], layout: str | Layout, mesh: jax.sharding.Mesh,
             shape: tuple[int, ...] | None = None) -> jax.P:
    """PartitionSpec for an array whose dimensions have `logical_axes` (and `shape`, if known)."""
    layout = get_layout(layout)
    used: set[str] = set()
    spec = []
    for i, logical in enumerate(logical_axes):
        axis = layout.mesh_axis(logical)
        size = mesh.shape.get(axis, 1) if axis else 1
        if (axis is None or size == 1 or axis in used
                or (shape is not None and shape[i] % size)):
            spec.append(None)
        else:
            used.add(axis)
            spec.append(axis)
    return jax.P(*spec)


def param_shardings(config: GPTConfig, mesh: jax.sharding.Mesh, layout: str | Layout) -> dict:
    """Tree of `NamedSharding` matching the params tree (same structure as `PARAM_AXES`)."""
    shapes = abstract_params(config)
    return jax.tree.map(
        lambda axes, a: jax.NamedSharding(mesh, spec_for(axes, layout, mesh, a.shape)),
        PARAM_AXES, shapes, is_leaf=lambda x: isinstance(x, tuple))
