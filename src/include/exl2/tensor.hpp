// Non-owning views of caller memory, used only for the duration of one call.
//
// A TensorView describes a tensor the caller owns: a data pointer, a dtype, a shape,
// strides in elements (row-major contiguous tensors have strides {.., shape[-1], 1};
// an empty strides vector means "contiguous") and the device the memory lives on.
// exl2 never keeps a TensorView past the call that received it and never writes
// through a const view.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace exl2 {

enum class DType : std::uint8_t { Int16, Int32, Int64, UInt8, Float16, BFloat16, Float32, Other };

/// Size of one element in bytes (0 for DType::Other).
std::size_t dtype_size(DType t) noexcept;
/// Lower-case name, e.g. "int32", "float16".
const char* dtype_name(DType t) noexcept;

enum class DeviceKind : std::uint8_t { CPU, CUDA };

struct Device {
  DeviceKind kind = DeviceKind::CPU;
  int index = 0;  // CUDA ordinal; 0 for CPU

  static Device cpu() noexcept { return {DeviceKind::CPU, 0}; }
  static Device cuda(int index) noexcept { return {DeviceKind::CUDA, index}; }
  bool is_cpu() const noexcept { return kind == DeviceKind::CPU; }
  bool is_cuda() const noexcept { return kind == DeviceKind::CUDA; }
  bool operator==(const Device& o) const noexcept { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const noexcept { return !(*this == o); }
  /// "cpu" or "cuda:N".
  std::string str() const;
};

struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::Other;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> strides;  // in elements; empty = row-major contiguous
  Device device{};

  std::int64_t numel() const noexcept;
  int ndim() const noexcept { return static_cast<int>(shape.size()); }
  bool is_contiguous() const noexcept;
  std::string shape_str() const;  // "[4, 8]"
};

/// A view the callee may write to (outputs such as the GEMM result).
struct MutableTensorView : TensorView {
  void* mutable_data() const noexcept { return const_cast<void*>(data); }
};

}  // namespace exl2
