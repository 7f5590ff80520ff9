#!/usr/bin/env bash
# `make gpu-check`: on one H100/H200, the GPU tests and the GPU benchmarks in at most
# 8 minutes, their results written to benchmarks/results/*_cuda*.
#
#   1. tests (≤ 150 s): tests/test_gpu.py, tests/test_fused_support.py, tests/test_devices.py,
#      gpu-marked tests included            -> results/test_gpu_cuda.log
#   2. benchmarks/regularizers.py --device cuda, V = 100,277, N = 1,024 and 8,192, the rows
#      that issue 25 targets (≤ 200 s)        -> results/regularizers_cuda.{json,md}
#   3. benchmarks/chunked_head.py --device cuda, lm_head_penalty against the plain path at
#      Qwen2.5-1.5B's head (V = 151,936, d = 1,536, bf16), N = 8,192 (≤ 75 s)
#                                           -> results/chunked_head_cuda.{json,md}
#   4. benchmarks/train_step.py --device cuda, Qwen2.5-1.5B's shape in bf16 (≤ 150 s)
#                                           -> results/train_step_cuda.{json,md}
#   then a summary                          -> results/gpu_check_cuda.md
# A step that runs out of its time is stopped and named in the summary; the benchmarks
# write after every row, so what they measured stays.
#
# What the GPU machine needs (it may have no network): a CUDA build of torch, triton, and
# vocabmetric's own requirements (numpy, scipy, zarr, faiss-cpu, transformers, numba,
# pytest): `pip install -e ".[train,dev]"` where a network is at hand. GPU_PYTHON names the
# interpreter (default python3). The preflight below stops with what is missing.
#
#   benchmarks/gpu_check.sh             # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run   # anywhere: the same steps on CPU at tiny sizes, the
#                                       # results into a scratch folder (the tests check this)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
BUDGET=${GPU_CHECK_SECONDS:-480}

if (( DRY )); then
  DEVICE=cpu
  export BENCH_RESULTS=${BENCH_RESULTS:-$(mktemp -d)}
  OUT=$BENCH_RESULTS
else
  DEVICE=cuda
  OUT=benchmarks/results
fi
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_check_cuda.md"

"$PY" - "$DEVICE" <<'EOF' || { echo "gpu-check: preflight failed (see above)"; exit 2; }
import importlib.util, sys
device = sys.argv[1]
missing = [m for m in ("torch", "numpy", "scipy", "zarr", "transformers", "pytest", "faiss")
           if importlib.util.find_spec(m) is None]
if device == "cuda" and importlib.util.find_spec("triton") is None:
    missing.append("triton")
if missing:
    sys.exit(f"missing modules: {', '.join(missing)} (pip install -e '.[train,dev]' and a CUDA torch)")
import torch
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch (torch %s, CUDA build %s)" % (torch.__version__, torch.version.cuda))
print("gpu-check preflight:", torch.__version__, torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)")
EOF

start=$SECONDS
declare -a lines
run_step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - (SECONDS - start) ))
  (( limit > left )) && limit=$left
  if (( limit <= 5 )); then lines+=("| $name | skipped: the 8-minute budget is spent | 0 |"); return; fi
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local status="ok"
  (( rc == 124 || rc == 137 )) && status="stopped at ${limit}s"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="failed (exit $rc)"
  lines+=("| $name | $status | $(( SECONDS - t0 )) |")
}

TESTS=(tests/test_gpu.py tests/test_fused_support.py tests/test_devices.py)
if (( DRY )); then
  run_step "tests (collected only)" 120 "$PY" -m pytest -q --collect-only -m "gpu or not gpu" "${TESTS[@]}"
  run_step "regularizers" 300 "$PY" benchmarks/regularizers.py --device cpu --malloc default --vocab 2048 \
    --positions 8 --repeats 1 --name regularizers_cuda --only tree "sinkhorn support m=64"
  run_step "chunked_head" 120 "$PY" benchmarks/chunked_head.py --device cpu --positions 64 --vocab 2048 \
    --width 32 --reps 1 --name chunked_head_cuda
  run_step "train_step" 300 "$PY" benchmarks/train_step.py --device cpu --tiny --only sinkhorn
else
  run_step "tests" 150 bash -c "$PY -m pytest -q -m 'gpu or not gpu' ${TESTS[*]} 2>&1 | tee $OUT/test_gpu_cuda.log; exit \${PIPESTATUS[0]}"
  run_step "regularizers" 200 "$PY" benchmarks/regularizers.py --device cuda --vocab 100277 --positions 1024 8192 \
    --repeats 2 --name regularizers_cuda --only tree "sliced L=16" "sinkhorn support m=64" \
    "sinkhorn full newton ε=cap/15 (cold), kNN" "sinkhorn full newton ε=cap/15 (warm), kNN"
  run_step "chunked_head" 75 "$PY" benchmarks/chunked_head.py --device cuda --dtype bfloat16 --vocab 151936 \
    --width 1536 --positions 8192 --reps 3
  run_step "train_step" 150 "$PY" benchmarks/train_step.py --device cuda --repeats 3
fi

{
  echo "# make gpu-check ($DEVICE$( (( DRY )) && echo ', dry run'))"
  echo
  echo "$(date -u +%FT%TZ), $(( SECONDS - start )) s of a ${BUDGET} s budget; results beside this file."
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${lines[@]}"
} > "$SUMMARY"
cat "$SUMMARY"
grep -q "failed\|stopped\|skipped" "$SUMMARY" && exit 1
exit 0
