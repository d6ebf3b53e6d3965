// dequantize() for layers in the tc stream layout (tc_layout.hpp): the dense [K, N] weight,
// un-permuted, in float16 or bfloat16.
//
// It decodes with the tc kernels' own decode_chunk (float16, for the exact q - z under bfloat16),
// so its values are the weights those kernels multiply with: T((q - z) * s), bit-exact as the
// canonical layout's dequant_kernel gives them (tests/test_tc_kernel.py compares the two,
// test_golden*.py and test_fuzz.py compare them with the reference).
//
// Work split: a block of 4 warps per (tile of 128 columns, chunk), chunks strided over grid.y.
// Warp w decodes the 32 x 32 block of columns 32w.. of the chunk from its lanes' b words, read
// straight from global memory (each weight byte is read once: no ring, no reuse), and writes it
// through shared memory to out[perm[row], n], whole 64-byte row pieces per store instruction.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda_backend.hpp"
#include "cuda/cuda_check.cuh"
#include "cuda/device_layer.cuh"
#include "cuda/tc_device.cuh"
#include "cuda/tc_gemm.cuh"
#include "cuda/tc_layout.hpp"

namespace exl2::detail::cuda {

namespace {

/// Per warp, one decoded 32 x 32 block in shared memory, [row][column] with 2 halves of padding
/// per row (17 words: the fragment stores below conflict at most 2-way).
constexpr int kStageRow = 34;

/// One chunk of width B for the calling warp: its lane's b words at `wsrc` (global) and its
/// group's header words `head` (the lane's four columns), decoded into the mma B fragments (lane
/// 4 g + t: rows 16 s + 8 h + 2 t, + 1 of column 8 jj + g), staged in `stage` and stored row by
/// row: lane i writes column n0 + i of each of the chunk's `rows` rows (64 contiguous bytes per
/// row and store instruction, as the canonical layout's dequant_kernel; storing the fragments
/// directly wrote 16-byte pieces of 4 rows per instruction: the dense route at m = 512 on an
/// act-order 8192x28672 layer took 1423.5 against 626.8 us, H100).
template <int B, class T>
__device__ __forceinline__ void dequant_tc_chunk(const std::uint32_t* __restrict__ wsrc, const uint4 head, int row0,
                                                 int rows, const int* __restrict__ perm, std::int64_t n0,
                                                 std::int64_t N, int lane, std::uint16_t* stage,
                                                 std::uint16_t* __restrict__ out) {
  const int g = lane >> 2, t = lane & 3;
  std::uint32_t w[8];
#pragma unroll
  for (int i = 0; i < B; ++i) w[i] = __ldg(wsrc + i);
  // float16: the kernels' own decode, f16((q - z) * s). bfloat16: the float16 decode with a unit
  // scale gives the exact q - z, then bf16(float(q - z) * s) in fp32, the reference's own
  // arithmetic; the kernels' bfloat16 decode (decode_pair_bf16) rounds the same product to the
  // same value but may give +0 where the reference gives -0 (q = z with a negative scale), which
  // no matmul result can tell apart but dequantize's bits do.
  GroupConsts gc;
  unpack_header<__half>(head, B, gc);
  float scale[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if constexpr (kIsBf16<T>) {
    const std::uint32_t hv[4] = {head.x, head.y, head.z, head.w};
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      scale[jj] = __half2float(__ushort_as_half(static_cast<unsigned short>(hv[jj] & 0xffffu)));
      gc.s2[jj] = 0x3c003c00u;  // fp16x2 1.0
    }
  }
  std::uint32_t frag[4][2][2];
  decode_chunk<B, __half>(w, gc, frag);
  auto value = [&](int jj, std::uint32_t pair, int e) -> std::uint16_t {
    const std::uint16_t bits = static_cast<std::uint16_t>(pair >> (16 * e));
    if constexpr (kIsBf16<T>)
      return __bfloat16_as_ushort(__float2bfloat16_rn(__half2float(__ushort_as_half(bits)) * scale[jj]));
    else
      return bits;
  };
  // The row this lane stores for the others: perm[row0 + lane] (shuffled to all lanes below).
  const int my_k = lane < rows ? (perm ? __ldg(perm + row0 + lane) : row0 + lane) : 0;
  __syncwarp();  // the previous chunk's stage reads are done
#pragma unroll
  for (int jj = 0; jj < 4; ++jj)
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          stage[(16 * s + 8 * h + 2 * t + e) * kStageRow + 8 * jj + g] = value(jj, frag[jj][s][h], e);
  __syncwarp();
  const bool col_ok = n0 + lane < N;
  for (int r = 0; r < rows; ++r) {
    const std::int64_t k = __shfl_sync(0xffffffffu, my_k, r);
    if (col_ok) out[k * N + n0 + lane] = stage[r * kStageRow + lane];
  }
}

template <class T>
__global__ void __launch_bounds__(kTcThreads)
    tc_dequant_kernel(const std::uint32_t* __restrict__ stream, std::int64_t tile_words,
                      const int4* __restrict__ tc_chunks, int num_chunks, const int* __restrict__ perm,
                      std::int64_t N, std::uint16_t* __restrict__ out) {
  __shared__ std::uint16_t stage[kTcWarps][32 * kStageRow];
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int g = lane >> 2;
  const std::int64_t tile = blockIdx.x;
  const std::uint32_t* __restrict__ tsrc = stream + tile * tile_words;
  const std::int64_t n0 = tile * tc::kTileCols + warp * tc::kBlockCols;
  for (int c = static_cast<int>(blockIdx.y); c < num_chunks; c += static_cast<int>(gridDim.y)) {
    const int4 d = __ldg(tc_chunks + c);
    const int b = d.z & 0xff, rows = (d.z >> 8) & 0xff;
    const uint4 head = __ldg(reinterpret_cast<const uint4*>(tsrc + static_cast<std::int64_t>(d.w) * tc::kUnitWords +
                                                         warp * 32 + g * 4));
    const std::uint32_t* wsrc = tsrc + static_cast<std::int64_t>(d.y) * tc::kUnitWords + warp * 32 * b + lane * b;
    with_code_width(b, [&](auto bw) {
      dequant_tc_chunk<decltype(bw)::value, T>(wsrc, head, d.x, rows, perm, n0, N, lane, stage[warp], out);
    });
  }
}

template <class T>
void tc_dequantize_as(const DeviceLayer& L, T* out, cudaStream_t stream) {
  if (!has_tc_layout(L)) internal_error("tc_dequantize: the layer has no tc layout");
  if (L.num_chunks == 0 || L.N == 0) return;
  if (L.tc_tiles > 0x7fffffffLL) throw Unsupported("dequantize: N is too large");
  const unsigned gy = static_cast<unsigned>(L.num_chunks < 65535 ? L.num_chunks : 65535);
  tc_dequant_kernel<T><<<dim3(static_cast<unsigned>(L.tc_tiles), gy), kTcThreads, 0, stream>>>(
      static_cast<const std::uint32_t*>(L.tc_qweight.get()), L.tc_tile_words,
      static_cast<const int4*>(L.tc_chunks.get()), L.num_chunks, L.kernel_perm(), L.N,
      reinterpret_cast<std::uint16_t*>(out));
  EXL2_CUDA_CHECK_LAUNCH("tc_dequant_kernel");
}

}  // namespace

void tc_dequantize(const DeviceLayer& L, __half* out, cudaStream_t stream) { tc_dequantize_as(L, out, stream); }

void tc_dequantize(const DeviceLayer& L, __nv_bfloat16* out, cudaStream_t stream) {
  tc_dequantize_as(L, out, stream);
}

}  // namespace exl2::detail::cuda
