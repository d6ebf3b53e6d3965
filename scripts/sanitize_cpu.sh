#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer over the C++/CPU code, without Python:
#   1. a separate CPU-only build (EXL2_CUDA=OFF, EXL2_PYTHON=OFF) of the static library
#      and the CTest suite (tests/cpp), every translation unit compiled with
#      -fsanitize=address,undefined -fno-sanitize-recover=undefined;
#   2. CTest, three times: default kernels/threads, EXL2_CPU_SCALAR=1 (portable kernels),
#      EXL2_CPU_THREADS=3 (the fork-join path even for small layers); then a stress program
#      that closes a QMatrix while 4 threads run gemm()/dequantize() on it;
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

# close() racing gemm()/dequantize() on other threads (public API only): every call must
# either give the right numbers or throw InvalidArgument ("closed"); ASan sees a
# use-after-free, TSan (EXL2_SANITIZERS=thread) a data race.
LIB="$(find "${BUILD}" -name 'libexl2.a' | head -n 1)"
cat >"${BUILD}/close_race.cpp" <<'EOF'
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

#include "exl2/exl2.hpp"

static exl2::TensorView view(const void* p, exl2::DType t, std::vector<std::int64_t> shape) {
  exl2::TensorView v;
  v.data = p;
  v.dtype = t;
  v.shape = std::move(shape);
  return v;
}

static exl2::MutableTensorView out_view(void* p, std::vector<std::int64_t> shape) {
  exl2::MutableTensorView v;
  v.data = p;
  v.dtype = exl2::DType::Float16;
  v.shape = std::move(shape);
  return v;
}

int main() {
  const std::int64_t K = 1024, N = 256, G = 8, M = 6;
  std::vector<std::int32_t> qweight(K / 8 * N), qzeros(G * N / 8);
  std::vector<std::uint16_t> scales(G * N, 0x2000), x(M * K, 0x3c00);
  for (std::size_t i = 0; i < qweight.size(); ++i) qweight[i] = static_cast<std::int32_t>(i * 2654435761u);
  for (std::size_t i = 0; i < qzeros.size(); ++i) qzeros[i] = static_cast<std::int32_t>(i * 40503u);
  exl2::GptqWeights w;
  w.qweight = view(qweight.data(), exl2::DType::Int32, {K / 8, N});
  w.qzeros = view(qzeros.data(), exl2::DType::Int32, {G, N / 8});
  w.scales = view(scales.data(), exl2::DType::Float16, {G, N});
  const exl2::TensorView xv = view(x.data(), exl2::DType::Float16, {M, K});
  long ok = 0, closed = 0;
  for (int round = 0; round < 40; ++round) {
    auto q = exl2::QMatrix::from_gptq(w, exl2::Device::cpu());
    std::vector<std::uint16_t> ref(M * N);
    q.gemm(xv, out_view(ref.data(), {M, N}));
    std::atomic<long> n_ok{0}, n_closed{0};
    std::atomic<bool> bad{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::vector<std::uint16_t> out(M * N), dq(K * N);
        for (int i = 0; i < 200; ++i) {
          try {
            q.gemm(xv, out_view(out.data(), {M, N}));
            if (out != ref) bad = true;
            if ((i + t) % 16 == 0) q.dequantize(out_view(dq.data(), {K, N}));
            (void)q.in_features();
            ++n_ok;
          } catch (const exl2::InvalidArgument&) {
            ++n_closed;
            return;
          }
        }
      });
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50 * round));
    q.close();
    for (auto& th : threads) th.join();
    if (bad) {
      std::fprintf(stderr, "close race: a gemm returned wrong numbers\n");
      return 1;
    }
    ok += n_ok;
    closed += n_closed;
  }
  std::printf("close race: %ld calls completed, %ld threads saw the QMatrix closed\n", ok, closed);
  return closed > 0 ? 0 : 2;  // the race must actually have happened
}
EOF
# shellcheck disable=SC2086
"${CXX}" -std=c++17 ${FLAGS} -I"${ROOT}/src/include" "${BUILD}/close_race.cpp" "${LIB}" -pthread -o "${BUILD}/close_race"
echo "== close() vs gemm() on other threads"
"${BUILD}/close_race"
t2=$(date +%s)
echo "== ctest + close race: $((t2 - t1)) s"

if [[ "${EXL2_SANITIZE_SKIP_CORPUS:-0}" != "1" && -d "${ROOT}/fuzz/corpus" ]]; then
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
