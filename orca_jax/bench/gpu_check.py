"""`orca-jax bench gpu-check`: the prepared GPU validation run, every check in one command.

    orca-jax bench gpu-check --out $OUT/gpu-check            # a GPU: GPT-2 small, < 8 minutes
    orca-jax bench gpu-check --quick --out /tmp/gpu-check    # CPU / CI: a tiny model, < 1 minute

Phases, in order (--phases picks some): devices, model, numerics, warmup, donation, throughput,
host, hlo, restart, pallas. Each writes <out>/<phase>.json (status ok / fail / timeout / skipped, its
seconds, its figures, the error of a failed one) and prints one line; a phase that fails or
runs past its time budget is recorded and the next one runs. <out>/summary.json lists them
all; the exit code is 1 when any phase failed or timed out. Every compiled program goes to a
fresh persistent cache in <out>/xla-cache (the restart phase starts from it). docs/gpu.md
says what each phase checks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

PHASES = ("devices", "model", "numerics", "warmup", "donation", "throughput", "host", "hlo", "restart",
          "pallas")
# Seconds per phase, estimated for GPT-2 small on one H200 (no GPU has run it yet; --budget-scale
# stretches them): together 7.7 minutes, one 8-minute GPU session with the start-up.
BUDGETS = {"devices": 10, "model": 45, "numerics": 60, "warmup": 110, "donation": 10, "throughput": 45,
           "host": 30, "restart": 75, "hlo": 20, "pallas": 55}
FP32_TOL = 1e-4      # max |log-prob difference| against HF torch on CPU, float32
PALLAS_DTYPE, PALLAS_TOL = "bfloat16", 0.1  # the Pallas kernel against the XLA path: max |log-prob diff|


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each phase's work is: FULL on a GPU, QUICK on a CPU in CI."""

    model: str                       # the default --model
    numerics_prompt: int             # prompt tokens of the numerics comparison
    numerics_steps: int              # greedy steps compared
    max_batch_size: int              # the engine the later phases share
    max_num_batched_tokens: int
    max_prefill_seqs: int
    max_model_len: int
    mixed: tuple[int, str, str]      # requests, prompt and output lengths of the no-compile run
    offline: tuple[int, int, int]    # requests x prompt -> output of the throughput run
    batches: tuple[int, ...]         # decode batches timed against their floor
    rounds: int                      # timed rounds per batch (median)
    steps: int                       # engine steps per round
    host: tuple[int, int, int]       # requests, prompt, output of the host-time run
    profile_steps: int               # engine steps in the profiled run
    host_only: tuple[int, ...]       # running requests of the host-only engine (bench/host.py)
    host_only_steps: int


FULL = Sizes(model="gpt2-small-random", numerics_prompt=32, numerics_steps=16, max_batch_size=64,
             max_num_batched_tokens=512, max_prefill_seqs=16, max_model_len=256,
             mixed=(24, "4:200", "1:48"), offline=(64, 128, 64), batches=(1, 8, 64), rounds=5, steps=8,
             host=(16, 64, 32), profile_steps=8, host_only=(64, 256), host_only_steps=50)
QUICK = Sizes(model="gpt2-tiny-random", numerics_prompt=16, numerics_steps=8, max_batch_size=2,
              max_num_batched_tokens=16, max_prefill_seqs=1, max_model_len=64,
              mixed=(6, "4:40", "1:12"), offline=(8, 16, 8), batches=(1, 2), rounds=3, steps=4,
              host=(2, 16, 12), profile_steps=4, host_only=(4,), host_only_steps=20)


def add_parser(wsub) -> None:
    w = wsub.add_parser("gpu-check", help="the prepared GPU validation run: numerics, warm-up, donation, "
                                          "throughput, host time, restart, HLO, Pallas (JSON per phase)",
                        description=__doc__.splitlines()[0])
    w.add_argument("--out", default="bench-results/gpu-check", help="results folder (one JSON per phase)")
    w.add_argument("--quick", action="store_true", help="CPU / CI mode: a tiny model and tiny sizes")
    w.add_argument("--model", default=None,
                   help="PRESET-random (a random-weight Hugging Face model of an orca_jax.models preset, "
                        "e.g. gpt2-small-random), demo (the embedded demo model), or PATH: a Hugging Face "
                        "model directory or an orca-jax checkpoint (numerics needs a Hugging Face one); "
                        f"default {FULL.model}, --quick {QUICK.model}")
    w.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the engine the warm-up, throughput, host, restart and HLO phases share "
                        "(numerics runs both)")
    w.add_argument("--attention-backend", default="auto",
                   help="attention of that engine (EngineConfig.attention_backend; the pallas phase "
                        "compares the backends)")
    w.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    w.add_argument("--budget-scale", type=float, default=1.0, help="multiply every phase's time budget")
    w.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole run: a phase gets at most what is left, and one that "
                        "cannot start is recorded as a timeout (so a device call ends in time)")
    w.add_argument("--seed", type=int, default=0, help="seeds prompts and workloads")
    w.set_defaults(fn=cmd_gpu_check)


# -- running phases ---------------------------------------------------------------------------

class Skipped(Exception):
    """The phase does not apply here (its reason is recorded)."""


class CheckFailed(Exception):
    """A measured value is not what the phase expects."""


class PhaseTimeout(Exception):
    pass


def check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PhaseTimeout in this (main) thread after `seconds`, and every second after until
    the phase ends (an exception raised inside a finalizer or a gc callback is swallowed):
    at the next Python bytecode, so a long compile overruns by at most itself. No limit off
    the main thread."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise PhaseTimeout(f"over its time budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_phase(name: str, fn, ctx: Context) -> dict:
    """Run one phase under its budget (at most the run's time left); write <out>/<name>.json
    and print its line."""
    budget = min(BUDGETS[name] * ctx.args.budget_scale, ctx.time_left())
    res = {"phase": name, "status": "ok", "seconds": None, "budget_s": budget, "summary": "", "error": None}
    t0 = time.perf_counter()
    try:
        if budget < 1:
            raise PhaseTimeout("not run: the --time-limit of the run is used up")
        with time_limit(budget):
            res["summary"] = fn(ctx, res)
    except Skipped as e:
        res["status"], res["summary"] = "skipped", f"skipped: {e}"
    except PhaseTimeout as e:
        res["status"], res["error"] = "timeout", str(e)
    except CheckFailed as e:
        res["status"], res["error"] = "fail", str(e)
    except Exception as e:  # recorded; the next phase runs
        res["status"], res["error"] = "fail", f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-4000:]
    res["seconds"] = round(time.perf_counter() - t0, 3)
    (ctx.out / f"{name}.json").write_text(json.dumps(res, indent=1, default=_plain) + "\n")
    detail = res["summary"] if res["error"] is None else f"{res['error']}  {res['summary']}".strip()
    print(f"[{name}] {res['status']} ({res['seconds']:.1f} s): {detail}", flush=True)
    return res


def _plain(x):
    """JSON for numpy scalars and anything else printable."""
    return x.item() if hasattr(x, "item") else str(x)


class CompileEvents:
    """JAX's compile and persistent-cache events while open (jax.monitoring): cache hits and
    misses, and every backend compile with its program's name and seconds."""

    HIT, MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
    COMPILE = "/jax/core/compile/backend_compile_duration"

    def __enter__(self) -> "CompileEvents":
        from jax import monitoring
        self.hits, self.misses, self.compiles = 0, 0, []
        monitoring.register_event_listener(self._event)
        monitoring.register_event_duration_secs_listener(self._duration)
        return self

    def __exit__(self, *exc) -> None:
        from jax import monitoring
        monitoring.unregister_event_listener(self._event)
        monitoring.unregister_event_duration_listener(self._duration)

    def _event(self, event: str, **kw) -> None:
        self.hits += event == self.HIT
        self.misses += event == self.MISS

    def _duration(self, event: str, duration: float, **kw) -> None:
        if event == self.COMPILE:
            self.compiles.append((str(kw.get("fun_name", "?")), duration))

    def summary(self) -> dict:
        slowest = sorted(self.compiles, key=lambda c: -c[1])[:8]
        return {"cache_hits": self.hits, "cache_misses": self.misses, "backend_compiles": len(self.compiles),
                "backend_compile_s": round(sum(d for _, d in self.compiles), 3),
                "slowest": [{"program": n, "seconds": round(d, 3)} for n, d in slowest]}


class Context:
    """What the phases share: the arguments, the model (resolved once), and the engine the
    warmup phase builds for the later ones."""

    def __init__(self, args, sizes: Sizes, out: Path, cache: Path):
        self.args, self.sizes, self.out, self.cache = args, sizes, out, cache
        self.deadline = None if args.time_limit is None else time.perf_counter() + args.time_limit
        self.results: dict[str, dict] = {}
        self.system = None  # bench/systems.py EngineSystem, built by the warmup phase
        self._model: tuple | BaseException | None = None

    def model(self) -> tuple[str | None, str]:
        """(the Hugging Face directory or None, the orca-jax checkpoint) of --model."""
        if self._model is None:
            try:
                self._model = resolve_model(self.args.model or self.sizes.model)
            except Exception as e:
                self._model = e
        if isinstance(self._model, BaseException):
            raise RuntimeError(f"no model: {self._model}")
        return self._model

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()

    def engine(self):
        if self.system is None:
            raise RuntimeError("no engine: the warmup phase did not build one")
        return self.system.engine

    def engine_config(self):
        from ..config import EngineConfig
        s = self.sizes
        return EngineConfig(max_batch_size=s.max_batch_size, max_num_batched_tokens=s.max_num_batched_tokens,
                            max_prefill_seqs=s.max_prefill_seqs, max_model_len=s.max_model_len,
                            max_waiting=4096, attention_backend=self.args.attention_backend, warmup=True)

    def close(self) -> None:
        if self.system is not None:
            self.system.close()
            self.system = None
        gc.collect()


def resolve_model(spec: str) -> tuple[str | None, str]:
    """`PRESET-random`: a random-weight HF model of that preset (bench/run.py), converted;
    `demo`: the embedded demo checkpoint; a path: an orca-jax checkpoint (it has params/) or a
    Hugging Face directory, converted (cached)."""
    from .run import converted_checkpoint, random_hf_checkpoint
    if spec == "demo":
        from ..demo_model import ensure_demo_model
        return None, ensure_demo_model()
    if spec.endswith("-random"):
        hf_dir = random_hf_checkpoint(spec[:-len("-random")])
        return hf_dir, converted_checkpoint(hf_dir)
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec!r} is not a directory, 'demo' or PRESET-random")
    if (path / "params").is_dir():
        return None, str(path)
    return str(path), converted_checkpoint(str(path))


def cmd_gpu_check(args) -> int:
    import logging
    from .systems import passive_omp
    logging.getLogger("orca_jax").setLevel(logging.WARNING)  # one line per phase says it
    passive_omp()  # before anything imports torch
    names = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in names if p not in PHASES]
    if unknown or not names:
        raise ValueError(f"unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "xla-cache"  # fresh: the first warm-up compiles, the restart loads
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["ORCA_JAX_COMPILE_CACHE"] = str(cache)
    from ..runner import enable_compile_cache
    enable_compile_cache()  # before anything compiles
    ctx = Context(args, QUICK if args.quick else FULL, out, cache)
    t0 = time.perf_counter()
    try:
        for name in (p for p in PHASES if p in names):
            ctx.results[name] = run_phase(name, PHASE_FNS[name], ctx)
    finally:
        ctx.close()
    bad = [n for n, r in ctx.results.items() if r["status"] in ("fail", "timeout")]
    summary = {"quick": args.quick, "model": args.model or ctx.sizes.model, "dtype": args.dtype,
               "seconds": round(time.perf_counter() - t0, 1), "failed": bad,
               "phases": {n: {k: r[k] for k in ("status", "seconds", "summary", "error")}
                          for n, r in ctx.results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"gpu-check: {len(ctx.results) - len(bad)}/{len(ctx.results)} phases ok or skipped in "
          f"{summary['seconds']:.0f} s" + (f"; failed: {', '.join(bad)}" if bad else "") + f"; {out}")
    return 1 if bad else 0


# -- 1. devices -------------------------------------------------------------------------------

ENV_VARS = ("XLA_FLAGS", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_PREALLOCATE",
            "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR", "ORCA_JAX_COMPILE_CACHE")
JAX_CONFIG = ("jax_default_matmul_precision", "jax_enable_x64", "jax_compilation_cache_dir",
              "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_enable_xla_caches")


def phase_devices(ctx: Context, res: dict) -> str:
    import platform

    import jax
    import jaxlib
    devices = jax.devices()
    res.update(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
               platform_version=getattr(devices[0].client, "platform_version", None),
               python=platform.python_version(), cpus=os.cpu_count(), process_count=jax.process_count(),
               env={k: os.environ.get(k) for k in ENV_VARS},
               config={k: getattr(jax.config, k, None) for k in JAX_CONFIG},
               devices=[{"id": d.id, "platform": d.platform, "kind": d.device_kind,
                         "process_index": d.process_index, "memory_stats": d.memory_stats()}
                        for d in devices])
    for lib in ("torch", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            res[lib] = importlib.metadata.version(lib)
    res["nvidia_smi"] = _nvidia_smi()
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    memory = f", {limit / 2**30:.1f} GiB for XLA" if limit else ", no memory_stats() limit"
    return (f"{res['backend']}: {len(devices)} x {devices[0].device_kind}{memory}; jax {jax.__version__}, "
            f"jaxlib {jaxlib.__version__}; matmul precision {res['config']['jax_default_matmul_precision']}")


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    q = "name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit"
    proc = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True,
                          text=True, timeout=20)
    return proc.stdout.strip() or proc.stderr.strip()


# -- the model --------------------------------------------------------------------------------

def phase_model(ctx: Context, res: dict) -> str:
    """Build (once: cached under $ORCA_JAX_HOME) and convert the checkpoint every phase uses."""
    from ..checkpoints.store import load_config
    hf_dir, ckpt = ctx.model()
    c = load_config(ckpt)
    res.update(spec=ctx.args.model or ctx.sizes.model, hf_dir=hf_dir, checkpoint=ckpt, model_type=c.model_type,
               params=c.num_params(), layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads,
               vocab=c.vocab_size, stored_dtype=c.dtype)
    return (f"{res['spec']}: {c.model_type}, {c.num_params() / 1e6:.1f}M parameters, {c.num_layers} layers, "
            f"d={c.hidden_size} ({c.dtype}); {'with' if hf_dir else 'no'} Hugging Face checkpoint")


# -- 2. numerics ------------------------------------------------------------------------------

def phase_numerics(ctx: Context, res: dict) -> str:
    """The served path (engine, KV pages, sampling program) against HF torch on CPU: the
    top-20 log-probabilities of each greedy step (log_softmax of the logits: the logits up to
    the row's constant) and the greedy tokens, float32 and bfloat16."""
    import jax
    import transformers
    hf_dir, ckpt = ctx.model()
    if hf_dir is None:
        raise Skipped("the model has no Hugging Face checkpoint to compare with")
    s = ctx.sizes
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()  # the reference: float32
    prompt = np.random.default_rng(ctx.args.seed).integers(0, hf.config.vocab_size, s.numerics_prompt).tolist()
    res.update(prompt_len=len(prompt), steps=s.numerics_steps, tolerance_float32=FP32_TOL,
               jax_default_matmul_precision=jax.config.jax_default_matmul_precision)
    lines = []
    for dtype in ("float32", "bfloat16"):
        r = res[dtype] = compare_with_hf(hf, ckpt, prompt, s.numerics_steps, dtype)
        lines.append(f"{dtype} max|dlogprob| {r['max_abs_logprob_diff']:.1e}, greedy "
                     f"{r['greedy_equal_steps']}/{s.numerics_steps}")
    f32 = res["float32"]
    check(f32["max_abs_logprob_diff"] <= FP32_TOL,
          f"float32 log-probs differ from HF by {f32['max_abs_logprob_diff']:.2e} > {FP32_TOL:g} "
          f"(matmul precision {f32['matmul_precision']})")
    check(f32["greedy_equal_steps"] == s.numerics_steps,
          f"float32 greedy tokens leave HF's after {f32['greedy_equal_steps']} of {s.numerics_steps} steps")
    return "; ".join(lines) + f" (matmul precision {f32['matmul_precision']})"


def compare_with_hf(hf, ckpt: str, prompt: list[int], steps: int, dtype: str) -> dict:
    """The engine's greedy tokens and top log-probs in `dtype` against HF (float32, CPU) fed
    the same tokens."""
    import jax
    import torch
    from ..llm import LLM
    from ..request import MAX_LOGPROBS, SamplingParams
    llm = LLM(ckpt, dtype=dtype, max_batch_size=1, max_model_len=len(prompt) + steps, warmup=False)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True,
                                                logprobs=MAX_LOGPROBS), use_tqdm=False)[0]
    precision = getattr(llm.engine.runner, "matmul_precision", None) or jax.config.jax_default_matmul_precision
    del llm
    gc.collect()
    tokens = list(out.token_ids)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:len(prompt) - 1 + steps]
    ref = torch.log_softmax(logits.double(), -1).numpy()                     # [steps, V]
    diffs = [abs(lp - ref[i, t]) for i, step in enumerate(out.logprobs) for t, lp in step["top"].items()]
    argmax = logits.argmax(-1).tolist()
    equal = next((i for i, (a, b) in enumerate(zip(tokens, argmax)) if a != b), len(tokens))
    return {"matmul_precision": str(precision), "max_abs_logprob_diff": float(max(diffs)),
            "mean_abs_logprob_diff": float(np.mean(diffs)), "compared_logprobs": len(diffs),
            "reference_logit_std": float(logits.std()), "greedy_equal_steps": equal,
            "argmax_agreement": float(np.mean([a == b for a, b in zip(tokens, argmax)])),
            "tokens": tokens, "hf_argmax": argmax}


# -- 3. warm-up -------------------------------------------------------------------------------

MIXED_PARAMS = (  # every sampling feature, so a program compiled only on demand would show
    dict(temperature=0.0),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, top_k=20),
    dict(temperature=0.7, min_p=0.05, seed=1),
    dict(temperature=0.9, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3),
    dict(temperature=0.0, logprobs=5),
)


def phase_warmup(ctx: Context, res: dict) -> str:
    from .systems import EngineSystem
    _, ckpt = ctx.model()
    ctx.close()
    t0 = time.perf_counter()
    with CompileEvents() as ev:
        ctx.system = EngineSystem("gpu-check", ckpt, ctx.engine_config(), dtype=ctx.args.dtype)
    eng = ctx.system.engine
    runner = eng.runner
    res.update(ready_s=time.perf_counter() - t0, warmup_seconds=runner.warmup_seconds,
               programs=runner.num_compiles, bucket_shapes=len(eng.buckets.shapes()),
               buckets={"decode": list(eng.buckets.decode), "prefill": list(eng.buckets.prefill)},
               attention=runner.attention, dtype=str(eng.model_config.dtype), kv_pages=eng.kv.num_pages,
               controls={k: getattr(runner, k, None) for k in ("sampling_control", "matmul_precision")},
               kv_bytes_per_device=getattr(runner, "kv_bytes", None), compile_events=ev.summary(),
               per_program_seconds=getattr(runner, "warmup_times", None))  # a hook the runner may add
    before = runner.num_compiles
    with CompileEvents() as after:
        res["mixed_run"] = run_mixed(eng, *ctx.sizes.mixed, ctx.args.seed)
    res["compiles_after_warmup"] = runner.num_compiles - before
    res["backend_compiles_after_warmup"] = after.summary()["backend_compiles"]
    check(res["compiles_after_warmup"] == 0,
          f"{res['compiles_after_warmup']} step programs compiled after warm-up")
    return (f"{res['programs']} programs in {res['warmup_seconds']:.1f} s (ready in {res['ready_s']:.1f} s, "
            f"{ev.hits} cache hits, attention {runner.attention}); 0 compiles in a "
            f"{res['mixed_run']['requests']}-request mixed run")


def run_mixed(eng, n: int, prompt_len: str, output_len: str, seed: int) -> dict:
    """`n` requests of mixed lengths and sampling parameters, two arriving per iteration."""
    from ..request import SamplingParams
    from . import workloads
    trace = workloads.offline(n, prompt_len, output_len, eng.model_config.vocab_size, seed)
    todo = [(list(r.prompt_ids), SamplingParams(max_tokens=r.output_len, ignore_eos=True,
                                                **MIXED_PARAMS[i % len(MIXED_PARAMS)]))
            for i, r in enumerate(trace.requests)]
    iterations, tokens = 0, 0
    while todo or eng.has_unfinished():
        for prompt, params in todo[:2]:
            eng.add_request(prompt, params)
        del todo[:2]
        tokens += sum(len(o.token_ids) for o in eng.step())
        iterations += 1
    return {"requests": n, "iterations": iterations, "output_tokens": tokens}


# -- 4. donation ------------------------------------------------------------------------------

def phase_donation(ctx: Context, res: dict) -> str:
    import jax
    from ..request import SamplingParams
    eng = ctx.engine()
    runner = eng.runner
    kv_pointers = lambda: _pointers([st.kv for st in runner.device_states])  # noqa: E731
    all_pointers = lambda: _pointers(runner.device_states)  # noqa: E731
    kv_old = jax.tree.leaves([st.kv for st in runner.device_states])
    kv0, all0 = kv_pointers(), all_pointers()
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    long = min(ctx.sizes.max_model_len - 8, ctx.sizes.max_num_batched_tokens + 8)  # chunked if it can be
    eng.add_request(list(range(1, long + 1)), greedy)
    eng.add_request([5], greedy)
    steps = kv_moved = state_moved = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
        kv_moved += kv_pointers() != kv0
        state_moved += all_pointers() != all0
    res.update(steps=steps, kv_arrays=len(kv0), state_arrays=len(all0), kv_pointer_changes=kv_moved,
               state_pointer_changes=state_moved, old_kv_deleted=all(x.is_deleted() for x in kv_old))
    check(kv_moved == 0, f"the KV buffers moved in {kv_moved} of {steps} steps (copied, not donated)")
    check(res["old_kv_deleted"], "the step did not donate the KV buffers (the old arrays are alive)")
    return (f"{len(kv0)} KV arrays at the same device address over {steps} steps, donated; other state "
            f"moved in {state_moved} steps")


def _pointers(tree) -> list[int]:
    """The device address of every array in `tree`."""
    import jax
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


# -- 5. throughput ----------------------------------------------------------------------------

def phase_throughput(ctx: Context, res: dict) -> str:
    """Offline throughput, then each decode batch's step time against its floor (bench/
    decode_step.py: read bandwidth from a jitted sum over 1 GiB, the matmul ceiling at the
    engine's matmul precision)."""
    from . import decode_step, workloads
    from .metrics import summarize
    from .systems import Clock
    eng, s = ctx.engine(), ctx.sizes
    cfg = eng.model_config
    bandwidth, flops = decode_step.ceilings(cfg.jnp_dtype)
    res.update(bandwidth_gbs=bandwidth / 1e9, matmul_gflops=flops / 1e9,
               matmul_precision=getattr(eng.runner, "matmul_precision", None))
    n, p, o = s.offline
    records, info = ctx.system.run(workloads.offline(n, str(p), str(o), cfg.vocab_size, ctx.args.seed), Clock())
    m = summarize(records)
    res["offline"] = {"requests": n, "prompt_len": p, "output_len": o, "output_throughput": m["output_throughput"],
                      "duration_s": m["duration_s"], "tpot_ms_median": m["tpot_ms"]["median"], **info}
    res["decode"] = [decode_row(eng, b, s.rounds, s.steps, bandwidth, flops) for b in s.batches]
    steps = ", ".join(f"b{r['batch']} {r['step_ms']:.2f} ms ({r['ratio']:.1f}x {r['floor_bound']} floor)"
                      for r in res["decode"])
    return (f"offline {n}x{p}->{o}: {m['output_throughput']:.0f} out tok/s; step {steps}; "
            f"{bandwidth / 1e9:.0f} GB/s, {flops / 1e9:.0f} GFLOP/s")


def decode_row(eng, batch: int, rounds: int, steps: int, bandwidth: float, flops: float) -> dict:
    from .decode_step import floors, step_seconds
    t, context = step_seconds(eng, batch, rounds, steps)
    f = floors(eng.model_config, batch, context, bandwidth, flops)
    bound = max(f, key=f.get)
    return {"batch": batch, "decode_rows": eng.buckets.decode_rows(batch, 0), "context": context,
            "step_ms": t * 1e3, "floor_ms": f[bound] * 1e3, "floor_bound": bound, "ratio": t / f[bound],
            "output_tok_s": batch / t}


# -- 6. host ----------------------------------------------------------------------------------

def phase_host(ctx: Context, res: dict) -> str:
    eng, s = ctx.engine(), ctx.sizes
    res["engine"] = host_and_wait(eng, *s.host, ctx.args.seed)
    res["host_only"] = host_only(s.host_only, s.host_only_steps)
    res["profile"] = profile(eng, ctx.out / "profile", s.profile_steps, ctx.args.seed)  # last: needs the profiler
    e, pr = res["engine"], res["profile"]
    d2h = (f"{pr['d2h_copies_per_step']:.1f} D2H copies/step" if pr["device_planes"]
           else "no device plane in the trace (no D2H copies to count)")
    ho = ", ".join(f"{h['running']} running {h['median_ms']:.2f} ms" for h in res["host_only"])
    return (f"per iteration: host {e['host_ms']['median']:.2f} ms, device wait {e['wait_ms']['median']:.2f} ms "
            f"(median of {e['iterations']}); profile: {d2h}, device busy {pr['device_busy_ms_per_step']:.2f} "
            f"ms/step; host-only engine: {ho}")


def _ms(values) -> dict:
    a = np.asarray(values) * 1e3
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean())}


def host_and_wait(eng, n: int, prompt_len: int, output_len: int, seed: int) -> dict:
    """Per engine iteration in steady decode: its host time (schedule, plan, dispatch, output
    processing) and the time it blocked in `runner.fetch` waiting for the device (EngineStats)."""
    from ..request import SamplingParams
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for _ in range(n):
        eng.add_request(rng.integers(0, eng.model_config.vocab_size, prompt_len).tolist(), params)
    while eng.scheduler.waiting or any(r.in_prefill for r in eng.scheduler.running):
        eng.step()
    st, host, wait, total = eng.stats, [], [], []
    while eng.has_unfinished():
        h0, w0, t0 = st.host_seconds, st.device_wait_seconds, time.perf_counter()
        eng.step()
        total.append(time.perf_counter() - t0)
        wait.append(st.device_wait_seconds - w0)
        host.append(st.host_seconds - h0 - wait[-1])
    return {"requests": n, "iterations": len(total), "host_ms": _ms(host), "wait_ms": _ms(wait),
            "step_ms": _ms(total), "wait_fraction": float(sum(wait) / sum(total))}


D2H = re.compile(r"(?i)memcpy\s*d(evice)?\s*to\s*h|memcpyd2h|\bd2h\b|dtoh|device_?to_?host")
H2D = re.compile(r"(?i)memcpy\s*h(ost)?\s*to\s*d|memcpyh2d|\bh2d\b|htod|host_?to_?device")


def profile(eng, folder: Path, steps: int, seed: int) -> dict:
    """A `jax.profiler` trace of `steps` decode iterations: device->host and host->device
    copies on the device planes, and the programs' device time (bench/stages.py reads it)."""
    import jax
    from ..request import SamplingParams
    from .stages import _xplane, program_runs
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed + 1)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    for _ in range(min(4, eng.num_slots)):
        eng.add_request(rng.integers(0, eng.model_config.vocab_size, 16).tolist(), params)
    for _ in range(3):
        eng.step()  # prefill outside the trace
    jax.profiler.start_trace(str(folder))
    try:
        for _ in range(steps):
            eng.step()
    finally:
        jax.profiler.stop_trace()
    while eng.has_unfinished():
        eng.step()
    path = _xplane(str(folder))
    counts = copy_events(path)
    runs = program_runs(path)
    return {"steps": steps, "trace": str(path), **counts,
            "d2h_copies_per_step": counts["d2h_device_events"] / steps,
            "h2d_copies_per_step": counts["h2d_device_events"] / steps,
            "program_runs_per_step": len(runs) / steps,
            "device_busy_ms_per_step": sum(t - s for _, s, t in runs) * 1e3 / steps}


def copy_events(xplane_path: str) -> dict:
    """Copy events by direction, on device planes (the copies themselves) and host planes (the
    runtime calls that issue them), and the device planes' most frequent event names."""
    import collections

    import jax
    counts = collections.Counter()
    names = collections.Counter()
    device_planes = []
    for plane in jax.profiler.ProfileData.from_file(xplane_path).planes:
        where = "device" if plane.name.startswith("/device:") else "host"
        if where == "device":
            device_planes.append(plane.name)
        for line in plane.lines:
            for e in line.events:
                counts[f"d2h_{where}_events"] += bool(D2H.search(e.name))
                counts[f"h2d_{where}_events"] += bool(H2D.search(e.name))
                if where == "device":
                    names[e.name] += 1
    return {"device_planes": device_planes,
            **{k: counts[k] for k in ("d2h_device_events", "h2d_device_events", "d2h_host_events",
                                      "h2d_host_events")},
            "device_event_names": dict(names.most_common(25))}


def host_only(running: tuple[int, ...], steps: int) -> list[dict]:
    """bench/host.py: the real Engine.step() over a runner whose device answers at once."""
    from ..demo_model import ensure_demo_model
    from ..tokenizer import load_tokenizer
    from .host import host_step_times
    tokenizer = load_tokenizer(ensure_demo_model())
    rows = []
    for n in running:
        t = host_step_times(tokenizer, n, steps)
        rows.append({"running": n, "iterations": steps, **{f"{k}_ms": v for k, v in _ms(t).items()}})
    return rows


# -- 7. restart -------------------------------------------------------------------------------

def phase_restart(ctx: Context, res: dict) -> str:
    """A fresh process builds the warmup phase's engine again with the persistent compile
    cache the first build filled, as a restarted server does."""
    _, ckpt = ctx.model()
    first = ctx.results.get("warmup", {})
    entries = sum(1 for _ in ctx.cache.glob("*-cache")) if ctx.cache.is_dir() else 0
    spec = {"checkpoint": ckpt, "dtype": ctx.args.dtype, "engine": dataclasses.asdict(ctx.engine_config())}
    # This process holds XLA's preallocated 75% of a GPU: the restarted one allocates as it goes.
    env = dict(os.environ, ORCA_JAX_COMPILE_CACHE=str(ctx.cache), XLA_PYTHON_CLIENT_PREALLOCATE="false")
    t0 = time.perf_counter()
    child_cmd = [sys.executable, "-m", "orca_jax.bench.gpu_check", "--restart-child", json.dumps(spec)]
    proc = subprocess.run(child_cmd, env=env, capture_output=True, text=True,
                          timeout=min(BUDGETS["restart"] * ctx.args.budget_scale, ctx.time_left()))
    check(proc.returncode == 0, f"the restarted process failed: {proc.stderr[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(cache_dir=str(ctx.cache), cache_entries=entries, process_s=time.perf_counter() - t0,
               restart=child, first={k: first.get(k) for k in ("warmup_seconds", "ready_s", "programs")}
               | {"cache_hits": (first.get("compile_events") or {}).get("cache_hits")})
    check(entries == 0 or child["cache_hits"] > 0,
          f"the cache held {entries} programs but the restarted process loaded none")
    cold = first.get("warmup_seconds")
    cold_text = f"{cold:.1f} s" if cold is not None else "? s (no warmup phase)"
    return (f"warm-up {cold_text} first -> {child['warmup_seconds']:.1f} s restarted ({child['cache_hits']} "
            f"cache hits, {child['cache_misses']} misses of {entries} cached programs); restarted process "
            f"ready in {res['process_s']:.1f} s")


def restart_child(spec: dict) -> dict:
    """In the restarted process: build and warm the engine; its times and cache events."""
    from ..config import EngineConfig
    from ..engine import Engine
    t0 = time.perf_counter()
    with CompileEvents() as ev:
        eng = Engine.from_checkpoint(spec["checkpoint"], EngineConfig(**spec["engine"]), dtype=spec["dtype"])
    return {"ready_s": time.perf_counter() - t0, "warmup_seconds": eng.runner.warmup_seconds,
            "programs": eng.runner.num_compiles, **ev.summary()}


# -- 8. hlo -----------------------------------------------------------------------------------

WHILE = re.compile(r"\swhile\(")
CONDITIONAL = re.compile(r"\sconditional\(")


def phase_hlo(ctx: Context, res: dict) -> str:
    """The compiled decode step's loops and branches (a `while` without a known trip count or
    a `conditional` makes XLA:GPU copy its predicate to the host and wait, every time), and
    the sampling program's for a greedy and a fully sampled batch where the runner shows it."""
    from ..plan import warmup_plan
    eng = ctx.engine()
    runner = eng.runner
    decode = [d for d in eng.buckets.decode if d]
    res["programs"] = {}
    for td in sorted({decode[0], decode[-1]}):
        plan = warmup_plan(td, 0, eng.buckets, eng.num_slots, eng.kv, runner.host_decode_tokens)
        res["programs"][f"decode_td{td}"] = scan_hlo(_save(ctx.out / f"hlo-decode-td{td}.txt",
                                                          runner.compiled_step(0, plan)))
        if hasattr(runner, "compiled_sample"):  # (plan, sampling) -> HLO text, where the runner has it
            for kind, sampling in sampling_batches(plan.num_sample_rows).items():
                text = _save(ctx.out / f"hlo-sample-{kind}-td{td}.txt", runner.compiled_sample(plan, sampling))
                res["programs"][f"sample_{kind}_td{td}"] = scan_hlo(text)
    if not hasattr(runner, "compiled_sample"):
        res["sample"] = "not inspected: the runner has no compiled_sample(plan, sampling) hook"
    b = eng.buckets  # the largest mixed step: decode rows and prefill rows with history tiles
    plan = warmup_plan(b.decode[-1], b.prefill[-1], b, eng.num_slots, eng.kv, runner.host_decode_tokens)
    res["programs"]["mixed_largest"] = scan_hlo(_save(ctx.out / "hlo-mixed-largest.txt", runner.compiled_step(0, plan)))
    trips = sum(r["while_unknown_trip_count"] + r["conditional"] for r in res["programs"].values())
    res["host_round_trips"] = trips
    if getattr(runner, "platform", "cpu") == "gpu" and trips:
        raise AssertionError(f"{trips} runtime-trip-count loops or conditionals in the GPU path's programs "
                             f"(attention {getattr(runner, 'attention', '?')}, sampling control "
                             f"{getattr(runner, 'sampling_control', '?')}): each waits on the host")
    return "; ".join(f"{name} {r['while']} while ({r['while_unknown_trip_count']} unknown trip count), "
                     f"{r['conditional']} cond" for name, r in res["programs"].items())


def sampling_batches(rows: int) -> dict:
    """SamplingTensors of `rows` rows: all greedy, and one row using every sampling stage."""
    from ..plan import SamplingTensors
    from ..request import SamplingParams
    full = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                          presence_penalty=0.5, frequency_penalty=0.3, logprobs=5)
    return {"greedy": SamplingTensors.from_params([], [], [], rows),
            "full": SamplingTensors.from_params([full], [1], [0], rows)}


def _save(path: Path, text: str) -> str:
    path.write_text(text)
    return text


def scan_hlo(text: str) -> dict:
    """Instructions, `while` loops, those without a trip count XLA knows (it annotates the
    others `known_trip_count`, on CPU and GPU alike), and `conditional`s."""
    lines = text.splitlines()
    whiles = [ln for ln in lines if WHILE.search(ln)]
    return {"instructions": sum(" = " in ln for ln in lines), "while": len(whiles),
            "while_unknown_trip_count": sum("known_trip_count" not in ln for ln in whiles),
            "conditional": sum(bool(CONDITIONAL.search(ln)) for ln in lines)}


# -- 9. pallas --------------------------------------------------------------------------------

def phase_pallas(ctx: Context, res: dict) -> str:
    """The Pallas paged-attention kernel against the XLA path on the same requests, in bfloat16
    (the kernel's dtype: its float32 dots run in TF32): greedy tokens, top log-probs, and the
    decode step time at batch 1 and 8."""
    import jax
    if jax.default_backend() != "gpu":
        raise Skipped("no GPU")
    _, ckpt = ctx.model()
    ctx.close()  # the shared engine's memory back first
    runs = {b: pallas_run(ckpt, b, ctx.sizes, ctx.args.seed) for b in (xla_backend(), "pallas")}
    xla, pallas = runs.values()
    res.update(dtype=PALLAS_DTYPE, tolerance=PALLAS_TOL, against=xla["attention"], runs=runs,
               **agreement(xla, pallas))
    check(res["max_abs_logprob_diff"] <= PALLAS_TOL,
          f"pallas log-probs differ from {res['against']}'s by {res['max_abs_logprob_diff']:.2e} > {PALLAS_TOL:g}")
    steps = ", ".join(f"b{b} {pallas['step_ms'][b]:.2f} vs {xla['step_ms'][b]:.2f} ms" for b in pallas["step_ms"])
    return (f"pallas vs {res['against']}: tokens {'equal' if res['tokens_equal'] else 'DIFFER'}, max|dlogprob| "
            f"{res['max_abs_logprob_diff']:.1e}; decode step {steps}")


def xla_backend() -> str:
    """The XLA attention backend a GPU runs without the kernel: xla-static where this
    EngineConfig has it (no loop with a runtime trip count), else xla."""
    from ..config import EngineConfig
    try:
        return EngineConfig(attention_backend="xla-static").attention_backend
    except ValueError:
        return "xla"


def agreement(a: dict, b: dict) -> dict:
    """Two runs' greedy tokens, and the largest difference of the top log-probs both report
    (a `top` dict {token id: log-prob} per request per step)."""
    diffs = [abs(x[t] - y[t]) for ra, rb in zip(a["logprobs"], b["logprobs"])
             for x, y in zip(ra, rb) for t in x.keys() & y.keys()]
    return {"tokens_equal": a["tokens"] == b["tokens"], "max_abs_logprob_diff": float(max(diffs, default=np.inf)),
            "compared_logprobs": len(diffs)}


def pallas_run(ckpt: str, backend: str, s: Sizes, seed: int) -> dict:
    """Greedy tokens and top-5 log-probs of a few prompts, and decode step times, with one
    attention backend (a 64-token budget: few programs to compile)."""
    from ..llm import LLM
    from ..request import SamplingParams
    batch = min(8, s.max_batch_size)
    llm = LLM(ckpt, dtype=PALLAS_DTYPE, max_batch_size=batch, max_num_batched_tokens=64,
              max_model_len=s.max_model_len, warmup=False, attention_backend=backend)
    rng = np.random.default_rng(seed)
    vocab = llm.engine.model_config.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 9, 12, 16)[:batch]]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5),
                        use_tqdm=False)
    step_ms = {b: decode_row_ms(llm.engine, b, s) for b in sorted({1, batch})}
    attention = llm.engine.runner.attention
    del llm
    gc.collect()
    return {"attention": attention, "tokens": [list(o.token_ids) for o in outs], "step_ms": step_ms,
            "logprobs": [[step["top"] for step in o.logprobs] for o in outs]}


def decode_row_ms(eng, batch: int, s: Sizes) -> float:
    from .decode_step import step_seconds
    return step_seconds(eng, batch, s.rounds, s.steps)[0] * 1e3


PHASE_FNS = {"devices": phase_devices, "model": phase_model, "numerics": phase_numerics, "warmup": phase_warmup,
             "donation": phase_donation, "throughput": phase_throughput, "host": phase_host,
             "restart": phase_restart, "hlo": phase_hlo, "pallas": phase_pallas}


def main(argv: list[str] | None = None) -> int:
    """`python -m orca_jax.bench.gpu_check --restart-child SPEC`: the restart phase's process."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--restart-child":
        print("usage: orca-jax bench gpu-check (this module's own entry is the restart phase's child)",
              file=sys.stderr)
        return 2
    print(json.dumps(restart_child(json.loads(argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
