// Internal: argument checks shared by the validators. Each throws TypeMismatch for a
// wrong dtype and InvalidArgument for anything else, with a message that starts with
// the argument's name, says what was expected and what was given.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "exl2/error.hpp"
#include "exl2/qmatrix.hpp"
#include "exl2/tensor.hpp"

namespace exl2::detail {

template <typename... Parts>
[[noreturn]] void fail_value(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw InvalidArgument(os.str());
}

template <typename... Parts>
[[noreturn]] void fail_type(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw TypeMismatch(os.str());
}

inline bool present(const TensorView& t) noexcept { return t.data != nullptr || !t.shape.empty(); }

/// dtype, rank, contiguity, non-null data and placement (host or `target`) of a tensor.
void check_tensor(const TensorView& t, const char* name, DType dtype, int ndim, Device target);
/// shape[dim] == expected ("q_scale: expected shape [G, N/8] = [3, 16], got [3, 15]").
void check_shape(const TensorView& t, const char* name, const std::vector<std::int64_t>& expected,
                 const char* symbolic);

/// Copy a small validated tensor (host or device memory) into a host vector.
template <typename T>
std::vector<T> read_small(const TensorView& t, cudaStream_t stream);

/// perm must be a permutation of 0..K-1 (checked in O(K)).
void check_permutation(const std::vector<std::int32_t>& perm, const char* name);

}  // namespace exl2::detail
