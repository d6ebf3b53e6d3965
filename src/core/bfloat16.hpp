// Internal: bfloat16 <-> binary32 conversion in portable C++ (header-only).
//
// bfloat16 is the upper half of an IEEE binary32: same sign and 8-bit exponent, 7
// explicit mantissa bits. Widening is exact (bits << 16). Narrowing rounds to nearest,
// ties to even, on the float's bits: add 0x7fff plus the lowest kept bit, drop the low
// 16 bits. That is exact IEEE rounding for every finite value, subnormals included,
// and overflows to +-inf exactly when the rounded value exceeds bfloat16's largest
// finite value. NaN needs care: the addition could carry a NaN with a payload only in
// the low bits into infinity, so NaN is handled first and always stays a (quiet) NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace exl2::detail {

inline float bf16_to_float(std::uint16_t h) noexcept {
  const std::uint32_t x = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

/// Round-to-nearest-even bits of f, for f not NaN (no NaN check: the callers guarantee it).
inline std::uint16_t float_to_bf16_finite(float f) noexcept {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}

/// float -> bfloat16 bits, round to nearest even; a NaN keeps its sign and becomes
/// the quiet NaN 0x7fc0 (| sign).
inline std::uint16_t float_to_bf16(float f) noexcept {
  if (f != f) {
    std::uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    return static_cast<std::uint16_t>(((x >> 16) & 0x8000u) | 0x7fc0u);
  }
  return float_to_bf16_finite(f);
}

/// The nearest bfloat16 value of f as a float (one rounding; NaN stays NaN).
inline float round_to_bf16(float f) noexcept { return bf16_to_float(float_to_bf16(f)); }

/// The bfloat16 bits every NaN GEMM output is stored as (sign cleared, like fp16's 0x7e00).
constexpr std::uint16_t kCanonicalNaNBf16 = 0x7fc0;

}  // namespace exl2::detail
