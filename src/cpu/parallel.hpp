// Internal: a minimal fork-join over contiguous index ranges (CPU backend).
//
// Threads are created per call and joined before returning: the library keeps no
// thread pool (no global state). The range split depends only on `count` and the
// thread count, and callers make every index's result independent of the split.
// EXL2_CPU_THREADS=n (read per call) fixes the thread count (capped by `count`), so
// tests can check that results do not depend on it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include "core/env_knob.hpp"

namespace exl2::detail::cpu {

/// The EXL2_CPU_THREADS override, or 0 when unset or invalid.
inline std::int64_t forced_thread_count() noexcept {
  return env::integer_in("EXL2_CPU_THREADS", 1, 1024, 0);
}

/// Run fn(begin, end) over [0, count) on up to hardware_concurrency threads; use one
/// thread when `work` (a rough operation count) is too small to pay for the others.
template <typename Fn>
void parallel_for(std::int64_t count, double work, Fn&& fn) {
  constexpr double kMinWorkPerThread = 2e6;
  std::int64_t threads = forced_thread_count();
  if (threads > 0) {
    threads = std::min(threads, count);
  } else {
    const std::int64_t hw = std::max<std::int64_t>(1, std::thread::hardware_concurrency());
    const std::int64_t by_work = std::max<std::int64_t>(1, static_cast<std::int64_t>(work / kMinWorkPerThread));
    threads = std::min({hw, count, by_work});
  }
  if (threads <= 1) {
    if (count > 0) fn(std::int64_t{0}, count);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(threads);
  const std::int64_t per = (count + threads - 1) / threads;
  for (std::int64_t t = 1; t < threads; ++t) {
    const std::int64_t b = t * per, e = std::min(count, b + per);
    if (b >= e) break;
    pool.emplace_back([&, t, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  try {
    fn(std::int64_t{0}, std::min(count, per));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& th : pool) th.join();
  for (auto& err : errors) {
    if (err) std::rethrow_exception(err);
  }
}

}  // namespace exl2::detail::cpu
