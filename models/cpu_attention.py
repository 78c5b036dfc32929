"""Attention over the paged KV cache on CPU: a C++ kernel called from the jitted step.

This is ``--attention-backend cpu`` (what "auto" picks on CPU for float32 models on one
device per pipeline stage). XLA:CPU's own path (backend "xla": models/attention.py) copies
every decode row's page out of the pool with a gather and then runs two batched dots of
one-row matrices per page (≈ 3x the KV read floor at batch 64), and scores prefill rows
densely against every prefill row of the step, then masks (a step of four 128-token
prompts computes 4x the pairs it keeps, and XLA's exp and select passes over them cost more
than its matmuls). The kernel (cpu_attention.cc, an XLA FFI custom call) takes every row of
the step, decode or prefill, as a query over positions [lo, hi) of its own sequence, read
through its block table straight from the pool (this step's keys are written first), with an
online softmax per (row, KV head), the pairs spread over XLA's own intra-op threads
(docs/benchmarks.md, "Attention on CPU: the C++ kernel")

It is compiled at first use with the system's C++ compiler (``$CXX``, else ``c++``) for this
CPU (``-march=native``), into ``$ORCA_JAX_KERNEL_CACHE`` (default ~/.cache/orca-jax/kernels)
under a name keyed by the source, the flags, the compiler, jaxlib and the CPU, so later
processes only load it. Where it cannot be built (no compiler), "auto" keeps backend "xla"
and says why once in the log; an explicit ``--attention-backend cpu`` fails with the reason.

Legend: N rows, Hkv KV heads, G query heads per KV head, K head dim, P pages, B
positions per page, W pages in a block table.
"""
from __future__ import annotations

import ctypes
import hashlib
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

SOURCE = Path(__file__).with_name("cpu_attention.cc")
TARGET = "orca_jax_paged_attention_f32"  # the FFI target's name (also in compiled programs)
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-std=c++17", "-w")  # -w: XLA's headers warn

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
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), cxx, jaxlib.__version__,
                                    _cpu_id()]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("ORCA_JAX_KERNEL_CACHE",
                                 Path.home() / ".cache" / "orca-jax" / "kernels"))
    lib = folder / f"paged_attention_{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, then renamed: atomic
        out = Path(tmp) / lib.name
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, lib)
    return lib


def load() -> str | None:
    """Builds (once per machine) and registers the kernel; None when it is ready, else why it
    cannot be used here."""
    with _lock:
        if not _loaded:
            cxx = _compiler()
            if cxx is None:
                _loaded["error"] = (f"no C++ compiler ({os.environ.get('CXX') or 'c++'} not found; "
                                    f"set $CXX) to build the CPU attention kernel")
            else:
                try:
                    lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
                    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.OrcaPagedAttentionF32),
                                                platform="cpu")
                    _loaded["lib"] = lib
                except (OSError, RuntimeError, AttributeError) as e:
                    _loaded["error"] = f"the CPU attention kernel could not be built: {e}"
        return _loaded.get("error")


def paged_attention(q, k_pages, v_pages, block_tables, lo, hi, scale: float) -> jax.Array:
    """q [N, Hkv, G, K] float32 (N rows, each one query token), k_pages/v_pages [Hkv, P, B, K]
    float32, block_tables [N, W] int32 (the pages of each row's sequence, in order), lo/hi [N]
    int32: each row attends to positions lo <= p < hi of its sequence (hi = pos + 1; lo > 0
    for a sliding window; a row with none comes out 0). Returns softmax(q·k * scale)·v, [N, Hkv, G, K]
    float32. `load()` must have returned None."""
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, k_pages, v_pages, block_tables.astype(jnp.int32), lo.astype(jnp.int32),
        hi.astype(jnp.int32), scale=np.float32(scale))
