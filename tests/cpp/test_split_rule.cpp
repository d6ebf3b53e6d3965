// Tests of the split-K rule of the clustered kernels (src/cuda/split_rule.hpp) on the host:
// the choices the kernels' comments and src/cuda/README.md report for the bench shapes on an
// H100 (132 multiprocessors), the EXL2_CUDA_MAX_SPLIT cap, and the limits (chunks per block,
// the cap, clusters of at most 16). Needs no GPU and no CUDA toolkit.
#include <cstdint>
#include <cstdio>

#include "cuda/split_rule.hpp"

namespace sr = exl2::detail::split_rule;

static int g_failures = 0;

static void expect(const char* what, int got, int want) {
  if (got != want) {
    std::fprintf(stderr, "%s: got %d, want %d\n", what, got, want);
    ++g_failures;
  }
}

int main() {
  const std::int64_t sms = 132;
  // The tc kernel, 16-row tiles (6 blocks per multiprocessor), 128-column tiles, cap 8, at least
  // 16 chunks a block: 8192 x 28672 (224 tiles, 256 chunks) takes 8 (2.26 waves, the fullest
  // last wave); 4096 x 14336 (112 tiles, 128 chunks) takes 4 (one wave).
  expect("tc MT=1 8192x28672", sr::by_waves(224, 6 * sms, 256, 16, 8), 8);
  expect("tc MT=1 4096x14336", sr::by_waves(112, 6 * sms, 128, 16, 8), 4);
  // With clusters of 16 allowed (8 chunks a block): 4096 x 4096 (32 tiles, 128 chunks) takes 16.
  expect("tc MT=1 4096x4096 c16", sr::by_waves(32, 6 * sms, 128, 8, 16), 16);
  // 64-row tiles (3 blocks per multiprocessor): the largest split that fits one wave.
  expect("tc MT=4 8192x28672", sr::single_wave(224, 3 * sms, 256, 16, 8), 1);
  expect("tc MT=4 4096x14336", sr::single_wave(112, 3 * sms, 128, 16, 8), 2);
  expect("tc MT=4 4096x4096", sr::single_wave(32, 3 * sms, 128, 16, 8), 8);
  expect("tc MT=4 14336x4096", sr::single_wave(32, 3 * sms, 448, 16, 8), 8);
  // The wgmma kernel's 64-row tiles take any split: 4096 x 14336 splits 3 ways (336 of 396
  // blocks); the other bench shapes as with powers of two.
  expect("wgmma R=64 4096x14336", sr::single_wave(112, 3 * sms, 128, 16, 8, true), 3);
  expect("wgmma R=64 8192x28672", sr::single_wave(224, 3 * sms, 256, 16, 8, true), 1);
  expect("wgmma R=64 4096x4096", sr::single_wave(32, 3 * sms, 128, 16, 8, true), 8);
  expect("wgmma R=64 14336x4096", sr::single_wave(32, 3 * sms, 448, 16, 8, true), 8);
  expect("single_wave any_size chunks", sr::single_wave(1, 1000, 48, 16, 16, true), 3);
  expect("single_wave any_size cap", sr::single_wave(1, 1000, 4096, 1, 5, true), 5);
  expect("single_wave any_size 16", sr::single_wave(1, 1000, 4096, 1, 64, true), 16);
  expect("single_wave any_size none", sr::single_wave(100, 150, 4096, 1, 8, true), 1);
  // Limits: chunks per block (32 chunks, 16 a block: at most 2), the cap, at most 16.
  expect("single_wave chunks", sr::single_wave(1, 1000, 32, 16, 16), 2);
  expect("single_wave cap", sr::single_wave(1, 1000, 4096, 1, 4), 4);
  expect("single_wave 16", sr::single_wave(1, 1000, 4096, 1, 64), 16);
  expect("by_waves chunks", sr::by_waves(100, 1000, 32, 16, 16), 2);
  expect("by_waves cap", sr::by_waves(100, 1000, 4096, 1, 4), 4);
  // Splits whose last waves are within 5 points of the best count as equal: the smallest wins
  // (here every split leaves the GPU under 5% full).
  expect("by_waves near-equal", sr::by_waves(1, 1000, 4096, 1, 16), 1);
  // Balanced waves at split 1 already: no split (a larger one only adds reduction work).
  expect("by_waves balanced", sr::by_waves(792, 792, 256, 16, 8), 1);
  // EXL2_CUDA_MAX_SPLIT: unset keeps the kernel's cap; a value replaces it; 16 acts as 8 for a
  // kernel that does not allow clusters of 16 (cap below 16).
  expect("capped unset", sr::capped(8, 0), 8);
  expect("capped 2", sr::capped(8, 2), 2);
  expect("capped 16 on a cap of 8", sr::capped(8, 16), 8);
  expect("capped 16 on a cap of 16", sr::capped(16, 16), 16);
  expect("capped 8 on a cap of 4", sr::capped(4, 8), 8);
  if (g_failures == 0) std::printf("split rule: ok\n");
  return g_failures == 0 ? 0 : 1;
}
