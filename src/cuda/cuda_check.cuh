// Internal helpers of the CUDA backend: error checking, a device guard and an owning
// device buffer. Every CUDA runtime call goes through EXL2_CUDA_CHECK, every kernel
// launch is followed by EXL2_CUDA_CHECK_LAUNCH.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "exl2/error.hpp"

namespace exl2::detail::cuda {

/// File name without its directories (keeps messages short).
inline const char* short_file(const char* path) noexcept {
  const char* base = path;
  for (const char* p = path; *p; ++p)
    if (*p == '/' || *p == '\\') base = p + 1;
  return base;
}

/// Throws CudaError naming `what` (the call), its location and the CUDA error string.
/// Also clears the runtime's (non-sticky) last error so that a later
/// cudaGetLastError() does not report this failure a second time.
[[noreturn]] inline void throw_cuda_error(cudaError_t status, const std::string& what, const char* file,
                                          int line) {
  (void)cudaGetLastError();
  std::string msg = "CUDA error: " + what + " failed at " + short_file(file) + ":" + std::to_string(line) +
                    ": " + cudaGetErrorString(status) + " (" + cudaGetErrorName(status) + ")";
  throw CudaError(msg);
}

inline void check_status(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess) throw_cuda_error(status, what, file, line);
}

}  // namespace exl2::detail::cuda

/// Checks a CUDA runtime call; throws exl2::CudaError naming the call on failure.
#define EXL2_CUDA_CHECK(call) ::exl2::detail::cuda::check_status((call), #call, __FILE__, __LINE__)
/// Checks the launch of the kernel just issued (configuration errors, missing image, ...).
#define EXL2_CUDA_CHECK_LAUNCH(kernel_name) \
  ::exl2::detail::cuda::check_status(cudaGetLastError(), "launch of kernel " kernel_name, __FILE__, __LINE__)

namespace exl2::detail::cuda {

/// The driver entry point `symbol` with the ABI it had in CUDA `version` (e.g. 12000 for the
/// PFN_*_v12000 types), looked up through the runtime so that the library does not link libcuda;
/// nullptr (and the runtime's error state cleared) where the driver lacks it. The versioned
/// lookup (CUDA 12.5+) pins the ABI the caller casts to; the unversioned one, deprecated in CUDA
/// 13, returns the newest version of the symbol, whatever its signature.
inline void* driver_entry_point(const char* symbol, unsigned version) noexcept {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
  const cudaError_t st = cudaGetDriverEntryPointByVersion(symbol, &fn, version, cudaEnableDefault, &found);
#else
  (void)version;
  const cudaError_t st = cudaGetDriverEntryPoint(symbol, &fn, cudaEnableDefault, &found);
#endif
  if (st != cudaSuccess || found != cudaDriverEntryPointSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  return fn;
}

/// True if `device` already has an active primary context. Going back to a device
/// without one would create it (hundreds of MiB on a GPU the caller never used), so the
/// guards only restore such a device when it is already initialised, as PyTorch does.
/// The driver entry point is looked up through the runtime, so the library does not
/// link libcuda (it must load on machines without a driver).
inline bool device_has_primary_context(int device) noexcept {
  using GetState = int (*)(int, unsigned int*, int*);  // CUresult (CUdevice, unsigned*, int*)
  void* fn = driver_entry_point("cuDevicePrimaryCtxGetState", 12000);
  if (fn == nullptr) return true;  // unknown: restore as usual
  unsigned int flags = 0;
  int active = 0;
  if (reinterpret_cast<GetState>(fn)(device, &flags, &active) != 0) return true;
  return active != 0;
}

/// Makes `device` current for the lifetime of the guard and restores the previously
/// current device afterwards (only calls cudaSetDevice when they differ, and only
/// restores a device that already has a context).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    EXL2_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      EXL2_CUDA_CHECK(cudaSetDevice(device));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_ && device_has_primary_context(previous_)) {
      if (cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

/// Same as DeviceGuard but never throws (for destructors): failures are ignored.
class NoThrowDeviceGuard {
 public:
  explicit NoThrowDeviceGuard(int device) noexcept {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      (void)cudaGetLastError();
      return;
    }
    if (previous_ != device) {
      if (cudaSetDevice(device) == cudaSuccess)
        switched_ = true;
      else
        (void)cudaGetLastError();
    }
  }
  ~NoThrowDeviceGuard() {
    if (switched_ && device_has_primary_context(previous_) && cudaSetDevice(previous_) != cudaSuccess)
      (void)cudaGetLastError();
  }
  NoThrowDeviceGuard(const NoThrowDeviceGuard&) = delete;
  NoThrowDeviceGuard& operator=(const NoThrowDeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

/// Owning buffer of `count` elements of T in device memory of the current device.
/// cudaMalloc failures throw CudaError naming the buffer and its size; the destructor
/// frees and never throws. Move-only.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() noexcept = default;
  DeviceBuffer(std::size_t count, const char* name) { allocate(count, name); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      count_ = std::exchange(o.count_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  /// Allocates `count` elements (frees what was held before). count == 0 holds nothing.
  void allocate(std::size_t count, const char* name) {
    release();
    if (count == 0) return;
    void* p = nullptr;
    const std::size_t bytes = count * sizeof(T);
    const cudaError_t st = cudaMalloc(&p, bytes);
    if (st != cudaSuccess) {
      throw_cuda_error(st,
                       std::string("cudaMalloc of ") + std::to_string(bytes) + " bytes for " + name,
                       __FILE__, __LINE__);
    }
    ptr_ = static_cast<T*>(p);
    count_ = count;
  }
  void release() noexcept {
    if (ptr_ != nullptr) {
      if (cudaFree(ptr_) != cudaSuccess) (void)cudaGetLastError();
      ptr_ = nullptr;
      count_ = 0;
    }
  }

  T* get() const noexcept { return ptr_; }
  std::size_t size() const noexcept { return count_; }
  std::size_t bytes() const noexcept { return count_ * sizeof(T); }
  bool empty() const noexcept { return ptr_ == nullptr; }

 private:
  T* ptr_ = nullptr;
  std::size_t count_ = 0;
};

/// Synchronises `stream` when destroyed while armed (used on exception paths so that
/// buffers are not freed while asynchronous work may still use them). Never throws.
class StreamSyncOnExit {
 public:
  explicit StreamSyncOnExit(cudaStream_t s) noexcept : stream_(s) {}
  ~StreamSyncOnExit() {
    if (armed_ && cudaStreamSynchronize(stream_) != cudaSuccess) (void)cudaGetLastError();
  }
  void disarm() noexcept { armed_ = false; }
  StreamSyncOnExit(const StreamSyncOnExit&) = delete;
  StreamSyncOnExit& operator=(const StreamSyncOnExit&) = delete;

 private:
  cudaStream_t stream_;
  bool armed_ = true;
};

/// Grid size for a grid-stride loop over `total` items with `threads` per block.
inline unsigned grid_for(std::int64_t total, int threads, std::int64_t max_blocks = 65535LL * 16) {
  std::int64_t blocks = (total + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned>(blocks);
}

}  // namespace exl2::detail::cuda
