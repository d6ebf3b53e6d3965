// Validation of GPTQ tensors (AutoGPTQ packing, 2/3/4/8-bit) and their canonical
// group tables. The packed shapes depend on the width b: qweight [K*b/32, N] (each
// column a b-bit stream along K), qzeros [G, N*b/32] (each row a b-bit stream along N).
// The row count of qweight alone cannot tell 2-bit from 4-bit, so the width is given
// by the caller and every shape is checked against it.
#include "core/check.hpp"
#include "core/validate.hpp"

namespace exl2::detail {

void uniform_groups(LayerMeta& m, int bits, std::int64_t group_size, const char* what) {
  const std::int64_t words_per_group = (group_size * bits + 31) / 32;
  const std::int64_t Q = m.G * words_per_group;
  if (Q > INT32_MAX) fail_value(what, ": the layer needs ", Q, " packed word rows, at most 2^31-1 are supported");
  m.Q = Q;
  m.bits.assign(m.G, bits);
  m.row_start.resize(m.G + 1);
  m.word_start.resize(m.G + 1);
  for (std::int64_t g = 0; g <= m.G; ++g) {
    m.row_start[g] = static_cast<std::int32_t>(g * group_size);
    m.word_start[g] = static_cast<std::int32_t>(g * words_per_group);
  }
}

namespace {

bool valid_gptq_bits(int b) { return b == 2 || b == 3 || b == 4 || b == 8; }

}  // namespace

void check_zero_point_tensors(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                              Device target) {
  const char* required[] = {"qweight", "qzeros", "scales"};
  const TensorView* tensors[] = {&qweight, &qzeros, &scales};
  for (int i = 0; i < 3; ++i) {
    if (!present(*tensors[i])) fail_value(required[i], ": required tensor is missing");
  }
  check_tensor(qweight, "qweight", DType::Int32, 2, target);
  check_tensor(qzeros, "qzeros", DType::Int32, 2, target);
  check_tensor(scales, "scales", DType::Float16, 2, target);
}

ValidatedGptq validate_gptq(const GptqWeights& w, Device target, cudaStream_t stream) {
  const int b = w.bits;
  if (!valid_gptq_bits(b)) fail_value("bits: expected 2, 3, 4 or 8 for GPTQ, got ", b);
  check_zero_point_tensors(w.qweight, w.qzeros, w.scales, target);

  ValidatedGptq v;
  LayerMeta& m = v.meta;
  m.format = Format::GPTQ;
  const std::int64_t rows = w.qweight.shape[0];
  m.N = w.qweight.shape[1];
  m.G = w.qzeros.shape[0];
  if (rows > std::int64_t{INT32_MAX} * b / 32) {
    fail_value("qweight: at most 2^31-1 rows K are supported, got ", rows, " packed rows");
  }
  // 32 / gcd(b, 32) rows fill whole words: 3-bit packs 32 rows into 3 words.
  if ((rows * 32) % b != 0) {
    fail_value("qweight: for bits = ", b, " the row count must be a multiple of ", b,
               " (32 rows in ", b, " words), got ", rows);
  }
  m.K = rows * 32 / b;
  if (m.N % 8 != 0) fail_value("qweight: expected the column count N to be a multiple of 8, got N = ", m.N);
  if ((m.N * b) % 32 != 0) {
    fail_value("qweight: for bits = ", b, " the column count N must be a multiple of ", 32 / (b == 3 ? 1 : b),
               " (qzeros packs N zeros of ", b, " bits into whole words), got N = ", m.N);
  }
  if (w.qzeros.shape != std::vector<std::int64_t>{m.G, m.N * b / 32}) {
    TensorView e;
    e.shape = {m.G, m.N * b / 32};
    const char* symbolic = b == 2 ? "[G, N/16]" : b == 3 ? "[G, N*3/32]" : b == 4 ? "[G, N/8]" : "[G, N/4]";
    fail_value("qzeros: expected shape ", symbolic, " = ", e.shape_str(), " for bits = ", b, " (N = ", m.N,
               " from qweight), got ", w.qzeros.shape_str(), "; is bits right?");
  }
  check_shape(w.scales, "scales", {m.G, m.N}, "[G, N]");
  if (m.K % m.G != 0) {
    fail_value("qzeros: the group count G = ", m.G, " must divide the row count K = ", m.K, " (K = qweight rows * 32 / ",
               b, ")");
  }
  const std::int64_t group_size = m.K / m.G;
  if (!all_finite_f16(w.scales, stream)) fail_value("scales: expected finite values, found NaN or Inf");
  uniform_groups(m, b, group_size, "qweight");

  // Act-order: sort rows by group (stable). perm[r] is the checkpoint row (and the
  // activation column) that permuted row r holds; groups become contiguous.
  m.perm.resize(m.K);
  m.identity_perm = true;
  if (present(w.g_idx)) {
    check_tensor(w.g_idx, "g_idx", DType::Int32, 1, target);
    if (w.g_idx.shape[0] != m.K) {
      fail_value("g_idx: expected shape [K] = [", m.K, "] (K = qweight rows * 32 / bits, bits = ", b, "), got ",
                 w.g_idx.shape_str());
    }
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
  v.bits = b;
  return v;
}

}  // namespace exl2::detail
