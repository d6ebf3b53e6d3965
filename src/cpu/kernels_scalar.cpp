// The portable scalar kernels of the CPU backend (baseline ISA; the fallback for CPUs
// without AVX2/FMA/F16C, non-x86 targets and MSVC, and the reference the AVX2 kernels
// must match bit for bit: see kernels.hpp for the summation contract).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/bfloat16.hpp"
#include "core/half.hpp"
#include "cpu/decode.hpp"
#include "cpu/kernels.hpp"

// No FP contraction in this file (round_half_fast / decode_tile_fast must not fuse; GCC
// gets -ffp-contract=off from src/CMakeLists.txt and ignores the standard pragma).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(_MSC_VER)
#pragma fp_contract(off)
#endif

namespace exl2::detail::cpu {

namespace {
constexpr std::int64_t kCols = 64;  // columns per block: the fp32 accumulators of one x row fit in L1
constexpr std::int64_t kRows = 32;  // weight rows decoded per tile

/// decode_tile (decode.hpp) for the GEMM when every scale of the columns has |s| < 256:
/// the fp16 rounding of the exact f = (code - z) * s is done branch-free (so the loops
/// vectorise) with Veltkamp's split c = f * (2^13 + 1); w = c - (c - f), which rounds f to
/// 11 significant bits, nearest even. That equals the fp16 rounding because f is a
/// multiple of s's fp16 quantum (>= 2^-24) and |f| < 65504 (verified exhaustively for every
/// fp16 s and code - z in [-255, 255]; kernels_avx2.cpp uses the same rounding). Needs
/// this file compiled without FP contraction (src/CMakeLists.txt): c - f must not fuse.
/// With BF the rounding is to bfloat16 instead, on the float's bits (add 0x7fff + the
/// lowest kept bit, clear the low 16 bits): exact nearest-even for the finite f here.
template <bool BF>
void decode_tile_fast(const LayerMeta& meta, const HostArrays& a, std::int64_t g, std::int64_t r0, std::int64_t r1,
                      std::int64_t n0, std::int64_t n1, const float* scale_f32, float* dst, std::int64_t ld) {
  const std::int64_t N = meta.N;
  const int bits = meta.bits[g];
  const std::uint32_t mask = (1u << bits) - 1u;
  const std::uint8_t* zeros = a.zeros.data() + g * N + n0;
  const std::int64_t nc = n1 - n0;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::int64_t off = (r - meta.row_start[g]) * bits;
    const std::int64_t word = meta.word_start[g] + off / 32;
    const int shift = static_cast<int>(off % 32);
    const std::uint32_t* w0 = a.qweight.data() + word * N + n0;
    const std::uint32_t* w1 = w0 + N;
    const int spill = shift + bits > 32 ? 32 - shift : 0;  // straddling code: bits from the next word
    float* out = dst + (r - r0) * ld;
    for (std::int64_t n = 0; n < nc; ++n) {
      std::uint32_t v = w0[n] >> shift;
      if (spill != 0) v |= w1[n] << spill;
      const float f = static_cast<float>(static_cast<std::int32_t>(v & mask) - static_cast<std::int32_t>(zeros[n])) *
                      scale_f32[n];
      if constexpr (BF) {
        std::uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
        std::memcpy(&out[n], &u, sizeof u);
      } else {
        const float c = f * 8193.0f;
        out[n] = c - (c - f);
      }
    }
  }
}
}  // namespace

void convert_x_scalar(const LayerMeta& meta, const std::uint16_t* x, float* xp, std::int64_t i0, std::int64_t i1,
                      bool bf16) {
  const std::int64_t K = meta.K;
  float (*const cvt)(std::uint16_t) noexcept = bf16 ? bf16_to_float : half_to_float;
  for (std::int64_t i = i0; i < i1; ++i) {
    const std::uint16_t* src = x + i * K;
    float* dst = xp + i * K;
    if (meta.identity_perm) {
      for (std::int64_t r = 0; r < K; ++r) dst[r] = cvt(src[r]);
    } else {
      for (std::int64_t r = 0; r < K; ++r) dst[r] = cvt(src[meta.perm[r]]);
    }
  }
}

namespace {

// For each column block: decode a [kRows x kCols] weight tile once, then apply it to all
// m rows of x, accumulating each output over the rows in ascending order (the contract).
template <bool BF>
void gemm_cols_impl(const GemmArgs& args, std::int64_t n0_all, std::int64_t n1_all) {
  const LayerMeta& meta = *args.meta;
  const HostArrays& a = *args.a;
  const std::int64_t N = meta.N, K = meta.K, m = args.m;
  std::vector<float> scale(kCols), tile(kRows * kCols), acc(static_cast<std::size_t>(m * kCols));
  for (std::int64_t n0 = n0_all; n0 < n1_all; n0 += kCols) {
    const std::int64_t n1 = std::min(n1_all, n0 + kCols), nc = n1 - n0;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (std::int64_t g = 0; g < meta.G; ++g) {
      load_scales(meta, a, g, n0, n1, scale.data());
      const bool fast = std::all_of(scale.begin(), scale.begin() + nc, [](float v) { return std::fabs(v) < 256.0f; });
      for (std::int64_t r0 = meta.row_start[g]; r0 < meta.row_start[g + 1]; r0 += kRows) {
        const std::int64_t r1 = std::min<std::int64_t>(meta.row_start[g + 1], r0 + kRows), kr = r1 - r0;
        if (fast) {
          decode_tile_fast<BF>(meta, a, g, r0, r1, n0, n1, scale.data(), tile.data(), kCols);
        } else {
          decode_tile<BF>(meta, a, g, r0, r1, n0, n1, scale.data(), tile.data(), kCols);
        }
        for (std::int64_t i = 0; i < m; ++i) {
          float* acc_row = acc.data() + i * kCols;
          const float* x_row = args.xp + i * K + r0;
          for (std::int64_t r = 0; r < kr; ++r) {
            const float xv = x_row[r];
            const float* w = tile.data() + r * kCols;
            // fp16: x and w are fp16 values, so xv * w[n] is exact in fp32 and this equals
            // the contract's fma(xv, w[n], acc). bf16: the contract is this multiply and
            // add, unfused (no FP contraction in this file).
            for (std::int64_t n = 0; n < nc; ++n) acc_row[n] += xv * w[n];
          }
        }
      }
    }
    for (std::int64_t i = 0; i < m; ++i) {
      const float* acc_row = acc.data() + i * kCols;
      std::uint16_t* dst = args.out + i * N + n0;
      for (std::int64_t n = 0; n < nc; ++n) {
        const float b = meta.bias.empty() ? 0.0f : half_to_float(meta.bias[n0 + n]);
        const float y = acc_row[n] + b;
        if constexpr (BF) {
          dst[n] = y != y ? kCanonicalNaNBf16 : float_to_bf16_finite(y);
        } else {
          dst[n] = y != y ? kCanonicalNaN : float_to_half(y);
        }
      }
    }
  }
}

template <bool BF>
void dequant_cols_impl(const LayerMeta& meta, const HostArrays& a, std::uint16_t* out, std::int64_t n0_all,
                       std::int64_t n1_all) {
  constexpr std::int64_t kDqCols = 256;
  const std::int64_t N = meta.N;
  std::vector<float> scale(kDqCols), tile(kRows * kDqCols);
  for (std::int64_t n0 = n0_all; n0 < n1_all; n0 += kDqCols) {
    const std::int64_t n1 = std::min(n1_all, n0 + kDqCols);
    for (std::int64_t g = 0; g < meta.G; ++g) {
      load_scales(meta, a, g, n0, n1, scale.data());
      for (std::int64_t r0 = meta.row_start[g]; r0 < meta.row_start[g + 1]; r0 += kRows) {
        const std::int64_t r1 = std::min<std::int64_t>(meta.row_start[g + 1], r0 + kRows);
        decode_tile<BF>(meta, a, g, r0, r1, n0, n1, scale.data(), tile.data(), kDqCols);
        for (std::int64_t r = r0; r < r1; ++r) {
          // W[perm[r]] = Wp[r]: write the row back to its checkpoint position.
          std::uint16_t* dst = out + static_cast<std::int64_t>(meta.perm[r]) * N;
          const float* src = tile.data() + (r - r0) * kDqCols - n0;
          for (std::int64_t n = n0; n < n1; ++n) dst[n] = BF ? float_to_bf16(src[n]) : float_to_half(src[n]);
        }
      }
    }
  }
}

}  // namespace

void gemm_cols_scalar(const GemmArgs& args, std::int64_t n0, std::int64_t n1) {
  if (args.bf16) {
    gemm_cols_impl<true>(args, n0, n1);
  } else {
    gemm_cols_impl<false>(args, n0, n1);
  }
}

void dequant_cols_scalar(const LayerMeta& meta, const HostArrays& a, std::uint16_t* out, std::int64_t n0,
                         std::int64_t n1, bool bf16) {
  if (bf16) {
    dequant_cols_impl<true>(meta, a, out, n0, n1);
  } else {
    dequant_cols_impl<false>(meta, a, out, n0, n1);
  }
}

}  // namespace exl2::detail::cpu
