#include <algorithm>

#include "core/check.hpp"
#include "core/cuda_backend.hpp"
#include "core/half.hpp"
#include "core/validate.hpp"

namespace exl2::detail {

std::vector<std::uint16_t> validate_bias(const TensorView& bias, std::int64_t N, Device target,
                                         cudaStream_t stream) {
  if (!present(bias)) return {};
  check_tensor(bias, "bias", DType::Float16, 1, target);
  check_shape(bias, "bias", {N}, "[N]");
  auto values = read_small<std::uint16_t>(bias, stream);
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (!half_is_finite(values[i])) fail_value("bias: expected finite values, element ", i, " is NaN or Inf");
  }
  return values;
}

bool all_finite_f16(const TensorView& t, cudaStream_t stream) {
  const auto count = static_cast<std::size_t>(t.numel());
  if (!t.device.is_cpu()) return cuda::all_finite_f16(t.data, count, t.device.index, stream);
  const auto* p = static_cast<const std::uint16_t*>(t.data);
  return std::all_of(p, p + count, [](std::uint16_t h) { return half_is_finite(h); });
}

namespace {

bool valid_exl2_bits(int b) { return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8; }

}  // namespace

ValidatedExl2 validate_exl2(const Exl2Weights& w, Device target, cudaStream_t stream) {
  const char* required[] = {"q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups"};
  const TensorView* tensors[] = {&w.q_weight, &w.q_invperm, &w.q_scale, &w.q_scale_max, &w.q_groups};
  for (int i = 0; i < 5; ++i) {
    if (!present(*tensors[i])) fail_value(required[i], ": required tensor is missing");
  }
  check_tensor(w.q_weight, "q_weight", DType::Int32, 2, target);
  check_tensor(w.q_groups, "q_groups", DType::Int16, 1, target);
  check_tensor(w.q_scale, "q_scale", DType::Int32, 2, target);
  check_tensor(w.q_scale_max, "q_scale_max", DType::Float16, 1, target);
  check_tensor(w.q_invperm, "q_invperm", DType::Int32, 1, target);

  ValidatedExl2 v;
  LayerMeta& m = v.meta;
  m.format = Format::EXL2;
  m.Q = w.q_weight.shape[0];
  m.N = w.q_weight.shape[1];
  if (m.N % 8 != 0) fail_value("q_weight: expected the column count N to be a multiple of 8, got N = ", m.N);
  if (w.q_groups.shape[0] % 2 != 0) {
    fail_value("q_groups: expected an even length 2*G of (bits, first row) pairs, got length ", w.q_groups.shape[0]);
  }
  m.G = w.q_groups.shape[0] / 2;
  check_shape(w.q_scale, "q_scale", {m.G, m.N / 8}, "[G, N/8]");
  check_shape(w.q_scale_max, "q_scale_max", {m.G}, "[G]");
  if (m.Q > INT32_MAX) fail_value("q_weight: at most 2^31-1 rows are supported, got ", m.Q);

  // Groups: (bits, first word row) pairs; rows_g = words_g * 32 / bits_g.
  const auto groups = read_small<std::int16_t>(w.q_groups, stream);
  m.bits.resize(m.G);
  m.row_start.assign(m.G + 1, 0);
  m.word_start.assign(m.G + 1, 0);
  for (std::int64_t g = 0; g < m.G; ++g) {
    const int bits = groups[2 * g];
    // q_groups stores the start row as int16 in checkpoints; read it as unsigned so that
    // layers with more than 32767 word rows (K > 65535 at 4 bits) still describe correctly.
    const std::int64_t start = static_cast<std::uint16_t>(groups[2 * g + 1]);
    if (!valid_exl2_bits(bits)) {
      fail_value("q_groups: group ", g, " has bits = ", bits, ", expected one of 2, 3, 4, 5, 6, 8");
    }
    m.bits[g] = bits;
    m.word_start[g] = static_cast<std::int32_t>(start);
  }
  m.word_start[m.G] = static_cast<std::int32_t>(m.Q);
  // Start rows beyond 65535 wrap around in the int16 storage. Only layers with more than
  // 65536 word rows can have them; there, recover each start as the smallest value with
  // the stored low 16 bits above the previous start.
  if (m.Q > 65536) {
    for (std::int64_t g = 1; g < m.G; ++g) {
      std::int64_t s = m.word_start[g];
      while (s <= m.word_start[g - 1] && s + 65536 < m.Q) s += 65536;
      m.word_start[g] = static_cast<std::int32_t>(s);
    }
  }
  if (m.word_start[0] != 0) {
    fail_value("q_groups: the first group must start at q_weight row 0, got ", m.word_start[0]);
  }
  // K is the length of q_invperm. Every group but the last holds words * 32 / bits rows
  // exactly; the last one holds what is left of K (its stream padded to a whole word).
  m.K = w.q_invperm.shape[0];
  if (m.K > INT32_MAX) fail_value("q_invperm: at most 2^31-1 rows are supported, got ", m.K);
  std::int64_t rows_total = 0;
  for (std::int64_t g = 0; g < m.G; ++g) {
    const std::int64_t words = static_cast<std::int64_t>(m.word_start[g + 1]) - m.word_start[g];
    if (words <= 0) {
      fail_value("q_groups: group ", g, " starts at q_weight row ", m.word_start[g], " but the next group (or Q = ", m.Q,
                 ") starts at ", m.word_start[g + 1], "; expected strictly increasing start rows below Q");
    }
    const std::int64_t capacity = words * 32 / m.bits[g];
    m.row_start[g] = static_cast<std::int32_t>(rows_total);
    if (g + 1 < m.G) {
      if ((words * 32) % m.bits[g] != 0) {
        fail_value("q_groups: group ", g, " (", m.bits[g], "-bit) spans ", words,
                   " words, which is not a whole number of rows; only the last group may be partial");
      }
      rows_total += capacity;
    } else {
      const std::int64_t rows = m.K - rows_total;
      const std::int64_t min_rows = (words - 1) * 32 / m.bits[g] + 1;  // fewer would leave a word unused
      if (rows < min_rows || rows > capacity) {
        fail_value("q_invperm: its length K = ", m.K, " does not fit q_groups and q_weight: the last group (",
                   m.bits[g], "-bit, ", words, " words) would hold ", rows, " rows, expected ", min_rows, "..",
                   capacity);
      }
      rows_total += rows;
    }
  }
  m.row_start[m.G] = static_cast<std::int32_t>(rows_total);

  const auto invperm = read_small<std::int32_t>(w.q_invperm, stream);
  check_permutation(invperm, "q_invperm");
  // perm[r] = k with invperm[k] = r: permuted row r reads activation column perm[r].
  m.perm.assign(m.K, 0);
  for (std::int64_t k = 0; k < m.K; ++k) m.perm[invperm[k]] = static_cast<std::int32_t>(k);
  m.identity_perm = true;
  for (std::int64_t r = 0; r < m.K; ++r) {
    if (m.perm[r] != r) {
      m.identity_perm = false;
      break;
    }
  }
  if (present(w.q_perm)) {
    check_tensor(w.q_perm, "q_perm", DType::Int32, 1, target);
    check_shape(w.q_perm, "q_perm", {m.K}, "[K]");
    const auto perm = read_small<std::int32_t>(w.q_perm, stream);
    for (std::int64_t r = 0; r < m.K; ++r) {
      if (perm[r] != m.perm[r]) {
        fail_value("q_perm: expected argsort(q_invperm), but element ", r, " is ", perm[r], " instead of ", m.perm[r]);
      }
    }
  }

  const auto qsm = read_small<std::uint16_t>(w.q_scale_max, stream);
  v.qsm_div256.resize(m.G);
  for (std::int64_t g = 0; g < m.G; ++g) {
    if (!half_is_finite(qsm[g])) fail_value("q_scale_max: expected finite values, element ", g, " is NaN or Inf");
    v.qsm_div256[g] = w.scale_max_prescaled ? qsm[g] : float_to_half(half_to_float(qsm[g]) / 256.0f);
  }
  m.bias = validate_bias(w.bias, m.N, target, stream);
  v.q_weight = static_cast<const std::int32_t*>(w.q_weight.data);
  v.q_scale = static_cast<const std::int32_t*>(w.q_scale.data);
  return v;
}

}  // namespace exl2::detail
