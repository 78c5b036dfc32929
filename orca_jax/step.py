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

Legend: T = Td + Tp rows, R sampling rows, S slots, M slot length, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .models import attention, gpt2
from .models.attention import AttnMeta, KVCache
from .models.gpt2 import GPTConfig
from .plan import BLOCK, StepPlan
from .sampling import SampleOutput, SamplingTensors, sample

assert BLOCK == attention.BLOCK, "orca_jax.plan.BLOCK and models.attention.BLOCK must agree"


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["kv", "last_token", "history"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DeviceState:
    """Everything a step updates in place (donated): allocated once at start-up."""

    kv: KVCache                   # [L, S, H, M, K] x 2 (a stage: its own L' layers)
    last_token: jax.Array | None  # [S] int32: the latest sampled token of each slot (last stage)
    history: jax.Array | None     # [S, M] int32: prompt + output ids of each slot (last stage)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["prefill_tokens", "meta", "sample_rows", "decode_tokens"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What the forward program needs: one per (Td, Tp) bucket."""

    prefill_tokens: jax.Array   # [Tp] int32
    meta: AttnMeta
    sample_rows: jax.Array      # [R] int32 rows whose logits are computed
    decode_tokens: jax.Array | None = None  # [Td] int32 from the host; None: read last_token


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["sample_slot", "sample_pos", "prompt_len", "sampling"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SampleInputs:
    """What the sampling program needs: one per R bucket."""

    sample_slot: jax.Array      # [R] int32 (S: padding, writes dropped)
    sample_pos: jax.Array       # [R] int32 position of each row's input token
    prompt_len: jax.Array       # [R] int32
    sampling: SamplingTensors


def init_device_state(num_layers, num_slots, max_len, num_heads, head_dim, dtype,
                      kv_sharding=None, other_sharding=None, slot_state: bool = True) -> DeviceState:
    """A stage's state; only the last (sampling) stage keeps `last_token` and `history`."""
    kv = KVCache.zeros(num_layers, num_slots, max_len, num_heads, head_dim, dtype, kv_sharding)
    if not slot_state:
        return DeviceState(kv=kv, last_token=None, history=None)
    zeros = lambda shape: jax.jit(lambda: jnp.zeros(shape, jnp.int32), out_shardings=other_sharding)()
    return DeviceState(kv=kv, last_token=zeros((num_slots,)), history=zeros((num_slots, kv.max_len)))


def run_step(config: GPTConfig, params: dict, state: DeviceState, inp: StepInputs,
             x: jax.Array | None = None, *, first: bool = True,
             last: bool = True) -> tuple[DeviceState, jax.Array]:
    """One stage of the model over one iteration's rows (the whole model if `first` and
    `last`). Returns the updated state and the activations [T, D] for the next stage, or, on
    the last stage, the logits [R, V] f32 of the sampling rows."""
    meta = inp.meta
    td = meta.num_decode
    if first:
        # Decode rows feed the token sampled for their slot by an earlier step (padding: slot
        # S, clipped: its row is never read).
        dec_tokens = (inp.decode_tokens if inp.decode_tokens is not None
                      else jnp.take(state.last_token, meta.slot[:td], mode="clip"))
        tokens = jnp.concatenate([dec_tokens, inp.prefill_tokens])               # [T]
        x = gpt2.embed(params, tokens, meta.pos)                                   # [T, D]
    x, kv = gpt2.decoder(config, params["h"], x, state.kv, meta)                  # [T, D]
    if not last:
        return dataclasses.replace(state, kv=kv), x
    logits = gpt2.lm_head(config, params, x[inp.sample_rows])                     # [R, V] f32
    # Prompt tokens into the history (decode rows' tokens were written when they were sampled).
    history = state.history.at[meta.slot[td:], meta.pos[td:]].set(inp.prefill_tokens, mode="drop")
    return DeviceState(kv=kv, last_token=state.last_token, history=history), logits


def run_sample(state: DeviceState, logits: jax.Array,
               inp: SampleInputs) -> tuple[DeviceState, SampleOutput]:
    """Sample one token per row and record it as its slot's next input token."""
    out = sample(logits, inp.sampling, state.history, inp.sample_slot, inp.prompt_len, inp.sample_pos + 1)
    last_token = state.last_token.at[inp.sample_slot].set(out.ids, mode="drop")
    history = state.history.at[inp.sample_slot, inp.sample_pos + 1].set(out.ids, mode="drop")
    return DeviceState(kv=state.kv, last_token=last_token, history=history), out


def device_put_inputs(plan: StepPlan, sampling: SamplingTensors | None,
                      sharding=None) -> tuple[StepInputs, SampleInputs | None]:
    """One host-to-device transfer of every array of the step's inputs (to one stage; the
    sampling inputs only where `sampling` is given: the last stage)."""
    meta = AttnMeta(slot=plan.slot, pos=plan.pos, seg=plan.seg, dec_blocks=plan.dec_blocks,
                    hist_seg=plan.hist_seg, hist_slot=plan.hist_slot, hist_len=plan.hist_len,
                    hist_blocks=plan.hist_blocks, num_decode=plan.num_decode)
    inputs = (StepInputs(plan.prefill_tokens, meta, plan.sample_rows, plan.decode_tokens),
              None if sampling is None else
              SampleInputs(plan.sample_slot, plan.sample_pos, plan.prompt_len, sampling))
    leaves, treedef = jax.tree.flatten(inputs)
    leaves = jax.device_put([np.asarray(x) for x in leaves], sharding)
    return jax.tree.unflatten(treedef, leaves)
