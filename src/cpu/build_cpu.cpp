#include <cstring>

#include "cpu/cpu_backend.hpp"
#include "core/half.hpp"

namespace exl2::detail::cpu {

HostArrays build_exl2(const ValidatedExl2& v) {
  const LayerMeta& m = v.meta;
  HostArrays a;
  a.qweight.resize(static_cast<std::size_t>(m.Q * m.N));
  std::memcpy(a.qweight.data(), v.q_weight, a.qweight.size() * sizeof(std::uint32_t));
  a.scales.resize(static_cast<std::size_t>(m.G * m.N));
  a.zeros.resize(static_cast<std::size_t>(m.G * m.N));
  for (std::int64_t g = 0; g < m.G; ++g) {
    const float qsm = half_to_float(v.qsm_div256[g]);
    const auto zero = static_cast<std::uint8_t>(1u << (m.bits[g] - 1));
    for (std::int64_t n = 0; n < m.N; ++n) {
      const std::uint32_t word = static_cast<std::uint32_t>(v.q_scale[g * (m.N / 8) + n / 8]);
      const std::uint32_t code = (word >> (4 * (n % 8))) & 15u;
      // f16(f16((code + 1)^2) * qsm): (code + 1)^2 <= 256 is exact in fp16.
      const float sq = static_cast<float>((code + 1) * (code + 1));
      a.scales[g * m.N + n] = float_to_half(sq * qsm);
      a.zeros[g * m.N + n] = zero;
    }
  }
  return a;
}

HostArrays build_gptq(const ValidatedGptq& v) {
  const LayerMeta& m = v.meta;
  HostArrays a;
  a.qweight.resize(static_cast<std::size_t>(m.Q * m.N));
  if (m.identity_perm) {
    std::memcpy(a.qweight.data(), v.qweight, a.qweight.size() * sizeof(std::uint32_t));
  } else {
    // Repack rows in group-sorted order: permuted row r holds checkpoint row perm[r].
    std::fill(a.qweight.begin(), a.qweight.end(), 0u);
    for (std::int64_t r = 0; r < m.K; ++r) {
      const std::int64_t k = m.perm[r];
      const std::uint32_t* src = reinterpret_cast<const std::uint32_t*>(v.qweight) + (k / 8) * m.N;
      std::uint32_t* dst = a.qweight.data() + (r / 8) * m.N;
      const int src_shift = static_cast<int>(4 * (k % 8));
      const int dst_shift = static_cast<int>(4 * (r % 8));
      for (std::int64_t n = 0; n < m.N; ++n) dst[n] |= ((src[n] >> src_shift) & 15u) << dst_shift;
    }
  }
  a.scales.resize(static_cast<std::size_t>(m.G * m.N));
  std::memcpy(a.scales.data(), v.scales, a.scales.size() * sizeof(std::uint16_t));
  a.zeros.resize(static_cast<std::size_t>(m.G * m.N));
  for (std::int64_t g = 0; g < m.G; ++g) {
    for (std::int64_t n = 0; n < m.N; ++n) {
      const std::uint32_t word = static_cast<std::uint32_t>(v.qzeros[g * (m.N / 8) + n / 8]);
      a.zeros[g * m.N + n] = static_cast<std::uint8_t>((((word >> (4 * (n % 8))) & 15u) + v.zero_offset) & 15u);
    }
  }
  return a;
}

}  // namespace exl2::detail::cpu
