// Internal: the library's environment knobs (measurement and test switches such as
// EXL2_CUDA_MAX_SPLIT or EXL2_CPU_THREADS, read when a layer is built or a CPU call runs), parsed
// in one place so that every knob accepts the same spellings. Header-only, no CUDA: the CUDA
// backend, the CPU backend and the host tests (tests/cpp/test_env_knob.cpp) share it.
#pragma once

#include <cstdlib>
#include <cstring>
#include <optional>

namespace exl2::detail::env {

/// The value of the environment variable `name` as a decimal integer: the whole value, an optional
/// '-' then 1 to 9 digits (so no overflow); nullopt when unset or anything else ("", "8x", " 8",
/// "+8", "0x10").
inline std::optional<int> integer(const char* name) noexcept {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  const bool negative = v[0] == '-';
  const char* d = negative ? v + 1 : v;
  const std::size_t n = std::strlen(d);
  if (n == 0 || n > 9) return std::nullopt;
  int r = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (d[i] < '0' || d[i] > '9') return std::nullopt;
    r = 10 * r + (d[i] - '0');
  }
  return negative ? -r : r;
}

/// integer(name) when it lies in lo .. hi, else `fallback`.
inline int integer_in(const char* name, int lo, int hi, int fallback) noexcept {
  const std::optional<int> v = integer(name);
  return (v && *v >= lo && *v <= hi) ? *v : fallback;
}

/// Whether the environment variable `name` is set to exactly `value`.
inline bool equals(const char* name, const char* value) noexcept {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

/// Whether the switch `name` is on: set to a value that is neither empty nor starts with '0'
/// ("1", "yes"; not "", "0").
inline bool flag(const char* name) noexcept {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

}  // namespace exl2::detail::env
