// Internal: the canonical description of a quantized layer, shared by all backends.
//
// Both formats are brought into one shape at construction ("permuted groups"):
//   y = x @ W = x[:, perm] @ Wp
// where Wp is the weight with its rows in storage order. Wp is cut into G groups of
// consecutive rows; group g has `bits[g]` bits per code, covers permuted rows
// [row_start[g], row_start[g+1]) and its codes start at packed word row word_start[g].
// Within a group, column n is a little-endian bit stream over the words
// qweight[word_start[g] .. word_start[g+1], n]: the code of the group's i-th row
// sits at bit offset i*bits (it may straddle two words for 3, 5 and 6 bits).
// EXL2 is stored exactly like this; GPTQ becomes it after its rows are sorted by
// group (stable; identity without act-order) and repacked, with every group 4-bit.
//
// Per (group, column) the backends keep the effective fp16 scale s[g, n] and the
// integer zero point z[g, n] (EXL2: 2^(bits-1); GPTQ: the unpacked zero), so that
// every format dequantizes with the same single rounding:
//   Wp[r, n] = f16( (q[r, n] - z[g, n]) * s[g, n] )
// (q - z) is a small exact integer and s an fp16 value, so their product is exact in
// fp32 and the one rounding to fp16 matches the reference's half-precision multiply.
// For bfloat16 activations/outputs the backends round the same exact product once to
// bfloat16 instead: Wp_bf16[r, n] = bf16( (q[r, n] - z[g, n]) * s[g, n] ).
#pragma once

#include <cstdint>
#include <vector>

#include "exl2/format.hpp"

namespace exl2::detail {

struct LayerMeta {
  Format format = Format::EXL2;
  std::int64_t K = 0;  // in_features
  std::int64_t N = 0;  // out_features
  std::int64_t G = 0;  // groups
  std::int64_t Q = 0;  // packed word rows
  std::vector<std::int32_t> bits;        // [G]
  std::vector<std::int32_t> row_start;   // [G + 1], row_start[G] == K
  std::vector<std::int32_t> word_start;  // [G + 1], word_start[G] == Q
  std::vector<std::int32_t> perm;        // [K], permuted row r reads activation column perm[r]
  bool identity_perm = true;             // perm[r] == r for all r
  std::vector<std::uint16_t> bias;       // [N] fp16 bits, or empty
};

/// The owned, canonical host arrays (what the CPU backend computes with and what the
/// CUDA backend builds on the device).
struct HostArrays {
  std::vector<std::uint32_t> qweight;  // [Q, N]
  std::vector<std::uint16_t> scales;   // [G, N] fp16 bits
  std::vector<std::uint8_t> zeros;     // [G, N]
};

/// Validated, contiguous format tensors as the backends read them at construction.
/// Each pointer may be host memory or memory of the target device; never kept.
struct Exl2Raw {
  const std::int32_t* q_weight;   // [Q, N]
  const std::int32_t* q_scale;    // [G, N/8]
  const std::uint16_t* qsm_div256;  // [G] host array: f16(q_scale_max / 256) bits
};
struct GptqRaw {
  const std::int32_t* qweight;  // [K/8, N] in the checkpoint's row order
  const std::int32_t* qzeros;   // [G, N/8]
  const std::uint16_t* scales;  // [G, N] fp16 bits
  int zero_offset;              // 1 for v1 zeros, 0 for v2
};

}  // namespace exl2::detail
