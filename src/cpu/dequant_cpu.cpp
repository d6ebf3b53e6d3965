#include <algorithm>
#include <vector>

#include "cpu/cpu_backend.hpp"
#include "cpu/decode.hpp"
#include "cpu/parallel.hpp"

namespace exl2::detail::cpu {

namespace {
constexpr std::int64_t kCols = 256;  // columns per task
constexpr std::int64_t kRows = 32;   // rows decoded per tile
}  // namespace

void dequantize(const LayerMeta& meta, const HostArrays& a, std::uint16_t* out) {
  const std::int64_t N = meta.N;
  const std::int64_t chunks = (N + kCols - 1) / kCols;
  parallel_for(chunks, static_cast<double>(meta.K) * static_cast<double>(N) * 10.0, [&](std::int64_t c0, std::int64_t c1) {
    std::vector<float> scale(kCols), tile(kRows * kCols);
    for (std::int64_t c = c0; c < c1; ++c) {
      const std::int64_t n0 = c * kCols, n1 = std::min(N, n0 + kCols);
      for (std::int64_t g = 0; g < meta.G; ++g) {
        load_scales(meta, a, g, n0, n1, scale.data());
        for (std::int64_t r0 = meta.row_start[g]; r0 < meta.row_start[g + 1]; r0 += kRows) {
          const std::int64_t r1 = std::min<std::int64_t>(meta.row_start[g + 1], r0 + kRows);
          decode_tile(meta, a, g, r0, r1, n0, n1, scale.data(), tile.data(), kCols);
          for (std::int64_t r = r0; r < r1; ++r) {
            // W[perm[r]] = Wp[r]: write the row back to its checkpoint position.
            std::uint16_t* dst = out + static_cast<std::int64_t>(meta.perm[r]) * N;
            const float* src = tile.data() + (r - r0) * kCols - n0;
            for (std::int64_t n = n0; n < n1; ++n) dst[n] = float_to_half(src[n]);
          }
        }
      }
    }
  });
}

}  // namespace exl2::detail::cpu
