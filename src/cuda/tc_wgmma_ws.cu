// Hopper tensor-core kernel for m from 129 on large layers, on the tc stream layout
// (tc_layout.hpp): warp-specialised, with both wgmma operands in shared memory.
//
// The product is computed transposed, out^T = W^T x^T, as in tc_wgmma.cu, but the roles are
// split between the warpgroups of a block (3 x 128 threads; 4 x 128 for R = 192) instead of
// every warpgroup decoding the codes into its own registers between its wgmma:
//   warpgroup 0 (the producer) streams the tile's 128 columns through the cp.async ring
//     (RingFill, as every tc kernel, tc_ring_ahead steps ahead), decodes each chunk exactly as
//     the other tc kernels do (decode_chunk: bit-exact dequantize() values) and stores the
//     fragments with stmatrix into a stage's A tile; one of its threads copies the stage's
//     activation tile (R rows x 64 columns of the gathered copy) with the tensor memory
//     accelerator (TMA); with R = 192 a second producer warpgroup decodes the second chunk of
//     every stage (warpgroup 0 the first; it alone fills the ring and copies the activations);
//   the last two warpgroups (the consumers) each own 64 of the tile's columns and run
//     wgmma.m64nRk16 on the stages, R = 128, 192 or 256 activation rows, fp32 accumulators.
// So the consumers hold only accumulators (R / 2 registers) and the decode runs concurrently
// with the tensor cores instead of between their instructions.
//
// Stages (4): one per pair of chunks (64 rows of K). A stage holds
//   A: the tile's 128 columns x 64 rows of K in the K-major 128-byte-swizzle layout wgmma reads
//      (column n at 128 n bytes, its 16-byte piece c (8 rows of K) at 16 (c ^ (n & 7))): 16 KB;
//   X: R activation rows x 64 columns in the same layout (TMA's 128-byte swizzle): R x 128 bytes.
// mbarriers order them: full[s] (128 per producer warpgroup after their A writes and a proxy fence,
// plus the TMA's bytes) and empty[s] (256 consumer arrivals once the wgmma that read the stage
// have completed). The activations run 3 stages ahead of the decode. A pair with one chunk (the
// last of an odd count) runs 2 of the 4 k16 steps.
//
// Measured on the H100 (8192 x 28672 GPTQ-4, A/Bs in one session; docs/kernels.md): copying the activations with 16-byte cp.asyncs from the producer's
// threads instead of TMA: 3239 against 2211 us at m = 2048; a cluster of two blocks on adjacent
// column tiles sharing the activations by TMA multicast (half the L2 traffic, but a cluster-wide
// release of every stage): 2448 against 2116 us. Without decode and wgmma the kernel's copies
// and handshakes alone take 1176 us at m = 2048, so it serves m = 129..512, where it is the
// fastest route (routing: tc_wgmma.cu's config_for), not prefill. Nsight Compute at m = 512
// (R = 256, 1.44 GHz): tensor pipe 56% busy, shared memory 58%, L2 29%, DRAM 10% of peak, issue
// slots 20%: nothing saturated; the producer/consumer handshake's latencies set the pace, and
// loosening it (a wgmma group in flight, the producer up to 3 stages ahead) measured slower.
//
// Order: every output element is the sum over the chunks in order, k inside a chunk in the
// instruction's order, in one accumulator: deterministic. Blocks of one column tile are
// consecutive (blockIdx.x = row tile), so the blocks that read the same weight stream run
// together and it comes from DRAM about once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "core/cuda_backend.hpp"
#include "cuda/cuda_check.cuh"
#include "cuda/device_layer.cuh"
#include "cuda/gemv.cuh"
#include "cuda/tc_device.cuh"
#include "cuda/tc_layout.hpp"
#include "cuda/tc_wgmma_ws.cuh"
#include "cuda/tma_map.cuh"
#include "cuda/wgmma_device.cuh"
#include "cuda/wgmma_ops.cuh"

namespace exl2::detail::cuda {

namespace {

template <int R>
struct WsShape {
  static constexpr int kStages = 4;  // (R = 256: 192 KB of stages + the 32 KB ring)
  // Producer warpgroups. With two (R = 192), warpgroup k decodes chunk k of every pair, so a
  // stage's decode takes one chunk's time: the producer is latency-bound at one warp per
  // scheduler and sets the kernel's pace. 512 threads leave 128 registers a thread, too few for
  // the 128 accumulators of 256 rows (setmaxnreg does not raise ptxas's limit), hence 192 rows.
  static constexpr int kProducers = R == 192 ? 2 : 1;
  static constexpr int kThreads = (kProducers + 2) * kTcThreads;
  static constexpr int Q = 4;  // chunks per producer iteration (two stages)
  static constexpr std::size_t kABytes = static_cast<std::size_t>(tc::kTileCols) * 128;
  static constexpr std::size_t kXBytes = static_cast<std::size_t>(R) * 128;
  static constexpr std::size_t kStageBytes = kABytes + kXBytes;  // a multiple of 1024
  static constexpr std::size_t kRingBytes = kRingWords * 4;
  static constexpr std::size_t kRingOffset = kStages * kStageBytes;
  static constexpr std::size_t kDescOffset = kRingOffset + kRingBytes;  // int4 [2][Q]
  static constexpr std::size_t kBarOffset = kDescOffset + 2 * Q * sizeof(int4);  // u64 full[S], empty[S]
  static constexpr std::size_t kSmemBytes = kBarOffset + 2 * kStages * sizeof(std::uint64_t);
  static constexpr int kAcc = R / 2;
  static_assert(kStageBytes % 1024 == 0, "swizzle atoms are 1024-byte aligned");
};

template <int R, class T>
__device__ __forceinline__ void ws_mma(float (&d)[R / 2], std::uint64_t adesc, std::uint64_t bdesc) {
  if constexpr (R == 256) {
    if constexpr (kIsBf16<T>) wgmma::wgmma_ss_m64n256k16_bf16(d, adesc, bdesc);
    else wgmma::wgmma_ss_m64n256k16_f16(d, adesc, bdesc);
  } else if constexpr (R == 192) {
    if constexpr (kIsBf16<T>) wgmma::wgmma_ss_m64n192k16_bf16(d, adesc, bdesc);
    else wgmma::wgmma_ss_m64n192k16_f16(d, adesc, bdesc);
  } else {
    static_assert(R == 128, "R = 128, 192 or 256");
    if constexpr (kIsBf16<T>) wgmma::wgmma_ss_m64n128k16_bf16(d, adesc, bdesc);
    else wgmma::wgmma_ss_m64n128k16_f16(d, adesc, bdesc);
  }
}

/// Producer: chunk q (0 or 1) of a stage decoded into its A tile at shared address `a_s`: warp w's
/// 32 columns, rows 32 q .. 32 q + 31 of the stage's 64.
template <int B, class T>
__device__ __forceinline__ void ws_decode_chunk(const std::uint32_t* ring, int wo, const GroupConsts& gc, unsigned a_s,
                                                int q, int lane, int warp) {
  std::uint32_t w[8];
  ring_lane_words<B>(ring, wo, w);
  std::uint32_t b[4][2][2];
  decode_chunk<B, T>(w, gc, b);
  // stmatrix: matrix i of half h, k16 step s = (columns 16h + 8 (i & 1) .., K rows 16 s + 8 (i >> 1)
  // ..) of the warp's block: the A fragment a0..a3 = b[2h][s][0], b[2h+1][s][0], b[2h][s][1],
  // b[2h+1][s][1]. Lane l gives row l % 8 of matrix l / 8.
  const int mi = lane >> 3;
  const unsigned n = static_cast<unsigned>(warp * 32 + (lane & 7) + 8 * (mi & 1));
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const unsigned nn = n + 16u * h;
      const unsigned piece = static_cast<unsigned>(4 * q + 2 * s + (mi >> 1));
      stmatrix_x4(a_s + nn * 128u + ((piece ^ (nn & 7u)) << 4), b[2 * h][s][0], b[2 * h + 1][s][0], b[2 * h][s][1],
                  b[2 * h + 1][s][1]);
    }
}

template <int R, class T>
__global__ void __launch_bounds__(WsShape<R>::kThreads, 1)
    tc_wgmma_ws_kernel(std::int64_t M, const std::uint32_t* __restrict__ stream, std::int64_t tile_words,
                       const int4* __restrict__ tc_chunks, int num_chunks, const __half* __restrict__ bias,
                       T* __restrict__ out, std::int64_t N, int ahead, const __grid_constant__ CUtensorMap xmap) {
  using S = WsShape<R>;
  constexpr int kStages = S::kStages, Q = S::Q;
  extern __shared__ __align__(1024) unsigned char smem[];
  const unsigned smem_s = smem_u32(smem);
  if ((smem_s & 1023u) != 0) __trap();  // swizzle atoms must be 1024-byte aligned
  std::uint32_t* ring = reinterpret_cast<std::uint32_t*>(smem + S::kRingOffset);
  int4* dring = reinterpret_cast<int4*>(smem + S::kDescOffset);
  const unsigned full_s = smem_s + static_cast<unsigned>(S::kBarOffset);
  const unsigned empty_s = full_s + kStages * 8u;

  const int tid = static_cast<int>(threadIdx.x);
  // The warpgroup, through a shuffle so that ptxas sees it is warp-uniform (else it serialises the
  // consumers' wgmma: C7520, "WG.AR in divergent path").
  const int grp = __shfl_sync(0xffffffffu, tid / kTcThreads, 0);
  const int lane = tid & 31;
  const int warp = (tid % kTcThreads) >> 5;
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.x) * R;
  const std::int64_t tile = blockIdx.y;
  const int pairs = (num_chunks + 1) / 2;

  constexpr int kP = S::kProducers, kPThreads = kP * kTcThreads;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_s + 8u * s, kPThreads);
      mbar_init(empty_s + 8u * s, 2 * kTcThreads);
    }
  }
  __syncthreads();

  if (grp < kP) {
    // ---- producer warpgroup pg: chunk pg of every pair (kP = 2) or both chunks (kP = 1) ----
    const int pg = grp;
    const int g = lane >> 2;
    const std::uint32_t* __restrict__ tsrc = stream + tile * tile_words;
    const ChunkRange cr = chunk_range(tc_chunks, 0, num_chunks);
    const std::int64_t s0 = cr.s0;
    RingFill fill(tsrc, s0, cr.s1, tid, ring);
    // A stage's activations: one tensor-memory-accelerator copy of the box (64 columns, R rows)
    // at column 64 p, row m0 of the gathered activations, which writes it in the 128-byte
    // swizzle layout and completes its bytes on full[stage] (rows past M and columns past the
    // last chunk arrive as zeros). 16-byte cp.asyncs by the producer's 128 threads measured 1.5x
    // slower at m = 2048 (H100, 8192 x 28672 GPTQ-4: 3239 against 2211 us; without the decode and
    // the wgmma, 2214 against 1176 us: the copies themselves).
    auto issue_x = [&](int p) {
      if (tid == 0) {
        const int st = p % kStages;
        tma_load_2d(smem_s + static_cast<unsigned>(st * S::kStageBytes + S::kABytes), &xmap, 64 * p,
                    static_cast<int>(m0), full_s + 8u * st, static_cast<unsigned>(S::kXBytes));
      }
    };
#pragma unroll 1
    for (int p = 0; p < kStages - 1 && p < pairs; ++p) issue_x(p);
    // The ring runs `ahead` steps ahead of the iteration's codes (tc::ring_lookahead: as far as
    // the layer's widths allow; the producer is the ring's only reader).
    // Warpgroup 0 alone fills the ring; the producers' barriers make its data visible to both.
    if (pg == 0) {
#pragma unroll 1
      for (int p = 0; p < ahead; ++p) fill.issue_step();
    }
    GroupConsts gc;
    int header = first_group_header<T>(tsrc, cr, g, warp, gc);
    auto load_desc = [&](int c0) { return prefetch_chunk_desc<Q>(tc_chunks, c0, num_chunks, tid < 32, lane); };
    if (tid < Q) dring[tid] = load_desc(0);
    int4 dnext = load_desc(Q);
    named_barrier_sync(1, kPThreads);

#pragma unroll 1
    for (int it = 0, c0 = 0; c0 < num_chunks; ++it, c0 += Q) {
      const int nq = num_chunks - c0 < Q ? num_chunks - c0 : Q;
      const int4* __restrict__ dcur = dring + (it & 1) * Q;
      // (the barrier ending the previous iteration: every producer warp is done with its ring data)
      if (pg == 0) fill.issue_through(dcur[nq - 1], s0, ahead);
      if (tid < Q) dring[((it + 1) & 1) * Q + tid] = dnext;
      named_barrier_sync(1, kPThreads);  // everyone's ring copies and the next descriptors
      dnext = load_desc(c0 + 2 * Q);
      // Pair p's A tile is complete: publish it; then, once the consumers have released pair
      // p - 1 (they run its wgmma while pair p was decoded), the activations of pair
      // p + kStages - 1 into its stage. That release also frees the stage of pair p + 1
      // (consumers release in order).
      auto finish_pair = [&](int p) {
        fence_proxy_async();  // the A tile's stmatrix writes, for the consumers' wgmma
        mbar_arrive(full_s + 8u * (p % kStages));
        if (pg != 0) return;  // (warpgroup 0 copies the activations)
        if (p + kStages - 1 < pairs) {
          const int q = p + kStages - 1;
          if (q >= kStages) mbar_wait(empty_s + 8u * (q % kStages), (q / kStages - 1) & 1);
          issue_x(q);
        } else if (p + 1 < pairs && p + 1 >= kStages) {
          mbar_wait(empty_s + 8u * ((p + 1) % kStages), ((p + 1) / kStages - 1) & 1);
        }
      };
      const int z0 = dcur[0].z;
      if (nq == Q && ((z0 >> tc::uniform_flag_bit(Q)) & 1)) {
        // Every full iteration of a fixed-width layer: one width for all Q chunks, unrolled, so
        // that ptxas can overlap one chunk's ring loads and decode with the previous chunk's
        // (the producer runs one warp per scheduler, so other warps do not hide its latencies:
        // Nsight Compute, H100, 8192 x 28672 GPTQ-4 m = 512 before this path, 41% of the
        // producer's samples waited on fixed-latency dependencies and 19% issued).
        with_code_width(z0 & 0xff, [&](auto b) {
          constexpr int B = decltype(b)::value;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int p = it * 2 + h;
            const unsigned a_s = smem_s + static_cast<unsigned>((p % kStages) * S::kStageBytes);
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              if (kP == 2 && q != pg) continue;
              const int4 d = dcur[2 * h + q];
              load_group_header<T>(ring, d, B, s0, header, gc, lane, warp);
              ws_decode_chunk<B, T>(ring, chunk_lane_word(d, B, s0, lane, warp), gc, a_s, q, lane, warp);
            }
            finish_pair(p);
          }
        });
      } else {
#pragma unroll 1
        for (int h = 0; h < 2 && 2 * h < nq; ++h) {
          const int p = it * 2 + h;  // the pair (stage) index
          const unsigned a_s = smem_s + static_cast<unsigned>((p % kStages) * S::kStageBytes);
          const int nc = nq - 2 * h < 2 ? nq - 2 * h : 2;
#pragma unroll 1
          for (int q = 0; q < nc; ++q) {
            if (kP == 2 && q != pg) continue;
            const int4 d = dcur[2 * h + q];
            const int bits = d.z & 0xff;
            load_group_header<T>(ring, d, bits, s0, header, gc, lane, warp);
            const int wo = chunk_lane_word(d, bits, s0, lane, warp);
            with_code_width(bits, [&](auto b) { ws_decode_chunk<decltype(b)::value, T>(ring, wo, gc, a_s, q, lane, warp); });
          }
          finish_pair(p);
        }
      }
      named_barrier_sync(1, kPThreads);  // every producer warp is done with this iteration's ring data
    }
    if (pg == 0) cp_async_wait<0>();
    return;
  }

  // ---- consumers: warpgroups kP and kP + 1, columns 64 (grp - kP) .. of the tile ----
  const int cg = grp - kP;
  float acc[S::kAcc];
#pragma unroll
  for (int e = 0; e < S::kAcc; ++e) acc[e] = 0.0f;
#pragma unroll 1
  for (int p = 0; p < pairs; ++p) {
    const int st = p % kStages;
    mbar_wait(full_s + 8u * st, (p / kStages) & 1);
    const unsigned a_s = smem_s + static_cast<unsigned>(st * S::kStageBytes) + static_cast<unsigned>(cg) * 64u * 128u;
    const unsigned x_s = smem_s + static_cast<unsigned>(st * S::kStageBytes + S::kABytes);
    const std::uint64_t ad = smem_desc_sw128(a_s), xd = smem_desc_sw128(x_s);
    wgmma_fence();
    if (2 * p + 1 < num_chunks) {
#pragma unroll
      for (int k = 0; k < 4; ++k) ws_mma<R, T>(acc, ad + 2 * k, xd + 2 * k);  // + 32 bytes per k16 step
    } else {
#pragma unroll
      for (int k = 0; k < 2; ++k) ws_mma<R, T>(acc, ad + 2 * k, xd + 2 * k);
    }
    wgmma_commit();
    // Release the stage once its wgmma have completed (the other consumer keeps the tensor
    // cores busy meanwhile). Releasing it only after the next pair's wgmma were issued keeps a
    // group in flight, but the producer, which waits for that release after publishing the next
    // pair, then waits longer: H100, 8192 x 28672 GPTQ-4 m = 256 / 512 / 2048, 1.33 / 1.59 /
    // 1.65x dense against 1.21 / 1.42 / 1.26x this way (two machines; dense timed in each run).
    wgmma_wait_all();
    mbar_arrive(empty_s + 8u * st);
  }

  // acc[4 j + e]: tile column 64 cg + 16 warp + g + 8 (e >> 1), activation row 8 j + 2 t + (e & 1).
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < S::kAcc; ++i) {
    const std::int64_t row = m0 + 8 * (i / 4) + 2 * t + (i & 1);
    const std::int64_t n = tile * tc::kTileCols + 64 * cg + 16 * warp + g + 8 * ((i % 4) >> 1);
    if (row < M && n < N) store_output(out, row, N, n, acc[i], bias);
  }
}

template <int R, class T>
void launch_rows(const DeviceLayer& L, const __half* xp, std::int64_t m, std::int64_t ldxp, T* out,
                 cudaStream_t stream) {
  const std::int64_t mtiles = (m + R - 1) / R;
  if (L.tc_tiles > 65535) throw Unsupported("gemm: N is too large for the wgmma kernel");
  if (mtiles > 0x7fffffffLL) throw Unsupported("gemm: m = " + std::to_string(m) + " is too large");
  launch_clustered_smem(tc_wgmma_ws_kernel<R, T>, dim3(static_cast<unsigned>(mtiles), static_cast<unsigned>(L.tc_tiles)),
                        dim3(WsShape<R>::kThreads), WsShape<R>::kSmemBytes, 1, 1, false, stream, "tc_wgmma_ws_kernel launch",
                        m, static_cast<const std::uint32_t*>(L.tc_qweight.get()), L.tc_tile_words,
                        static_cast<const int4*>(L.tc_chunks.get()), L.num_chunks,
                        static_cast<const __half*>(L.bias.get()), out, L.N, L.tc_ring_ahead,
                        make_activation_map(xp, m, ldxp, R));
}

/// f(std::integral_constant<int, R>{}) for the kernel's shape of R = `rows` activation rows.
template <class F>
decltype(auto) with_rows(int rows, F&& f) {
  switch (rows) {
    case 128: return f(std::integral_constant<int, 128>{});
    case 192: return f(std::integral_constant<int, 192>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: internal_error("tc_wgmma_ws: no shape of " + std::to_string(rows) + " rows");
  }
}

template <class T>
void launch_shape(const DeviceLayer& L, const __half* xp, std::int64_t m, std::int64_t ldxp, int rows, T* out,
                  cudaStream_t stream) {
  with_rows(rows, [&](auto r) { launch_rows<decltype(r)::value>(L, xp, m, ldxp, out, stream); });
}

}  // namespace

int tc_wgmma_ws_blocks_per_sm(int rows) {
  if (!tma_available()) return 0;
  return with_rows(rows, [](auto r) {
    constexpr int R = decltype(r)::value;
    return blocks_per_sm_with_smem({reinterpret_cast<const void*>(tc_wgmma_ws_kernel<R, __half>),
                                    reinterpret_cast<const void*>(tc_wgmma_ws_kernel<R, __nv_bfloat16>)},
                                   WsShape<R>::kThreads, WsShape<R>::kSmemBytes);
  });
}

void launch_tc_wgmma_ws(const DeviceLayer& L, const __half* xp, std::int64_t m, std::int64_t ldxp, int rows,
                        __half* out, cudaStream_t stream) {
  launch_shape(L, xp, m, ldxp, rows, out, stream);
}

void launch_tc_wgmma_ws(const DeviceLayer& L, const __half* xp, std::int64_t m, std::int64_t ldxp, int rows,
                        __nv_bfloat16* out, cudaStream_t stream) {
  launch_shape(L, xp, m, ldxp, rows, out, stream);
}

}  // namespace exl2::detail::cuda
