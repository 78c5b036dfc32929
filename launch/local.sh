#!/usr/bin/env bash
# launch/local.sh — run one orca-jax server as N JAX processes on this machine.
#
# Usage:
#   launch/local.sh [--dry-run] [orca-jax serve flags...]
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 MESH=tensor=4 launch/local.sh --max-batch-size 8
#
# Every process runs `launch/serve.sh` (so MODEL, MODEL_NAME, GRPC_PORT, HTTP_PORT, TLS_*,
# AUTH_TOKEN_FILE, DRAIN_TIMEOUT and ORCA_JAX_COMPILE_CACHE mean what they mean there) with
# the same flags, plus
#   --mesh MESH [--layout LAYOUT] --coordinator 127.0.0.1:COORDINATOR_PORT
#   --num-processes NUM_PROCESSES --process-id I
# then the flags given here. Process 0 is the leader: it runs the scheduler and is the only
# one that opens the gRPC/HTTP ports; processes 1..N-1 are followers running the same steps.
#
# Settings (environment variables):
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  CPU only: K virtual CPU devices per process (sets JAX_PLATFORMS=cpu and
#                        XLA_FLAGS=--xla_force_host_platform_device_count=K); default: unset,
#                        each process uses the devices its platform shows it
#   GPUS_PER_PROCESS     GPU only: process I owns GPUs I*G .. I*G+G-1 (as JAX's local device
#                        ids, ORCA_JAX_LOCAL_DEVICE_IDS; every process still sees every GPU, which
#                        NCCL needs for peer-to-peer copies); needed when several processes
#                        share one machine's GPUs
#   COORDINATOR_PORT     port of JAX's coordination service on process 0 (default 8476); the
#                        leader also takes the next one for its plan connections to followers
#   MESH                 --mesh spec spanning all processes' devices (default: tensor=N*K,
#                        from DEVICES_PER_PROCESS or GPUS_PER_PROCESS)
#   LAYOUT               --layout name or rules file (default: the CLI's, megatron)
#   HOST                 interface the leader binds (default here: 127.0.0.1, this machine only)
#   LOG_DIR              if set, follower I writes LOG_DIR/process-I.log and the leader logs
#                        here unprefixed; otherwise every line here is prefixed with [I]
#   STOP_TIMEOUT         seconds the other processes get to exit once one has ended, before
#                        SIGTERM and then SIGKILL (default 30)
#   DRY_RUN=1            same as --dry-run: print each process's env and command, start nothing
#
# Signals: SIGTERM or SIGINT (Ctrl-C) is forwarded as SIGTERM to the leader, which drains
# (up to DRAIN_TIMEOUT seconds) and stops the group; followers exit when it stops. A second
# signal kills every process at once.
# Failures: if a follower ends while the leader runs, or the leader fails, the others are
# stopped (SIGTERM to the leader, STOP_TIMEOUT seconds, then SIGTERM and SIGKILL to the rest)
# and this script exits with the failed process's code (non-zero). Needs bash 4+.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dry_run="${DRY_RUN:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    *) break ;;
  esac
done

n="${NUM_PROCESSES:-2}"
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: NUM_PROCESSES must be a positive integer, got '$n'" >&2; exit 2
fi
if [[ -n "${GPUS_PER_PROCESS:-}" && ! "$GPUS_PER_PROCESS" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: GPUS_PER_PROCESS must be a positive integer, got '$GPUS_PER_PROCESS'" >&2; exit 2
fi
per_process="${DEVICES_PER_PROCESS:-${GPUS_PER_PROCESS:-}}"
mesh="${MESH:-}"
if [[ -z "$mesh" ]]; then
  if [[ -z "$per_process" ]]; then
    echo "local.sh: set MESH (e.g. MESH=tensor=4), or DEVICES_PER_PROCESS / GPUS_PER_PROCESS" >&2
    exit 2
  fi
  mesh="tensor=$((n * per_process))"
fi
export HOST="${HOST:-127.0.0.1}"  # read by serve.sh; its own default is 0.0.0.0

# Flags every process gets, leader and followers alike: the CLI decides from --process-id
# who opens ports, so the command lines differ only there.
common=(--mesh "$mesh")
[[ -n "${LAYOUT:-}" ]] && common+=(--layout "$LAYOUT")
common+=(--coordinator "127.0.0.1:${COORDINATOR_PORT:-8476}" --num-processes "$n")

# process_env I: fills `penv` with the variables process I needs on top of ours. They must be
# set before jax is imported, hence the environment rather than flags.
process_env() {
  penv=()
  if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
    penv+=(JAX_PLATFORMS=cpu
           "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
  fi
  if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
    # JAX's local device ids (jax.distributed.initialize's local_device_ids), not
    # CUDA_VISIBLE_DEVICES: hiding the other processes' GPUs from CUDA would also hide them
    # from NCCL, whose transfers between processes of one machine then leave NVLink.
    local first=$(( $1 * GPUS_PER_PROCESS )) ids="" g
    for (( g = first; g < first + GPUS_PER_PROCESS; g++ )); do ids+="${ids:+,}$g"; done
    penv+=("ORCA_JAX_LOCAL_DEVICE_IDS=$ids")
  fi
}

if [[ "$dry_run" == 1 ]]; then
  # A stand-in `orca-jax` first on PATH prints its arguments instead of serving, so each
  # printed line is exactly the command launch/serve.sh would exec for that process.
  shim="$(mktemp -d)"
  trap 'rm -rf "$shim"' EXIT
  printf '#!/usr/bin/env bash\nprintf "%%q " orca-jax "$@"; echo\n' >"$shim/orca-jax"
  chmod +x "$shim/orca-jax"
  for (( i = 0; i < n; i++ )); do
    process_env "$i"
    if (( i == 0 )); then echo "# process 0 of $n: leader (scheduler, gRPC/HTTP ports)"
    else echo "# process $i of $n: follower"; fi
    printf 'env '; [[ ${#penv[@]} -gt 0 ]] && printf '%q ' "${penv[@]}"
    PATH="$shim:$PATH" "$here/serve.sh" "${common[@]}" --process-id "$i" "$@"
  done
  exit 0
fi

# prefix TAG: copies stdin to stdout with TAG before each line. It ignores INT and TERM so a
# Ctrl-C does not cut the leader's log (and break its stdout) while it drains.
prefix() {
  trap '' INT TERM
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do printf '%s %s\n' "$1" "$line"; done
}

# Each process gets its own session (setsid, where installed) so that a Ctrl-C in this
# terminal reaches only this script, which turns it into one SIGTERM to the leader: the
# followers must not stop on their own while the leader drains.
session=()
command -v setsid >/dev/null 2>&1 && session=(setsid)

pids=()
if [[ -n "${LOG_DIR:-}" ]]; then mkdir -p "$LOG_DIR"; fi
for (( i = 0; i < n; i++ )); do
  process_env "$i"
  cmd=(${session[@]+"${session[@]}"} env ${penv[@]+"${penv[@]}"}
       "$here/serve.sh" "${common[@]}" --process-id "$i" "$@")
  if [[ -z "${LOG_DIR:-}" ]]; then
    "${cmd[@]}" > >(prefix "[$i]") 2>&1 &
  elif (( i == 0 )); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$LOG_DIR/process-$i.log" 2>&1 &
  fi
  pids+=($!)  # setsid, env and serve.sh all exec: this is the server process itself
done
echo "local.sh: started $n processes (pids ${pids[*]}), mesh $mesh," \
     "coordinator 127.0.0.1:${COORDINATOR_PORT:-8476}" >&2

# Bash reaps background children as they exit, so `kill -0` tells running from ended.
running() { kill -0 "$1" 2>/dev/null; }

# wait_all SECONDS: true once every process has ended, false if some still run after SECONDS.
wait_all() {
  local t pid left
  for (( t = 0; t < $1 * 2; t++ )); do
    left=0
    for pid in "${pids[@]}"; do if running "$pid"; then left=1; fi; done
    if (( ! left )); then return 0; fi
    sleep 0.5 || true
  done
  return 1
}

# signal_running SIG: sends SIG to every process still running.
signal_running() {
  local pid
  for pid in "${pids[@]}"; do if running "$pid"; then kill -"$1" "$pid" 2>/dev/null || true; fi; done
}

signalled=0
on_signal() {
  if (( signalled )); then
    echo "local.sh: second signal: killing every process" >&2
    signal_running KILL
    wait "${pids[@]}" 2>/dev/null || true
    exit 130
  fi
  signalled=1
  echo "local.sh: stopping: SIGTERM to the leader (pid ${pids[0]}), which ends the group" >&2
  kill -TERM "${pids[0]}" 2>/dev/null || true
}
trap on_signal INT TERM

# Watch until one process ends. The group is over either way: the leader ended (asked to, or
# failed), or a follower ended under a live leader, which cannot run a step without it.
ended=""
while [[ -z "$ended" ]]; do
  for (( i = 0; i < n; i++ )); do
    if ! running "${pids[$i]}"; then ended=$i; break; fi
  done
  if [[ -z "$ended" ]]; then sleep 0.5 || true; fi
done
code=0
wait "${pids[$ended]}" || code=$?
if (( ended == 0 )); then
  echo "local.sh: the leader exited with code $code" >&2
else
  echo "local.sh: follower $ended exited with code $code while the leader ran: stopping the group" >&2
  if (( code == 0 )); then code=1; fi
  kill -TERM "${pids[0]}" 2>/dev/null || true
fi

# The others get STOP_TIMEOUT seconds to end by themselves (followers exit when the leader
# stops; a leader drains for up to DRAIN_TIMEOUT), then SIGTERM, then SIGKILL.
if ! wait_all "${STOP_TIMEOUT:-30}"; then
  echo "local.sh: SIGTERM to the processes still running" >&2
  signal_running TERM
  if ! wait_all 5; then
    echo "local.sh: SIGKILL to the processes still running" >&2
    signal_running KILL
  fi
fi

# Exit code: the first process to end decides; if it ended cleanly, the first non-zero other.
for (( i = 0; i < n; i++ )); do
  c=0
  wait "${pids[$i]}" 2>/dev/null || c=$?
  if (( i != ended && code == 0 && c != 0 )); then code=$c; fi
done
exit "$code"
