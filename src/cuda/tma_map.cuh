// Internal: tensor-memory-accelerator (TMA) descriptors of the gathered activations, shared by the
// Hopper wgmma kernels (tc_wgmma.cu, tc_wgmma_ws.cu). Encoded on the host per call, passed to the
// kernel as a __grid_constant__ parameter (so a CUDA graph captures it by value).
#pragma once

#include <cuda.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace exl2::detail::cuda {

/// True where the driver can encode tensor maps (cuTensorMapEncodeTiled, looked up through the
/// runtime: the library does not link libcuda); the kernels that read by TMA are used only then.
bool tma_available();

/// The TMA descriptor of the gathered activations xp [m, ldxp] (16-bit values; ldxp a multiple of
/// 8, xp 16-byte aligned) for boxes of 64 columns x `rows` rows in the 128-byte swizzle layout
/// that wgmma's K-major B operand reads (8-row groups of 1024 bytes, piece c of row r at
/// 16 (c ^ (r & 7))); reads past the tensor's edges return zeros.
CUtensorMap make_activation_map(const __half* xp, std::int64_t m, std::int64_t ldxp, int rows);

}  // namespace exl2::detail::cuda
