#!/usr/bin/env bash
# Start a Ray node (head or worker), submit an llmrl run to the cluster, or stop the node.
#
#   launch/ray_cluster.sh head   [--port 6379] [--num-cpus N] [--num-gpus N] [--resources JSON] [--object-store-mb MB]
#   launch/ray_cluster.sh worker HEAD_HOST:PORT [--num-cpus N] [--num-gpus N] [--resources JSON] [--object-store-mb MB]
#   launch/ray_cluster.sh submit RECIPE [key=value ...]     # on the head: llmrl train RECIPE cluster.address=auto ...
#   launch/ray_cluster.sh stop
#
# Token auth: Ray 2.60 turns it on by default and keeps the token in ~/.ray/auth_token. Nodes that
# share a home directory share the token; elsewhere export RAY_AUTH_TOKEN (the head's token) on
# every node before starting it, or, on a trusted private network only, RAY_AUTH_MODE=disabled.
# Network interface for the gloo weight broadcast and DeepSpeed: GLOO_SOCKET_IFNAME (and
# NCCL_SOCKET_IFNAME on GPUs), e.g. GLOO_SOCKET_IFNAME=eth0.
# Environment: LLMRL_PYTHON (default .venv/bin/python of this checkout), RAY (default the ray
# next to it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${LLMRL_PYTHON:-.venv/bin/python}
RAY=${RAY:-$(dirname "$PYTHON")/ray}

usage() { sed -n '2,8p' "$0" >&2; exit 2; }

node_flags() {
  # Translates our flags to `ray start` flags; unknown flags are an error, not ignored.
  local out=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --port) out+=(--port "$2"); shift 2 ;;
      --num-cpus) out+=(--num-cpus "$2"); shift 2 ;;
      --num-gpus) out+=(--num-gpus "$2"); shift 2 ;;
      --resources) out+=(--resources "$2"); shift 2 ;;
      --object-store-mb) out+=(--object-store-memory "$(( $2 * 1024 * 1024 ))"); shift 2 ;;
      *) echo "ray_cluster.sh: unknown option '$1'" >&2; exit 2 ;;
    esac
  done
  [[ ${#out[@]} -eq 0 ]] || printf '%s\n' "${out[@]}"
}

parse_flags() {
  # Into the array `flags`; a bad option ends the script here (a process substitution would not).
  local text
  text=$(node_flags "$@")
  flags=()
  [[ -z "$text" ]] || mapfile -t flags <<< "$text"
}

command=${1:-}; [[ -n "$command" ]] || usage; shift
# Token auth on every node and for the driver (a worker or driver without it cannot join a head
# that has it). The head makes a token when there is none yet.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ "$RAY_AUTH_MODE" == token && "$command" == head && -z "${RAY_AUTH_TOKEN:-}" && ! -f "$HOME/.ray/auth_token" ]]; then
  "$RAY" get-auth-token --generate > /dev/null
fi
case "$command" in
  head)
    parse_flags "$@"
    "$RAY" start --head --disable-usage-stats --include-dashboard=false "${flags[@]}"
    ;;
  worker)
    address=${1:-}; [[ -n "$address" ]] || usage; shift
    parse_flags "$@"
    "$RAY" start --address="$address" --disable-usage-stats "${flags[@]}"
    ;;
  submit)
    recipe=${1:-}; [[ -n "$recipe" ]] || usage; shift
    exec "$PYTHON" -m llmrl.cli train "$recipe" cluster.backend=ray cluster.address=auto "$@"
    ;;
  stop)
    "$RAY" stop --force
    ;;
  *) usage ;;
esac
