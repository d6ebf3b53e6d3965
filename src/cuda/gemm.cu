// CUDA backend: out[m, N] = x[m, K] @ W (+ bias), fp16 or bfloat16 in/out (both the same),
// fp32 accumulation.
//
// Two kernels, chosen by m inside gemm():
//   m <= kGemvMaxRows : gemv_kernel<M> (gemv.cu; CUDA cores, weight streaming)
//   m >  kGemvMaxRows : mma_kernel<...> (fused dequantize + tensor-core tiles, wmma)
// Both walk K in chunks (<= 32 permuted rows of one group, see device_layer.cuh), gather
// the activation columns by perm themselves, reduce in a fixed order (inside a block, or
// across the blocks of one thread-block cluster through distributed shared memory on
// compute capability 9.0+) and write every output element once: deterministic, no
// atomics, no workspace, no allocation, no host synchronisation (graph-capture safe).
//
// bfloat16: the same kernels templated on T = __nv_bfloat16 (weights decoded as
// bf16((q - z) * s)). wmma has bfloat16 fragments only from compute capability 8.0, so
// the bfloat16 mma_kernel is compiled only for __CUDA_ARCH__ >= 800 (a trap elsewhere)
// and launched only when the code the device runs was compiled for 8.0+ (checked once
// at construction: DeviceLayer::mma_bf16). Otherwise (Turing) bfloat16 with m > 16 runs
// the GEMV kernel on slices of at most 16 rows: correct and deterministic, slower.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cooperative_groups.h>
#include <mma.h>

#include <cstdint>

#include "core/cuda_backend.hpp"
#include "core/env_knob.hpp"
#include "cuda/cuda_check.cuh"
#include "cuda/device_layer.cuh"
#include "cuda/gemv.cuh"
#include "cuda/tc_gemm.cuh"

namespace cg = cooperative_groups;

namespace exl2::detail::cuda {

namespace {

// =================================================================================
// Larger m: fused dequantize + tensor-core GEMM (nvcuda::wmma m16n16k16, fp32 accum).
//   block tile BM x BN, 2*BN threads; warps tile it as (BM/WM) x (BN/WN), each warp
//   holding (WM/16) x (WN/16) accumulator fragments;
//   the K loop walks the chunk table: per chunk (one k-tile of <= 32 rows)
//     - X tile  [BM x 32]: x[m0 + i, perm[row0 + k]] gathered into shared memory
//       (0 for rows past m or past the chunk's end);
//     - W tile  [32 x BN]: thread (column, half) decodes 16 rows of its column,
//       bit-exact f16((q - z) * s) (0 for rows past the chunk's end);
//     - two k16 steps of wmma;
//   epilogue: per warp, fragments -> shared fp32 -> + bias (fp32) -> one rounding -> out.
// =================================================================================
constexpr int kBK = kChunkRows;  // 32

template <int B, int R0, int LDW, class T>
__device__ __forceinline__ void mma_decode(const std::uint32_t* __restrict__ qw_col, std::int64_t N,
                                           const ChunkInfo& ci, int z, float s, T* __restrict__ ws_col) {
  decode_rows<B, R0, 16>(qw_col, N, ci.nwords, [&](int i, std::uint32_t q) {
    const T h = dq_value_as<T>(q, z, s);
    ws_col[i * LDW] = (i < ci.rows) ? h : from_float<T>(0.0f);
  });
}

template <int H, int LDW, class T>
__device__ __forceinline__ void mma_decode_dispatch(const std::uint32_t* __restrict__ qw_col, std::int64_t N,
                                                    const ChunkInfo& ci, int z, float s,
                                                    T* __restrict__ ws_col) {
  switch (ci.bits) {
    case 2: mma_decode<2, H * 16, LDW, T>(qw_col, N, ci, z, s, ws_col); break;
    case 3: mma_decode<3, H * 16, LDW, T>(qw_col, N, ci, z, s, ws_col); break;
    case 4: mma_decode<4, H * 16, LDW, T>(qw_col, N, ci, z, s, ws_col); break;
    case 5: mma_decode<5, H * 16, LDW, T>(qw_col, N, ci, z, s, ws_col); break;
    case 6: mma_decode<6, H * 16, LDW, T>(qw_col, N, ci, z, s, ws_col); break;
    case 8: mma_decode<8, H * 16, LDW, T>(qw_col, N, ci, z, s, ws_col); break;
    default: break;  // rejected at construction
  }
}

template <int BM, int BN, int WM, int WN>
struct MmaConfig {
  static constexpr int kThreads = 2 * BN;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kLDX = kBK + 8;  // halves; rows stay 32-byte aligned for wmma
  static constexpr int kLDW = BN + 8;
  static constexpr int kLDE = 16 + 4;  // floats
  static constexpr int kFM = WM / 16;
  static constexpr int kFN = WN / 16;
  static constexpr int kWarpsN = BN / WN;
  // Occupancy target for __launch_bounds__ (512 threads per SM): gives ptxas room for the
  // accumulators (without it sm_80 spilled the 64x64 kernel).
  static constexpr int kMinBlocks = 512 / kThreads;
  // Split-K through clusters only for the small tile (its partial tile fits shared memory).
  static constexpr bool kSplitK = BM * BN <= 64 * 64;
  static_assert((BM / WM) * (BN / WN) == kWarps, "warp tiling must cover the block tile");
  static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0, "bad tile shape");
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "bad thread count");
};

// True where wmma has no bfloat16 fragments (device code for compute capability < 8.0).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kNoBf16Mma = true;
#else
constexpr bool kNoBf16Mma = false;
#endif

template <int BM, int BN, int WM, int WN, class T>
__global__ void __launch_bounds__(MmaConfig<BM, BN, WM, WN>::kThreads, MmaConfig<BM, BN, WM, WN>::kMinBlocks)
    mma_kernel(const T* __restrict__ x, std::int64_t M, std::int64_t K, const std::uint32_t* __restrict__ qw,
               const __half* __restrict__ scales, const std::uint8_t* __restrict__ zeros,
               const int* __restrict__ perm, const int4* __restrict__ chunks, int num_chunks,
               const __half* __restrict__ bias, T* __restrict__ out, std::int64_t N, int out_aligned16,
               int split) {
  // The bfloat16 body is discarded (never instantiated) below compute capability 8.0;
  // gemm() does not launch this instantiation there (DeviceLayer::mma_bf16).
  if constexpr (kNoBf16Mma && kIsBf16<T>) {
    __trap();
  } else {
  using namespace nvcuda;
  using Cfg = MmaConfig<BM, BN, WM, WN>;
  constexpr int NT = Cfg::kThreads;  // threads per block
  constexpr int LDX = Cfg::kLDX;
  constexpr int LDW = Cfg::kLDW;
  constexpr int LDE = Cfg::kLDE;
  constexpr int FM = Cfg::kFM;
  constexpr int FN = Cfg::kFN;

  __shared__ __align__(128) T Xs[BM * LDX];
  __shared__ __align__(128) T Ws[kBK * LDW];
  __shared__ __align__(128) float Es[Cfg::kWarps][16 * LDE];
  // Split-K (clusters): the block's fp32 partial tile, read by the other ranks.
  constexpr int LDC = BN + 4;
  __shared__ __align__(128) float Cs[Cfg::kSplitK ? BM * LDC : 1];
  (void)Cs;  // used by the split-K epilogue (compute capability 9.0+ only)
  const int rank = static_cast<int>(blockIdx.z);
  const int c_begin = static_cast<int>(static_cast<std::int64_t>(num_chunks) * rank / split);
  const int c_end = static_cast<int>(static_cast<std::int64_t>(num_chunks) * (rank + 1) / split);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / Cfg::kWarpsN;
  const int wn = warp % Cfg::kWarpsN;
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.x) * BM;

  const int dq_col = tid % BN;   // W tile: column of this thread
  const int dq_half = tid / BN;  // W tile: rows 0-15 or 16-31 (warp-uniform)
  const int xk = tid % 32;       // X tile: k of this thread
  const int xr = tid / 32;       // X tile: first row of this thread

  const std::int64_t n_tiles = (N + BN - 1) / BN;
  for (std::int64_t nt = blockIdx.y; nt < n_tiles; nt += gridDim.y) {
    const std::int64_t n0 = nt * BN;
    const std::int64_t n = n0 + dq_col;
    const std::int64_t nc = n < N ? n : N - 1;  // clamped: columns past N are computed and discarded

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int c = c_begin; c < c_end; ++c) {
      const ChunkInfo ci = load_chunk(chunks, c);
      __syncthreads();  // previous tiles fully consumed

      // X tile, gathered by perm.
      {
        std::int64_t p = -1;
        if (xk < ci.rows) {
          const int r = ci.row0 + xk;
          p = perm ? __ldg(perm + r) : r;
        }
#pragma unroll 4
        for (int i = xr; i < BM; i += NT / 32) {
          const std::int64_t gm = m0 + i;
          T v = from_float<T>(0.0f);
          if (p >= 0 && gm < M) v = x[gm * K + p];
          Xs[i * LDX + xk] = v;
        }
      }
      // W tile, dequantized bit-exactly.
      {
        const std::int64_t gi = static_cast<std::int64_t>(ci.group) * N + nc;
        const float s = __half2float(scales[gi]);
        const int z = zeros[gi];
        const std::uint32_t* qw_col = qw + static_cast<std::int64_t>(ci.word0) * N + nc;
        if (dq_half == 0)
          mma_decode_dispatch<0, LDW>(qw_col, N, ci, z, s, Ws + dq_col);
        else
          mma_decode_dispatch<1, LDW>(qw_col, N, ci, z, s, Ws + dq_col);
      }
      __syncthreads();

#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[FN];
#pragma unroll
        for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], Xs + (wm * WM + i * 16) * LDX + kk, LDX);
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], Ws + kk * LDW + wn * WN + j * 16, LDW);
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
          for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (Cfg::kSplitK) {
      if (split > 1) {
        // Each rank parks its partial tile; rank r then finalises rows r, r + split, ...
        // summing the ranks' partials in rank order (distributed shared memory).
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
          for (int j = 0; j < FN; ++j)
            wmma::store_matrix_sync(Cs + (wm * WM + i * 16) * LDC + wn * WN + j * 16, acc[i][j], LDC,
                                    wmma::mem_row_major);
        cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();
        for (int g = tid; g < BM * (BN / 8); g += NT) {
          const int row = g / (BN / 8), col = (g % (BN / 8)) * 8;
          if (row % split != rank) continue;
          const std::int64_t gm = m0 + row, gn = n0 + col;
          if (gm >= M || gn >= N) continue;
          float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          for (int q = 0; q < split; ++q) {
            const float* src = cluster.map_shared_rank(Cs, q) + row * LDC + col;
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] += src[e];
          }
          T* dst = out + gm * N + gn;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (gn + e < N) dst[e] = from_float<T>(v[e] + (bias ? __half2float(bias[gn + e]) : 0.0f));
          }
        }
        cluster.sync();  // partial tiles stay alive until every rank has read them
        continue;        // next n-tile
      }
    }
#endif
    // Epilogue: per warp, one 16x16 fragment at a time through shared memory.
    float* es = Es[warp];
    const int er = lane >> 1;       // row within the fragment
    const int ec = (lane & 1) * 8;  // first of 8 columns
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::store_matrix_sync(es, acc[i][j], LDE, wmma::mem_row_major);
        __syncwarp();
        const std::int64_t gm = m0 + wm * WM + i * 16 + er;
        const std::int64_t gn = n0 + wn * WN + j * 16 + ec;
        if (gm < M && gn < N) {
          float v[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            v[e] = es[er * LDE + ec + e];
            if (bias && gn + e < N) v[e] += __half2float(bias[gn + e]);
          }
          T* dst = out + gm * N + gn;
          if (out_aligned16 && gn + 8 <= N) {
            if constexpr (kIsBf16<T>) {
              union {
                uint4 u;
                __nv_bfloat162 h[4];
              } pack;
#pragma unroll
              for (int e = 0; e < 4; ++e) pack.h[e] = __floats2bfloat162_rn(v[2 * e], v[2 * e + 1]);
              *reinterpret_cast<uint4*>(dst) = pack.u;
            } else {
              union {
                uint4 u;
                __half2 h[4];
              } pack;
#pragma unroll
              for (int e = 0; e < 4; ++e) pack.h[e] = __floats2half2_rn(v[2 * e], v[2 * e + 1]);
              *reinterpret_cast<uint4*>(dst) = pack.u;
            }
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
              if (gn + e < N) dst[e] = from_float<T>(v[e]);
          }
        }
        __syncwarp();  // es is rewritten by the next fragment
      }
    }
  }
  }  // if constexpr (kNoBf16Mma && kIsBf16<T>) else
}

template <int BM, int BN, int WM, int WN, class T>
void launch_mma(const DeviceLayer& L, const T* x, std::int64_t m, T* out, cudaStream_t stream) {
  using Cfg = MmaConfig<BM, BN, WM, WN>;
  const std::int64_t m_tiles = (m + BM - 1) / BM;
  const std::int64_t n_tiles = (L.N + BN - 1) / BN;
  if (m_tiles > 0x7fffffffLL) throw Unsupported("gemm: m = " + std::to_string(m) + " is too large");
  const unsigned grid_n = static_cast<unsigned>(n_tiles < 65535 ? n_tiles : 65535);
  const int per_sm = L.mma_blocks_per_sm[Cfg::kSplitK ? 0 : 1];
  const int split = (Cfg::kSplitK && n_tiles <= 65535) ? cluster_split(L, m_tiles * n_tiles, 8, per_sm) : 1;
  const int aligned16 = (reinterpret_cast<std::uintptr_t>(out) % 16) == 0 ? 1 : 0;
  launch_clustered(mma_kernel<BM, BN, WM, WN, T>, dim3(static_cast<unsigned>(m_tiles), grid_n, split),
                   dim3(Cfg::kThreads), split, 2, stream, "mma_kernel launch", x, m, L.K,
                   static_cast<const std::uint32_t*>(L.qweight.get()), static_cast<const __half*>(L.scales.get()),
                   static_cast<const std::uint8_t*>(L.zeros.get()), L.kernel_perm(),
                   static_cast<const int4*>(L.chunks.get()), L.num_chunks, static_cast<const __half*>(L.bias.get()),
                   out, L.N, aligned16, split);
}

/// True when the device runs bfloat16 mma_kernel code compiled for compute capability
/// 8.0+ (its PTX version; a cubin or PTX JIT-compiled from an older virtual
/// architecture would hold only the trap).
bool mma_bf16_runs(const void* kernel) {
  cudaFuncAttributes attr{};
  EXL2_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  return attr.ptxVersion >= 80;
}

template <class T>
void gemm_rows(const DeviceLayer& layer, const T* x, std::int64_t m, T* out, cudaStream_t stream) {
  if (has_tc_layout(layer)) {  // the layer's only copy of its codes (tc_layout_wanted)
    launch_tc(layer, x, m, out, stream);
    return;
  }
  if (m <= kGemvMaxRows) {
    launch_gemv(layer, x, m, out, stream);
    return;
  }
  if constexpr (kIsBf16<T>) {
    if (!layer.mma_bf16) {
      // No bfloat16 tensor-core code for this device: GEMV on slices of <= 16 rows.
      for (std::int64_t r = 0; r < m; r += kGemvMaxRows) {
        const std::int64_t rows = m - r < kGemvMaxRows ? m - r : kGemvMaxRows;
        launch_gemv(layer, x + r * layer.K, rows, out + r * layer.N, stream);
      }
      return;
    }
  }
  // Large tiles only when they still give enough blocks to fill a large GPU.
  const std::int64_t big_blocks = ((m + 127) / 128) * ((layer.N + 127) / 128);
  if (m >= 256 && big_blocks >= 256)
    launch_mma<128, 128, 64, 32>(layer, x, m, out, stream);
  else
    launch_mma<64, 64, 32, 32>(layer, x, m, out, stream);
}

}  // namespace

void query_mma_occupancy(DeviceLayer& L) {
  EXL2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &L.mma_blocks_per_sm[0], mma_kernel<64, 64, 32, 32, __half>, MmaConfig<64, 64, 32, 32>::kThreads, 0));
  EXL2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &L.mma_blocks_per_sm[1], mma_kernel<128, 128, 64, 32, __half>, MmaConfig<128, 128, 64, 32>::kThreads, 0));
  // The bfloat16 instantiations share these occupancy numbers (same tiles and bounds).
  L.mma_bf16 = mma_bf16_runs(reinterpret_cast<const void*>(mma_kernel<64, 64, 32, 32, __nv_bfloat16>)) &&
               mma_bf16_runs(reinterpret_cast<const void*>(mma_kernel<128, 128, 64, 32, __nv_bfloat16>));
  // Testing switch: EXL2_CUDA_BF16_NO_MMA=1 (read at construction) makes the layer use the
  // compute-capability-7.5 fallback (GEMV slices) so that it can be tested on any GPU.
  if (env::flag("EXL2_CUDA_BF16_NO_MMA")) L.mma_bf16 = false;
}

void gemm(const DeviceLayer& layer, const LayerMeta& meta, const void* x, std::int64_t m, void* out, bool bf16,
          cudaStream_t stream) {
  check_layer_meta(layer, meta, "gemm");
  if (m <= 0 || layer.N == 0) return;
  DeviceGuard guard(layer.device);
  if (bf16) {
    gemm_rows(layer, static_cast<const __nv_bfloat16*>(x), m, static_cast<__nv_bfloat16*>(out), stream);
  } else {
    gemm_rows(layer, static_cast<const __half*>(x), m, static_cast<__half*>(out), stream);
  }
}

}  // namespace exl2::detail::cuda
