// Internal: the small-m kernel (declared here, defined in gemv.cu, dispatched by gemm.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "cuda/device_layer.cuh"

namespace exl2::detail::cuda {

/// Largest m the GEMV kernel handles.
constexpr int kGemvMaxRows = 16;

/// out[m, N] = x[m, K] @ W (+ bias) for 1 <= m <= kGemvMaxRows; x and out fp16, or both
/// bfloat16 (weights then rounded to bfloat16, see gemv.cu).
void launch_gemv(const DeviceLayer& layer, const __half* x, std::int64_t m, __half* out, cudaStream_t stream);
void launch_gemv(const DeviceLayer& layer, const __nv_bfloat16* x, std::int64_t m, __nv_bfloat16* out,
                 cudaStream_t stream);

/// Fill layer.gemv_blocks_per_sm (at construction, on the layer's device).
void query_gemv_occupancy(DeviceLayer& layer);
/// Fill layer.mma_blocks_per_sm (at construction, on the layer's device).
void query_mma_occupancy(DeviceLayer& layer);

/// Split-K factor (1, 2, 4, 8 or 16 blocks of a thread-block cluster; 16 only for kernels
/// that allow_cluster16 enabled) for `tiles` output
/// tiles, given how many blocks of the kernel fit one multiprocessor, at most `max_split`
/// (or the layer's EXL2_CUDA_MAX_SPLIT cap when one was set at construction); 1 below compute
/// capability 9.0 or when the kernels lack their sm_90 code (layer.clusters false). Depends
/// only on the shape, the device and the build. The rule itself: split_rule::by_waves.
int cluster_split(const DeviceLayer& layer, std::int64_t tiles, int min_chunks_per_block, int blocks_per_sm,
                  int max_split = 4);

/// Split-K factor for kernels whose extra waves cost more than the reduction saves (the tc
/// kernel's 64-row tiles): the largest power of two (at most `max_split` or the layer's
/// EXL2_CUDA_MAX_SPLIT cap, each block keeping `min_chunks_per_block` chunks) whose blocks all
/// fit one wave, or with `any_size` the largest of every split 1, 2, 3, .. (for kernels whose
/// cluster reduction takes any split, cluster_reduce_store: the wgmma kernel); 1 when even 2
/// does not fit, or where cluster_split returns 1. The rule: split_rule::single_wave.
int single_wave_split(const DeviceLayer& layer, std::int64_t tiles, int min_chunks_per_block, int blocks_per_sm,
                      int max_split, bool any_size = false);

/// Blocks of a kernel that fit the whole GPU at once (one wave), given how many fit one
/// multiprocessor (at least 1).
inline std::int64_t resident_blocks(const DeviceLayer& L, int blocks_per_sm) {
  return static_cast<std::int64_t>(blocks_per_sm > 0 ? blocks_per_sm : 1) * L.sm_count;
}

/// Lets `kernel` be launched with clusters of more than 8 blocks (a non-portable size).
void allow_cluster16(const void* kernel);
/// True when clusters of 16 blocks of `kernel` (`threads` per block) fit this device (after
/// allow_cluster16).
bool cluster16_launchable(const void* kernel, int threads);

/// Blocks of `kernels[0]` (`threads` per block, `smem_bytes` of dynamic shared memory) that fit
/// one multiprocessor, after letting every kernel of `kernels` (the instantiations of one shape
/// for each activation type: same shared memory and launch bounds) use that much.
int blocks_per_sm_with_smem(std::initializer_list<const void*> kernels, int threads, std::size_t smem_bytes);

/// Launch `kernel` on grid/block with `smem_bytes` of dynamic shared memory and a cluster of
/// `split` blocks along `split_dim` (0 = x, 1 = y, 2 = z; a plain launch when split == 1).
/// `programmatic`: a programmatic dependent launch (compute capability 9.0+; pdl_wait in
/// tc_device.cuh says what the kernel must then do): its blocks may start once every block of
/// the stream's previous kernel has called pdl_trigger or exited, instead of after that kernel's
/// end.
template <typename... KArgs, typename... Args>
void launch_clustered_smem(void (*kernel)(KArgs...), dim3 grid, dim3 block, std::size_t smem_bytes, int split,
                           int split_dim, bool programmatic, cudaStream_t stream, const char* name, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (split > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = split_dim == 0 ? split : 1;
    attr[n].val.clusterDim.y = split_dim == 1 ? split : 1;
    attr[n].val.clusterDim.z = split_dim == 2 ? split : 1;
    ++n;
  }
  if (programmatic) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = n > 0 ? attr : nullptr;
  cfg.numAttrs = n;
  const cudaError_t st = cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
  if (st != cudaSuccess) throw_cuda_error(st, name, __FILE__, __LINE__);
}

/// launch_clustered_smem without dynamic shared memory, in stream order.
template <typename... KArgs, typename... Args>
void launch_clustered(void (*kernel)(KArgs...), dim3 grid, dim3 block, int split, int split_dim,
                      cudaStream_t stream, const char* name, Args... args) {
  launch_clustered_smem(kernel, grid, block, 0, split, split_dim, false, stream, name, args...);
}

}  // namespace exl2::detail::cuda
