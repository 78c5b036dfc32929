"""The selective-batching step: a forward program per (Td, Tp) bucket, a sampling program per R.

`run_step` is a pure function over explicit pytrees: model parameters, the donated
`DeviceState` (KV buffer, last sampled token and token history of every slot) and one
iteration's `StepInputs`. With pipeline stages (sharding/pipeline.py) it is one stage's
program: the first embeds the tokens, each runs its own layers over its own slice of the KV
buffer, the last computes the logits; activations [T, D] go from stage to stage. Every weight-bearing op runs once on the flattened [T, D] rows; only
attention is split per request (models/attention.py); the LM head runs only on the rows that
sample; sampling happens on device (a second program, shared by every shape with the same R), so only the sampled ids (and optional logprobs)
travel back to the host.

Decode rows read their input token from `last_token[slot]` on device, written by the
iteration that sampled it: the host can schedule and dispatch iteration N+1 before it has
read iteration N's tokens back (JAX dispatch is asynchronous). Pipelined engines instead send
decode tokens from the host (`StepInputs.decode_tokens`): a stage-0 read of the last stage's
`last_token` would wait for the previous iteration and serialize the stages.

Legend: T = Td + Tp rows, R sampling rows, S sequence slots, M positions per sequence, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .models import cpu_kernels, family
from .models.attention import KVCache
from .plan import PagedKV, SampleInputs, SamplingTensors, StepInputs, StepPlan
from .sampling import SampleOutput, masked_argmax, sample

jax.tree_util.register_dataclass(StepInputs)  # defined with the plan, host side (no JAX there)
jax.tree_util.register_dataclass(SampleInputs)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["kv", "last_token", "history"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DeviceState:
    """Everything a step updates in place (donated): allocated once at start-up."""

    kv: KVCache | None            # L x [H, P, B, K] x 2 (a stage: its own L' layers); None in
                                  # what the sampling program takes (runner.py `_slot_state`)
    last_token: jax.Array | None  # [S] int32: the latest sampled token of each slot (last stage)
    history: jax.Array | None     # [S, M] int32: prompt + output ids of each slot (last stage)


def init_device_state(num_layers, kv: PagedKV, num_slots, num_kv_heads, head_dim, dtype,
                      kv_sharding=None, other_sharding=None, slot_state: bool = True) -> DeviceState:
    """A stage's state; only the last (sampling) stage keeps `last_token` and `history`
    (per sequence slot: S rows of M = W * B positions)."""
    pages = KVCache.zeros(num_layers, kv.num_pages, kv.page_size, num_kv_heads, head_dim, dtype, kv_sharding)
    if not slot_state:
        return DeviceState(kv=pages, last_token=None, history=None)
    zeros = lambda shape: jax.jit(lambda: jnp.zeros(shape, jnp.int32), out_shardings=other_sharding)()
    return DeviceState(kv=pages, last_token=zeros((num_slots,)),
                       history=zeros((num_slots, kv.max_pages * kv.page_size)))


def runtime_params(config, params: dict, matmul: str = "xla") -> dict:
    """The params as `run_step` takes them: the stacked layers (every leaf [L', ...], as
    checkpoints store them and layouts place them) split once into L' per-layer arrays, each
    keeping its sharding of the other axes. With `matmul` "cpu" every dense layer weight and
    the LM head's table are packed for the C++ kernel (models/cpu_kernels.py), one weight at a
    time, replacing the array (no second copy), and every norm's params become NormWeights
    (the norm kernel). The stacked arrays can be freed afterwards."""
    def per_layer(x):
        return jax.NamedSharding(x.sharding.mesh, jax.P(*x.sharding.spec[1:]))

    model = family(config)
    layers = params[model.LAYERS]
    n = jax.tree.leaves(layers)[0].shape[0]
    shardings = [jax.tree.map(per_layer, layers)] * n
    params = {**params, model.LAYERS: jax.jit(model.unstack_layers, out_shardings=shardings)(layers)}
    return _pack_weights(model, config, params) if matmul == "cpu" else params


_pack = jax.jit(cpu_kernels.pack, static_argnums=1)


def _pack_weights(model, config, params: dict) -> dict:
    """`params` with the layers' dense weights and the LM head table (on this stage) packed,
    and every norm's params as the norm kernel takes them."""
    as_norm = lambda p: cpu_kernels.NormWeights(p["scale"], p.get("bias"))  # noqa: E731
    layers = []
    for layer in params[model.LAYERS]:
        for path, n_in in model.LINEAR_INPUTS.items():
            layer = _replace(layer, (*path, "kernel"), _pack, n_in)
        for path in model.LAYER_NORMS:
            layer = _replace(layer, path, as_norm)
        layers.append(layer)
    params = _replace(params, model.head_key(config), lambda table: _pack(table.T, 1))
    params = _replace(params, model.FINAL_NORM, as_norm)
    return {**params, model.LAYERS: layers}


def _replace(tree: dict, path: tuple[str, ...], fn, *args) -> dict:
    """`tree` with the leaf at `path` replaced by fn(leaf, *args); as is where there is none
    (an MLP without a gate; a pipeline stage without the LM head)."""
    key, *rest = path
    if key not in tree:
        return tree
    return {**tree, key: _replace(tree[key], tuple(rest), fn, *args) if rest else fn(tree[key], *args)}


def run_step(config, params: dict, state: DeviceState, inp: StepInputs,
             x: jax.Array | None = None, *, first: bool = True, last: bool = True,
             attention: str = "xla") -> tuple[DeviceState, jax.Array]:
    """One stage of the model over one iteration's rows (the whole model if `first` and
    `last`), `params` as `runtime_params` returns them. Returns the updated state and the
    activations [T, D] for the next stage, or, on the last stage, the logits [R, V] f32 of
    the sampling rows."""
    meta = inp.meta
    td = meta.num_decode
    model = family(config)  # models/: the config's architecture
    if first:
        # Decode rows feed the token sampled for their slot by an earlier step (padding: slot
        # S, clipped: its row is never read).
        dec_tokens = (inp.decode_tokens if inp.decode_tokens is not None
                      else jnp.take(state.last_token, meta.slot[:td], mode="clip"))
        tokens = jnp.concatenate([dec_tokens, inp.prefill_tokens])               # [T]
        x = model.embed(config, params, tokens, meta.pos)                          # [T, D]
    x, kv = model.decoder(config, params[model.LAYERS], x, state.kv, meta, attention)  # [T, D]
    if not last:
        return dataclasses.replace(state, kv=kv), x
    logits = model.lm_head(config, params, x[inp.sample_rows])                    # [R, V] f32
    # Prompt tokens into the history (decode rows' tokens were written when they were sampled).
    history = state.history.at[meta.slot[td:], meta.pos[td:]].set(inp.prefill_tokens, mode="drop")
    return DeviceState(kv=kv, last_token=state.last_token, history=history), logits


def run_sample(state: DeviceState, logits: jax.Array, inp: SampleInputs,
               variant: str | None = None, argmax=masked_argmax) -> tuple[DeviceState, SampleOutput]:
    """Sample one token per row (`variant`, `argmax`: see `sampling.sample`) and record it as
    its slot's next input token. `state.kv` is not read: the runner passes the state without
    its pages (`kv=None`), which would only pass through (24 donated arrays more to dispatch
    for GPT-2)."""
    out = sample(logits, inp.sampling, state.history, inp.sample_slot, inp.prompt_len,
                 inp.sample_pos + 1, variant, argmax)
    last_token = state.last_token.at[inp.sample_slot].set(out.ids, mode="drop")
    history = state.history.at[inp.sample_slot, inp.sample_pos + 1].set(out.ids, mode="drop")
    return DeviceState(kv=state.kv, last_token=last_token, history=history), out


@dataclasses.dataclass(frozen=True)
class Packing:
    """Where each input array of a step lives in its two packed buffers: static (hashable),
    one per bucket shape, so it is a static argument of the jitted programs. Integer and
    boolean arrays travel as int32 (uint32 bit for bit), float32 arrays as float32: a step's
    ~27 small inputs cost two host-to-device transfers instead of 27 (≈ 25 µs each), which
    the jitted programs' dispatch makes from the numpy arrays (runner.py `_jit_programs`)."""

    treedef: jax.tree_util.PyTreeDef
    leaves: tuple[tuple[str, tuple[int, ...], int], ...]  # (dtype, shape, offset) per leaf

    def unpack(self, ints: jax.Array, floats: jax.Array):
        """Inside the program: the input pytree back from `ints` [I] i32 and `floats` [F] f32."""
        out = []
        for dtype, shape, offset in self.leaves:
            buf = floats if dtype == "float32" else ints
            x = jax.lax.slice_in_dim(buf, offset, offset + math.prod(shape)).reshape(shape)
            if dtype == "bool":
                x = x != 0
            elif dtype == "uint32":
                x = jax.lax.bitcast_convert_type(x, jnp.uint32)
            out.append(x)
        return jax.tree.unflatten(self.treedef, out)


_DTYPE_NAMES = {np.dtype(n): n for n in ("float32", "int32", "uint32", "bool")}  # dtype.name is slow


def pack(tree) -> tuple[np.ndarray, np.ndarray, Packing]:
    """Host side: a pytree of numpy arrays -> (ints [I] i32, floats [F] f32, its Packing)."""
    leaves, treedef = jax.tree.flatten(tree)
    ints, floats, spec, n_int, n_float = [], [], [], 0, 0
    for x in leaves:
        x = np.asarray(x)
        dtype = _DTYPE_NAMES.get(x.dtype) or x.dtype.name
        if dtype == "float32":
            spec.append((dtype, x.shape, n_float))
            floats.append(x.ravel())
            n_float += x.size
        else:
            assert dtype in ("int32", "uint32", "bool"), f"cannot pack a {dtype} step input"
            spec.append((dtype, x.shape, n_int))
            ints.append(x.ravel().view(np.int32) if dtype == "uint32" else x.ravel().astype(np.int32))
            n_int += x.size
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)
    return cat(ints, np.int32), cat(floats, np.float32), Packing(treedef, tuple(spec))


def pack_inputs(plan: StepPlan, sampling: SamplingTensors | None):
    """Host side, once per iteration: the forward program's inputs and (with `sampling`: on
    the process that samples) the sampling program's, each packed as (ints, floats, Packing).
    The two are packed apart so that the sampling program stays one per R bucket."""
    step = pack(plan.inputs)
    return step, None if sampling is None else pack(dataclasses.replace(plan.sample, sampling=sampling))
