#!/usr/bin/env bash
# GPU check of the wide-K tl.dot kernel for NF4/FP4 (``wo_dot_wide_kernel``, ``linear.WIDE_DOT_ROWS``),
# one call, every stage time-boxed (under 6 minutes in all), results under $OUT. Run from the repo root
# (carry .gpu_site as for benchmarks/gpu_session.sh):
#
#   OUT=/tmp/out bash benchmarks/gpu_wide_dot_check.sh
#
# 1. its tests compiled on the GPU (hypothesis grid, routing, bf16 heuristic configs + CUDA graph), 80 s;
# 2. A/B at M = 2..64 on the four benchmark shapes: nf4-nested (today: wide GEMV at M <= 2, decode W then
#    cuBLAS from M = 3) against the wide dot with its heuristic config (-wd: one pipeline stage, the
#    kernel's own code prefetch) and the same tiles with 2 stages (-wds2: Triton pipelines the loads,
#    table gathers included, through shared memory), and -wdp (table by byte pairs), 170 s;
# 3. if time is left: 4 Llama-3-8B layers, batch 16, with the wide dot switched on by
#    QBACKEND_WIDE_DOT_ROWS=64 (compare with the nf4 qbackend decode figure of the last session).
set -u
OUT=${OUT:-/tmp/qbackend-gpu}
mkdir -p "$OUT/tune"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:$PWD/.gpu_site"
export QBACKEND_TRITON_CACHE_DIR="$OUT/tune"
unset QBACKEND_WIDE_DOT_ROWS  # stages 1-2 switch it per call; only stage 3 sets it
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
{
  stamp "tests: wide dot (compiled)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # parallel compiles where pytest-xdist is installed
  timeout 80 python3 -m pytest -q $xdist -p no:cacheprovider tests/kernels/triton -k "wide_dot" -rfE 2>&1 | tail -30
} > "$OUT/wide_dot_tests.log" 2>&1
stamp "A/B: decode-first vs wide dot, heuristic configs" > "$OUT/wide_dot.log"
timeout 170 python3 benchmarks/bench_gpu_linear.py --no-autotune \
  --formats bf16,nf4-nested,nf4-nested-wd,nf4-nested-wds2,nf4-nested-wdp \
  --ms 2,3,4,8,16,32,64 --out "$OUT/wide_dot.json" >> "$OUT/wide_dot.log" 2>&1
left=$(( 345 - ($(date +%s) - T0) ))
if [ "$left" -ge 60 ]; then
  stamp "decode: llama3-8b dims, 4 layers, batch 16, QBACKEND_WIDE_DOT_ROWS=64 (${left} s left)" > "$OUT/wide_dot_decode.log"
  QBACKEND_WIDE_DOT_ROWS=64 timeout "$left" python3 benchmarks/bench_llama_decode.py --device cuda --shape llama3-8b \
    --layers 4 --batches 16 --presets nf4 --forms inductor,qbackend --graphs on --steps 32 --repeats 2 --no-autotune \
    --out "$OUT/wide_dot_decode.json" >> "$OUT/wide_dot_decode.log" 2>&1
else
  stamp "decode skipped: ${left} s left" > "$OUT/wide_dot_decode.log"
fi
stamp done >> "$OUT/wide_dot_decode.log"
tail -3 "$OUT/wide_dot_tests.log"; grep -E "M=" "$OUT/wide_dot.log" | cut -c1-110; grep -E "^\|" "$OUT/wide_dot_decode.log" | cut -c1-120
