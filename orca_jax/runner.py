"""The device side of the engine: parameters, KV state and compiled programs on a mesh.

    runner = ModelRunner(config, params, EngineConfig(), mesh, layout)
    runner.warmup(buckets)                  # compile every bucket's program now
    out = runner.run(plan, sampling)        # asynchronous: returns before the device is done
    sampled = runner.fetch(out, logprobs)   # blocks: the sampled ids as numpy

It places the parameters by the sharding layout (split over pipeline stages when the mesh has
a `pipeline` axis, sharding/pipeline.py), sizes the KV page pool from a memory budget (pages
sharded like the KV heads; each stage holds its own layers' pages), allocates each stage's
DeviceState once, and jits one forward program per stage and one sampling
program; every (Td, Tp) bucket shape is one compiled variant of them. `num_compiles` counts
traces so tests can assert that nothing compiles after warm-up.

Several processes: `peers` (sharding/multihost.py `Leader`) receive every plan before it runs
here; followers call `run` with the leader's plans (sharding/multihost.py `Follower`).
The engine core (engine.py) never touches JAX: it hands plans in and reads ids back.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import EngineConfig
from .models import cpu_kernels
from .models.attention import KVCache
from .outputs import Sampled
from .plan import SAMPLING_SWITCHES, Buckets, PagedKV, SamplingTensors, StepPlan, warmup_plan
from .sampling import SampleOutput, masked_argmax
from .sharding.layouts import Layout, get_layout, param_shardings, pipelined
from .sharding.mesh import single_device_mesh
from .sharding.pipeline import PIPELINE, Stage, local_stage_params, local_stages, split_stages, stage_keys
from .kv_pages import pages_for, pool_pages_for
from .sharding.plan import fit_kv_pages, kv_bytes_per_device, kv_placement, slot_state_bytes
from .structured import constraint_tensors
from .step import DeviceState, init_device_state, pack_inputs, run_sample, run_step, runtime_params

log = logging.getLogger("orca_jax")


def enable_compile_cache() -> str | None:
    """Persist compiled programs across processes (JAX's compilation cache), so only the first
    start-up of a model and bucket set pays for warm-up. $ORCA_JAX_COMPILE_CACHE picks the
    folder (default ~/.cache/orca-jax/xla); "off" disables it. With it JAX also keeps XLA:GPU's
    autotuning results (per fusion, in its xla_gpu_per_fusion_autotune_cache_dir; process 0
    writes them, the others read), so every rank of a group shares them when the folder is
    on a shared file system (launch/slurm.sbatch puts it there). Not
    jax_share_binary_between_hosts (process 0 compiles, the others fetch its binary): with
    it a two-process group hung at start-up (tests/test_multihost.py), probably because
    JAX gives process 0 other compile options (that autotune cache mode) and so another key."""
    path = os.environ.get("ORCA_JAX_COMPILE_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "orca-jax", "xla"))
    if path == "off":
        return None
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def memory_maps() -> tuple[int, int] | None:
    """(memory regions this process maps, the kernel's limit vm.max_map_count); None off Linux."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f), limit
    except (OSError, ValueError):
        return None


def check_map_budget(start: int, compiled: int, total: int) -> None:
    """XLA:CPU maps three memory regions per compiled kernel (its code, constants and data),
    ~100 + 33 per layer for each step program of GPT-2: a 48-layer model's 35 programs come
    near Linux's default limit of 65530, past which the process dies in the compiler with a
    segmentation fault. Stop warm-up with a clear error before that: `start` maps before it,
    `compiled` of `total` programs done."""
    now, limit = memory_maps() or (0, 0)
    if not limit:
        return
    expected = now + (now - start) / compiled * (total - compiled)
    if expected > 0.9 * limit:
        raise RuntimeError(
            f"compiling all {total} step programs would map about {int(expected)} memory regions, "
            f"over 90% of this machine's limit vm.max_map_count={limit} (XLA:CPU maps 3 per "
            f"compiled kernel; past the limit the process crashes). Raise it (sudo sysctl -w "
            f"vm.max_map_count=262144) or compile fewer programs (a smaller --max-batch-size, "
            f"--max-num-batched-tokens or --max-prefill-seqs)")


def _cpu_kernel_unfit(mesh, dtype) -> str | None:
    """Why the CPU kernels (models/cpu_kernels.py: attention, dense layers) cannot run this
    model on this mesh, or None: they take float32 and are not partitioned, so each pipeline
    stage must be one device; they must build here."""
    if mesh.devices.flat[0].platform != "cpu":
        return "the CPU kernels run on CPU devices only"
    if jnp.dtype(dtype) != jnp.float32:
        return f"the CPU kernels take float32 models, not {jnp.dtype(dtype).name}"
    if mesh.size // mesh.shape.get(PIPELINE, 1) > 1:
        return f"the CPU kernels run on one device per pipeline stage, not mesh {dict(mesh.shape)}"
    return cpu_kernels.load()


def resolve_matmul_backend(backend: str, mesh, dtype=jnp.float32) -> str:
    """`--matmul-backend` as this mesh runs it: "cpu" (the C++ kernel over packed weights,
    models/cpu_kernels.py) where it fits, else "xla"."""
    why = _cpu_kernel_unfit(mesh, dtype)
    if backend == "auto":
        if why and mesh.devices.flat[0].platform == "cpu":
            log.info("matmul backend xla: %s", why)
        return "xla" if why else "cpu"
    if backend == "cpu" and why:
        raise ValueError(f"--matmul-backend cpu: {why}; use xla (or auto)")
    return backend


def resolve_attention_backend(backend: str, mesh, kv: PagedKV, head_dim: int,
                              sliding_window: int | None = None, dtype=jnp.float32) -> str:
    """`--attention-backend` as this mesh runs it (models/attention.py `attend`): on CUDA
    "pallas" (the paged-attention kernel for decode rows, models/pallas_attention.py) for
    16-bit models, else "xla-static" (the kernel's float32 dots run in TF32, and it attends to
    whole contexts: no sliding window); on CPU "cpu" (the C++ attention kernel,
    models/cpu_kernels.py) where it fits, else "xla"."""
    gpu = mesh.devices.flat[0].platform == "gpu"
    if backend == "auto":
        fits = _pow2(kv.page_size) and _pow2(head_dim) and not sliding_window
        if gpu:
            backend = "pallas" if fits and jnp.dtype(dtype).itemsize == 2 else "xla-static"
        else:
            why = _cpu_kernel_unfit(mesh, dtype)
            if why and mesh.devices.flat[0].platform == "cpu":
                log.info("attention backend xla: %s", why)
            backend = "xla" if why else "cpu"
    elif backend == "cpu" and (why := _cpu_kernel_unfit(mesh, dtype)):
        raise ValueError(f"--attention-backend cpu: {why}; use xla (or auto)")
    if backend == "pallas" and sliding_window:
        raise ValueError("--attention-backend pallas does not apply a sliding window; use xla-static (or auto)")
    if backend == "pallas":
        if not gpu:
            raise ValueError("--attention-backend pallas runs on CUDA GPUs only; use xla (or auto)")
        if not (_pow2(kv.page_size) and _pow2(head_dim)):
            raise ValueError(f"the Pallas GPU kernel needs a power-of-two page size and head dim, "
                             f"got {kv.page_size} and {head_dim}; use --attention-backend xla-static")
    return backend


def resolve_controls(config: EngineConfig, platform: str, dtype) -> tuple[str, str]:
    """(sampling control, matmul precision) as `--sampling-control` and `--matmul-precision`
    resolve on `platform` for parameters of `dtype`: the sampler's stages switched by the
    host on GPU (no conditional in the program), by lax.cond elsewhere; float32 models at full
    float32 precision (NVIDIA GPUs would otherwise run their matmuls in TF32 and drift from
    Hugging Face's outputs), 16-bit models at the platform's default."""
    control = config.sampling_control
    if control == "auto":
        control = "host" if platform == "gpu" else "device"
    precision = config.matmul_precision
    if precision == "auto":
        precision = "highest" if jnp.dtype(dtype) == jnp.float32 else "default"
    return control, precision


def _spec(x, sharding) -> jax.ShapeDtypeStruct:
    """What `jit(...).lower` needs of an array (or its shape) that a step puts on `sharding`."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _slot_state(state: DeviceState) -> DeviceState:
    """What the sampling program takes and donates of the last stage's state: the slots'
    last tokens and histories, not the KV pages (it does not read them)."""
    return dataclasses.replace(state, kv=None)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def kv_budget_bytes(config: EngineConfig, device) -> int:
    """Bytes for the KV pages (and sequence state) on `device`, once the weights are placed:
    `--kv-memory`, else `--kv-memory-fraction` of what XLA's allocator can still hand out
    (accelerators; default 0.9, the rest for each step's temporaries) or of RAM (CPU; 0.5)."""
    if config.kv_memory is not None:
        return config.kv_memory
    if device.platform == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int((config.kv_memory_fraction or 0.5) * ram)
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ValueError(f"{device.platform} device {device.id} reports no memory limit (XLA's "
                         f"platform allocator, XLA_PYTHON_CLIENT_ALLOCATOR=platform?), so the KV "
                         "pages cannot be sized from it: give --kv-memory BYTES")
    return int((config.kv_memory_fraction or 0.9) * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))


class ModelRunner:
    def __init__(self, config, params, engine_config: EngineConfig = EngineConfig(),
                 mesh: jax.sharding.Mesh | None = None, layout: str | Layout = "replicated",
                 peers=None):
        """`params` (a pure dict) are placed on `mesh` (default: one device) by the sharding
        `layout`; the KV buffer follows the same layout; step inputs are replicated. A
        `pipeline` axis of the mesh splits the layers into stages (sharding/pipeline.py).
        `peers` (sharding/multihost.py `Leader`): the other processes of a multi-process mesh;
        `peers.send_plan(plan, sampling)` runs before every dispatch (warm-up included), and
        when the pipeline's later stages live in other processes, `peers.forward(x)` hands
        them stage 0's activations and returns a future of the last stage's sampled ids."""
        enable_compile_cache()
        self.model_config = config
        self.mesh = mesh or single_device_mesh()
        self.layout = get_layout(layout)
        self.peers = peers
        if {d.process_index for d in self.mesh.devices.flat} != set(range(jax.process_count())):
            raise ValueError(f"the mesh {dict(self.mesh.shape)} does not span the devices of all "
                             f"{jax.process_count()} processes; give --mesh over every process's "
                             "devices (e.g. tensor=N x devices per process)")
        self.stages: list[Stage] = split_stages(self.mesh, config.num_layers)
        self.n_stages = len(self.stages)
        # Several processes and stages: each process runs its own stage (sharding/pipeline.py).
        self.local_stages = local_stages(self.stages)
        self.stage_config = config.replace(num_layers=config.num_layers // self.n_stages)
        self.matmul = resolve_matmul_backend(engine_config.matmul_backend, self.mesh, config.jnp_dtype)
        # per local stage: the sub-tree it holds, on its sub-mesh, per layer
        self._params = [self._place(params, st) for st in self.local_stages]
        del params
        self.max_len = min(engine_config.max_model_len or config.max_positions, config.max_positions)
        self.platform = self.mesh.devices.flat[0].platform
        self.num_slots = engine_config.max_batch_size  # rows of the per-sequence state
        self.swap_enabled = engine_config.swap_space > 0
        self.kv, self.kv_bytes = self._size_kv(engine_config)
        self.attention = resolve_attention_backend(engine_config.attention_backend, self.mesh, self.kv,
                                                   config.head_dim, getattr(config, "sliding_window", None),
                                                   config.jnp_dtype)
        self.sampling_control, self.matmul_precision = resolve_controls(engine_config, self.platform,
                                                                        config.jnp_dtype)
        self._states = [self._init_state(st) for st in self.local_stages]
        if self.platform == "cpu":  # what the step streams, in 2 MiB pages where Linux allows
            huge = cpu_kernels.huge_pages((self._params, self._states))
            log.info("weights and KV pages: %.0f MiB in huge pages", huge / 2**20)
        if engine_config.swap_space and jax.process_count() > 1:
            raise ValueError("--swap-space works within one process; multi-process meshes "
                             "preempt by recomputing")
        self._swap_programs = [self._jit_swap(st, state) for st, state in zip(self.local_stages, self._states)]
        self.num_compiles = 0
        self._steps, self._sample = self._jit_programs()
        # Iterations whose results are not read back yet: 1 (the host prepares N+1 while the
        # device runs N) or, with pipeline stages, n_stages - 1 besides the one being launched.
        self.keep_in_flight = max(1, self.n_stages - 1)
        # Pipelined: an iteration in flight may hold a request's newest token; the host sends
        # every decode row's input token instead of the device reading its slot's last one.
        self.host_decode_tokens = self.n_stages > 1
        self.warmup_seconds = 0.0
        self.warmup_times: dict[str, float] = {}  # program ("step Td=8 Tp=64", "sample R=8") -> compile s

    def _place(self, params: dict, st: Stage) -> dict:
        """Stage `st`'s parameters on its sub-mesh, per layer. The stacked copy it places first
        is freed on return, before the KV pages are sized from the memory left."""
        sh = param_shardings(self.stage_config, st.mesh, self.layout)
        placed = local_stage_params(params, st, {k: sh[k] for k in stage_keys(st, self.model_config)},
                                    self.model_config)
        return runtime_params(self.model_config, placed, self.matmul)

    def _size_kv(self, ec: EngineConfig) -> tuple[PagedKV, int]:
        """(the page pool's geometry, bytes per device of pages and sequence state): as many
        pages as the per-device budget holds after the sequence state, but no more than every
        sequence slot can fill at max_model_len (more would only hold cached prefixes: the
        budget is a ceiling, as the slots' buffer was); the same in every process."""
        config, B = self.model_config, ec.page_size
        budget = kv_budget_bytes(ec, next(d for d in self.mesh.devices.flat  # one of this process's
                                          if d.process_index == jax.process_index()))
        itemsize = jnp.dtype(config.jnp_dtype).itemsize
        kv_layout = pipelined(self.layout)
        state = slot_state_bytes(self.num_slots, self.max_len, B)
        num_pages = fit_kv_pages(config, kv_layout, self.mesh.shape, B, budget - state, itemsize)
        # no more than every slot can fill at max_model_len, beside the admission watermark
        num_pages = min(num_pages, pool_pages_for(self.num_slots * pages_for(self.max_len, B)))
        if jax.process_count() > 1:  # every process must allocate the same pages
            from jax.experimental import multihost_utils
            num_pages = int(np.min(multihost_utils.process_allgather(np.int32(num_pages))))
        kv = PagedKV.make(num_pages, B, self.max_len)
        if num_pages < kv.max_pages:
            one = kv_bytes_per_device(config, kv_layout, self.mesh.shape, kv.max_pages, B, itemsize)
            raise ValueError(f"the KV memory budget ({budget} bytes) is smaller than one sequence of "
                             f"max_model_len={self.max_len} tokens ({one} bytes of pages + {state} "
                             "bytes of sequence state); raise --kv-memory or lower --max-model-len")
        return kv, kv_bytes_per_device(config, kv_layout, self.mesh.shape, num_pages, B, itemsize) + state

    def _init_state(self, st: Stage) -> DeviceState:
        c = self.model_config
        itemsize = jnp.dtype(c.jnp_dtype).itemsize
        kv_spec = kv_placement(self.stage_config, self.layout, dict(st.mesh.shape), self.kv.num_pages,
                               self.kv.page_size, itemsize).spec[1:]  # per layer: without "layers"
        return init_device_state(self.stage_config.num_layers, self.kv, self.num_slots, c.num_kv_heads,
                                 c.head_dim, c.jnp_dtype, NamedSharding(st.mesh, P(*kv_spec)),
                                 st.replicated, slot_state=st.last)

    def _jit_programs(self):
        """One forward program per stage and one sampling program (each compiled once per
        bucket shape); sampling takes the last stage's state without its KV pages
        (`_slot_state`). They take the packed inputs (`step.pack_inputs`) as the host's numpy
        arrays: `in_shardings` replicates them on the stage, and jit's dispatch copies them
        there itself (≈ 35 µs per program, against ≈ 200 µs for a `jax.device_put` of the
        four arrays first). Outputs keep the state's shardings, so each step's donated
        buffers are reused in place. Arguments go by position (jit takes no keywords with
        `in_shardings`): (params, state, ints, floats, x, packing) and (state, logits, ints,
        floats, packing, variant)."""
        steps = []
        sharding = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
        for st, params, state in zip(self.local_stages, self._params, self._states):
            fn = functools.partial(self._traced_step, self.stage_config, st.first, st.last, self.attention)
            steps.append(jax.jit(fn, donate_argnums=1, static_argnums=5,
                                 in_shardings=(sharding(params), sharding(state), *[st.replicated] * 3),
                                 out_shardings=(sharding(state), st.replicated)))
        last = self.local_stages[-1]
        slots_sh = sharding(_slot_state(self._states[-1]))
        sample = jax.jit(self._traced_sample, donate_argnums=0, static_argnums=(4, 5),
                         in_shardings=(slots_sh, *[last.replicated] * 3),
                         out_shardings=(slots_sh, last.replicated))
        return steps, sample

    def _jit_swap(self, st: Stage, state: DeviceState):
        """(gather, scatter) of one stage: W pages of every layer out to [H, W, B, K] arrays,
        and back into given pages (page P: dropped) with the sequence's token row and last
        token (the sampling stage). Fixed shapes: one compile each."""
        def gather(kv: KVCache, idx):
            return tuple(x[:, idx] for x in kv.k), tuple(x[:, idx] for x in kv.v)

        def scatter(state: DeviceState, idx, k, v, slot, row, last):
            put = lambda pages, new: tuple(x.at[:, idx].set(n.astype(x.dtype), mode="drop")
                                           for x, n in zip(pages, new))
            kv = KVCache(k=put(state.kv.k, k), v=put(state.kv.v, v))
            if state.history is None:
                return dataclasses.replace(state, kv=kv)
            return DeviceState(kv=kv, last_token=state.last_token.at[slot].set(last, mode="drop"),
                               history=state.history.at[slot].set(row, mode="drop"))

        shardings = jax.tree.map(lambda x: x.sharding, state)
        return jax.jit(gather), jax.jit(scatter, donate_argnums=0, out_shardings=shardings)

    def swap_out(self, pages: list[int]) -> list:
        """A copy of `pages` of every local stage in host memory (numpy; waits for the
        device to finish what was dispatched before)."""
        W, n = self.kv.max_pages, len(pages)
        idx = np.zeros(W, np.int32)
        idx[:n] = pages
        out = []
        for (gather, _), state in zip(self._swap_programs, self._states):
            k, v = jax.device_get(gather(state.kv, idx))
            out.append(([x[:, :n] for x in k], [x[:, :n] for x in v]))
        return out

    def swap_in(self, swapped: list, pages: list[int], slot: int, tokens: list[int], last: int) -> None:
        """Copy a `swap_out` result into `pages`, and give sequence slot `slot` its token
        history `tokens` and next input token `last` (asynchronous, before the next step)."""
        W, B, n = self.kv.max_pages, self.kv.page_size, len(pages)
        idx = np.full(W, self.kv.num_pages, np.int32)
        idx[:n] = pages
        row = np.zeros(W * B, np.int32)
        row[:len(tokens)] = tokens
        pad = lambda xs: [np.pad(x, ((0, 0), (0, W - n), (0, 0), (0, 0))) for x in xs]
        for i, ((_, scatter), (k, v)) in enumerate(zip(self._swap_programs, swapped)):
            self._states[i] = scatter(self._states[i], idx, pad(k), pad(v), np.int32(slot), row, np.int32(last))

    def _traced_step(self, config, first, last, attention, params, state, ints, floats, x, packing):
        self.num_compiles += 1  # runs at trace time only: one per compiled program
        with jax.default_matmul_precision(self.matmul_precision):
            return run_step(config, params, state, packing.unpack(ints, floats), x, first=first,
                            last=last, attention=attention)

    def _traced_sample(self, state, logits, ints, floats, packing, variant):
        self.num_compiles += 1
        with jax.default_matmul_precision(self.matmul_precision):
            return run_sample(state, logits, packing.unpack(ints, floats), variant, self._argmax())

    def _argmax(self):
        """The greedy pick of the sampling program: the CPU kernel library's (its
        `argmax_rows`) when the step runs one of its kernels, else `sampling.masked_argmax`."""
        if "cpu" in (self.matmul, self.attention):
            from .models import cpu_kernels
            return cpu_kernels.argmax_rows
        return masked_argmax

    def _sample_variant(self, sampling: SamplingTensors) -> str | None:
        """The sampling program's variant for this iteration (`sampling.sample`): "greedy" when
        no row needs more than an argmax (no conditional: XLA:CPU copies the [R, V] logits
        through every lax.cond, ≈ 4.5 of 8.8 ms at R = 64 for GPT-2's vocabulary); otherwise
        None when the device switches the stages, "full" when the host does. Under device
        control a constrained batch (token masks) always takes the switched program: one
        program fewer per row bucket to warm up."""
        plain = not any(getattr(sampling, f) for f in SAMPLING_SWITCHES)
        if self.sampling_control == "host":
            return "greedy" if plain else "full"
        return "greedy" if plain and not sampling.allow.shape[1] else None

    # -- what the engine core calls -------------------------------------------------------------

    def run(self, plan: StepPlan, sampling: SamplingTensors, x=None):
        """Dispatch one iteration (asynchronous): every local stage in turn, then sampling.
        Returns the sampled ids (a SampleOutput of device arrays) or, when later stages run in
        other processes, a future of them. Followers of a multi-process mesh call this with
        the leader's plans (and, on a later stage, the previous stage's activations `x`)."""
        if self.peers is not None:
            self.peers.send_plan(plan, sampling)
        (ints, floats, packing), sample_in = pack_inputs(plan, sampling if self.local_stages[-1].last else None)
        # x: activations [T, D] handed from stage to stage; the last stage's logits
        for i, st in enumerate(self.local_stages):
            if x is not None:
                x = jax.device_put(x, st.replicated)
            self._states[i], x = self._steps[i](self._params[i], self._states[i], ints, floats, x, packing)
        if not self.local_stages[-1].last:
            return self.peers.forward(x)
        slots, out = self._sample(_slot_state(self._states[-1]), x, *sample_in, self._sample_variant(sampling))
        self._states[-1] = dataclasses.replace(slots, kv=self._states[-1].kv)
        return out

    def fetch(self, out: SampleOutput | concurrent.futures.Future, logprobs: bool) -> Sampled:
        """Wait for an iteration `run` returned and read its results back to the host."""
        out = out.result() if isinstance(out, concurrent.futures.Future) else out
        if not logprobs:
            return Sampled(np.asarray(out.ids).tolist(), None, None, None)
        return Sampled(np.asarray(out.ids).tolist(), *(np.asarray(x) for x in
                                                       (out.logprob, out.top_ids, out.top_logprobs)))

    def warmup(self, buckets: Buckets) -> None:
        """Compile the program of every bucket shape now, not while serving: all of this
        process's programs in parallel threads (XLA compiles outside the GIL), then one
        all-padding iteration per shape (later stages in other processes compile theirs as
        these reach them), and each sample-row bucket's sampling program for batches that need
        more than an argmax ("full", or the device-switched one)."""
        t0 = time.perf_counter()
        shapes = buckets.shapes()
        plans = [warmup_plan(td, tp, buckets, self.num_slots, self.kv, self.host_decode_tokens)
                 for td, tp in shapes]
        greedy = lambda plan: SamplingTensors.from_params([], [], [], plan.num_sample_rows)
        runs = [(plan, greedy(plan)) for plan in plans]
        smallest = {plan.num_sample_rows: plan for plan in reversed(plans)}  # smallest step per R
        full = lambda st: dataclasses.replace(st, **dict.fromkeys(SAMPLING_SWITCHES, np.True_))
        runs += [(plan, full(greedy(plan))) for plan in smallest.values()]
        # Structured output, allowed_token_ids, logit_bias: the constrained sampling programs.
        V = self.model_config.vocab_size
        constrained = [(plan, dataclasses.replace(greedy(plan), **constraint_tensors([], plan.num_sample_rows, V)))
                       for plan in smallest.values()]
        runs += constrained
        if self.sampling_control == "host":  # device control runs both as one program
            runs += [(plan, full(st)) for plan, st in constrained]
        self._precompile(runs)
        replies = [out for out in (self.run(plan, st) for plan, st in runs)
                   if isinstance(out, concurrent.futures.Future)]
        for fut in replies:
            fut.result()
        if self.swap_enabled:  # compile the two copy programs too
            self.swap_in(self.swap_out([]), [], self.num_slots, [], 0)
        jax.block_until_ready(self._states)
        self.warmup_seconds = time.perf_counter() - t0
        log.info("warm-up: %d programs in %.1f s", self.num_compiles, self.warmup_seconds)

    def _precompile(self, runs: list[tuple[StepPlan, SamplingTensors]]) -> None:
        """Lower and compile this process's programs for `runs` in a thread pool; `run` then
        finds them in jit's cache. Each program's compile time goes to `warmup_times`. XLA:CPU
        maps memory per compiled kernel: stop before the process would pass the kernel's
        limit (`check_map_budget`)."""
        maps0 = memory_maps() if self.platform == "cpu" else None
        jobs = {}  # one per distinct program: its name -> lowered
        for plan, sampling in runs:
            (ints, floats, packing), sample_in = pack_inputs(plan, sampling if self.local_stages[-1].last else None)
            shape = f"Td={plan.num_decode} Tp={plan.num_prefill}"
            x = None
            for i, st in enumerate(self.local_stages):
                name = f"step stage {i} {shape}" if self.n_stages > 1 else f"step {shape}"
                if name not in jobs:
                    # lowered for the numpy arrays `run` passes (jit's cache tells them from
                    # device arrays), so `run` finds these programs
                    x = None if x is None else _spec(x, st.replicated)
                    jobs[name] = self._steps[i].lower(self._params[i], self._states[i], ints, floats, x, packing)
                x = jobs[name].out_info[1]  # the activations (last stage: logits) it returns
            variant = self._sample_variant(sampling)
            name = (f"sample R={plan.num_sample_rows}" + (f" {variant}" if variant else "")
                    + (" constrained" if sampling is not None and sampling.allow.shape[1] else ""))
            if sample_in is not None and name not in jobs:
                logits = _spec(x, self.local_stages[-1].replicated)
                jobs[name] = self._sample.lower(_slot_state(self._states[-1]), logits, *sample_in, variant)

        def compile_one(name, lowered):
            t0 = time.perf_counter()
            lowered.compile()
            return name, time.perf_counter() - t0

        workers = min(len(jobs), os.cpu_count() or 1) or 1
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="orca-compile") as pool:
            futures = [pool.submit(compile_one, *job) for job in jobs.items()]
            for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                name, seconds = fut.result()
                self.warmup_times[name] = seconds
                if maps0 is not None:
                    check_map_budget(maps0[0], done, len(futures))

    @property
    def params(self) -> list[dict]:
        """Each local stage's parameters, placed, as its program takes them."""
        return self._params

    def compiled_step(self, stage: int, plan: StepPlan, x: jax.Array | None = None) -> str:
        """The compiled forward program of local stage `stage` at `plan`'s shape, as HLO text
        (`x`: the activations a later stage takes), to read its collectives and loops."""
        ints, floats, packing = pack_inputs(plan, None)[0]
        lowered = self._steps[stage].lower(self._params[stage], self._states[stage], ints, floats, x, packing)
        return lowered.compile().as_text()

    def compiled_sample(self, plan: StepPlan, sampling: SamplingTensors) -> str:
        """The compiled sampling program (its variant for `sampling`) at `plan`'s shape, as HLO text."""
        st = self.local_stages[-1]
        _, sample_in = pack_inputs(plan, sampling)
        logits = jax.ShapeDtypeStruct((plan.num_sample_rows, self.model_config.vocab_size), jnp.float32,
                                      sharding=st.replicated)
        lowered = self._sample.lower(_slot_state(self._states[-1]), logits, *sample_in,
                                     self._sample_variant(sampling))
        return lowered.compile().as_text()

    @property
    def device_states(self) -> list[DeviceState]:
        """Each local stage's state (one entry without pipeline stages)."""
        return self._states
