#!/usr/bin/env bash
# Installs the peer libraries the CPU benchmarks compare against into the project's venv (optional:
# never run by CI or `make test`; the benchmarks skip, with a printed reason, what is not installed).
#   onnxruntime, onnx   ONNX Runtime's MatMulNBits / quantize_dynamic anchors (prebuilt wheels)
#   bitsandbytes        already in the test extra; installed here too for a venv without it
#   gguf                writes GGUF files (llama.cpp's Python package)
#   llama-cpp-python    llama.cpp, built from source for THIS CPU (-march=native: AVX-512/VNNI where present);
#                       ~10 min on 2 cores, run under `nice` so other jobs keep the machine
# Usage: bash benchmarks/setup_peers.sh [VENV]      (default .venv; run `make setup` first)
set -euo pipefail
venv=${1:-.venv}
py="$venv/bin/python"
[ -x "$py" ] || { echo "setup_peers: no venv at $venv (run 'make setup' first)" >&2; exit 1; }
command -v cmake >/dev/null || { echo "setup_peers: cmake is needed to build llama-cpp-python (apt-get install cmake)" >&2; exit 1; }
"$py" -m pip install -q onnxruntime onnx "bitsandbytes>=0.45" gguf
if "$py" -c "import llama_cpp" 2>/dev/null; then
  echo "setup_peers: llama-cpp-python already installed ($("$py" -c 'import llama_cpp; print(llama_cpp.__version__)'))"
else
  # GGML_NATIVE: compile for the CPU it builds on; no OpenMP from another runtime than torch's is an issue
  # only for threads, which the benchmarks set explicitly (n_threads).
  CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    nice -n 10 "$py" -m pip install -v --no-binary llama-cpp-python --no-cache-dir llama-cpp-python
fi
"$py" - <<'PY'
import importlib
for name in ("onnxruntime", "onnx", "bitsandbytes", "gguf", "llama_cpp"):
    try:
        m = importlib.import_module(name)
        print(f"setup_peers: {name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"setup_peers: {name} NOT importable: {e!r}")
PY
