#include <algorithm>
#include <cstdlib>
#include <memory>

#include "core/env_knob.hpp"
#include "cpu/cpu_backend.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"

namespace exl2::detail::cpu {

bool use_avx2() noexcept {
#if EXL2_CPU_HAVE_AVX2_KERNELS
  if (env::flag("EXL2_CPU_SCALAR")) return false;
  return avx2_supported();
#else
  return false;
#endif
}

bool bf16_products_exact(const std::uint16_t* x, std::int64_t count) noexcept {
  bool ok = true;
  for (std::int64_t i = 0; i < count; ++i) {
    const unsigned e = (x[i] >> 7) & 0xffu;  // biased exponent
    ok &= (x[i] & 0x7fffu) == 0 || (e >= 25 && e <= 237);
  }
  return ok;
}

// x is converted once into storage-ordered fp32 (xp[i, r] = x[i, perm[r]]); then the
// columns are split across threads in whole units (8 columns for the fused few-row
// kernel, one tile width for the tiled kernel). Each output column is computed entirely
// by one thread in the fixed order of the contract (kernels.hpp), so the result does not
// depend on the split, the thread count or the kernel family.
void gemm(const LayerMeta& meta, const HostArrays& a, const std::uint16_t* x, std::int64_t m, std::uint16_t* out,
          bool bf16) {
  if (m == 0) return;
  const std::int64_t N = meta.N, K = meta.K;
  const bool avx2 = use_avx2();
  std::unique_ptr<float[]> xp(new float[static_cast<std::size_t>(m * K)]);
  parallel_for(m, static_cast<double>(m) * static_cast<double>(K) * 4.0, [&](std::int64_t i0, std::int64_t i1) {
#if EXL2_CPU_HAVE_AVX2_KERNELS
    if (avx2) return convert_x_avx2(meta, x, xp.get(), i0, i1, bf16);
#endif
    convert_x_scalar(meta, x, xp.get(), i0, i1, bf16);
  });
  const bool bf16_fma = bf16 && avx2 && m <= kFusedMaxRows && bf16_products_exact(x, m * K);
  const GemmArgs args{&meta, &a, xp.get(), m, out, bf16, bf16_fma};
  const std::int64_t unit = m <= kFusedMaxRows ? 8 : 64;
  const std::int64_t units = (N + unit - 1) / unit;
  const double work = static_cast<double>(K) * static_cast<double>(N) * (avx2 ? 1.0 + 0.25 * m : 10.0 + 2.0 * m);
  parallel_for(units, work, [&](std::int64_t u0, std::int64_t u1) {
    const std::int64_t n0 = u0 * unit, n1 = std::min(N, u1 * unit);
#if EXL2_CPU_HAVE_AVX2_KERNELS
    if (avx2) return gemm_cols_avx2(args, n0, n1);
#endif
    gemm_cols_scalar(args, n0, n1);
  });
}

}  // namespace exl2::detail::cpu
