// Minimal exl2 consumer: build a small GPTQ layer, run the GEMM on the CPU (and on CUDA
// when the library has it and a device is present) and check it against a dense
// computation in double precision.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include <exl2/exl2.hpp>

#ifdef EXAMPLE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

// fp16 encoding of the few exact values this example uses (powers of two and small integers).
std::uint16_t half_of(float f) {
  if (f == 0.0f) return 0;
  int e;
  const float m = std::frexp(std::fabs(f), &e);  // f = m * 2^e, m in [0.5, 1)
  const auto mant = static_cast<std::uint16_t>((m * 2.0f - 1.0f) * 1024.0f);
  return static_cast<std::uint16_t>((f < 0 ? 0x8000 : 0) | ((e - 1 + 15) << 10) | mant);
}
float float_of(std::uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const float v = e ? std::ldexp(1.0f + m / 1024.0f, e - 15) : std::ldexp(m / 1024.0f, -14);
  return (h & 0x8000) ? -v : v;
}

}  // namespace

int main() {
  const std::int64_t K = 128, N = 32, G = 2, M = 4;
  std::vector<std::int32_t> qweight(K / 8 * N, 0), qzeros(G * N / 8, 0);
  std::vector<std::uint16_t> scales(G * N, half_of(0.125f)), x(M * K), y(M * N);
  std::vector<double> W(K * N);
  for (std::int64_t g = 0; g < G; ++g)
    for (std::int64_t n = 0; n < N; n += 8) qzeros[g * (N / 8) + n / 8] = 0x77777777;  // v1: zero 8 stored as 7
  for (std::int64_t k = 0; k < K; ++k)
    for (std::int64_t n = 0; n < N; ++n) {
      const int q = static_cast<int>((3 * k + 5 * n) % 16);
      qweight[(k / 8) * N + n] |= static_cast<std::int32_t>(static_cast<std::uint32_t>(q) << (4 * (k % 8)));
      W[k * N + n] = 0.125 * (q - 8);
    }
  for (std::int64_t i = 0; i < M * K; ++i) x[i] = half_of(static_cast<float>(i % 3) - 1.0f);

  exl2::GptqWeights w;
  w.qweight = {qweight.data(), exl2::DType::Int32, {K / 8, N}, {}, exl2::Device::cpu()};
  w.qzeros = {qzeros.data(), exl2::DType::Int32, {G, N / 8}, {}, exl2::Device::cpu()};
  w.scales = {scales.data(), exl2::DType::Float16, {G, N}, {}, exl2::Device::cpu()};

  auto check = [&](const char* where) {
    double worst = 0;
    for (std::int64_t i = 0; i < M; ++i)
      for (std::int64_t n = 0; n < N; ++n) {
        double ref = 0;
        for (std::int64_t k = 0; k < K; ++k) ref += float_of(x[i * K + k]) * W[k * N + n];
        worst = std::fmax(worst, std::fabs(ref - float_of(y[i * N + n])));
      }
    std::printf("%s: max |error| vs dense = %g\n", where, worst);
    return worst == 0.0;  // every value here is exact in fp16/fp32
  };

  try {
    exl2::QMatrix q = exl2::QMatrix::from_gptq(w, exl2::Device::cpu());
    exl2::MutableTensorView out;
    out.data = y.data();
    out.dtype = exl2::DType::Float16;
    out.shape = {M, N};
    q.gemm({x.data(), exl2::DType::Float16, {M, K}, {}, exl2::Device::cpu()}, out);
    if (!check("cpu")) return 1;

#ifdef EXAMPLE_WITH_CUDA
    if (exl2::cuda_device_count() > 0) {
      exl2::QMatrix qc = exl2::QMatrix::from_gptq(w, exl2::Device::cuda(0));  // host tensors, CUDA target
      void *dx = nullptr, *dy = nullptr;
      cudaMalloc(&dx, x.size() * 2);
      cudaMalloc(&dy, y.size() * 2);
      cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice);
      exl2::MutableTensorView dout;
      dout.data = dy;
      dout.dtype = exl2::DType::Float16;
      dout.shape = {M, N};
      dout.device = exl2::Device::cuda(0);
      qc.gemm({dx, exl2::DType::Float16, {M, K}, {}, exl2::Device::cuda(0)}, dout, /*stream=*/nullptr);
      std::fill(y.begin(), y.end(), 0);
      cudaMemcpy(y.data(), dy, y.size() * 2, cudaMemcpyDeviceToHost);
      cudaFree(dx);
      cudaFree(dy);
      if (!check("cuda")) return 1;
    }
#endif
  } catch (const exl2::Error& e) {
    std::fprintf(stderr, "exl2 error: %s\n", e.what());
    return 1;
  }
  std::printf("exl2 %s example passed\n", exl2::version());
  return 0;
}
