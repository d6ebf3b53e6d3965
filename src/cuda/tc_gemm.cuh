// Internal: the tensor-core kernels on the tc stream layout (tc_gemm.cu: mma.sync, any m;
// tc_wgmma.cu: wgmma on Hopper, m >= 33; tc_dequant.cu: dequantize; tc_layout.hpp). Where a layer
// has the tc layout (tc_layout_wanted), it is the layer's only copy of its codes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/device_layer.cuh"

namespace exl2::detail::cuda {

// Against the canonical layout's GEMV (gemv.cu), measured when both layouts could coexist (H200,
// GPTQ-4 and EXL2 2.5/4.0/4.5/6.0 bpw on the four bench shapes): at m = 2 the tc kernel was
// faster on 18 of 20 layers and level on 2 (14336x4096 GPTQ-4 26.9 against 33.1 us, 8192x28672
// 64.8 against 83.8); at m = 1 it was 5-9% faster on the 8192x28672 layers and on 14336x4096
// (clusters of 16), level on 4096x14336 and 2-3 us slower on 4096x4096 (12.0 against 9.4 us:
// the activation gather's extra launch and the pipeline's fill are not hidden on a short K
// range). Holding both copies of the codes for that case is not worth its memory.
/// The mma.sync kernel's 64-row tiles' largest m in one row tile; above it the wgmma kernel
/// (tc_wgmma.cu) where the layer has it (compute capability 9.0, sm_90a build: layer.tc_wgmma),
/// else more row tiles of the mma.sync kernel.
constexpr int kTcMaxRows = 64;
// m = 1 (tc_gemm.cu, launch_tc_slice): where the layer's blocks at m = 1 fit one wave (tiles x
// split <= resident blocks), the tc kernel gathers its activation row itself (tc_gemm_kernel's
// kGather: each block its whole activation segment into shared memory before its loop, then the
// transposed mma); elsewhere a gather launch writes the permuted row into a scratch first and
// the transposed 8-row kernel (kT8) reads it. In one wave every block pays the gather's latency
// at the same time, alongside its first ring steps; over several waves each later block stalls
// on it again. H100, GPTQ-4 at m = 1, kGather against the gather launch + kT8 (two A/Bs, each in
// one session): 4096x4096 (one wave) 8.9 against 10.2 us, 4096x14336 (one wave) 16.5 against
// 17.4, 14336x4096 (one wave) 17.8 against 18.5 (all EXL2 widths likewise), 8192x28672 (2.3
// waves) 55.2 against 55.3 (EXL2 4.0 bpw: 57.1 against 55.4; 6.0 bpw: 80.4 against 79.0);
// the earlier kGather, which gathered each iteration's 128 activations through the chunk table
// and perm: 4096x4096 10.2-10.5 us.
/// Where the layer has the wgmma kernel, it serves m from here on: its 64-row tiles beat the
/// mma.sync kernel's at m = 33 and 64 on the four bench shapes (H200, GPTQ-4, same session:
/// 8192x28672 121.8 / 131.9 against 132.0 / 137.1 us, 14336x4096 44.5 / 49.2 against 50.2 / 52.4,
/// 4096x4096 19.4 / 20.7 against 20.7 / 21.5; H100, 8192x28672 m = 64: 131.8 against 136).
constexpr int kTcWgmmaMinRows = 33;

/// Whether construction converts `layer` to the tc layout (EXL2_CUDA_TC read at each
/// construction): "0": no, keep the canonical layout and its kernels (GEMV, mma_kernel), e.g. to
/// compare or test them; "1": yes wherever build_tc_layout can (compute capability 8.0+);
/// otherwise (the default) where the layer has thread-block clusters (compute capability 9.0+
/// with the kernels' sm_90 code: layer.clusters). The tc kernels' split-K needs clusters, and they
/// were measured only there (H100, H200): on compute capability 8.x their small-m blocks would
/// each stream a whole K range (4096x4096 at m = 1: 32 blocks for the GPU), unmeasured against
/// the canonical GEMV.
bool tc_layout_wanted(const DeviceLayer& layer) noexcept;

/// Converts a built layer to the tc layout (compute capability 8.0+ with the kernels' sm_80+
/// code, else a no-op): packs the tc stream from layer.qweight, scales and zeros, then releases
/// those three, so the layer holds one copy of its codes. Synchronises the stream.
void build_tc_layout(DeviceLayer& layer, const std::vector<int4>& chunks_host, cudaStream_t stream);

/// True when the layer has the tc layout: gemm() and dequantize() then use the tc kernels for
/// every m.
bool has_tc_layout(const DeviceLayer& layer) noexcept;

/// out[m, N] = x[m, K] @ W (+ bias), any m >= 1, float16 or bfloat16 (the weights rounded to x's
/// type as dequantize() gives them, fp32 accumulation); requires has_tc_layout.
void launch_tc(const DeviceLayer& layer, const __half* x, std::int64_t m, __half* out, cudaStream_t stream);
void launch_tc(const DeviceLayer& layer, const __nv_bfloat16* x, std::int64_t m, __nv_bfloat16* out,
               cudaStream_t stream);

/// out[K, N] = W in type T (un-permuted rows), bit-exact as the canonical layout's dequantize:
/// T((q - z) * s) (tc_dequant.cu); requires has_tc_layout.
void tc_dequantize(const DeviceLayer& layer, __half* out, cudaStream_t stream);
void tc_dequantize(const DeviceLayer& layer, __nv_bfloat16* out, cudaStream_t stream);

}  // namespace exl2::detail::cuda
