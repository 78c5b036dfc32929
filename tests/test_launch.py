"""The multi-process launchers in launch/: no JAX process is started here.

* `launch/local.sh --dry-run` prints each process's env and the exact `orca-jax serve` command
  (through `launch/serve.sh`): the same flags for every process but `--process-id`;
* `launch/local.sh` supervising stand-in `orca-jax` processes (small bash scripts that behave
  like a leader and its followers): SIGTERM stops the group through the leader, a failing
  process stops the others and sets the exit code;
* `launch/slurm.sbatch` with stand-in `scontrol` and `srun`: each task's env and command;
* the Kubernetes manifests parse and agree with themselves (kinds, env names, mesh size =
  processes x GPUs, grace period > drain timeout, the client Service reaches process 0 only).
"""
from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "launch" / "local.sh"
SLURM = ROOT / "launch" / "slurm.sbatch"
LWS = ROOT / "launch" / "k8s" / "leaderworkerset.yaml"
STS = ROOT / "launch" / "k8s" / "statefulset.yaml"
IDENTITY = ("ORCA_JAX_COORDINATOR", "ORCA_JAX_NUM_PROCESSES", "ORCA_JAX_PROCESS_ID")

# Launcher settings that must not leak in from the environment running the tests.
SETTINGS = ("NUM_PROCESSES", "DEVICES_PER_PROCESS", "GPUS_PER_PROCESS", "COORDINATOR_PORT", "MESH",
            "LAYOUT", "HOST", "LOG_DIR", "STOP_TIMEOUT", "DRY_RUN", "MODEL", "MODEL_NAME",
            "GRPC_PORT", "HTTP_PORT", "TLS_CERT", "TLS_KEY", "AUTH_TOKEN_FILE", "DRAIN_TIMEOUT",
            "XLA_FLAGS", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "ORCA_JAX_LOCAL_DEVICE_IDS",
            "ORCA_JAX_GPUS_PER_PROCESS", "ORCA_JAX_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE",
            "SLURM_LOCALID", "SLURM_GPUS_ON_NODE", *IDENTITY)


def _env(**settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update({k: str(v) for k, v in settings.items()})
    return env


def _commands(stdout: str) -> list[tuple[dict[str, str], list[str]]]:
    """Dry-run lines `env K=V ... orca-jax serve ...` -> [(env, argv after `orca-jax`)]."""
    out = []
    for line in stdout.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        words = shlex.split(line)
        assert words[0] == "env", line
        i = words.index("orca-jax")
        out.append((dict(w.split("=", 1) for w in words[1:i]), words[i + 1:]))
    return out


def _flag(argv: list[str], name: str) -> str:
    """The value of the last `name VALUE` or `name=VALUE` in argv (argparse: the last wins)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    values += [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert values, f"{name} missing from {argv}"
    return values[-1]


def _mesh_size(spec: str) -> int:
    return math.prod(int(part.split("=")[1]) for part in spec.split(","))


# -- shell scripts -------------------------------------------------------------------------


@pytest.mark.parametrize("script", [LOCAL, SLURM, ROOT / "launch" / "serve.sh"], ids=lambda p: p.name)
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_local_help():
    r = subprocess.run([str(LOCAL), "--help"], capture_output=True, text=True, env=_env(), check=True)
    for name in ("NUM_PROCESSES", "DEVICES_PER_PROCESS", "COORDINATOR_PORT", "MESH", "LAYOUT", "--dry-run"):
        assert name in r.stdout


def test_local_dry_run_cpu():
    r = subprocess.run(
        [str(LOCAL), "--dry-run", "--max-batch-size", "8", "--layout", "slots"],
        env=_env(NUM_PROCESSES=2, DEVICES_PER_PROCESS=2, COORDINATOR_PORT=12345, MESH="tensor=4",
                 GRPC_PORT=50061, HTTP_PORT=8001, MODEL="/ckpt/gpt2"),
        capture_output=True, text=True, check=True)
    procs = _commands(r.stdout)
    assert len(procs) == 2
    for i, (env, argv) in enumerate(procs):
        # Virtual CPU devices: set in the environment, before jax is imported.
        assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        assert argv[0] == "serve"
        assert _flag(argv, "--process-id") == str(i)
        assert _flag(argv, "--num-processes") == "2"
        assert _flag(argv, "--coordinator") == "127.0.0.1:12345"
        assert _flag(argv, "--mesh") == "tensor=4"
        assert _flag(argv, "--grpc-port") == "50061" and _flag(argv, "--http-port") == "8001"
        assert _flag(argv, "--model") == "/ckpt/gpt2"
        assert _flag(argv, "--host") == "127.0.0.1"  # local.sh's default, not serve.sh's 0.0.0.0
        assert _flag(argv, "--layout") == "slots"    # the caller's flags come last and win
        assert argv[-4:] == ["--max-batch-size", "8", "--layout", "slots"]
    # Every process gets the same command but for its id: the CLI decides who opens ports.
    strip = lambda argv: [a for j, a in enumerate(argv) if a != "--process-id" and argv[j - 1] != "--process-id"]
    assert strip(procs[0][1]) == strip(procs[1][1])


def test_local_dry_run_gpus_and_default_mesh():
    r = subprocess.run([str(LOCAL)], env=_env(DRY_RUN=1, NUM_PROCESSES=2, GPUS_PER_PROCESS=4),
                       capture_output=True, text=True, check=True)
    procs = _commands(r.stdout)
    # Each process owns its 4 GPUs as JAX's local device ids, and CUDA still shows it all 8
    # (NCCL needs that for NVLink between the processes): no CUDA_VISIBLE_DEVICES.
    assert [env for env, _ in procs] == [{"ORCA_JAX_LOCAL_DEVICE_IDS": "0,1,2,3"},
                                         {"ORCA_JAX_LOCAL_DEVICE_IDS": "4,5,6,7"}]
    assert all(_flag(argv, "--mesh") == "tensor=8" for _, argv in procs)
    assert all(_flag(argv, "--coordinator") == "127.0.0.1:8476" for _, argv in procs)


def test_local_dry_run_gpus_four_processes_of_two():
    r = subprocess.run([str(LOCAL), "--dry-run"], env=_env(NUM_PROCESSES=4, GPUS_PER_PROCESS=2),
                       capture_output=True, text=True, check=True)
    procs = _commands(r.stdout)
    assert [env["ORCA_JAX_LOCAL_DEVICE_IDS"] for env, _ in procs] == ["0,1", "2,3", "4,5", "6,7"]
    assert all(_flag(argv, "--mesh") == "tensor=8" for _, argv in procs)


@pytest.mark.parametrize("settings", [dict(NUM_PROCESSES=2), dict(NUM_PROCESSES="two", MESH="tensor=2"),
                                      dict(NUM_PROCESSES=2, GPUS_PER_PROCESS="all")])
def test_local_refuses_bad_settings(settings):
    r = subprocess.run([str(LOCAL), "--dry-run"], env=_env(**settings), capture_output=True, text=True)
    assert r.returncode == 2 and "local.sh:" in r.stderr


# -- local.sh supervising stand-in processes -----------------------------------------------

# A stand-in `orca-jax`: the leader (process 0) runs until SIGTERM, then marks the group
# stopped and exits 0; followers exit 0 once the leader has stopped (what the real followers
# do). FAKE_FAIL_ID / FAKE_FAIL_CODE make one process exit early with that code;
# FAKE_IGNORE_TERM a leader that never stops on SIGTERM.
FAKE_ORCA_JAX = r"""#!/usr/bin/env bash
id=""; prev=""
for a in "$@"; do [[ "$prev" == --process-id ]] && id="$a"; prev="$a"; done
echo "$$" > "$FAKE_DIR/pid-$id"
echo "process $id up"
if [[ "$id" == "${FAKE_FAIL_ID:-}" ]]; then sleep 0.3; echo "process $id failing"; exit "$FAKE_FAIL_CODE"; fi
if [[ "$id" == 0 && -n "${FAKE_IGNORE_TERM:-}" ]]; then
  trap 'echo "leader: SIGTERM, ignored"' TERM
elif [[ "$id" == 0 ]]; then
  trap 'echo "leader: SIGTERM, draining"; touch "$FAKE_DIR/leader-stopped"; exit 0' TERM
fi
while :; do
  if [[ "$id" != 0 && -e "$FAKE_DIR/leader-stopped" ]]; then echo "process $id: leader gone"; exit 0; fi
  sleep 0.1
done
"""


@pytest.fixture
def fake_group(tmp_path):
    """Starts launch/local.sh over 3 stand-in processes: returns start(**settings) -> Popen."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "orca-jax").write_text(FAKE_ORCA_JAX)
    (bin_dir / "orca-jax").chmod(0o755)
    procs = []

    def start(**settings):
        env = _env(NUM_PROCESSES=3, MESH="tensor=3", STOP_TIMEOUT=1, FAKE_DIR=tmp_path, **settings)
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
        p = subprocess.Popen([str(LOCAL)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        deadline = time.monotonic() + 10
        while not all((tmp_path / f"pid-{i}").exists() for i in range(3)):
            assert time.monotonic() < deadline and p.poll() is None, "stand-ins did not start"
            time.sleep(0.05)
        return p

    yield start
    for p in procs:  # a failed test must not leave a group running
        if p.poll() is None:
            p.kill()
            p.wait()
    for i in range(3):
        pid_file = tmp_path / f"pid-{i}"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def _finish(p, timeout=15) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_local_signal_stops_the_group_through_the_leader(fake_group, tmp_path, sig):
    p = fake_group()
    time.sleep(0.3)
    p.send_signal(sig)
    code, out = _finish(p)
    assert code == 0, out
    assert (tmp_path / "leader-stopped").exists()
    assert "[0] leader: SIGTERM, draining" in out
    assert "[1] process 1: leader gone" in out and "[2] process 2: leader gone" in out


def test_local_follower_failure_stops_the_group(fake_group, tmp_path):
    code, out = _finish(fake_group(FAKE_FAIL_ID=1, FAKE_FAIL_CODE=3))
    assert code == 3, out
    assert "follower 1 exited with code 3" in out
    assert "[0] leader: SIGTERM, draining" in out          # the leader was asked to stop
    assert "[2] process 2: leader gone" in out


def test_local_leader_failure_stops_the_followers(fake_group, tmp_path):
    # The failed leader never marks the group stopped, so the followers wait: after
    # STOP_TIMEOUT local.sh sends them SIGTERM.
    code, out = _finish(fake_group(FAKE_FAIL_ID=0, FAKE_FAIL_CODE=5))
    assert code == 5, out
    assert "the leader exited with code 5" in out and "SIGTERM to the processes still running" in out
    for i in (1, 2):
        pid = int((tmp_path / f"pid-{i}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_local_second_signal_kills(fake_group, tmp_path):
    p = fake_group(FAKE_IGNORE_TERM=1)  # a leader that never finishes draining
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    code, out = _finish(p)
    assert code == 130 and "second signal: killing every process" in out
    for i in range(3):
        with pytest.raises(ProcessLookupError):
            os.kill(int((tmp_path / f"pid-{i}").read_text()), 0)


def test_local_log_dir(fake_group, tmp_path):
    p = fake_group(LOG_DIR=tmp_path / "logs")
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    code, out = _finish(p)
    assert code == 0, out
    assert "leader: SIGTERM, draining" in out and "[0]" not in out  # the leader logs here, as is
    assert "process 1: leader gone" in (tmp_path / "logs" / "process-1.log").read_text()


# -- slurm.sbatch ----------------------------------------------------------------------------


# A stand-in `srun`: runs its command once per task, with what SLURM gives each task: its
# SLURM_PROCID and SLURM_LOCALID (tasks fill node 0 first), and CUDA_VISIBLE_DEVICES by
# FAKE_BINDING: "node" (--gpus-per-node: the whole node's GPUs), "task" (--gpus-per-task=G
# without device cgroups: the task's own physical ids), "cgroup" (--gpus-per-task=G with
# ConstrainDevices: the task's own GPUs, renumbered from 0) or "none" (no variable).
FAKE_SRUN = r"""while [[ "$1" == --* ]]; do shift; done
tpn="${SLURM_NTASKS_PER_NODE:-$(( SLURM_NTASKS / SLURM_JOB_NUM_NODES ))}" g=$(( SLURM_GPUS_ON_NODE / tpn ))
for (( i = 0; i < SLURM_NTASKS; i++ )); do
  local_id=$(( i % tpn )) ids=""
  case "$FAKE_BINDING" in
    node)   for (( d = 0; d < SLURM_GPUS_ON_NODE; d++ )); do ids+="${ids:+,}$d"; done ;;
    task)   for (( d = local_id * g; d < local_id * g + g; d++ )); do ids+="${ids:+,}$d"; done ;;
    cgroup) for (( d = 0; d < g; d++ )); do ids+="${ids:+,}$d"; done ;;
  esac
  if [[ -n "$ids" ]]; then export CUDA_VISIBLE_DEVICES="$ids"; else unset CUDA_VISIBLE_DEVICES; fi
  SLURM_PROCID=$i SLURM_LOCALID=$local_id "$@" || exit
done"""


def _run_slurm(tmp_path, nodes: int = 2, tasks_per_node: int | None = None, gpus_on_node: int = 8,
               binding: str = "node", ntasks: int | None = None, srun: str = FAKE_SRUN,
               args=("--max-batch-size", "32"), check=True):
    """Runs the batch script with stand-ins: scontrol lists the nodes, srun (FAKE_SRUN) runs
    each task, orca-jax prints its identity env, its GPU ids and its flags."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    names = "".join(f"gpu-node-{7 + k:02d}\\n" for k in range(nodes))
    stubs = {
        "scontrol": f'printf "{names}"',
        "srun": srun,
        "orca-jax": 'echo "task $ORCA_JAX_PROCESS_ID/$ORCA_JAX_NUM_PROCESSES $ORCA_JAX_COORDINATOR'
                    ' gpus=$ORCA_JAX_LOCAL_DEVICE_IDS: $*"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    settings = dict(SLURM_JOB_NODELIST=f"gpu-node-[07-{6 + nodes:02d}]", SLURM_JOB_NUM_NODES=nodes,
                    SLURM_NTASKS=ntasks or nodes * (tasks_per_node or 1), SLURM_GPUS_ON_NODE=gpus_on_node,
                    SLURM_SUBMIT_DIR=ROOT, HTTP_PORT=8000, ORCA_JAX_COMPILE_CACHE=tmp_path / "xla",
                    FAKE_BINDING=binding)
    if tasks_per_node is not None:
        settings["SLURM_NTASKS_PER_NODE"] = tasks_per_node
    env = _env(**settings)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    r = subprocess.run(["bash", str(SLURM), *args], env=env, capture_output=True, text=True, check=check)
    tasks = [line for line in r.stdout.splitlines() if line.startswith("task ")]
    return r, tasks


def _task_gpus(line: str) -> str:
    return line.split(" gpus=", 1)[1].split(":", 1)[0]


def test_slurm_tasks(tmp_path):
    """One task per node (the script's default): each is one process with all 8 of its node's GPUs."""
    r, tasks = _run_slurm(tmp_path, nodes=2, tasks_per_node=1)
    assert len(tasks) == 2, r.stdout
    for i, line in enumerate(tasks):
        assert line.startswith(f"task {i}/2 gpu-node-07:8476 gpus=0,1,2,3,4,5,6,7: serve ")
        argv = line.split(": ", 1)[1].split()
        assert _flag(argv, "--mesh") == "tensor=16"
        assert _flag(argv, "--host") == "0.0.0.0" and _flag(argv, "--http-port") == "8000"
        assert argv[-2:] == ["--max-batch-size", "32"]
    assert "clients connect to gpu-node-07:50051 (gRPC) and gpu-node-07:8000 (HTTP)" in r.stdout


@pytest.mark.parametrize("tasks_per_node, binding, want", [
    (1, "none", ["0,1,2,3,4,5,6,7"] * 2),               # no CUDA_VISIBLE_DEVICES at all
    (8, "node", [str(d) for d in range(8)] * 2),        # --ntasks-per-node=8 --gpus-per-node=8
    (8, "task", ["0"] * 16),                            # --gpus-per-task=1: CUDA shows only its own
    (8, "cgroup", ["0"] * 16),
    (2, "node", ["0,1,2,3", "4,5,6,7"] * 2),            # 2 processes of 4 GPUs per node
    (2, "task", ["0,1,2,3"] * 4),                       # --gpus-per-task=4
    (2, "cgroup", ["0,1,2,3"] * 4),
])
def test_slurm_every_task_gets_all_its_gpus(tmp_path, tasks_per_node, binding, want):
    r, tasks = _run_slurm(tmp_path, nodes=2, tasks_per_node=tasks_per_node, binding=binding)
    assert [_task_gpus(line) for line in tasks] == want, r.stdout + r.stderr
    assert [line.split()[1] for line in tasks] == [f"{i}/{len(want)}" for i in range(len(want))]
    assert all(_flag(line.split(": ", 1)[1].split(), "--mesh") == "tensor=16" for line in tasks)


def test_slurm_tasks_per_node_from_the_task_count(tmp_path):
    """Without SLURM_NTASKS_PER_NODE (`sbatch --nodes=2 --ntasks=16`): 16 / 2 tasks per node,
    so one GPU each."""
    r, tasks = _run_slurm(tmp_path, nodes=2, tasks_per_node=None, ntasks=16, binding="node")
    assert [_task_gpus(line) for line in tasks] == [str(d) for d in range(8)] * 2, r.stdout + r.stderr


def test_slurm_refuses_gpus_that_do_not_split_evenly(tmp_path):
    r, tasks = _run_slurm(tmp_path, nodes=1, tasks_per_node=3, binding="node", check=False)
    assert r.returncode == 2 and not tasks
    assert "8 GPUs per node cannot be shared evenly by 3 tasks per node" in r.stderr


def test_slurm_task_that_sees_too_few_gpus_fails_clearly(tmp_path):
    """A task that should own 4 GPUs (2 tasks on 8) but is shown 2: a message, not a bad mesh."""
    srun = ('while [[ "$1" == --* ]]; do shift; done\n'
            'CUDA_VISIBLE_DEVICES=0,1 SLURM_PROCID=1 SLURM_LOCALID=1 "$@"')
    r, tasks = _run_slurm(tmp_path, nodes=1, tasks_per_node=2, srun=srun, check=False)
    assert r.returncode == 2 and not tasks
    assert "task 1 (local id 1) should own 4 GPU(s) but sees 2 (CUDA_VISIBLE_DEVICES=0,1)" in r.stderr


def test_slurm_sbatch_header():
    lines = SLURM.read_text().splitlines()
    sbatch = [line.split()[1].split("=")[0] for line in lines if line.startswith("#SBATCH")]
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node"} <= set(sbatch)
    # sbatch stops reading #SBATCH lines at the first command.
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command


# -- Kubernetes manifests ----------------------------------------------------------------------


def _docs(path):
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the manifests")
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text())}


def _env_of(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def _args_text(container) -> str:
    return " ".join(container.get("command", []) + container.get("args", []))


def _control_key_from_secret(container) -> bool:
    """ORCA_JAX_CONTROL_KEY comes from a Secret, never a literal in the manifest."""
    (entry,) = [e for e in container["env"] if e["name"] == "ORCA_JAX_CONTROL_KEY"]
    return "secretKeyRef" in entry.get("valueFrom", {}) and "value" not in entry


def _drain_timeout(text: str) -> int:
    return int(text.split("--drain-timeout=")[1].split()[0])


def test_leaderworkerset():
    docs = _docs(LWS)
    assert set(docs) == {("LeaderWorkerSet", "orca-jax"), ("Service", "orca-jax-api"),
                         ("PersistentVolumeClaim", "orca-jax-compile-cache")}
    lws = docs["LeaderWorkerSet", "orca-jax"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert lws["spec"].get("startupPolicy", "LeaderCreated") == "LeaderCreated"  # LeaderReady deadlocks
    tpl = lws["spec"]["leaderWorkerTemplate"]
    assert tpl["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader_pod, worker_pod = tpl["leaderTemplate"], tpl["workerTemplate"]
    leader, worker = leader_pod["spec"]["containers"][0], worker_pod["spec"]["containers"][0]

    # Same command and env in every pod; identity from LWS's variables.
    assert leader["args"] == worker["args"] and leader["env"] == worker["env"]
    env = _env_of(leader)
    assert env["ORCA_JAX_COORDINATOR"] == "$(LWS_LEADER_ADDRESS):8476"
    assert env["ORCA_JAX_NUM_PROCESSES"] == "$(LWS_GROUP_SIZE)"
    assert env["ORCA_JAX_PROCESS_ID"] == "$(LWS_WORKER_INDEX)"
    assert leader["args"][:2] == ["orca-jax", "serve"] and "--mesh=$(MESH)" in leader["args"]
    assert _control_key_from_secret(leader)
    ports = {p["name"]: p["containerPort"] for p in leader["ports"]}
    assert ports["coordinator"] == 8476 and ports["control"] == 8477  # the CLI's default: + 1
    gpus = int(leader["resources"]["limits"]["nvidia.com/gpu"])
    assert _mesh_size(env["MESH"]) == tpl["size"] * gpus

    # The compile cache sits on a volume every pod mounts.
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    assert any(env["ORCA_JAX_COMPILE_CACHE"].startswith(path) for path in mounts)
    assert {v["name"] for v in worker_pod["spec"]["volumes"]} >= set(mounts.values())

    # Probes on the leader only: ready = gRPC health, alive = HTTP /health.
    assert leader["readinessProbe"]["grpc"]["port"] == 50051
    assert leader["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "startupProbe" in leader
    assert not {"readinessProbe", "livenessProbe", "ports"} & set(worker)
    for pod in (leader_pod, worker_pod):
        assert pod["spec"]["terminationGracePeriodSeconds"] > _drain_timeout(_args_text(leader))

    # Clients reach leaders only.
    selector = docs["Service", "orca-jax-api"]["spec"]["selector"]
    assert selector["leaderworkerset.sigs.k8s.io/name"] == "orca-jax"
    labels = lambda pod: {**pod["metadata"]["labels"], "leaderworkerset.sigs.k8s.io/name": "orca-jax"}
    assert selector.items() <= labels(leader_pod).items()
    assert not selector.items() <= labels(worker_pod).items()


def test_statefulset():
    docs = _docs(STS)
    assert set(docs) == {("StatefulSet", "orca-jax"), ("Service", "orca-jax-workers"), ("Service", "orca-jax-api")}
    sts = docs["StatefulSet", "orca-jax"]["spec"]
    headless = docs["Service", "orca-jax-workers"]["spec"]
    assert sts["podManagementPolicy"] == "Parallel"  # OrderedReady deadlocks
    assert sts["serviceName"] == "orca-jax-workers"
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert headless["selector"].items() <= sts["template"]["metadata"]["labels"].items()

    pod = sts["template"]["spec"]
    container = pod["containers"][0]
    env, text = _env_of(container), _args_text(container)
    assert env["ORCA_JAX_COORDINATOR"] == "orca-jax-0.orca-jax-workers:8476"  # pod 0's stable name
    assert env["ORCA_JAX_NUM_PROCESSES"] == str(sts["replicas"])
    assert 'ORCA_JAX_PROCESS_ID="${HOSTNAME##*-}"' in text  # the pod ordinal
    assert "exec orca-jax serve" in text
    assert _control_key_from_secret(container)
    assert {p["port"] for p in headless["ports"]} == {8476, 8477}
    assert _mesh_size(env["MESH"]) == sts["replicas"] * int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert pod["terminationGracePeriodSeconds"] > _drain_timeout(text)
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    assert docs["Service", "orca-jax-api"]["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": "orca-jax-0"}


def test_statefulset_probe_passes_on_followers_and_checks_pod_0():
    probe = _docs(STS)["StatefulSet", "orca-jax"]["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    cmd = probe["exec"]["command"]
    assert subprocess.run(cmd, env=_env(HOSTNAME="orca-jax-1")).returncode == 0
    assert "http://127.0.0.1:8000/health" in cmd[-1]  # pod 0 asks its own /health


# -- the Python side: the launchers' environment -> jax.distributed.initialize ---------------


@pytest.fixture
def captured_initialize(monkeypatch):
    """sharding.multihost with jax.distributed.initialize, jax.config.update and jax.devices
    replaced by recorders (no process group, no global JAX setting changed): returns
    (multihost module, {"initialize": kwargs, "config": {name: value}})."""
    import jax

    from orca_jax.sharding import multihost
    seen: dict = {"config": {}}
    monkeypatch.setattr(jax.distributed, "initialize",
                        lambda *args, **kwargs: seen.update(initialize=dict(zip(
                            ("coordinator_address",), args), **kwargs)))
    monkeypatch.setattr(jax.config, "update", lambda name, value: seen["config"].__setitem__(name, value))
    monkeypatch.setattr(jax, "devices", lambda *a: [])
    return multihost, seen


@pytest.mark.parametrize("text, ids", [("0,1,2,3", [0, 1, 2, 3]), ("4,5,6,7", [4, 5, 6, 7]), (" 3 ", [3]),
                                       ("", None)])
def test_local_device_ids_env_reaches_initialize(captured_initialize, monkeypatch, text, ids):
    multihost, seen = captured_initialize
    monkeypatch.setenv("ORCA_JAX_LOCAL_DEVICE_IDS", text)
    multihost.initialize("10.0.0.1:8476", 2, 1, local_device_ids=multihost.local_device_ids_from_env())
    kwargs = seen["initialize"]
    assert kwargs["coordinator_address"] == "10.0.0.1:8476"
    assert kwargs["num_processes"] == 2 and kwargs["process_id"] == 1
    assert kwargs["local_device_ids"] == ids  # None: every device the process sees
    # SLURM's auto-detection would narrow the process to [$SLURM_LOCALID]: always off.
    assert kwargs["cluster_detection_method"] == "deactivate"
    assert seen["config"]["jax_enable_recoverability"] is True


def test_jax_would_narrow_an_srun_task_to_one_gpu_without_deactivate(monkeypatch):
    """Why `deactivate`: JAX's own SLURM detection, given the very arguments we pass but
    local_device_ids, picks [$SLURM_LOCALID] as the process's only device."""
    from jax._src import clusters
    for name, value in dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="gpu-node-07", SLURM_NTASKS="2",
                            SLURM_PROCID="1", SLURM_LOCALID="1").items():
        monkeypatch.setenv(name, value)
    *_, ids = clusters.ClusterEnv.auto_detect_unset_distributed_params("10.0.0.1:8476", 2, 1, None, None, 10)
    assert ids == [1]


@pytest.mark.parametrize("text", ["0,x", "1,1", "-1"])
def test_local_device_ids_env_refuses_nonsense(captured_initialize, monkeypatch, text):
    multihost, _ = captured_initialize
    monkeypatch.setenv("ORCA_JAX_LOCAL_DEVICE_IDS", text)
    with pytest.raises(ValueError, match="ORCA_JAX_LOCAL_DEVICE_IDS"):
        multihost.local_device_ids_from_env()


def test_gpu_fault_tolerance_env_keeps_the_users_settings():
    from orca_jax.sharding.multihost import gpu_fault_tolerance_env
    env = gpu_fault_tolerance_env({"XLA_FLAGS": "--xla_gpu_autotune_level=0 "
                                                "--xla_gpu_nccl_async_execution=false",
                                   "XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT": "0"})
    assert env == {"XLA_FLAGS": "--xla_gpu_autotune_level=0 --xla_gpu_nccl_async_execution=false "
                                "--xla_gpu_nccl_terminate_on_error=false "
                                "--xla_gpu_nccl_blocking_communicators=false",
                   "XLA_PYTHON_CLIENT_ABORT_COLLECTIVES_ON_FAILURE": "1"}
    assert gpu_fault_tolerance_env({})["XLA_FLAGS"] == (
        "--xla_gpu_nccl_terminate_on_error=false --xla_gpu_nccl_async_execution=true "
        "--xla_gpu_nccl_blocking_communicators=false")


FAULT_TOLERANCE_VARS = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_ABORT_COLLECTIVES_ON_FAILURE",
                        "XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT", "ORCA_JAX_GPU_FAULT_TOLERANCE")


@pytest.mark.parametrize("platforms, plugin, switch, applied", [
    ("", True, None, True),        # a CUDA plugin: JAX's GPU fault-tolerance settings
    ("", True, "0", False),        # ... unless turned off
    ("cpu", True, None, False),    # CPU runs (tests): gloo, no GPU settings
    ("", False, None, False),      # no CUDA plugin installed
])
def test_gpu_fault_tolerance_only_with_a_cuda_plugin(captured_initialize, monkeypatch,
                                                     platforms, plugin, switch, applied):
    multihost, seen = captured_initialize
    for name in FAULT_TOLERANCE_VARS:  # setenv first, so that the test's end restores them all
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    if switch is not None:
        monkeypatch.setenv("ORCA_JAX_GPU_FAULT_TOLERANCE", switch)
    monkeypatch.setattr(multihost, "_has_accelerator_plugin", lambda: plugin)
    multihost.initialize("127.0.0.1:8476", 2, 0)
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=2"  # the user's, kept
    assert ("--xla_gpu_nccl_terminate_on_error=false" in flags) is applied
    assert (os.environ.get("XLA_PYTHON_CLIENT_ABORT_COLLECTIVES_ON_FAILURE") == "1") is applied
    gloo = seen["config"].get("jax_cpu_collectives_implementation") == "gloo"
    assert gloo is (platforms == "cpu" or not plugin)
