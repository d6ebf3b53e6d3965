// Internal: the CUDA backend's entry points, as seen from the C++ core.
//
// This header includes no CUDA headers so that the core compiles without a CUDA
// toolkit. In a build without CUDA (EXL2_CUDA=OFF or no compiler found) these are
// implemented by src/cuda/cuda_disabled.cpp and throw Unsupported("... built without
// CUDA support ..."). All functions switch to the given device for their duration
// and restore the caller's current device afterwards.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "core/layer.hpp"
#include "exl2/qmatrix.hpp"
#include "exl2/tensor.hpp"

namespace exl2::detail::cuda {

bool compiled() noexcept;
const char* architectures() noexcept;
/// 0 when there is no driver or no device (never throws).
int device_count() noexcept;
/// Throws Unsupported when not compiled with CUDA, when `device` does not exist
/// ("no CUDA device ...") or has compute capability below 7.5.
void check_device(int device);
/// The device a pointer lives on (-1 for host memory). Throws CudaError on failure.
int pointer_device(const void* p);

/// Copy `bytes` from `src` (host or device memory) to host memory `dst`, ordered on
/// `stream` and synchronised before returning.
void copy_to_host(void* dst, const void* src, std::size_t bytes, int device, cudaStream_t stream);

/// Device-resident canonical layer (see layer.hpp). Opaque outside src/cuda.
struct DeviceLayer;
struct DeviceLayerDeleter {
  void operator()(DeviceLayer* p) const noexcept;
};
using DeviceLayerPtr = std::unique_ptr<DeviceLayer, DeviceLayerDeleter>;

/// Build the canonical device arrays. `meta` is already validated; for GPTQ,
/// meta.perm gives the row order (permuted row r is checkpoint row perm[r]).
DeviceLayerPtr build_exl2(const LayerMeta& meta, const Exl2Raw& raw, int device, cudaStream_t stream);
DeviceLayerPtr build_gptq(const LayerMeta& meta, const GptqRaw& raw, int device, cudaStream_t stream);
/// Upload canonical host arrays built by the CPU builder (formats built through the host).
DeviceLayerPtr build_canonical(const LayerMeta& meta, const HostArrays& host, int device, cudaStream_t stream);

/// Bytes owned by the layer on the device.
std::size_t nbytes(const DeviceLayer& layer) noexcept;

/// True when the layer holds its codes in the tensor-core stream layout (tc_layout.hpp).
bool tensor_core_layout(const DeviceLayer& layer) noexcept;

/// True if all `count` fp16 values at `p` (device memory of `device`) are finite.
bool all_finite_f16(const void* p, std::size_t count, int device, cudaStream_t stream);

/// out[K, N] (device memory) = W, un-permuted: fp16, or bfloat16 when `bf16`
/// (bf16((q - z) * s), one rounding of the exact fp32 product).
void dequantize(const DeviceLayer& layer, const LayerMeta& meta, void* out, bool bf16, cudaStream_t stream);

/// out[m, N] = x[m, K] @ W (+ bias); x and out both fp16, or both bfloat16 when `bf16`
/// (weights then rounded to bfloat16; in the tc layout at m <= 8 the scales applied in fp32 to
/// the groups' sums instead: QMatrix::gemm). fp32 accumulation, deterministic, out fully
/// written, no host synchronisation (graph-capture safe; the tc kernels' activation scratch is
/// stream-ordered, cudaMallocAsync).
void gemm(const DeviceLayer& layer, const LayerMeta& meta, const void* x, std::int64_t m, void* out, bool bf16,
          cudaStream_t stream);

}  // namespace exl2::detail::cuda
