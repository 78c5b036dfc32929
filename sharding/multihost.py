"""Several processes, one global mesh: process 0 schedules and serves, every process runs the
same steps (JAX's multi-controller runtime).

    process 0 (leader)                              processes 1..N-1 (followers)
    servers -> AsyncEngine -> Engine.step()         Follower(...).run(runner):
        schedule, build_plan                            plan = recv()
        send(plan) ---- control connection ---->        runner.run(plan)
        runner.run(plan) <==== one SPMD program, collectives over gloo / NCCL ====>

Every process runs `initialize` (jax.distributed), builds the same mesh over all processes'
devices and the same Engine. With a pipeline split over processes (2 stages, each the devices
of one process: `--mesh tensor=K,pipeline=2`), each process runs only its own stage: the leader
runs stage 0 and sends its activations after the plan; the follower runs stage 1 and sampling
and sends the sampled ids back (`Leader.forward`), while the leader already runs stage 0 of
the next iteration. Only the leader has a scheduler that matters and servers; it sends
each iteration's StepPlan and sampling tensors (numpy, a few KB) to every follower over a plain
TCP connection (`multiprocessing.connection`, HMAC-authenticated), which costs tens of
microseconds, 25-50x less than a JAX broadcast collective, and reports a dead peer within
milliseconds (EOF / connection reset). Followers dispatch exactly the programs the leader
dispatches, in the same order, so the collectives inside them pair up.

Failure handling: a follower that dies closes its connection; the leader's watcher thread sees
EOF at once and calls `on_lost` (the server marks the engine dead: requests fail with a clear
error, health turns NOT_SERVING / 503) while the leader process stays up. That needs JAX's
`jax_enable_recoverability` (set by `initialize`): without it the coordination service aborts
every process once a peer misses its heartbeats. A follower whose leader goes away exits
non-zero. A follower that hangs (alive but stuck), or one that dies inside a collective on
GPUs (NCCL does not return), blocks the leader inside that collective: the engine's watchdog
(`--stuck-after`) then fails every request, health turns unhealthy and the server exits 3.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import pickle
import queue
import threading
import time
from multiprocessing.connection import Client, Connection, Listener, wait

import jax
import numpy as np

log = logging.getLogger("orca_jax")

_STOP = b"stop"


class FollowerLostError(RuntimeError):
    """A follower process is gone: the global mesh is broken, no step can run."""


class LeaderLostError(RuntimeError):
    """The leader closed the control connection without a stop message."""


# The environment variable the launchers (launch/local.sh, launch/slurm.sbatch) set to the JAX
# local device ids a process owns: "0,1,2,3". Unset: every device the process can see.
LOCAL_DEVICE_IDS_ENV = "ORCA_JAX_LOCAL_DEVICE_IDS"

# What JAX's fault-tolerance guide asks for on GPU so that a dead peer neither takes this
# process down nor leaves it stuck in a collective forever
# (https://docs.jax.dev/en/latest/fault_tolerance.html, "Surviving Faults" and "Cancelling
# Collectives"): NCCL errors must not terminate the process, and collectives run
# asynchronously on non-blocking communicators so that they can be aborted when a
# participant fails.
GPU_FAULT_TOLERANCE_XLA_FLAGS = ("--xla_gpu_nccl_terminate_on_error=false",
                                 "--xla_gpu_nccl_async_execution=true",
                                 "--xla_gpu_nccl_blocking_communicators=false")
GPU_FAULT_TOLERANCE_ENV = {"XLA_PYTHON_CLIENT_ABORT_COLLECTIVES_ON_FAILURE": "1",
                           "XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT": "1"}
# "0" turns them off (e.g. to compare against XLA's defaults).
GPU_FAULT_TOLERANCE_SWITCH = "ORCA_JAX_GPU_FAULT_TOLERANCE"


def initialize(coordinator: str, num_processes: int, process_id: int,
               local_device_ids: list[int] | None = None, heartbeat_timeout_s: int = 10) -> None:
    """`jax.distributed.initialize` (coordinator "host:port" of process 0), with gloo as the
    CPU collectives so CPU-only runs (tests, laptops) work across processes, and recoverability
    on so that a dead peer does not abort this process. Call it before anything touches a
    device.

    `local_device_ids`: the JAX ids of the GPUs this process owns (`local_device_ids_from_env`);
    None means every device it can see. JAX's cluster auto-detection is turned off: under
    `srun` it would otherwise set `local_device_ids=[$SLURM_LOCALID]` (one GPU per process),
    which breaks a one-process-per-node mesh; coordinator, count and id are given anyway."""
    on_gpu = not os.environ.get("JAX_PLATFORMS", "").startswith("cpu") and _has_accelerator_plugin()
    if not on_gpu:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    elif os.environ.get(GPU_FAULT_TOLERANCE_SWITCH, "1") != "0":
        os.environ.update(gpu_fault_tolerance_env(os.environ))  # read when the GPU client starts
    try:  # experimental in JAX 0.10: without it a dead peer aborts this process
        jax.config.update("jax_enable_recoverability", True)
    except AttributeError:
        log.warning("this JAX has no jax_enable_recoverability: a dead follower will abort the "
                    "leader after the heartbeat timeout instead of leaving it up to report it")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               cluster_detection_method="deactivate",
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
    jax.devices()  # every process creates its backend now (a rendezvous), before anything else


def local_device_ids_from_env(environ=os.environ) -> list[int] | None:
    """$ORCA_JAX_LOCAL_DEVICE_IDS ("0,1,2,3") as a list, or None when unset or empty. These
    are JAX's local device ids, i.e. indices among the GPUs CUDA shows this process (after
    any CUDA_VISIBLE_DEVICES): a process given 0-3 of a machine's 8 still sees the other 4,
    which NCCL needs for peer-to-peer transfers between processes on one host."""
    text = environ.get(LOCAL_DEVICE_IDS_ENV, "").strip()
    if not text:
        return None
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"${LOCAL_DEVICE_IDS_ENV} must be comma-separated device ids such as "
                         f"0,1,2,3; got {text!r}") from None
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise ValueError(f"${LOCAL_DEVICE_IDS_ENV} must list distinct non-negative device ids; "
                         f"got {text!r}")
    return ids


def gpu_fault_tolerance_env(environ) -> dict[str, str]:
    """The variables to set for JAX's GPU fault tolerance (GPU_FAULT_TOLERANCE_*), given the
    current environment: the user's XLA_FLAGS are kept and win (a flag they already set is not
    added again), and so do variables they set themselves."""
    flags = environ.get("XLA_FLAGS", "")
    given = {f.split("=", 1)[0] for f in flags.split()}
    extra = [f for f in GPU_FAULT_TOLERANCE_XLA_FLAGS if f.split("=", 1)[0] not in given]
    out = {k: v for k, v in GPU_FAULT_TOLERANCE_ENV.items() if k not in environ}
    if extra:
        out["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return out


def _has_accelerator_plugin() -> bool:
    import importlib.util
    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def control_address(coordinator: str, port: int | None = None) -> tuple[str, int]:
    """Where the leader listens for followers: the coordinator's host, `port` or the
    coordinator's port + 1."""
    host, _, cport = coordinator.rpartition(":")
    if not host or not cport.isdigit():
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    return host, port or int(cport) + 1


def _authkey() -> bytes:
    """Shared secret of the control connections ($ORCA_JAX_CONTROL_KEY; set it on untrusted networks)."""
    return os.environ.get("ORCA_JAX_CONTROL_KEY", "orca-jax-control").encode()


def _wire_plan(plan, sampling) -> bytes:
    # The host bookkeeping (`rows`: Request objects) stays on the leader: followers only run.
    return pickle.dumps((dataclasses.replace(plan, rows=[]), sampling), protocol=pickle.HIGHEST_PROTOCOL)


class Leader:
    """Process 0's end of the control connections: sends every plan, watches every follower."""

    def __init__(self, address: tuple[str, int], num_followers: int, timeout_s: float = 600.0):
        self.lost: str | None = None
        self._closing = False
        self._conns: dict[int, Connection] = {}
        bind = ("0.0.0.0" if address[0] not in ("127.0.0.1", "localhost") else address[0], address[1])
        listener = Listener(bind, authkey=_authkey())
        accepted: list[Connection] = []
        done = threading.Event()

        def accept():
            while len(accepted) < num_followers:
                try:
                    accepted.append(listener.accept())
                except OSError:  # closed on timeout
                    break
                except Exception as e:  # a stray connection (port probe, wrong key): keep going
                    log.warning("leader: refused a control connection: %s: %s", type(e).__name__, e)
            done.set()

        threading.Thread(target=accept, name="orca-accept", daemon=True).start()
        ok = done.wait(timeout_s)
        listener.close()
        if not ok or len(accepted) < num_followers:
            raise TimeoutError(f"{len(accepted)} of {num_followers} follower(s) connected to "
                               f"{bind[0]}:{bind[1]} within {timeout_s:.0f} s")
        for conn in accepted:
            self._conns[int(conn.recv())] = conn  # each follower says its process id first
        log.info("leader: followers %s connected", sorted(self._conns))

        # Everything to the followers goes through one ordered queue and thread: a plan, then
        # (pipeline split over processes) the activations of that plan's stage 0, then the
        # next plan. Replies (the last stage's sampled ids) come back in the same order.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self._lock = threading.Lock()  # `lost` and `_pending` change together
        self._on_lost = None
        threading.Thread(target=self._send_loop, name="orca-plans", daemon=True).start()
        self._receiver = threading.Thread(target=self._receive_loop, name="orca-followers", daemon=True)
        self._receiver.start()

    def send_plan(self, plan, sampling) -> None:
        """The Engine's hook before each iteration is dispatched: every follower gets the plan."""
        if self.lost is not None:
            raise FollowerLostError(self.lost)
        self._outbox.put(_wire_plan(plan, sampling))

    def forward(self, x: jax.Array) -> concurrent.futures.Future:
        """Stage 0's activations to the process of the last stage (once computed, off this
        thread); the future resolves to that stage's SampleOutput (numpy)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.lost is not None:
                raise FollowerLostError(self.lost)
            self._pending.append(fut)
        self._outbox.put(x)
        return fut

    def watch(self, on_lost) -> None:
        """Call `on_lost(message)` (from a thread) as soon as a follower's connection closes."""
        self._on_lost = on_lost
        if self.lost is not None:
            on_lost(self.lost)

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            if self.lost is not None and item != _STOP:  # the stop still reaches live followers
                continue
            pid = None
            try:
                if isinstance(item, jax.Array):  # waits for stage 0 here, not on the engine thread
                    item = pickle.dumps(np.asarray(item), protocol=pickle.HIGHEST_PROTOCOL)
                for pid, conn in self._conns.items():
                    try:
                        conn.send_bytes(item)
                    except OSError:
                        if item != _STOP:
                            raise
            except Exception as e:  # a dead follower, or stage 0 failed on the device
                self._lost_now(pid, e)

    def _receive_loop(self) -> None:
        conns = {conn: pid for pid, conn in self._conns.items()}
        while conns:
            for conn in wait(list(conns)):
                pid = conns[conn]
                try:  # followers only send the last stage's results; readable otherwise = EOF
                    reply = pickle.loads(conn.recv_bytes())
                    with self._lock:
                        fut = self._pending.popleft() if self._pending else None
                    if fut is not None:
                        fut.set_result(reply)
                except (EOFError, OSError) as e:
                    del conns[conn]
                    if not self._closing:  # else: a follower leaving after our stop message
                        self._lost_now(pid, e)
                except Exception as e:  # an unreadable reply: the group is out of step
                    self._lost_now(pid, e)

    def _lost_now(self, pid: int | None, e: BaseException) -> None:
        with self._lock:
            first = self.lost is None
            self._lose(pid, e)
            pending, self._pending = list(self._pending), collections.deque()
        if first and self._on_lost is not None:  # first, so that its message is the one requests get
            self._on_lost(self.lost)
        for fut in pending:
            fut.set_exception(FollowerLostError(self.lost))

    def _lose(self, pid: int | None, e: BaseException) -> None:
        if self.lost is None:
            who = f"follower process {pid} of {len(self._conns) + 1} is gone" if pid is not None else \
                "the leader could not hand work to its followers"
            self.lost = (f"{who} ({type(e).__name__}: {e}): the multi-process mesh is broken; "
                         "restart the group")
            log.error("%s", self.lost)

    def close(self, timeout_s: float = 30.0) -> None:
        """Tell every follower to exit, and wait until they have left JAX's distributed runtime
        (they close their connection after `jax.distributed.shutdown`): the coordination
        service lives in this process and must outlive their shutdown calls."""
        self._closing = True
        self._outbox.put(_STOP)
        self._outbox.put(None)
        self._receiver.join(timeout_s)  # it ends once every follower has closed its connection
        for conn in self._conns.values():
            conn.close()


class Follower:
    """A follower's end: connect to the leader first (before building the engine, whose
    start-up runs collectives with the leader's), then `run` every plan until told to stop."""

    def __init__(self, address: tuple[str, int], timeout_s: float = 600.0):
        self.address = address
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._conn = Client(address, authkey=_authkey())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no leader listening on {address[0]}:{address[1]} "
                                       f"after {timeout_s:.0f} s")
                time.sleep(0.2)
        self._conn.send(jax.process_index())
        log.info("follower %d: connected to the leader at %s:%d", jax.process_index(), *address)

    def _recv(self) -> bytes:
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError) as e:
            raise LeaderLostError(f"the leader at {self.address[0]}:{self.address[1]} went "
                                  f"away ({type(e).__name__})") from e

    def run(self, runner) -> None:
        """Run the leader's plans on `runner` (a ModelRunner) until it says stop. Raises LeaderLostError if
        the leader goes away without saying so."""
        with self._conn:
            while True:
                data = self._recv()
                if data == _STOP:
                    jax.block_until_ready(runner.device_states)
                    jax.distributed.shutdown()  # while the leader's coordination service is up
                    return
                plan, sampling = pickle.loads(data)
                if not runner.local_stages[0].first:  # a later pipeline stage: stage 0's output
                    data = self._recv()
                    if data == _STOP:  # the leader failed between the plan and its activations
                        raise LeaderLostError("the leader stopped in the middle of an iteration")
                    x = pickle.loads(data)
                    out = runner.run(plan, sampling, x)
                    self._conn.send_bytes(pickle.dumps(jax.tree.map(np.asarray, out),
                                                       protocol=pickle.HIGHEST_PROTOCOL))
                else:
                    runner.run(plan, sampling)
