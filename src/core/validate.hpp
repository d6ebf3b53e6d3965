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
  const std::int32_t* qweight = nullptr;  // [K*bits/32, N], checkpoint row order
  const std::int32_t* qzeros = nullptr;   // [G, N*bits/32]
  const std::uint16_t* scales = nullptr;  // [G, N] fp16 bits
  int zero_offset = 1;                    // 1 for v1 zeros, 0 for v2
  int bits = 4;                           // 2, 3, 4 or 8
};

struct ValidatedAwq {
  LayerMeta meta;
  const std::int32_t* qweight = nullptr;  // [K, N/8], AWQ nibble order
  const std::int32_t* qzeros = nullptr;   // [G, N/8], AWQ nibble order
  const std::uint16_t* scales = nullptr;  // [G, N] fp16 bits
};

ValidatedExl2 validate_exl2(const Exl2Weights& w, Device target, cudaStream_t stream);
ValidatedGptq validate_gptq(const GptqWeights& w, Device target, cudaStream_t stream);
ValidatedAwq validate_awq(const AwqWeights& w, Device target, cudaStream_t stream);

/// The canonical group tables of a layer with G groups of `group_size` consecutive
/// (permuted) rows, all `bits` wide: every group's stream starts word-aligned, so a
/// group takes ceil(group_size * bits / 32) word rows (padded when not whole).
/// Sets bits, row_start, word_start and Q. `what` names the tensor for size errors.
void uniform_groups(LayerMeta& m, int bits, std::int64_t group_size, const char* what);

/// GPTQ and AWQ: qweight and qzeros present, int32, 2-D; scales present, float16, 2-D;
/// all on the CPU or on `target` (shapes are checked by each format).
void check_zero_point_tensors(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                              Device target);

/// Shared by both formats: optional bias [N] fp16, finite.
std::vector<std::uint16_t> validate_bias(const TensorView& bias, std::int64_t N, Device target,
                                         cudaStream_t stream);
/// Every fp16 value finite (host loop or device reduction).
bool all_finite_f16(const TensorView& t, cudaStream_t stream);

}  // namespace exl2::detail
