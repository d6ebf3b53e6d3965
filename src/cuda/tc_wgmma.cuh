// Internal: the Hopper (sm_90a) wgmma kernel on the tc stream layout, for larger m
// (tc_wgmma.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/device_layer.cuh"

namespace exl2::detail::cuda {

/// Fills layer.tc_wgmma and layer.tc_wgmma_blocks_per_sm (at construction, after the tc layout
/// was built): true on compute capability 9.0 when the build holds the kernel's sm_90a code.
void query_tc_wgmma(DeviceLayer& layer);

/// Stream-K for one call: `blocks` = tc_wgmma_stream_k_blocks(layer, m) (0: none), and where it
/// is > 0 the call's scratch for it: two partial tiles of 64 x 128 floats per block, and one
/// counter per column tile, which must be zero when the kernel starts (the activation gather
/// zeroes them).
struct WgmmaStreamK {
  int blocks = 0;
  float* partials = nullptr;
  int* counters = nullptr;
};

/// The blocks of the stream-K launch for m rows on this layer, or 0 where the kernel runs one
/// tile (or a cluster's share of one) per block.
int tc_wgmma_stream_k_blocks(const DeviceLayer& layer, std::int64_t m);
/// Floats of WgmmaStreamK::partials for a launch of `blocks` blocks.
constexpr std::size_t tc_wgmma_stream_k_floats(int blocks) { return static_cast<std::size_t>(blocks) * 2 * 64 * 128; }

/// out[m, N] = xp @ W (+ bias) with wgmma, m rows of the gathered activations `xp` (chunk-padded,
/// row stride ldxp, as tc_gather_x_kernel writes them; values of type T); requires
/// layer.tc_wgmma, and `sk` as tc_wgmma_stream_k_blocks(layer, m) gives. Rounds the weights like
/// dequantize(T) and accumulates in fp32, in a fixed order.
void launch_tc_wgmma(const DeviceLayer& layer, const __half* xp, std::int64_t m, std::int64_t ldxp, __half* out,
                     const WgmmaStreamK& sk, cudaStream_t stream);
void launch_tc_wgmma(const DeviceLayer& layer, const __half* xp, std::int64_t m, std::int64_t ldxp,
                     __nv_bfloat16* out, const WgmmaStreamK& sk, cudaStream_t stream);

}  // namespace exl2::detail::cuda
