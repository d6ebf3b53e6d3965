#include "core/check.hpp"
#include "core/validate.hpp"

namespace exl2::detail {

ValidatedGptq validate_gptq(const GptqWeights& w, Device target, cudaStream_t stream) {
  const char* required[] = {"qweight", "qzeros", "scales"};
  const TensorView* tensors[] = {&w.qweight, &w.qzeros, &w.scales};
  for (int i = 0; i < 3; ++i) {
    if (!present(*tensors[i])) fail_value(required[i], ": required tensor is missing");
  }
  check_tensor(w.qweight, "qweight", DType::Int32, 2, target);
  check_tensor(w.qzeros, "qzeros", DType::Int32, 2, target);
  check_tensor(w.scales, "scales", DType::Float16, 2, target);

  ValidatedGptq v;
  LayerMeta& m = v.meta;
  m.format = Format::GPTQ;
  m.K = w.qweight.shape[0] * 8;
  m.N = w.qweight.shape[1];
  m.Q = w.qweight.shape[0];
  m.G = w.qzeros.shape[0];
  if (m.K > INT32_MAX) fail_value("qweight: at most 2^28 packed rows are supported, got ", m.Q);
  if (m.N % 8 != 0) fail_value("qweight: expected the column count N to be a multiple of 8, got N = ", m.N);
  check_shape(w.qzeros, "qzeros", {m.G, m.N / 8}, "[G, N/8]");
  check_shape(w.scales, "scales", {m.G, m.N}, "[G, N]");
  if (m.K % m.G != 0) {
    fail_value("qzeros: the group count G = ", m.G, " must divide the row count K = ", m.K);
  }
  const std::int64_t group_size = m.K / m.G;
  if (group_size % 8 != 0) {
    fail_value("qzeros: the group size K/G = ", group_size, " must be a multiple of 8 (K = ", m.K, ", G = ", m.G, ")");
  }
  if (!all_finite_f16(w.scales, stream)) fail_value("scales: expected finite values, found NaN or Inf");

  m.bits.assign(m.G, 4);
  m.row_start.resize(m.G + 1);
  m.word_start.resize(m.G + 1);
  for (std::int64_t g = 0; g <= m.G; ++g) {
    m.row_start[g] = static_cast<std::int32_t>(g * group_size);
    m.word_start[g] = static_cast<std::int32_t>(g * group_size / 8);
  }

  // Act-order: sort rows by group (stable). perm[r] is the checkpoint row (and the
  // activation column) that permuted row r holds; groups become contiguous.
  m.perm.resize(m.K);
  m.identity_perm = true;
  if (present(w.g_idx)) {
    check_tensor(w.g_idx, "g_idx", DType::Int32, 1, target);
    check_shape(w.g_idx, "g_idx", {m.K}, "[K]");
    const auto g_idx = read_small<std::int32_t>(w.g_idx, stream);
    std::vector<std::int64_t> count(m.G, 0);
    for (std::int64_t k = 0; k < m.K; ++k) {
      const std::int32_t g = g_idx[k];
      if (g < 0 || g >= m.G) fail_value("g_idx: expected group indices in 0..", m.G - 1, ", element ", k, " is ", g);
      ++count[g];
    }
    for (std::int64_t g = 0; g < m.G; ++g) {
      if (count[g] != group_size) {
        fail_value("g_idx: expected every group to hold K/G = ", group_size, " rows, group ", g, " holds ", count[g]);
      }
    }
    std::vector<std::int64_t> next(m.G);
    for (std::int64_t g = 0; g < m.G; ++g) next[g] = g * group_size;
    for (std::int64_t k = 0; k < m.K; ++k) {
      const std::int64_t r = next[g_idx[k]]++;
      m.perm[r] = static_cast<std::int32_t>(k);
      if (r != k) m.identity_perm = false;
    }
  } else {
    for (std::int64_t k = 0; k < m.K; ++k) m.perm[k] = static_cast<std::int32_t>(k);
  }

  m.bias = validate_bias(w.bias, m.N, target, stream);
  v.qweight = static_cast<const std::int32_t*>(w.qweight.data);
  v.qzeros = static_cast<const std::int32_t*>(w.qzeros.data);
  v.scales = static_cast<const std::uint16_t*>(w.scales.data);
  v.zero_offset = w.zero_format == ZeroFormat::V1 ? 1 : 0;
  return v;
}

}  // namespace exl2::detail
