#!/usr/bin/env bash
# The prepared GPU check for a session lent a device machine: one call, every stage time-boxed, every
# result written under $OUT (so a stage that overruns loses only itself). Run from the repo root:
#
#   bash benchmarks/gpu_session.sh            # ~6 minutes on an H200 (tests 100 s, linears 100 s + 60 s, decode 110 s)
#
# The machine has no network. bitsandbytes and torchao (the anchors) travel as an unpacked folder:
#   pip download --no-deps bitsandbytes torchao -d /tmp/w     # here, where pip works
#   mkdir .gpu_site && cd .gpu_site && unzip -q /tmp/w/bitsandbytes-*.whl -x '*cuda1[12]*' '*xpu*' && unzip -q /tmp/w/torchao-*.whl
#   echo /.gpu_site/ >> .git/info/exclude           # then carry ".gpu_site" in the call
# The `qbackend` backend needs its entry point: without an install, a dist-info folder on the path gives it:
#   mkdir -p .gpu_site/qbackend-0.1.0.dist-info; printf 'Metadata-Version: 2.1\nName: qbackend\nVersion: 0.1.0\n' \
#     > .gpu_site/qbackend-0.1.0.dist-info/METADATA; printf '[torch_dynamo_backends]\nqbackend = qbackend.core.backend:qbackend\n' \
#     > .gpu_site/qbackend-0.1.0.dist-info/entry_points.txt
set -u
OUT=${OUT:-/tmp/qbackend-gpu}
mkdir -p "$OUT/tune"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:$PWD/.gpu_site"
export QBACKEND_TRITON_CACHE_DIR="$OUT/tune"  # the tuned configs come back with the results
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
{
  stamp env
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import torch._dynamo as d; print('qbackend backend registered:', 'qbackend' in d.list_backends())"
  stamp "tests: Triton kernels (compiled, + the gpu group), conformance (op-cuda), ops"
  timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider tests/kernels/triton tests/kernels/test_conformance.py \
    tests/kernels/test_ops.py -m "not install" -rfE --timeout 120 2>&1 | tail -60
} > "$OUT/tests.log" 2>&1
stamp "linears: full grid, heuristic configs" > "$OUT/linear_full.log"
timeout 150 python3 benchmarks/bench_gpu_linear.py --no-autotune --grad --out "$OUT/linear_full.json" \
  >> "$OUT/linear_full.log" 2>&1
stamp "linears: 8192^2, M=1,16, autotuned" > "$OUT/linear_tuned.log"
timeout 90 python3 benchmarks/bench_gpu_linear.py --quick --grad --out "$OUT/linear_tuned.json" >> "$OUT/linear_tuned.log" 2>&1
stamp "decode: Llama-3-8B dims, 4 layers" > "$OUT/decode.log"
timeout 150 python3 benchmarks/bench_llama_decode.py --device cuda --shape llama3-8b --layers 4 --batches 1,16 \
  --presets nf4,int8 --forms eager,inductor,qbackend --steps 64 --repeats 3 --no-autotune --out "$OUT/decode.json" \
  >> "$OUT/decode.log" 2>&1
stamp done >> "$OUT/decode.log"
tail -3 "$OUT/tests.log"; grep -E "^\|" "$OUT/decode.log" | cut -c1-120
