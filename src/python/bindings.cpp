// nanobind bindings of the exl2 C++ API. This file only binds: conversions from
// DLPack views (nb::ndarray) to exl2::TensorView and exception mapping.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>

#include "exl2/exl2.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using InArray = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;
using OptArray = std::optional<InArray>;

exl2::DType to_dtype(nb::dlpack::dtype t) {
  using code = nb::dlpack::dtype_code;
  if (t.lanes != 1) return exl2::DType::Other;
  switch (static_cast<code>(t.code)) {
    case code::Int:
      return t.bits == 16 ? exl2::DType::Int16 : t.bits == 32 ? exl2::DType::Int32 : t.bits == 64 ? exl2::DType::Int64 : exl2::DType::Other;
    case code::UInt: return t.bits == 8 ? exl2::DType::UInt8 : exl2::DType::Other;
    case code::Float: return t.bits == 16 ? exl2::DType::Float16 : t.bits == 32 ? exl2::DType::Float32 : exl2::DType::Other;
    case code::Bfloat: return t.bits == 16 ? exl2::DType::BFloat16 : exl2::DType::Other;
    default: return exl2::DType::Other;
  }
}

template <typename Array, typename View>
View to_view(const Array& a, const char* name) {
  View v;
  v.data = a.data();
  v.dtype = to_dtype(a.dtype());
  for (std::size_t i = 0; i < a.ndim(); ++i) {
    v.shape.push_back(static_cast<std::int64_t>(a.shape(i)));
    v.strides.push_back(static_cast<std::int64_t>(a.stride(i)));
  }
  if (a.device_type() == nb::device::cpu::value) {
    v.device = exl2::Device::cpu();
  } else if (a.device_type() == nb::device::cuda::value) {
    v.device = exl2::Device::cuda(a.device_id());
  } else {
    throw exl2::InvalidArgument(std::string(name) + ": expected a tensor in CPU or CUDA memory");
  }
  return v;
}

exl2::TensorView in_view(const InArray& a, const char* name) { return to_view<InArray, exl2::TensorView>(a, name); }
exl2::TensorView opt_view(const OptArray& a, const char* name) { return a ? in_view(*a, name) : exl2::TensorView{}; }
exl2::MutableTensorView out_view(const OutArray& a, const char* name) {
  return to_view<OutArray, exl2::MutableTensorView>(a, name);
}

exl2::Device to_device(const std::string& kind, int index) {
  if (kind == "cpu") return exl2::Device::cpu();
  if (kind == "cuda") return exl2::Device::cuda(index);
  throw exl2::InvalidArgument("device: expected 'cpu' or 'cuda', got '" + kind + "'");
}

cudaStream_t to_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "exl2 native extension (bound C++ API; use the exl2 package, not this module)";
  // QMatrix objects may legitimately outlive interpreter shutdown inside torch's op
  // registry or user globals; their memory is released by the OS with the process.
  nb::set_leak_warnings(false);

  nb::exception<exl2::CudaError>(m, "CudaError", PyExc_RuntimeError);
  nb::exception<exl2::Unsupported>(m, "UnsupportedError", PyExc_RuntimeError);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const exl2::TypeMismatch& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const exl2::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("version", &exl2::version);
  m.def("built_with_cuda", &exl2::built_with_cuda);
  m.def("cuda_architectures", &exl2::cuda_architectures);
  m.def("cuda_device_count", &exl2::cuda_device_count);
  m.def("check_cuda_device", &exl2::check_cuda_device, "index"_a);

  nb::class_<exl2::QMatrix>(m, "QMatrix")
      .def_static(
          "from_exl2",
          [](const InArray& q_weight, const InArray& q_invperm, const InArray& q_scale, const InArray& q_scale_max,
             const InArray& q_groups, const OptArray& q_perm, const OptArray& bias, bool scale_max_prescaled,
             const std::string& device_kind, int device_index, std::uintptr_t stream) {
            exl2::Exl2Weights w;
            w.q_weight = in_view(q_weight, "q_weight");
            w.q_invperm = in_view(q_invperm, "q_invperm");
            w.q_scale = in_view(q_scale, "q_scale");
            w.q_scale_max = in_view(q_scale_max, "q_scale_max");
            w.q_groups = in_view(q_groups, "q_groups");
            w.q_perm = opt_view(q_perm, "q_perm");
            w.bias = opt_view(bias, "bias");
            w.scale_max_prescaled = scale_max_prescaled;
            nb::gil_scoped_release release;
            return exl2::QMatrix::from_exl2(w, to_device(device_kind, device_index), to_stream(stream));
          },
          "q_weight"_a.noconvert(), "q_invperm"_a.noconvert(), "q_scale"_a.noconvert(), "q_scale_max"_a.noconvert(),
          "q_groups"_a.noconvert(), "q_perm"_a.noconvert().none(), "bias"_a.noconvert().none(),
          "scale_max_prescaled"_a, "device_kind"_a, "device_index"_a, "stream"_a)
      .def_static(
          "from_gptq",
          [](const InArray& qweight, const InArray& qzeros, const InArray& scales, const OptArray& g_idx,
             const OptArray& bias, bool zeros_v2, int bits, const std::string& device_kind, int device_index,
             std::uintptr_t stream) {
            exl2::GptqWeights w;
            w.qweight = in_view(qweight, "qweight");
            w.qzeros = in_view(qzeros, "qzeros");
            w.scales = in_view(scales, "scales");
            w.g_idx = opt_view(g_idx, "g_idx");
            w.bias = opt_view(bias, "bias");
            w.zero_format = zeros_v2 ? exl2::ZeroFormat::V2 : exl2::ZeroFormat::V1;
            w.bits = bits;
            nb::gil_scoped_release release;
            return exl2::QMatrix::from_gptq(w, to_device(device_kind, device_index), to_stream(stream));
          },
          "qweight"_a.noconvert(), "qzeros"_a.noconvert(), "scales"_a.noconvert(), "g_idx"_a.noconvert().none(),
          "bias"_a.noconvert().none(), "zeros_v2"_a, "bits"_a, "device_kind"_a, "device_index"_a, "stream"_a)
      .def_static(
          "from_awq",
          [](const InArray& qweight, const InArray& qzeros, const InArray& scales, const OptArray& bias,
             const std::string& device_kind, int device_index, std::uintptr_t stream) {
            exl2::AwqWeights w;
            w.qweight = in_view(qweight, "qweight");
            w.qzeros = in_view(qzeros, "qzeros");
            w.scales = in_view(scales, "scales");
            w.bias = opt_view(bias, "bias");
            nb::gil_scoped_release release;
            return exl2::QMatrix::from_awq(w, to_device(device_kind, device_index), to_stream(stream));
          },
          "qweight"_a.noconvert(), "qzeros"_a.noconvert(), "scales"_a.noconvert(), "bias"_a.noconvert().none(),
          "device_kind"_a, "device_index"_a, "stream"_a)
      .def_prop_ro("in_features", &exl2::QMatrix::in_features)
      .def_prop_ro("out_features", &exl2::QMatrix::out_features)
      .def_prop_ro("format", [](const exl2::QMatrix& q) { return std::string(exl2::format_name(q.format())); })
      .def_prop_ro("device", [](const exl2::QMatrix& q) { return q.device().str(); })
      .def_prop_ro("has_bias", &exl2::QMatrix::has_bias)
      .def_prop_ro("bits_per_weight", &exl2::QMatrix::bits_per_weight)
      .def_prop_ro("nbytes", &exl2::QMatrix::nbytes)
      .def_prop_ro("tensor_core_layout", &exl2::QMatrix::tensor_core_layout)
      .def_prop_ro("closed", &exl2::QMatrix::closed)
      .def(
          "dequantize",
          [](const exl2::QMatrix& q, const OutArray& out, std::uintptr_t stream) {
            auto view = out_view(out, "out");
            nb::gil_scoped_release release;
            q.dequantize(view, to_stream(stream));
          },
          "out"_a.noconvert(), "stream"_a)
      .def(
          "gemm",
          [](const exl2::QMatrix& q, const InArray& x, const OutArray& out, std::uintptr_t stream) {
            auto xv = in_view(x, "x");
            auto ov = out_view(out, "out");
            nb::gil_scoped_release release;
            q.gemm(xv, ov, to_stream(stream));
          },
          "x"_a.noconvert(), "out"_a.noconvert(), "stream"_a)
      .def(
          "gemm_ptr",
          // Fast path for the Python layer, which has already checked x [rows, K] and
          // out [rows, N] (contiguous, both float16 or both bfloat16 as `bfloat16` says, on
          // the QMatrix's device): raw addresses, no DLPack export/import per call. The
          // C++ gemm validates shapes again.
          [](const exl2::QMatrix& q, std::uintptr_t x, std::int64_t rows, std::uintptr_t out,
             std::uintptr_t stream, bool bfloat16) {
            const exl2::DType dtype = bfloat16 ? exl2::DType::BFloat16 : exl2::DType::Float16;
            exl2::TensorView xv;
            xv.data = reinterpret_cast<const void*>(x);
            xv.dtype = dtype;
            xv.shape = {rows, q.in_features()};
            xv.device = q.device();
            exl2::MutableTensorView ov;
            ov.data = reinterpret_cast<void*>(out);
            ov.dtype = dtype;
            ov.shape = {rows, q.out_features()};
            ov.device = q.device();
            nb::gil_scoped_release release;
            q.gemm(xv, ov, to_stream(stream));
          },
          "x_ptr"_a, "rows"_a, "out_ptr"_a, "stream"_a, "bfloat16"_a = false)
      .def("close", &exl2::QMatrix::close);
}
