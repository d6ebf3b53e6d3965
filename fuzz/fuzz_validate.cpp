// Coverage-guided fuzzer (libFuzzer) for exl2's C++ validation entry points
// QMatrix::from_exl2 / from_gptq (2/3/4/8-bit) / from_awq, and for gemm / dequantize on
// what they accept.
//
// Bytes -> a structured layer (shapes, bit widths, groups, permutation, values) plus a
// list of corruptions (dtype, rank, dims, strides, null data, device, element values,
// absent tensors) -> construction on the CPU. Every view the harness passes describes
// memory it really owns (a claimed shape always gets a buffer of that many elements),
// so any out-of-bounds access ASan reports is the library's.
//
// Oracles (any violation calls abort(), i.e. a libFuzzer "crash" with the input saved):
//   1. Only exl2::InvalidArgument / exl2::TypeMismatch escape (exl2::Unsupported only for a
//      CUDA target); the message starts with the name of one of the call's arguments.
//   2. Differential validation: an independent validator written from the format rules in
//      include/exl2/format.hpp must agree with the library on accept/reject.
//   3. On success, dequantize() must equal an independent reference dequantizer bit for bit,
//      gemm() must match a float64 product of x and that weight within the fp32-accumulation
//      bound, and results must be bit-identical between the scalar and AVX2 kernels and
//      between 1 and 3 threads.
//   4. gemm/dequantize with malformed x/out views (dtype, shape, null, overlap, device)
//      throw, never crash; a closed QMatrix throws InvalidArgument.
//
// Build: see fuzz/README.md (fuzz/CMakeLists.txt, clang -fsanitize=fuzzer,address,undefined).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "exl2/exl2.hpp"

#include "fuzzed_data.hpp"  // byte consumer with libFuzzer's FuzzedDataProvider semantics

namespace {

using exl2::DType;
using std::int64_t;

// Outcome counters, printed at exit when EXL2_FUZZ_STATS is set (corpus statistics).
struct Stats {
  long exl2_ok = 0, exl2_rejected = 0, gptq_ok = 0, gptq_rejected = 0, awq_ok = 0, awq_rejected = 0,
       unsupported = 0, calls_ok = 0, calls_rejected = 0;
  ~Stats() {
    if (std::getenv("EXL2_FUZZ_STATS") == nullptr) return;
    std::fprintf(stderr,
                 "exl2 fuzz stats: exl2 accepted %ld rejected %ld; gptq accepted %ld rejected %ld; "
                 "awq accepted %ld rejected %ld; unsupported (cuda target) %ld; "
                 "gemm/dequantize calls ok %ld rejected %ld\n",
                 exl2_ok, exl2_rejected, gptq_ok, gptq_rejected, awq_ok, awq_rejected, unsupported, calls_ok,
                 calls_rejected);
  }
} g_stats;

// The reference computations are plain loops over every weight: no coverage feedback is
// wanted from them, and comparison tracing would make large layers very slow.
#if defined(__clang__)
#define EXL2_NO_COVERAGE __attribute__((no_sanitize("coverage")))
#else
#define EXL2_NO_COVERAGE
#endif

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "\n*** exl2 fuzz finding: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// ------------------------------------------------------------------ fp16, independently
// Decode binary16 to double and round a double to the nearest binary16 value (ties to
// even, subnormals, overflow to +-inf) without the library's half.cpp.
EXL2_NO_COVERAGE double h2d(std::uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double v;
  if (e == 31) v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0) v = std::ldexp(static_cast<double>(m), -24);
  else v = std::ldexp(static_cast<double>(m + 1024), e - 25);
  return s ? -v : v;
}

EXL2_NO_COVERAGE double round_h(double v) {
  if (std::isnan(v) || std::isinf(v) || v == 0.0) return v;
  const double a = std::fabs(v);
  if (a >= 65520.0) return std::copysign(std::numeric_limits<double>::infinity(), v);
  int e;
  std::frexp(a, &e);                    // a = f * 2^e, f in [0.5, 1)
  const int ulp_exp = std::max(e - 11, -24);  // 11 significant bits; subnormal ulp 2^-24
  const double q = std::nearbyint(std::ldexp(a, -ulp_exp));  // default mode: ties to even
  return std::copysign(std::ldexp(q, ulp_exp), v);
}

EXL2_NO_COVERAGE std::uint16_t d2h_bits(double v) {  // exact encode of a value that round_h produced
  if (std::isnan(v)) return 0x7e00;
  std::uint16_t s = std::signbit(v) ? 0x8000 : 0;
  const double a = std::fabs(v);
  if (std::isinf(a)) return s | 0x7c00;
  if (a < std::ldexp(1.0, -14)) return s | static_cast<std::uint16_t>(std::ldexp(a, 24));
  int e;
  const double f = std::frexp(a, &e);  // a = f * 2^e
  const int be = e - 1 + 15;
  const auto m = static_cast<std::uint16_t>(std::ldexp(f, 11) - 1024.0);
  return s | static_cast<std::uint16_t>(be << 10) | m;
}

// ------------------------------------------------------------------ owned tensors
struct Tensor {
  std::vector<std::uint64_t> mem;  // 8-byte aligned storage
  exl2::TensorView v;
  /// The library's rule (core/check.hpp present()): absent = null data and no shape.
  bool absent() const { return v.data == nullptr && v.shape.empty(); }

  template <typename T>
  T* p() { return reinterpret_cast<T*>(mem.data()); }
  template <typename T>
  const T* p() const { return reinterpret_cast<const T*>(mem.data()); }
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : v.shape) n *= d;
    return n;
  }
};

constexpr int64_t kMaxElems = int64_t{1} << 18;

std::size_t esize(DType t) {
  const std::size_t s = exl2::dtype_size(t);
  return s ? s : 4;
}

/// (Re)allocate `t` for its current shape and dtype, keeping the old bytes as a prefix.
void realloc_for_shape(Tensor& t) {
  int64_t n = 1;
  for (auto d : t.v.shape) n *= std::max<int64_t>(d, 0);
  const std::size_t bytes = static_cast<std::size_t>(std::max<int64_t>(n, 1)) * esize(t.v.dtype);
  t.mem.resize((bytes + 7) / 8 + 1, 0);
  if (t.v.data != nullptr) t.v.data = t.mem.data();
}

Tensor make(DType dt, std::vector<int64_t> shape) {
  Tensor t;
  t.v.dtype = dt;
  t.v.shape = std::move(shape);
  t.v.data = reinterpret_cast<const void*>(1);  // mark "has data"; fixed by realloc
  realloc_for_shape(t);
  t.v.data = t.mem.data();
  return t;
}

Tensor absent_tensor() { return Tensor{}; }

struct Rng {  // xorshift64*: cheap bulk values from a fuzzed seed
  std::uint64_t s;
  explicit Rng(std::uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x1234567ull) {}
  std::uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 2685821657736338717ull;
  }
};

const std::uint16_t kHalfTable[] = {
    0x3c00, 0xbc00, 0x0000, 0x8000, 0x0001, 0x03ff, 0x0400, 0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x7e00,
    0x1e00, 0x2000, 0x1400, 0x3555, 0x5bff, 0x6400, 0x0c00, 0x2e66};

std::uint16_t fuzz_half(FuzzedDataProvider& fdp, Rng& rng, bool finite_only) {
  std::uint16_t h;
  if (fdp.ConsumeBool()) {
    h = kHalfTable[fdp.ConsumeIntegralInRange<std::size_t>(0, sizeof(kHalfTable) / 2 - 1)];
  } else {
    h = static_cast<std::uint16_t>(0x1000 + rng.next() % 0x2c00);  // 2^-11 .. 2^0 magnitudes
    if (rng.next() & 1) h |= 0x8000;
  }
  if (finite_only && (h & 0x7c00) == 0x7c00) h = 0x3c00;
  return h;
}

// ------------------------------------------------------------------ corruptions
const DType kDTypes[] = {DType::Int16, DType::Int32, DType::Int64, DType::UInt8, DType::Float16,
                         DType::BFloat16, DType::Float32, DType::Other};

void corrupt(FuzzedDataProvider& fdp, Rng& rng, std::vector<Tensor*>& ts) {
  const int ops = fdp.ConsumeIntegralInRange<int>(0, 5);
  for (int i = 0; i < ops && fdp.remaining_bytes() > 0; ++i) {
    Tensor& t = *ts[fdp.ConsumeIntegralInRange<std::size_t>(0, ts.size() - 1)];
    const int kind = fdp.ConsumeIntegralInRange<int>(0, 13);
    switch (kind) {
      case 0:
      case 1:
      case 2: {  // set one element (or a run) to a hostile value
        if (t.absent() || t.numel() <= 0) break;
        const int64_t n = t.numel();
        const int64_t at = fdp.ConsumeIntegralInRange<int64_t>(0, n - 1);
        static const int64_t vals[] = {0, 1, -1, 2, 3, 7, 8, 9, 16, 31, 32, 33, 64, 128, 255, 256,
                                       32767, -32768, 65535, 65536, INT32_MAX, INT32_MIN, 0x7c00, 0x7e00};
        int64_t val = fdp.ConsumeBool() ? vals[fdp.ConsumeIntegralInRange<std::size_t>(0, 23)]
                                        : fdp.ConsumeIntegral<int32_t>();
        const int64_t run = fdp.ConsumeIntegralInRange<int64_t>(1, 4);
        for (int64_t j = at; j < std::min(n, at + run); ++j) {
          switch (esize(t.v.dtype)) {
            case 1: t.p<std::uint8_t>()[j] = static_cast<std::uint8_t>(val); break;
            case 2: t.p<std::uint16_t>()[j] = static_cast<std::uint16_t>(val); break;
            case 4: t.p<std::uint32_t>()[j] = static_cast<std::uint32_t>(val); break;
            default: t.p<std::uint64_t>()[j] = static_cast<std::uint64_t>(val); break;
          }
        }
        break;
      }
      case 3: {  // change dtype (buffer resized to the new element size)
        t.v.dtype = kDTypes[fdp.ConsumeIntegralInRange<std::size_t>(0, 7)];
        realloc_for_shape(t);
        break;
      }
      case 4: {  // change one dimension
        if (t.v.shape.empty()) break;
        auto& d = t.v.shape[fdp.ConsumeIntegralInRange<std::size_t>(0, t.v.shape.size() - 1)];
        d = fdp.ConsumeBool() ? d + fdp.ConsumeIntegralInRange<int64_t>(-3, 3) : fdp.ConsumeIntegralInRange<int64_t>(-2, 300);
        int64_t n = 1;
        for (auto x : t.v.shape) n *= std::max<int64_t>(x, 1);
        if (n > kMaxElems) d = 1;
        realloc_for_shape(t);
        break;
      }
      case 5: {  // add or drop a dimension
        if (fdp.ConsumeBool() && !t.v.shape.empty()) t.v.shape.pop_back();
        else t.v.shape.insert(t.v.shape.begin(), fdp.ConsumeIntegralInRange<int64_t>(1, 2));
        int64_t n = 1;
        for (auto x : t.v.shape) n *= std::max<int64_t>(x, 1);
        if (n > kMaxElems) t.v.shape.assign(1, 1);
        realloc_for_shape(t);
        break;
      }
      case 6: {  // explicit strides: contiguous-equivalent, transposed, zero or negative
        t.v.strides.assign(t.v.shape.size(), 0);
        int64_t st = 1;
        for (int j = static_cast<int>(t.v.shape.size()) - 1; j >= 0; --j) {
          t.v.strides[j] = st;
          st *= t.v.shape[j];
        }
        const int mode = fdp.ConsumeIntegralInRange<int>(0, 3);
        if (mode == 1 && t.v.strides.size() >= 2) std::reverse(t.v.strides.begin(), t.v.strides.end());
        if (mode == 2 && !t.v.strides.empty()) t.v.strides[0] = 0;
        if (mode == 3 && !t.v.strides.empty()) t.v.strides.back() = -1;
        break;
      }
      case 7: t.v.data = nullptr; break;                  // null data, shape kept
      case 8: t.v.device = exl2::Device::cuda(0); break;  // a device the target isn't
      case 9: t.v = exl2::TensorView{}; break;  // absent (optional or required)
      case 10: {  // 0-D tensor holding one value
        t.v.shape.clear();
        t.v.strides.clear();
        realloc_for_shape(t);
        break;
      }
      case 11: {  // strides vector of the wrong length
        t.v.strides.assign(t.v.shape.size() + 1, 1);
        break;
      }
      case 12: {  // refill all values with garbage of the element size
        if (t.absent()) break;
        for (auto& w : t.mem) w = rng.next();
        break;
      }
      default: {  // size-1 dimension with an arbitrary stride (still contiguous)
        t.v.shape.insert(t.v.shape.begin(), 1);
        t.v.strides.assign(t.v.shape.size(), 0);
        int64_t st = 1;
        for (int j = static_cast<int>(t.v.shape.size()) - 1; j >= 0; --j) {
          t.v.strides[j] = st;
          st *= t.v.shape[j];
        }
        t.v.strides[0] = fdp.ConsumeIntegral<int32_t>();
        break;
      }
    }
    realloc_for_shape(t);  // the buffer always covers the claimed shape
  }
}

// ------------------------------------------------------------------ independent validation
bool contiguous(const exl2::TensorView& v) {
  if (v.strides.empty()) return true;
  if (v.strides.size() != v.shape.size()) return false;
  int64_t expect = 1;
  for (int i = static_cast<int>(v.shape.size()) - 1; i >= 0; --i) {
    if (v.shape[i] != 1 && v.strides[i] != expect) return false;
    expect *= v.shape[i];
  }
  return true;
}

bool ok_tensor(const Tensor& t, DType dt, std::size_t ndim) {
  if (t.absent()) return false;
  if (t.v.dtype != dt || t.v.shape.size() != ndim) return false;
  for (auto d : t.v.shape) if (d <= 0) return false;
  return contiguous(t.v) && t.v.data != nullptr && t.v.device.is_cpu();
}

bool finite_h(std::uint16_t h) { return (h & 0x7c00) != 0x7c00; }

struct RefLayer {
  int64_t K = 0, N = 0;
  std::vector<double> W;  // [K, N] fp16-exact values (NaN/Inf possible)
  std::vector<double> bias;
};

bool ref_bias(const Tensor& b, int64_t N, RefLayer& r) {
  if (b.absent()) return true;
  if (!ok_tensor(b, DType::Float16, 1) || b.v.shape[0] != N) return false;
  for (int64_t n = 0; n < N; ++n) {
    if (!finite_h(b.p<std::uint16_t>()[n])) return false;
    r.bias.push_back(h2d(b.p<std::uint16_t>()[n]));
  }
  return true;
}

void exl2_dense(const Tensor& qw, const Tensor& inv, const Tensor& qs, const std::uint16_t* qsmp, bool prescaled,
                const std::vector<int64_t>& bits, const std::vector<int64_t>& start, const std::vector<int64_t>& rows,
                int64_t K, int64_t N, RefLayer& r);

/// Returns false when the EXL2 tensors are invalid; else fills r with the dense weight.
bool ref_exl2(const Tensor& qw, const Tensor& inv, const Tensor& qs, const Tensor& qsm, const Tensor& qg,
              const Tensor& qp, const Tensor& bias, bool prescaled, RefLayer& r) {
  if (!ok_tensor(qw, DType::Int32, 2) || !ok_tensor(inv, DType::Int32, 1) || !ok_tensor(qs, DType::Int32, 2) ||
      !ok_tensor(qsm, DType::Float16, 1) || !ok_tensor(qg, DType::Int16, 1))
    return false;
  const int64_t Q = qw.v.shape[0], N = qw.v.shape[1];
  if (N % 8 || qg.v.shape[0] % 2) return false;
  const int64_t G = qg.v.shape[0] / 2;
  if (qs.v.shape != std::vector<int64_t>{G, N / 8} || qsm.v.shape != std::vector<int64_t>{G}) return false;
  const auto* groups = qg.p<std::int16_t>();
  std::vector<int64_t> bits(G), start(G + 1), rows(G);
  for (int64_t g = 0; g < G; ++g) {
    bits[g] = groups[2 * g];
    // Start rows are stored modulo 2^16 (int16): each is the smallest value with those low
    // 16 bits above the previous start (layers with more than 65536 word rows).
    start[g] = static_cast<std::uint16_t>(groups[2 * g + 1]);
    if (g > 0)
      while (start[g] <= start[g - 1]) start[g] += 65536;
    if (bits[g] != 2 && bits[g] != 3 && bits[g] != 4 && bits[g] != 5 && bits[g] != 6 && bits[g] != 8) return false;
  }
  start[G] = Q;
  if (start[0] != 0) return false;
  const int64_t K = inv.v.shape[0];
  int64_t used = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t words = start[g + 1] - start[g];
    if (words <= 0) return false;
    if (g + 1 < G) {
      if (words * 32 % bits[g]) return false;
      rows[g] = words * 32 / bits[g];
    } else {
      rows[g] = K - used;
      if (rows[g] < (words - 1) * 32 / bits[g] + 1 || rows[g] > words * 32 / bits[g]) return false;
    }
    used += rows[g];
  }
  const auto* invp = inv.p<std::int32_t>();
  std::vector<char> seen(K, 0);
  for (int64_t k = 0; k < K; ++k) {
    if (invp[k] < 0 || invp[k] >= K || seen[invp[k]]) return false;
    seen[invp[k]] = 1;
  }
  if (!qp.absent()) {
    if (!ok_tensor(qp, DType::Int32, 1) || qp.v.shape[0] != K) return false;
    for (int64_t k = 0; k < K; ++k)
      if (qp.p<std::int32_t>()[invp[k]] != k) return false;
  }
  const auto* qsmp = qsm.p<std::uint16_t>();
  for (int64_t g = 0; g < G; ++g)
    if (!finite_h(qsmp[g])) return false;
  if (!ref_bias(bias, N, r)) return false;

  exl2_dense(qw, inv, qs, qsmp, prescaled, bits, start, rows, K, N, r);
  return true;
}

EXL2_NO_COVERAGE void exl2_dense(const Tensor& qw, const Tensor& inv, const Tensor& qs, const std::uint16_t* qsmp,
                                 bool prescaled, const std::vector<int64_t>& bits, const std::vector<int64_t>& start,
                                 const std::vector<int64_t>& rows, int64_t K, int64_t N, RefLayer& r) {
  const int64_t G = static_cast<int64_t>(bits.size());
  const auto* invp = inv.p<std::int32_t>();
  // Dense weight: storage row r of group g, local index i, code at bit i*bits.
  r.K = K;
  r.N = N;
  std::vector<double> wp(K * N);
  const auto* words = qw.p<std::uint32_t>();
  const auto* sc = qs.p<std::uint32_t>();
  int64_t row = 0;
  std::vector<double> scale(N);
  for (int64_t g = 0; g < G; ++g) {
    const double qsmd = prescaled ? h2d(qsmp[g]) : round_h(h2d(qsmp[g]) / 256.0);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t code = (sc[g * (N / 8) + n / 8] >> (4 * (n % 8))) & 15;
      scale[n] = round_h(round_h(static_cast<double>((code + 1) * (code + 1))) * qsmd);
    }
    for (int64_t i = 0; i < rows[g]; ++i, ++row) {
      const int64_t off = i * bits[g], w = start[g] + off / 32, sh = off % 32;
      for (int64_t n = 0; n < N; ++n) {
        std::uint64_t v = words[w * N + n];
        if (sh + bits[g] > 32) v |= static_cast<std::uint64_t>(words[(w + 1) * N + n]) << 32;
        const int64_t q = static_cast<int64_t>((v >> sh) & ((1u << bits[g]) - 1));
        wp[row * N + n] = round_h(static_cast<double>(q - (int64_t{1} << (bits[g] - 1))) * scale[n]);
      }
    }
  }
  r.W.resize(K * N);
  for (int64_t k = 0; k < K; ++k)
    std::copy(wp.begin() + invp[k] * N, wp.begin() + (invp[k] + 1) * N, r.W.begin() + k * N);
}

/// Bit `pos` of a stream whose consecutive 32-bit words are p[0], p[stride], ...
EXL2_NO_COVERAGE std::uint32_t stream_bit(const std::uint32_t* p, int64_t stride, int64_t pos) {
  return (p[(pos / 32) * stride] >> (pos % 32)) & 1u;
}

/// GPTQ, `bits` wide: qweight [K*bits/32, N] (one bits-wide stream per column along K),
/// qzeros [G, N*bits/32] (one stream per row along N), scales [G, N], optional g_idx [K].
EXL2_NO_COVERAGE bool ref_gptq(const Tensor& qw, const Tensor& qz, const Tensor& sc, const Tensor& gi, const Tensor& bias, bool v2,
              int bits, RefLayer& r) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return false;
  if (!ok_tensor(qw, DType::Int32, 2) || !ok_tensor(qz, DType::Int32, 2) || !ok_tensor(sc, DType::Float16, 2))
    return false;
  if ((qw.v.shape[0] * 32) % bits) return false;
  const int64_t K = qw.v.shape[0] * 32 / bits, N = qw.v.shape[1], G = qz.v.shape[0];
  if (N % 8 || (N * bits) % 32) return false;
  if (qz.v.shape != std::vector<int64_t>{G, N * bits / 32} || sc.v.shape != std::vector<int64_t>{G, N}) return false;
  if (K % G) return false;  // any group size: the library realigns groups to words
  const auto* s = sc.p<std::uint16_t>();
  for (int64_t i = 0; i < G * N; ++i)
    if (!finite_h(s[i])) return false;
  std::vector<int64_t> grp(K);
  for (int64_t k = 0; k < K; ++k) grp[k] = k / (K / G);
  if (!gi.absent()) {
    if (!ok_tensor(gi, DType::Int32, 1) || gi.v.shape[0] != K) return false;
    std::vector<int64_t> count(G, 0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = gi.p<std::int32_t>()[k];
      if (g < 0 || g >= G) return false;
      ++count[g];
      grp[k] = g;
    }
    for (auto c : count)
      if (c != K / G) return false;
  }
  if (!ref_bias(bias, N, r)) return false;
  r.K = K;
  r.N = N;
  r.W.resize(K * N);
  const auto* q = qw.p<std::uint32_t>();
  const auto* z = qz.p<std::uint32_t>();
  const int64_t mask = (int64_t{1} << bits) - 1;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) {
      int64_t code = 0, zero = 0;
      for (int i = 0; i < bits; ++i) {
        code |= static_cast<int64_t>(stream_bit(q + n, N, k * bits + i)) << i;
        zero |= static_cast<int64_t>(stream_bit(z + grp[k] * (N * bits / 32), 1, n * bits + i)) << i;
      }
      if (!v2) zero = (zero + 1) & mask;
      r.W[k * N + n] = round_h(h2d(s[grp[k] * N + n]) * static_cast<double>(code - zero));
    }
  }
  return true;
}

/// AWQ 4-bit: qweight [K, N/8], qzeros [G, N/8] with column c of a word in nibble
/// {0, 4, 1, 5, 2, 6, 3, 7}[c % 8]; scales [G, N]; groups of K/G consecutive rows.
EXL2_NO_COVERAGE bool ref_awq(const Tensor& qw, const Tensor& qz, const Tensor& sc, const Tensor& bias, RefLayer& r) {
  if (!ok_tensor(qw, DType::Int32, 2) || !ok_tensor(qz, DType::Int32, 2) || !ok_tensor(sc, DType::Float16, 2))
    return false;
  const int64_t K = qw.v.shape[0], N = qw.v.shape[1] * 8, G = qz.v.shape[0];
  if (qz.v.shape[1] != N / 8 || sc.v.shape != std::vector<int64_t>{G, N} || K % G) return false;
  const auto* s = sc.p<std::uint16_t>();
  for (int64_t i = 0; i < G * N; ++i)
    if (!finite_h(s[i])) return false;
  if (!ref_bias(bias, N, r)) return false;
  static const int kNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  r.K = K;
  r.N = N;
  r.W.resize(K * N);
  const auto* q = qw.p<std::uint32_t>();
  const auto* z = qz.p<std::uint32_t>();
  for (int64_t k = 0; k < K; ++k) {
    const int64_t g = k / (K / G);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t code = (q[k * (N / 8) + n / 8] >> (4 * kNibble[n % 8])) & 15;
      const int64_t zero = (z[g * (N / 8) + n / 8] >> (4 * kNibble[n % 8])) & 15;
      r.W[k * N + n] = round_h(h2d(s[g * N + n]) * static_cast<double>(code - zero));
    }
  }
  return true;
}

// ------------------------------------------------------------------ checks on success
bool message_names(const char* msg, const std::vector<const char*>& names) {
  for (const char* n : names) {
    const std::size_t len = std::strlen(n);
    if (std::strncmp(msg, n, len) == 0 && msg[len] == ':') return true;
  }
  return std::strncmp(msg, "QMatrix.", 8) == 0;
}

template <typename Fn>
void expect_rejected_or_ok(Fn&& fn, const std::vector<const char*>& names, const char* what) {
  try {
    fn();
    ++g_stats.calls_ok;
  } catch (const exl2::InvalidArgument& e) {
    ++g_stats.calls_rejected;
    if (!message_names(e.what(), names)) finding(std::string(what) + ": message does not name an argument: " + e.what());
  } catch (const exl2::TypeMismatch& e) {
    ++g_stats.calls_rejected;
    if (!message_names(e.what(), names)) finding(std::string(what) + ": message does not name an argument: " + e.what());
  } catch (const std::exception& e) {
    finding(std::string(what) + ": unexpected exception type: " + e.what());
  } catch (...) {
    finding(std::string(what) + ": unexpected non-std exception");
  }
}

void set_env(const char* k, const char* v) {
  if (v) setenv(k, v, 1);
  else unsetenv(k);
}

std::vector<std::uint16_t> run_gemm(const exl2::QMatrix& q, const std::vector<std::uint16_t>& x, int64_t M,
                                    const char* scalar, const char* threads, DType dtype = DType::Float16) {
  set_env("EXL2_CPU_SCALAR", scalar);
  set_env("EXL2_CPU_THREADS", threads);
  std::vector<std::uint16_t> out(static_cast<std::size_t>(M * q.out_features()), 0xdead);
  exl2::TensorView xv;
  xv.data = x.data();
  xv.dtype = dtype;
  xv.shape = {M, q.in_features()};
  exl2::MutableTensorView ov;
  ov.data = out.data();
  ov.dtype = dtype;
  ov.shape = {M, q.out_features()};
  q.gemm(xv, ov);
  set_env("EXL2_CPU_SCALAR", nullptr);
  set_env("EXL2_CPU_THREADS", nullptr);
  return out;
}

EXL2_NO_COVERAGE bool same_bits_nan_aware(std::uint16_t a, std::uint16_t b) {
  if (!finite_h(a) && (a & 1023) && !finite_h(b) && (b & 1023)) return true;  // any NaN == any NaN
  return a == b;
}

EXL2_NO_COVERAGE bool same_bits_nan_aware_bf16(std::uint16_t a, std::uint16_t b) {
  const auto is_nan = [](std::uint16_t v) { return (v & 0x7f80u) == 0x7f80u && (v & 0x7fu) != 0; };
  if (is_nan(a) && is_nan(b)) return true;
  return a == b;
}

/// The dense weight in `dtype` from the dispatched (AVX2 where available) and from the
/// scalar dequantize kernel; every element starts as 0xdead, so an unwritten one shows.
EXL2_NO_COVERAGE std::pair<std::vector<std::uint16_t>, std::vector<std::uint16_t>> dequantize_dispatched_and_scalar(
    const exl2::QMatrix& q, DType dtype) {
  const int64_t K = q.in_features(), N = q.out_features();
  std::vector<std::uint16_t> w(static_cast<std::size_t>(K * N), 0xdead), w_scalar(w);
  exl2::MutableTensorView wv;
  wv.data = w.data();
  wv.dtype = dtype;
  wv.shape = {K, N};
  q.dequantize(wv);
  set_env("EXL2_CPU_SCALAR", "1");
  wv.data = w_scalar.data();
  q.dequantize(wv);
  set_env("EXL2_CPU_SCALAR", nullptr);
  return {std::move(w), std::move(w_scalar)};
}

/// bfloat16: dequantize and gemm agree bit for bit across the AVX2/scalar kernels and
/// thread counts. x reuses the fp16 bit patterns as bfloat16 values (every pattern is a
/// value, spanning fp32's exponent range: over- and underflow in the products).
EXL2_NO_COVERAGE void check_bf16_paths(const exl2::QMatrix& q, const std::vector<std::uint16_t>& x, int64_t M) {
  const auto [w, w_scalar] = dequantize_dispatched_and_scalar(q, DType::BFloat16);
  if (w != w_scalar) finding("bf16 dequantize: AVX2 and scalar kernels differ");
  const auto y_avx = run_gemm(q, x, M, nullptr, "1", DType::BFloat16);
  const auto y_scalar = run_gemm(q, x, M, "1", "1", DType::BFloat16);
  const auto y_threads = run_gemm(q, x, M, nullptr, "3", DType::BFloat16);
  for (std::size_t i = 0; i < y_avx.size(); ++i) {
    if (!same_bits_nan_aware_bf16(y_avx[i], y_scalar[i])) finding("bf16 gemm: AVX2 and scalar kernels differ");
    if (!same_bits_nan_aware_bf16(y_avx[i], y_threads[i])) finding("bf16 gemm: 1 and 3 threads differ");
  }
}

EXL2_NO_COVERAGE void check_accepted(const exl2::QMatrix& q, const RefLayer& ref, FuzzedDataProvider& fdp, Rng& rng) {
  if (q.in_features() != ref.K || q.out_features() != ref.N) finding("in/out_features differ from the reference");
  if (q.has_bias() != !ref.bias.empty()) finding("has_bias differs from the reference");
  const int64_t K = ref.K, N = ref.N;

  // dequantize == reference, bit for bit (AVX2 and scalar kernels alike)
  const auto [w, w_scalar] = dequantize_dispatched_and_scalar(q, DType::Float16);
  if (w != w_scalar) finding("dequantize: AVX2 and scalar kernels differ");
  bool finite_w = true;
  for (int64_t i = 0; i < K * N; ++i) {
    const double rv = ref.W[i];
    const std::uint16_t expect = d2h_bits(rv);
    if (!same_bits_nan_aware(w[i], expect)) {
      finding("dequantize differs from the reference at element " + std::to_string(i) + ": got 0x" +
              std::to_string(w[i]) + ", expected 0x" + std::to_string(expect));
    }
    finite_w = finite_w && std::isfinite(rv);
  }

  // Layers with more than 65536 word rows are here for their start rows (validation and
  // layout, which dequantize covers); their GEMMs would only slow the campaign down.
  if (K * N > (int64_t{1} << 20)) return;

  // gemm on a small x: kernels and thread counts agree bit for bit, and match float64
  const int64_t M = fdp.ConsumeIntegralInRange<int64_t>(1, 9);
  std::vector<std::uint16_t> x(static_cast<std::size_t>(M * K));
  const bool hostile_x = fdp.ConsumeIntegralInRange<int>(0, 7) == 0;
  for (auto& h : x) h = fuzz_half(fdp, rng, !hostile_x);
  const auto y_avx = run_gemm(q, x, M, nullptr, "1");
  const auto y_scalar = run_gemm(q, x, M, "1", "1");
  const auto y_threads = run_gemm(q, x, M, nullptr, "3");
  for (std::size_t i = 0; i < y_avx.size(); ++i) {
    if (!same_bits_nan_aware(y_avx[i], y_scalar[i])) finding("gemm: AVX2 and scalar kernels differ");
    if (!same_bits_nan_aware(y_avx[i], y_threads[i])) finding("gemm: 1 and 3 threads differ");
  }
  check_bf16_paths(q, x, M);
  if (!finite_w) return;
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      double exact = ref.bias.empty() ? 0.0 : ref.bias[n], mag = std::fabs(exact);
      for (int64_t k = 0; k < K; ++k) {
        const double xv = h2d(x[i * K + k]);
        exact += xv * ref.W[k * N + n];  // IEEE in float64: same NaN/Inf outcome as fp32
        if (std::isfinite(xv)) mag += std::fabs(xv * ref.W[k * N + n]);
      }
      const double got = h2d(y_avx[i * N + n]);
      if (!std::isfinite(exact)) {
        // NaN/Inf activations propagate as in IEEE: NaN -> NaN, +-Inf -> the same infinity.
        const bool ok = std::isnan(exact) ? std::isnan(got) : (std::isinf(got) && std::signbit(got) == std::signbit(exact));
        if (!ok) {
          finding("gemm: non-finite propagation differs from IEEE at (" + std::to_string(i) + ", " + std::to_string(n) +
                  "): got " + std::to_string(got) + ", expected " + std::to_string(exact));
        }
        continue;
      }
      const double tol = mag * (K + 2) * std::ldexp(1.0, -23);  // fp32 accumulation bound
      if (std::fabs(exact) + tol >= 65504.0) continue;           // near/over the fp16 range
      const double lo = round_h(exact - tol), hi = round_h(exact + tol);
      if (!(got >= lo - std::ldexp(1.0, -24) && got <= hi + std::ldexp(1.0, -24))) {
        finding("gemm differs from the float64 product beyond the fp32 accumulation bound at (" + std::to_string(i) +
                ", " + std::to_string(n) + "): got " + std::to_string(got) + ", exact " + std::to_string(exact));
      }
    }
  }
}

void hostile_calls(exl2::QMatrix& q, FuzzedDataProvider& fdp) {
  const std::vector<const char*> names = {"x", "out"};
  const int64_t K = q.in_features(), N = q.out_features();
  const int ops = fdp.ConsumeIntegralInRange<int>(0, 3);
  for (int i = 0; i < ops; ++i) {
    const int64_t M = fdp.ConsumeIntegralInRange<int64_t>(0, 4);
    int64_t xk = K, on = N, om = M;
    const int kind = fdp.ConsumeIntegralInRange<int>(0, 9);
    if (kind == 0) xk = std::max<int64_t>(0, K + fdp.ConsumeIntegralInRange<int64_t>(-2, 2));
    if (kind == 1) on = std::max<int64_t>(0, N + fdp.ConsumeIntegralInRange<int64_t>(-2, 2));
    if (kind == 2) om = M + 1;
    // x and out live in one buffer (x first) so that an overlap can be requested.
    const DType xdt = kind == 3 ? DType::Float32 : DType::Float16;
    const int64_t x_elems16 = M * xk * (xdt == DType::Float32 ? 2 : 1), out_elems = om * on;
    std::vector<std::uint16_t> buf(static_cast<std::size_t>(x_elems16 + out_elems + 16), 0x3c00);
    exl2::TensorView xv;
    xv.data = buf.data();
    xv.dtype = xdt;
    xv.shape = {M, xk};
    exl2::MutableTensorView ov;
    ov.data = buf.data() + x_elems16;
    ov.dtype = kind == 4 ? DType::BFloat16 : DType::Float16;
    ov.shape = {om, on};
    if (kind == 5 && x_elems16 > 0) ov.data = buf.data() + fdp.ConsumeIntegralInRange<int64_t>(0, x_elems16 - 1);
    if (kind == 6) (fdp.ConsumeBool() ? xv.data : ov.data) = nullptr;
    if (kind == 7) (fdp.ConsumeBool() ? xv.device : ov.device) = exl2::Device::cuda(0);
    if (kind == 8) xv.strides = {1, std::max<int64_t>(M, 1)};
    if (kind == 9) xv.shape = {M, 1, xk};
    expect_rejected_or_ok([&] { q.gemm(xv, ov); }, names, "gemm");
  }
  if (fdp.ConsumeBool()) {  // dequantize into a wrong out
    std::vector<std::uint16_t> w(static_cast<std::size_t>(K * N + 8));
    exl2::MutableTensorView ov;
    ov.data = w.data();
    ov.dtype = DType::Float16;
    ov.shape = {K, N - fdp.ConsumeIntegralInRange<int64_t>(0, 1)};
    expect_rejected_or_ok([&] { q.dequantize(ov); }, names, "dequantize");
  }
  if (fdp.ConsumeBool()) {  // closed: everything but closed() throws InvalidArgument
    exl2::QMatrix moved = std::move(q);
    moved.close();
    if (!moved.closed() || !q.closed()) finding("close/move: closed() is false");
    expect_rejected_or_ok([&] { (void)moved.in_features(); }, names, "closed in_features");
    std::vector<std::uint16_t> w(static_cast<std::size_t>(K * N));
    exl2::MutableTensorView ov;
    ov.data = w.data();
    ov.dtype = DType::Float16;
    ov.shape = {K, N};
    bool threw = false;
    try {
      moved.dequantize(ov);
    } catch (const exl2::InvalidArgument&) {
      threw = true;
    }
    if (!threw) finding("dequantize on a closed QMatrix did not throw InvalidArgument");
  }
}

// ------------------------------------------------------------------ the two formats
int64_t rows_unit(int bits) { return 32 / std::gcd(bits, 32); }


/// Runs a construction `build(device)` (on CUDA device 0 when `cuda_target`, else the CPU)
/// and applies the oracles to its outcome: only InvalidArgument / TypeMismatch escape,
/// naming one of `names` (Unsupported only for a CUDA target); the library agrees with the
/// reference validator's verdict `valid`; an accepted CPU layer passes check_accepted and,
/// when `hostile`, hostile_calls. `what` names the entry point in findings; `ok` and
/// `rejected` are its counters in g_stats.
template <class Build>
void construct_and_check(const char* what, Build&& build, bool cuda_target, bool valid, const RefLayer& ref,
                         const std::vector<const char*>& names, long& ok, long& rejected, bool hostile,
                         FuzzedDataProvider& fdp, Rng& rng) {
  const std::string fn(what);
  auto on_rejected = [&](const char* message) {
    ++rejected;
    if (!message_names(message, names)) finding(fn + ": message does not name an argument: " + message);
    if (valid && !cuda_target) finding(fn + " rejected valid tensors: " + message);
  };
  try {
    auto q = build(cuda_target ? exl2::Device::cuda(0) : exl2::Device::cpu());
    if (cuda_target) return;  // a GPU build with a device: nothing more to check here
    if (!valid) finding(fn + " accepted tensors the reference validator rejects");
    ++ok;
    check_accepted(q, ref, fdp, rng);
    if (hostile) hostile_calls(q, fdp);
  } catch (const exl2::Unsupported& e) {
    ++g_stats.unsupported;
    if (!cuda_target) finding(fn + ": Unsupported for a CPU target: " + e.what());
  } catch (const exl2::InvalidArgument& e) {
    on_rejected(e.what());
  } catch (const exl2::TypeMismatch& e) {
    on_rejected(e.what());
  }
}

void fuzz_exl2(FuzzedDataProvider& fdp, Rng& rng) {
  static const int kBits[] = {8, 6, 5, 4, 3, 2};
  // Rarely, a layer with more than 65536 word rows: its int16 start rows wrap around. Such a
  // layer costs ~0.25 s per execution, so it is only built when EXL2_FUZZ_HUGE is set (a
  // dedicated campaign; the byte is consumed either way, so inputs decode the same).
  static const bool huge_enabled = std::getenv("EXL2_FUZZ_HUGE") != nullptr;
  const bool huge = fdp.ConsumeIntegralInRange<int>(0, 255) == 255 && huge_enabled;
  const int64_t N = huge ? 8 : 8 * fdp.ConsumeIntegralInRange<int64_t>(1, 6);
  const int64_t G = fdp.ConsumeIntegralInRange<int64_t>(1, huge ? 3 : 5);
  const int64_t huge_group = huge ? fdp.ConsumeIntegralInRange<int64_t>(0, G - 1) : -1;
  std::vector<int64_t> bits(G), rows(G), words(G), start(G);
  int64_t Q = 0, K = 0;
  for (int64_t g = 0; g < G; ++g) {
    bits[g] = kBits[fdp.ConsumeIntegralInRange<int>(0, huge ? 1 : 5)];
    const int64_t unit = rows_unit(static_cast<int>(bits[g]));
    const int64_t words_per_unit = unit * bits[g] / 32;
    if (g == huge_group) {  // about 65536 words, give or take a few hundred
      const int64_t target = 65536 + fdp.ConsumeIntegralInRange<int64_t>(-300, 300);
      rows[g] = unit * ((target + words_per_unit - 1) / words_per_unit);
      if (g + 1 == G) rows[g] -= fdp.ConsumeIntegralInRange<int64_t>(0, unit - 1);
    } else {
      rows[g] = g + 1 < G ? unit * fdp.ConsumeIntegralInRange<int64_t>(1, 4) : fdp.ConsumeIntegralInRange<int64_t>(1, 70);
    }
    words[g] = (rows[g] * bits[g] + 31) / 32;
    start[g] = Q;
    Q += words[g];
    K += rows[g];
  }
  Tensor qw = make(DType::Int32, {Q, N}), inv = make(DType::Int32, {K}), qs = make(DType::Int32, {G, N / 8}),
         qsm = make(DType::Float16, {G}), qg = make(DType::Int16, {2 * G});
  for (int64_t i = 0; i < Q * N; ++i) qw.p<std::uint32_t>()[i] = static_cast<std::uint32_t>(rng.next());
  for (int64_t i = 0; i < G * N / 8; ++i) qs.p<std::uint32_t>()[i] = static_cast<std::uint32_t>(rng.next());
  const bool prescaled = fdp.ConsumeBool();
  for (int64_t g = 0; g < G; ++g) {
    qg.p<std::int16_t>()[2 * g] = static_cast<std::int16_t>(bits[g]);
    qg.p<std::int16_t>()[2 * g + 1] = static_cast<std::int16_t>(start[g]);
    qsm.p<std::uint16_t>()[g] = fuzz_half(fdp, rng, false);
  }
  auto* ip = inv.p<std::int32_t>();
  std::iota(ip, ip + K, 0);
  if (fdp.ConsumeBool())
    for (int64_t k = K - 1; k > 0; --k) std::swap(ip[k], ip[rng.next() % (k + 1)]);
  Tensor qp = absent_tensor(), bias = absent_tensor();
  if (fdp.ConsumeBool()) {
    qp = make(DType::Int32, {K});
    for (int64_t k = 0; k < K; ++k) qp.p<std::int32_t>()[ip[k]] = static_cast<std::int32_t>(k);
  }
  if (fdp.ConsumeBool()) {
    bias = make(DType::Float16, {N});
    for (int64_t n = 0; n < N; ++n) bias.p<std::uint16_t>()[n] = fuzz_half(fdp, rng, false);
  }
  std::vector<Tensor*> ts = {&qw, &inv, &qs, &qsm, &qg, &qp, &bias};
  corrupt(fdp, rng, ts);

  exl2::Exl2Weights w;
  w.q_weight = qw.v;
  w.q_invperm = inv.v;
  w.q_scale = qs.v;
  w.q_scale_max = qsm.v;
  w.q_groups = qg.v;
  w.q_perm = qp.v;
  w.bias = bias.v;
  w.scale_max_prescaled = prescaled;
  const bool cuda_target = fdp.ConsumeIntegralInRange<int>(0, 31) == 31;
  RefLayer ref;
  const bool valid = ref_exl2(qw, inv, qs, qsm, qg, qp, bias, prescaled, ref);
  const std::vector<const char*> names = {"q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "q_perm", "bias"};
  construct_and_check("from_exl2", [&](exl2::Device d) { return exl2::QMatrix::from_exl2(w, d); }, cuda_target, valid, ref,
                      names, g_stats.exl2_ok, g_stats.exl2_rejected, !huge, fdp, rng);
}

void fuzz_gptq(FuzzedDataProvider& fdp, Rng& rng) {
  // Width: mostly 4 bits; N and the packed row count follow the width's packing rules
  // (corruptions and the occasional wrong `bits` argument make invalid cases).
  static const int kWidths[8] = {4, 4, 4, 4, 4, 2, 3, 8};
  const int b = kWidths[fdp.ConsumeIntegralInRange<int>(0, 7)];
  const int64_t n_unit = b == 3 ? 32 : b == 2 ? 16 : 8;
  const int64_t N = n_unit * fdp.ConsumeIntegralInRange<int64_t>(1, b == 3 ? 2 : 6 * 8 / n_unit);
  const int64_t G = fdp.ConsumeIntegralInRange<int64_t>(1, 5);
  const int64_t gs = 8 * fdp.ConsumeIntegralInRange<int64_t>(1, 6);
  const int64_t K = G * gs;
  const int64_t rows = (K * b + 31) / 32;
  Tensor qw = make(DType::Int32, {rows, N}), qz = make(DType::Int32, {G, N * b / 32}),
         sc = make(DType::Float16, {G, N});
  for (int64_t i = 0; i < rows * N; ++i) qw.p<std::uint32_t>()[i] = static_cast<std::uint32_t>(rng.next());
  for (int64_t i = 0; i < G * (N * b / 32); ++i) qz.p<std::uint32_t>()[i] = static_cast<std::uint32_t>(rng.next());
  const bool hostile_scales = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  for (int64_t i = 0; i < G * N; ++i)
    sc.p<std::uint16_t>()[i] = hostile_scales ? fuzz_half(fdp, rng, false)
                                              : static_cast<std::uint16_t>(0x1400 + rng.next() % 0x1000);
  Tensor gi = absent_tensor(), bias = absent_tensor();
  const int gmode = fdp.ConsumeIntegralInRange<int>(0, 2);  // absent, ordered, act-order
  if (gmode) {
    gi = make(DType::Int32, {K});
    auto* p = gi.p<std::int32_t>();
    for (int64_t k = 0; k < K; ++k) p[k] = static_cast<std::int32_t>(k / gs);
    if (gmode == 2)
      for (int64_t k = K - 1; k > 0; --k) std::swap(p[k], p[rng.next() % (k + 1)]);
  }
  if (fdp.ConsumeBool()) {
    bias = make(DType::Float16, {N});
    for (int64_t n = 0; n < N; ++n) bias.p<std::uint16_t>()[n] = fuzz_half(fdp, rng, false);
  }
  const bool v2 = fdp.ConsumeBool();
  static const int kBitsArgs[8] = {0, 1, 2, 3, 4, 5, 8, 16};
  const int bits_arg = fdp.ConsumeIntegralInRange<int>(0, 15) == 0 ? kBitsArgs[fdp.ConsumeIntegralInRange<int>(0, 7)]
                                                                   : b;
  std::vector<Tensor*> ts = {&qw, &qz, &sc, &gi, &bias};
  corrupt(fdp, rng, ts);

  exl2::GptqWeights w;
  w.qweight = qw.v;
  w.qzeros = qz.v;
  w.scales = sc.v;
  w.g_idx = gi.v;
  w.bias = bias.v;
  w.zero_format = v2 ? exl2::ZeroFormat::V2 : exl2::ZeroFormat::V1;
  w.bits = bits_arg;
  const bool cuda_target = fdp.ConsumeIntegralInRange<int>(0, 31) == 31;
  RefLayer ref;
  const bool valid = ref_gptq(qw, qz, sc, gi, bias, v2, bits_arg, ref);
  const std::vector<const char*> names = {"qweight", "qzeros", "scales", "g_idx", "bias", "bits"};
  construct_and_check("from_gptq", [&](exl2::Device d) { return exl2::QMatrix::from_gptq(w, d); }, cuda_target, valid, ref,
                      names, g_stats.gptq_ok, g_stats.gptq_rejected, true, fdp, rng);
}

void fuzz_awq(FuzzedDataProvider& fdp, Rng& rng) {
  const int64_t N = 8 * fdp.ConsumeIntegralInRange<int64_t>(1, 6);
  const int64_t G = fdp.ConsumeIntegralInRange<int64_t>(1, 5);
  const int64_t gs = fdp.ConsumeIntegralInRange<int64_t>(1, 40);  // any size: groups need not fill words
  const int64_t K = G * gs;
  Tensor qw = make(DType::Int32, {K, N / 8}), qz = make(DType::Int32, {G, N / 8}), sc = make(DType::Float16, {G, N});
  for (int64_t i = 0; i < K * N / 8; ++i) qw.p<std::uint32_t>()[i] = static_cast<std::uint32_t>(rng.next());
  for (int64_t i = 0; i < G * N / 8; ++i) qz.p<std::uint32_t>()[i] = static_cast<std::uint32_t>(rng.next());
  const bool hostile_scales = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  for (int64_t i = 0; i < G * N; ++i)
    sc.p<std::uint16_t>()[i] = hostile_scales ? fuzz_half(fdp, rng, false)
                                              : static_cast<std::uint16_t>(0x1400 + rng.next() % 0x1000);
  Tensor bias = absent_tensor();
  if (fdp.ConsumeBool()) {
    bias = make(DType::Float16, {N});
    for (int64_t n = 0; n < N; ++n) bias.p<std::uint16_t>()[n] = fuzz_half(fdp, rng, false);
  }
  std::vector<Tensor*> ts = {&qw, &qz, &sc, &bias};
  corrupt(fdp, rng, ts);

  exl2::AwqWeights w;
  w.qweight = qw.v;
  w.qzeros = qz.v;
  w.scales = sc.v;
  w.bias = bias.v;
  const bool cuda_target = fdp.ConsumeIntegralInRange<int>(0, 31) == 31;
  RefLayer ref;
  const bool valid = ref_awq(qw, qz, sc, bias, ref);
  const std::vector<const char*> names = {"qweight", "qzeros", "scales", "bias"};
  construct_and_check("from_awq", [&](exl2::Device d) { return exl2::QMatrix::from_awq(w, d); }, cuda_target, valid, ref,
                      names, g_stats.awq_ok, g_stats.awq_rejected, true, fdp, rng);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider fdp(data, size);
  Rng rng(fdp.ConsumeIntegral<std::uint32_t>());
  try {
    if (fdp.ConsumeBool()) fuzz_exl2(fdp, rng);
    else if (fdp.ConsumeIntegralInRange<int>(0, 3) != 3) fuzz_gptq(fdp, rng);
    else fuzz_awq(fdp, rng);
  } catch (const std::exception& e) {
    finding(std::string("unexpected exception escaped: ") + e.what());
  }
  return 0;
}
