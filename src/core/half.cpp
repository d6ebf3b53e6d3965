#include "core/half.hpp"

#include <cstring>

namespace exl2::detail {

float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // signed zero
  } else {
    // subnormal half: normalise into a float
    std::uint32_t e = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

std::uint16_t float_to_half(float f) noexcept {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or nan
    return static_cast<std::uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
  }
  if (absx >= 0x477ff000u) {  // rounds to >= 65520 -> inf
    return static_cast<std::uint16_t>(sign | 0x7c00u);
  }
  const std::int32_t exp = static_cast<std::int32_t>(absx >> 23) - 127;
  if (exp >= -14) {  // normal half
    std::uint32_t mant = absx & 0x7fffffu;
    std::uint32_t h = (static_cast<std::uint32_t>(exp + 15) << 10) | (mant >> 13);
    const std::uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carries into exponent correctly
    return static_cast<std::uint16_t>(sign | h);
  }
  if (exp < -25) return sign;  // below half of the smallest subnormal -> 0
  // subnormal half: value = mant_full * 2^(exp-23); unit = 2^-24
  const std::uint32_t mant_full = (absx & 0x7fffffu) | 0x800000u;
  const int shift = -exp - 1;  // 14 + (−14 − exp) + ... : bits to drop so that unit becomes 2^-24
  // mant_full * 2^(exp-23) / 2^-24 = mant_full * 2^(exp+1) = mant_full >> (-(exp+1))
  std::uint32_t h = mant_full >> shift;
  const std::uint32_t rem = mant_full & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

}  // namespace exl2::detail
