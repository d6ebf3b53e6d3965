// A minimal byte consumer with the same semantics as the subset of LLVM's
// FuzzedDataProvider that fuzz_validate.cpp uses (integers are taken from the end of
// the input, most significant byte first, reduced modulo the range). Kept here so the
// harness and the corpus replay build identically with GCC (no libFuzzer headers).
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

class FuzzedDataProvider {
 public:
  FuzzedDataProvider(const std::uint8_t* data, std::size_t size) : data_(data), remaining_(size) {}

  template <typename T>
  T ConsumeIntegralInRange(T min, T max) {
    static_assert(std::is_integral_v<T>, "integral types only");
    if (min > max) return min;  // never happens in the harness
    const std::uint64_t range = static_cast<std::uint64_t>(max) - static_cast<std::uint64_t>(min);
    std::uint64_t result = 0;
    std::size_t offset = 0;
    while (offset < sizeof(T) * CHAR_BIT && (range >> offset) > 0 && remaining_ != 0) {
      --remaining_;
      result = (result << CHAR_BIT) | data_[remaining_];
      offset += CHAR_BIT;
    }
    if (range != std::numeric_limits<std::uint64_t>::max()) result = result % (range + 1);
    return static_cast<T>(static_cast<std::uint64_t>(min) + result);
  }

  template <typename T>
  T ConsumeIntegral() {
    return ConsumeIntegralInRange(std::numeric_limits<T>::min(), std::numeric_limits<T>::max());
  }

  bool ConsumeBool() { return 1 & ConsumeIntegral<std::uint8_t>(); }

  std::size_t remaining_bytes() const { return remaining_; }

 private:
  const std::uint8_t* data_;
  std::size_t remaining_;
};
