// Internal: PTX helpers of the Hopper wgmma kernels (tc_wgmma.cu, tc_wgmma_ws.cu): fences, group
// commits and waits, shared-memory matrix descriptors, and the mbarriers of the warp-specialised
// kernel. The wgmma instructions exist only in the compilation pass for sm_90a
// (__CUDA_ARCH_FEAT_SM90_ALL); other passes compile traps, and the host never launches those
// kernels (query_tc_wgmma).
#pragma once

#include <cstdint>

namespace exl2::detail::cuda {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define EXL2_WGMMA_ASM(text) asm volatile(text ::: "memory")
#else
#define EXL2_WGMMA_ASM(text) __trap()
#endif

/// Orders this thread's register writes before the warpgroup's next wgmma reads them.
__device__ __forceinline__ void wgmma_fence() { EXL2_WGMMA_ASM("wgmma.fence.sync.aligned;\n"); }
__device__ __forceinline__ void wgmma_commit() { EXL2_WGMMA_ASM("wgmma.commit_group.sync.aligned;\n"); }
__device__ __forceinline__ void wgmma_wait_all() { EXL2_WGMMA_ASM("wgmma.wait_group.sync.aligned 0;\n"); }
/// Waits until at most one of the warpgroup's wgmma groups is pending.
__device__ __forceinline__ void wgmma_wait_one() { EXL2_WGMMA_ASM("wgmma.wait_group.sync.aligned 1;\n"); }
/// Makes this thread's completed shared-memory writes (st.shared, stmatrix, completed cp.async)
/// visible to the async proxy (wgmma's shared-memory operand reads).
__device__ __forceinline__ void fence_proxy_async() { EXL2_WGMMA_ASM("fence.proxy.async.shared::cta;\n"); }

/// wgmma shared-memory descriptor fields of an operand at shared address `addr`: leading and stride
/// byte offsets `lbo` / `sbo` (no swizzle: between core matrices adjacent in K / in the row
/// dimension; 128-byte swizzle, K-major: lbo unused, sbo between 8-row groups). The caller sets
/// the swizzle mode (bits 62-63).
__device__ __forceinline__ std::uint64_t smem_desc(unsigned addr, unsigned lbo, unsigned sbo) {
  return static_cast<std::uint64_t>((addr >> 4) & 0x3fffu) | (static_cast<std::uint64_t>((lbo >> 4) & 0x3fffu) << 16) |
         (static_cast<std::uint64_t>((sbo >> 4) & 0x3fffu) << 32);
}

/// Descriptor of a K-major operand in 128-byte-swizzle atoms (8-row groups 1024 bytes apart)
/// starting at shared address `addr` (a k16 step inside an atom: + 32 bytes).
__device__ __forceinline__ std::uint64_t smem_desc_sw128(unsigned addr) {
  return smem_desc(addr, 16, 1024) | (1ull << 62);
}

// mbarriers of one CTA (shared-window addresses), for the warp-specialised kernel's stages (their
// wait: mbar_wait, tc_device.cuh).
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#else
  (void)bar, (void)count;
  __trap();
#endif
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#else
  (void)bar;
  __trap();
#endif
}
/// Tensor-memory-accelerator copy of the 2D box at (c0, c1) of the tensor map `map` (a kernel
/// parameter) to shared address `dst` of this CTA, completing on the mbarrier `bar`, whose
/// current phase first expects `bytes` more (the box's size).
__device__ __forceinline__ void tma_load_2d(unsigned dst, const void* map, int c0, int c1, unsigned bar,
                                            unsigned bytes) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
#else
  (void)dst, (void)map, (void)c0, (void)c1, (void)bar, (void)bytes;
  __trap();
#endif
}
/// bar.sync on named barrier `id` (1..15) for `threads` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
/// stmatrix .x4: the four 8x8 b16 matrices of registers r[0..3] (lane l: row l / 4, columns
/// 2 (l % 4) .. + 1 of each, as an mma A fragment) to the rows whose shared addresses lanes
/// 8i .. 8i + 7 give for matrix i.
__device__ __forceinline__ void stmatrix_x4(unsigned addr, std::uint32_t r0, std::uint32_t r1, std::uint32_t r2,
                                            std::uint32_t r3) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
#else
  (void)addr, (void)r0, (void)r1, (void)r2, (void)r3;
  __trap();
#endif
}

}  // namespace exl2::detail::cuda
