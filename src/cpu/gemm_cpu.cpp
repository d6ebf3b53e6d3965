#include <algorithm>
#include <vector>

#include "cpu/cpu_backend.hpp"
#include "cpu/decode.hpp"
#include "cpu/parallel.hpp"

namespace exl2::detail::cpu {

namespace {
constexpr std::int64_t kCols = 64;  // columns per task: the fp32 accumulators of one x row fit in L1
constexpr std::int64_t kRows = 32;  // weight rows decoded per tile
}  // namespace

// For each column chunk: decode a [kRows x kCols] weight tile once, then apply it to
// all m rows of x. Each weight is decoded exactly once per call and only tiles are
// materialised. Summation order per output element: groups, then rows, ascending.
void gemm(const LayerMeta& meta, const HostArrays& a, const std::uint16_t* x, std::int64_t m, std::uint16_t* out) {
  if (m == 0) return;
  const std::int64_t N = meta.N, K = meta.K;
  const std::int64_t chunks = (N + kCols - 1) / kCols;
  const double work = static_cast<double>(K) * static_cast<double>(N) * (10.0 + 2.0 * static_cast<double>(m));
  parallel_for(chunks, work, [&](std::int64_t c0, std::int64_t c1) {
    std::vector<float> scale(kCols), tile(kRows * kCols), acc(static_cast<std::size_t>(m * kCols)),
        xs(static_cast<std::size_t>(m * kRows));
    for (std::int64_t c = c0; c < c1; ++c) {
      const std::int64_t n0 = c * kCols, n1 = std::min(N, n0 + kCols), nc = n1 - n0;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (std::int64_t g = 0; g < meta.G; ++g) {
        load_scales(meta, a, g, n0, n1, scale.data());
        for (std::int64_t r0 = meta.row_start[g]; r0 < meta.row_start[g + 1]; r0 += kRows) {
          const std::int64_t r1 = std::min<std::int64_t>(meta.row_start[g + 1], r0 + kRows), kr = r1 - r0;
          decode_tile(meta, a, g, r0, r1, n0, n1, scale.data(), tile.data(), kCols);
          // Gather the activation columns these permuted rows read: xs[i, r] = x[i, perm[r]].
          for (std::int64_t i = 0; i < m; ++i) {
            const std::uint16_t* xrow = x + i * K;
            for (std::int64_t r = 0; r < kr; ++r) xs[i * kRows + r] = half_to_float(xrow[meta.perm[r0 + r]]);
          }
          for (std::int64_t i = 0; i < m; ++i) {
            float* acc_row = acc.data() + i * kCols;
            const float* x_row = xs.data() + i * kRows;
            for (std::int64_t r = 0; r < kr; ++r) {
              const float xv = x_row[r];
              const float* w = tile.data() + r * kCols;
              for (std::int64_t n = 0; n < nc; ++n) acc_row[n] += xv * w[n];
            }
          }
        }
      }
      for (std::int64_t i = 0; i < m; ++i) {
        const float* acc_row = acc.data() + i * kCols;
        std::uint16_t* dst = out + i * N + n0;
        for (std::int64_t n = 0; n < nc; ++n) {
          const float b = meta.bias.empty() ? 0.0f : half_to_float(meta.bias[n0 + n]);
          dst[n] = float_to_half(acc_row[n] + b);
        }
      }
    }
  });
}

}  // namespace exl2::detail::cpu
