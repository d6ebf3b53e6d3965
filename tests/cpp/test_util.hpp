// Shared by the C++ test executables (each includes it once): a failure counter, CHECK,
// EXPECT_THROW (type and message fragment of an expected exception) and a TensorView over
// a std::vector. No test framework, so a bare CMake build can run the tests.
#pragma once

#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "exl2/exl2.hpp"

static int g_failures = 0;
#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                                 \
    }                                                                               \
  } while (0)

template <typename E>
static void expect_throw(const std::function<void()>& fn, const std::string& needle, int line) {
  try {
    fn();
  } catch (const E& e) {
    if (std::string(e.what()).find(needle) == std::string::npos) {
      std::fprintf(stderr, "line %d: message '%s' lacks '%s'\n", line, e.what(), needle.c_str());
      ++g_failures;
    }
    return;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "line %d: wrong exception type: %s\n", line, e.what());
    ++g_failures;
    return;
  }
  std::fprintf(stderr, "line %d: no exception (expected one mentioning '%s')\n", line, needle.c_str());
  ++g_failures;
}
#define EXPECT_THROW(E, stmt, needle) expect_throw<E>([&] { stmt; }, needle, __LINE__)

template <typename T>
static exl2::TensorView view(const std::vector<T>& v, std::vector<std::int64_t> shape, exl2::DType dt) {
  exl2::TensorView t;
  t.data = v.data();
  t.dtype = dt;
  t.shape = std::move(shape);
  return t;
}
