// Internal: the CPU backend's compute kernels and their run-time selection.
//
// Two implementations compute exactly the same thing:
//   * the portable scalar kernels (kernels_scalar.cpp), compiled for the baseline ISA;
//   * AVX2 + FMA + F16C kernels (kernels_avx2.cpp, x86-64 with GCC/Clang only), whose
//     functions carry __attribute__((target(...))) so the library as a whole still
//     targets baseline x86-64; they are used only when the CPU reports all three features.
//
// Both produce bit-identical results because every output element is computed by the
// same fp32 operations in the same order (the "summation contract"):
//   * the weight is w = f16((q - z) * s) as float: (q - z) is an exact small integer and
//     s an fp16 value, so the fp32 product is exact and the only rounding is the one to
//     fp16 (round to nearest even, subnormals kept): round_to_half / F16C vcvtps2ph, or in
//     the GEMM, where every |s| of a column block is < 256, Veltkamp's split (three fp32
//     operations, proven to give the same value; a zero weight may come out as +0 instead
//     of -0, which no sum below can observe);
//   * x is converted exactly to fp32 and gathered into storage order: xp[i, r] = x[i, perm[r]];
//   * acc = +0.0f; for r = 0 .. K-1 ascending: acc = acc + xp[i, r] * w[r, n], one
//     accumulator per output element (no split accumulators, no reassociation). Both
//     factors are fp16 values (11-bit significands), so the product is exact in fp32 (no
//     underflow or overflow either) and fma(x, w, acc) == acc + x * w bit for bit: the
//     AVX2 kernels use vfmadd231ps, the scalar ones a multiply and an add (which the
//     compiler may or may not contract; the result is the same);
//   * out[i, n] = f16(acc + float(bias[n])) (round to nearest even), bias 0 when absent;
//     a NaN result is stored as the canonical fp16 NaN 0x7e00 (which NaN an FMA propagates
//     depends on its operand order, which differs between the kernels).
// bfloat16 activations and outputs (the same kernels, templated on the 16-bit type):
//   * the weight is w = bf16((q - z) * s) as float: the same exact fp32 product, rounded
//     once to bfloat16 (round to nearest even; NaN stays NaN, core/bfloat16.hpp);
//   * x is converted exactly (bfloat16 bits << 16) and gathered like fp16;
//   * acc = acc + fl(xp[i, r] * w[r, n]), rows ascending, one accumulator per output.
//     A bfloat16 x bfloat16 product has at most 16 significant bits but fp32's exponent
//     range, so it can overflow or underflow in fp32 and then fma != multiply-and-add:
//     for bfloat16 both kernel families multiply and add separately (no FMA, no
//     contraction), which keeps them bit-identical. The one exception gives the same bits:
//     the AVX2 few-row GEMV uses FMAs for calls whose every x is 0 or has 2^-102 <= |x| <
//     2^111, where each product with a fast-path weight is an exact normal fp32 value
//     (GemmArgs::bf16_fma);
//   * out[i, n] = bf16(acc + float(bias[n])), NaN stored as 0x7fc0 (kCanonicalNaNBf16).
//   The bfloat16 contract assumes IEEE subnormal arithmetic (the default MXCSR / FPCR). With
//   flush-to-zero / denormals-are-zero enabled in the calling thread (e.g. by
//   torch.set_flush_denormal(True)), a bfloat16 x with |x| < 2^-126 (an fp32 subnormal) is
//   read as 0 and a product or sum that underflows below 2^-126 becomes 0, so such results
//   differ from the contract (the library never changes the mode).
//   fp16 is unaffected: its weights, inputs and products are all normal fp32 values.
// Threads split the columns, and a column's result never depends on how the columns are
// split, so the results are also independent of the thread count.
//
// Environment switches, read once per call (tests and debugging):
//   EXL2_CPU_SCALAR=1   force the portable scalar kernels;
//   EXL2_CPU_THREADS=n  use exactly n threads (capped by the number of column chunks)
//                       instead of an automatic count.
#pragma once

#include <cstdint>

#include "core/layer.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EXL2_CPU_HAVE_AVX2_KERNELS 1
#else
#define EXL2_CPU_HAVE_AVX2_KERNELS 0
#endif

namespace exl2::detail::cpu {

/// The fp16 bits every NaN GEMM output is stored as.
constexpr std::uint16_t kCanonicalNaN = 0x7e00;

/// One GEMM call: out[m, N] = xp[m, K] @ Wp (+ bias), xp the storage-ordered fp32 x.
struct GemmArgs {
  const LayerMeta* meta;
  const HostArrays* a;
  const float* xp;     // [m, K] fp32, xp[i, r] = x[i, perm[r]]
  std::int64_t m;
  std::uint16_t* out;  // [m, N] fp16 or bf16 bits
  bool bf16;           // activations/outputs are bfloat16 (else float16)
  // bfloat16 only: every x is 0 or has 2^-102 <= |x| < 2^111 (bf16_products_exact), so each
  // product x * w with a fast-path weight (|s| < 256: 2^-24 <= |w| < 2^16, or 0) is an exact
  // normal fp32 value and fma(x, w, acc) equals acc + fl(x * w) bit for bit: the AVX2 GEMV may
  // then use FMAs (the scalar kernels keep multiply-and-add; the results are identical).
  bool bf16_fma = false;
};

/// True when every one of the `count` bfloat16 values at `x` is zero or has a biased exponent in
/// [25, 237] (2^-102 <= |x| < 2^111): GemmArgs::bf16_fma.
bool bf16_products_exact(const std::uint16_t* x, std::int64_t count) noexcept;

/// Column-range kernels: compute out[:, n0:n1] (gemm) or out[:, n0:n1] of the dense
/// un-permuted weight (dequantize). n0 and n1 are multiples of 8 or n1 == N.
void gemm_cols_scalar(const GemmArgs& g, std::int64_t n0, std::int64_t n1);
/// `bf16` selects the 16-bit type of out (dequantize) or of x (convert_x).
void dequant_cols_scalar(const LayerMeta& meta, const HostArrays& a, std::uint16_t* out, std::int64_t n0,
                         std::int64_t n1, bool bf16);
/// xp[i, r] = float(x[i, perm[r]]) for rows i0 <= i < i1.
void convert_x_scalar(const LayerMeta& meta, const std::uint16_t* x, float* xp, std::int64_t i0, std::int64_t i1,
                      bool bf16);

#if EXL2_CPU_HAVE_AVX2_KERNELS
/// True when this CPU (and OS) supports AVX2, FMA and F16C.
bool avx2_supported() noexcept;
void gemm_cols_avx2(const GemmArgs& g, std::int64_t n0, std::int64_t n1);
void dequant_cols_avx2(const LayerMeta& meta, const HostArrays& a, std::uint16_t* out, std::int64_t n0,
                       std::int64_t n1, bool bf16);
void convert_x_avx2(const LayerMeta& meta, const std::uint16_t* x, float* xp, std::int64_t i0, std::int64_t i1,
                    bool bf16);
#endif

/// Which kernels this call uses: AVX2 when supported and EXL2_CPU_SCALAR is not set.
bool use_avx2() noexcept;

/// Up to this many x rows the GEMM decodes weights straight into registers and
/// accumulates all rows there (no tile buffer); above it, it decodes tiles once and
/// runs a register-blocked GEMM micro-kernel over all rows.
constexpr std::int64_t kFusedMaxRows = 4;

}  // namespace exl2::detail::cpu
