// exl2::QMatrix: a quantized weight matrix that owns its memory.
//
// A QMatrix is built from views of a checkpoint's tensors (host or device memory),
// validates them completely, and copies/repacks them into memory it owns on its
// target device. It never keeps a pointer to caller memory and never writes to it,
// so the caller may free its tensors right after construction. Move-only; the
// destructor (or close()) frees everything.
//
// All work is issued on the stream the caller passes (CUDA); CPU work runs on the
// calling thread (plus worker threads it joins before returning).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "exl2/error.hpp"
#include "exl2/format.hpp"
#include "exl2/tensor.hpp"

// The CUDA runtime declares cudaStream_t exactly like this; repeating the typedef
// keeps this header free of CUDA includes while staying compatible with them.
typedef struct CUstream_st* cudaStream_t;

namespace exl2 {

/// Build information and device discovery.
bool built_with_cuda() noexcept;
/// The CUDA architectures the kernels were compiled for, e.g. "75-real;90-real" ("" without CUDA).
const char* cuda_architectures() noexcept;
/// Number of usable CUDA devices (0 when built without CUDA or when no driver/device).
int cuda_device_count() noexcept;
/// Throws Unsupported unless CUDA device `index` can run exl2's kernels: built with CUDA,
/// a driver and the device present, compute capability 7.5 or newer.
void check_cuda_device(int index);
/// Library version string, e.g. "0.1.0".
const char* version() noexcept;

class QMatrix {
 public:
  /// Build from EXL2 tensors onto `device`. `stream` orders the uploads for CUDA
  /// targets (and device-resident inputs); construction returns once its copies are done.
  static QMatrix from_exl2(const Exl2Weights& w, Device device, cudaStream_t stream = nullptr);
  /// Build from GPTQ tensors (w.bits = 2, 3, 4 or 8) onto `device`.
  static QMatrix from_gptq(const GptqWeights& w, Device device, cudaStream_t stream = nullptr);
  /// Build from AWQ 4-bit (GEMM packing) tensors onto `device`.
  static QMatrix from_awq(const AwqWeights& w, Device device, cudaStream_t stream = nullptr);

  QMatrix(QMatrix&&) noexcept;
  QMatrix& operator=(QMatrix&&) noexcept;
  QMatrix(const QMatrix&) = delete;
  QMatrix& operator=(const QMatrix&) = delete;
  ~QMatrix();

  std::int64_t in_features() const;   // K
  std::int64_t out_features() const;  // N
  Format format() const;
  Device device() const;
  bool has_bias() const;
  /// Average stored bits per weight (codes + scales + zeros), as in checkpoints.
  double bits_per_weight() const;
  /// Bytes this QMatrix owns on its device.
  std::size_t nbytes() const;
  /// True when the codes are held in the tensor-core stream layout: CUDA devices of compute
  /// capability 9.0+ (thread-block clusters), and 8.0+ with EXL2_CUDA_TC=1 in the environment at
  /// construction (EXL2_CUDA_TC=0: never); gemm() then runs the tensor-core kernels for every m.
  /// False on the CPU and in the canonical layout, whose GEMV / fused kernels serve the same calls.
  bool tensor_core_layout() const;

  /// out[K, N] (contiguous, on device()) = the dequantized weight W in out's dtype,
  /// Float16 or BFloat16: W_T[k, n] = round_T((q - z) * s), where (q - z) is a small exact
  /// integer and s the fp16 scale, so the fp32 product is exact and rounded once (to
  /// nearest even). Float16 output is bit-exact with the reference kernels.
  void dequantize(const MutableTensorView& out, cudaStream_t stream = nullptr) const;

  /// out[M, N] = x[M, K] @ W (+ bias) with float32 accumulation. x and out are contiguous,
  /// on device(), and have the same dtype T, Float16 or BFloat16:
  ///   out = round_T(sum_k x[k] * W_T[k, n] (+ float(bias[n]))), one rounding at the end;
  /// W_T is the weight dequantize() returns in T. Except: M <= 16 in the tensor-core layout
  /// (tensor_core_layout(); M <= 8 with EXL2_CUDA_T16=0 at construction) applies the scales in
  /// float32 to each group's float32 sums of x[k] * (q - z) and so multiplies by the exact
  /// weight (q - z) * s, unrounded (either dtype; for BFloat16 x beyond about 1e36 a group's
  /// sum can overflow float32 where the exact result is finite):
  ///   out = round_T(sum_groups s[g, n] * sum_{k in g} x[k] * (q - z)[k, n] (+ float(bias[n]))).
  /// out is fully written.
  void gemm(const TensorView& x, const MutableTensorView& out, cudaStream_t stream = nullptr) const;

  /// Release the owned memory. Any later call except closed() throws InvalidArgument.
  /// Thread-safe: calls already running on other threads finish first (they hold the
  /// memory until they return), then it is freed.
  void close() noexcept;
  bool closed() const noexcept;

  struct Impl;  // defined in src/core

 private:
  explicit QMatrix(std::shared_ptr<Impl> impl) noexcept;
  /// The owned state, kept alive for the caller's duration even if another thread
  /// calls close() meanwhile (throws InvalidArgument once closed).
  std::shared_ptr<const Impl> impl(const char* what) const;
  std::shared_ptr<Impl> impl_;  // accessed with std::atomic_load/atomic_store
};

}  // namespace exl2
