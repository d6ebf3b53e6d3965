// AVX2 + FMA + F16C kernels of the CPU backend (x86-64, GCC/Clang).
//
// The library targets baseline x86-64: nothing here is compiled with -mavx2. Every
// function that uses the instructions carries EXL2_AVX2 (a per-function target
// attribute) and is reached only after avx2_supported() said yes at run time. There are
// no lambdas (they would not inherit the attribute); the few standard-library helpers
// called (std::min, std::unique_ptr) keep the baseline ISA, as a target attribute does not
// propagate to callees, so no AVX2 code can end up in an inline function shared with
// baseline code.
//
// Results are bit-identical to kernels_scalar.cpp (the contract in kernels.hpp):
//   weights   8 consecutive columns of one packed word row are one 256-bit load; a code
//             is (word >> shift) & mask (| the next word's low bits when it straddles),
//             and w = float(f16((code - z) * s)) comes either from the exact F16C round
//             trip (dequantize; GEMM columns with |s| >= 256) or, in the GEMM, from
//             round_half_fast (three FP operations instead of the slow F16C round trip;
//             proven equal, see there);
//   products  acc = vfmadd231ps(x, w, acc) per weight row, rows ascending, one
//             accumulator per output element (no split accumulators, no reassociation);
//             x * w is exact, so this equals the scalar multiply-and-add.
// Shifts are compile-time constants: a group of b-bit codes is walked in "periods" of
// P rows that use W whole words (b=2: 16/1, 3: 32/3, 4: 8/1, 5: 32/5, 6: 16/3, 8: 4/1);
// every group but a partial last EXL2 group is a whole number of periods, the rest is
// decoded row by row with run-time shifts.
//
// GEMM structure: up to kFusedMaxRows rows of x, weights are decoded into registers and
// multiplied straight into accumulators held in registers over a whole group (gemv_*);
// above, each [64 rows x 64..128 columns] tile is decoded once into an fp32 buffer in L1
// and all rows of x are swept over it with register-blocked micro-kernels (tiled_cols).
#include "cpu/kernels.hpp"

#if EXL2_CPU_HAVE_AVX2_KERNELS

#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#include "core/bfloat16.hpp"
#include "core/half.hpp"

// No FP contraction in this file (round_half_fast / decode_tile_fast must not fuse; GCC
// gets -ffp-contract=off from src/CMakeLists.txt and ignores the standard pragma).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(_MSC_VER)
#pragma fp_contract(off)
#endif

#define EXL2_AVX2 __attribute__((target("avx2,fma,f16c")))
#define EXL2_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

namespace exl2::detail::cpu {

namespace {

bool detect_avx2() noexcept {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool fma = (c >> 12) & 1u, osxsave = (c >> 27) & 1u, avx = (c >> 28) & 1u, f16c = (c >> 29) & 1u;
  if (!(fma && osxsave && avx && f16c)) return false;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 6u) != 6u) return false;  // the OS saves XMM and YMM state
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  return (b >> 5) & 1u;  // AVX2
}

// ------------------------------------------------------------------------ decoding

template <int B>
struct Period {
  static constexpr int P = (B == 3 || B == 5) ? 32 : (B == 2 || B == 6) ? 16 : (B == 4) ? 8 : 4;  // rows
  static constexpr int W = P * B / 32;                                                         // words
};

/// The b-bit codes of row J of a period for 8 columns, as int32.
template <int B, int J>
EXL2_AVX2_INLINE __m256i code_of(const __m256i* w) {
  constexpr int off = J * B, wi = off / 32, sh = off % 32;
  __m256i v = sh ? _mm256_srli_epi32(w[wi], sh) : w[wi];
  if constexpr (sh + B > 32) v = _mm256_or_si256(v, _mm256_slli_epi32(w[wi + 1], 32 - sh));
  if constexpr (sh + B != 32) v = _mm256_and_si256(v, _mm256_set1_epi32((1 << B) - 1));
  return v;
}

/// Per (group, 8 columns): s (fp32), z (int32) and zs = z * s (exact: z <= 255, s fp16).
struct ScaleZero {
  __m256 s, zs;
  __m256i z;
};

/// The fp16 bits of f16((code - z) * s) (F16C, round to nearest even): exact, signed zeros
/// included. Used by dequantize and, in the GEMM, for columns whose scales fail `fast_ok`.
EXL2_AVX2_INLINE __m128i dq_half_exact(__m256i code, const ScaleZero& sz) {
  const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(code, sz.z)), sz.s);  // exact
  return _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
}

EXL2_AVX2_INLINE ScaleZero load_scale_zero(const std::uint16_t* sc, const std::uint8_t* zc) {
  ScaleZero r;
  r.s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
  r.z = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zc)));
  r.zs = _mm256_mul_ps(_mm256_cvtepi32_ps(r.z), r.s);
  return r;
}

/// The fast decode (round_half_fast) applies to these 8 columns: every |s| < 256, so
/// |code - z| * |s| <= 255 * 256 stays below fp16's largest finite value (NaN, inf fail).
EXL2_AVX2_INLINE bool fast_ok(const ScaleZero& sz) {
  const __m256 abs_s = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), sz.s);
  return _mm256_movemask_ps(_mm256_cmp_ps(abs_s, _mm256_set1_ps(256.0f), _CMP_LT_OQ)) == 0xff;
}

/// float(f16(f)) without F16C (whose round trip costs two cycles of one port per 8
/// weights), for the GEMM's f = code * s - z * s. That f is exact (both products are exact
/// and the difference is representable) and, s being an fp16 value, a multiple of s's fp16
/// quantum (>= 2^-24), so rounding it to fp16 is rounding it to 11 significant bits, which
/// Veltkamp's split does with three operations: c = f * (2^13 + 1); hi = c - (c - f).
/// Verified exhaustively equal (as fp32 bits) to the F16C rounding of (code - z) * s for
/// every finite fp16 s and every code - z in [-255, 255] whose result is finite, except
/// that code == z gives +0 where (code - z) * s gives -0 for negative s: a zero weight's
/// sign never changes an accumulation that starts from +0 (it is never -0), so the GEMM
/// result is identical; dequantize uses dq_half_exact. Requires |s| < 256 (no fp16
/// overflow; see fast_ok) and this file compiled with -ffp-contract=off (the multiply and
/// the subtractions must not fuse).
EXL2_AVX2_INLINE __m256 round_half_fast(__m256 f) {
  const __m256 c = _mm256_mul_ps(f, _mm256_set1_ps(8193.0f));
  return _mm256_sub_ps(c, _mm256_sub_ps(c, f));
}

// ------------------------------------------------------------- bfloat16 (BF = true)
//
// The same kernels run for bfloat16 activations/outputs with a template flag BF:
//   * w = bf16((code - z) * s): the same exact fp32 product, rounded to bfloat16 by
//     Veltkamp's split in the GEMM's fast path (round_bf16_weight, |s| < 256), else on the
//     float's bits (round_bf16_fast: add 0x7fff + lowest kept bit, clear the low 16 bits;
//     exact nearest-even for every finite value, core/bfloat16.hpp), NaN kept NaN where a
//     scale may be non-finite (round_bf16_exact);
//   * x = bits << 16 (exact); out = bf16(acc + bias), NaN stored as 0x7fc0;
//   * products: bfloat16 x bfloat16 is exact in fp32 only while it neither overflows nor
//     underflows (bfloat16 has fp32's exponent range), so the bf16 contract is
//     acc = acc + fl(x * w) with a separate multiply and add, which the scalar kernels
//     (compiled without contraction) compute the same way: madd<true>.

/// bf16(f) as a float for finite f (NaN may come out as inf: callers exclude NaN).
EXL2_AVX2_INLINE __m256 round_bf16_fast(__m256 f) {
  const __m256i x = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

/// bf16(f) as a float for any f: a NaN becomes sign | 0x7fc00000 (float_to_bf16).
EXL2_AVX2_INLINE __m256 round_bf16_exact(__m256 f) {
  const __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
  const __m256 qnan = _mm256_or_ps(_mm256_and_ps(f, _mm256_set1_ps(-0.0f)),
                                   _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)));
  return _mm256_blendv_ps(round_bf16_fast(f), qnan, nan);
}

/// The bfloat16 bits of 8 floats whose low 16 bits are zero.
EXL2_AVX2_INLINE __m128i pack_bf16(__m256 r) {
  const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(r), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/// bf16(f) as a float for the GEMM's weights f = code * s - z * s (exact, see round_half_fast)
/// with |s| < 256: Veltkamp's split to 8 significant bits, c = f * (2^16 + 1); hi = c - (c - f),
/// three fp32 operations instead of round_bf16_fast's five integer ones. Verified exhaustively
/// equal (as fp32 bits) to round_bf16_fast of (code - z) * s for every finite fp16 s with |s| < 256
/// and every code - z in [-255, 255] (24,070,144 pairs; code == z gives +0 from both here). Needs
/// -ffp-contract=off like round_half_fast.
EXL2_AVX2_INLINE __m256 round_bf16_weight(__m256 f) {
  const __m256 c = _mm256_mul_ps(f, _mm256_set1_ps(65537.0f));
  return _mm256_sub_ps(c, _mm256_sub_ps(c, f));
}

/// The GEMM's fast weight rounding: fp16 or bfloat16, both by Veltkamp's split.
template <bool BF>
EXL2_AVX2_INLINE __m256 round_w_fast(__m256 f) {
  if constexpr (BF) {
    return round_bf16_weight(f);
  } else {
    return round_half_fast(f);
  }
}

/// The exact weight as a float (any scale, NaN kept): F16C round trip or round_bf16_exact.
template <bool BF>
EXL2_AVX2_INLINE __m256 dq_exact(__m256i code, const ScaleZero& sz) {
  if constexpr (BF) {
    return round_bf16_exact(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(code, sz.z)), sz.s));
  } else {
    return _mm256_cvtph_ps(dq_half_exact(code, sz));
  }
}

/// The exact weight's 16-bit pattern (dequantize).
template <bool BF>
EXL2_AVX2_INLINE __m128i dq_bits(__m256i code, const ScaleZero& sz) {
  if constexpr (BF) {
    return pack_bf16(dq_exact<true>(code, sz));
  } else {
    return dq_half_exact(code, sz);
  }
}

/// acc + x * w: one FMA for fp16 (the product is exact), multiply then add for bf16, or an FMA
/// for bf16 too where the call's x makes every product exact (FM: GemmArgs::bf16_fma).
template <bool BF, bool FM = false>
EXL2_AVX2_INLINE __m256 madd(__m256 x, __m256 w, __m256 acc) {
  if constexpr (BF && !FM) {
    return _mm256_add_ps(acc, _mm256_mul_ps(x, w));
  } else {
    return _mm256_fmadd_ps(x, w, acc);
  }
}

/// Row J of a b-bit period: its word, shift and how its code is extracted.
template <int B, int J>
struct Row {
  static constexpr int off = J * B, wi = off / 32, sh = off % 32;
  // A code strictly inside its word is masked in place (one AND instead of shift + AND):
  // its value times 2^sh converts exactly (at most B significant bits, below 2^31), and
  // the scale is pre-divided by 2^sh (exact: a power of two, far from underflow).
  static constexpr bool inplace = sh > 0 && sh + B < 32;
};

/// The fast path's per-(group, 8 columns) constants: zs = z * s and, per period row J,
/// s / 2^sh for in-place rows (s otherwise).
template <int B>
struct FastScale {
  __m256 zs;
  __m256 s[Period<B>::P];
};

/// 2^-sh as a float vector.
EXL2_AVX2_INLINE __m256 pow2_neg(int sh) { return _mm256_castsi256_ps(_mm256_set1_epi32((127 - sh) << 23)); }

template <int B, int... J>
EXL2_AVX2_INLINE void fill_fast_scale(const ScaleZero& sz, FastScale<B>& fs, std::integer_sequence<int, J...>) {
  fs.zs = sz.zs;
  ((fs.s[J] = Row<B, J>::inplace ? _mm256_mul_ps(sz.s, pow2_neg(Row<B, J>::sh)) : sz.s), ...);
}

template <int B>
EXL2_AVX2_INLINE FastScale<B> make_fast_scale(const ScaleZero& sz) {
  FastScale<B> fs;
  fill_fast_scale<B>(sz, fs, std::make_integer_sequence<int, Period<B>::P>{});
  return fs;
}

/// The fast decode of row J of a period, with the in-place extraction where it applies.
template <int B, int J, bool BF>
EXL2_AVX2_INLINE __m256 dq_fast_row(const __m256i* w, const FastScale<B>& fs) {
  using R = Row<B, J>;
  __m256i code;
  if constexpr (R::inplace) {
    code = _mm256_and_si256(w[R::wi], _mm256_set1_epi32(((1 << B) - 1) << R::sh));
  } else {
    code = code_of<B, J>(w);
  }
  return round_w_fast<BF>(_mm256_fmsub_ps(_mm256_cvtepi32_ps(code), fs.s[J], fs.zs));
}

/// The fast path's weight of a code extracted at run time (partial periods): row 0's s.
template <int B, bool BF>
EXL2_AVX2_INLINE __m256 dq_fast_code(__m256i code, const FastScale<B>& fs) {
  return round_w_fast<BF>(_mm256_fmsub_ps(_mm256_cvtepi32_ps(code), fs.s[0], fs.zs));
}

/// The codes of row i of a group (any i, run-time shifts); base: the group's first word row.
EXL2_AVX2_INLINE __m256i code_var(const std::uint32_t* base, std::int64_t N, int bits, std::int64_t i) {
  const std::int64_t off = i * bits;
  const std::int64_t wi = off / 32;
  const int sh = static_cast<int>(off % 32);
  __m256i v = _mm256_srl_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + wi * N)),
                               _mm_cvtsi32_si128(sh));
  if (sh + bits > 32) {
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + (wi + 1) * N));
    v = _mm256_or_si256(v, _mm256_sll_epi32(hi, _mm_cvtsi32_si128(32 - sh)));
  }
  return _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>((1u << bits) - 1u)));
}

EXL2_AVX2_INLINE __m256i load_words(const std::uint32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// ------------------------------------------------------- fused GEMV (few x rows)
//
// One group, CB vectors (8 columns each) and MR x rows: weights are decoded into
// registers and multiplied into MR x CB accumulators that stay in registers for all the
// group's rows (CB >= 2 keeps several independent FMA chains in flight).

template <int B, int J, int MR, int CB, bool BF, bool FM>
EXL2_AVX2_INLINE void gemv_row(const __m256i (&w)[CB][Period<B>::W], const FastScale<B> (&sz)[CB],
                               __m256 (&acc)[MR][CB], const float* x, std::int64_t ldx) {
  __m256 xb[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) xb[i] = _mm256_broadcast_ss(x + i * ldx + J);
#pragma GCC unroll 8
  for (int c = 0; c < CB; ++c) {
    const __m256 wv = dq_fast_row<B, J, BF>(w[c], sz[c]);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[i][c] = madd<BF, FM>(xb[i], wv, acc[i][c]);
  }
}

template <int B, int MR, int CB, bool BF, bool FM, int... J>
EXL2_AVX2_INLINE void gemv_period(const __m256i (&w)[CB][Period<B>::W], const FastScale<B> (&sz)[CB],
                                  __m256 (&acc)[MR][CB], const float* x, std::int64_t ldx,
                                  std::integer_sequence<int, J...>) {
  (gemv_row<B, J, MR, CB, BF, FM>(w, sz, acc, x, ldx), ...);
}

/// acc[i, 8c + l] = fma chain over the group's rows (ascending) for columns col .. col + 8 CB.
/// wq: the group's first word row at column col; x: xp + row_start[g] (row stride ldx);
/// sc, zc: the group's scales and zeros at column col (all passing fast_ok); acc row
/// stride ldacc. FM: GemmArgs::bf16_fma (madd).
template <int B, int MR, int CB, bool BF, bool FM>
EXL2_AVX2 void gemv_block(const std::uint32_t* wq, std::int64_t N, std::int64_t rows, const float* x,
                          std::int64_t ldx, const std::uint16_t* sc, const std::uint8_t* zc, float* acc_mem,
                          std::int64_t ldacc) {
  constexpr int P = Period<B>::P, W = Period<B>::W;
  FastScale<B> sz[CB];
  __m256 acc[MR][CB];
#pragma GCC unroll 8
  for (int c = 0; c < CB; ++c) {
    sz[c] = make_fast_scale<B>(load_scale_zero(sc + 8 * c, zc + 8 * c));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[i][c] = _mm256_loadu_ps(acc_mem + i * ldacc + 8 * c);
  }
  const std::int64_t periods = rows / P;
  for (std::int64_t p = 0; p < periods; ++p) {
    const std::uint32_t* wp = wq + p * W * N;
    __m256i w[CB][W];
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c) {
#pragma GCC unroll 8
      for (int k = 0; k < W; ++k) w[c][k] = load_words(wp + k * N + 8 * c);
    }
    gemv_period<B, MR, CB, BF, FM>(w, sz, acc, x + p * P, ldx, std::make_integer_sequence<int, P>{});
  }
  for (std::int64_t r = periods * P; r < rows; ++r) {  // partial last period
    for (int c = 0; c < CB; ++c) {
      const __m256 wv = dq_fast_code<B, BF>(code_var(wq + 8 * c, N, B, r), sz[c]);
      for (int i = 0; i < MR; ++i) acc[i][c] = madd<BF, FM>(_mm256_broadcast_ss(x + i * ldx + r), wv, acc[i][c]);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < CB; ++c) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) _mm256_storeu_ps(acc_mem + i * ldacc + 8 * c, acc[i][c]);
  }
}

template <int MR, int CB, bool BF, bool FM>
EXL2_AVX2 void gemv_block_bits(int bits, const std::uint32_t* wq, std::int64_t N, std::int64_t rows, const float* x,
                               std::int64_t ldx, const std::uint16_t* sc, const std::uint8_t* zc, float* acc,
                               std::int64_t ldacc) {
  switch (bits) {
    case 2: gemv_block<2, MR, CB, BF, FM>(wq, N, rows, x, ldx, sc, zc, acc, ldacc); break;
    case 3: gemv_block<3, MR, CB, BF, FM>(wq, N, rows, x, ldx, sc, zc, acc, ldacc); break;
    case 4: gemv_block<4, MR, CB, BF, FM>(wq, N, rows, x, ldx, sc, zc, acc, ldacc); break;
    case 5: gemv_block<5, MR, CB, BF, FM>(wq, N, rows, x, ldx, sc, zc, acc, ldacc); break;
    case 6: gemv_block<6, MR, CB, BF, FM>(wq, N, rows, x, ldx, sc, zc, acc, ldacc); break;
    default: gemv_block<8, MR, CB, BF, FM>(wq, N, rows, x, ldx, sc, zc, acc, ldacc); break;
  }
}

/// The exact (F16C) fallback of gemv_block for 8 columns whose scales fail fast_ok (|s| >=
/// 256 or inf): same operations and order, run-time shifts, any bit width and row count.
template <bool BF>
EXL2_AVX2 void gemv_vec_exact(int bits, const std::uint32_t* wq, std::int64_t N, std::int64_t rows, const float* x,
                              std::int64_t ldx, std::int64_t m, const std::uint16_t* sc, const std::uint8_t* zc,
                              float* acc, std::int64_t ldacc) {
  const ScaleZero sz = load_scale_zero(sc, zc);
  for (std::int64_t i = 0; i < m; ++i) {
    __m256 a = _mm256_loadu_ps(acc + i * ldacc);
    for (std::int64_t r = 0; r < rows; ++r) {
      const __m256 wv = dq_exact<BF>(code_var(wq, N, bits, r), sz);
      a = madd<BF>(_mm256_broadcast_ss(x + i * ldx + r), wv, a);
    }
    _mm256_storeu_ps(acc + i * ldacc, a);
  }
}

EXL2_AVX2_INLINE bool fast_ok_at(const std::uint16_t* sc, const std::uint8_t* zc) {
  return fast_ok(load_scale_zero(sc, zc));
}

/// out[i, n] = f16/bf16(acc[i, n - n0] + bias[n]) for nvec vectors of 8 columns.
template <bool BF>
EXL2_AVX2 void store_output(const LayerMeta& meta, const float* acc, std::int64_t ldacc, std::int64_t m,
                            std::uint16_t* out, std::int64_t n0, std::int64_t nvec) {
  const std::int64_t N = meta.N;
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t v = 0; v < nvec; ++v) {
      __m256 y = _mm256_loadu_ps(acc + i * ldacc + 8 * v);
      if (!meta.bias.empty()) {
        const auto* b = reinterpret_cast<const __m128i*>(meta.bias.data() + n0 + 8 * v);
        y = _mm256_add_ps(y, _mm256_cvtph_ps(_mm_loadu_si128(b)));
      }
      __m128i h;
      if constexpr (BF) {
        h = pack_bf16(round_bf16_fast(y));  // a NaN lane may come out as inf: replaced below
      } else {
        h = _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT);
      }
      const __m256 nan = _mm256_cmp_ps(y, y, _CMP_UNORD_Q);
      if (_mm256_movemask_ps(nan) != 0) {  // canonical NaN, as the scalar kernels store
        const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_castps_si256(nan)),
                                              _mm256_extracti128_si256(_mm256_castps_si256(nan), 1));
        const std::uint16_t canon = BF ? kCanonicalNaNBf16 : kCanonicalNaN;
        h = _mm_blendv_epi8(h, _mm_set1_epi16(static_cast<short>(canon)), nan16);
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * N + n0 + 8 * v), h);
    }
  }
}

template <int MR, bool BF, bool FM>
EXL2_AVX2_INLINE void gemv_vec(int bits, const std::uint32_t* wq, std::int64_t N, std::int64_t rows, const float* x,
                               std::int64_t ldx, const std::uint16_t* sc, const std::uint8_t* zc, float* acc,
                               std::int64_t ld, std::int64_t v) {
  if (fast_ok_at(sc + 8 * v, zc + 8 * v)) {
    gemv_block_bits<MR, 1, BF, FM>(bits, wq + 8 * v, N, rows, x, ldx, sc + 8 * v, zc + 8 * v, acc + 8 * v, ld);
  } else {
    gemv_vec_exact<BF>(bits, wq + 8 * v, N, rows, x, ldx, MR, sc + 8 * v, zc + 8 * v, acc + 8 * v, ld);
  }
}

template <int MR, bool BF, bool FM>
EXL2_AVX2 void gemv_cols(const GemmArgs& args, std::int64_t n0, std::int64_t nvec) {
  constexpr int CB = MR == 1 ? 4 : 2;  // MR x CB independent FMA chains
  const LayerMeta& meta = *args.meta;
  const HostArrays& a = *args.a;
  const std::int64_t N = meta.N, K = meta.K;
  const std::int64_t ld = nvec * 8;
  std::unique_ptr<float[]> acc(new float[static_cast<std::size_t>(MR * ld)]);
  std::memset(acc.get(), 0, sizeof(float) * static_cast<std::size_t>(MR * ld));
  const float* x = args.xp;
  for (std::int64_t g = 0; g < meta.G; ++g) {
    const int bits = meta.bits[g];
    const std::int64_t r0 = meta.row_start[g], rows = meta.row_start[g + 1] - r0;
    const std::uint32_t* wq = a.qweight.data() + static_cast<std::int64_t>(meta.word_start[g]) * N + n0;
    const std::uint16_t* sc = a.scales.data() + g * N + n0;
    const std::uint8_t* zc = a.zeros.data() + g * N + n0;
    // Blocks of CB vectors; one vector at a time for the remainder and for blocks with a
    // column failing fast_ok (those vectors take the exact fallback).
    auto* const accp = acc.get();
    std::int64_t v = 0;
    for (; v + CB <= nvec; v += CB) {
      bool ok = true;
      for (int c = 0; c < CB; ++c) ok = ok && fast_ok_at(sc + 8 * (v + c), zc + 8 * (v + c));
      if (ok) {
        gemv_block_bits<MR, CB, BF, FM>(bits, wq + 8 * v, N, rows, x + r0, K, sc + 8 * v, zc + 8 * v, accp + 8 * v,
                                        ld);
      } else {
        for (int c = 0; c < CB; ++c) gemv_vec<MR, BF, FM>(bits, wq, N, rows, x + r0, K, sc, zc, accp, ld, v + c);
      }
    }
    for (; v < nvec; ++v) gemv_vec<MR, BF, FM>(bits, wq, N, rows, x + r0, K, sc, zc, accp, ld, v);
  }
  store_output<BF>(meta, acc.get(), ld, MR, args.out, n0, nvec);
}

// ------------------------------------------------- tiled GEMM (many x rows)
//
// Per block of NC columns: decode a [<= KC rows x NC] tile of weights once (fp32, in
// cache), then sweep all m rows of x over it with an MR x 16 register-blocked
// micro-kernel; the fp32 accumulators C[m, NC] persist across tiles in memory.

constexpr std::int64_t kTileRows = 64;  // KC: a multiple of every period length (<= 32)

template <int B, bool BF, int... J>
EXL2_AVX2_INLINE void tile_period(const __m256i* w, const FastScale<B>& fs, float* dst, std::int64_t ldd,
                                  std::integer_sequence<int, J...>) {
  (_mm256_storeu_ps(dst + J * ldd, dq_fast_row<B, J, BF>(w, fs)), ...);
}

/// dst[(r - r0) * ldd + 8 v + l] = Wp for rows r0 <= r < r0 + kr of a group (r0 relative
/// to the group, a multiple of the period), nvec vectors of 8 columns.
template <int B, bool BF>
EXL2_AVX2 void decode_tile_avx2(const std::uint32_t* wq, std::int64_t N, std::int64_t r0, std::int64_t kr,
                                const std::uint16_t* sc, const std::uint8_t* zc, std::int64_t nvec, float* dst,
                                std::int64_t ldd) {
  constexpr int P = Period<B>::P, W = Period<B>::W;
  const std::int64_t periods = kr / P;
  for (std::int64_t v = 0; v < nvec; ++v) {
    const std::uint32_t* wv = wq + 8 * v;
    float* d = dst + 8 * v;
    const ScaleZero sz = load_scale_zero(sc + 8 * v, zc + 8 * v);
    if (!fast_ok(sz)) {  // exact fallback (|s| >= 256 or inf)
      for (std::int64_t r = 0; r < kr; ++r) {
        _mm256_storeu_ps(d + r * ldd, dq_exact<BF>(code_var(wv, N, B, r0 + r), sz));
      }
      continue;
    }
    const FastScale<B> fs = make_fast_scale<B>(sz);
    const std::uint32_t* wbase = wv + (r0 / P) * W * N;
    for (std::int64_t p = 0; p < periods; ++p) {
      __m256i w[W];
      for (int k = 0; k < W; ++k) w[k] = load_words(wbase + (p * W + k) * N);
      tile_period<B, BF>(w, fs, d + p * P * ldd, ldd, std::make_integer_sequence<int, P>{});
    }
    for (std::int64_t r = periods * P; r < kr; ++r) {
      _mm256_storeu_ps(d + r * ldd, dq_fast_code<B, BF>(code_var(wv, N, B, r0 + r), fs));
    }
  }
}

template <bool BF>
EXL2_AVX2 void decode_tile_bits(int bits, const std::uint32_t* wq, std::int64_t N, std::int64_t r0, std::int64_t kr,
                                const std::uint16_t* sc, const std::uint8_t* zc, std::int64_t nvec, float* dst,
                                std::int64_t ldd) {
  switch (bits) {
    case 2: decode_tile_avx2<2, BF>(wq, N, r0, kr, sc, zc, nvec, dst, ldd); break;
    case 3: decode_tile_avx2<3, BF>(wq, N, r0, kr, sc, zc, nvec, dst, ldd); break;
    case 4: decode_tile_avx2<4, BF>(wq, N, r0, kr, sc, zc, nvec, dst, ldd); break;
    case 5: decode_tile_avx2<5, BF>(wq, N, r0, kr, sc, zc, nvec, dst, ldd); break;
    case 6: decode_tile_avx2<6, BF>(wq, N, r0, kr, sc, zc, nvec, dst, ldd); break;
    default: decode_tile_avx2<8, BF>(wq, N, r0, kr, sc, zc, nvec, dst, ldd); break;
  }
}

/// C[i, 8 v + l] = fma chain over r < kr of A[i, r] * Bt[r, 8 v + l], for MR rows, NV vectors.
template <int MR, int NV, bool BF>
EXL2_AVX2 void micro(const float* A, std::int64_t lda, const float* Bt, std::int64_t ldb, std::int64_t kr, float* C,
                     std::int64_t ldc) {
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[i][v] = _mm256_loadu_ps(C + i * ldc + 8 * v);
  }
  for (std::int64_t r = 0; r < kr; ++r) {
    __m256 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(Bt + r * ldb + 8 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(A + i * lda + r);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[i][v] = madd<BF>(av, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + i * ldc + 8 * v, c[i][v]);
  }
}

/// One row block (mr <= 6 rows of x) against the whole tile (nvec vectors): the widest
/// micro-kernel that keeps >= 8 independent accumulators (FMA latency x 2 ports), then
/// single vectors for what is left.
template <int MR, int NV, bool BF>
EXL2_AVX2_INLINE void micro_sweep(const float* A, std::int64_t lda, const float* Bt, std::int64_t ldb, std::int64_t kr,
                                  float* C, std::int64_t ldc, std::int64_t nvec) {
  std::int64_t v = 0;
  for (; v + NV <= nvec; v += NV) micro<MR, NV, BF>(A, lda, Bt + 8 * v, ldb, kr, C + 8 * v, ldc);
  for (; v < nvec; ++v) micro<MR, 1, BF>(A, lda, Bt + 8 * v, ldb, kr, C + 8 * v, ldc);
}

template <bool BF>
EXL2_AVX2 void micro_block(int mr, const float* A, std::int64_t lda, const float* Bt, std::int64_t ldb, std::int64_t kr,
                           float* C, std::int64_t ldc, std::int64_t nvec) {
  switch (mr) {
    case 1: micro_sweep<1, 8, BF>(A, lda, Bt, ldb, kr, C, ldc, nvec); break;
    case 2: micro_sweep<2, 4, BF>(A, lda, Bt, ldb, kr, C, ldc, nvec); break;
    case 3: micro_sweep<3, 4, BF>(A, lda, Bt, ldb, kr, C, ldc, nvec); break;
    case 4: micro_sweep<4, 2, BF>(A, lda, Bt, ldb, kr, C, ldc, nvec); break;
    case 5: micro_sweep<5, 2, BF>(A, lda, Bt, ldb, kr, C, ldc, nvec); break;
    default: micro_sweep<6, 2, BF>(A, lda, Bt, ldb, kr, C, ldc, nvec); break;
  }
}

template <bool BF>
EXL2_AVX2 void tiled_cols(const GemmArgs& args, std::int64_t n0_all, std::int64_t nvec_all, std::int64_t NC) {
  constexpr std::int64_t MR = 6;
  const LayerMeta& meta = *args.meta;
  const HostArrays& a = *args.a;
  const std::int64_t N = meta.N, K = meta.K, m = args.m;
  std::unique_ptr<float[]> tile(new float[static_cast<std::size_t>(kTileRows * NC)]);
  std::unique_ptr<float[]> C(new float[static_cast<std::size_t>(m * NC)]);
  for (std::int64_t vb = 0; vb < nvec_all; vb += NC / 8) {
    const std::int64_t n0 = n0_all + 8 * vb, nvec = std::min(NC / 8, nvec_all - vb);
    std::memset(C.get(), 0, sizeof(float) * static_cast<std::size_t>(m * NC));
    for (std::int64_t g = 0; g < meta.G; ++g) {
      const int bits = meta.bits[g];
      const std::int64_t gr0 = meta.row_start[g], rows = meta.row_start[g + 1] - gr0;
      const std::uint32_t* wq = a.qweight.data() + static_cast<std::int64_t>(meta.word_start[g]) * N + n0;
      const std::uint16_t* sc = a.scales.data() + g * N + n0;
      const std::uint8_t* zc = a.zeros.data() + g * N + n0;
      for (std::int64_t rb = 0; rb < rows; rb += kTileRows) {
        const std::int64_t kr = std::min(kTileRows, rows - rb);
        decode_tile_bits<BF>(bits, wq, N, rb, kr, sc, zc, nvec, tile.get(), NC);
        const float* xk = args.xp + gr0 + rb;
        for (std::int64_t i = 0; i < m; i += MR) {
          const int mr = static_cast<int>(std::min(MR, m - i));
          micro_block<BF>(mr, xk + i * K, K, tile.get(), NC, kr, C.get() + i * NC, NC, nvec);
        }
      }
    }
    store_output<BF>(meta, C.get(), NC, m, args.out, n0, nvec);
  }
}

// ---------------------------------------------------------------- dequantize (exact F16C)

template <int B, bool BF, int... J>
EXL2_AVX2_INLINE void dequant_period(const __m256i* w, const ScaleZero& sz, std::uint16_t* const* rows_out,
                                     std::integer_sequence<int, J...>) {
  (_mm_storeu_si128(reinterpret_cast<__m128i*>(rows_out[J]), dq_bits<BF>(code_of<B, J>(w), sz)), ...);
}

template <int B, bool BF>
EXL2_AVX2 void dequant_group(const LayerMeta& meta, const HostArrays& a, std::int64_t g, std::uint16_t* out,
                             std::int64_t n0, std::int64_t nvec) {
  constexpr int P = Period<B>::P, W = Period<B>::W;
  const std::int64_t N = meta.N;
  const std::int64_t gr0 = meta.row_start[g], rows = meta.row_start[g + 1] - gr0;
  const std::uint32_t* wq = a.qweight.data() + static_cast<std::int64_t>(meta.word_start[g]) * N + n0;
  const std::uint16_t* sc = a.scales.data() + g * N + n0;
  const std::uint8_t* zc = a.zeros.data() + g * N + n0;
  const std::int64_t periods = rows / P;
  std::uint16_t* dst[P];
  for (std::int64_t p = 0; p < periods; ++p) {
    for (int j = 0; j < P; ++j) dst[j] = out + static_cast<std::int64_t>(meta.perm[gr0 + p * P + j]) * N + n0;
    // Sweep the columns so that each of the P output rows is written sequentially.
    for (std::int64_t v = 0; v < nvec; ++v) {
      __m256i w[W];
      for (int k = 0; k < W; ++k) w[k] = load_words(wq + (p * W + k) * N + 8 * v);
      std::uint16_t* d[P];
      for (int j = 0; j < P; ++j) d[j] = dst[j] + 8 * v;
      dequant_period<B, BF>(w, load_scale_zero(sc + 8 * v, zc + 8 * v), d, std::make_integer_sequence<int, P>{});
    }
  }
  for (std::int64_t r = periods * P; r < rows; ++r) {
    std::uint16_t* row = out + static_cast<std::int64_t>(meta.perm[gr0 + r]) * N + n0;
    for (std::int64_t v = 0; v < nvec; ++v) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 8 * v),
                       dq_bits<BF>(code_var(wq + 8 * v, N, B, r), load_scale_zero(sc + 8 * v, zc + 8 * v)));
    }
  }
}

}  // namespace

bool avx2_supported() noexcept {
  static const bool supported = detect_avx2();
  return supported;
}

namespace {

template <bool BF>
EXL2_AVX2 void convert_x_impl(const LayerMeta& meta, const std::uint16_t* x, float* xp, std::int64_t i0,
                              std::int64_t i1) {
  const std::int64_t K = meta.K;
  const std::int32_t* perm = meta.perm.data();
  for (std::int64_t i = i0; i < i1; ++i) {
    const std::uint16_t* src = x + i * K;
    float* dst = xp + i * K;
    std::int64_t r = 0;
    for (; r + 8 <= K; r += 8) {
      __m128i h;
      if (meta.identity_perm) {
        h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + r));
      } else {
        const std::int32_t* p = perm + r;
        h = _mm_setr_epi16(static_cast<short>(src[p[0]]), static_cast<short>(src[p[1]]),
                           static_cast<short>(src[p[2]]), static_cast<short>(src[p[3]]),
                           static_cast<short>(src[p[4]]), static_cast<short>(src[p[5]]),
                           static_cast<short>(src[p[6]]), static_cast<short>(src[p[7]]));
      }
      if constexpr (BF) {  // bfloat16 -> float is exact: the bits shifted into the upper half
        _mm256_storeu_ps(dst + r, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
      } else {
        _mm256_storeu_ps(dst + r, _mm256_cvtph_ps(h));
      }
    }
    for (; r < K; ++r) {
      const std::uint16_t v = src[meta.identity_perm ? r : perm[r]];
      dst[r] = BF ? bf16_to_float(v) : half_to_float(v);
    }
  }
}

/// The fused few-row GEMV for m rows; FM: bfloat16 with FMAs (GemmArgs::bf16_fma).
template <bool BF, bool FM>
EXL2_AVX2 void gemv_rows(const GemmArgs& args, std::int64_t n0, std::int64_t nvec) {
  switch (args.m) {
    case 1: gemv_cols<1, BF, FM>(args, n0, nvec); break;
    case 2: gemv_cols<2, BF, FM>(args, n0, nvec); break;
    case 3: gemv_cols<3, BF, FM>(args, n0, nvec); break;
    default: gemv_cols<4, BF, FM>(args, n0, nvec); break;
  }
}

template <bool BF>
EXL2_AVX2 void gemm_cols_impl(const GemmArgs& args, std::int64_t n0, std::int64_t nvec) {
  const std::int64_t m = args.m;
  if (m <= kFusedMaxRows) {
    if (BF && args.bf16_fma)
      gemv_rows<BF, true>(args, n0, nvec);
    else
      gemv_rows<BF, false>(args, n0, nvec);
  } else {
    tiled_cols<BF>(args, n0, nvec, m <= 64 ? 64 : 128);
  }
}

template <bool BF>
EXL2_AVX2 void dequant_cols_impl(const LayerMeta& meta, const HostArrays& a, std::uint16_t* out, std::int64_t n0,
                                 std::int64_t nvec) {
  for (std::int64_t g = 0; g < meta.G; ++g) {
    switch (meta.bits[g]) {
      case 2: dequant_group<2, BF>(meta, a, g, out, n0, nvec); break;
      case 3: dequant_group<3, BF>(meta, a, g, out, n0, nvec); break;
      case 4: dequant_group<4, BF>(meta, a, g, out, n0, nvec); break;
      case 5: dequant_group<5, BF>(meta, a, g, out, n0, nvec); break;
      case 6: dequant_group<6, BF>(meta, a, g, out, n0, nvec); break;
      default: dequant_group<8, BF>(meta, a, g, out, n0, nvec); break;
    }
  }
}

}  // namespace

EXL2_AVX2 void convert_x_avx2(const LayerMeta& meta, const std::uint16_t* x, float* xp, std::int64_t i0,
                              std::int64_t i1, bool bf16) {
  if (bf16) {
    convert_x_impl<true>(meta, x, xp, i0, i1);
  } else {
    convert_x_impl<false>(meta, x, xp, i0, i1);
  }
}

EXL2_AVX2 void gemm_cols_avx2(const GemmArgs& args, std::int64_t n0, std::int64_t n1) {
  const std::int64_t nvec = (n1 - n0) / 8;
  if (nvec > 0) {
    if (args.bf16) {
      gemm_cols_impl<true>(args, n0, nvec);
    } else {
      gemm_cols_impl<false>(args, n0, nvec);
    }
  }
  if (n0 + 8 * nvec < n1) gemm_cols_scalar(args, n0 + 8 * nvec, n1);  // never for validated layers (N % 8 == 0)
}

EXL2_AVX2 void dequant_cols_avx2(const LayerMeta& meta, const HostArrays& a, std::uint16_t* out, std::int64_t n0,
                                 std::int64_t n1, bool bf16) {
  const std::int64_t nvec = (n1 - n0) / 8;
  if (nvec > 0) {
    if (bf16) {
      dequant_cols_impl<true>(meta, a, out, n0, nvec);
    } else {
      dequant_cols_impl<false>(meta, a, out, n0, nvec);
    }
  }
  if (n0 + 8 * nvec < n1) dequant_cols_scalar(meta, a, out, n0 + 8 * nvec, n1, bf16);
}

}  // namespace exl2::detail::cpu

#endif  // EXL2_CPU_HAVE_AVX2_KERNELS
