// The CUDA backend's interface for builds without CUDA (EXL2_CUDA=OFF or no CUDA
// compiler found): reports "not compiled", no devices, and throws Unsupported for
// every operation.
#include "core/cuda_backend.hpp"
#include "exl2/error.hpp"

namespace exl2::detail::cuda {

namespace {
[[noreturn]] void not_built() {
  throw Unsupported(
      "exl2 was built without CUDA support; rebuild with a CUDA compiler available (EXL2_CUDA=ON)");
}
}  // namespace

// Never defined in this build; DeviceLayerPtr can only ever hold nullptr.
struct DeviceLayer {};

bool compiled() noexcept { return false; }
const char* architectures() noexcept { return ""; }
int device_count() noexcept { return 0; }
void check_device(int) { not_built(); }
int pointer_device(const void*) { not_built(); }
void copy_to_host(void*, const void*, std::size_t, int, cudaStream_t) { not_built(); }

void DeviceLayerDeleter::operator()(DeviceLayer* p) const noexcept { delete p; }

DeviceLayerPtr build_exl2(const LayerMeta&, const Exl2Raw&, int, cudaStream_t) { not_built(); }
DeviceLayerPtr build_gptq(const LayerMeta&, const GptqRaw&, int, cudaStream_t) { not_built(); }
DeviceLayerPtr build_canonical(const LayerMeta&, const HostArrays&, int, cudaStream_t) { not_built(); }
std::size_t nbytes(const DeviceLayer&) noexcept { return 0; }
bool tensor_core_layout(const DeviceLayer&) noexcept { return false; }
bool all_finite_f16(const void*, std::size_t, int, cudaStream_t) { not_built(); }
void dequantize(const DeviceLayer&, const LayerMeta&, void*, bool, cudaStream_t) { not_built(); }
void gemm(const DeviceLayer&, const LayerMeta&, const void*, std::int64_t, void*, bool, cudaStream_t) { not_built(); }

}  // namespace exl2::detail::cuda
