// C++ API tests of the formats built through the generic repack (CPU backend): GPTQ 3-bit
// with act-order and v1 zeros that wrap, GPTQ 8-bit v2, AWQ 4-bit with whole-word (8-row)
// groups and with groups that do not fill whole words (5 and 3 rows); dequantize exact, GEMM exact (integer activations, power-of-two
// scales), and validation errors that name the argument.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/half.hpp"  // test-only: fp16 conversions
#include "exl2/exl2.hpp"
#include "test_util.hpp"

using exl2::detail::float_to_half;
using exl2::detail::half_to_float;

/// Writes `code` (b bits) at bit `bit` of the little-endian stream p[0], p[stride], ...
/// one bit at a time (deliberately unlike the library's word-wise code).
static void put_bits(std::vector<std::int32_t>& v, std::int64_t first, std::int64_t stride, std::int64_t bit, int b,
                     std::uint32_t code) {
  for (int i = 0; i < b; ++i) {
    const std::int64_t pos = bit + i;
    auto& word = v[first + (pos / 32) * stride];
    word = static_cast<std::int32_t>(static_cast<std::uint32_t>(word) | (((code >> i) & 1u) << (pos % 32)));
  }
}

/// Dequantize + gemm of `q` against the dense reference W [K, N] (exact values).
static void check_exact(const exl2::QMatrix& q, const std::vector<double>& W, std::int64_t K, std::int64_t N) {
  std::vector<std::uint16_t> w(K * N);
  exl2::MutableTensorView wo;
  wo.data = w.data();
  wo.dtype = exl2::DType::Float16;
  wo.shape = {K, N};
  q.dequantize(wo);
  for (std::int64_t i = 0; i < K * N; ++i) CHECK(half_to_float(w[i]) == static_cast<float>(W[i]));
  const std::int64_t M = 3;
  std::vector<std::uint16_t> x(M * K), y(M * N);
  for (std::int64_t i = 0; i < M * K; ++i) x[i] = float_to_half(static_cast<float>((i * 7) % 5 - 2));
  exl2::MutableTensorView yo;
  yo.data = y.data();
  yo.dtype = exl2::DType::Float16;
  yo.shape = {M, N};
  q.gemm(view(x, {M, K}, exl2::DType::Float16), yo);
  for (std::int64_t i = 0; i < M; ++i)
    for (std::int64_t n = 0; n < N; ++n) {
      double ref = 0;
      for (std::int64_t k = 0; k < K; ++k) ref += half_to_float(x[i * K + k]) * W[k * N + n];
      // every partial sum is exact in fp32; the one rounding is to fp16
      CHECK(y[i * N + n] == float_to_half(static_cast<float>(ref)));
    }
}

// GPTQ b-bit, K x N, G groups; act-order g_idx; v1 (stored = z - 1, wrapping) or v2 zeros.
struct GptqB {
  int b;
  std::int64_t K, N, G;
  bool v1;
  std::vector<std::int32_t> qweight, qzeros, g_idx;
  std::vector<std::uint16_t> scales;
  std::vector<double> W;

  GptqB(int b_, std::int64_t K_, std::int64_t N_, std::int64_t G_, bool v1_) : b(b_), K(K_), N(N_), G(G_), v1(v1_) {
    const std::uint32_t mask = (1u << b) - 1u;
    qweight.assign(K * b / 32 * N, 0);
    qzeros.assign(G * (N * b / 32), 0);
    scales.resize(G * N);
    g_idx.resize(K);
    W.resize(K * N);
    const std::int64_t gs = K / G;
    for (std::int64_t k = 0; k < K; ++k) g_idx[k] = static_cast<std::int32_t>(k / gs);
    for (std::int64_t k = 0; k + 1 < K; k += 2) std::swap(g_idx[k], g_idx[(k * 7 + 3) % K]);
    std::vector<int> zeros(G * N);
    for (std::int64_t g = 0; g < G; ++g)
      for (std::int64_t n = 0; n < N; ++n) {
        const int z = static_cast<int>((g * 5 + n * 3) % (mask + 1));  // includes z = 0 (v1 wraps)
        zeros[g * N + n] = z;
        const std::uint32_t stored = v1 ? (static_cast<std::uint32_t>(z) - 1u) & mask : static_cast<std::uint32_t>(z);
        put_bits(qzeros, g * (N * b / 32), 1, n * b, b, stored);
        scales[g * N + n] = float_to_half(std::ldexp(1.0f, -6 - static_cast<int>((g + n) % 3)));
      }
    for (std::int64_t k = 0; k < K; ++k)
      for (std::int64_t n = 0; n < N; ++n) {
        const int q = static_cast<int>((k * 11 + n * 7) % (mask + 1));
        put_bits(qweight, n, N, k * b, b, static_cast<std::uint32_t>(q));
        const std::int64_t g = g_idx[k];
        W[k * N + n] = half_to_float(scales[g * N + n]) * (q - zeros[g * N + n]);
      }
  }

  exl2::GptqWeights weights() const {
    exl2::GptqWeights w;
    w.qweight = view(qweight, {K * b / 32, N}, exl2::DType::Int32);
    w.qzeros = view(qzeros, {G, N * b / 32}, exl2::DType::Int32);
    w.scales = view(scales, {G, N}, exl2::DType::Float16);
    w.g_idx = view(g_idx, {K}, exl2::DType::Int32);
    w.zero_format = v1 ? exl2::ZeroFormat::V1 : exl2::ZeroFormat::V2;
    w.bits = b;
    return w;
  }
};

static void test_gptq_widths() {
  for (const auto& c : {GptqB(3, 96, 32, 3, true), GptqB(3, 64, 64, 8, false), GptqB(8, 48, 24, 6, true),
                        GptqB(2, 64, 16, 2, true)}) {
    exl2::QMatrix q = exl2::QMatrix::from_gptq(c.weights(), exl2::Device::cpu());
    CHECK(q.format() == exl2::Format::GPTQ && q.in_features() == c.K && q.out_features() == c.N);
    const double bpw = (c.K * c.N * c.b + c.G * c.N * (16.0 + c.b)) / static_cast<double>(c.K * c.N);
    CHECK(std::fabs(q.bits_per_weight() - bpw) < 1e-12);
    check_exact(q, c.W, c.K, c.N);
  }
  const GptqB c(3, 96, 32, 3, true);
  auto w = c.weights();
  w.bits = 5;
  EXPECT_THROW(exl2::InvalidArgument, exl2::QMatrix::from_gptq(w, exl2::Device::cpu()), "bits: expected 2, 3, 4 or 8");
  w.bits = 4;  // qweight [36, 32] read as 4-bit: K = 288, qzeros would be [3, 4]
  EXPECT_THROW(exl2::InvalidArgument, exl2::QMatrix::from_gptq(w, exl2::Device::cpu()), "qzeros: expected shape [G, N/8] = [3, 4]");
  w = c.weights();
  std::vector<std::int32_t> bad_g = c.g_idx;
  bad_g[5] = 3;
  w.g_idx = view(bad_g, {c.K}, exl2::DType::Int32);
  EXPECT_THROW(exl2::InvalidArgument, exl2::QMatrix::from_gptq(w, exl2::Device::cpu()), "g_idx: expected group indices in 0..2");
}

// AWQ 4-bit, K x N, G groups of K/G consecutive rows in AWQ's interleaved nibble order.
// 8-row groups are 32-bit streams that the canonical layout keeps word-aligned; groups of
// any other size (5 rows: 20 bits) start and end inside words.
struct Awq {
  std::int64_t K, N, G;
  std::vector<std::int32_t> qweight, qzeros;
  std::vector<std::uint16_t> scales;
  std::vector<double> W;

  Awq(std::int64_t K_, std::int64_t N_, std::int64_t G_) : K(K_), N(N_), G(G_) {
    const int nibble_of_column[8] = {0, 4, 1, 5, 2, 6, 3, 7};
    qweight.assign(K * N / 8, 0);
    qzeros.assign(G * N / 8, 0);
    scales.resize(G * N);
    W.resize(K * N);
    std::vector<int> zeros(G * N);
    for (std::int64_t g = 0; g < G; ++g)
      for (std::int64_t n = 0; n < N; ++n) {
        zeros[g * N + n] = static_cast<int>((g * 3 + n * 5) % 16);
        put_bits(qzeros, g * (N / 8) + n / 8, 1, 4 * nibble_of_column[n % 8], 4,
                 static_cast<std::uint32_t>(zeros[g * N + n]));
        scales[g * N + n] = float_to_half(-std::ldexp(1.0f, -5 - static_cast<int>((g + 2 * n) % 3)));
      }
    for (std::int64_t k = 0; k < K; ++k)
      for (std::int64_t n = 0; n < N; ++n) {
        const int q = static_cast<int>((k * 13 + n * 3) % 16);
        put_bits(qweight, k * (N / 8) + n / 8, 1, 4 * nibble_of_column[n % 8], 4, static_cast<std::uint32_t>(q));
        const std::int64_t g = k / (K / G);
        W[k * N + n] = half_to_float(scales[g * N + n]) * (q - zeros[g * N + n]);
      }
  }

  exl2::AwqWeights weights() const {
    exl2::AwqWeights w;
    w.qweight = view(qweight, {K, N / 8}, exl2::DType::Int32);
    w.qzeros = view(qzeros, {G, N / 8}, exl2::DType::Int32);
    w.scales = view(scales, {G, N}, exl2::DType::Float16);
    return w;
  }
};

static void test_awq() {
  // 8-row groups (whole words), 5-row groups (K = 40, G = 8: 20-bit streams, unaligned),
  // 3-row groups (K = 24, G = 8) and one 40-row group (160 bits: five words).
  for (const auto& c : {Awq(40, 16, 5), Awq(40, 16, 8), Awq(24, 16, 8), Awq(40, 8, 1)}) {
    exl2::QMatrix q = exl2::QMatrix::from_awq(c.weights(), exl2::Device::cpu());
    CHECK(q.format() == exl2::Format::AWQ && std::string(exl2::format_name(q.format())) == "awq");
    CHECK(q.in_features() == c.K && q.out_features() == c.N && !q.has_bias());
    check_exact(q, c.W, c.K, c.N);
  }

  const Awq c(40, 16, 5);
  const std::int64_t N = c.N, G = c.G;
  const auto& qzeros = c.qzeros;
  const auto& scales = c.scales;
  const exl2::AwqWeights w = c.weights();
  exl2::AwqWeights bad = w;
  bad.scales = view(scales, {G, N / 2}, exl2::DType::Float16);
  EXPECT_THROW(exl2::InvalidArgument, exl2::QMatrix::from_awq(bad, exl2::Device::cpu()), "scales: expected shape [G, N] = [5, 16]");
  bad = w;
  bad.qzeros = view(qzeros, {G * 2, N / 16}, exl2::DType::Int32);
  EXPECT_THROW(exl2::InvalidArgument, exl2::QMatrix::from_awq(bad, exl2::Device::cpu()), "qzeros: expected shape [G, N/8]");
  bad = w;
  bad.qzeros = view(qzeros, {3, N / 8}, exl2::DType::Int32);
  bad.scales = view(scales, {3, N}, exl2::DType::Float16);
  EXPECT_THROW(exl2::InvalidArgument, exl2::QMatrix::from_awq(bad, exl2::Device::cpu()), "qzeros: the group count G = 3 must divide");
  bad = w;
  bad.qweight = exl2::TensorView{};
  EXPECT_THROW(exl2::InvalidArgument, exl2::QMatrix::from_awq(bad, exl2::Device::cpu()), "qweight: required tensor is missing");
}

int main() {
  test_gptq_widths();
  test_awq();
  std::printf("exl2 %s C++ format tests: %s\n", exl2::version(), g_failures ? "FAILED" : "passed");
  return g_failures ? 1 : 0;
}
