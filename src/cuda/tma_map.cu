// TMA descriptors of the gathered activations (tma_map.cuh).
#include "cuda/tma_map.cuh"

#include <cudaTypedefs.h>

#include <string>

#include "cuda/cuda_check.cuh"
#include "cuda/device_layer.cuh"

namespace exl2::detail::cuda {

namespace {

/// The driver's cuTensorMapEncodeTiled, or nullptr where the driver lacks it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode =
      reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(driver_entry_point("cuTensorMapEncodeTiled", 12000));
  return encode;
}

}  // namespace

bool tma_available() { return tensor_map_encoder() != nullptr; }

CUtensorMap make_activation_map(const __half* xp, std::int64_t m, std::int64_t ldxp, int rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) internal_error("make_activation_map: cuTensorMapEncodeTiled is not available");
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(ldxp), static_cast<cuuint64_t>(m)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ldxp) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(rows)};
  const cuuint32_t estr[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<__half*>(xp), dims, strides, box, estr,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) internal_error("cuTensorMapEncodeTiled failed: " + std::to_string(static_cast<int>(r)));
  return map;
}

}  // namespace exl2::detail::cuda
