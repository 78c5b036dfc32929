"""Pipeline stages (Orca's inter-layer parallelism, §4.3): the mesh's `pipeline` axis cut into
sub-meshes, each holding a contiguous block of layers.

    mesh tensor=2,pipeline=2 (4 devices)   ->   stage 0: layers [0, L/2) on a tensor=2 sub-mesh
                                                stage 1: layers [L/2, L) on the other tensor=2 sub-mesh

Stage 0 also holds the embeddings, the last stage the final LayerNorm and the (tied) LM head and
samples; the layout's rules place each stage's arrays on its own sub-mesh (tensor parallelism
inside a stage). The engine runs one jitted program per stage and hands the [T, D] activations
from stage to stage with a device-to-device copy. JAX dispatch is asynchronous, so while stage
1 runs iteration N, stage 0 can already run iteration N+1: the scheduler keeps `n_stages`
iterations in flight, each with different requests (a request's next token depends on its
previous one), which is what keeps the stages busy without micro-batching one iteration.

A mesh without a `pipeline` axis (or with pipeline=1) is one stage holding everything.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from ..models import family

PIPELINE = "pipeline"


@dataclasses.dataclass(frozen=True)
class Stage:
    mesh: jax.sharding.Mesh     # the sub-mesh: the full mesh's axes without `pipeline`
    layers: tuple[int, int]     # [start, stop) of the model's layers
    first: bool                 # holds the embeddings
    last: bool                  # holds ln_f + the LM head, and samples

    @functools.cached_property  # asked for on every iteration
    def replicated(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.P())


def num_stages(mesh: jax.sharding.Mesh) -> int:
    return dict(mesh.shape).get(PIPELINE, 1)


def split_stages(mesh: jax.sharding.Mesh, n_layer: int) -> list[Stage]:
    """One Stage per index of the `pipeline` axis, layers split evenly."""
    n = num_stages(mesh)
    if n_layer % n:
        raise ValueError(f"the model's {n_layer} layers do not split evenly into pipeline={n} stages")
    if n == 1:
        return [Stage(mesh, (0, n_layer), True, True)]
    axis = mesh.axis_names.index(PIPELINE)
    names = tuple(a for a in mesh.axis_names if a != PIPELINE)
    per = n_layer // n
    stages = []
    for p in range(n):
        devices = np.take(mesh.devices, p, axis=axis)
        sub = jax.sharding.Mesh(devices, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
        stages.append(Stage(sub, (p * per, (p + 1) * per), p == 0, p == n - 1))
    return stages


def stage_keys(stage: Stage, config) -> tuple[str, ...]:
    """Top-level params a stage holds: its layers, plus the embeddings (first) and the final
    norm and LM head (last), as the model's family says; a 1-stage model holds all."""
    return family(config).stage_keys(config, stage.first, stage.last)


def _layers_key(config) -> str:
    return family(config).LAYERS


def stage_params(params: dict, stage: Stage, config) -> dict:
    """The part of the params tree one stage holds (its layers sliced out of the stack)."""
    a, b = stage.layers
    layers = _layers_key(config)
    return {k: jax.tree.map(lambda x: x if (a, b) == (0, len(x)) else x[a:b], params[k]) if k == layers else params[k]
            for k in stage_keys(stage, config)}


def local_stages(stages: list[Stage]) -> list[Stage]:
    """The stages this process runs: all of them in one process, or when one stage spans every
    process (tensor parallelism across processes: SPMD); its own stage when the pipeline is
    split over processes, one stage per process. Only 2 such stages are supported: the
    activations go from process 0 to process 1 over the leader's control connection."""
    if jax.process_count() == 1 or len(stages) == 1:
        return stages
    owners = [{d.process_index for d in st.mesh.devices.flat} for st in stages]
    if len(stages) != 2 or any(len(o) != 1 for o in owners) or owners[0] == owners[1]:
        raise ValueError(
            f"pipeline stages over {jax.process_count()} processes: each stage must be the "
            f"devices of exactly one process and there must be 2 stages (got "
            f"{[sorted(o) for o in owners]}); e.g. --mesh tensor=K,pipeline=2 with 2 processes "
            "of K devices each, or use tensor axes across processes")
    return [st for st, o in zip(stages, owners) if jax.process_index() in o]


def local_stage_params(params: dict, stage: Stage, shardings: dict, config) -> dict:
    """`stage_params` placed on the stage's sub-mesh by `shardings`. When the params are
    global arrays of a multi-process mesh with the layers split over `pipeline`, the shards
    this process holds are exactly its stage's: they become the stage's arrays in place."""
    keys, layers = stage_keys(stage, config), _layers_key(config)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable
           for k in keys for x in jax.tree.leaves(params[k])):
        return jax.device_put(stage_params(params, stage, config), shardings)
    a, b = stage.layers

    def local(key, x, sharding):
        shape = (b - a,) + x.shape[1:] if key == layers else x.shape
        return jax.make_array_from_single_device_arrays(shape, sharding, [s.data for s in x.addressable_shards])

    return {k: jax.tree.map(functools.partial(local, k), params[k], shardings[k]) for k in keys}
