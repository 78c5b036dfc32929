"""Device meshes from a short spec string: ``"data=1,tensor=4,pipeline=1"``.

Device placement follows communication volume, not the order the axes are written in: the
`tensor` axis varies fastest (its groups are neighbouring devices, i.e. one host / NVLink
domain: two all-reduces per layer), `pipeline` slowest (one activation hand-off per stage and
iteration, the one that may cross hosts), other axes in between in the order given. So
``tensor=8,pipeline=2`` on two 8-GPU hosts puts each tensor group inside a host either way.
`physical_order` is that rule in pure Python; `orca-jax plan` uses it to pick each axis's link.

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


OUTERMOST, INNERMOST = "pipeline", "tensor"


def physical_order(axes: dict[str, int]) -> list[str]:
    """Axis names from slowest- to fastest-varying device index (see the module docstring)."""
    names = list(axes)
    return ([a for a in names if a == OUTERMOST] + [a for a in names if a not in (OUTERMOST, INNERMOST)]
            + [a for a in names if a == INNERMOST])


def axis_span(axes: dict[str, int], axis: str) -> int:
    """How many consecutive devices one group of `axis` spans: stride x size, where the stride
    is the product of the sizes of the axes that vary faster."""
    order = physical_order(axes)
    return math.prod(axes[a] for a in order[order.index(axis):])


def make_mesh(spec: str | dict[str, int], devices=None) -> jax.sharding.Mesh:
    """A mesh over the first prod(sizes) of `devices` (default: all of `jax.devices()`).

    Using fewer devices than exist is allowed (e.g. ``tensor=4`` on an 8-device host, or a
    1-device mesh); asking for more is an error. Axis names keep the order of `spec`; devices
    are laid out by `physical_order`.
    """
    axes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(axes.values())
    if n > len(devices):
        raise ValueError(f"mesh {spec!r} needs {n} devices but only {len(devices)} are available"
                         + (f" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={n} in the "
                            "environment gives that many virtual devices)"
                            if devices and devices[0].platform == "cpu" else ""))
    order = physical_order(axes)
    # jax.make_mesh keeps any topology-aware device ordering (TPU rings); then present the
    # axes in the order the spec gave them.
    phys = jax.make_mesh(tuple(axes[a] for a in order), tuple(order), devices=devices[:n])
    grid = phys.devices.transpose([order.index(a) for a in axes])
    return jax.sharding.Mesh(grid, tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def single_device_mesh(device=None) -> jax.sharding.Mesh:
    """A 1-device mesh (all axes size 1), so a single device uses the same NamedSharding path."""
    return make_mesh("data=1", devices=[device or jax.devices()[0]])
