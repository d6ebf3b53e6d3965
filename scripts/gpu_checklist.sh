#!/usr/bin/env bash
# What a GPU session should run, in stages that each fit one device call (<= 10 minutes on
# an H100 with 16 cores). Logs and JSON go to $OUT (the device tool's output folder) or
# /tmp/exl2-gpu. Usage:
#   scripts/gpu_checklist.sh build test        # install (sm_90 only, fast) + every cuda test
#   scripts/gpu_checklist.sh bench perfpage    # the full bench table (+ plot) and the performance page's data
#   scripts/gpu_checklist.sh canonical canonicalbench  # the canonical layout (EXL2_CUDA_TC=0): tests + bench
#   scripts/gpu_checklist.sh mgpu              # multi-GPU tests (a 2-GPU machine)
#   scripts/gpu_checklist.sh sanitize          # compute-sanitizer memcheck/racecheck/synccheck
# Stages: build, test, canonical, bench, perfpage, bf16bench, formatsbench, splitsweep, canonicalbench, tcsplit, mgpu,
# sanitize. Exit status: the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
LOG="${OUT:-/tmp/exl2-gpu}"
mkdir -p "${LOG}"
status=0

run() {  # run NAME CMD...: log to $LOG/NAME.log, keep the first failure's status
  local name=$1; shift
  local t0=$(date +%s)
  "$@" >"${LOG}/${name}.log" 2>&1
  local rc=$?
  echo "== ${name}: rc ${rc}, $(( $(date +%s) - t0 )) s"
  tail -n 5 "${LOG}/${name}.log"
  if [[ ${rc} -ne 0 && ${status} -eq 0 ]]; then status=${rc}; fi
}

for stage in "$@"; do
  case "${stage}" in
    build) run build env EXL2_CUDA=ON EXL2_CUDA_ARCHITECTURES=90a-real CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
             "${PY}" -m pip install --no-build-isolation --no-deps -q . ;;
    test) run test "${PY}" -m pytest -q -m cuda -p no:cacheprovider tests ;;
    canonical)  # the canonical layout's kernels (the default below compute capability 9.0)
      run canonical env EXL2_CUDA_TC=0 "${PY}" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py \
        tests/test_cuda_bf16.py tests/test_golden.py tests/test_golden_formats.py tests/test_formats.py ;;
    bench) run bench "${PY}" -m exl2 bench --json "${LOG}/bench.json" --plot "${LOG}/bench.png" ;;
    perfpage)  # the performance page's data file and plot from the bench stage's result
      run perfpage "${PY}" scripts/perf_update.py "${LOG}/bench.json" --command "python -m exl2 bench" \
        --out "${LOG}/h100_bench.json"
      run perfplot "${PY}" docs/perf_plot.py --json "${LOG}/h100_bench.json" --png "${LOG}/h100_bench.png" ;;
    bf16bench) run bench_bf16 "${PY}" -m exl2 bench --dtype bfloat16 --m 1 8 16 64 512 \
                 --shapes 4096x4096 8192x28672 --json "${LOG}/bench_bf16.json" ;;
    formatsbench)
      run bench_awq "${PY}" -m exl2 bench --format awq --m 1 8 16 64 512 --shapes 4096x4096 8192x28672 \
        --json "${LOG}/bench_awq.json"
      run bench_gptq3 "${PY}" -m exl2 bench --format gptq --bits 3 --m 1 8 16 64 512 \
        --shapes 4096x4096 8192x28672 --json "${LOG}/bench_gptq3.json" ;;
    splitsweep)  # the split-K heuristic against fixed caps (EXL2_CUDA_MAX_SPLIT), m <= 8
      for s in 1 2 4; do
        run "split${s}" env EXL2_CUDA_MAX_SPLIT=${s} "${PY}" -m exl2 bench --format gptq --m 1 2 4 8 \
          --shapes 4096x4096 8192x28672 --json "${LOG}/split${s}.json"
      done ;;
    canonicalbench)  # the canonical layout's kernels at the tc kernel's m, next to the default run
      run bench_canonical env EXL2_CUDA_TC=0 "${PY}" -m exl2 bench --format gptq --m 1 2 4 8 16 32 64 \
        --shapes 4096x4096 8192x28672 --json "${LOG}/bench_canonical.json" ;;
    tcsplit)  # the tc kernel's split-K choice against fixed caps
      for s in 1 2 4 8; do
        run "tcsplit${s}" env EXL2_CUDA_MAX_SPLIT=${s} "${PY}" -m exl2 bench --format gptq \
          --m 1 4 16 64 --shapes 4096x4096 4096x14336 14336x4096 8192x28672 --json "${LOG}/tcsplit${s}.json"
      done ;;
    mgpu) run mgpu "${PY}" -m pytest -q -p no:cacheprovider tests/test_multi_gpu.py ;;
    sanitize) run sanitize env EXL2_SANITIZE_LOGDIR="${LOG}" scripts/sanitize_cuda.sh memcheck racecheck synccheck ;;
    *) echo "unknown stage ${stage}"; exit 2 ;;
  esac
done
exit ${status}
