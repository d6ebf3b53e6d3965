#include <algorithm>

#include "cpu/cpu_backend.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace exl2::detail::cpu {

// Columns are split across threads in units of 64; each weight is decoded exactly as
// in the GEMM (bit-exact f16((q - z) * s), or bf16((q - z) * s)) and written to its
// checkpoint row.
void dequantize(const LayerMeta& meta, const HostArrays& a, std::uint16_t* out, bool bf16) {
  const std::int64_t N = meta.N;
  constexpr std::int64_t unit = 64;
  const std::int64_t units = (N + unit - 1) / unit;
  const bool avx2 = use_avx2();
  const double work = static_cast<double>(meta.K) * static_cast<double>(N) * (avx2 ? 1.0 : 10.0);
  parallel_for(units, work, [&](std::int64_t u0, std::int64_t u1) {
    const std::int64_t n0 = u0 * unit, n1 = std::min(N, u1 * unit);
#if EXL2_CPU_HAVE_AVX2_KERNELS
    if (avx2) return dequant_cols_avx2(meta, a, out, n0, n1, bf16);
#endif
    dequant_cols_scalar(meta, a, out, n0, n1, bf16);
  });
}

}  // namespace exl2::detail::cpu
