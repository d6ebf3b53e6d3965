// Internal: the Hopper (sm_90a) wgmma kernel on the tc stream layout, for larger m
// (tc_wgmma.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device_layer.cuh"

namespace exl2::detail::cuda {

/// Fills layer.tc_wgmma and layer.tc_wgmma_blocks_per_sm (at construction, after the tc layout
/// was built): true on compute capability 9.0 when the build holds the kernel's sm_90a code.
void query_tc_wgmma(DeviceLayer& layer);

/// out[m, N] = xp @ W (+ bias) with wgmma, m rows of the gathered activations `xp` (chunk-padded,
/// row stride ldxp, as tc_gather_x_kernel writes them; values of type T); requires
/// layer.tc_wgmma. Rounds the weights like dequantize(T) and accumulates in fp32, in a fixed order.
void launch_tc_wgmma(const DeviceLayer& layer, const __half* xp, std::int64_t m, std::int64_t ldxp, __half* out,
                     cudaStream_t stream);
void launch_tc_wgmma(const DeviceLayer& layer, const __half* xp, std::int64_t m, std::int64_t ldxp,
                     __nv_bfloat16* out, cudaStream_t stream);

}  // namespace exl2::detail::cuda
