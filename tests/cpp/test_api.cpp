// Tests of the public C++ API on the CPU backend: construction of both formats,
// GEMM and dequantize against a dense computation, validation errors (type and
// message), RAII/move semantics and close().
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "core/bfloat16.hpp"  // test-only: bf16 conversions
#include "core/half.hpp"      // test-only: fp16 conversions
#include "exl2/exl2.hpp"
#include "test_util.hpp"

using exl2::detail::bf16_to_float;
using exl2::detail::float_to_bf16;
using exl2::detail::float_to_half;
using exl2::detail::half_to_float;

// A GPTQ layer K x N with G groups, packed from explicit codes/zeros/scales.
struct Gptq {
  std::int64_t K, N, G;
  std::vector<std::int32_t> qweight, qzeros, g_idx;
  std::vector<std::uint16_t> scales;
  std::vector<double> W;  // dense reference [K, N]

  Gptq(std::int64_t K_, std::int64_t N_, std::int64_t G_, bool act_order) : K(K_), N(N_), G(G_) {
    qweight.assign(K / 8 * N, 0);
    qzeros.assign(G * N / 8, 0);
    scales.resize(G * N);
    g_idx.resize(K);
    W.resize(K * N);
    const std::int64_t gs = K / G;
    for (std::int64_t k = 0; k < K; ++k) g_idx[k] = static_cast<std::int32_t>(k / gs);
    if (act_order) {  // a fixed shuffle that keeps every group's size
      for (std::int64_t k = 0; k + 1 < K; k += 2) std::swap(g_idx[k], g_idx[(k * 7 + 3) % K]);
    }
    std::vector<int> zeros(G * N);
    for (std::int64_t g = 0; g < G; ++g)
      for (std::int64_t n = 0; n < N; ++n) {
        const int z = static_cast<int>((g * 5 + n * 3) % 16);
        zeros[g * N + n] = z;
        const std::uint32_t stored = static_cast<std::uint32_t>((z - 1) & 15);  // v1: stored = z - 1
        qzeros[g * (N / 8) + n / 8] |= static_cast<std::int32_t>(stored << (4 * (n % 8)));
        scales[g * N + n] = float_to_half(std::ldexp(1.0f, -4 - static_cast<int>((g + n) % 3)));  // exact powers of 2
      }
    for (std::int64_t k = 0; k < K; ++k)
      for (std::int64_t n = 0; n < N; ++n) {
        const int q = static_cast<int>((k * 11 + n * 7) % 16);
        qweight[(k / 8) * N + n] |= static_cast<std::int32_t>(static_cast<std::uint32_t>(q) << (4 * (k % 8)));
        const std::int64_t g = g_idx[k];
        W[k * N + n] = half_to_float(scales[g * N + n]) * (q - zeros[g * N + n]);
      }
  }

  exl2::GptqWeights weights(bool with_g_idx) const {
    exl2::GptqWeights w;
    w.qweight = view(qweight, {K / 8, N}, exl2::DType::Int32);
    w.qzeros = view(qzeros, {G, N / 8}, exl2::DType::Int32);
    w.scales = view(scales, {G, N}, exl2::DType::Float16);
    if (with_g_idx) w.g_idx = view(g_idx, {K}, exl2::DType::Int32);
    return w;
  }
};

static void test_gptq_gemm_and_dequantize(bool act_order) {
  Gptq L(64, 16, 4, act_order);
  exl2::QMatrix q = exl2::QMatrix::from_gptq(L.weights(true), exl2::Device::cpu());
  CHECK(q.in_features() == 64 && q.out_features() == 16 && q.format() == exl2::Format::GPTQ);
  // dequantize: exact (powers of two times small integers)
  std::vector<std::uint16_t> w(64 * 16);
  exl2::MutableTensorView wo;
  wo.data = w.data();
  wo.dtype = exl2::DType::Float16;
  wo.shape = {64, 16};
  q.dequantize(wo);
  for (int i = 0; i < 64 * 16; ++i) CHECK(half_to_float(w[i]) == static_cast<float>(L.W[i]));
  // gemm: x of small integers -> exactly representable result
  const std::int64_t M = 3;
  std::vector<std::uint16_t> x(M * 64), y(M * 16);
  for (int i = 0; i < M * 64; ++i) x[i] = float_to_half(static_cast<float>((i * 5) % 5 - 2));
  exl2::MutableTensorView yo;
  yo.data = y.data();
  yo.dtype = exl2::DType::Float16;
  yo.shape = {M, 16};
  q.gemm(view(x, {M, 64}, exl2::DType::Float16), yo);
  for (int i = 0; i < M; ++i)
    for (int n = 0; n < 16; ++n) {
      double ref = 0;
      for (int k = 0; k < 64; ++k) ref += half_to_float(x[i * 64 + k]) * L.W[k * 16 + n];
      CHECK(half_to_float(y[i * 16 + n]) == static_cast<float>(ref));
    }
}

// bfloat16 x and out: out = bf16(sum in fp32). The weights (powers of two times integers
// below 16) are exact in bfloat16, x = small integers times 2^20 (beyond float16's range),
// so every fp32 product and partial sum is exact and the only rounding is the last one.
static void test_gptq_gemm_bfloat16() {
  Gptq L(64, 16, 4, true);
  exl2::QMatrix q = exl2::QMatrix::from_gptq(L.weights(true), exl2::Device::cpu());
  std::vector<std::uint16_t> w(64 * 16);
  exl2::MutableTensorView wo;
  wo.data = w.data();
  wo.dtype = exl2::DType::BFloat16;
  wo.shape = {64, 16};
  q.dequantize(wo);
  for (int i = 0; i < 64 * 16; ++i) CHECK(bf16_to_float(w[i]) == static_cast<float>(L.W[i]));
  const std::int64_t M = 5;  // the tiled kernel (more than 4 rows)
  for (const std::int64_t rows : {std::int64_t{1}, M}) {
    std::vector<std::uint16_t> x(rows * 64), y(rows * 16);
    for (int i = 0; i < rows * 64; ++i) x[i] = float_to_bf16(std::ldexp(static_cast<float>((i * 7) % 5 - 2), 20));
    exl2::MutableTensorView yo;
    yo.data = y.data();
    yo.dtype = exl2::DType::BFloat16;
    yo.shape = {rows, 16};
    q.gemm(view(x, {rows, 64}, exl2::DType::BFloat16), yo);
    bool beyond_fp16 = false;
    for (int i = 0; i < rows; ++i)
      for (int n = 0; n < 16; ++n) {
        double ref = 0;
        for (int k = 0; k < 64; ++k) ref += bf16_to_float(x[i * 64 + k]) * L.W[k * 16 + n];
        CHECK(y[i * 16 + n] == float_to_bf16(static_cast<float>(ref)));
        beyond_fp16 = beyond_fp16 || std::fabs(ref) > 65504.0;
      }
    CHECK(beyond_fp16);
    // out must have x's dtype; x must be float16 or bfloat16
    yo.dtype = exl2::DType::Float16;
    EXPECT_THROW(exl2::TypeMismatch, q.gemm(view(x, {rows, 64}, exl2::DType::BFloat16), yo),
                 "out: expected dtype bfloat16 (the dtype of x), got float16");
    EXPECT_THROW(exl2::TypeMismatch, q.gemm(view(x, {rows, 64}, exl2::DType::Float32), yo),
                 "x: expected dtype float16 or bfloat16, got float32");
  }
  wo.dtype = exl2::DType::Float32;
  EXPECT_THROW(exl2::TypeMismatch, q.dequantize(wo), "out: expected dtype float16 or bfloat16, got float32");
}

static void test_exl2_gemm() {
  // One 4-bit group of 32 rows and one 8-bit group of 32 rows, identity permutation.
  const std::int64_t K = 64, N = 8;
  std::vector<std::int32_t> q_weight((32 * 4 + 32 * 8) / 32 * N, 0);
  std::vector<std::int16_t> q_groups = {8, 0, 4, 8};  // groups ordered by bits: 8-bit (8 words), 4-bit (4 words)
  std::vector<std::int32_t> q_scale(2, 0), q_invperm(K);
  std::vector<std::uint16_t> q_scale_max = {float_to_half(1.0f), float_to_half(2.0f)};
  for (std::int64_t k = 0; k < K; ++k) q_invperm[k] = static_cast<std::int32_t>(k);
  std::vector<double> W(K * N);
  for (std::int64_t r = 0; r < K; ++r)
    for (std::int64_t n = 0; n < N; ++n) {
      const bool eight = r < 32;
      const int bits = eight ? 8 : 4;
      const std::int64_t i = eight ? r : r - 32;
      const std::int64_t word0 = eight ? 0 : 8;
      const std::uint32_t code = static_cast<std::uint32_t>((r * 13 + n * 5) % (1 << bits));
      const std::int64_t off = i * bits;
      q_weight[(word0 + off / 32) * N + n] |= static_cast<std::int32_t>(code << (off % 32));
      // scale code 0 -> (0+1)^2 * max/256
      const double scale = (eight ? 1.0 : 2.0) / 256.0;
      W[r * N + n] = (static_cast<int>(code) - (1 << (bits - 1))) * scale;
    }
  exl2::Exl2Weights w;
  w.q_weight = view(q_weight, {12, N}, exl2::DType::Int32);
  w.q_groups = view(q_groups, {4}, exl2::DType::Int16);
  w.q_scale = view(q_scale, {2, 1}, exl2::DType::Int32);
  w.q_scale_max = view(q_scale_max, {2}, exl2::DType::Float16);
  w.q_invperm = view(q_invperm, {K}, exl2::DType::Int32);
  exl2::QMatrix q = exl2::QMatrix::from_exl2(w, exl2::Device::cpu());
  CHECK(q.format() == exl2::Format::EXL2);
  std::vector<std::uint16_t> x(K, float_to_half(1.0f)), y(N);
  exl2::MutableTensorView yo;
  yo.data = y.data();
  yo.dtype = exl2::DType::Float16;
  yo.shape = {1, N};
  q.gemm(view(x, {1, K}, exl2::DType::Float16), yo);
  for (std::int64_t n = 0; n < N; ++n) {
    double ref = 0;
    for (std::int64_t k = 0; k < K; ++k) ref += W[k * N + n];
    CHECK(half_to_float(y[n]) == static_cast<float>(ref));
  }
  // validation: bits 7 is not an EXL2 width; the message names the argument
  std::vector<std::int16_t> bad_groups = {7, 0, 4, 8};
  w.q_groups = view(bad_groups, {4}, exl2::DType::Int16);
  EXPECT_THROW(exl2::InvalidArgument, exl2::QMatrix::from_exl2(w, exl2::Device::cpu()), "q_groups: group 0 has bits = 7");
}

static void test_validation() {
  Gptq L(64, 16, 4, true);
  auto w = L.weights(true);
  std::vector<std::int64_t> wrong(L.qweight.size());
  auto w1 = w;
  w1.qweight.dtype = exl2::DType::Int64;
  EXPECT_THROW(exl2::TypeMismatch, exl2::QMatrix::from_gptq(w1, exl2::Device::cpu()), "qweight: expected dtype int32");
  auto w2 = w;
  w2.scales.shape = {4, 8};
  EXPECT_THROW(exl2::InvalidArgument, exl2::QMatrix::from_gptq(w2, exl2::Device::cpu()), "scales: expected shape [G, N]");
  std::vector<std::int32_t> g_bad(L.g_idx);
  g_bad[0] = 9;
  auto w3 = w;
  w3.g_idx.data = g_bad.data();
  EXPECT_THROW(exl2::InvalidArgument, exl2::QMatrix::from_gptq(w3, exl2::Device::cpu()), "g_idx: expected group indices");
  auto w4 = w;
  w4.qweight.strides = {1, 8};
  EXPECT_THROW(exl2::InvalidArgument, exl2::QMatrix::from_gptq(w4, exl2::Device::cpu()), "qweight: expected a contiguous");
  // errors derive from exl2::Error and std::exception
  static_assert(std::is_base_of<std::exception, exl2::Error>::value, "");
  static_assert(std::is_base_of<exl2::Error, exl2::InvalidArgument>::value, "");
  // gemm input checks
  exl2::QMatrix q = exl2::QMatrix::from_gptq(w, exl2::Device::cpu());
  std::vector<std::uint16_t> x(2 * 32), y(2 * 16);
  exl2::MutableTensorView yo;
  yo.data = y.data();
  yo.dtype = exl2::DType::Float16;
  yo.shape = {2, 16};
  EXPECT_THROW(exl2::InvalidArgument, q.gemm(view(x, {2, 32}, exl2::DType::Float16), yo), "x: expected shape [M, K] with K = 64");
  // without CUDA (or with one), an absurd device index is refused clearly
  EXPECT_THROW(exl2::Unsupported, exl2::QMatrix::from_gptq(w, exl2::Device::cuda(1000)), "CUDA");
}

static void test_raii_and_move() {
  static_assert(!std::is_copy_constructible<exl2::QMatrix>::value, "QMatrix must be move-only");
  static_assert(std::is_nothrow_move_constructible<exl2::QMatrix>::value, "");
  Gptq L(64, 16, 4, false);
  exl2::QMatrix a = exl2::QMatrix::from_gptq(L.weights(false), exl2::Device::cpu());
  const std::size_t bytes = a.nbytes();
  CHECK(bytes >= 64 * 16 / 2);
  exl2::QMatrix b = std::move(a);
  CHECK(a.closed() && !b.closed());  // NOLINT(bugprone-use-after-move): moved-from is closed by contract
  CHECK(b.nbytes() == bytes);
  EXPECT_THROW(exl2::InvalidArgument, (void)a.in_features(), "closed");
  b.close();
  CHECK(b.closed());
  EXPECT_THROW(exl2::InvalidArgument, (void)b.out_features(), "closed");
  // caller memory may be changed after construction without affecting the QMatrix
  Gptq L2(64, 16, 4, true);
  auto w = L2.weights(true);
  exl2::QMatrix c = exl2::QMatrix::from_gptq(w, exl2::Device::cpu());
  std::vector<std::uint16_t> before(64 * 16), after(64 * 16);
  exl2::MutableTensorView o;
  o.dtype = exl2::DType::Float16;
  o.shape = {64, 16};
  o.data = before.data();
  c.dequantize(o);
  std::fill(L2.qweight.begin(), L2.qweight.end(), 0);
  std::fill(L2.scales.begin(), L2.scales.end(), 0);
  o.data = after.data();
  c.dequantize(o);
  CHECK(before == after);
}

int main() {
  test_gptq_gemm_and_dequantize(false);
  test_gptq_gemm_and_dequantize(true);
  test_gptq_gemm_bfloat16();
  test_exl2_gemm();
  test_validation();
  test_raii_and_move();
  std::printf("exl2 %s C++ API tests: %s\n", exl2::version(), g_failures ? "FAILED" : "passed");
  return g_failures ? 1 : 0;
}
