"""`orca-jax plan`: per-device memory, communication and a roofline step time, on paper.

Pure arithmetic over a model config, a mesh shape ``{axis: size}`` and a layout: no device,
no JAX program. Parameter and KV placement come from the same `Layout.resolve` the engine uses
(sharding/layouts.py), so the per-device bytes here equal the real arrays' shards
(tests/test_plan.py checks that on virtual CPU meshes).

Model of one iteration on the slowest (last) pipeline stage, per device:

* FLOPs  = 2 x rows x (matmul weights held by the device)               [QKV, out-proj, MLP]
         + 4 x (query, key) pairs x D x layers / (layer shards x head shards)   [QK^T, PV]
         + 2 x sampled rows x V x D / vocab shards                       [LM head, last stage]
* bytes  = weights read (the stage's layers + the LM head) + KV read + KV written
* comms  = Megatron all-reduces (2 per layer of rows x D activations; ring: each device sends
           2(n-1)/n of the message, Patarasuk & Yuan 2009), the embedding all-reduce and
           logits all-gather of a vocab split, the all-reduce of gathered KV blocks of a slot
           split, and the pipeline hand-off of rows x D activations per stage boundary.
* time   = max(FLOPs / peak, bytes / HBM bandwidth) + comms / link bandwidth
           (no overlap of communication with compute: an upper bound on the roofline).

Legend: V vocab, P positions, D width, L layers, H heads, K head dim, F MLP width, S slots,
M tokens per slot, T rows of a step, R sampled rows, t/s/v/p shards of heads/slots/vocab/layers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax

from ..kv_pages import PAGE_SIZE, pages_for, pool_pages_for
from ..models.attention import KV_AXES, KVCache
from ..models import family, preset
from .layouts import Layout, MeshAxes, get_layout, pipelined
from .mesh import axis_span, parse_mesh_spec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB, GB = 2**30, 1e9


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Vendor peak numbers of one device (inputs to the roofline, not measurements)."""

    name: str
    hbm_bytes: int       # HBM capacity
    hbm_bw: float        # HBM bandwidth, bytes/s
    flops_16: float      # dense bf16/fp16 tensor-core FLOP/s
    flops_32: float      # dense TF32 tensor-core FLOP/s (XLA's default f32 matmul precision on these GPUs)
    link_bw: float       # NVLink bytes/s per direction per device, inside a node
    net_bw: float        # bytes/s per device between nodes (one NIC per GPU, DGX-style)
    per_node: int = 8    # devices per NVLink domain


ACCELERATORS = {
    # NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), SXM4 columns:
    # 40GB HBM2 at 1,555 GB/s; 80GB HBM2e at 2,039 GB/s; BF16 312 TFLOPS and TF32 156 TFLOPS
    # dense (624/312 are with sparsity); NVLink 600 GB/s = 300 GB/s each way. Network: DGX A100
    # and Azure ND A100 v4 (Orca's testbed, §6) have one 200 Gb/s HDR InfiniBand NIC per GPU.
    "a100-40gb": Accelerator("A100-SXM4-40GB", 40 * GiB, 1555 * GB, 312e12, 156e12, 300 * GB, 25 * GB),
    "a100-80gb": Accelerator("A100-SXM4-80GB", 80 * GiB, 2039 * GB, 312e12, 156e12, 300 * GB, 25 * GB),
    # NVIDIA H100 datasheet, SXM5: 80GB HBM3 at 3.35 TB/s; BF16 1,979 TFLOPS with sparsity =
    # 989.5 dense; TF32 494.7 dense; NVLink 4 900 GB/s = 450 each way. DGX H100: one 400 Gb/s
    # ConnectX-7 NDR port per GPU.
    "h100": Accelerator("H100-SXM5-80GB", 80 * GiB, 3350 * GB, 989.5e12, 494.7e12, 450 * GB, 50 * GB),
    # NVIDIA H200 datasheet, SXM: 141GB HBM3e at 4.8 TB/s; same GH100 compute and NVLink as
    # H100 SXM5; DGX H200: 400 Gb/s per GPU.
    "h200": Accelerator("H200-SXM-141GB", 141 * GiB, 4800 * GB, 989.5e12, 494.7e12, 450 * GB, 50 * GB),
}


# ----------------------------------------------------------------------------- placement


def param_shapes(c) -> dict:
    """Shapes of every parameter, same tree as the family's `param_axes` (no allocation)."""
    return jax.tree.map(lambda a: a.shape, family(c).abstract_params(c))


def _mesh_names(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class Placement:
    """One array on the mesh: its shape, its PartitionSpec entries and what a device holds."""

    name: str
    shape: tuple[int, ...]
    logical: tuple[str | None, ...]
    spec: tuple[MeshAxes, ...]
    itemsize: int
    shards: int            # devices one copy is split over
    dropped: tuple[str, ...] = ()  # logical axes whose rule was skipped (size does not divide)

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def bytes_per_device(self) -> int:
        return self.bytes // self.shards

    def dim_shards(self, i: int, mesh_shape: Mapping[str, int]) -> int:
        return math.prod(mesh_shape[a] for a in _mesh_names(self.spec[i]))


def place(name: str, shape, logical, layout: Layout, mesh_shape: Mapping[str, int],
          itemsize: int) -> Placement:
    spec = layout.resolve(tuple(logical), mesh_shape, tuple(shape))
    loose = layout.resolve(tuple(logical), mesh_shape)  # what the rules ask for, ignoring sizes
    dropped = tuple(f"{lg}={s}" for lg, s, a, b in zip(logical, shape, spec, loose) if a != b)
    shards = math.prod(mesh_shape[a] for axes in spec for a in _mesh_names(axes))
    return Placement(name, tuple(shape), tuple(logical), spec, itemsize, shards, dropped)


def param_placements(c, layout: str | Layout, mesh_shape: Mapping[str, int],
                     itemsize: int) -> dict[str, Placement]:
    """Every parameter, keyed by its dotted name (``h.attn.c_attn.kernel``)."""
    layout = get_layout(layout)
    out: dict[str, Placement] = {}

    def walk(axes, shapes, prefix):
        for k in axes:
            if isinstance(axes[k], dict):
                walk(axes[k], shapes[k], prefix + k + ".")
            else:
                out[prefix + k] = place(prefix + k, shapes[k], axes[k], layout, mesh_shape, itemsize)

    walk(family(c).param_axes(c), param_shapes(c), "")
    return out


def kv_placement(c, layout: str | Layout, mesh_shape: Mapping[str, int], num_pages: int,
                 page_size: int, itemsize: int) -> Placement:
    """The K (or V) pages of every layer, as if stacked: [L, Hkv, P, B, K]. The engine holds
    one [Hkv, P, B, K] array per layer, placed by this spec without its first entry."""
    shape = (c.num_layers, *KVCache.shape(num_pages, page_size, c.num_kv_heads, c.head_dim))
    return place("kv.k", shape, ("layers",) + KV_AXES, get_layout(layout), mesh_shape, itemsize)


def slot_state_bytes(slots: int, max_len: int, page_size: int) -> int:
    """The engine's per-sequence token history [S, M] and last token [S], int32, replicated
    (M is `max_len` rounded up to whole pages, as allocated)."""
    return 4 * slots * pages_for(max_len, page_size) * page_size + 4 * slots


def kv_bytes_per_device(c, layout, mesh_shape, num_pages: int, page_size: int,
                        itemsize: int) -> int:
    """K + V pages that one device holds."""
    return 2 * kv_placement(c, layout, mesh_shape, num_pages, page_size, itemsize).bytes_per_device


def fit_kv_pages(c, layout: str | Layout, mesh_shape: Mapping[str, int], page_size: int,
                 budget_bytes: int, itemsize: int | None = None) -> int:
    """The most pages whose K and V fit in `budget_bytes` per device. A layout that splits the
    pages over n devices does so only when n divides their count (even tiling): from the
    count an even split would give, step down (at most n - 1 steps) until one fits."""
    itemsize = itemsize or DTYPE_BYTES[c.dtype]
    n = math.prod(dict(mesh_shape).values() or [1])
    unit = kv_bytes_per_device(c, layout, mesh_shape, n, page_size, itemsize)  # n pages, tiled
    p = max(budget_bytes, 0) * n // unit
    while p > 0 and kv_bytes_per_device(c, layout, mesh_shape, p, page_size, itemsize) > budget_bytes:
        p -= 1
    return p


# ----------------------------------------------------------------------------- the estimate


def _fmt(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _t(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-4 else f"{s * 1e6:.1f} us"


@dataclasses.dataclass
class _Explain:
    lines: list[str] = dataclasses.field(default_factory=list)

    def __call__(self, text: str) -> None:
        self.lines.append(text)


def _link(mesh_shape, axes: tuple[str, ...], acc: Accelerator) -> tuple[float, str]:
    """Bandwidth of the link a group split over `axes` communicates over: NVLink when the
    devices it spans fit in one node (see `mesh.physical_order`), else the network."""
    if not axes:
        return acc.link_bw, "none"
    if max(axis_span(dict(mesh_shape), a) for a in axes) <= acc.per_node:
        return acc.link_bw, "NVLink"
    return acc.net_bw, "inter-node network"


@dataclasses.dataclass(frozen=True)
class _Costs:
    """What one iteration's estimate reads: the model, its shards and links, the accelerator."""

    c: object                 # the model config
    acc: Accelerator
    b: int                    # bytes per parameter / KV element
    t_attn: int               # shards of the heads, of the MLP, of the vocabulary
    t_mlp: int
    t_vocab: int
    stages: int               # pipeline stages (layer shards)
    kv_layer: int             # shards of the KV buffer's layers, slots, heads
    kv_slot: int
    kv_head: int
    layer_w: int              # bytes per device: layer weights, LM head
    head_w: int
    matmul_elems: int         # matmul weight elements per device
    links: dict               # "tensor" / "pipeline" / "slot" / "vocab" -> (bandwidth, name)


def _ring(n: int) -> float:
    """The fraction of a message each device sends in a ring all-reduce over n devices."""
    return 2 * (n - 1) / n


def make_plan(config, mesh: str | Mapping[str, int], layout: str | Layout,
              accelerator: str | Accelerator, batch: int = 64, context: int | None = None,
              dtype: str = "bfloat16", prefill_tokens: int = 512, reserve: float = 0.1,
              name: str | None = None, page_size: int = PAGE_SIZE) -> dict:
    """The whole estimate as a JSON-able dict; ``plan["explain"]`` shows the arithmetic.

    batch: sequences in the KV pages (all requests in flight: Orca keeps one batch per pipeline stage,
        so each stage's micro-batch has ceil(batch / stages) rows).
    context: tokens per sequence (default: the model's positions); decode rows attend over all of it.
    prefill_tokens: prompt tokens in one prefill iteration (one prompt from position 0).
    reserve: fraction of HBM kept for activations, compiled programs and the runtime.
    name: shown in the output (default: the preset name, or "custom").
    """
    name = name or (config if isinstance(config, str) else "custom")
    c, mesh_shape, layout, acc = _resolve(config, mesh, layout, accelerator)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if batch < 1 or prefill_tokens < 1 or not 0 <= reserve < 1:
        raise ValueError("batch and prefill_tokens must be >= 1 and reserve in [0, 1)")
    M = context or c.max_positions
    if M > c.max_positions:
        raise ValueError(f"context {M} exceeds the model's {c.max_positions} positions")
    b = DTYPE_BYTES[dtype]
    ex = _Explain()
    notes: list[str] = []
    params = param_placements(c, layout, mesh_shape, b)
    kvb = kv_placement(c, layout, mesh_shape, pool_pages_for(batch * pages_for(M, page_size)), page_size, b)
    memory = _memory(c, layout, mesh_shape, acc, b, M, batch, reserve, page_size, params, ex, notes)
    costs, parallelism = _parallelism(c, layout, mesh_shape, acc, b, params, kvb, ex, notes)
    stages = costs.stages
    micro = -(-batch // stages)
    dec = _iteration(costs, ex, f"decode iteration ({micro} rows per micro-batch, each attending "
                     f"over {M} positions)", micro, micro, micro * M, micro * M)
    dec["tokens_per_s"] = micro / dec["iteration_interval_s"]
    ex(f"decode throughput with {stages} micro-batch(es) in flight: {micro} tokens / {_t(dec['iteration_interval_s'])} "
       f"= {dec['tokens_per_s']:.0f} tokens/s")
    T = prefill_tokens
    pre = _iteration(costs, ex, f"prefill iteration ({T} prompt tokens of one prompt)", T, 1,
                     T * (T + 1) // 2, 0)
    pre["tokens_per_s"] = T / pre["iteration_interval_s"]
    memory["kv_spec"] = [list(_mesh_names(a)) or None for a in kvb.spec]
    memory["params"] = {k: {"shape": list(p.shape), "spec": [list(_mesh_names(a)) or None for a in p.spec],
                            "bytes_per_device": p.bytes_per_device} for k, p in params.items()}
    return {
        "model": {"name": name, "architecture": c.architecture, "model_type": c.model_type,
                  "params": c.num_params(), "n_layer": c.num_layers, "n_embd": c.hidden_size,
                  "n_head": c.num_heads, "n_kv_head": c.num_kv_heads, "head_dim": c.head_dim,
                  "vocab_size": c.vocab_size, "n_positions": c.max_positions},
        "mesh": dict(mesh_shape), "layout": layout.to_dict(),
        "accelerator": dataclasses.asdict(acc), "dtype": dtype, "batch": batch, "context": M,
        "prefill_tokens": prefill_tokens, "reserve": reserve, "memory": memory,
        "parallelism": parallelism, "decode": dec, "prefill": pre, "notes": notes, "explain": ex.lines,
    }


def _resolve(config, mesh, layout, accelerator):
    """(model config, mesh shape, layout as the engine runs it, Accelerator) from names or objects."""
    if isinstance(config, str):
        config = preset(config)
    if isinstance(accelerator, str) and accelerator.lower() not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {accelerator!r}; known: {sorted(ACCELERATORS)}")
    acc = ACCELERATORS[accelerator.lower()] if isinstance(accelerator, str) else accelerator
    # pipelined: as the engine runs it, a pipeline axis always splits the layers
    return config, parse_mesh_spec(mesh), pipelined(layout), acc


def _memory(c, layout, mesh_shape, acc, b, M, batch, reserve, page_size, params, ex, notes) -> dict:
    """Parameters, KV buffer and slot state per device, against the usable HBM."""
    p_dev = sum(p.bytes_per_device for p in params.values())
    p_total = sum(p.bytes for p in params.values())
    ex(f"== parameters ({c.num_params() / 1e9:.3f} B params x {b} bytes = {_fmt(p_total)}) ==")
    ex("per device = sum over arrays of bytes / shards (shards = product of the mesh axes in its spec)")
    for p in params.values():
        spec = "P(" + ", ".join(repr(a) if a else "None" for a in p.spec) + ")"
        ex(f"  {p.name:24s} {str(list(p.shape)):24s} {spec:38s} {_fmt(p.bytes):>11s} / {p.shards:<3d} = {_fmt(p.bytes_per_device)}")
        if p.dropped:
            notes.append(f"{p.name}: rule skipped for {', '.join(p.dropped)} (the mesh axes do not divide "
                         "the size), so that dimension is replicated" +
                         ("; Megatron pads the vocab to a multiple of 128 x tensor to split it"
                          if p.dropped[0].startswith("vocab") else ""))
    ex(f"  total per device: {_fmt(p_dev)} ({p_dev} bytes)")

    W = pages_for(M, page_size)
    kv1 = kv_placement(c, layout, mesh_shape, W, page_size, b)
    pool = pool_pages_for(batch * W)  # the engine's pool: every slot full, plus the admission watermark
    kvb = kv_placement(c, layout, mesh_shape, pool, page_size, b)
    per_slot_dev = 2 * kv1.bytes_per_device
    kv_dev = 2 * kvb.bytes_per_device
    state_dev = slot_state_bytes(batch, M, page_size)
    ex(f"== KV pages ({page_size} tokens each) ==")
    ex(f"per sequence of {M} tokens ({W} pages): K and V x L x {W * page_size} x KV heads x head dim x {b} B = "
       f"2 x {c.num_layers} x {W * page_size} x {c.num_kv_heads} x {c.head_dim} x {b} = {_fmt(2 * kv1.bytes)}; "
       f"per device / {kv1.shards} (spec {kv1.spec}) = {_fmt(per_slot_dev)}")
    ex(f"batch of {batch} sequences ({pool} pages with the admission watermark): 2 x {_fmt(kvb.bytes)} / "
       f"{kvb.shards} (spec {kvb.spec}) = {_fmt(kv_dev)} per device"
       f" + sequence state (int32 history [S, M] + last token [S], replicated) {_fmt(state_dev)}")
    hbm_usable = int(acc.hbm_bytes * (1 - reserve))
    need = p_dev + kv_dev + state_dev
    ex(f"HBM usable: {_fmt(acc.hbm_bytes)} x (1 - reserve {reserve}) = {_fmt(hbm_usable)}; "
       f"needed: params {_fmt(p_dev)} + KV {_fmt(kv_dev)} + state {_fmt(state_dev)} = {_fmt(need)}")
    left = hbm_usable - p_dev
    fits = lambda S: (kv_bytes_per_device(c, layout, mesh_shape, pool_pages_for(S * W), page_size, b)  # noqa: E731
                      + slot_state_bytes(S, M, page_size)) <= left
    lo, hi = 0, fit_kv_pages(c, layout, mesh_shape, page_size, left, b) // W if left > 0 else 0
    while lo < hi:  # the most S that fits (bisection: fit_kv_pages ignores the watermark and state)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    max_slots = lo
    ex(f"max sequences of {M} tokens: most S with 2 x KV(S x {W} pages) / shards + state(S) <= "
       f"{_fmt(max(left, 0))} left after the params -> {max_slots}")
    if left <= 0:
        notes.append(f"the parameters alone ({_fmt(p_dev)} per device) exceed the usable HBM ({_fmt(hbm_usable)})")
    return {"param_bytes_total": p_total, "param_bytes_per_device": p_dev,
            "kv_bytes_per_slot_per_device": per_slot_dev, "kv_bytes_per_device": kv_dev,
            "slot_state_bytes_per_device": state_dev, "total_bytes_per_device": need,
            "hbm_bytes": acc.hbm_bytes, "usable_bytes": hbm_usable, "fits": need <= hbm_usable,
            "max_slots": max_slots}


def _parallelism(c, layout, mesh_shape, acc, b, params, kvb, ex, notes) -> tuple[_Costs, dict]:
    """How the layout splits the work, as the shards of the arrays it places say, and the links
    each group communicates over."""
    model = family(c)
    role = lambda *logical: next(p for p in params.values() if p.logical[:len(logical)] == logical)
    cproj, fc2 = role("layers", "heads", "head_dim", "embed"), role("layers", "mlp", "embed")
    cattn = role("layers")
    head_keys = set(model.stage_keys(c, False, True)) - {model.LAYERS}
    head = [p for k, p in params.items() if k.split(".")[0] in head_keys]
    wte = next(p for p in head if p.logical == ("vocab", "embed"))  # the LM head's weight
    t_attn, t_mlp = cproj.dim_shards(1, mesh_shape), fc2.dim_shards(1, mesh_shape)
    stages, t_vocab = cattn.dim_shards(0, mesh_shape), wte.dim_shards(0, mesh_shape)
    kv_layer, kv_slot, kv_head = (kvb.dim_shards(i, mesh_shape) for i in (0, 2, 1))  # [L, H, P, B, K]
    n_dev = math.prod(mesh_shape.values())
    if any(lg == "embed" and p.dim_shards(i, mesh_shape) > 1
           for p in params.values() for i, lg in enumerate(p.logical)):
        notes.append("the layout splits the embed axis of a weight: the collectives that needs "
                     "(all-gathers / reduce-scatters) are not modelled here")
    used = {a for p in [*params.values(), kvb] for axes in p.spec for a in _mesh_names(axes)}
    for a, n in mesh_shape.items():
        if n > 1 and a not in used:
            notes.append(f"mesh axis {a}={n} is not used by layout {layout.name!r} here: devices along it hold "
                         "copies and compute the same thing")
    ex(f"== parallelism == heads split {t_attn}-way, MLP {t_mlp}-way, vocab {t_vocab}-way, layers {stages}-way "
       f"(pipeline stages), KV slots {kv_slot}-way, {n_dev} devices")
    axes_of = lambda p, dim: _mesh_names(p.spec[dim])
    links = {"tensor": _link(mesh_shape, axes_of(cproj, 1) or axes_of(fc2, 1), acc),
             "pipeline": _link(mesh_shape, axes_of(cattn, 0), acc),
             "slot": _link(mesh_shape, axes_of(kvb, 2), acc),
             "vocab": _link(mesh_shape, axes_of(wte, 0), acc)}
    costs = _Costs(
        c=c, acc=acc, b=b, t_attn=t_attn, t_mlp=t_mlp, t_vocab=t_vocab, stages=stages,
        kv_layer=kv_layer, kv_slot=kv_slot, kv_head=kv_head,
        layer_w=sum(p.bytes_per_device for k, p in params.items() if k.startswith(model.LAYERS + ".")),
        head_w=sum(p.bytes_per_device for p in head),
        matmul_elems=sum(p.bytes_per_device // b for k, p in params.items()
                         if k.startswith(model.LAYERS + ".") and k.endswith(".kernel")),
        links=links)
    return costs, {"devices": n_dev, "tensor_heads": t_attn, "tensor_mlp": t_mlp, "vocab": t_vocab,
                   "stages": stages, "kv_slots": kv_slot, "tensor_link": links["tensor"][1],
                   "pipeline_link": links["pipeline"][1], "slot_link": links["slot"][1]}


def _iteration(k: _Costs, ex, label: str, T: int, R: int, pairs: int, kv_read_tokens: int) -> dict:
    """One iteration of T rows (R sampled), `pairs` (query, key) pairs per layer and head
    group, `kv_read_tokens` positions read from the buffer per layer."""
    c, b = k.c, k.b
    V, D, L = c.vocab_size, c.hidden_size, c.num_layers
    HK, KVD = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim  # query and KV widths
    peak = k.acc.flops_32 if b == 4 else k.acc.flops_16
    ex(f"== {label}: T = {T} rows, R = {R} sampled, on the last stage's devices ==")
    # Attention work splits with the query heads (a device whose KV heads are replicated
    # still computes only its own query heads).
    flops = (2 * T * k.matmul_elems + 4 * pairs * HK * L // (k.kv_layer * k.t_attn)
             + 2 * R * V * D // k.t_vocab)
    ex("FLOPs = 2 T x matmul weights/device + 4 x pairs x H K x L / (layer x query-head shards) + 2 R V D / vocab shards")
    ex(f"      = 2 x {T} x {k.matmul_elems} + 4 x {pairs} x {HK} x {L} / ({k.kv_layer} x {k.t_attn}) + "
       f"2 x {R} x {V} x {D} / {k.t_vocab} = {flops:.4g}")
    kv_shards = k.kv_layer * k.kv_head * k.kv_slot
    kv_r = kv_read_tokens * 2 * KVD * b * L // kv_shards
    kv_w = T * 2 * KVD * b * L // kv_shards
    byts = k.layer_w + k.head_w + kv_r + kv_w
    ex(f"bytes = layer weights/device {_fmt(k.layer_w)} + LM head {_fmt(k.head_w)} + KV read "
       f"{kv_read_tokens} x 2 x {KVD} x {b} x {L} / {kv_shards} = {_fmt(kv_r)} + KV write {_fmt(kv_w)} = {_fmt(byts)}")
    t_c, t_m = flops / peak, byts / k.acc.hbm_bw
    ex(f"compute {flops:.4g} / {peak:.4g} FLOP/s = {_t(t_c)}; memory {byts} / {k.acc.hbm_bw:.4g} B/s = {_t(t_m)}")
    comm, t_comm, t_hand = _communication(k, ex, T, R, kv_read_tokens)
    stages = k.stages
    stage = max(t_c, t_m) + t_comm
    ex(f"stage time = max({_t(t_c)}, {_t(t_m)}) + comms {_t(t_comm)} = {_t(stage)}; "
       f"iteration latency = {stages} stages x {_t(stage)} + {stages - 1} hand-offs x {_t(t_hand)} = "
       f"{_t(stages * stage + (stages - 1) * t_hand)}")
    return {"rows": T, "sampled_rows": R, "flops_per_device": flops, "bytes_per_device": byts,
            "compute_s": t_c, "memory_s": t_m, "comm_s": t_comm, "handoff_s": t_hand,
            "bound": "compute" if t_c > t_m else "memory", "stage_s": stage,
            "iteration_latency_s": stages * stage + (stages - 1) * t_hand,
            "iteration_interval_s": stage + t_hand, "communication": comm}


def _communication(k: _Costs, ex, T: int, R: int, kv_read_tokens: int) -> tuple[dict, float, float]:
    """(bytes per collective kind, collective seconds, pipeline hand-off seconds) of one stage."""
    V, D, b = k.c.vocab_size, k.c.hidden_size, k.b
    KVD = k.c.num_kv_heads * k.c.head_dim
    layers_here = k.c.num_layers // k.stages
    (tp_bw, tp_link), (pp_bw, pp_link) = k.links["tensor"], k.links["pipeline"]
    (sl_bw, sl_link), (voc_bw, _) = k.links["slot"], k.links["vocab"]
    msg = T * D * b
    comm = {"allreduce_message_bytes": msg, "allreduces_per_layer": 2 if k.t_attn > 1 else 0}
    tp_bytes = 0.0
    if k.t_attn > 1 or k.t_mlp > 1:
        per_layer = msg * (_ring(k.t_attn) + _ring(k.t_mlp))
        tp_bytes = per_layer * layers_here
        ex(f"tensor all-reduce: 2 per layer (attention out-proj, MLP out), message T x D x {b} = {_fmt(msg)}; "
           f"ring sends 2(n-1)/n = {_ring(max(k.t_attn, k.t_mlp)):.3f} of it: {_fmt(per_layer)} per layer x {layers_here} "
           f"layers = {_fmt(tp_bytes)} over {tp_link}")
    comm["tensor_bytes_per_layer"] = msg * (_ring(k.t_attn) + _ring(k.t_mlp)) if k.t_attn * k.t_mlp > 1 else 0
    comm["tensor_bytes"] = tp_bytes
    voc_bytes = 0.0
    if k.t_vocab > 1:
        voc_bytes = msg * _ring(k.t_vocab) + R * V * 4 * (k.t_vocab - 1) / k.t_vocab
        ex(f"vocab split: embedding all-reduce {_fmt(msg * _ring(k.t_vocab))} + float32 logits all-gather "
           f"R x V x 4 x (n-1)/n = {_fmt(R * V * 4 * (k.t_vocab - 1) / k.t_vocab)}")
    comm["vocab_bytes"] = voc_bytes
    sl_bytes = 0.0
    if k.kv_slot > 1:
        sl_bytes = kv_read_tokens * 2 * KVD * b // k.kv_head * _ring(k.kv_slot) * layers_here
        ex(f"slot split: each layer all-reduces the gathered K, V blocks of every row over the slot group: "
           f"{kv_read_tokens} x 2 x {KVD} x {b} / {k.kv_head} x {_ring(k.kv_slot):.3f} x {layers_here} layers = {_fmt(sl_bytes)} over {sl_link}")
    comm["slot_bytes"] = sl_bytes
    handoff = T * D * b if k.stages > 1 else 0
    comm["pipeline_handoff_bytes"] = handoff
    comm["pipeline_handoffs"] = k.stages - 1
    t_comm = tp_bytes / tp_bw + voc_bytes / voc_bw + sl_bytes / sl_bw
    t_hand = handoff / pp_bw
    if k.stages > 1:
        ex(f"pipeline hand-off: T x D x {b} = {_fmt(handoff)} per stage boundary over {pp_link} = {_t(t_hand)}")
    return comm, t_comm, t_hand


def format_plan(plan: dict, explain: bool = False) -> str:
    """The human-readable summary (and the arithmetic, with `explain`)."""
    m, par, acc = plan["memory"], plan["parallelism"], plan["accelerator"]
    mesh = ",".join(f"{k}={v}" for k, v in plan["mesh"].items())
    lines = [
        f"{plan['model']['name']} ({plan['model']['params'] / 1e9:.2f} B params, {plan['dtype']}) on {mesh} "
        f"x {acc['name']}, layout {plan['layout']['name']!r}",
        f"  parallelism: heads/{par['tensor_heads']} MLP/{par['tensor_mlp']} vocab/{par['vocab']} "
        f"stages {par['stages']} KV slots/{par['kv_slots']}; tensor link {par['tensor_link']}, "
        f"pipeline link {par['pipeline_link']}",
        "memory per device:",
        f"  parameters            {_fmt(m['param_bytes_per_device']):>12s}   (all devices: {_fmt(m['param_bytes_total'])})",
        f"  KV per slot           {_fmt(m['kv_bytes_per_slot_per_device']):>12s}   ({plan['context']} tokens)",
        f"  KV for {plan['batch']:<5d} slots     {_fmt(m['kv_bytes_per_device']):>12s}   + slot state {_fmt(m['slot_state_bytes_per_device'])}",
        f"  total                 {_fmt(m['total_bytes_per_device']):>12s}   of {_fmt(m['usable_bytes'])} usable "
        f"({_fmt(m['hbm_bytes'])} HBM, {plan['reserve']:.0%} reserved): {'fits' if m['fits'] else 'DOES NOT FIT'}",
        f"  max slots that fit    {m['max_slots']:>12d}",
    ]
    for key in ("decode", "prefill"):
        p = plan[key]
        cm = p["communication"]
        lines += [
            f"{key} iteration ({p['rows']} rows per stage):",
            f"  per device: {p['flops_per_device'] / 1e12:.3f} TFLOP, {_fmt(p['bytes_per_device'])} read/written "
            f"-> compute {_t(p['compute_s'])}, memory {_t(p['memory_s'])} ({p['bound']}-bound)",
            f"  comms per device: tensor all-reduce {_fmt(cm['tensor_bytes'])} "
            f"({cm['allreduces_per_layer']} x {_fmt(cm['allreduce_message_bytes'])} per layer, ring 2(n-1)/n), "
            f"vocab {_fmt(cm['vocab_bytes'])}, slots {_fmt(cm['slot_bytes'])}, pipeline hand-off "
            f"{_fmt(cm['pipeline_handoff_bytes'])} x {cm['pipeline_handoffs']} -> {_t(p['comm_s'] + p['handoff_s'])}",
            f"  stage {_t(p['stage_s'])}, iteration latency {_t(p['iteration_latency_s'])}, "
            f"{p['tokens_per_s']:.0f} tokens/s",
        ]
    lines += [f"note: {n}" for n in plan["notes"]]
    if explain:
        lines += ["", "arithmetic:"] + ["  " + s for s in plan["explain"]]
    return "\n".join(lines)

