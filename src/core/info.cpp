#include "core/cuda_backend.hpp"
#include "exl2/qmatrix.hpp"

#ifndef EXL2_VERSION_STRING
#define EXL2_VERSION_STRING "0.0.0"
#endif

namespace exl2 {

bool built_with_cuda() noexcept { return detail::cuda::compiled(); }
const char* cuda_architectures() noexcept { return detail::cuda::architectures(); }
int cuda_device_count() noexcept { return detail::cuda::device_count(); }
void check_cuda_device(int index) { detail::cuda::check_device(index); }
const char* version() noexcept { return EXL2_VERSION_STRING; }

}  // namespace exl2
