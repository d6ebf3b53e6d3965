// Internal: the split-K choice of the clustered kernels (how many blocks of a thread-block
// cluster share one output tile's K range), in plain C++ so that host tests can check it
// (tests/cpp/test_split_rule.cpp). gemv.cu's cluster_split / single_wave_split apply it to a
// DeviceLayer: `slots` = blocks of the kernel that fit the GPU at once (blocks per
// multiprocessor x multiprocessors), `num_chunks` = the layer's 32-row chunks along K.
#pragma once

#include <cstdint>

namespace exl2::detail::split_rule {

/// The cap a kernel's own `max_split` becomes under EXL2_CUDA_MAX_SPLIT = `env_cap` (0: unset):
/// the environment replaces it, except that 16 needs a kernel that allows clusters of 16 (whose
/// caller passes 16); elsewhere it acts as 8.
inline int capped(int max_split, int env_cap) {
  if (env_cap <= 0) return max_split;
  return (env_cap == 16 && max_split < 16) ? 8 : env_cap;
}

/// Among the splits 1, 2, 4, 8, 16 (at most `max_split`) that leave each block at least
/// `min_chunks_per_block` chunks, the smallest whose last wave of blocks is within 5% as full
/// as the best one's: a larger split only adds reduction work once the waves are balanced.
inline int by_waves(std::int64_t tiles, std::int64_t slots, int num_chunks, int min_chunks_per_block, int max_split) {
  double eff[5] = {0, 0, 0, 0, 0};
  double best = 0.0;
  for (int i = 0, split = 1; i < 5; ++i, split *= 2) {
    if (split > 1 && (num_chunks / split < min_chunks_per_block || split > max_split)) break;
    const std::int64_t blocks = tiles * split;
    const std::int64_t waves = (blocks + slots - 1) / slots;
    eff[i] = static_cast<double>(blocks) / static_cast<double>(waves * slots);
    if (eff[i] > best) best = eff[i];
  }
  for (int i = 0, split = 1; i < 5; ++i, split *= 2) {
    if (eff[i] >= best - 0.05) return split;
  }
  return 1;
}

/// The largest split (at most `max_split` and 16, each block keeping `min_chunks_per_block`
/// chunks) whose blocks all fit one wave, among the powers of two or, with `any_size`, every
/// split 1, 2, 3, .. (for kernels whose cluster reduction takes any split: the wgmma kernel's
/// 64-row tiles, where 4096 x 14336 at m = 64 splits 3 ways, 336 of 396 blocks, instead of 2);
/// 1 when even 2 does not fit.
inline int single_wave(std::int64_t tiles, std::int64_t slots, int num_chunks, int min_chunks_per_block,
                       int max_split, bool any_size = false) {
  int best = 1;
  for (int split = 2; split <= max_split && split <= 16; split = any_size ? split + 1 : split * 2) {
    if (num_chunks / split < min_chunks_per_block || tiles * split > slots) break;
    best = split;
  }
  return best;
}

}  // namespace exl2::detail::split_rule
