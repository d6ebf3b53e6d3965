// Small m (1 .. kGemvMaxRows rows): a weight-streaming kernel on the CUDA cores.
//
// Work split:
//   block   = 8 warps and one tile of 32*C output columns; lane l owns columns
//             C*l .. C*l+C-1 (C = 4 for m <= 4, else 2), so every weight load is one 16-
//             (8-) byte load per lane and a warp reads 512 (256) contiguous bytes;
//   warps   = the block's chunks are dealt out round-robin (chunk c to warp c % 8);
//   cluster = on compute capability 9.0+, up to 8 blocks of a thread-block cluster split
//             the chunk range of one tile (split-K) so that small layers still fill the
//             GPU; their fp32 partial sums are combined through distributed shared
//             memory. No workspace, no atomics, one launch.
// Every output element is summed in a fixed order (rows within a chunk, chunks of a
// warp, warps 0..7, cluster ranks 0..S-1) and written once: deterministic, graph-safe.
//
// Decoding: two codes of one column go into the mantissas of a half2 with magic 1024
// (0x6400), then (1024 + q) - (1024 + z) is the exact integer q - z and one __hmul2
// by the scale rounds exactly like the reference: f16((q - z) * s). The fp16 weights
// are widened to fp32 and accumulated with fp32 FMAs.
//
// bfloat16 (T = __nv_bfloat16; x and out bfloat16, bias and scales still fp16): the same
// exact q - z from the half2 trick is widened to fp32, multiplied by the fp32 scale
// (exact) and rounded once to bfloat16 (__float22bfloat162_rn), then widened back and
// accumulated with the same fp32 FMAs: w = bf16((q - z) * s). x loads use
// __bfloat162float, the result __float2bfloat16_rn. The fp16 instantiations are
// unchanged (if constexpr).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <utility>

#include "core/env_knob.hpp"
#include "cuda/gemv.cuh"
#include "cuda/split_rule.hpp"

namespace cg = cooperative_groups;

namespace exl2::detail::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

// Columns per lane: 4 (16-byte loads) while the accumulators are few; 2 (8-byte loads)
// for more rows, to stay inside the register budget.
template <int M>
struct GemvShape {
  static constexpr int kCols = M <= 4 ? 4 : 2;
  static constexpr int kTileCols = 32 * kCols;
};

template <int C>
struct WordVec;
template <>
struct WordVec<4> {
  using type = uint4;
  __device__ static void split(const uint4& v, std::uint32_t* o) { o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w; }
};
template <>
struct WordVec<2> {
  using type = uint2;
  __device__ static void split(const uint2& v, std::uint32_t* o) { o[0] = v.x; o[1] = v.y; }
};

/// Code of row r (0..31) of a chunk whose B words (of one column) are in w.
template <int B>
__device__ __forceinline__ std::uint32_t code_at(const std::uint32_t (&w)[B], int r) {
  const int bit = r * B;
  const int lo = bit >> 5, sh = bit & 31;
  std::uint32_t v = w[lo] >> sh;
  if (sh + B > 32) v |= w[lo + 1] << (32 - sh);
  return v & ((1u << B) - 1u);
}

/// Calls f(row_a, row_b, packed) for the 16 row pairs of a 32-row chunk, where packed
/// holds code(row_a) in bits 0..15 and code(row_b) in bits 16..31.
template <int B, class F>
__device__ __forceinline__ void for_each_pair(const std::uint32_t (&w)[B], F&& f) {
  if constexpr (B == 2 || B == 4 || B == 8) {
    // A word holds 32/B rows; rows j and j + 16/B of a word sit 16 bits apart.
    constexpr int kPerWord = 32 / B;
    constexpr int kHalf = kPerWord / 2;
    constexpr std::uint32_t kMask = ((1u << B) - 1u) * 0x00010001u;
#pragma unroll
    for (int i = 0; i < B; ++i)
#pragma unroll
      for (int j = 0; j < kHalf; ++j) f(i * kPerWord + j, i * kPerWord + j + kHalf, (w[i] >> (j * B)) & kMask);
  } else {
#pragma unroll
    for (int p = 0; p < 16; ++p) f(2 * p, 2 * p + 1, code_at<B>(w, 2 * p) | (code_at<B>(w, 2 * p + 1) << 16));
  }
}

__device__ __forceinline__ __half2 u32_as_half2(std::uint32_t u) {
  __half2 h;
  *reinterpret_cast<std::uint32_t*>(&h) = u;
  return h;
}

template <int M, int C, int B, bool BF>
__device__ __forceinline__ void gemv_chunk(const std::uint32_t* __restrict__ qw, std::int64_t N, const ChunkInfo& ci,
                                           std::int64_t n0, const __half* __restrict__ scales,
                                           const std::uint8_t* __restrict__ zeros, const float (*xs)[32],
                                           float (&acc)[M][C]) {
  using Vec = WordVec<C>;
  // The chunk's B words of this lane's C columns: B vector loads, all issued first.
  std::uint32_t w[C][B];
#pragma unroll
  for (int j = 0; j < B; ++j) {
    typename Vec::type v{};
    if (j < ci.nwords)
      v = __ldg(reinterpret_cast<const typename Vec::type*>(qw + static_cast<std::int64_t>(ci.word0 + j) * N + n0));
    std::uint32_t o[C];
    Vec::split(v, o);
#pragma unroll
    for (int c = 0; c < C; ++c) w[c][j] = o[c];
  }
  const std::int64_t gi = static_cast<std::int64_t>(ci.group) * N + n0;
  std::uint32_t s_bits[2], z4;
  if constexpr (C == 4) {
    const uint2 s4 = __ldg(reinterpret_cast<const uint2*>(scales + gi));
    s_bits[0] = s4.x;
    s_bits[1] = s4.y;
    z4 = __ldg(reinterpret_cast<const unsigned int*>(zeros + gi));
  } else {
    s_bits[0] = __ldg(reinterpret_cast<const unsigned int*>(scales + gi));
    s_bits[1] = 0;
    z4 = __ldg(reinterpret_cast<const unsigned short*>(zeros + gi));
  }
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const std::uint16_t s_h = static_cast<std::uint16_t>(s_bits[c >> 1] >> (16 * (c & 1)));
    const std::uint32_t zb = 0x6400u + ((z4 >> (8 * c)) & 0xffu);  // 1024 + z, exact in fp16
    const __half2 s2 = u32_as_half2(s_h | (static_cast<std::uint32_t>(s_h) << 16));
    const __half2 z2 = u32_as_half2(zb | (zb << 16));
    float sf = 0.0f;  // the scale as fp32 (bfloat16 path only)
    if constexpr (BF) sf = __low2float(s2);
    for_each_pair<B>(w[c], [&](int ra, int rb, std::uint32_t packed) {
      const __half2 q2 = u32_as_half2(packed | 0x64006400u);  // 1024 + q
      if constexpr (BF) {
        // q - z exactly (|q - z| <= 255), times the scale in fp32 (exact), one rounding.
        const float2 d = __half22float2(__hsub2(q2, z2));
        // Kept packed (one register per pair, like the fp16 half2) and widened at each use
        // (bits << 16 / & 0xffff0000: exact): fewer live registers than a float2 per pair
        // (ptxas: no spills for m <= 8 on sm_90; widening up front spilled at m = 11).
        const __nv_bfloat162 wb = __float22bfloat162_rn(make_float2(d.x * sf, d.y * sf));
        std::uint32_t wu;
        memcpy(&wu, &wb, sizeof wu);  // low half: row ra, high half: row rb
#pragma unroll
        for (int m = 0; m < M; ++m) {
          acc[m][c] = fmaf(__uint_as_float(wu << 16), xs[m][ra], acc[m][c]);
          acc[m][c] = fmaf(__uint_as_float(wu & 0xffff0000u), xs[m][rb], acc[m][c]);
        }
      } else {
        const float2 f = __half22float2(__hmul2(__hsub2(q2, z2), s2));
#pragma unroll
        for (int m = 0; m < M; ++m) {
          acc[m][c] = fmaf(f.x, xs[m][ra], acc[m][c]);
          acc[m][c] = fmaf(f.y, xs[m][rb], acc[m][c]);
        }
      }
    });
  }
}

template <int M, class T>
// m = 1 at 3 blocks per SM (a few bytes of spill) measured 79-80 us on 8192x28672 on the
// H100; 2 blocks per SM with the chunk's activations held in registers measured 108 us.
__global__ void __launch_bounds__(kThreads, M == 1 ? 3 : M <= 2 ? 2 : 1)
    gemv_kernel(const T* __restrict__ x, std::int64_t K, const std::uint32_t* __restrict__ qw,
                const __half* __restrict__ scales, const std::uint8_t* __restrict__ zeros,
                const int* __restrict__ perm, const int4* __restrict__ chunks, int num_chunks,
                const __half* __restrict__ bias, T* __restrict__ out, std::int64_t N, int split) {
  constexpr bool BF = kIsBf16<T>;
  constexpr int C = GemvShape<M>::kCols;
  constexpr int kTileCols = GemvShape<M>::kTileCols;
  __shared__ __align__(16) float xs[kWarps][M][32];
  __shared__ __align__(16) float red[kWarps][M][kTileCols];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int rank = static_cast<int>(blockIdx.y);  // cluster rank (the cluster spans grid.y)
  const std::int64_t tile0 = static_cast<std::int64_t>(blockIdx.x) * kTileCols;
  const std::int64_t n0 = tile0 + lane * C;
  const bool active = n0 < N;  // N is a multiple of 8, so n0 < N covers all C columns

  float acc[M][C];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[m][c] = 0.0f;

  const int c_begin = static_cast<int>(static_cast<std::int64_t>(num_chunks) * rank / split);
  const int c_end = static_cast<int>(static_cast<std::int64_t>(num_chunks) * (rank + 1) / split);
  // The chunk descriptor and the gathered activations (chunk table -> perm -> x, three
  // dependent loads) are fetched one chunk ahead, so that chain overlaps the decoding.
  auto fetch_x = [&](const ChunkInfo& ci, float (&v)[M]) {
    if (lane < ci.rows) {
      const int r = ci.row0 + lane;
      const std::int64_t p = perm ? __ldg(perm + r) : r;
#pragma unroll
      for (int m = 0; m < M; ++m) v[m] = to_float(x[m * K + p]);
    } else {
#pragma unroll
      for (int m = 0; m < M; ++m) v[m] = 0.0f;  // rows past the chunk's end contribute 0
    }
  };
  ChunkInfo ci_next{};
  float xv_next[M];
  int c = c_begin + warp;
  if (c < c_end) {
    ci_next = load_chunk(chunks, c);
    fetch_x(ci_next, xv_next);
  }
  for (; c < c_end; c += kWarps) {
    const ChunkInfo ci = ci_next;
    __syncwarp();  // the previous chunk's reads of xs[warp] are done
#pragma unroll
    for (int m = 0; m < M; ++m) xs[warp][m][lane] = xv_next[m];
    __syncwarp();
    if (c + kWarps < c_end) {
      ci_next = load_chunk(chunks, c + kWarps);
      fetch_x(ci_next, xv_next);
      // No software L2 prefetch of later chunks: measured on the H100 (8192x28672, same
      // run) it no longer pays. Prefetching the next chunk's words: m = 1 80.8 us, none:
      // 76.1 us; 2 or 3 chunks ahead: 83.2 / 79.6 us; m = 2 and 4 likewise.
    }
    if (!active) continue;
    switch (ci.bits) {
      case 2: gemv_chunk<M, C, 2, BF>(qw, N, ci, n0, scales, zeros, xs[warp], acc); break;
      case 3: gemv_chunk<M, C, 3, BF>(qw, N, ci, n0, scales, zeros, xs[warp], acc); break;
      case 4: gemv_chunk<M, C, 4, BF>(qw, N, ci, n0, scales, zeros, xs[warp], acc); break;
      case 5: gemv_chunk<M, C, 5, BF>(qw, N, ci, n0, scales, zeros, xs[warp], acc); break;
      case 6: gemv_chunk<M, C, 6, BF>(qw, N, ci, n0, scales, zeros, xs[warp], acc); break;
      case 8: gemv_chunk<M, C, 8, BF>(qw, N, ci, n0, scales, zeros, xs[warp], acc); break;
      default: break;  // rejected at construction
    }
  }

  // Warps -> block partial (fixed order), kept in red[0].
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int cc = 0; cc < C; ++cc) red[warp][m][lane * C + cc] = acc[m][cc];
  __syncthreads();
  for (int i = threadIdx.x; i < M * kTileCols; i += kThreads) {
    const int m = i / kTileCols, col = i % kTileCols;
    float sum = red[0][m][col];
#pragma unroll
    for (int wi = 1; wi < kWarps; ++wi) sum += red[wi][m][col];
    red[0][m][col] = sum;
  }

  // Block partials -> output. With a cluster, rank r finalises a 1/split share of the
  // tile, reading every rank's partial (ranks in order) through distributed shared memory.
  int lo = 0, hi = M * kTileCols;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  if (split > 1) {
    cluster.sync();
    const int share = (M * kTileCols) / split;
    lo = rank * share;
    hi = lo + share;
  } else {
    __syncthreads();
  }
#else
  __syncthreads();
#endif
  for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += kThreads) {
    const int m = i / kTileCols, col = i % kTileCols;
    const std::int64_t n = tile0 + col;
    float sum;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (split > 1) {
      sum = 0.0f;
      for (int q = 0; q < split; ++q) sum += cluster.map_shared_rank(&red[0][0][0], q)[i];
    } else {
      sum = red[0][m][col];
    }
#else
    sum = red[0][m][col];
#endif
    if (n < N) {
      if (bias) sum += __half2float(bias[n]);
      out[m * N + n] = from_float<T>(sum);
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (split > 1) cluster.sync();  // keep this block's shared memory alive for the readers
#endif
}

// The bfloat16 instantiations use the fp16 kernels' occupancy (queried at construction)
// for the split choice: same shape, block size and launch bounds.
template <int M, class T>
void launch_rows(const DeviceLayer& L, const T* x, T* out, cudaStream_t stream) {
  constexpr int kTileCols = GemvShape<M>::kTileCols;
  const std::int64_t tiles = (L.N + kTileCols - 1) / kTileCols;
  // Clusters of 8 only where the tiles do not fill one wave even at split 4: measured on the
  // H100 at m = 1 (EXL2_CUDA_MAX_SPLIT sweep, GPTQ-4): 4096x4096 9.8 us with 8 against 11.5 with
  // 4 and 14336x4096 24.1 against 29.6 (32 tiles), but 4096x14336 23.1 against 19.1 and
  // 8192x28672 71.5 against 68.7 (112 and 224 tiles).
  // (Clusters of 16 measured level with 8 here: 4096x4096 and 14336x4096 at m = 1, H200.)
  const int cap = tiles * 4 < resident_blocks(L, L.gemv_blocks_per_sm[M]) ? 8 : 4;
  const int split = cluster_split(L, tiles, 2 * kWarps, L.gemv_blocks_per_sm[M], cap);
  launch_clustered(gemv_kernel<M, T>, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(split)),
                   dim3(kThreads), split, 1, stream, "gemv_kernel launch", x, L.K,
                   static_cast<const std::uint32_t*>(L.qweight.get()), static_cast<const __half*>(L.scales.get()),
                   static_cast<const std::uint8_t*>(L.zeros.get()), L.kernel_perm(),
                   static_cast<const int4*>(L.chunks.get()), L.num_chunks, static_cast<const __half*>(L.bias.get()),
                   out, L.N, split);
}

}  // namespace

/// EXL2_CUDA_MAX_SPLIT = 1, 2, 4, 8 or 16 caps the split-K factor of the layers built while it
/// is set (to measure the split heuristic); 0 when unset or anything else. Clusters of 8 blocks
/// measured mixed for the GEMV kernels on the H100 (8192x28672, m = 1: split 8 76-107 us
/// across runs of one session, 71.5 us in another, splits <= 4 68-69 us; 4096x4096 and
/// 14336x4096 m = 1 faster with 8: 9.8 / 24.1 against 11.5 / 29.6 us), so the GEMV allows 8
/// only where its tiles do not fill one wave at split 4 (launch_rows) and the fused MMA kernel
/// keeps 4; the tc kernel's cap is 8 (tc_gemm.cu).
static int max_split_from_env() {
  const int s = env::integer_in("EXL2_CUDA_MAX_SPLIT", 1, 16, 0);
  return (s & (s - 1)) == 0 ? s : 0;  // 1, 2, 4, 8 or 16
}

int cluster_split(const DeviceLayer& L, std::int64_t tiles, int min_chunks_per_block, int blocks_per_sm,
                  int max_split) {
  if (!L.clusters) return 1;
  return split_rule::by_waves(tiles, resident_blocks(L, blocks_per_sm), L.num_chunks, min_chunks_per_block,
                              split_rule::capped(max_split, L.max_split));
}

int single_wave_split(const DeviceLayer& L, std::int64_t tiles, int min_chunks_per_block, int blocks_per_sm,
                      int max_split, bool any_size) {
  if (!L.clusters) return 1;
  return split_rule::single_wave(tiles, resident_blocks(L, blocks_per_sm), L.num_chunks, min_chunks_per_block,
                                 split_rule::capped(max_split, L.max_split), any_size);
}

bool cluster16_launchable(const void* kernel, int threads) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1, 16, 1);
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = 16;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // not supported here: no clusters of 16
    return false;
  }
  return clusters > 0;
}

void allow_cluster16(const void* kernel) {
  EXL2_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
}

int blocks_per_sm_with_smem(std::initializer_list<const void*> kernels, int threads, std::size_t smem_bytes) {
  for (const void* k : kernels)
    EXL2_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  int n = 0;
  EXL2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, *kernels.begin(), threads, smem_bytes));
  return n;
}

template <int... Ms>
void occupancy_for(DeviceLayer& L, std::integer_sequence<int, Ms...>) {
  ((EXL2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&L.gemv_blocks_per_sm[Ms + 1],
                                                                  gemv_kernel<Ms + 1, __half>, kThreads, 0))),
   ...);
}

void query_gemv_occupancy(DeviceLayer& L) {
  static_assert(kGemvMaxRows < 17, "DeviceLayer::gemv_blocks_per_sm is too small");
  occupancy_for(L, std::make_integer_sequence<int, kGemvMaxRows>{});
  // Cluster split-K needs the kernels' sm_90 code paths (the distributed-shared-memory
  // epilogues are compiled only for __CUDA_ARCH__ >= 900). A build for an older virtual
  // architecture JIT-compiled on a 9.0 device lacks them: every rank would then write its
  // own partial sums. All kernels come from one compilation, so one kernel's PTX version
  // stands for all of them.
  cudaFuncAttributes attr{};
  EXL2_CUDA_CHECK(cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(gemv_kernel<1, __half>)));
  L.clusters = L.cc_major >= 9 && attr.ptxVersion >= 90;
  L.max_split = max_split_from_env();
}

template <class T, int... Ms>
void launch_for(std::int64_t m, const DeviceLayer& L, const T* x, T* out, cudaStream_t stream,
                std::integer_sequence<int, Ms...>) {
  ((m == Ms + 1 ? (launch_rows<Ms + 1, T>(L, x, out, stream), 0) : 0), ...);
}

void launch_gemv(const DeviceLayer& L, const __half* x, std::int64_t m, __half* out, cudaStream_t stream) {
  launch_for(m, L, x, out, stream, std::make_integer_sequence<int, kGemvMaxRows>{});
}

void launch_gemv(const DeviceLayer& L, const __nv_bfloat16* x, std::int64_t m, __nv_bfloat16* out,
                 cudaStream_t stream) {
  launch_for(m, L, x, out, stream, std::make_integer_sequence<int, kGemvMaxRows>{});
}

}  // namespace exl2::detail::cuda
