// Internal: complete validation of the format tensors and their translation into the
// canonical LayerMeta (see layer.hpp). Small tensors (groups, permutations, g_idx,
// per-group maxima, bias) are read to the host; the large ones (codes, scales, zeros)
// stay where they are and are only pointed to, for the backend builders to copy.
#pragma once

#include <cstdint>
#include <vector>

#include "core/layer.hpp"
#include "exl2/format.hpp"
#include "exl2/qmatrix.hpp"

namespace exl2::detail {

struct ValidatedExl2 {
  LayerMeta meta;
  const std::int32_t* q_weight = nullptr;    // [Q, N], host or target device
  const std::int32_t* q_scale = nullptr;     // [G, N/8], host or target device
  std::vector<std::uint16_t> qsm_div256;     // [G] fp16 bits, f16(q_scale_max / 256)
};

struct ValidatedGptq {
  LayerMeta meta;
  const std::int32_t* qweight = nullptr;  // [K/8, N], checkpoint row order
  const std::int32_t* qzeros = nullptr;   // [G, N/8]
  const std::uint16_t* scales = nullptr;  // [G, N] fp16 bits
  int zero_offset = 1;                    // 1 for v1 zeros, 0 for v2
};

ValidatedExl2 validate_exl2(const Exl2Weights& w, Device target, cudaStream_t stream);
ValidatedGptq validate_gptq(const GptqWeights& w, Device target, cudaStream_t stream);

/// Shared by both formats: optional bias [N] fp16, finite.
std::vector<std::uint16_t> validate_bias(const TensorView& bias, std::int64_t N, Device target,
                                         cudaStream_t stream);
/// Every fp16 value finite (host loop or device reduction).
bool all_finite_f16(const TensorView& t, cudaStream_t stream);

}  // namespace exl2::detail
