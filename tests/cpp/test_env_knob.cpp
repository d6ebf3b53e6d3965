// Tests of the environment-knob parser (src/core/env_knob.hpp) on the host: what every knob of
// the library accepts. Needs no GPU and no CUDA toolkit.
#include <cstdio>
#include <cstdlib>

#include "core/env_knob.hpp"

namespace env = exl2::detail::env;

static int g_failures = 0;

// The variable every case sets (not one the library reads).
constexpr const char* kName = "EXL2_TEST_ENV_KNOB";

static void expect(const char* what, long long got, long long want) {
  if (got != want) {
    std::fprintf(stderr, "%s: got %lld, want %lld\n", what, got, want);
    ++g_failures;
  }
}

static void set(const char* value) {
#ifdef _WIN32
  _putenv_s(kName, value == nullptr ? "" : value);  // "" removes it on Windows
#else
  if (value == nullptr)
    unsetenv(kName);
  else
    setenv(kName, value, 1);
#endif
}

int main() {
  constexpr int kUnset = -12345;
  const auto integer = [&] { return env::integer(kName).value_or(kUnset); };

  set(nullptr);
  expect("unset", integer(), kUnset);
  expect("unset, flag", env::flag(kName), 0);
  expect("unset, equals", env::equals(kName, "0"), 0);
  expect("unset, integer_in", env::integer_in(kName, 1, 8, 7), 7);

  // Whole decimal integers only.
  const struct {
    const char* value;
    long long want;
  } cases[] = {{"8", 8},         {"0", 0},           {"-3", -3},         {"017", 17},      {"123456789", 123456789},
               {"", kUnset},     {"-", kUnset},      {"8x", kUnset},     {" 8", kUnset},   {"8 ", kUnset},
               {"+8", kUnset},   {"0x10", kUnset},   {"1e3", kUnset},    {"1234567890", kUnset}};
  for (const auto& c : cases) {
    set(c.value);
    expect(c.value, integer(), c.want);
  }

  // integer_in: inside lo .. hi, else the fallback.
  set("4");
  expect("4 in 1..8", env::integer_in(kName, 1, 8, -1), 4);
  expect("4 in 5..8", env::integer_in(kName, 5, 8, -1), -1);
  set("17x");
  expect("17x in 17..65", env::integer_in(kName, 17, 65, 33), 33);

  // equals: exact strings.
  set("0");
  expect("0 equals 0", env::equals(kName, "0"), 1);
  expect("0 equals 1", env::equals(kName, "1"), 0);
  set("00");
  expect("00 equals 0", env::equals(kName, "0"), 0);

  // flag: set, not empty, not starting with '0'.
  const struct {
    const char* value;
    long long want;
  } flags[] = {{"1", 1}, {"yes", 1}, {"0", 0}, {"", 0}, {"00", 0}};
  for (const auto& f : flags) {
    set(f.value);
    expect(f.value, env::flag(kName), f.want);
  }

  set(nullptr);
  if (g_failures == 0) std::printf("test_env_knob: all passed\n");
  return g_failures == 0 ? 0 : 1;
}
