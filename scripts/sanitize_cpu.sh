#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer over the C++/CPU code, without Python:
#   1. a separate CPU-only build (EXL2_CUDA=OFF, EXL2_PYTHON=OFF) of the static library
#      and the CTest suite (tests/cpp), every translation unit compiled with
#      -fsanitize=address,undefined -fno-sanitize-recover=undefined;
#   2. CTest, three times: default kernels/threads, EXL2_CPU_SCALAR=1 (portable kernels),
#      EXL2_CPU_THREADS=3 (the fork-join path even for small layers);
#   3. the libFuzzer harness fuzz/fuzz_validate.cpp linked with a plain main()
#      (fuzz/replay_main.cpp), replaying every input of fuzz/corpus/ and fuzz/corpus_huge/
#      (the regression corpora of the coverage-guided fuzzing campaigns).
# Any sanitizer report aborts the process and fails the script (exit status != 0).
#
# Usage: scripts/sanitize_cpu.sh [BUILD_DIR]          (default: build-sanitize)
# Environment:
#   CXX                      compiler (default: c++; GCC >= 9 or clang >= 10)
#   EXL2_SANITIZERS          -fsanitize list (default: address,undefined; e.g. "thread")
#   EXL2_SANITIZE_JOBS       build parallelism (default: nproc)
#   EXL2_SANITIZE_SKIP_CORPUS=1  skip step 3
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-${ROOT}/build-sanitize}"
SAN="${EXL2_SANITIZERS:-address,undefined}"
JOBS="${EXL2_SANITIZE_JOBS:-$(nproc 2>/dev/null || echo 2)}"
CXX="${CXX:-c++}"
FLAGS="-fsanitize=${SAN} -fno-omit-frame-pointer -g -O1"
if [[ "${SAN}" == *undefined* ]]; then
  FLAGS="${FLAGS} -fno-sanitize-recover=undefined"
fi
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}"

t0=$(date +%s)
echo "== sanitize_cpu: ${SAN} with ${CXX} into ${BUILD}"
cmake -S "${ROOT}" -B "${BUILD}" "${GEN[@]}" \
  -DCMAKE_CXX_COMPILER="${CXX}" \
  -DCMAKE_BUILD_TYPE=Sanitize \
  -DCMAKE_CXX_FLAGS_SANITIZE="${FLAGS}" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=${SAN}" \
  -DEXL2_CUDA=OFF -DEXL2_PYTHON=OFF -DEXL2_INSTALL=OFF -DEXL2_BUILD_TESTS=ON >"${BUILD}.configure.log" 2>&1 \
  || { cat "${BUILD}.configure.log"; exit 1; }
cmake --build "${BUILD}" --parallel "${JOBS}"
t1=$(date +%s)
echo "== build: $((t1 - t0)) s"

run_ctest() {
  echo "== ctest ($*)"
  env "$@" ctest --test-dir "${BUILD}" --output-on-failure --timeout 1200
}
run_ctest EXL2_SANITIZE_RUN=default
run_ctest EXL2_CPU_SCALAR=1
run_ctest EXL2_CPU_THREADS=3
t2=$(date +%s)
echo "== ctest: $((t2 - t1)) s"

if [[ "${EXL2_SANITIZE_SKIP_CORPUS:-0}" != "1" && -d "${ROOT}/fuzz/corpus" ]]; then
  LIB="$(find "${BUILD}" -name 'libexl2.a' | head -n 1)"
  echo "== fuzz corpus replay (fuzz/corpus: $(find "${ROOT}/fuzz/corpus" -type f | wc -l) inputs)"
  # shellcheck disable=SC2086
  "${CXX}" -std=c++17 ${FLAGS} -I"${ROOT}/src/include" -I"${ROOT}/src" \
    "${ROOT}/fuzz/fuzz_validate.cpp" "${ROOT}/fuzz/replay_main.cpp" "${LIB}" -pthread \
    -o "${BUILD}/exl2_fuzz_replay"
  EXL2_FUZZ_STATS=1 "${BUILD}/exl2_fuzz_replay" "${ROOT}/fuzz/corpus"
  if [[ -d "${ROOT}/fuzz/corpus_huge" ]]; then
    # inputs of the EXL2_FUZZ_HUGE campaigns: layers with > 65536 word rows (int16 start rows wrap)
    EXL2_FUZZ_HUGE=1 EXL2_FUZZ_STATS=1 "${BUILD}/exl2_fuzz_replay" "${ROOT}/fuzz/corpus_huge"
  fi
  t3=$(date +%s)
  echo "== corpus replay: $((t3 - t2)) s"
fi
echo "== sanitize_cpu: OK (${SAN}), $(($(date +%s) - t0)) s in all"
