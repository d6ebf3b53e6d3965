// Validation of AWQ 4-bit tensors (AutoAWQ "GEMM" packing): qweight [K, N/8] and qzeros
// [G, N/8] pack 8 columns per word in AWQ's interleaved nibble order, scales [G, N];
// groups are K/G consecutive rows (no g_idx, so the row permutation is the identity).
#include "core/check.hpp"
#include "core/validate.hpp"

namespace exl2::detail {

ValidatedAwq validate_awq(const AwqWeights& w, Device target, cudaStream_t stream) {
  check_zero_point_tensors(w.qweight, w.qzeros, w.scales, target);

  ValidatedAwq v;
  LayerMeta& m = v.meta;
  m.format = Format::AWQ;
  m.K = w.qweight.shape[0];
  if (m.K > INT32_MAX) fail_value("qweight: at most 2^31-1 rows K are supported, got ", m.K);
  if (w.qweight.shape[1] > INT32_MAX / 8) fail_value("qweight: too many columns (", w.qweight.shape[1], ")");
  m.N = w.qweight.shape[1] * 8;  // 8 columns per word
  m.G = w.qzeros.shape[0];
  if (w.qzeros.shape[1] != w.qweight.shape[1]) {
    // Blame the tensor the other two disagree with: qzeros [G, N/8] and scales [G, N] agreeing on
    // N (say a transposed qweight) make qweight the odd one out.
    if (w.scales.shape == std::vector<std::int64_t>{w.qzeros.shape[0], w.qzeros.shape[1] * 8}) {
      fail_value("qweight: expected shape [K, N/8] with N/8 = ", w.qzeros.shape[1], " (qzeros is [G, N/8] = ",
                 w.qzeros.shape_str(), ", scales [G, N] = ", w.scales.shape_str(), "), got ", w.qweight.shape_str(),
                 w.qweight.shape[1] == w.scales.shape[1]
                     ? "; a GPTQ checkpoint (qweight [K/8, N], packed along K) goes to QMatrix.from_gptq"
                     : "");
    }
    fail_value("qzeros: expected shape [G, N/8] with N/8 = ", w.qweight.shape[1], " (qweight is [K, N/8] = ",
               w.qweight.shape_str(), "), got ", w.qzeros.shape_str());
  }
  if (w.scales.shape != std::vector<std::int64_t>{m.G, m.N}) {
    TensorView e;
    e.shape = {m.G, m.N};
    fail_value("scales: expected shape [G, N] = ", e.shape_str(), " (N = 8 * qweight columns), got ",
               w.scales.shape_str(), "; AWQ packs qweight along N as [K, N/8]");
  }
  if (m.K % m.G != 0) fail_value("qzeros: the group count G = ", m.G, " must divide the row count K = ", m.K);
  if (!all_finite_f16(w.scales, stream)) fail_value("scales: expected finite values, found NaN or Inf");
  uniform_groups(m, 4, m.K / m.G, "qweight");
  m.perm.resize(m.K);
  for (std::int64_t k = 0; k < m.K; ++k) m.perm[k] = static_cast<std::int32_t>(k);
  m.identity_perm = true;

  m.bias = validate_bias(w.bias, m.N, target, stream);
  v.qweight = static_cast<const std::int32_t*>(w.qweight.data);
  v.qzeros = static_cast<const std::int32_t*>(w.qzeros.data);
  v.scales = static_cast<const std::uint16_t*>(w.scales.data);
  return v;
}

}  // namespace exl2::detail
