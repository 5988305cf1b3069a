#!/usr/bin/env bash
# Train on this machine alone: every engine in one process, or, with a Ray cluster section in
# the recipe, a local Ray started for the run (no `ray start` needed).
#   launch/local.sh RECIPE [key=value ...]
#   launch/local.sh recipes/quickstart.yaml train.steps=2
# Environment: LLMRL_PYTHON (default .venv/bin/python of this checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { sed -n '2,6p' "$0" >&2; exit 2; }
exec "${LLMRL_PYTHON:-.venv/bin/python}" -m llmrl.cli train "$@"
