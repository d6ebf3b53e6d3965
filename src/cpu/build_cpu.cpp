#include <cstring>
#include <vector>

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

namespace {

/// The `b`-bit code at bit offset `bit` of a little-endian stream whose consecutive
/// 32-bit words are p[0], p[stride], p[2 * stride], ... (a code may straddle two words).
inline std::uint32_t stream_get(const std::uint32_t* p, std::int64_t stride, std::int64_t bit, int b) {
  const std::int64_t w = bit >> 5;
  const int sh = static_cast<int>(bit & 31);
  std::uint32_t v = p[w * stride] >> sh;
  if (sh + b > 32) v |= p[(w + 1) * stride] << (32 - sh);
  return v & ((1u << b) - 1u);
}

/// ORs `code` (< 2^b) into the stream at bit offset `bit` (the bits must be zero).
inline void stream_put(std::uint32_t* p, std::int64_t stride, std::int64_t bit, int b, std::uint32_t code) {
  const std::int64_t w = bit >> 5;
  const int sh = static_cast<int>(bit & 31);
  p[w * stride] |= code << sh;
  if (sh + b > 32) p[(w + 1) * stride] |= code >> (32 - sh);
}

/// The canonical qweight [Q, N] of a layer with uniform-width groups (layer.hpp):
/// permuted row r of group g sits at bit (r - row_start[g]) * bits of the group's stream,
/// which starts at word row word_start[g]; it holds checkpoint row perm[r], whose code
/// in column n is code_at(k, n).
template <class CodeAt>
std::vector<std::uint32_t> pack_canonical(const LayerMeta& m, CodeAt code_at) {
  std::vector<std::uint32_t> out(static_cast<std::size_t>(m.Q * m.N), 0u);
  for (std::int64_t g = 0; g < m.G; ++g) {
    const int b = m.bits[g];
    std::uint32_t* dst = out.data() + static_cast<std::int64_t>(m.word_start[g]) * m.N;
    for (std::int64_t r = m.row_start[g]; r < m.row_start[g + 1]; ++r) {
      const std::int64_t k = m.perm[r];
      const std::int64_t bit = (r - m.row_start[g]) * b;
      for (std::int64_t n = 0; n < m.N; ++n) stream_put(dst + n, m.N, bit, b, code_at(k, n));
    }
  }
  return out;
}

/// AWQ's interleaved nibble order: column c of a word sits in nibble kAwqNibble[c % 8]
/// (AutoAWQ packs nibble i with column {0, 2, 4, 6, 1, 3, 5, 7}[i]).
constexpr int kAwqNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};

inline std::uint32_t awq_nibble(const std::uint32_t* row, std::int64_t n) {
  return (row[n / 8] >> (4 * kAwqNibble[n % 8])) & 15u;
}

}  // namespace

HostArrays build_gptq(const ValidatedGptq& v) {
  const LayerMeta& m = v.meta;
  const int b = v.bits;
  const auto* src = reinterpret_cast<const std::uint32_t*>(v.qweight);
  HostArrays a;
  // The checkpoint stores each column as one b-bit stream along K. When the groups start
  // on word boundaries (group_size * b a multiple of 32) and the rows are in order, that
  // is the canonical layout already; otherwise repack row by row.
  const bool aligned = m.Q * 32 == m.K * b;
  if (m.identity_perm && aligned) {
    a.qweight.resize(static_cast<std::size_t>(m.Q * m.N));
    std::memcpy(a.qweight.data(), src, a.qweight.size() * sizeof(std::uint32_t));
  } else {
    a.qweight = pack_canonical(m, [&](std::int64_t k, std::int64_t n) { return stream_get(src + n, m.N, k * b, b); });
  }
  a.scales.resize(static_cast<std::size_t>(m.G * m.N));
  std::memcpy(a.scales.data(), v.scales, a.scales.size() * sizeof(std::uint16_t));
  // qzeros row g is one b-bit stream along N; v1 stores z - 1 (wrapping to b bits).
  a.zeros.resize(static_cast<std::size_t>(m.G * m.N));
  const auto* zsrc = reinterpret_cast<const std::uint32_t*>(v.qzeros);
  const std::int64_t zwords = m.N * b / 32;
  const std::uint32_t mask = (1u << b) - 1u;
  for (std::int64_t g = 0; g < m.G; ++g) {
    for (std::int64_t n = 0; n < m.N; ++n) {
      const std::uint32_t stored = stream_get(zsrc + g * zwords, 1, n * b, b);
      a.zeros[g * m.N + n] = static_cast<std::uint8_t>((stored + static_cast<std::uint32_t>(v.zero_offset)) & mask);
    }
  }
  return a;
}

HostArrays build_awq(const ValidatedAwq& v) {
  const LayerMeta& m = v.meta;
  const auto* src = reinterpret_cast<const std::uint32_t*>(v.qweight);
  const std::int64_t words = m.N / 8;
  HostArrays a;
  a.qweight = pack_canonical(m, [&](std::int64_t k, std::int64_t n) { return awq_nibble(src + k * words, n); });
  a.scales.resize(static_cast<std::size_t>(m.G * m.N));
  std::memcpy(a.scales.data(), v.scales, a.scales.size() * sizeof(std::uint16_t));
  a.zeros.resize(static_cast<std::size_t>(m.G * m.N));
  const auto* zsrc = reinterpret_cast<const std::uint32_t*>(v.qzeros);
  for (std::int64_t g = 0; g < m.G; ++g) {
    for (std::int64_t n = 0; n < m.N; ++n) a.zeros[g * m.N + n] = static_cast<std::uint8_t>(awq_nibble(zsrc + g * words, n));
  }
  return a;
}

}  // namespace exl2::detail::cpu
