"""The devices a simulation runs on: the vendor presets of `orca-jax plan` and this machine.

The GPU presets are `sharding/plan.py`'s `ACCELERATORS` (A100-40GB, A100-80GB, H100, H200:
datasheet peak dense bf16/fp16 and TF32 FLOP/s, HBM bandwidth, NVLink per GPU each way, one
NIC per GPU between nodes), used as they are: one table of vendor numbers in the project.

`cpu-here` is this machine, built from ceilings measured now, the way `orca-jax bench latency`
measures them (bench/decode_step.py `ceilings`: a jitted sum over 1 GiB for read bandwidth, a
jitted 2048^3 matmul at the precision the engine runs the dtype at). It has one device: a CPU
mesh's virtual devices share the same cores, so splitting a model over them buys nothing.
"""
from __future__ import annotations

import os

from ..sharding.plan import ACCELERATORS, Accelerator

CPU_HERE = "cpu-here"


def cpu_accelerator(read_bytes_per_s: float, matmul_flops: float, name: str = CPU_HERE) -> Accelerator:
    """An Accelerator for a CPU with the given measured ceilings (both dtypes at the matmul
    rate measured: the engine runs float32 on CPU). Memory: the machine's RAM."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 16 * 2**30
    # No interconnect on one device; host memory copies stand in for the links.
    return Accelerator(name, ram, read_bytes_per_s, matmul_flops, matmul_flops,
                       read_bytes_per_s, read_bytes_per_s, per_node=1)


def measure_cpu(dtype: str = "float32") -> Accelerator:
    """`cpu-here` from ceilings measured now (seconds; JAX on the CPU)."""
    import jax.numpy as jnp
    from ..bench.decode_step import ceilings
    bandwidth, flops = ceilings(jnp.dtype(dtype))
    return cpu_accelerator(bandwidth, flops)


def get_accelerator(name: str | Accelerator, measured: Accelerator | None = None) -> Accelerator:
    """A preset by name (case-insensitive), `cpu-here` (measured now unless `measured` is given),
    or an Accelerator as is."""
    if isinstance(name, Accelerator):
        return name
    key = name.lower()
    if key == CPU_HERE:
        return measured or measure_cpu()
    if key not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}; known: {', '.join([*ACCELERATORS, CPU_HERE])}")
    return ACCELERATORS[key]

