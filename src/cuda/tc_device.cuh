// Internal: device code shared by the tc kernels (tc_gemm.cu: mma.sync, any m up to 64;
// tc_wgmma.cu: wgmma, Hopper, larger m): the shared-memory ring's geometry, the PTX helpers, and
// the decode of a chunk's codes (tc stream layout, tc_layout.hpp) into 16-bit B-fragment
// registers of the activation type.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/device_layer.cuh"
#include "cuda/tc_layout.hpp"

namespace exl2::detail::cuda {

constexpr int kTcWarps = tc::kTileBlocks;  // one warp per 32-column block of the tile
constexpr int kTcThreads = 32 * kTcWarps;
// Halves past the gathered activations' end that the kernel may read (and ignore): up to
// Q - 1 = 3 chunks of 32 past the last row's end.
constexpr int kXTailPad = 4 * 32;

// The shared-memory ring: kRingSteps steps of kStepUnits units (kStepCopies 16-byte cp.asyncs
// per thread and step). Copies run kLookahead steps ahead of the last step the current
// iteration needs. Refills are issued after the barrier that ends the previous iteration, so
// only the current iteration's data must survive them: at most Q = 4 chunks of up to 8 units
// plus a header unit each (36 units), which span at most 6 steps of 8 units; hence
// kLookahead <= kRingSteps - 6. Steps of 4 KB (2 copies a thread) measured 2-5% faster than
// steps of 2 KB with 6 steps (12 KB) of lookahead (H100, same session: 8192x28672 GPTQ-4 m = 8
// 65.1 -> 61.7 us, 14336x4096 m = 1 22.0 -> 21.3): half the copy-loop bookkeeping per byte;
// 10 steps of 2 KB lookahead had measured slower than 6, so the 8 KB here lose nothing.
// The ring is 32 KB so that 6 blocks (24 warps) fit a multiprocessor: Nsight Compute showed
// this kernel bound by instruction latency (fixed-latency dependencies) at low occupancy; a
// 64 KB ring with 21 steps in flight (2 blocks per multiprocessor) measured 1.7x slower.
constexpr int kStepCopies = 2;
constexpr int kStepUnits = kStepCopies * kTcThreads * 4 / tc::kUnitWords;  // 8 units = 4 KB
constexpr int kRingSteps = 8;
constexpr int kLookahead = kRingSteps - 6;
constexpr int kRingWords = kRingSteps * kStepUnits * tc::kUnitWords;  // 32 KB
static_assert((kRingWords & (kRingWords - 1)) == 0, "the ring is indexed with a mask");

// ---------------------------------------------------------------------------------
// PTX helpers (compute capability 8.0+; below it layers keep the canonical layout: build_tc_layout).
// ---------------------------------------------------------------------------------
/// A shared-memory pointer as the 32-bit shared-window address PTX's .shared operands take.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
/// `v` kept in a register as it is: ptxas cannot see through the empty asm, so it neither
/// rematerialises the value nor folds it back into the expression it came from. The tc kernels'
/// loops use it for shared-window addresses, which ptxas otherwise recomputes (S2R SR_CgaCtaId and
/// 4-5 more instructions) at each use, several times an iteration.
__device__ __forceinline__ unsigned opaque_u32(unsigned v) {
  asm("" : "+r"(v));
  return v;
}
/// 16-byte shared-memory load and store at a shared-window address. volatile with a memory clobber:
/// they stay in order with the barriers and the ring's plain loads and stores around them.
__device__ __forceinline__ int4 lds_int4(unsigned a) {
  int4 v;
  asm volatile("ld.shared.v4.s32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(a)
               : "memory");
  return v;
}
__device__ __forceinline__ int lds_s32(unsigned a) {
  int v;
  asm volatile("ld.shared.s32 %0, [%1];\n" : "=r"(v) : "r"(a) : "memory");
  return v;
}
template <class V>  // uint4 or int4
__device__ __forceinline__ void sts_16(unsigned a, const V& v) {
  static_assert(sizeof(V) == 16, "sts_16 stores 16 bytes");
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ __half2 u32_as_h2(std::uint32_t u) {
  __half2 h;
  std::memcpy(&h, &u, 4);
  return h;
}
__device__ __forceinline__ std::uint32_t h2_as_u32(__half2 h) {
  std::uint32_t u;
  std::memcpy(&u, &h, 4);
  return u;
}

/// 16-byte asynchronous copy global -> shared (`smem`: a shared-window address, converted once
/// by the caller).
__device__ __forceinline__ void cp_async16(unsigned smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem) : "memory");
#else
  (void)smem;
  (void)gmem;
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

/// Waits until at most n of this thread's cp.async groups are pending (n clamped to 0..14; the
/// wgmma kernel's deep ring runs up to 13 steps ahead).
__device__ __forceinline__ void cp_async_wait_at_most(int n) {
  switch (n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    case 7: cp_async_wait<7>(); break;
    case 8: cp_async_wait<8>(); break;
    case 9: cp_async_wait<9>(); break;
    case 10: cp_async_wait<10>(); break;
    case 11: cp_async_wait<11>(); break;
    case 12: cp_async_wait<12>(); break;
    case 13: cp_async_wait<13>(); break;
    default: cp_async_wait<14>(); break;
  }
}

/// The four 8x8 matrices of a 16x16 fp16 A fragment from shared memory (row addresses
/// supplied per lane as for mma.m16n8k16's a0..a3).
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&a)[4], const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = smem_u32(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(s));
#else
  (void)a;
  (void)smem;
  __trap();
#endif
}

/// d += A (16x16, row-major fragment a) * B (16x8, fragment b0/b1), inputs of type T (__half
/// or __nv_bfloat16), fp32 accumulation.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                          std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kIsBf16<T>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  (void)d;
  (void)a;
  (void)b0;
  (void)b1;
  __trap();
#endif
}

// ---------------------------------------------------------------------------------
// The GEMM kernel.
// ---------------------------------------------------------------------------------

/// Calls f(std::integral_constant<int, B>{}) for a chunk's code width `bits` = B (2, 3, 4, 5, 6
/// or 8), so that the tc kernels pick their per-width code in one place; other widths are
/// rejected at construction and do nothing here.
template <class F>
__host__ __device__ __forceinline__ void with_code_width(int bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: break;
  }
}

/// The b words of a lane from the ring, starting at ring word `wo` (for b = 2, 4, 6, 8 a
/// multiple of 2, 4, 2, 8 words, and the ring a multiple of 8 words: vector loads never
/// straddle its end). kNoWrap: the caller knows that the b words lie below the ring's end (a
/// wrap-free iteration, one_group_wrap_free), so no word's index is masked and the loads take
/// their offsets from `wo` as immediates.
template <int B, int kWords = kRingWords, bool kNoWrap = false>
__device__ __forceinline__ void ring_lane_words(const std::uint32_t* ring, int wo, std::uint32_t (&w)[8]) {
  constexpr int kMask = kNoWrap ? -1 : kWords - 1;
  if constexpr (B == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(ring + wo);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (B == 8) {
    const uint4 v0 = *reinterpret_cast<const uint4*>(ring + wo);
    const uint4 v1 = *reinterpret_cast<const uint4*>(ring + wo + 4);
    w[0] = v0.x, w[1] = v0.y, w[2] = v0.z, w[3] = v0.w;
    w[4] = v1.x, w[5] = v1.y, w[6] = v1.z, w[7] = v1.w;
  } else if constexpr (B == 2 || B == 6) {
#pragma unroll
    for (int i = 0; i < B / 2; ++i) {
      const uint2 v = *reinterpret_cast<const uint2*>(ring + ((wo + 2 * i) & kMask));
      w[2 * i] = v.x, w[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < B; ++i) w[i] = ring[(wo + i) & kMask];
  }
}

/// bfloat16 decodes widths up to 6 bits in bfloat16 arithmetic (decode_pair_bf16, magic 128);
/// float16, and bfloat16 8-bit codes, in float16 (magic 1024).
template <int B, class T>
inline constexpr bool kBf16Decode = kIsBf16<T> && B <= 6;

/// Pair P of a lane's words with the magic exponent: fp16x2 (1024 + q_lo, 1024 + q_hi), or
/// 1024 + 2^b q for the float16 pairs tc::pair_times_k, or bf16x2 128 + q (kBf16Decode). Main
/// pairs (tc::code_bit): a shift, then the mask and the OR in one lop3 ((v & mask) | magic;
/// ptxas emits two LOP3s for the plain C++ expression since both constants are immediates);
/// the spare pairs of b = 3, 5, 6 from their segments.
/// (v & kMask) | kMagic in one lop3.
template <std::uint32_t kMask, std::uint32_t kMagic>
__device__ __forceinline__ std::uint32_t mask_or_magic(std::uint32_t v) {
  std::uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(v), "n"(kMask), "n"(kMagic));
  return r;
}

template <int B, int P, class T>
__device__ __forceinline__ std::uint32_t pair_with_magic(const std::uint32_t (&w)[8]) {
  constexpr std::uint32_t kMagic = kBf16Decode<B, T> ? 0x43004300u : 0x64006400u;  // 128 / 1024, x2
  if constexpr (!kIsBf16<T> && tc::pair_scaled_layout(B) && P < tc::main_pairs(B)) {
    // b <= 5: one shift per two pairs; odd pairs stay 2^b q (tc::main_pair_scaled; decode_pair_f16
    // scales them back exactly).
    return mask_or_magic<tc::main_pair_scaled_mask<B, P>(), kMagic>(tc::main_pair_scaled_word<B, P>(w));
  } else if constexpr (P < tc::main_pairs(B)) {
    return mask_or_magic<tc::pair_mask(B), kMagic>(tc::main_pair_shifted<B, P>(w));
  } else {
    return tc::spare_pair<B, P - tc::main_pairs(B)>(w) | kMagic;
  }
}

/// One B-fragment register from the exact q - z of two codes (fp16x2 d) as two weights of type T:
/// float16: one __hmul2 by the scale (s2 = the fp16 scale twice) rounds like the reference,
/// f16((q - z) * s); bfloat16: the exact fp32 product by the scale (s2 = its fp32 bits) rounded
/// once to bfloat16, bf16((q - z) * s), as dequantize(bfloat16) gives. decode_pair: d =
/// (1024 + q) - (1024 + z) from the pair `qm` of pair_with_magic.
template <class T>
__device__ __forceinline__ std::uint32_t scale_pair(__half2 d, std::uint32_t s2) {
  if constexpr (kIsBf16<T>) {
    const float s = __uint_as_float(s2);
    const float2 f = __half22float2(d);
    const __nv_bfloat162 r = __floats2bfloat162_rn(f.x * s, f.y * s);
    std::uint32_t u;
    std::memcpy(&u, &r, 4);
    return u;
  } else {
    return h2_as_u32(__hmul2(d, u32_as_h2(s2)));
  }
}

template <class T>
__device__ __forceinline__ std::uint32_t decode_pair(std::uint32_t qm, std::uint32_t z2, std::uint32_t s2) {
  return scale_pair<T>(__hsub2(u32_as_h2(qm), u32_as_h2(z2)), s2);
}

/// float16, pair P of b bits: the exact integers q - z of its two codes, (1024 + q) - (1024 + z),
/// except that the pairs held as 2^b q (tc::pair_times_k) give q - z as (1024 + 2^b q) / 2^b -
/// (1024 / 2^b + z) in one fma (exact: every step is an integer below 2048 or a power-of-two
/// division of one); zx = fp16x2 1024 / 2^b + z (GroupConsts::zx). Unscaled, for the group sums
/// (tc_gemm.cu, fold_group); decode_pair_f16 scales them.
template <int B, int P>
__device__ __forceinline__ std::uint32_t int_pair_f16(std::uint32_t qm, std::uint32_t z2, std::uint32_t zx) {
  if constexpr (tc::pair_times_k(B, P))
    return h2_as_u32(__hfma2(u32_as_h2(qm), __float2half2_rn(1.0f / (1 << B)), __hneg2(u32_as_h2(zx))));
  else
    return h2_as_u32(__hsub2(u32_as_h2(qm), u32_as_h2(z2)));
}

/// float16, pair P of b bits: int_pair_f16 times the scale, f16((q - z) * s) (decode_pair).
template <int B, int P>
__device__ __forceinline__ std::uint32_t decode_pair_f16(std::uint32_t qm, std::uint32_t z2, std::uint32_t zx,
                                                         std::uint32_t s2) {
  return scale_pair<__half>(u32_as_h2(int_pair_f16<B, P>(qm, z2, zx)), s2);
}

/// bfloat16, group sums (tc_gemm.cu, fold_group): the exact integers q - z of a pair as bfloat16
/// (|q - z| <= 255, exact in bfloat16's 8 significant bits), the scale left for later. b <= 6:
/// `qm` is bf16x2 128 + q and zb = bf16x2 128 + z, one subtraction; 8-bit codes: `qm` is fp16x2
/// 1024 + q and zb fp16x2 1024 + z, the fp16 difference converted (exactly) to bfloat16.
template <int B>
__device__ __forceinline__ std::uint32_t int_pair_bf16(std::uint32_t qm, std::uint32_t zb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  (void)qm;
  (void)zb;
  __trap();
  return 0u;
#else
  __nv_bfloat162 r;
  if constexpr (B <= 6) {
    __nv_bfloat162 q, z;
    std::memcpy(&q, &qm, 4);
    std::memcpy(&z, &zb, 4);
    r = __hsub2(q, z);
  } else {
    const float2 f = __half22float2(__hsub2(u32_as_h2(qm), u32_as_h2(zb)));
    r = __floats2bfloat162_rn(f.x, f.y);
  }
  std::uint32_t u;
  std::memcpy(&u, &r, 4);
  return u;
#endif
}

/// bfloat16, b <= 6: the pair `qm` (bf16x2 128 + q, exact for q < 128) minus zb = bf16x2 128 + z is
/// the exact q - z (|q - z| <= 64; int_pair_bf16); the scale s (fp16) is split into s_hi = bf16(s)
/// and s_lo = s - s_hi (<= 3 significant bits, so exact in bfloat16), packed as sp = s_hi |
/// s_lo << 16. Then
/// d * s_lo is exact (|d * k| <= 256 for s_lo = k 2^e, |k| <= 4) and fma(d, s_hi, d * s_lo)
/// rounds the exact d * s once: bf16((q - z) * s), the bits decode_pair<bfloat16> gives, in three
/// bfloat16 operations instead of a conversion to fp32 and back.
/// Below compute capability 8.0 there is no bfloat16 arithmetic (and cuda_bf16.h declares none):
/// the tc kernels never run there (build_tc_layout), so that code only traps, like cp_async16.
__device__ __forceinline__ std::uint32_t decode_pair_bf16(std::uint32_t qm, std::uint32_t zb, std::uint32_t sp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  (void)qm;
  (void)zb;
  (void)sp;
  __trap();
  return 0u;
#else
  const std::uint32_t du = int_pair_bf16<6>(qm, zb);  // the exact q - z
  __nv_bfloat162 d, spp;
  std::memcpy(&d, &du, 4);
  std::memcpy(&spp, &sp, 4);
  const __nv_bfloat162 r = __hfma2(d, __low2bfloat162(spp), __hmul2(d, __high2bfloat162(spp)));
  std::uint32_t u;
  std::memcpy(&u, &r, 4);
  return u;
#endif
}

/// The current group's decode constants for the lane's four columns 8 jj + g (from the group's
/// header, unpack_header):
///   float16:  s2 = the scale twice, z2 = fp16x2 1024 + zero, zx = fp16x2 1024 / 2^b + zero (for
///             the pairs held as 2^b q, b <= 5; b = the group's width);
///   bfloat16: s2 = s_hi | s_lo << 16 (decode_pair_bf16), z2 = fp16x2 1024 + zero (8-bit codes,
///             decoded in float16), zx = bf16x2 128 + zero (b <= 6);
///   both:     sf = the scale in fp32 (exact; the group sums of tc_gemm.cu apply it after the mma).
struct GroupConsts {
  std::uint32_t s2[4] = {0, 0, 0, 0};
  std::uint32_t z2[4] = {0, 0, 0, 0};
  std::uint32_t zx[4] = {0, 0, 0, 0};
  float sf[4] = {0.0f, 0.0f, 0.0f, 0.0f};
};

/// One chunk's 16 B-fragment registers of a lane, decoded from its words `w` with the group's
/// constants: b[jj][s][h] holds rows 16 s + 2 t (+ 8 h), + 1 of column 8 jj + g of the warp's
/// 32-column block (mma.m16n8k16 B operand of n8 tile jj, k16 step s; lane = 4 g + t).
/// kInt: the exact q - z, unscaled (int_pair_bf16, int_pair_f16).
template <int B, class T, bool kInt = false>
__device__ __forceinline__ void decode_chunk(const std::uint32_t (&w)[8], const GroupConsts& gc,
                                             std::uint32_t (&b)[4][2][2]) {
  constexpr bool kIntBf16 = kInt && kIsBf16<T>;
  std::uint32_t s32[4];  // bfloat16, 8-bit codes: the fp32 scale s_hi + s_lo (exact)
  if constexpr (kIsBf16<T> && !kBf16Decode<B, T> && !kIntBf16) {
#pragma unroll
    for (int jj = 0; jj < 4; ++jj)
      s32[jj] = __float_as_uint(__uint_as_float(gc.s2[jj] << 16) + __uint_as_float(gc.s2[jj] & 0xffff0000u));
  }
#define EXL2_TC_PAIR(JJ, S, H)                                                                          \
  {                                                                                                   \
    const std::uint32_t qm = pair_with_magic<B, 4 * (JJ) + 2 * (S) + (H), T>(w);                      \
    if constexpr (kIntBf16)                                                                           \
      b[JJ][S][H] = int_pair_bf16<B>(qm, kBf16Decode<B, T> ? gc.zx[JJ] : gc.z2[JJ]);                  \
    else if constexpr (kInt)                                                                          \
      b[JJ][S][H] = int_pair_f16<B, 4 * (JJ) + 2 * (S) + (H)>(qm, gc.z2[JJ], gc.zx[JJ]);              \
    else if constexpr (kBf16Decode<B, T>)                                                             \
      b[JJ][S][H] = decode_pair_bf16(qm, gc.zx[JJ], gc.s2[JJ]);                                        \
    else if constexpr (kIsBf16<T>)                                                                    \
      b[JJ][S][H] = decode_pair<T>(qm, gc.z2[JJ], s32[JJ]);                                            \
    else                                                                                              \
      b[JJ][S][H] = decode_pair_f16<B, 4 * (JJ) + 2 * (S) + (H)>(qm, gc.z2[JJ], gc.zx[JJ], gc.s2[JJ]); \
  }
#define EXL2_TC_TILE(JJ) EXL2_TC_PAIR(JJ, 0, 0) EXL2_TC_PAIR(JJ, 0, 1) EXL2_TC_PAIR(JJ, 1, 0) EXL2_TC_PAIR(JJ, 1, 1)
  EXL2_TC_TILE(0) EXL2_TC_TILE(1) EXL2_TC_TILE(2) EXL2_TC_TILE(3)
#undef EXL2_TC_TILE
#undef EXL2_TC_PAIR
}

/// A group's header words (fp16 scale | fp16 (1024 + zero) << 16, one per n8 tile of the
/// lane) as the GroupConsts of type T, for the group's code width b (every chunk of a group has
/// its group's width).
template <class T>
__device__ __forceinline__ void unpack_header(const uint4 h, int b, GroupConsts& gc) {
  const std::uint32_t hv[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    gc.z2[jj] = __byte_perm(hv[jj], 0, 0x3232);
    gc.sf[jj] = __half2float(__ushort_as_half(static_cast<unsigned short>(hv[jj] & 0xffffu)));
    if constexpr (kIsBf16<T>) {
      const float s = gc.sf[jj];
      const __nv_bfloat16 hi = __float2bfloat16_rn(s);
      const __nv_bfloat16 lo = __float2bfloat16_rn(s - __bfloat162float(hi));  // exact (<= 3 bits)
      gc.s2[jj] = static_cast<std::uint32_t>(__bfloat16_as_ushort(hi)) |
                  (static_cast<std::uint32_t>(__bfloat16_as_ushort(lo)) << 16);
      gc.zx[jj] = gc.z2[jj] - 0x21002100u;  // fp16 bits 0x6400 + z -> bf16 bits 0x4300 + z (128 + z)
    } else {
      gc.s2[jj] = __byte_perm(hv[jj], 0, 0x1010);
      // 1024 / 2^b + z = (1024 + z) - (1024 - 1024 / 2^b), exact (b <= 5; unused above)
      gc.zx[jj] = h2_as_u32(__hsub2(u32_as_h2(gc.z2[jj]), __float2half2_rn(1024.0f - static_cast<float>(1024 >> b))));
    }
  }
}

/// The stream units a block reads for its chunks cb .. ce - 1 (cb < ce): from the first chunk's
/// group header (when that chunk starts its group; else the kernel reads that header directly)
/// to the end of the last chunk's codes. `first` is the first chunk's descriptor.
struct ChunkRange {
  int4 first;
  bool first_starts_group;
  std::int64_t s0, s1;
};

__device__ __forceinline__ ChunkRange chunk_range(const int4* __restrict__ tc_chunks, int cb, int ce) {
  ChunkRange r;
  r.first = __ldg(tc_chunks + cb);
  const int4 last = __ldg(tc_chunks + ce - 1);
  r.first_starts_group = r.first.y == r.first.w + 1;
  r.s0 = r.first_starts_group ? r.first.w : r.first.y;
  r.s1 = static_cast<std::int64_t>(last.y) + (last.z & 0xff);
  return r;
}

/// The tc kernels' descriptor prefetch: lane q < Q of the loading warp (`loader`) gets the
/// descriptor of chunk c0 + q, zeros past chunk `end` and in every other thread. The kernels load
/// an iteration's descriptors two iterations ahead and store them in shared memory (dring) one
/// iteration before use, so no chunk waits for its descriptor's global load.
template <int Q>
__device__ __forceinline__ int4 prefetch_chunk_desc(const int4* __restrict__ tc_chunks, int c0, int end, bool loader,
                                                    int lane) {
  const int c = c0 + lane;
  return (loader && lane < Q && c < end) ? __ldg(tc_chunks + c) : make_int4(0, 0, 0, 0);
}

/// The group constants a block starts with: when its first chunk does not start its group (a
/// split of the chunk range), that group's header read directly from the tile's stream `tsrc`
/// (the columns 8 jj + g of `warp`'s block); returns the header unit held (-1: none yet, the ring
/// brings the first header).
template <class T>
__device__ __forceinline__ int first_group_header(const std::uint32_t* __restrict__ tsrc, const ChunkRange& cr,
                                                  int g, int warp, GroupConsts& gc) {
  if (!cr.first_starts_group)
    unpack_header<T>(__ldg(reinterpret_cast<const uint4*>(
                         tsrc + static_cast<std::int64_t>(cr.first.w) * tc::kUnitWords + warp * 32 + g * 4)),
                     cr.first.z & 0xff, gc);
  return cr.first_starts_group ? -1 : cr.first.w;
}

/// One thread's part in filling a tile's weight ring (tc_gemm_kernel, tc_wgmma_kernel): the
/// stream units s0 .. s1 of the tile go through the ring in steps of kStepUnits units; step p
/// copies units s0 + 8p .. s0 + 8p + 7, thread `t` (of the kTcThreads that fill the ring) units
/// t / 32 and 4 + t / 32 of it, 16 bytes each, so it copies its first piece in steps p < steps0
/// and its second in steps p < steps1 only. The copy loop is a large share of the kernels'
/// instructions: source pointer, ring offset and step count are kept incrementally in registers
/// instead of being recomputed from s0 each step. Each step is one cp.async group. kWords: the
/// ring's size in words (a power of two, a multiple of a step; kRingWords but for the wgmma
/// kernel's deep ring, tc_wgmma.cu).
template <int kWords = kRingWords>
struct RingFillT {
  static_assert((kWords & (kWords - 1)) == 0 && kWords % (kStepUnits * tc::kUnitWords) == 0,
                "the ring is whole steps, indexed with a mask");
  const std::uint32_t* __restrict__ src;
  unsigned ring_s;
  unsigned dst_off;  // ring word of this thread's next copy
  int steps0, steps1;
  int issued = 0;  // steps issued (committed groups)

  __device__ __forceinline__ RingFillT(const std::uint32_t* tsrc, std::int64_t s0, std::int64_t s1, int t,
                                      const std::uint32_t* ring)
      : src(tsrc + s0 * tc::kUnitWords + t * 4),
        ring_s(smem_u32(ring)),
        dst_off(static_cast<unsigned>(t * 4)),
        steps0((static_cast<int>(s1 - s0) - t / 32 + kStepUnits - 1) / kStepUnits),
        steps1((static_cast<int>(s1 - s0) - 4 - t / 32 + kStepUnits - 1) / kStepUnits) {
    asm("" : "+r"(ring_s));  // opaque: keep it in a register (else ptxas recomputes it per copy)
  }

  __device__ __forceinline__ void issue_step() {
    if (issued < steps0) cp_async16(ring_s + dst_off * 4u, src);
    if (issued < steps1) cp_async16(ring_s + (dst_off + 4u * tc::kUnitWords) * 4u, src + 4 * tc::kUnitWords);
    static_assert(kStepCopies == 2, "issue_step copies two pieces per thread");
    cp_async_commit();
    src += kStepUnits * tc::kUnitWords;
    dst_off = (dst_off + kStepUnits * tc::kUnitWords) & (kWords - 1);
    ++issued;
  }

  /// Step B of the kernels' iterations: issues steps until the ring runs `ahead` steps past the
  /// one holding the end of the iteration's last chunk (descriptor `last`; `s0`: the stream unit
  /// at ring word 0), then, if it issued any, waits until at most the newest `ahead` groups are
  /// pending, so that every step the iteration reads has landed (this thread's copies; steps
  /// issued by earlier calls were waited for by those). One wait after the loop, not one per
  /// step: with a run-time `ahead` each wait is a branch ladder over the immediate group counts,
  /// which made the per-step loop ~28 instructions a step in the wgmma kernel (Nsight Compute).
  /// Only after the barrier that ends the previous iteration: the refills overwrite its data
  /// (`ahead` <= tc::ring_lookahead).
  __device__ __forceinline__ void issue_through(const int4 last, std::int64_t s0, int ahead) {
    const int last_step = static_cast<int>(static_cast<unsigned>(last.y + (last.z & 0xff) - 1 - static_cast<int>(s0)) /
                                           static_cast<unsigned>(kStepUnits));
    if (issued - ahead <= last_step) {
#pragma unroll 1
      do {
        issue_step();
      } while (issued - ahead <= last_step);
      cp_async_wait_at_most(ahead);
    }
  }
};
using RingFill = RingFillT<>;

/// A chunk's group constants and code words: on a group change (header unit d.w differs from
/// `header`) the scales and zeros of the lane's four columns from the group's header unit in the
/// ring; returns the ring word where the lane's b code words start. `s0`: the stream unit at
/// ring word 0 (modulo the ring).
template <class T, int kWords = kRingWords>
__device__ __forceinline__ void load_group_header(const std::uint32_t* ring, const int4& d, int b, std::int64_t s0,
                                                  int& header, GroupConsts& gc, int lane, int warp) {
  if (d.w != header) {
    header = d.w;
    const int hw =
        static_cast<int>((static_cast<std::int64_t>(header) - s0) * tc::kUnitWords) + warp * 32 + (lane >> 2) * 4;
    unpack_header<T>(*reinterpret_cast<const uint4*>(ring + (hw & (kWords - 1))), b, gc);
  }
}

/// (lane, warp of the 4-warp group that owns the tile's stream, as above)
template <int kWords = kRingWords>
__device__ __forceinline__ int chunk_lane_word(const int4& d, int b, std::int64_t s0, int lane, int warp) {
  return (static_cast<int>(((static_cast<std::int64_t>(d.y) - s0) * tc::kUnitWords) & (kWords - 1)) +
          warp * 32 * b + lane * b) &
         (kWords - 1);
}

/// Ring word of the lane's words of chunk q of a one-group iteration (tc::one_group_flag), from
/// its first chunk's (`wo0`, chunk_lane_word): chunk q's codes start q b units later in the stream.
/// kNoWrap: a wrap-free iteration (one_group_wrap_free), no mask.
template <int B, int kWords = kRingWords, bool kNoWrap = false>
__device__ __forceinline__ int one_group_lane_word(int wo0, int q) {
  const int wo = wo0 + q * B * tc::kUnitWords;
  return kNoWrap ? wo : wo & (kWords - 1);
}

/// Whether the codes of the Q chunks of b bits of a one-group iteration (first chunk's descriptor
/// d; they are Q b consecutive units of the stream) lie below the ring's end: then no lane word of
/// the iteration wraps, and the kernels read them without masks (ring_lane_words' kNoWrap), their
/// offsets from the first chunk's lane word as the loads' immediates. Block-uniform. The masks
/// took 18 of a 3-bit iteration's 226 instructions (scalar loads, each index masked), 35 of a
/// 5-bit one's 264, 21 of a 6-bit one's 269 and 8 at 2, 4 and 8 bits (SASS, kT8); on the 32 KB
/// ring an iteration wraps with odds of about (Q b - 1) / 64: 11% at 2 bits, 23% at 4. H100, same
/// call (ab/s23_c2.sh), against the same loop without it, 8192 x 28672: EXL2 2.5 bpw 0.97x at
/// m = 1 and 8, GPTQ-3 0.98x at m = 8, GPTQ-2 0.99x at m = 1 to 8; 4-bit and m >= 16 level
/// within the rounds' spread.
template <int B, int Q, int kWords = kRingWords>
__device__ __forceinline__ bool one_group_wrap_free(const int4& d, std::int64_t s0) {
  return tc::codes_below_ring_end(static_cast<std::int64_t>(d.y) - s0, B, Q, kWords);
}

/// The same for blocks of one 4-warp group (lane and warp from threadIdx.x).
template <class T>
__device__ __forceinline__ void load_group_header(const std::uint32_t* ring, const int4& d, int b, std::int64_t s0,
                                                  int& header, GroupConsts& gc) {
  load_group_header<T>(ring, d, b, s0, header, gc, static_cast<int>(threadIdx.x) & 31,
                       static_cast<int>(threadIdx.x) >> 5);
}

__device__ __forceinline__ int chunk_lane_word(const int4& d, int b, std::int64_t s0) {
  return chunk_lane_word(d, b, s0, static_cast<int>(threadIdx.x) & 31, static_cast<int>(threadIdx.x) >> 5);
}

// ---------------------------------------------------------------------------------
// Programmatic dependent launch (compute capability 9.0+; launch_clustered_smem's
// `programmatic`). The m = 1 kernel that gathers its own row (tc_gemm_kernel's kGather, a whole
// call in one launch) is launched that way: its blocks may start while the stream's previous
// kernel finishes, and meanwhile copy the layer's own data (chunk table, weight stream, tc_xsrc:
// written at construction, which synchronises). Everything that depends on earlier work of the
// stream (reading x, writing the output) comes after pdl_wait, in every block. kGather calls
// pdl_trigger once its main loop is done, so that the next call's kGather overlaps its reduction
// and tail. H100, GPTQ-4, m = 1, back-to-back calls: 4096 x 4096 8.0 -> 7.4 us, 14336 x 4096 16.9
// -> 16.3, 4096 x 14336 15.7 -> 15.3. The same launch for the activation gather of m >= 2 (the
// first of its call's two kernels) measured level (0.99-1.02x), so that gather keeps plain
// stream order; but the mma.sync kernel after it is a programmatic dependent of the gather
// (which triggers at its start) where the kernel's blocks fill some multiprocessor to its limit
// (tc_pdl_programmatic_after_gather, tc_gemm.cu): its first blocks fill their weight rings while
// the gather runs.
// ---------------------------------------------------------------------------------
/// Blocks until the stream's previous kernel has completed and its memory operations are
/// visible; returns at once in a kernel launched in plain stream order. Since every block waits
/// here before touching x or the output, a kernel that completes implies that its predecessor
/// completed too.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
/// Lets the stream's next kernel, if it was launched as a programmatic dependent, start its
/// blocks once every block of this kernel has called this (or exited).
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/// Waits until the phase of parity `parity` of the mbarrier at shared address `bar` has completed
/// (compute capability 9.0+: the kGather push reduction, the warp-specialised wgmma kernel).
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned done = 0;
  while (!done)
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
#else
  (void)bar, (void)parity;
  __trap();
#endif
}

// ---------------------------------------------------------------------------------
// Push-based split-K (push_reduce_store below; tc_gemm_kernel's kGather, kT8 and 16-row tiles):
// each block sends every partial value straight into the shared memory of the block that sums it
// (st.async, completed on that block's mbarrier), so no block reads another's shared memory and
// no cluster barrier with a GPU-scope fence is needed at the end (cluster_reduce_store needs two).
// ---------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/// An mbarrier for one arrival that completes once `bytes` have landed; made visible to the
/// cluster by the relaxed cluster arrive that follows (cluster_arrive_relaxed).
__device__ __forceinline__ void push_row_init(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n"
               "fence.mbarrier_init.release.cluster;\n"
               "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory"); }
/// A cluster barrier arrival with release semantics: this thread's earlier memory accesses (its
/// shared-memory reads of the ring, an mbarrier's initialisation) are ordered before what the
/// other blocks do after their cluster_wait (acquire).
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
/// st.async of v to `addr` (this CTA's shared-window address) in cluster block `rank`, completing
/// 4 bytes on that block's mbarrier at `bar` (likewise).
__device__ __forceinline__ void push_f32(unsigned addr, unsigned bar, unsigned rank, float v) {
  asm volatile("{\n .reg .b32 ra, rb;\n"
               " mapa.shared::cluster.u32 ra, %0, %2;\n"
               " mapa.shared::cluster.u32 rb, %1, %2;\n"
               " st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [ra], %3, [rb];\n}\n" ::"r"(addr),
               "r"(bar), "r"(rank), "r"(__float_as_uint(v))
               : "memory");
}
/// push_f32 of two adjacent floats (`addr` 8-byte aligned).
__device__ __forceinline__ void push_f32x2(unsigned addr, unsigned bar, unsigned rank, float v0, float v1) {
  asm volatile("{\n .reg .b32 ra, rb;\n"
               " mapa.shared::cluster.u32 ra, %0, %2;\n"
               " mapa.shared::cluster.u32 rb, %1, %2;\n"
               " st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [ra], {%3, %4}, [rb];\n}\n" ::"r"(addr),
               "r"(bar), "r"(rank), "r"(__float_as_uint(v0)), "r"(__float_as_uint(v1))
               : "memory");
}
#endif

/// out[row, n] (row-major, N columns) = v plus column n's fp16 bias (when there is one), rounded to
/// T once: how every tc kernel stores an output element.
template <class T>
__device__ __forceinline__ void store_output(T* out, std::int64_t row, std::int64_t N, std::int64_t n, float v,
                                             const __half* bias) {
  if (bias) v += __half2float(bias[n]);
  out[row * N + n] = from_float<T>(v);
}

/// Split-K over a thread-block cluster (compute capability 9.0+), after every block of the
/// cluster has written its fp32 partial tile (kRows x 128 columns, row-major) to its own shared
/// memory `red`: block `rank` of `split` adds a 1/split share of the tile over ranks 0..split-1 in
/// that order (deterministic) and stores it (+ bias) to rows m0.. of out [M, N], columns of tile
/// `tile`. Synchronises the cluster before (every partial tile written) and after (each block's
/// shared memory stays alive until its readers are done). kTcThreads threads.
template <int kRows, class T>
__device__ __forceinline__ void cluster_reduce_store(const float* red, int rank, int split, int tid, std::int64_t m0,
                                                     std::int64_t M, std::int64_t tile, std::int64_t N,
                                                     const __half* __restrict__ bias, T* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  // Rank r sums and stores elements [total r / split, total (r + 1) / split) of the tile (any
  // split, not only divisors of the tile's size).
  const int total = kRows * tc::kTileCols;
  const int end = total * (rank + 1) / split;
  for (int i = total * rank / split + tid; i < end; i += kTcThreads) {
    float sum = 0.0f;
    for (int q = 0; q < split; ++q) sum += cluster.map_shared_rank(const_cast<float*>(red), q)[i];
    const std::int64_t row = m0 + i / tc::kTileCols;
    const std::int64_t n = tile * tc::kTileCols + i % tc::kTileCols;
    if (row < M && n < N) store_output(out, row, N, n, sum, bias);
  }
  cluster.sync();
#else
  (void)red, (void)rank, (void)split, (void)tid, (void)m0, (void)M, (void)tile, (void)N, (void)bias, (void)out;
  __trap();
#endif
}

/// push_reduce_store's mbarrier, for split x rows x share floats (before the loop): `rows` (at most
/// kRows, the receive buffer's) is how many rows the senders push.
template <int kRows>
__device__ __forceinline__ void push_reduce_init(unsigned bar, int rows = kRows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  push_row_init(bar, static_cast<unsigned>(rows) * tc::kTileCols * sizeof(float));  // split x (rows x share) floats
#else
  (void)bar, (void)rows;
#endif
}

/// push_reduce_init for a receive buffer of its own (!kRingRecv), every thread at the kernel's
/// start: the mbarrier (thread 0), then a relaxed cluster arrival (push_reduce_store waits).
template <int kRows>
__device__ __forceinline__ void push_reduce_init_early(unsigned bar, int tid, int rows = kRows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (tid == 0) push_reduce_init<kRows>(bar, rows);
  cluster_arrive_relaxed();
#else
  (void)bar, (void)tid, (void)rows;
#endif
}

/// Push-based split-K over a thread-block cluster (compute capability 9.0+) for a kRows x 128
/// partial tile (tc_gemm_kernel's kT8 and 16- / 32-row tiles): rank r owns columns r * share ..
/// (share = 128 / split, a power of two of at least 8), and every block sends each of its partial
/// values straight into its owner's receive buffer `recv` with st.async, completed on the owner's
/// mbarrier `bar` (shared-window addresses; push_reduce_init before the loop). The owner adds the
/// split partials of each of its elements in rank order (the order and bits of
/// cluster_reduce_store) and stores them (+ bias) to rows m0.. of out [M, N]. Against
/// cluster_reduce_store: one cluster barrier instead of two and no reads of other blocks' shared
/// memory.
///
/// kRingRecv: `recv` is the block's ring, reused: the barrier at the start (every thread of every
/// block, after its loop and its last cp.async wait) orders each block's last ring reads and its
/// mbarrier initialisation before any push into it. Otherwise `recv` is a buffer of its own, and
/// the caller initialised the mbarrier and made a relaxed cluster arrival at the kernel's start
/// (push_reduce_init_early): here only the wait for the other blocks' initialisations, so no
/// block waits for the cluster's slowest one before sending. A block exits only once everything
/// pushed to it has landed; a sender needs nothing of its own afterwards.
///
/// Receive layout: [sender rank][element of the owner's share of kRows rows], the element of (row,
/// column c of the share) at c * kRows + row when kPairRows (the thread's pairs are rows 2i, 2i + 1 of one
/// column: kT8), else at row * share + c (pairs of columns 2i, 2i + 1). `for_pairs(f)` calls
/// f(row, col, v0, v1) for every pair the thread holds (col in the tile; v1 at row + 1 or col + 1),
/// or f(row, col, v) for single values (kGather: one value of row 0 per thread); the bytes pushed
/// must be those push_reduce_init was given (kT8 pushes only the rows it computes: rows past them
/// are summed from whatever the buffer holds and never stored).
template <int kRows, bool kPairRows, bool kRingRecv = true, class T, class ForPairs>
__device__ __forceinline__ void push_reduce_store(float* recv, unsigned bar, int rank, int split, int tid,
                                                  std::int64_t m0, std::int64_t M, std::int64_t tile,
                                                  std::int64_t N, const __half* __restrict__ bias,
                                                  T* __restrict__ out, ForPairs for_pairs) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kRingRecv) cluster_arrive_release();
  cluster_wait();
  const int share = tc::kTileCols / split;
  const int per_rank = kRows * share;
  const unsigned recv_s = smem_u32(recv);
  for_pairs([&](int row, int col, float v0, auto... v1) {
    static_assert(sizeof...(v1) <= 1, "one value or a pair");
    const int owner = col / share, c = col - owner * share;
    const int e = kPairRows ? c * kRows + row : row * share + c;
    const unsigned addr = recv_s + static_cast<unsigned>(rank * per_rank + e) * 4u;
    if constexpr (sizeof...(v1) == 1)
      push_f32x2(addr, bar, static_cast<unsigned>(owner), v0, static_cast<float>(v1)...);
    else
      push_f32(addr, bar, static_cast<unsigned>(owner), v0);
  });
  mbar_wait(bar, 0);  // phase 0: every byte pushed to this block has landed
  for (int e = tid; e < per_rank; e += kTcThreads) {
    float sum = 0.0f;
    for (int q = 0; q < split; ++q) sum += recv[q * per_rank + e];
    const int row = kPairRows ? e % kRows : e / share, c = kPairRows ? e / kRows : e % share;
    const std::int64_t r = m0 + row, n = tile * tc::kTileCols + rank * share + c;
    if (r < M && n < N) store_output(out, r, N, n, sum, bias);
  }
#else
  (void)recv, (void)bar, (void)rank, (void)split, (void)tid, (void)m0, (void)M, (void)tile, (void)N, (void)bias,
      (void)out, (void)for_pairs;
  __trap();
#endif
}

}  // namespace exl2::detail::cuda
