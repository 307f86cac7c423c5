#!/usr/bin/env bash
# Create (or reuse) the project's virtual env and install qbackend with the extras it needs.
# Usage: .ci/venv.sh VENV_DIR EXTRAS   e.g. .ci/venv.sh .venv test,examples
# torch: reuse an importable torch (system site-packages, e.g. a GPU machine's CUDA build);
# otherwise, without a GPU, install the CPU build torch==2.13.0 (never a multi-GB CUDA build).
set -euo pipefail
venv=${1:-.venv}
extras=${2:-test,examples}
stamp="$venv/.qbackend-installed-$extras"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv --system-site-packages "$venv"
vpy="$venv/bin/python"
if ! "$vpy" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$vpy" -m pip install -q "torch>=2.11"
  else
    # The CPU wheel: from pip's find-links where this machine has it on disk, else PyTorch's CPU index.
    "$vpy" -m pip install -q "torch==2.13.0+cpu" \
      || "$vpy" -m pip install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$vpy" -m pip install -q -e ".[$extras]"
touch "$stamp"
