"""Several processes, one global mesh: a prototype of multi-host serving (JAX multi-controller).

Every process runs `jax.distributed.initialize`, sees all processes' devices in
`jax.devices()`, builds the same `make_mesh(...)` over them and the same `Engine`; each jitted
step then runs as one SPMD program across processes (collectives over NCCL on GPU, gloo on
CPU). What must stay identical in every process is the *sequence of steps*. DESIGN.md has
process 0 broadcast each StepPlan; this prototype broadcasts less: process 0's new requests
(id, prompt ids, sampling params) before each iteration, and every process's scheduler —
deterministic: FCFS, the same budgets, seeds drawn from the same `EngineConfig.seed` — then
makes the same decisions. `lockstep_step` is that loop body.

Aborts (a client went away: host timing) are broadcast the same way. Not built: the servers on
process 0 feeding this loop, the CLI / launch wiring, failure handling. Tested on one machine with 2 processes x 2 virtual CPU
devices (tests/test_multihost.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

LEADER = 0


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize` (coordinator "host:port" of process 0), with gloo as the
    CPU collectives so CPU-only runs (tests, laptops) work across processes. Call it before
    anything touches a device."""
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def is_leader() -> bool:
    return jax.process_index() == LEADER


def broadcast_json(obj=None):
    """Process 0's JSON-able `obj` in every process (other processes' arguments are ignored).

    Two collectives: the length, then the UTF-8 bytes padded to it."""
    data = json.dumps(obj).encode() if is_leader() else b""
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    buf = np.zeros(n, np.uint8)
    if is_leader():
        buf[:] = np.frombuffer(data, np.uint8)
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(buf)).decode())


def lockstep_step(engine, arrivals: Sequence[tuple[str, list[int], object]] = (),
                  aborts: Sequence[str] = ()):
    """One engine iteration in every process. Process 0's `arrivals` (request id, prompt ids,
    SamplingParams) join, and its `aborts` (request ids) leave, every process's engine first;
    other processes' arguments are ignored. Returns this process's outputs (the same in every
    process)."""
    from ..request import SamplingParams

    msg = None
    if is_leader():
        msg = {"add": [[rid, [int(t) for t in ids], dataclasses.asdict(p)] for rid, ids, p in arrivals],
               "abort": list(aborts)}
    msg = broadcast_json(msg)
    for rid in msg["abort"]:
        engine.abort(rid)
    for rid, ids, params in msg["add"]:
        engine.add_request(ids, SamplingParams(**params), request_id=rid)
    return engine.step()
