// Tensor-core kernel for small m (decode), on the "tc" weight layout (tc_layout.hpp).
//
// EXPERIMENTAL, opt-in: a layer gets the tc layout (an extra copy of its codes, so twice
// the code memory) only when EXL2_CUDA_TC=1 is set at construction and the device has
// compute capability 8.0+ (mma.sync m16n8k16); gemm() then uses this kernel for
// m <= kTcMaxRows. It was written without access to a GPU: its layout is checked on the
// host (tests/cpp/test_tc_layout.cpp) and its results by tests/test_tc_kernel.py (CUDA);
// see src/cuda/README.md for its status.
//
// Work split:
//   block   = 8 warps, one 32-column block j (four n8 tiles) and one tile of 16*MT rows;
//   warps   = the block's chunk range is cut into 8 contiguous pieces, one per warp (so a
//             warp's chunks mostly share a group: scales/zeros are reloaded on change only);
//   cluster = on compute capability 9.0+, up to 8 blocks of a cluster split the chunk
//             range (split-K) and combine their fp32 partials through distributed shared
//             memory in rank order, as the GEMV kernel does.
// Per chunk a warp loads its 128*b contiguous bytes (b words per lane), decodes 16 half2
// B-fragment registers per lane bit-exactly (magic 1024, exact q - z, one __hmul2 by the
// scale: f16((q - z) * s)), gathers its A fragments from x by perm, and issues
// 8 * MT mma.m16n8k16 with fp32 accumulation. The next chunk's weights and activations
// are loaded while the current one is decoded, and chunk c + 3's weights are prefetched
// into L2. Every output is summed in a fixed order (chunks of a warp, warps 0..7, ranks
// 0..S-1) and written once: deterministic, no atomics, no workspace, graph-capture safe.
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "core/cuda_backend.hpp"
#include "cuda/cuda_check.cuh"
#include "cuda/device_layer.cuh"
#include "cuda/gemv.cuh"
#include "cuda/tc_gemm.cuh"
#include "cuda/tc_layout.hpp"

namespace cg = cooperative_groups;

namespace exl2::detail::cuda {

namespace {

constexpr int kTcWarps = 8;
constexpr int kTcThreads = 32 * kTcWarps;
constexpr int kPackThreads = 256;

// ---------------------------------------------------------------------------------
// Construction: canonical column streams -> tc layout. Thread = (chunk, block, lane).
// ---------------------------------------------------------------------------------
template <int B>
__device__ void tc_pack_lane(const std::uint32_t* __restrict__ qw, const std::uint8_t* __restrict__ zeros,
                             std::int64_t N, const ChunkInfo& ci, std::int64_t n_base, int lane,
                             std::uint32_t* __restrict__ dst) {
  const int g = lane >> 2, t = lane & 3;
  std::uint32_t colw[4][B];  // the chunk's words of this lane's four columns
  std::uint32_t zero[4];     // their zero points
  for (int jj = 0; jj < 4; ++jj) {
    const std::int64_t n = n_base + 8 * jj + g;
    for (int i = 0; i < B; ++i)
      colw[jj][i] = (n < N && i < ci.nwords) ? __ldg(qw + static_cast<std::int64_t>(ci.word0 + i) * N + n) : 0u;
    zero[jj] = n < N ? zeros[static_cast<std::int64_t>(ci.group) * N + n] : 0u;
  }
  std::uint32_t w[B];
  // Rows past a short chunk's end get the code z, i.e. the weight (z - z) * s = 0 (their
  // activations are 0 too): they add exactly 0 even where (0 - z) * s would overflow.
  // Columns past N have code 0 and get scale 0 in the GEMM kernel.
  tc::pack_lane<B>(
      g, t,
      [&](int r, int c) -> std::uint32_t { return r < ci.rows ? tc::stream_code<B>(colw[c / 8], r) : zero[c / 8]; },
      w);
  for (int i = 0; i < B; ++i) dst[i] = w[i];
}

__global__ void tc_pack_kernel(const std::uint32_t* __restrict__ qw, const std::uint8_t* __restrict__ zeros,
                               std::int64_t N, std::int64_t npad,
                               const int4* __restrict__ chunks, const std::int32_t* __restrict__ tc_row0,
                               int num_chunks, std::uint32_t* __restrict__ out) {
  const std::int64_t nblocks = npad / tc::kBlockCols;
  const std::int64_t total = static_cast<std::int64_t>(num_chunks) * nblocks * 32;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int lane = static_cast<int>(i & 31);
    const std::int64_t j = (i >> 5) % nblocks;
    const int c = static_cast<int>((i >> 5) / nblocks);
    const ChunkInfo ci = load_chunk(chunks, c);
    std::uint32_t* dst = out + static_cast<std::int64_t>(tc_row0[c]) * npad + j * 32 * ci.bits + lane * ci.bits;
    const std::int64_t n_base = j * tc::kBlockCols;
    switch (ci.bits) {
      case 2: tc_pack_lane<2>(qw, zeros, N, ci, n_base, lane, dst); break;
      case 3: tc_pack_lane<3>(qw, zeros, N, ci, n_base, lane, dst); break;
      case 4: tc_pack_lane<4>(qw, zeros, N, ci, n_base, lane, dst); break;
      case 5: tc_pack_lane<5>(qw, zeros, N, ci, n_base, lane, dst); break;
      case 6: tc_pack_lane<6>(qw, zeros, N, ci, n_base, lane, dst); break;
      case 8: tc_pack_lane<8>(qw, zeros, N, ci, n_base, lane, dst); break;
      default: break;  // rejected at construction
    }
  }
}

// ---------------------------------------------------------------------------------
// The GEMM kernel.
// ---------------------------------------------------------------------------------
__device__ __forceinline__ __half2 u32_as_h2(std::uint32_t u) {
  __half2 h;
  std::memcpy(&h, &u, 4);
  return h;
}
__device__ __forceinline__ std::uint32_t h2_as_u32(__half2 h) {
  std::uint32_t u;
  std::memcpy(&u, &h, 4);
  return u;
}

/// d += A (16x16, row-major fragment a) * B (16x8, fragment b0/b1), fp32 accumulation.
__device__ __forceinline__ void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                          std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  // Never launched below compute capability 8.0 (tc_usable); keeps sm_75 builds compiling.
  (void)d;
  (void)a;
  (void)b0;
  (void)b1;
  __trap();
#endif
}

/// The b words of one lane for one chunk (streamed: read once, evict first).
template <int B>
__device__ __forceinline__ void load_lane_words(const std::uint32_t* __restrict__ p, std::uint32_t (&w)[8]) {
  if constexpr (B == 4) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (B == 8) {
    const uint4 v0 = __ldcs(reinterpret_cast<const uint4*>(p));
    const uint4 v1 = __ldcs(reinterpret_cast<const uint4*>(p) + 1);
    w[0] = v0.x, w[1] = v0.y, w[2] = v0.z, w[3] = v0.w;
    w[4] = v1.x, w[5] = v1.y, w[6] = v1.z, w[7] = v1.w;
  } else if constexpr (B == 2 || B == 6) {
    // lane * B words is 8-byte aligned for even B
#pragma unroll
    for (int i = 0; i < B / 2; ++i) {
      const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p) + i);
      w[2 * i] = v.x, w[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < B; ++i) w[i] = __ldcs(p + i);
  }
}

/// What a warp fetches for one chunk ahead of decoding it.
template <int MT>
struct Stage {
  ChunkInfo ci;
  std::uint32_t w[8];         // the lane's b words
  std::uint32_t a[MT][2][4];  // A fragments [m tile][k16 step][register]
};

/// Activation value x[row, k] as fp16 bits (0 outside the matrix / past the chunk's end).
__device__ __forceinline__ std::uint32_t x_bits(const __half* __restrict__ x, std::int64_t row, std::int64_t M,
                                                std::int64_t K, int k) {
  if (row >= M || k < 0) return 0u;
  return __half_as_ushort(x[row * K + k]);
}

template <int MT>
__device__ __forceinline__ void fetch_stage(Stage<MT>& st, int c, const int4* __restrict__ chunks,
                                            const std::int32_t* __restrict__ tc_row0, const std::uint32_t* __restrict__ tcw,
                                            std::int64_t npad, std::int64_t j, const __half* __restrict__ x,
                                            std::int64_t M, std::int64_t K, std::int64_t m0,
                                            const int* __restrict__ perm, int lane) {
  st.ci = load_chunk(chunks, c);
  const int b = st.ci.bits;
  const std::uint32_t* p = tcw + static_cast<std::int64_t>(__ldg(tc_row0 + c)) * npad + j * 32 * b + lane * b;
  switch (b) {
    case 2: load_lane_words<2>(p, st.w); break;
    case 3: load_lane_words<3>(p, st.w); break;
    case 4: load_lane_words<4>(p, st.w); break;
    case 5: load_lane_words<5>(p, st.w); break;
    case 6: load_lane_words<6>(p, st.w); break;
    case 8: load_lane_words<8>(p, st.w); break;
    default: break;
  }
  // Activation column of each of the chunk's rows: lane l holds row l's, then every lane
  // takes the 8 it needs (k = 16s + 2t + {0, 1, 8, 9}) by shuffles.
  int pk = -1;
  if (lane < st.ci.rows) {
    const int r = st.ci.row0 + lane;
    pk = perm ? __ldg(perm + r) : r;
  }
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int k0 = __shfl_sync(0xffffffffu, pk, 16 * s + 2 * t);
    const int k1 = __shfl_sync(0xffffffffu, pk, 16 * s + 2 * t + 1);
    const int k8 = __shfl_sync(0xffffffffu, pk, 16 * s + 2 * t + 8);
    const int k9 = __shfl_sync(0xffffffffu, pk, 16 * s + 2 * t + 9);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {  // fragment rows g and g + 8
        const std::int64_t row = m0 + mt * 16 + g + 8 * hr;
        st.a[mt][s][hr] = x_bits(x, row, M, K, k0) | (x_bits(x, row, M, K, k1) << 16);
        st.a[mt][s][2 + hr] = x_bits(x, row, M, K, k8) | (x_bits(x, row, M, K, k9) << 16);
      }
    }
  }
}

template <int MT, int B>
__device__ __forceinline__ void tc_chunk(const Stage<MT>& st, const std::uint32_t (&s2)[4],
                                         const std::uint32_t (&z2)[4], float (&acc)[MT][4][4]) {
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    std::uint32_t b[2][2];  // [k16 step][b0 / b1]
#pragma unroll
    for (int s = 0; s < 2; ++s) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const std::uint32_t packed = tc::extract_pair<B>(st.w, 4 * jj + 2 * s + h);
        const __half2 q = u32_as_h2(packed | 0x64006400u);  // 1024 + q, exact
        b[s][h] = h2_as_u32(__hmul2(__hsub2(q, u32_as_h2(z2[jj])), u32_as_h2(s2[jj])));
      }
    }
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_16816(acc[mt][jj], st.a[mt][s], b[s][0], b[s][1]);
  }
}

template <int MT>
__global__ void __launch_bounds__(kTcThreads, MT == 1 ? 3 : 2)
    tc_gemm_kernel(const __half* __restrict__ x, std::int64_t M, std::int64_t K, const std::uint32_t* __restrict__ tcw,
                   std::int64_t npad, const __half* __restrict__ scales, const std::uint8_t* __restrict__ zeros,
                   const int* __restrict__ perm, const int4* __restrict__ chunks,
                   const std::int32_t* __restrict__ tc_row0, int num_chunks, const __half* __restrict__ bias,
                   __half* __restrict__ out, std::int64_t N, int split) {
  constexpr int R = 16 * MT;  // rows of the block's m tile
  constexpr int BC = tc::kBlockCols;
  __shared__ __align__(16) float red[kTcWarps][R][BC];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int rank = static_cast<int>(blockIdx.y);  // cluster rank (the cluster spans grid.y)
  const std::int64_t j = blockIdx.x;
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.z) * R;

  const int cb = static_cast<int>(static_cast<std::int64_t>(num_chunks) * rank / split);
  const int ce = static_cast<int>(static_cast<std::int64_t>(num_chunks) * (rank + 1) / split);
  const int wb = cb + static_cast<int>(static_cast<std::int64_t>(ce - cb) * warp / kTcWarps);
  const int we = cb + static_cast<int>(static_cast<std::int64_t>(ce - cb) * (warp + 1) / kTcWarps);

  float acc[MT][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][jj][e] = 0.0f;

  int group = -1;
  std::uint32_t s2[4] = {0, 0, 0, 0}, z2[4] = {0, 0, 0, 0};
  Stage<MT> next;
  if (wb < we) fetch_stage<MT>(next, wb, chunks, tc_row0, tcw, npad, j, x, M, K, m0, perm, lane);
  for (int c = wb; c < we; ++c) {
    const Stage<MT> cur = next;
    if (c + 1 < we) fetch_stage<MT>(next, c + 1, chunks, tc_row0, tcw, npad, j, x, M, K, m0, perm, lane);
    if (c + 3 < we) {
      // Chunk c + 3's 128*b bytes of this block into L2 (no registers held): b lines.
      const ChunkInfo pf = load_chunk(chunks, c + 3);
      if (lane < pf.bits)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(tcw + static_cast<std::int64_t>(__ldg(tc_row0 + c + 3)) * npad +
                                                      j * 32 * pf.bits + lane * 32));
    }
    if (cur.ci.group != group) {
      group = cur.ci.group;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const std::int64_t n = j * BC + 8 * jj + g;
        std::uint32_t s = 0, z = 0;
        if (n < N) {
          const std::int64_t gi = static_cast<std::int64_t>(group) * N + n;
          s = __half_as_ushort(scales[gi]);
          z = zeros[gi];
        }
        s2[jj] = s | (s << 16);
        const std::uint32_t zb = 0x6400u + z;  // 1024 + z, exact in fp16
        z2[jj] = zb | (zb << 16);
      }
    }
    switch (cur.ci.bits) {
      case 2: tc_chunk<MT, 2>(cur, s2, z2, acc); break;
      case 3: tc_chunk<MT, 3>(cur, s2, z2, acc); break;
      case 4: tc_chunk<MT, 4>(cur, s2, z2, acc); break;
      case 5: tc_chunk<MT, 5>(cur, s2, z2, acc); break;
      case 6: tc_chunk<MT, 6>(cur, s2, z2, acc); break;
      case 8: tc_chunk<MT, 8>(cur, s2, z2, acc); break;
      default: break;
    }
  }

  // Warp partials (C fragments: rows g / g + 8, columns 2t, 2t + 1 of each n8 tile).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int r = mt * 16 + g, col = 8 * jj + 2 * t;
      red[warp][r][col] = acc[mt][jj][0];
      red[warp][r][col + 1] = acc[mt][jj][1];
      red[warp][r + 8][col] = acc[mt][jj][2];
      red[warp][r + 8][col + 1] = acc[mt][jj][3];
    }
  __syncthreads();
  for (int i = threadIdx.x; i < R * BC; i += kTcThreads) {
    const int r = i / BC, col = i % BC;
    float sum = red[0][r][col];
#pragma unroll
    for (int wi = 1; wi < kTcWarps; ++wi) sum += red[wi][r][col];
    red[0][r][col] = sum;
  }

  // Block partials -> output; with a cluster, rank r finalises a 1/split share of the
  // tile, summing every rank's partial in rank order (distributed shared memory).
  int lo = 0, hi = R * BC;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  if (split > 1) {
    cluster.sync();
    const int share = (R * BC) / split;
    lo = rank * share;
    hi = lo + share;
  } else {
    __syncthreads();
  }
#else
  __syncthreads();
#endif
  for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += kTcThreads) {
    const int r = i / BC, col = i % BC;
    float sum;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (split > 1) {
      sum = 0.0f;
      for (int q = 0; q < split; ++q) sum += cluster.map_shared_rank(&red[0][0][0], q)[i];
    } else {
      sum = red[0][r][col];
    }
#else
    sum = red[0][r][col];
#endif
    const std::int64_t row = m0 + r, n = j * BC + col;
    if (row < M && n < N) {
      if (bias) sum += __half2float(bias[n]);
      out[row * N + n] = __float2half_rn(sum);
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (split > 1) cluster.sync();  // keep this block's shared memory alive for the readers
#endif
}

template <int MT>
void launch_tc_rows(const DeviceLayer& L, const __half* x, std::int64_t m, __half* out, cudaStream_t stream) {
  const std::int64_t nblocks = L.tc_npad / tc::kBlockCols;
  const std::int64_t mtiles = (m + 16 * MT - 1) / (16 * MT);
  if (nblocks > 0x7fffffffLL) throw Unsupported("gemm: N is too large for the tc kernel");
  const int split = cluster_split(L, nblocks * mtiles, 2 * kTcWarps, L.tc_blocks_per_sm[MT]);
  launch_clustered(tc_gemm_kernel<MT>, dim3(static_cast<unsigned>(nblocks), static_cast<unsigned>(split),
                                            static_cast<unsigned>(mtiles)),
                   dim3(kTcThreads), split, 1, stream, "tc_gemm_kernel launch", x, m, L.K,
                   static_cast<const std::uint32_t*>(L.tc_qweight.get()), L.tc_npad,
                   static_cast<const __half*>(L.scales.get()), static_cast<const std::uint8_t*>(L.zeros.get()),
                   L.kernel_perm(), static_cast<const int4*>(L.chunks.get()),
                   static_cast<const std::int32_t*>(L.tc_row0.get()), L.num_chunks,
                   static_cast<const __half*>(L.bias.get()), out, L.N, split);
}

}  // namespace

bool tc_requested() noexcept {
  const char* v = std::getenv("EXL2_CUDA_TC");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

void build_tc_layout(DeviceLayer& L, const std::vector<int4>& chunks_host, cudaStream_t stream) {
  if (L.cc_major < 8 || L.num_chunks == 0 || L.N == 0) return;
  {
    // The kernel's mma.sync needs code for sm_80+: a build for an older virtual architecture
    // (JIT-compiled here) holds only the trap, so such a layer gets no tc layout.
    cudaFuncAttributes attr{};
    EXL2_CUDA_CHECK(cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(tc_gemm_kernel<1>)));
    if (attr.ptxVersion < 80) return;
  }
  std::vector<std::int32_t> row0(chunks_host.size());
  std::int64_t rows = 0;  // word rows of the tc layout: sum of the chunks' bit widths
  for (std::size_t c = 0; c < chunks_host.size(); ++c) {
    if (rows > 0x7fffffffLL) internal_error("tc layout: too many word rows");
    row0[c] = static_cast<std::int32_t>(rows);
    rows += chunks_host[c].z & 0xff;
  }
  L.tc_npad = (L.N + tc::kBlockCols - 1) / tc::kBlockCols * tc::kBlockCols;
  L.tc_row0.allocate(row0.size(), "tc chunk offsets");
  EXL2_CUDA_CHECK(cudaMemcpyAsync(L.tc_row0.get(), row0.data(), row0.size() * sizeof(std::int32_t),
                                  cudaMemcpyHostToDevice, stream));
  L.tc_qweight.allocate(static_cast<std::size_t>(rows * L.tc_npad), "tc qweight");
  const std::int64_t threads = static_cast<std::int64_t>(L.num_chunks) * (L.tc_npad / tc::kBlockCols) * 32;
  tc_pack_kernel<<<grid_for(threads, kPackThreads), kPackThreads, 0, stream>>>(
      L.qweight.get(), L.zeros.get(), L.N, L.tc_npad, L.chunks.get(), L.tc_row0.get(), L.num_chunks, L.tc_qweight.get());
  EXL2_CUDA_CHECK_LAUNCH("tc_pack_kernel");
  EXL2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&L.tc_blocks_per_sm[1], tc_gemm_kernel<1>,
                                                                kTcThreads, 0));
  EXL2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&L.tc_blocks_per_sm[2], tc_gemm_kernel<2>,
                                                                kTcThreads, 0));
  // row0 is a local host vector: the upload must finish before it goes out of scope.
  EXL2_CUDA_CHECK(cudaStreamSynchronize(stream));
}

bool tc_usable(const DeviceLayer& L, std::int64_t m) noexcept {
  return L.tc_qweight.get() != nullptr && L.cc_major >= 8 && m >= 1 && m <= kTcMaxRows;
}

void launch_tc(const DeviceLayer& L, const __half* x, std::int64_t m, __half* out, cudaStream_t stream) {
  if (m <= 16)
    launch_tc_rows<1>(L, x, m, out, stream);
  else
    launch_tc_rows<2>(L, x, m, out, stream);
}

}  // namespace exl2::detail::cuda
