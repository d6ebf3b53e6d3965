// Internal: the warp-specialised Hopper (sm_90a) wgmma kernel on the tc stream layout, for
// prefill-sized m (tc_wgmma_ws.cu). tc_wgmma.cu chooses between it and the register-operand
// kernel by m (launch_tc_wgmma).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device_layer.cuh"

namespace exl2::detail::cuda {

/// Blocks of the kernel with `rows` (128, 192 or 256; any other count is an internal error)
/// activation rows per block that fit one
/// multiprocessor (sets its shared-memory attribute first); 0 where the driver cannot encode its
/// tensor maps.
int tc_wgmma_ws_blocks_per_sm(int rows);

/// out[m, N] = xp @ W (+ bias), as launch_tc_wgmma, with `rows` (128, 192 or 256) activation rows per block.
void launch_tc_wgmma_ws(const DeviceLayer& layer, const __half* xp, std::int64_t m, std::int64_t ldxp, int rows,
                        __half* out, cudaStream_t stream);
void launch_tc_wgmma_ws(const DeviceLayer& layer, const __half* xp, std::int64_t m, std::int64_t ldxp, int rows,
                        __nv_bfloat16* out, cudaStream_t stream);

}  // namespace exl2::detail::cuda
