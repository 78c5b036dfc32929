"""Device meshes from a short spec string: ``"data=1,tensor=4,pipeline=1"``.

Axes are `Auto` (the compiler may choose intermediate shardings) because the parameters and
the KV buffer carry explicit `NamedSharding`s from a layout, and activations are constrained
only at a few named boundaries (STYLE.md, principle 4). `jax.make_mesh` defaults to Explicit
axes since JAX 0.9, so the axis types are passed on purpose.
"""
from __future__ import annotations

import math

import jax


def parse_mesh_spec(spec: str | dict[str, int]) -> dict[str, int]:
    """``"data=1,tensor=4"`` or ``{"data": 1, "tensor": 4}`` -> ordered {axis: size}."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, size = part.partition("=")
            if not sep or not size.strip().isdigit():
                raise ValueError(f"bad mesh axis {part!r} in {spec!r}; expected name=size, e.g. 'tensor=4'")
            items.append((name.strip(), int(size)))
    axes: dict[str, int] = {}
    for name, size in items:
        if not name.isidentifier():
            raise ValueError(f"mesh axis name {name!r} is not an identifier")
        if name in axes:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        if int(size) < 1:
            raise ValueError(f"mesh axis {name!r} must have size >= 1, got {size}")
        axes[name] = int(size)
    if not axes:
        raise ValueError(f"empty mesh spec {spec!r}")
    return axes


def make_mesh(spec: str | dict[str, int], devices=None) -> jax.sharding.Mesh:
    """A mesh over the first prod(sizes) of `devices` (default: all of `jax.devices()`).

    Using fewer devices than exist is allowed (e.g. ``tensor=4`` on an 8-device host, or a
    1-device mesh); asking for more is an error.
    """
    axes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(axes.values())
    if n > len(devices):
        raise ValueError(f"mesh {spec!r} needs {n} devices but only {len(devices)} are available")
    return jax.make_mesh(tuple(axes.values()), tuple(axes), devices=devices[:n],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def single_device_mesh(device=None) -> jax.sharding.Mesh:
    """A 1-device mesh (all axes size 1), so a single device uses the same NamedSharding path."""
    return make_mesh("data=1", devices=[device or jax.devices()[0]])
