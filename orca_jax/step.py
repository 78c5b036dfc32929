"""The selective-batching step: one jit-compiled program per (Td, Tp) bucket shape.

`run_step` is a pure function over explicit pytrees: model parameters, the donated
`DeviceState` (KV buffer, last sampled token and token history of every slot) and one
iteration's `StepInputs`. Every weight-bearing op runs once on the flattened [T, D] rows; only
attention is split per request (models/attention.py); the LM head runs only on the rows that
sample; sampling happens here, on device, so only the sampled ids (and optional logprobs)
travel back to the host.

Decode rows read their input token from `last_token[slot]` on device, written by the
iteration that sampled it: the host can schedule and dispatch iteration N+1 before it has
read iteration N's tokens back (JAX dispatch is asynchronous).

Legend: T = Td + Tp rows, R sampling rows, S slots, M slot length, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models import attention
from .models.attention import AttnMeta, KVCache
from .plan import BLOCK, StepPlan
from .sampling import SampleOutput, SamplingTensors, sample

assert BLOCK == attention.BLOCK, "orca_jax.plan.BLOCK and models.attention.BLOCK must agree"


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["kv", "last_token", "history"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DeviceState:
    """Everything a step updates in place (donated): allocated once at start-up."""

    kv: KVCache              # [L, S, M, H, K] x 2
    last_token: jax.Array    # [S] int32: the latest sampled token of each slot
    history: jax.Array       # [S, M] int32: prompt + output ids of each slot (for penalties)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["prefill_tokens", "meta", "sample_rows", "sample_slot", "sample_pos",
                 "prompt_len", "sampling"],
    meta_fields=[])
@dataclasses.dataclass(frozen=True)
class StepInputs:
    prefill_tokens: jax.Array   # [Tp] int32
    meta: AttnMeta
    sample_rows: jax.Array      # [R] int32
    sample_slot: jax.Array      # [R] int32 (S: padding)
    sample_pos: jax.Array       # [R] int32
    prompt_len: jax.Array       # [R] int32
    sampling: SamplingTensors

    @staticmethod
    def from_plan(plan: StepPlan, sampling: SamplingTensors) -> "StepInputs":
        meta = AttnMeta(slot=plan.slot, pos=plan.pos, seg=plan.seg, dec_blocks=plan.dec_blocks,
                        hist_seg=plan.hist_seg, hist_slot=plan.hist_slot, hist_len=plan.hist_len,
                        hist_blocks=plan.hist_blocks, num_decode=plan.num_decode)
        return StepInputs(prefill_tokens=plan.prefill_tokens, meta=meta, sample_rows=plan.sample_rows,
                          sample_slot=plan.sample_slot, sample_pos=plan.sample_pos,
                          prompt_len=plan.prompt_len, sampling=sampling)


def init_device_state(num_layers, num_slots, max_len, num_heads, head_dim, dtype,
                      kv_sharding=None) -> DeviceState:
    kv = KVCache.zeros(num_layers, num_slots, max_len, num_heads, head_dim, dtype, kv_sharding)
    return DeviceState(kv=kv, last_token=jnp.zeros((num_slots,), jnp.int32),
                       history=jnp.zeros((num_slots, max_len), jnp.int32))


def run_step(graphdef: nnx.GraphDef, params: nnx.State, state: DeviceState,
             inp: StepInputs) -> tuple[DeviceState, SampleOutput]:
    model = nnx.merge(graphdef, params)
    meta = inp.meta
    td = meta.num_decode
    # Decode rows feed the token sampled for their slot by an earlier step (padding: slot S,
    # clipped: its row is never read).
    dec_tokens = jnp.take(state.last_token, meta.slot[:td], mode="clip")
    tokens = jnp.concatenate([dec_tokens, inp.prefill_tokens])                   # [T]
    hidden, kv = model(tokens, meta.pos, state.kv, meta)                          # [T, D]
    logits = model.logits(hidden[inp.sample_rows])                                # [R, V] f32

    history = state.history.at[meta.slot, meta.pos].set(tokens, mode="drop")
    rows_history = jnp.take(history, inp.sample_slot, axis=0, mode="clip")       # [R, M]
    out = sample(logits, inp.sampling, rows_history, inp.prompt_len, inp.sample_pos + 1)

    last_token = state.last_token.at[inp.sample_slot].set(out.ids, mode="drop")
    history = history.at[inp.sample_slot, inp.sample_pos + 1].set(out.ids, mode="drop")
    return DeviceState(kv=kv, last_token=last_token, history=history), out


def device_put_inputs(plan: StepPlan, sampling: SamplingTensors, sharding=None) -> StepInputs:
    """One host-to-device transfer of every array of the step's inputs."""
    inp = StepInputs.from_plan(plan, sampling)
    leaves, treedef = jax.tree.flatten(inp)
    leaves = jax.device_put([np.asarray(x) for x in leaves], sharding)
    return jax.tree.unflatten(treedef, leaves)
