// Internal: the experimental tensor-core kernels on the tc stream layout (tc_gemm.cu: mma.sync,
// m <= 64; tc_wgmma.cu: wgmma on Hopper, larger m; tc_layout.hpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/device_layer.cuh"

namespace exl2::detail::cuda {

/// The m range gemm() sends to the tc kernel when a layer has the tc layout: kTcMinRows ..
/// kTcMaxRows, and m = 1 on layers with at least one 128-column tile per multiprocessor or,
/// where clusters of 16 run, at least kTcLongK chunks (K >= 8192; tc_usable). Measured on an
/// H200 (GPTQ-4 and EXL2 2.5/4.0/4.5/6.0 bpw on the four bench shapes,
/// `EXL2_CUDA_TC_MIN_ROWS=1`, against the GEMV in the same session): at m = 2 the tc
/// kernel was faster on 18 of 20 layers and level on 2 (e.g. 14336x4096 GPTQ-4 26.9 against
/// 33.1 us, 8192x28672 64.8 against 83.8); at m = 1 it was 5-9% faster on the five 8192x28672
/// layers (224 tiles; GPTQ-4 64.6 against 69.7 us) and 2-3 us slower on the 32- and
/// 112-tile layers (4096x4096 GPTQ-4 12.0 against 9.4 us: the activation gather's extra launch
/// and the pipeline's fill are not hidden on a short K range). bfloat16 the same way (H100:
/// m = 2 4096x4096 14.0 against 14.9 us, 8192x28672 80.2 against 101.9; m = 1 4096x4096 14.0
/// against 11.7).
constexpr int kTcMinRows = 2;
/// With clusters of 16 (tc_gemm.cu) the tc kernel also won at m = 1 on 14336x4096 (H200, GPTQ-4
/// and EXL2 2.5/4.0/4.5/6.0 bpw: 22.1-31.0 against 24.5-34.6 us for the GEMV), not on 4096x4096
/// (11.3-13.5 against 9.4-12.0): a block's K range must be long enough to amortise the gather
/// launch and the pipeline's fill.
constexpr int kTcLongK = 256;  // chunks of 32 rows
/// The mma.sync kernel's largest m; above it the wgmma kernel (tc_wgmma.cu) serves any m where the
/// layer has it (compute capability 9.0, sm_90a build: layer.tc_wgmma), else the default kernels.
constexpr int kTcMaxRows = 64;
/// Where the layer has the wgmma kernel, it serves m from here on: its 64-row tiles beat the
/// mma.sync kernel's at m = 33 and 64 on the four bench shapes (H200, GPTQ-4, same session:
/// 8192x28672 121.8 / 131.9 against 132.0 / 137.1 us, 14336x4096 44.5 / 49.2 against 50.2 / 52.4,
/// 4096x4096 19.4 / 20.7 against 20.7 / 21.5; H100, 8192x28672 m = 64: 131.8 against 136).
constexpr int kTcWgmmaMinRows = 33;

/// True when EXL2_CUDA_TC=1 is set (read at each construction): build the tc layout.
bool tc_requested() noexcept;

/// Adds the tc layout to a built layer (compute capability 8.0+, else a no-op). Needs
/// layer.qweight and layer.chunks on the device; `chunks_host` is the chunk table.
/// Synchronises the stream.
void build_tc_layout(DeviceLayer& layer, const std::vector<int4>& chunks_host, cudaStream_t stream);

/// True when the layer has the tc layout and gemm() should use it for m rows (m <= kTcMaxRows, or
/// any m with the wgmma kernel).
bool tc_usable(const DeviceLayer& layer, std::int64_t m) noexcept;

/// out[m, N] = x[m, K] @ W (+ bias) for the m of tc_usable, float16 or bfloat16 (the weights
/// rounded to x's type as dequantize() gives them, fp32 accumulation); requires tc_usable.
void launch_tc(const DeviceLayer& layer, const __half* x, std::int64_t m, __half* out, cudaStream_t stream);
void launch_tc(const DeviceLayer& layer, const __nv_bfloat16* x, std::int64_t m, __nv_bfloat16* out,
               cudaStream_t stream);

}  // namespace exl2::detail::cuda
