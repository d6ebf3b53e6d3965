// The weight formats exl2 reads, as views of the tensors a checkpoint stores.
//
// EXL2 (per-group mixed bit width), for a layer y = x @ W with W of shape [K, N]:
//   q_weight    int32   [Q, N]   codes; each column is a little-endian bit stream per group
//   q_invperm   int32   [K]      W[k] = Wp[q_invperm[k]]  (Wp: weight rows in storage order)
//   q_scale     int32   [G, N/8] 4-bit scale codes, 8 per word along N
//   q_scale_max float16 [G]      per-group maximum scale (divided by 256 unless
//                                scale_max_prescaled: the reference bindings' callers
//                                divide it themselves)
//   q_groups    int16   [2G]     (bits, first q_weight row) per group, bits in {2,3,4,5,6,8}
//   q_perm      int32   [K]      optional, must equal argsort(q_invperm)
//   bias        float16 [N]      optional
// Dequantisation (float16, rounding after every operation):
//   scale = f16(f16((code+1)^2) * f16(q_scale_max/256));  Wp = f16((q - 2^(bits-1)) * scale)
//
// GPTQ (b-bit, AutoGPTQ packing), b = GptqWeights::bits in {2, 3, 4, 8}:
//   qweight int32   [K*b/32, N]  each column is one little-endian b-bit stream along K
//                                (2-bit: 16 rows per word, 4-bit: 8, 8-bit: 4; 3-bit: 32
//                                rows in 3 words, a code may straddle two words)
//   qzeros  int32   [G, N*b/32]  each row is one little-endian b-bit stream along N
//   scales  float16 [G, N]
//   g_idx   int32   [K]          optional group of each row (act-order)
//   bias    float16 [N]          optional
//   W[k, n] = f16(scales[g, n] * (q[k, n] - z[g, n])), g = g_idx[k] (or k / (K/G)),
//   z = (stored + 1) & (2^b - 1) for ZeroFormat::V1, z = stored for ZeroFormat::V2.
//
// AWQ (4-bit, AutoAWQ "GEMM" packing), packed along N with interleaved nibbles:
//   qweight int32   [K, N/8]     nibble i of word j holds column 8j + {0,2,4,6,1,3,5,7}[i]
//   qzeros  int32   [G, N/8]     same nibble order
//   scales  float16 [G, N]
//   bias    float16 [N]          optional
//   W[k, n] = f16(scales[g, n] * (q[k, n] - z[g, n])), g = k / (K/G), z as stored.
//
// Optional tensors are "absent" when their data pointer is null.
#pragma once

#include "exl2/tensor.hpp"

namespace exl2 {

enum class Format : std::uint8_t { EXL2, GPTQ, AWQ };
const char* format_name(Format f) noexcept;

struct Exl2Weights {
  TensorView q_weight;
  TensorView q_invperm;
  TensorView q_scale;
  TensorView q_scale_max;
  TensorView q_groups;
  TensorView q_perm;  // optional
  TensorView bias;    // optional
  /// True when q_scale_max was already divided by 256 by the caller (the reference
  /// bindings' calling convention); false for checkpoint values.
  bool scale_max_prescaled = false;
};

enum class ZeroFormat : std::uint8_t {
  V1,  // AutoGPTQ v1: stored zero is z - 1 (the effective zero is (stored + 1) & (2^bits - 1))
  V2,  // zero stored as is
};

struct GptqWeights {
  TensorView qweight;
  TensorView qzeros;
  TensorView scales;
  TensorView g_idx;  // optional
  TensorView bias;   // optional
  ZeroFormat zero_format = ZeroFormat::V1;
  int bits = 4;  // code width: 2, 3, 4 or 8
};

struct AwqWeights {
  TensorView qweight;
  TensorView qzeros;
  TensorView scales;
  TensorView bias;  // optional
};

}  // namespace exl2
