// Internal: the CPU backend.
//
// It computes directly on the canonical HostArrays (layer.hpp): codes are decoded
// tile by tile (or straight into registers) into fp32 values that equal the fp16-rounded
// weights, so no call materialises the whole dense weight. Work is split by column
// chunks across threads; every output column is summed over K in the same fixed order
// regardless of the thread count and of the kernels used (portable scalar, or AVX2/FMA/
// F16C picked at run time), so results are deterministic: see kernels.hpp.
#pragma once

#include <cstdint>

#include "core/layer.hpp"
#include "core/validate.hpp"

namespace exl2::detail::cpu {

HostArrays build_exl2(const ValidatedExl2& v);
HostArrays build_gptq(const ValidatedGptq& v);  // any width; v's pointers must be host memory
HostArrays build_awq(const ValidatedAwq& v);    // v's pointers must be host memory

/// out[K, N] = W (un-permuted) as fp16 bits, or as bf16 bits when `bf16`
/// (bf16((q - z) * s): the same exact product, one rounding to bfloat16).
void dequantize(const LayerMeta& meta, const HostArrays& a, std::uint16_t* out, bool bf16);

/// out[m, N] = x[m, K] @ W (+ bias), fp32 accumulation; x and out are both fp16 bits, or
/// both bf16 bits when `bf16` (the weights then rounded to bfloat16, see kernels.hpp).
void gemm(const LayerMeta& meta, const HostArrays& a, const std::uint16_t* x, std::int64_t m, std::uint16_t* out,
          bool bf16);

}  // namespace exl2::detail::cpu
