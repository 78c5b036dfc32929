#!/usr/bin/env bash
# launch/serve.sh — run one orca-jax server process (gRPC, and OpenAI-compatible HTTP).
#
# Usage:
#   launch/serve.sh [orca-jax serve flags...]
#   MODEL=ckpt/gpt2 HTTP_PORT=8000 launch/serve.sh --max-batch-size 32
#
# Settings (environment variable -> `orca-jax serve` flag; a flag given on the command line
# wins, since it comes after these):
#   MODEL            --model              checkpoint dir from `orca-jax convert` (default: demo model)
#   MODEL_NAME       --served-model-name  name clients pass as OpenAI `model` (default: dir name)
#   HOST             --host               interface to bind (default here: 0.0.0.0, all)
#   GRPC_PORT        --grpc-port          gRPC port (default 50051)
#   HTTP_PORT        --http-port          HTTP port (default: off)
#   TLS_CERT/TLS_KEY --tls-cert/--tls-key PEM files: TLS on both ports (default: off)
#   AUTH_TOKEN_FILE  --auth-token-file    bearer token clients must send (or $ORCA_JAX_AUTH_TOKEN)
#   DRAIN_TIMEOUT    --drain-timeout      seconds in-flight requests get after SIGTERM (default 30)
#   ORCA_JAX_COMPILE_CACHE                XLA compilation cache dir ("off" to disable); keep it on
#                                         a persistent volume so restarts skip warm-up compiles
# Engine flags (--max-batch-size, --max-num-batched-tokens, --max-model-len, --kv-memory, ...)
# pass straight through; `launch/serve.sh --help` lists them all.
#
# The script `exec`s the server, so SIGTERM from the supervisor (Kubernetes, systemd, docker
# stop) reaches it directly: it stops accepting, lets in-flight requests finish for up to
# DRAIN_TIMEOUT seconds and exits 0. Give the supervisor a grace period longer than that
# (terminationGracePeriodSeconds, TimeoutStopSec, docker stop -t).
#
# Probes: gRPC grpc.health.v1.Health (service "" or "orca_jax.v1.Generation"), or HTTP
# GET /health (200, or 503 while draining or when the engine loop is dead or stuck).
# An engine that dies (a failed device step, a lost follower) or gets stuck (one iteration
# longer than --stuck-after, e.g. a collective with a hung peer) fails every request, then the
# server exits with status 3: restart it (Restart=on-failure, restartPolicy: Always).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  echo
fi

args=(serve --host "${HOST:-0.0.0.0}" --grpc-port "${GRPC_PORT:-50051}")
[[ -n "${MODEL:-}" ]] && args+=(--model "$MODEL")
[[ -n "${MODEL_NAME:-}" ]] && args+=(--served-model-name "$MODEL_NAME")
[[ -n "${HTTP_PORT:-}" ]] && args+=(--http-port "$HTTP_PORT")
[[ -n "${TLS_CERT:-}" ]] && args+=(--tls-cert "$TLS_CERT")
[[ -n "${TLS_KEY:-}" ]] && args+=(--tls-key "$TLS_KEY")
[[ -n "${AUTH_TOKEN_FILE:-}" ]] && args+=(--auth-token-file "$AUTH_TOKEN_FILE")
[[ -n "${DRAIN_TIMEOUT:-}" ]] && args+=(--drain-timeout "$DRAIN_TIMEOUT")

if command -v orca-jax >/dev/null 2>&1; then
  exec orca-jax "${args[@]}" "$@"
fi
exec "${PYTHON:-python3}" -m orca_jax.cli "${args[@]}" "$@"
