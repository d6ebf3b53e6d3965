// Internal: the experimental tensor-core kernel for small m (tc_gemm.cu, tc_layout.hpp).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/device_layer.cuh"

namespace exl2::detail::cuda {

/// The m range gemm() sends to the tc kernel when a layer has the tc layout. m = 1 and 2 stay
/// on the GEMV kernel: at m = 2 it measured faster on 5 of 7 layers (H100, e.g. 4096x4096
/// GPTQ-4 13.5 against 17.3 us, EXL2 4.5 bpw 8192x28672 101.8 against 112.5; the tc kernel
/// wins only on the 4-bit 8192x28672 layers, 77 against 83 us). From m = 3 the tc kernel's
/// time is flat up to m = 16 and 1.3-5x below the default path's (GEMV, or from m = 13 the
/// Python API's dequantize + cuBLAS route).
constexpr int kTcMinRows = 3;
constexpr int kTcMaxRows = 64;

/// True when EXL2_CUDA_TC=1 is set (read at each construction): build the tc layout.
bool tc_requested() noexcept;

/// Adds the tc layout to a built layer (compute capability 8.0+, else a no-op). Needs
/// layer.qweight and layer.chunks on the device; `chunks_host` is the chunk table.
/// Synchronises the stream.
void build_tc_layout(DeviceLayer& layer, const std::vector<int4>& chunks_host, cudaStream_t stream);

/// True when the layer has the tc layout and gemm() should use it for m rows.
bool tc_usable(const DeviceLayer& layer, std::int64_t m) noexcept;

/// out[m, N] = x[m, K] @ W (+ bias) for 1 <= m <= kTcMaxRows; requires tc_usable.
void launch_tc(const DeviceLayer& layer, const __half* x, std::int64_t m, __half* out, cudaStream_t stream);

}  // namespace exl2::detail::cuda
