// Internal: IEEE binary16 <-> binary32 conversion in portable C++.
//
// float_to_half rounds to nearest, ties to even (like __float2half_rn and numpy),
// including subnormals, overflow to infinity and NaN. half_to_float is exact.
#pragma once

#include <cstdint>
#include <cstring>

namespace exl2::detail {

float half_to_float(std::uint16_t h) noexcept;
std::uint16_t float_to_half(float f) noexcept;

/// The nearest fp16 value of f, returned as float (one rounding). Values in the normal
/// fp16 range (the common case) are rounded in place on the float's bits: round the
/// 13 mantissa bits that fp16 lacks to nearest-even. Everything else takes the full path.
inline float round_to_half(float f) noexcept {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const std::uint32_t a = x & 0x7fffffffu;
  if (a >= 0x38800000u && a < 0x477ff000u) {  // 2^-14 <= |f| < 65520
    x += 0xfffu + ((x >> 13) & 1u);
    x &= ~0x1fffu;
    std::memcpy(&f, &x, sizeof f);
    return f;
  }
  return half_to_float(float_to_half(f));
}

inline bool half_is_finite(std::uint16_t h) noexcept { return (h & 0x7c00u) != 0x7c00u; }

}  // namespace exl2::detail
