// CUDA backend: build information, device discovery and checks, small utilities.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "core/cuda_backend.hpp"
#include "cuda/cuda_check.cuh"
#include "cuda/device_layer.cuh"
#include "cuda/tc_gemm.cuh"

#ifndef EXL2_CUDA_ARCHS_STRING
#define EXL2_CUDA_ARCHS_STRING "unknown"
#endif

namespace exl2::detail::cuda {

namespace {

/// flag[0] = 1 if any of the `count` fp16 values (as raw bits) is Inf or NaN.
/// Racing plain stores of the same value 1 are benign (construction-time check only).
__global__ void all_finite_kernel(const std::uint16_t* __restrict__ p, std::int64_t count, int aligned16,
                                  int* __restrict__ flag) {
  const std::int64_t tid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  bool bad = false;
  std::int64_t tail = 0;
  if (aligned16) {
    const std::int64_t nvec = count / 8;
    const uint4* v = reinterpret_cast<const uint4*>(p);
    for (std::int64_t i = tid; i < nvec; i += stride) {
      const uint4 u = __ldg(v + i);
      const std::uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        bad |= (w[j] & 0x7c00u) == 0x7c00u;
        bad |= (w[j] & 0x7c000000u) == 0x7c000000u;
      }
    }
    tail = nvec * 8;
  }
  for (std::int64_t i = tail + tid; i < count; i += stride) bad |= (__ldg(p + i) & 0x7c00u) == 0x7c00u;
  if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1;
}

}  // namespace

bool compiled() noexcept { return true; }

const char* architectures() noexcept { return EXL2_CUDA_ARCHS_STRING; }

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n < 0 ? 0 : n;
}

void check_device(int device) {
  int n = 0;
  const cudaError_t st = cudaGetDeviceCount(&n);
  if (st != cudaSuccess) {
    (void)cudaGetLastError();
    throw Unsupported(std::string("no CUDA device available (cudaGetDeviceCount: ") + cudaGetErrorString(st) +
                      "); cannot use cuda:" + std::to_string(device));
  }
  if (n <= 0) throw Unsupported("no CUDA device available; cannot use cuda:" + std::to_string(device));
  if (device < 0 || device >= n) {
    throw Unsupported("no CUDA device with index " + std::to_string(device) + " (" + std::to_string(n) +
                      " CUDA device(s) visible)");
  }
  int major = 0, minor = 0;
  EXL2_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  EXL2_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major * 10 + minor < 75) {
    throw Unsupported("exl2 requires compute capability 7.5 or newer, device " + std::to_string(device) + " has " +
                      std::to_string(major) + "." + std::to_string(minor));
  }
  // Is there a kernel image (cubin or PTX) this device can run?
  {
    DeviceGuard guard(device);
    cudaFuncAttributes attr{};
    const cudaError_t fs = cudaFuncGetAttributes(&attr, all_finite_kernel);
    if (fs == cudaErrorInvalidDeviceFunction || fs == cudaErrorNoKernelImageForDevice) {
      (void)cudaGetLastError();
      throw Unsupported("exl2's CUDA kernels were not compiled for device " + std::to_string(device) +
                        " (compute capability " + std::to_string(major) + "." + std::to_string(minor) +
                        "); built for CUDA architectures: " + EXL2_CUDA_ARCHS_STRING);
    }
    if (fs != cudaSuccess) throw_cuda_error(fs, "cudaFuncGetAttributes(all_finite_kernel)", __FILE__, __LINE__);
  }
}

int pointer_device(const void* p) {
  if (p == nullptr) return -1;
  if (device_count() == 0) return -1;  // without devices nothing can be device memory
  cudaPointerAttributes attr{};
  EXL2_CUDA_CHECK(cudaPointerGetAttributes(&attr, p));
  switch (attr.type) {
    case cudaMemoryTypeDevice:
    case cudaMemoryTypeManaged:
      return attr.device;
    default:  // cudaMemoryTypeUnregistered, cudaMemoryTypeHost (pinned)
      return -1;
  }
}

void copy_to_host(void* dst, const void* src, std::size_t bytes, int device, cudaStream_t stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  EXL2_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
  EXL2_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void DeviceLayerDeleter::operator()(DeviceLayer* p) const noexcept { delete p; }

std::size_t nbytes(const DeviceLayer& layer) noexcept { return layer.total_bytes(); }

bool tensor_core_layout(const DeviceLayer& layer) noexcept { return has_tc_layout(layer); }

void check_layer_meta(const DeviceLayer& layer, const LayerMeta& meta, const char* what) {
  if (layer.K != meta.K || layer.N != meta.N || layer.G != meta.G || layer.Q != meta.Q) {
    throw InvalidArgument(std::string("internal error in ") + what +
                          ": the layer metadata does not match the device layer it was built with");
  }
}

bool all_finite_f16(const void* p, std::size_t count, int device, cudaStream_t stream) {
  if (count == 0) return true;
  DeviceGuard guard(device);
  DeviceBuffer<int> flag(1, "the all_finite_f16 result flag");
  StreamSyncOnExit sync_on_error(stream);
  EXL2_CUDA_CHECK(cudaMemsetAsync(flag.get(), 0, sizeof(int), stream));
  const int aligned16 = (reinterpret_cast<std::uintptr_t>(p) % 16) == 0 ? 1 : 0;
  const int threads = 256;
  const std::int64_t per_thread_items = aligned16 ? 8 : 1;
  const unsigned blocks =
      grid_for((static_cast<std::int64_t>(count) + per_thread_items - 1) / per_thread_items, threads, 4096);
  all_finite_kernel<<<blocks, threads, 0, stream>>>(static_cast<const std::uint16_t*>(p),
                                                     static_cast<std::int64_t>(count), aligned16, flag.get());
  EXL2_CUDA_CHECK_LAUNCH("all_finite_kernel");
  int host_flag = 0;
  EXL2_CUDA_CHECK(cudaMemcpyAsync(&host_flag, flag.get(), sizeof(int), cudaMemcpyDeviceToHost, stream));
  EXL2_CUDA_CHECK(cudaStreamSynchronize(stream));
  sync_on_error.disarm();
  return host_flag == 0;
}

}  // namespace exl2::detail::cuda
