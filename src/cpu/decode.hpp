// Internal: decoding a tile of canonical codes into fp32 weights (CPU backend).
#pragma once

#include <cstdint>

#include "core/bfloat16.hpp"
#include "core/half.hpp"
#include "core/layer.hpp"

namespace exl2::detail::cpu {

/// The weight's one rounding: to fp16, or to bfloat16 when BF (NaN kept NaN).
template <bool BF>
inline float round_weight(float f) noexcept {
  if constexpr (BF) {
    return round_to_bf16(f);
  } else {
    return round_to_half(f);
  }
}

/// dst[(r - r0) * ld + (n - n0)] = Wp[r, n] (the fp16- or, when BF, bf16-rounded weight
/// as float) for the permuted rows r0 <= r < r1 of group g and columns n0 <= n < n1.
/// scale_f32[n - n0] must hold the group's scales of those columns as float.
template <bool BF>
inline void decode_tile(const LayerMeta& meta, const HostArrays& a, std::int64_t g, std::int64_t r0, std::int64_t r1,
                        std::int64_t n0, std::int64_t n1, const float* scale_f32, float* dst, std::int64_t ld) {
  const std::int64_t N = meta.N;
  const int bits = meta.bits[g];
  const std::uint32_t mask = (1u << bits) - 1u;
  const std::uint8_t* zeros = a.zeros.data() + g * N;
  for (std::int64_t r = r0; r < r1; ++r) {
    // The code of the group's i-th row sits at bit offset i * bits of the column stream.
    const std::int64_t off = (r - meta.row_start[g]) * bits;
    const std::int64_t word = meta.word_start[g] + off / 32;
    const int shift = static_cast<int>(off % 32);
    const std::uint32_t* w0 = a.qweight.data() + word * N;
    float* out = dst + (r - r0) * ld - n0;
    if (shift + bits <= 32) {
      for (std::int64_t n = n0; n < n1; ++n) {
        const std::int32_t code = static_cast<std::int32_t>((w0[n] >> shift) & mask);
        out[n] = round_weight<BF>(static_cast<float>(code - zeros[n]) * scale_f32[n - n0]);
      }
    } else {  // 3/5/6-bit code straddling two words
      const std::uint32_t* w1 = w0 + N;
      for (std::int64_t n = n0; n < n1; ++n) {
        const std::uint32_t bitsv = (w0[n] >> shift) | (w1[n] << (32 - shift));
        const std::int32_t code = static_cast<std::int32_t>(bitsv & mask);
        out[n] = round_weight<BF>(static_cast<float>(code - zeros[n]) * scale_f32[n - n0]);
      }
    }
  }
}

/// scale_f32[n - n0] = float(scales[g, n]).
inline void load_scales(const LayerMeta& meta, const HostArrays& a, std::int64_t g, std::int64_t n0, std::int64_t n1,
                        float* scale_f32) {
  const std::uint16_t* s = a.scales.data() + g * meta.N;
  for (std::int64_t n = n0; n < n1; ++n) scale_f32[n - n0] = half_to_float(s[n]);
}

}  // namespace exl2::detail::cpu
