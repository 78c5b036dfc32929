"""C++ kernels for CPU, called from the jitted programs: attention over the paged KV cache,
dense layers over packed weights, and the greedy pick of the sampling program.

**Attention** (``--attention-backend cpu``, what "auto" picks on CPU for float32 models on one
device per pipeline stage). XLA:CPU's own path (backend "xla": models/attention.py) copies
every decode row's page out of the pool with a gather and then runs two batched dots of
one-row matrices per page (≈ 3x the KV read floor at batch 64), and scores prefill rows
densely against every prefill row of the step, then masks (a step of four 128-token
prompts computes 4x the pairs it keeps, and XLA's exp and select passes over them cost more
than its matmuls). The kernel (cpu_attention.cc, an XLA FFI custom call) takes every row of
the step, decode or prefill, as a query over positions [lo, hi) of its own sequence, read
through its block table straight from the pool (this step's keys are written first), with an
online softmax per (row, KV head), the pairs spread over XLA's own intra-op threads
(docs/benchmarks.md, "Attention on CPU: the C++ kernel").

**Dense layers** (``--matmul-backend cpu``, the same "auto" rule). XLA:CPU's GEMMs read a
decode step's weights at a third to a half of the machine's bandwidth at 2-16 rows.
`runtime_params` (orca_jax/step.py) packs every layer weight and the LM head once at
start-up into panels of 32 output columns (`pack`: [ceil(N/32), K, 32], replacing the
[K, N] array, so no second copy), and models/layers.py `linear` sends them to cpu_matmul.cc,
which streams each panel once per tile of 8 rows with the outputs in registers
(docs/benchmarks.md, "Dense layers on CPU"). A tied embedding packed as the LM head still
serves the token lookup (`table_rows`).

**Greedy sampling** (the sampling program's pick whenever the step runs either kernel above:
runner.py `_argmax`). Each row's argmax,
never a banned id (min_tokens), in two reads of the row (cpu_sampling.cc), where XLA:CPU
copied the [R, V] logits twice before its two-stage argmax (`sampling.argmax_first`).

All are compiled at first use with the system's C++ compiler (``$CXX``, else ``c++``) for this
CPU (``-march=native``) into one library in ``$ORCA_JAX_KERNEL_CACHE`` (default
~/.cache/orca-jax/kernels), under a name keyed by the sources, the flags, the compiler, jaxlib
and the CPU, so later processes only load it. Where it cannot be built (no compiler), "auto"
keeps the XLA paths and says why once in the log; an explicit ``cpu`` backend fails with the
reason.

Legend: N rows, Hkv KV heads, G query heads per KV head, K head dim, P pages, B
positions per page, W pages in a block table; for dense layers T rows, I input features,
O output features.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_attention.cc", HERE / "cpu_matmul.cc", HERE / "cpu_norm.cc", HERE / "cpu_sampling.cc")
HEADERS = (HERE / "cpu_kernels.h",)
# FFI target name -> the library's handler symbol (the names also appear in compiled programs)
TARGETS = {"orca_jax_attend_f32": "OrcaAttendF32",
           "orca_jax_packed_matmul_f32": "OrcaPackedMatmulF32",
           "orca_jax_argmax_rows_f32": "OrcaArgmaxRowsF32",
           "orca_jax_norm_f32": "OrcaNormF32"}
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp-simd", "-fPIC", "-shared",
         "-std=c++17", "-w")  # -ffp-contract: fused multiply-adds (off under -std=c++17); -w: XLA's headers warn
PANEL = 32  # output columns per packed panel (NR in cpu_matmul.cc)

_lock = threading.Lock()
_loaded: dict = {}  # "error": why it cannot be used, or "lib": the loaded library


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return "\n".join(sorted({ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx)


def _build(cxx: str) -> Path:
    """The kernel's shared library, compiled unless the cache already holds it."""
    import jaxlib
    texts = [f.read_text() for f in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, " ".join(FLAGS), cxx, jaxlib.__version__,
                                    _cpu_id()]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("ORCA_JAX_KERNEL_CACHE",
                                 Path.home() / ".cache" / "orca-jax" / "kernels"))
    lib = folder / f"cpu_kernels_{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, then renamed: atomic
        out = Path(tmp) / lib.name
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, lib)
    return lib


def load() -> str | None:
    """Builds (once per machine) and registers the kernels; None when they are ready, else why
    they cannot be used here."""
    with _lock:
        if not _loaded:
            cxx = _compiler()
            if cxx is None:
                _loaded["error"] = (f"no C++ compiler ({os.environ.get('CXX') or 'c++'} not found; "
                                    f"set $CXX) to build the CPU kernels")
            else:
                try:
                    lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
                    for target, symbol in TARGETS.items():
                        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                                    platform="cpu")
                    _loaded["lib"] = lib
                except (OSError, RuntimeError, AttributeError) as e:
                    _loaded["error"] = f"the CPU kernels could not be built: {e}"
        return _loaded.get("error")


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # linux/mman.h


def huge_pages(tree) -> int:
    """Backs the host buffers of `tree` (a runner's weights and KV pages) with 2 MiB pages
    where Linux allows (madvise MADV_HUGEPAGE, then MADV_COLLAPSE: kernel 6.1+, transparent
    huge pages not "never"), and returns the bytes now in huge pages (0 elsewhere; nothing
    fails). The kernels stream these buffers: in 4 KiB pages every page is a TLB miss and a
    stop for the hardware prefetcher (here a stream read at 24-26 GB/s, at 30-31 in 2 MiB
    pages). Each buffer's range is widened to whole 2 MiB pages inside its mapping (the
    neighbours' bytes are kept, only their backing changes); where that does not collapse,
    narrowed to the whole 2 MiB pages inside the buffer. Collapsing is best-effort (the kernel
    may refuse a range: EAGAIN, retried, or EINVAL)."""
    if platform.system() != "Linux":
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    done = 0
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array) or leaf.nbytes < HUGE_PAGE:
            continue
        for shard in leaf.addressable_shards:
            if shard.device.platform != "cpu" or shard.data.nbytes < HUGE_PAGE:
                continue
            ptr, n = shard.data.unsafe_buffer_pointer(), shard.data.nbytes
            wide = (ptr // HUGE_PAGE * HUGE_PAGE, -(-(ptr + n) // HUGE_PAGE) * HUGE_PAGE)
            narrow = (-(-ptr // HUGE_PAGE) * HUGE_PAGE, (ptr + n) // HUGE_PAGE * HUGE_PAGE)
            for start, end in (wide, narrow):  # the widened range can hold pages that won't collapse
                if end > start and madvise(start, end - start, _MADV_HUGEPAGE) == 0 and any(
                        madvise(start, end - start, _MADV_COLLAPSE) == 0 for _ in range(3)):  # EAGAIN: transient
                    done += end - start
                    break
    return done


def attend(q, k, v, k_pages, v_pages, kv_index, tables, lo, hi, scale: float, num_heads: int,
           first: tuple[int, int, int] = (0, 0, 0)) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's KV write and attention. q, k, v [T, C, K] float32 hold the step's
    `num_heads` query heads and Hkv key and value heads, from head `first` = (q, k, v) on
    (the same array three times when one projection made all three); k_pages, v_pages
    [Hkv, P, B, K] float32. Writes row t's keys and values at position kv_index[t] (page
    // B, offset % B; positions outside the pool dropped), in place, then row t attends to
    positions lo[t] <= p < hi[t] of its sequence through its block table tables[t] [W]
    (hi = pos + 1, lo > 0 for a sliding window; a row with none comes out 0). Returns
    (softmax(q·k * scale)·v [T, num_heads, K] float32, k_pages, v_pages). `load()` must
    have returned None."""
    T, K = q.shape[0], q.shape[2]
    return jax.ffi.ffi_call(
        "orca_jax_attend_f32", (jax.ShapeDtypeStruct((T, num_heads, K), jnp.float32),
                                jax.ShapeDtypeStruct(k_pages.shape, jnp.float32),
                                jax.ShapeDtypeStruct(v_pages.shape, jnp.float32)),
        input_output_aliases={3: 1, 4: 2}, vmap_method="sequential")(
        q, k, v, k_pages, v_pages, *(x.astype(jnp.int32) for x in (kv_index, tables, lo, hi)),
        heads=np.int64(num_heads),
        q_head=np.int64(first[0]), k_head=np.int64(first[1]), v_head=np.int64(first[2]),
        scale=np.float32(scale))


def argmax_rows(logits, banned) -> jax.Array:
    """[R] int32: each row's argmax of logits [R, V] float32 that is not one of its banned
    ids [R, NB] (ids >= 0; those >= V, the padding, are ignored): `sampling.masked_argmax`'s
    pick (the first index on ties, 0 when every allowed entry is -inf), except with NaN
    logits, where this is the first allowed NaN (numpy's and torch's argmax) and XLA's
    two-stage pick depends on the block. `load()` must have returned None."""
    return jax.ffi.ffi_call("orca_jax_argmax_rows_f32", jax.ShapeDtypeStruct(logits.shape[:1], jnp.int32),
                            vmap_method="sequential")(logits, banned.astype(jnp.int32))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["scale", "bias"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class NormWeights:
    """A norm's scale [n] and bias [n] (or None) as the norm kernel takes them: what
    step.runtime_params makes of each norm's params with --matmul-backend cpu, so that
    models/layers.py's norms run the kernel."""
    scale: jax.Array
    bias: jax.Array | None = None


def norm(x: jax.Array, w: NormWeights, eps: float, rms: bool) -> jax.Array:
    """The norm over the last dim of float32 x [..., n]: LayerNorm ((x - mean) * rsqrt(var +
    eps) * scale + bias) or, `rms`, RMSNorm (x * rsqrt(mean(x^2) + eps) * scale), as
    models/layers.py computes them. `load()` must have returned None."""
    n = x.shape[-1]
    bias = w.bias if w.bias is not None and not rms else jnp.zeros((0,), jnp.float32)
    out = jax.ffi.ffi_call("orca_jax_norm_f32", jax.ShapeDtypeStruct((x.size // n, n), jnp.float32),
                           vmap_method="sequential")(x.reshape(-1, n), w.scale, bias, eps=np.float32(eps),
                                                     rms=np.int32(rms))
    return out.reshape(x.shape)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["panels"], meta_fields=["out_shape"])
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A dense layer's weight [*in, *out] in the kernel's layout: `panels` [ceil(O/32), I, 32]
    float32 holds columns 32p .. 32p+31 of the [I, O] matrix in panel p (the last one
    zero-padded); `out_shape` are the output dims (their product is O)."""

    panels: jax.Array
    out_shape: tuple[int, ...]


def pack(kernel: jax.Array, n_in: int) -> PackedWeight:
    """kernel [*in, *out] (its first `n_in` dims are contracted) -> the packed weight. Run once,
    outside the step (it copies the weight)."""
    out_shape = tuple(kernel.shape[n_in:])
    w = kernel.reshape(math.prod(kernel.shape[:n_in]), math.prod(out_shape))         # [I, O]
    n_panels = -(-w.shape[1] // PANEL)
    w = jnp.pad(w, ((0, 0), (0, n_panels * PANEL - w.shape[1])))
    return PackedWeight(w.reshape(w.shape[0], n_panels, PANEL).transpose(1, 0, 2), out_shape)


def matmul(x: jax.Array, w: PackedWeight, bias: jax.Array | None = None, gelu: bool = False,
           residual: jax.Array | None = None) -> jax.Array:
    """x [T, *in] float32 times the packed weight (+ bias [*out]), then, in the kernel's
    epilogue, GELU's tanh form if `gelu` and + residual [T, *out]: [T, *out] float32.
    `load()` must have returned None."""
    t, n = x.shape[0], math.prod(w.out_shape)
    none = jnp.zeros((0,), jnp.float32)
    b = none if bias is None else bias.reshape(n)
    res = none if residual is None else residual.reshape(t, n)
    y = jax.ffi.ffi_call("orca_jax_packed_matmul_f32", jax.ShapeDtypeStruct((t, n), jnp.float32),
                         vmap_method="sequential")(
        x.reshape(t, -1), w.panels, b, res, act=np.int32(gelu))
    return y.reshape(t, *w.out_shape)


def table_rows(w: PackedWeight, ids: jax.Array) -> jax.Array:
    """Rows `ids` [T] of the [O, I] table that `w` packs transposed (a tied embedding packed
    as the LM head, `pack(table.T, 1)`): [T, I], the embedding lookup."""
    return w.panels[ids // PANEL, :, ids % PANEL]
