#include "exl2/format.hpp"
#include "exl2/tensor.hpp"

namespace exl2 {

std::size_t dtype_size(DType t) noexcept {
  switch (t) {
    case DType::UInt8: return 1;
    case DType::Int16:
    case DType::Float16:
    case DType::BFloat16: return 2;
    case DType::Int32:
    case DType::Float32: return 4;
    case DType::Int64: return 8;
    default: return 0;
  }
}

const char* dtype_name(DType t) noexcept {
  switch (t) {
    case DType::Int16: return "int16";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::UInt8: return "uint8";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float32: return "float32";
    default: return "unsupported dtype";
  }
}

const char* format_name(Format f) noexcept {
  switch (f) {
    case Format::EXL2: return "exl2";
    case Format::GPTQ: return "gptq";
    case Format::AWQ: return "awq";
  }
  return "unknown";
}

std::string Device::str() const {
  return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
}

std::int64_t TensorView::numel() const noexcept {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

bool TensorView::is_contiguous() const noexcept {
  if (strides.empty() || numel() == 0) return true;  // nothing is addressed in an empty tensor
  if (strides.size() != shape.size()) return false;
  std::int64_t expected = 1;
  for (int i = ndim() - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::string s = "[";  // no iostreams in the library (see core/check.hpp)
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace exl2
