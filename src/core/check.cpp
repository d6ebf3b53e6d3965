#include "core/check.hpp"

#include <cstring>

#include "core/cuda_backend.hpp"

namespace exl2::detail {

void check_tensor(const TensorView& t, const char* name, DType dtype, int ndim, Device target) {
  if (t.dtype != dtype) {
    fail_type(name, ": expected dtype ", dtype_name(dtype), ", got ", dtype_name(t.dtype));
  }
  if (t.ndim() != ndim) {
    fail_value(name, ": expected a ", ndim, "-D tensor, got ", t.ndim(), "-D with shape ", t.shape_str());
  }
  for (auto d : t.shape) {
    if (d <= 0) fail_value(name, ": expected every dimension to be positive, got shape ", t.shape_str());
  }
  if (!t.is_contiguous()) {
    fail_value(name, ": expected a contiguous (row-major) tensor, got shape ", t.shape_str(),
               " with non-contiguous strides");
  }
  if (t.data == nullptr) fail_value(name, ": data pointer is null");
  if (!t.device.is_cpu() && t.device != target) {
    fail_value(name, ": expected a tensor on the cpu or on ", target.str(), " (the QMatrix's device), got one on ",
               t.device.str());
  }
}

void check_shape(const TensorView& t, const char* name, const std::vector<std::int64_t>& expected,
                 const char* symbolic) {
  if (t.shape != expected) {
    TensorView e;
    e.shape = expected;
    fail_value(name, ": expected shape ", symbolic, " = ", e.shape_str(), ", got ", t.shape_str());
  }
}

template <typename T>
std::vector<T> read_small(const TensorView& t, cudaStream_t stream) {
  std::vector<T> out(static_cast<std::size_t>(t.numel()));
  const std::size_t bytes = out.size() * sizeof(T);
  if (t.device.is_cpu()) {
    std::memcpy(out.data(), t.data, bytes);
  } else {
    cuda::copy_to_host(out.data(), t.data, bytes, t.device.index, stream);
  }
  return out;
}

template std::vector<std::int16_t> read_small(const TensorView&, cudaStream_t);
template std::vector<std::int32_t> read_small(const TensorView&, cudaStream_t);
template std::vector<std::uint16_t> read_small(const TensorView&, cudaStream_t);

void check_permutation(const std::vector<std::int32_t>& perm, const char* name) {
  const std::int64_t K = static_cast<std::int64_t>(perm.size());
  std::vector<char> seen(perm.size(), 0);
  for (std::int64_t i = 0; i < K; ++i) {
    const std::int32_t v = perm[i];
    if (v < 0 || v >= K) {
      fail_value(name, ": expected a permutation of 0..", K - 1, ", but element ", i, " is ", v, " (out of range)");
    }
    if (seen[v]) fail_value(name, ": expected a permutation of 0..", K - 1, ", but value ", v, " appears twice");
    seen[v] = 1;
  }
}

}  // namespace exl2::detail
