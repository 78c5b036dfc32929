"""The cost model: how long one iteration takes on a mesh of accelerators, without one.

The work of an iteration is `orca-jax plan`'s (sharding/plan.py `_iteration`, on the slowest,
last pipeline stage, per device), which is linear in four counts of the step:

    T      rows computed (decode + prefill rows, padded to the step's buckets)
    R      rows that sample (the LM head runs on these only)
    pairs  (query, key) pairs of attention per layer
    kv     KV positions read from the pages per layer

so `StepCost.build` reads its coefficients once, by evaluating the plan's estimate at a unit of
each count (one source of the arithmetic: the plan's FLOPs, bytes and collectives), and the
simulator then prices every iteration with a few multiplications:

    FLOPs = f_T T + f_R R + f_pairs pairs                       (matmuls, LM head, QK^T and PV)
    bytes = weights + b_T T + b_kv kv                           (weights, KV written, KV read)
    stage = overhead + max(FLOPs / (peak x e_compute), bytes / (bandwidth x e_memory))
            + a_kv kv  (CPU: the attention loop's cost per KV position read, beyond its bytes)
            + collectives (tensor all-reduces, vocab gathers: bytes / link bandwidth)
    interval = stage + hand-off      (a new iteration enters the pipeline this often)
    latency  = stages x stage + (stages - 1) x hand-off

The efficiencies, the attention term and the fixed overhead (`Efficiency`) are the only fitted numbers: the share
of the roofline a real step reaches (on a CPU the compute share grows with the step's rows up
to a saturation point: a GEMM of 8 rows reaches far less of the 2048^3 ceiling than one of 64), and the per-step
time no roofline term explains (host work, dispatch, kernel launches). `calibrate.py` fits them on this machine; for the GPU
presets they are assumptions (docs/simulation.md, "How far to trust it").
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from ..kv_pages import pages_for
from ..plan import Buckets
from ..scheduler import Batch
from ..sharding.plan import (DTYPE_BYTES, Accelerator, _Explain, _iteration, _parallelism, _resolve,
                             fit_kv_pages, kv_placement, param_placements)

PROBE = 1 << 20  # a unit of each count, large enough that the plan's integer divisions are exact


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """What a real step reaches of the roofline (fitted, or assumed for GPUs)."""

    compute: float = 1.0      # achieved / peak matmul FLOP/s, of steps of >= saturation_rows rows
    memory: float = 1.0       # achieved / peak bytes/s read and written
    overhead_s: float = 0.0   # fixed seconds per iteration (host, dispatch, launches)
    rows_exponent: float = 0.0  # below saturation_rows the compute share is scaled by
    saturation_rows: int = 256  # (max(T, 2) / saturation_rows) ** rows_exponent: a skinny GEMM
                                # (few rows) reaches less of a CPU's large-GEMM rate than a wide
                                # one; one row (a GEMV) runs at the two-row rate
    attention_s_per_kv: float = 0.0  # seconds per KV position read by attention, beyond its
                                     # bytes: XLA CPU's paged attention loops over pages (GPUs: 0)

    def __post_init__(self):
        if not (self.compute > 0 and self.memory > 0 and self.overhead_s >= 0 and self.rows_exponent >= 0
                and self.saturation_rows >= 1 and self.attention_s_per_kv >= 0):
            raise ValueError(f"efficiencies must be > 0, the overhead and exponent >= 0, got {self}")

    def compute_at(self, rows: int) -> float:
        """The compute share of a step of `rows` rows."""
        if not self.rows_exponent:
            return self.compute
        return self.compute * (min(max(rows, 2), self.saturation_rows) / self.saturation_rows) ** self.rows_exponent


# Assumed for the GPU presets (not fitted: no GPU here): dense GEMMs of large models reach
# about half of an A100's bf16 peak end to end and weight streaming about 70% of HBM
# bandwidth; 1 ms covers a step's launches and host work (docs/simulation.md).
GPU_EFFICIENCY = Efficiency(compute=0.5, memory=0.7, overhead_s=1e-3)


@dataclasses.dataclass(frozen=True)
class StepWork:
    """The four counts of one iteration (see the module docstring)."""

    rows: int          # T, padded
    sampled: int       # R, padded
    pairs: int         # (query, key) pairs per layer
    kv_read: int       # KV positions read per layer


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One iteration's FLOPs, bytes and communication per device on the last stage, as
    linear functions of `StepWork`, for one model on one mesh and accelerator."""

    flops_per_row: float
    flops_per_sample: float
    flops_per_pair: float
    bytes_fixed: float        # weights of the stage's layers and the LM head
    bytes_per_row: float      # KV written
    bytes_per_kv: float       # KV read
    comm_s_per_row: float     # collectives (seconds, over their links)
    comm_s_per_sample: float
    comm_s_per_kv: float
    handoff_s_per_row: float  # pipeline hand-off between two stages
    peak_flops: float         # FLOP/s at the dtype
    bandwidth: float          # bytes/s
    stages: int               # pipeline stages
    parallelism: Mapping      # what the plan reports: shards and links

    @staticmethod
    def build(config, mesh: str | Mapping[str, int], layout: str, accelerator: Accelerator,
              dtype: str = "bfloat16") -> "StepCost":
        """The coefficients of `orca-jax plan`'s estimate for this model, mesh and layout."""
        k, par = _plan_costs(config, mesh, layout, accelerator, dtype)
        ex = _Explain()
        at = lambda *counts: _iteration(k, ex, "", *counts)  # noqa: E731
        zero = at(0, 0, 0, 0)
        unit = {name: at(*(PROBE if i == j else 0 for j in range(4)))
                for i, name in enumerate(("row", "sample", "pair", "kv"))}
        slope = lambda name, key: (unit[name][key] - zero[key]) / PROBE  # noqa: E731
        return StepCost(
            flops_per_row=slope("row", "flops_per_device"), flops_per_sample=slope("sample", "flops_per_device"),
            flops_per_pair=slope("pair", "flops_per_device"), bytes_fixed=zero["bytes_per_device"],
            bytes_per_row=slope("row", "bytes_per_device"), bytes_per_kv=slope("kv", "bytes_per_device"),
            comm_s_per_row=slope("row", "comm_s"), comm_s_per_sample=slope("sample", "comm_s"),
            comm_s_per_kv=slope("kv", "comm_s"), handoff_s_per_row=slope("row", "handoff_s"),
            peak_flops=accelerator.flops_32 if DTYPE_BYTES[dtype] == 4 else accelerator.flops_16,
            bandwidth=accelerator.hbm_bw, stages=k.stages, parallelism=par)

    def flops(self, w: StepWork) -> float:
        return self.flops_per_row * w.rows + self.flops_per_sample * w.sampled + self.flops_per_pair * w.pairs

    def bytes(self, w: StepWork) -> float:
        return self.bytes_fixed + self.bytes_per_row * w.rows + self.bytes_per_kv * w.kv_read

    def stage_s(self, w: StepWork, eff: Efficiency) -> float:
        """Seconds one pipeline stage spends on the iteration."""
        compute = self.flops(w) / (self.peak_flops * eff.compute_at(w.rows))
        memory = self.bytes(w) / (self.bandwidth * eff.memory)
        comm = self.comm_s_per_row * w.rows + self.comm_s_per_sample * w.sampled + self.comm_s_per_kv * w.kv_read
        return eff.overhead_s + max(compute, memory) + eff.attention_s_per_kv * w.kv_read + comm

    def handoff_s(self, w: StepWork) -> float:
        return self.handoff_s_per_row * w.rows if self.stages > 1 else 0.0


def _plan_costs(config, mesh, layout, accelerator, dtype):
    """sharding/plan.py's view of the work split: (its _Costs, its parallelism summary)."""
    c, mesh_shape, layout, acc = _resolve(config, mesh, layout, accelerator)
    b = DTYPE_BYTES[dtype]
    params = param_placements(c, layout, mesh_shape, b)
    n_dev = 1
    for n in mesh_shape.values():
        n_dev *= n
    kvb = kv_placement(c, layout, mesh_shape, n_dev * 64, 16, b)  # only its shards are read
    return _parallelism(c, layout, mesh_shape, acc, b, params, kvb, _Explain(), [])


def kv_pages_that_fit(config, mesh, layout: str, accelerator: Accelerator, page_size: int,
                      dtype: str = "bfloat16", reserve: float = 0.1) -> int:
    """KV pages left per device after the weights, in (1 - reserve) of its memory, as
    `orca-jax plan` sizes them (sharding/plan.py `fit_kv_pages`)."""
    c, mesh_shape, lay, acc = _resolve(config, mesh, layout, accelerator)
    b = DTYPE_BYTES[dtype]
    weights = sum(p.bytes_per_device for p in param_placements(c, lay, mesh_shape, b).values())
    left = int(acc.hbm_bytes * (1 - reserve)) - weights
    if left <= 0:
        raise ValueError(f"the weights ({weights / 2**30:.1f} GiB per device) do not fit in "
                         f"{1 - reserve:.0%} of a {acc.name}'s memory: use more devices")
    return fit_kv_pages(c, lay, mesh_shape, page_size, left, b)


def step_work(batch: Batch, buckets: Buckets, page_size: int, padded_attention: bool) -> StepWork:
    """The counts of one scheduled iteration, as the device computes it: rows padded to the
    step's buckets (plan.py `build_plan`). `padded_attention`: the XLA CPU backend's work
    (every decode row loops over the step's longest context; the prefill scores are dense
    over all Tp rows); else only each row's own context (a paged-attention kernel)."""
    nd = len(batch.decodes)
    n_pre = sum(c.length for c in batch.prefills)
    tp = Buckets.pick(n_pre, buckets.prefill)
    td = buckets.decode_rows(nd, tp)
    # decode rows: the scheduler already advanced num_scheduled past the new position
    ctx = [r.num_scheduled for r in batch.decodes]
    if padded_attention:
        dec = td * pages_for(max(ctx), page_size) * page_size if ctx else 0
        pre_pairs = tp * tp
    else:
        dec = sum(ctx)
        pre_pairs = sum(c.length * (c.length + 1) // 2 for c in batch.prefills)
    hist = sum(c.start for c in batch.prefills)
    hist_pairs = sum(c.start * c.length for c in batch.prefills)
    return StepWork(rows=td + tp, sampled=buckets.num_sample_rows(td, tp),
                    pairs=dec + pre_pairs + hist_pairs, kv_read=dec + hist)
