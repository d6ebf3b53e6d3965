// Internal: argument checks shared by the validators. Each throws TypeMismatch for a
// wrong dtype and InvalidArgument for anything else, with a message that starts with
// the argument's name, says what was expected and what was given.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "exl2/error.hpp"
#include "exl2/qmatrix.hpp"
#include "exl2/tensor.hpp"

namespace exl2::detail {

// Messages are built with std::string and std::to_string, not iostreams: the library
// is linked into processes (e.g. Python with torch) whose loaded libstdc++ may differ
// from the one it was compiled against, and iostream/locale internals are where such
// mismatches crash (seen on the GPU machine: a segfault formatting an integer).
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, const char* v) { s += v; }
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

template <typename... Parts>
[[noreturn]] void fail_value(const Parts&... parts) {
  throw InvalidArgument(concat(parts...));
}

template <typename... Parts>
[[noreturn]] void fail_type(const Parts&... parts) {
  throw TypeMismatch(concat(parts...));
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
