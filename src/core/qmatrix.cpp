// QMatrix: validation, ownership and backend dispatch.
#include "exl2/qmatrix.hpp"

#include <utility>
#include <vector>

#include "core/check.hpp"
#include "core/cuda_backend.hpp"
#include "core/layer.hpp"
#include "core/validate.hpp"
#include "cpu/cpu_backend.hpp"

namespace exl2 {

using detail::fail_type;
using detail::fail_value;

struct QMatrix::Impl {
  detail::LayerMeta meta;
  Device device;
  detail::HostArrays host;             // CPU backend storage
  detail::cuda::DeviceLayerPtr cuda;   // CUDA backend storage
};

namespace {

void check_target(Device device) {
  if (device.is_cuda()) detail::cuda::check_device(device.index);
}

}  // namespace

QMatrix::QMatrix(std::shared_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {}
QMatrix::QMatrix(QMatrix&&) noexcept = default;
QMatrix& QMatrix::operator=(QMatrix&&) noexcept = default;
QMatrix::~QMatrix() = default;

QMatrix QMatrix::from_exl2(const Exl2Weights& w, Device device, cudaStream_t stream) {
  check_target(device);
  auto v = detail::validate_exl2(w, device, stream);
  auto impl = std::make_shared<Impl>();
  impl->device = device;
  if (device.is_cpu()) {
    impl->host = detail::cpu::build_exl2(v);
  } else {
    const detail::Exl2Raw raw{v.q_weight, v.q_scale, v.qsm_div256.data()};
    impl->cuda = detail::cuda::build_exl2(v.meta, raw, device.index, stream);
  }
  impl->meta = std::move(v.meta);
  return QMatrix(std::move(impl));
}

namespace {

/// `t`'s data as host memory: the tensor itself on the CPU, else a copy kept in `keep`.
template <class T>
const T* host_data(const TensorView& t, std::vector<T>& keep, cudaStream_t stream) {
  if (t.device.is_cpu()) return static_cast<const T*>(t.data);
  keep = detail::read_small<T>(t, stream);
  return keep.data();
}

/// Builds a CUDA layer through the host (GPTQ 2/3/8-bit, unaligned GPTQ groups, AWQ):
/// device-resident tensors are copied down, `cpu_build` makes the canonical arrays from
/// the validated views `v`, and build_canonical uploads them (see src/cuda/README.md).
template <class Validated, class Weights, class CpuBuild>
detail::cuda::DeviceLayerPtr build_cuda_via_host(Validated& v, const Weights& w, CpuBuild&& cpu_build, int device,
                                                 cudaStream_t stream) {
  std::vector<std::int32_t> qweight, qzeros;
  std::vector<std::uint16_t> scales;
  v.qweight = host_data(w.qweight, qweight, stream);
  v.qzeros = host_data(w.qzeros, qzeros, stream);
  v.scales = host_data(w.scales, scales, stream);
  const detail::HostArrays host = cpu_build(v);
  return detail::cuda::build_canonical(v.meta, host, device, stream);
}

}  // namespace

QMatrix QMatrix::from_gptq(const GptqWeights& w, Device device, cudaStream_t stream) {
  check_target(device);
  auto v = detail::validate_gptq(w, device, stream);
  auto impl = std::make_shared<Impl>();
  impl->device = device;
  const bool aligned = v.meta.Q * 32 == v.meta.K * v.bits;
  if (device.is_cpu()) {
    impl->host = detail::cpu::build_gptq(v);
  } else if (v.bits == 4 && aligned) {
    const detail::GptqRaw raw{v.qweight, v.qzeros, v.scales, v.zero_offset};
    impl->cuda = detail::cuda::build_gptq(v.meta, raw, device.index, stream);
  } else {
    // Other widths and unaligned group sizes: through the host.
    impl->cuda = build_cuda_via_host(v, w, detail::cpu::build_gptq, device.index, stream);
  }
  impl->meta = std::move(v.meta);
  return QMatrix(std::move(impl));
}

QMatrix QMatrix::from_awq(const AwqWeights& w, Device device, cudaStream_t stream) {
  check_target(device);
  auto v = detail::validate_awq(w, device, stream);
  auto impl = std::make_shared<Impl>();
  impl->device = device;
  if (device.is_cpu()) {
    impl->host = detail::cpu::build_awq(v);
  } else {
    impl->cuda = build_cuda_via_host(v, w, detail::cpu::build_awq, device.index, stream);
  }
  impl->meta = std::move(v.meta);
  return QMatrix(std::move(impl));
}

std::shared_ptr<const QMatrix::Impl> QMatrix::impl(const char* what) const {
  std::shared_ptr<const Impl> p = std::atomic_load(&impl_);
  if (!p) fail_value("QMatrix.", what, ": the QMatrix is closed (its memory was released)");
  return p;
}

std::int64_t QMatrix::in_features() const { return impl("in_features")->meta.K; }
std::int64_t QMatrix::out_features() const { return impl("out_features")->meta.N; }
Format QMatrix::format() const { return impl("format")->meta.format; }
Device QMatrix::device() const { return impl("device")->device; }
bool QMatrix::has_bias() const { return !impl("has_bias")->meta.bias.empty(); }

double QMatrix::bits_per_weight() const {
  const auto held = impl("bits_per_weight");
  const auto& m = held->meta;
  const double weights = static_cast<double>(m.K) * static_cast<double>(m.N);
  double bits = 32.0 * static_cast<double>(m.Q) * static_cast<double>(m.N);  // codes
  if (m.format == Format::EXL2) {
    bits += 4.0 * static_cast<double>(m.G) * static_cast<double>(m.N) + 16.0 * static_cast<double>(m.G);  // scale codes + max
  } else {
    // GPTQ / AWQ: codes as stored (K * b bits per column, not the canonical padding),
    // fp16 scales and b-bit zeros per (group, column).
    const double b = static_cast<double>(m.bits.empty() ? 4 : m.bits[0]);
    bits = b * weights + (16.0 + b) * static_cast<double>(m.G) * static_cast<double>(m.N);
  }
  return bits / weights;
}

bool QMatrix::tensor_core_layout() const {
  const auto held = impl("tensor_core_layout");
  return held->cuda ? detail::cuda::tensor_core_layout(*held->cuda) : false;
}

std::size_t QMatrix::nbytes() const {
  const auto held = impl("nbytes");  // keeps the memory alive during the call
  const auto& im = *held;
  if (im.cuda) return detail::cuda::nbytes(*im.cuda);
  const auto& m = im.meta;
  return im.host.qweight.size() * 4 + im.host.scales.size() * 2 + im.host.zeros.size() + m.perm.size() * 4 +
         m.bias.size() * 2 + (m.bits.size() + m.row_start.size() + m.word_start.size()) * 4;
}

namespace {

bool is_activation_dtype(DType t) { return t == DType::Float16 || t == DType::BFloat16; }

/// `dtype`: the dtype out must have (gemm: x's), or DType::Other for "float16 or bfloat16".
void check_output(const MutableTensorView& out, const char* name, const std::vector<std::int64_t>& shape,
                  const char* symbolic, Device device, DType dtype) {
  if (dtype == DType::Other) {
    if (!is_activation_dtype(out.dtype)) {
      fail_type(name, ": expected dtype float16 or bfloat16, got ", dtype_name(out.dtype));
    }
  } else if (out.dtype != dtype) {
    fail_type(name, ": expected dtype ", dtype_name(dtype), " (the dtype of x), got ", dtype_name(out.dtype));
  }
  if (out.shape != shape) {
    TensorView e;
    e.shape = shape;
    fail_value(name, ": expected shape ", symbolic, " = ", e.shape_str(), ", got ", out.shape_str());
  }
  if (!out.is_contiguous()) fail_value(name, ": expected a contiguous (row-major) tensor");
  if (out.device != device) {
    fail_value(name, ": expected a tensor on ", device.str(), " (the QMatrix's device), got one on ", out.device.str());
  }
  if (out.data == nullptr && out.numel() > 0) fail_value(name, ": data pointer is null");
}

}  // namespace

void QMatrix::dequantize(const MutableTensorView& out, cudaStream_t stream) const {
  const auto held = impl("dequantize");  // keeps the memory alive during the call
  const auto& im = *held;
  check_output(out, "out", {im.meta.K, im.meta.N}, "[K, N]", im.device, DType::Other);
  const bool bf16 = out.dtype == DType::BFloat16;
  if (im.cuda) {
    detail::cuda::dequantize(*im.cuda, im.meta, out.mutable_data(), bf16, stream);
  } else {
    detail::cpu::dequantize(im.meta, im.host, static_cast<std::uint16_t*>(out.mutable_data()), bf16);
  }
}

void QMatrix::gemm(const TensorView& x, const MutableTensorView& out, cudaStream_t stream) const {
  const auto held = impl("gemm");  // keeps the memory alive during the call
  const auto& im = *held;
  const auto& m = im.meta;
  if (!is_activation_dtype(x.dtype)) fail_type("x: expected dtype float16 or bfloat16, got ", dtype_name(x.dtype));
  if (x.ndim() != 2 || x.shape[1] != m.K) {
    fail_value("x: expected shape [M, K] with K = ", m.K, " (in_features), got ", x.shape_str());
  }
  if (!x.is_contiguous()) fail_value("x: expected a contiguous (row-major) tensor");
  if (x.device != im.device) {
    fail_value("x: expected a tensor on ", im.device.str(), " (the QMatrix's device), got one on ", x.device.str());
  }
  const std::int64_t rows = x.shape[0];
  if (x.data == nullptr && rows > 0) fail_value("x: data pointer is null");
  check_output(out, "out", {rows, m.N}, "[M, N]", im.device, x.dtype);
  const bool bf16 = x.dtype == DType::BFloat16;
  if (rows == 0) return;
  // out must not overlap x: the kernels read x while writing out.
  const auto* xb = static_cast<const char*>(x.data);
  const auto* ob = static_cast<const char*>(out.data);
  const std::size_t xbytes = static_cast<std::size_t>(rows * m.K) * 2, obytes = static_cast<std::size_t>(rows * m.N) * 2;
  if (xb < ob + obytes && ob < xb + xbytes) fail_value("out: must not overlap x");
  if (im.cuda) {
    detail::cuda::gemm(*im.cuda, m, x.data, rows, out.mutable_data(), bf16, stream);
  } else {
    detail::cpu::gemm(m, im.host, static_cast<const std::uint16_t*>(x.data), rows,
                      static_cast<std::uint16_t*>(out.mutable_data()), bf16);
  }
}

void QMatrix::close() noexcept { std::atomic_store(&impl_, std::shared_ptr<Impl>()); }
bool QMatrix::closed() const noexcept { return !std::atomic_load(&impl_); }

}  // namespace exl2
