// CUDA backend: dequantize the whole layer to a dense [K, N] matrix (un-permuted), fp16
// or bfloat16: T((q - z) * s), the exact fp32 product rounded once (dq_value_as).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda_backend.hpp"
#include "cuda/cuda_check.cuh"
#include "cuda/device_layer.cuh"
#include "cuda/tc_gemm.cuh"

namespace exl2::detail::cuda {

namespace {

constexpr int kDequantThreads = 128;

template <int B, class T>
__device__ __forceinline__ void dequant_chunk(const std::uint32_t* __restrict__ qw, const ChunkInfo& ci,
                                              std::int64_t N, std::int64_t n, int z, float s,
                                              const int* __restrict__ perm, T* __restrict__ out) {
  decode_rows<B, 0, kChunkRows>(qw + static_cast<std::int64_t>(ci.word0) * N + n, N, ci.nwords,
                                [&](int i, std::uint32_t q) {
                                  if (i < ci.rows) {
                                    const int r = ci.row0 + i;
                                    const std::int64_t k = perm ? __ldg(perm + r) : r;
                                    out[k * N + n] = dq_value_as<T>(q, z, s);
                                  }
                                });
}

// Thread = one column of one chunk (32 permuted rows). out[perm[r], n] = Wp[r, n].
template <class T>
__global__ void __launch_bounds__(kDequantThreads)
    dequant_kernel(const std::uint32_t* __restrict__ qw, const __half* __restrict__ scales,
                   const std::uint8_t* __restrict__ zeros, const int* __restrict__ perm,
                   const int4* __restrict__ chunks, int num_chunks, std::int64_t N, T* __restrict__ out) {
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  for (int c = blockIdx.y; c < num_chunks; c += gridDim.y) {
    const ChunkInfo ci = load_chunk(chunks, c);
    const std::int64_t gi = static_cast<std::int64_t>(ci.group) * N + n;
    const float s = __half2float(scales[gi]);
    const int z = zeros[gi];
    switch (ci.bits) {
      case 2: dequant_chunk<2, T>(qw, ci, N, n, z, s, perm, out); break;
      case 3: dequant_chunk<3, T>(qw, ci, N, n, z, s, perm, out); break;
      case 4: dequant_chunk<4, T>(qw, ci, N, n, z, s, perm, out); break;
      case 5: dequant_chunk<5, T>(qw, ci, N, n, z, s, perm, out); break;
      case 6: dequant_chunk<6, T>(qw, ci, N, n, z, s, perm, out); break;
      case 8: dequant_chunk<8, T>(qw, ci, N, n, z, s, perm, out); break;
      default: break;  // rejected at construction
    }
  }
}

}  // namespace

void dequantize(const DeviceLayer& layer, const LayerMeta& meta, void* out, bool bf16, cudaStream_t stream) {
  check_layer_meta(layer, meta, "dequantize");
  if (layer.K == 0 || layer.N == 0 || layer.num_chunks == 0) return;
  DeviceGuard guard(layer.device);
  if (has_tc_layout(layer)) {
    if (bf16)
      tc_dequantize(layer, static_cast<__nv_bfloat16*>(out), stream);
    else
      tc_dequantize(layer, static_cast<__half*>(out), stream);
    return;
  }
  const unsigned gx = static_cast<unsigned>((layer.N + kDequantThreads - 1) / kDequantThreads);
  const unsigned gy = static_cast<unsigned>(layer.num_chunks < 65535 ? layer.num_chunks : 65535);
  if (bf16) {
    dequant_kernel<__nv_bfloat16><<<dim3(gx, gy), kDequantThreads, 0, stream>>>(
        layer.qweight.get(), layer.scales.get(), layer.zeros.get(), layer.kernel_perm(), layer.chunks.get(),
        layer.num_chunks, layer.N, static_cast<__nv_bfloat16*>(out));
  } else {
    dequant_kernel<__half><<<dim3(gx, gy), kDequantThreads, 0, stream>>>(
        layer.qweight.get(), layer.scales.get(), layer.zeros.get(), layer.kernel_perm(), layer.chunks.get(),
        layer.num_chunks, layer.N, static_cast<__half*>(out));
  }
  EXL2_CUDA_CHECK_LAUNCH("dequant_kernel");
}

}  // namespace exl2::detail::cuda
