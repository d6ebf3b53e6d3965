// Hopper tensor-core kernel for larger m, on the tc stream layout (tc_layout.hpp): wgmma with the
// decoded weights as the register operand of a transposed product.
//
// The product is computed as out^T = W^T x^T: per 4-warp group (warpgroup) a tile of 128 output
// columns (warp w: columns 32w .. 32w+31, as in the mma.sync tc kernel) by R = 64 or 128
// activation rows; a block is WG = 1 or 2 such groups on adjacent column tiles (WgShape). The
// weights are wgmma's A operand (64 x 16 per instruction, from registers):
// the B fragments decode_chunk gives for two n8 tiles of the mma.sync kernel are exactly one
// A fragment of 16 columns (a0 = tile 2h b0, a1 = tile 2h+1 b0, a2 = tile 2h b1, a3 = tile 2h+1
// b1), so warp w's half h (columns 32w + 16h ..) is row block w of instruction h's A. The
// activations are the B operand (R x 16, K-major, from shared memory). Per chunk of 32 rows a
// warpgroup issues 2 (halves) x 2 (k16 steps) wgmma.m64nRk16 with fp32 accumulators (acc[h]).
//
// Memory: each group's weight stream goes through its own cp.async ring, as in the mma.sync
// kernel (RingFill, tc_device.cuh), but `ahead` = the layer's tc_ring_ahead steps ahead (the
// most its 4-chunk windows allow, tc::ring_lookahead: 5 for 4-bit codes in groups of 128
// against the mma.sync kernel's fixed 2, which its 6 blocks per multiprocessor can afford and
// this kernel's 1 to 3 cannot; on large layers of 8-bit codes the 64-row tiles take a ring of
// twice the size, 8 steps further ahead: kDeepRingWords); the activation tile of each iteration
// (R rows x 32 Q columns of the gathered copy), shared by the block's groups, is copied by the tensor memory
// accelerator (two TMA boxes of 64 columns, issued by one thread, completing on the buffer's
// mbarrier) into one of two buffers in the K-major 128-byte-swizzle layout, one iteration ahead.
// Blocks of one column tile are consecutive (blockIdx.x = row tile), so the m / R blocks that
// read the same weight stream run together and it comes from DRAM about once.
//
// Order: every output element is summed in a fixed order (chunks in order, k inside a chunk in
// the instruction's order, then cluster ranks 0..S-1 when the chunk range is split): deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/cuda_backend.hpp"
#include "core/env_knob.hpp"
#include "cuda/cuda_check.cuh"
#include "cuda/device_layer.cuh"
#include "cuda/gemv.cuh"
#include "cuda/stream_k_rule.hpp"
#include "cuda/tc_device.cuh"
#include "cuda/tc_layout.hpp"
#include "cuda/tc_wgmma.cuh"
#include "cuda/tc_wgmma_ws.cuh"
#include "cuda/tma_map.cuh"
#include "cuda/wgmma_device.cuh"
#include "cuda/wgmma_ops.cuh"

namespace exl2::detail::cuda {

namespace {

// 1 in the device code compiled for sm_90a (read by query_tc_wgmma with cudaMemcpyFromSymbol),
// 0 in every other compilation pass.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ const int tc_wgmma_compiled = 1;
#else
__device__ const int tc_wgmma_compiled = 0;
#endif

/// Marks the A registers as used here: placed after the wait for the wgmma that read them, it
/// keeps them allocated until then, so that ptxas gives the next chunk's A fragments other
/// registers instead of waiting for the group before decoding into the same ones.
__device__ __forceinline__ void keep_until_here(std::uint32_t (&a)[2][2][4]) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int s = 0; s < 2; ++s)
      asm volatile("" : "+r"(a[h][s][0]), "+r"(a[h][s][1]), "+r"(a[h][s][2]), "+r"(a[h][s][3]));
}

/// R: activation rows per block (the wgmma N); WG: 4-warp groups per block, each with its own
/// 128-column tile and weight ring, all sharing one activation tile (WG times fewer activation
/// reads from L2 per output).
template <int R, int WG, int kRW = kRingWords>
struct WgShape {
  static constexpr int Q = 4;                   // chunks per iteration
  static constexpr int kThreads = kTcThreads * WG;
  static constexpr int kXHalves = R * 32 * Q;   // one activation buffer
  static constexpr int kAcc = R / 2;            // fp32 accumulators per thread and wgmma
  static constexpr std::size_t kRingBytes = static_cast<std::size_t>(kRW) * 4;
  static constexpr std::size_t kXBytes = static_cast<std::size_t>(kXHalves) * 2;
  // Two activation buffers: the next iteration's is filled while the current one's wgmma run.
  static constexpr int kXBuffers = 2;
  // + the descriptors [2][Q], one int4 (the stream-K last-block flag) and one for the two
  // activation buffers' mbarriers.
  static constexpr std::size_t kSmemBytes = WG * kRingBytes + kXBuffers * kXBytes + (2 * Q + 2) * sizeof(int4);
  // Split-K (WG = 1 only): the cluster reduction reuses the ring and the activation buffers for
  // an R x 128 fp32 tile.
  static constexpr bool kCanSplit = WG == 1;
  static_assert(!kCanSplit || static_cast<std::size_t>(R) * tc::kTileCols * 4 <= kRingBytes + kXBuffers * kXBytes,
                "reduction tile");
  static_assert(32 * Q % 64 == 0, "an iteration's activations are whole 64-column TMA boxes");
  static_assert(Q % 2 == 0, "wg_iter pairs the chunks");
  // Registers: R = 128 needs about 230 a thread (two blocks of one group, or one of two, per SM).
  static constexpr int kMinBlocks = R == 128 ? 2 / WG : (WG == 1 ? 3 : 1);
};

/// Byte offset, in an activation buffer, of k16 step s of chunk q (columns 32 q + 16 s ..): the
/// buffer is 64-column atoms of R rows x 128 bytes (128-byte swizzle), and a k16 step advances 32
/// bytes inside one (the hardware applies the XOR pattern to the advanced start address).
template <int R>
__host__ __device__ constexpr unsigned kstep_offset(int q, int s) {
  return static_cast<unsigned>(((32 * q + 16 * s) / 64) * R * 128 + ((32 * q + 16 * s) % 64) * 2);
}

template <int R, class T>
__device__ __forceinline__ void wg_mma(float (&d)[R / 2], const std::uint32_t (&a)[4], std::uint64_t desc) {
  if constexpr (R == 128) {
    if constexpr (kIsBf16<T>) wgmma::wgmma_m64n128k16_bf16(d, a, desc);
    else wgmma::wgmma_m64n128k16_f16(d, a, desc);
  } else {
    static_assert(R == 64, "R = 64 or 128");
    if constexpr (kIsBf16<T>) wgmma::wgmma_m64n64k16_bf16(d, a, desc);
    else wgmma::wgmma_m64n64k16_f16(d, a, desc);
  }
}

/// Chunk q of an iteration: decode, then 4 wgmma (halves h = 0, 1 x k16 steps s = 0, 1) reading
/// the activation buffer whose descriptor (k16 step 0 of chunk 0) is xdesc; committed as one group.
/// The caller leaves the A registers `a` untouched until it has waited for the group.
template <int R, int B, class T>
__device__ __forceinline__ void wg_chunk_words(const std::uint32_t (&w)[8], const GroupConsts& gc, int q,
                                               std::uint64_t xdesc, float (&acc)[2][R / 2],
                                               std::uint32_t (&a)[2][2][4]) {
  std::uint32_t b[4][2][2];
  decode_chunk<B, T>(w, gc, b);
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      a[h][s][0] = b[2 * h][s][0];
      a[h][s][1] = b[2 * h + 1][s][0];
      a[h][s][2] = b[2 * h][s][1];
      a[h][s][3] = b[2 * h + 1][s][1];
    }
  std::uint64_t desc[2];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    desc[s] = xdesc + static_cast<std::uint64_t>(kstep_offset<R>(q, s) >> 4);
    asm volatile("" : "+l"(desc[s]));  // computed before the fence, not between the wgmma
  }
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int h = 0; h < 2; ++h) wg_mma<R, T>(acc[h], a[h][s], desc[s]);
  wgmma_commit();
}

template <int R, int B, class T, int kRW>
__device__ __forceinline__ void wg_chunk(const std::uint32_t* ring, int wo, const GroupConsts& gc, int q,
                                         std::uint64_t xdesc, float (&acc)[2][R / 2], std::uint32_t (&a)[2][2][4]) {
  std::uint32_t w[8];
  ring_lane_words<B, kRW>(ring, wo, w);
  wg_chunk_words<R, B, T>(w, gc, q, xdesc, acc, a);
}

/// One chunk on its own (iterations of mixed widths or a partial last one): no wgmma stays in
/// flight past the width switch, which lets ptxas keep the wgmma asynchronous elsewhere.
template <int R, int B, class T, int kRW>
__device__ __forceinline__ void wg_chunk_sync(const std::uint32_t* ring, int wo, const GroupConsts& gc, int q,
                                              std::uint64_t xdesc, float (&acc)[2][R / 2]) {
  std::uint32_t a[2][2][4];
  wg_chunk<R, B, T, kRW>(ring, wo, gc, q, xdesc, acc, a);
  wgmma_wait_all();
}

/// One full iteration (Q chunks of width B, Q even): each chunk decodes while the previous
/// chunk's wgmma run, in the other of two register sets (keep_until_here makes ptxas give them
/// distinct registers). The last chunk's group stays in flight past the iteration's end: the
/// kernel waits for it only before the next activation copy overwrites the buffer it reads
/// (tc_wgmma_kernel, B), so the ring refill and the barrier no longer wait behind it. It was the
/// kernel's hottest wait (Nsight Compute, 8192 x 28672 m = 64); deferring it measured 5-6% faster
/// at m = 128 (H100, same call, two rounds: 8192 x 28672 GPTQ-4 147.3 / 149.3 -> 139.7 / 139.9 us,
/// 4096 x 14336 56.3 / 56.5 -> 52.9 / 53.3) and level at m = 33 / 64 (ab/s18_c1.sh). (An earlier
/// attempt that kept a group in flight made ptxas serialise every wgmma of the kernel; this one
/// does not: no C7510 / C7520 warning, `WARPGROUP.DEPBAR.LE gsb0, 0x1` in the SASS.) Each chunk's ring
/// words are loaded one chunk ahead, before the previous chunk's decode (the iteration's ring
/// steps have all landed at its barrier, and no refill overwrites them before the next one).
/// Loaded in place, after the wait for the wgmma of two chunks back (the wait asm's memory
/// clobber keeps loads below it), every chunk began with its shared loads and their address
/// arithmetic between that wait and its decode (H100, GPTQ-4 4096 x 14336, m = 33 / 64:
/// 35.8-37.6 -> 34.6-34.7 / 37.3-37.9 -> 36.3 us; 8192 x 28672 level; ab/s16_c1.sh).
/// kOneGroup: the Q chunks lie in one group (tc::one_group_flag): one header check, and the lane
/// words of every chunk from the first chunk's (one_group_lane_word).
template <int R, int Q, int B, class T, int kRW, bool kOneGroup>
__device__ __forceinline__ void wg_iter(const std::uint32_t* ring, const int4* dcur, std::int64_t s0, int& header,
                                        GroupConsts& gc, std::uint64_t xdesc, float (&acc)[2][R / 2], int lane,
                                        int warp) {
  std::uint32_t a0[2][2][4], a1[2][2][4];
  std::uint32_t w[2][8];
  const int wo0 = chunk_lane_word<kRW>(dcur[0], B, s0, lane, warp);
  if constexpr (kOneGroup) load_group_header<T, kRW>(ring, dcur[0], B, s0, header, gc, lane, warp);
  ring_lane_words<B, kRW>(ring, wo0, w[0]);
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    if constexpr (!kOneGroup) load_group_header<T, kRW>(ring, dcur[q], B, s0, header, gc, lane, warp);
    if (q + 1 < Q)
      ring_lane_words<B, kRW>(ring,
                              kOneGroup ? one_group_lane_word<B, kRW>(wo0, q + 1)
                                        : chunk_lane_word<kRW>(dcur[q + 1], B, s0, lane, warp),
                              w[(q + 1) & 1]);
    if (q >= 2) {
      wgmma_wait_one();  // chunk q - 2 has completed: its register set is free
      keep_until_here((q & 1) ? a1 : a0);
    }
    wg_chunk_words<R, B, T>(w[q & 1], gc, q, xdesc, acc, (q & 1) ? a1 : a0);
  }
  wgmma_wait_one();
  keep_until_here(a0);
}

template <int R, int WG, class T, bool kStreamK = false, int kRW = kRingWords>
__global__ void __launch_bounds__(WgShape<R, WG, kRW>::kThreads, WgShape<R, WG, kRW>::kMinBlocks)
    tc_wgmma_kernel(std::int64_t M, const std::uint32_t* __restrict__ stream, std::int64_t tile_words,
                    std::int64_t tiles, const int4* __restrict__ tc_chunks, int num_chunks,
                    const __half* __restrict__ bias, T* __restrict__ out, std::int64_t N, int split, int ahead,
                    float* __restrict__ sk_partials, int* __restrict__ sk_counters,
                    const __grid_constant__ CUtensorMap xmap, int x_rows) {
  using S = WgShape<R, WG, kRW>;
  constexpr int Q = S::Q;
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = static_cast<int>(threadIdx.x);
  const int grp = tid / kTcThreads;      // the thread's 4-warp group
  const int gtid = tid % kTcThreads;     // its index in the group
  const int lane = tid & 31;
  const int warp = gtid >> 5;            // warp in the group
  const int g = lane >> 2, t = lane & 3;
  const int rank = static_cast<int>(blockIdx.y);  // cluster rank (the cluster spans grid.y)
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.x) * R;
  std::uint32_t* ring = reinterpret_cast<std::uint32_t*>(smem + grp * S::kRingBytes);
  int4* dring = reinterpret_cast<int4*>(smem + WG * S::kRingBytes + S::kXBuffers * S::kXBytes);  // [2][Q]
  const unsigned smem_s = smem_u32(smem);
  const unsigned xs_s = smem_s + static_cast<unsigned>(WG * S::kRingBytes);  // activation buffer 0
  if ((xs_s & 1023u) != 0) __trap();  // swizzle atoms must be 1024-byte aligned
  // The activation buffers' mbarriers (one arrival: the thread that issues the TMA, with the
  // tile's bytes as its transaction count). The block's activation tiles are numbered across its
  // segments (xtile): tile i goes to buffer i & 1 and completes phase (i >> 1) & 1 of its mbarrier.
  const unsigned xbar_s = smem_u32(dring + 2 * Q + 1);
  if (tid == 0) {
    mbar_init(xbar_s, 1);
    mbar_init(xbar_s + 8u, 1);
  }
  __syncthreads();  // the mbarriers are initialised before any thread uses them
  int xtile = 0;      // the block's activation tile of the current iteration

  // acc[h][4 j + e]: column 32 warp + 16 h + g + 8 (e >> 1) of the tile, row 8 j + 2 t + (e & 1).
  float acc[2][S::kAcc];
  auto col_of = [&](int h, int e) { return warp * tc::kBlockCols + 16 * h + g + 8 * (e >> 1); };
  auto row_of = [&](int j, int e) { return 8 * j + 2 * t + (e & 1); };
  auto store_tile = [&](std::int64_t tile) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < S::kAcc; ++i) {
        const std::int64_t row = m0 + row_of(i / 4, i % 4);
        const std::int64_t n = tile * tc::kTileCols + col_of(h, i % 4);
        if (row < M && n < N) store_output(out, row, N, n, acc[h][i], bias);
      }
  };

  // The block's segments: chunks cb .. ce - 1 of the group's tile `tile` each. One (the tile's
  // chunks, or the cluster rank's share of them), except in stream-K (below).
  // (stream-K positions are ints: tc_wgmma_stream_k_blocks keeps tiles x num_chunks below 2^31)
  const int nc = num_chunks;
  const int sk_total = kStreamK ? static_cast<int>(tiles) * nc : 0, sk_P = gridDim.z, sk_p = blockIdx.z;
  const int pos0 = kStreamK ? stream_k::begin(sk_total, sk_P, sk_p) : 0;
  const int pos1 = kStreamK ? stream_k::begin(sk_total, sk_P, sk_p + 1) : 1;
#pragma unroll 1
  for (int pos = pos0; pos < pos1;) {
    std::int64_t tile;
    int cb, ce;
    bool has_tile = true;
    if constexpr (kStreamK) {
      const stream_k::Segment sg = stream_k::segment(pos, pos1, nc);
      tile = sg.tile;
      cb = sg.cb;
      ce = sg.ce;
    } else {
      // A group past the last tile (last block) repeats the last one and stores nothing.
      const std::int64_t tile_raw = static_cast<std::int64_t>(blockIdx.z) * WG + grp;
      has_tile = tile_raw < tiles;
      tile = has_tile ? tile_raw : tiles - 1;
      cb = static_cast<int>(nc * rank / split);
      ce = static_cast<int>(nc * (rank + 1) / split);
    }
    const std::uint32_t* __restrict__ tsrc = stream + tile * tile_words;
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < S::kAcc; ++e) acc[h][e] = 0.0f;

    if (cb < ce) {
      // The group's weight ring, as in tc_gemm_kernel (see there); every group covers the same
      // chunks (the tiles' streams share one unit layout), so one descriptor table serves all.
      const ChunkRange cr = chunk_range(tc_chunks, cb, ce);
      const std::int64_t s0 = cr.s0;
      RingFillT<kRW> fill(tsrc, s0, cr.s1, gtid, ring);

      // Activations: the tile of an iteration (R rows x 32 Q columns of the gathered copy) in the
      // K-major 128-byte-swizzle layout wgmma reads: 64-column atoms of R rows x 128 bytes, piece c
      // of row r at 16 (c ^ (r & 7)), as the TMA's 128-byte swizzle writes a box of 64 columns x R
      // rows (x_rows <= R rows: the map's box, below). Columns past the gathered copy, and rows
      // past M inside the box, arrive as zeros; with one row tile the box has only the M rows
      // (rounded up to 8), and the buffer's rows past it keep stale values: an output row depends
      // only on its own activation row, and rows past M are never stored. Thread 0 issues the
      // Q / 2 boxes of tile i into buffer i & 1 after the barrier that follows every warp's wait
      // for the wgmma that read that buffer (two tiles back). The unswizzled core-matrix layout
      // (8 rows x 16 bytes per 128 contiguous bytes) measured 25-30% slower at m = 128..2048
      // (H100): the tensor cores' reads of it conflict in the banks. The 16-byte cp.asyncs of
      // every thread that this replaced took 51 instructions per warp and iteration at m = 64,
      // plus the cp.async group accounting around them (Nsight Compute, 8192 x 28672).
      constexpr int kBoxes = 32 * Q / 64;
      auto issue_x = [&](int c0, int tile_no) {
        if (tid == 0) {
          const unsigned buf = static_cast<unsigned>(tile_no & 1);
          const unsigned bar = xbar_s + 8u * buf;
#pragma unroll
          for (int a = 0; a < kBoxes; ++a)
            tma_load_2d(xs_s + buf * static_cast<unsigned>(S::kXBytes) + static_cast<unsigned>(a * R * 128), &xmap,
                        32 * c0 + 64 * a, static_cast<int>(m0), bar, static_cast<unsigned>(x_rows * 128));
          mbar_arrive(bar);
        }
      };
      // Descriptor of buffer 0 (k16 step 0; buffer b is b kXBytes further): 128-byte swizzle mode
      // (bit 62), 8-row groups 1024 bytes apart (the leading offset is unused for this layout).
      const std::uint64_t xdesc0 = smem_desc_sw128(xs_s);

      issue_x(cb, xtile);
#pragma unroll 1
      for (int p = 0; p < ahead; ++p) fill.issue_step();

      GroupConsts gc;
      int header = first_group_header<T>(tsrc, cr, g, warp, gc);

      auto load_desc = [&](int c0) { return prefetch_chunk_desc<Q>(tc_chunks, c0, ce, tid < 32, lane); };
      if (tid < Q) dring[tid] = load_desc(cb);
      int4 dnext = load_desc(cb + Q);
      __syncthreads();  // dring[0]

#pragma unroll 1
      for (int it = 0, c0 = cb; c0 < ce; ++it, c0 += Q, ++xtile) {
        const int buf = xtile & 1;
        const int nq = ce - c0 < Q ? ce - c0 : Q;
        const int4* __restrict__ dcur = dring + (it & 1) * Q;
        // A. (the barrier ending the previous iteration) its wgmma have completed, except its last
        // chunk's group (wg_iter ends with wgmma_wait_one), which reads the activation buffer
        // buf ^ 1 and its own A registers, not the ring. So the ring refills first (until this
        // iteration's ring steps have landed: this thread's copies), then that group is waited
        // for; after barrier D every warp has, and the next iteration's activations go into
        // buf ^ 1.
        fill.issue_through(dcur[nq - 1], s0, ahead);
        wgmma_wait_all();
        if (tid < Q) dring[((it + 1) & 1) * Q + tid] = dnext;
        // D. Everyone's ring copies and the next descriptors are visible; buffer buf ^ 1 is free.
        __syncthreads();
        if (c0 + Q < ce) issue_x(c0 + Q, xtile + 1);
        // This iteration's activations (issued one iteration ahead, or before the loop).
        mbar_wait(xbar_s + 8u * static_cast<unsigned>(buf), static_cast<unsigned>(xtile >> 1) & 1u);
        dnext = load_desc(c0 + 2 * Q);
        const std::uint64_t xdesc = xdesc0 + static_cast<std::uint64_t>((buf * S::kXBytes) >> 4);
        const int z0 = dcur[0].z;
        const int bits0 = z0 & 0xff;
        if (nq == Q && ((z0 >> tc::one_group_flag_bit()) & 1)) {
          with_code_width(bits0, [&](auto b) {
            wg_iter<R, Q, decltype(b)::value, T, kRW, true>(ring, dcur, s0, header, gc, xdesc, acc, lane, warp);
          });
        } else if (nq == Q && ((z0 >> tc::uniform_flag_bit(Q)) & 1)) {
          with_code_width(bits0, [&](auto b) {
            wg_iter<R, Q, decltype(b)::value, T, kRW, false>(ring, dcur, s0, header, gc, xdesc, acc, lane, warp);
          });
        } else {
#pragma unroll 1
          for (int q = 0; q < nq; ++q) {
            const int4 d = dcur[q];
            const int bits = d.z & 0xff;
            load_group_header<T, kRW>(ring, d, bits, s0, header, gc, lane, warp);
            const int wo = chunk_lane_word<kRW>(d, bits, s0, lane, warp);
            with_code_width(bits, [&](auto b) {
              wg_chunk_sync<R, decltype(b)::value, T, kRW>(ring, wo, gc, q, xdesc, acc);
            });
          }
        }
        __syncthreads();  // A. for the next iteration
      }
      wgmma_wait_all();
      cp_async_wait<0>();
    }

    if constexpr (kStreamK) {
      // Stream-K (one row tile, WG = 1, no cluster; the partition, slots and counter rule:
      // stream_k_rule.hpp, tested on the host): the tiles' chunks in order, tile by tile, are one
      // range of sk_total = tiles x num_chunks positions, and block p of P = gridDim.z runs
      // [begin(p), begin(p + 1)), segment by segment (its parts in one tile). A segment that is a
      // whole tile is stored; else its partial tile goes to the block's slot (0: its first
      // segment, 1: its last) in sk_partials, and the block that completes the tile's count in
      // sk_counters (zeroed by the gather kernel) adds the tile's partials in block order, i.e. in
      // chunk order whichever block arrives last (deterministic), and stores the sum.
      static_assert(WG == 1, "stream-K: one group per block");
      constexpr int kPart = 2 * S::kAcc * S::kThreads;  // floats of a partial tile, [h, i][tid]
      static_assert(2 * kPart == tc_wgmma_stream_k_floats(1), "stream-K scratch: two partial tiles a block");
      int* last_flag = reinterpret_cast<int*>(dring + 2 * Q);
      if (cb == 0 && ce == nc) {
        store_tile(tile);
      } else {
        const int t = static_cast<int>(tile);
        // Written and read back (below) at the slot of one rule, stream_k::slot.
        float* mine =
            sk_partials + (static_cast<std::int64_t>(sk_p) * 2 + stream_k::slot(sk_total, sk_P, nc, sk_p, t)) * kPart + tid;
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int i = 0; i < S::kAcc; ++i) __stcg(mine + (h * S::kAcc + i) * S::kThreads, acc[h][i]);
        __threadfence();  // the partial before the count (and, for the last block, its reads after)
        __syncthreads();
        const int pa = stream_k::first_block(sk_total, sk_P, nc, t), pb = stream_k::last_block(sk_total, sk_P, nc, t);
        if (tid == 0) *last_flag = atomicAdd(sk_counters + tile, 1) == pb - pa;
        __syncthreads();
        if (*last_flag) {
          __threadfence();
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int i = 0; i < S::kAcc; ++i) acc[h][i] = 0.0f;
#pragma unroll 1
          for (int q = pa; q <= pb; ++q) {
            const float* part =
                sk_partials + (static_cast<std::int64_t>(q) * 2 + stream_k::slot(sk_total, sk_P, nc, q, t)) * kPart + tid;
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int i = 0; i < S::kAcc; ++i) acc[h][i] += __ldcg(part + (h * S::kAcc + i) * S::kThreads);
          }
          store_tile(tile);
        }
      }
      pos += ce - cb;
      __syncthreads();  // last_flag, and the shared memory of this segment, before the next one
    } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      if constexpr (S::kCanSplit) {
        if (split > 1) {
          float* red = reinterpret_cast<float*>(smem);
          __syncthreads();  // every warp is done with the ring and the activation buffers
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int i = 0; i < S::kAcc; ++i) red[row_of(i / 4, i % 4) * tc::kTileCols + col_of(h, i % 4)] = acc[h][i];
          cluster_reduce_store<R>(red, rank, split, tid, m0, M, tile, N, bias, out);
          return;
        }
      }
#endif
      if (has_tile) store_tile(tile);
      return;
    }
  }
}

template <int R, int WG, int kRW = kRingWords>
int blocks_per_sm() {
  return blocks_per_sm_with_smem({reinterpret_cast<const void*>(tc_wgmma_kernel<R, WG, __half, false, kRW>),
                                  reinterpret_cast<const void*>(tc_wgmma_kernel<R, WG, __nv_bfloat16, false, kRW>)},
                                 WgShape<R, WG, kRW>::kThreads, WgShape<R, WG, kRW>::kSmemBytes);
}

/// The deep ring of the 64-row tiles (DeviceLayer::tc_wgmma_deep): 64 KB, 16 steps of 4 KB, so
/// 8 steps more ahead than the usual ring allows (tc::ring_lookahead is the ring's steps minus
/// the widest 4-chunk window's). An iteration of four 8-bit chunks spans 5 of the usual ring's 8
/// steps, which leaves 3 (12 KB) in flight per block; too few to stream 8-bit codes at the
/// DRAM's rate with the 1 to 2 blocks a multiprocessor of 8192 x 28672 holds at m = 64 (Nsight
/// Compute, scripts/ncu_stalls.sh, GPTQ-8 against GPTQ-4 at m = 64: DRAM throughput 53% / 36% of
/// peak, long-scoreboard stalls 0.85 / 0.15 per issued instruction, 17% more instructions, 1.30x
/// the time). Two such blocks (96 KB of shared memory each) fit a multiprocessor.
constexpr int kDeepRingWords = 2 * kRingWords;
constexpr int kDeepExtraSteps = kDeepRingWords / (kStepUnits * tc::kUnitWords) - kRingSteps;

template <int R, int WG, class T, int kRW = kRingWords>
void launch_rows(const DeviceLayer& L, const __half* xp, std::int64_t m, std::int64_t ldxp, T* out, int per_sm,
                 const WgmmaStreamK& sk, cudaStream_t stream) {
  constexpr bool kDeep = kRW != kRingWords;
  const int ahead = L.tc_ring_ahead + (kDeep ? kDeepExtraSteps : 0);
  const std::int64_t mtiles = (m + R - 1) / R;
  const std::int64_t groups = (L.tc_tiles + WG - 1) / WG;
  if (groups > 65535) throw Unsupported("gemm: N is too large for the wgmma kernel");
  if (mtiles > 0x7fffffffLL) throw Unsupported("gemm: m = " + std::to_string(m) + " is too large");
  // Rows per activation box: R, or with one row tile only the m rows (rounded up to 8). Boxes of
  // R rows, about half of them past m (zero-filled), measured slower (H100, GPTQ-4, same call, two
  // rounds, ab/s19_c2.sh): 4096 x 14336 m = 33 39.5 / 39.5 us against 33.4 / 34.4 this way, m = 65
  // 59.7 / 62.3 against 47.2 / 47.3, 8192 x 28672 m = 65 147.4 / 147.7 against 120.5 / 123.9; at
  // m = 96 (a quarter past m) the full box was faster on 8192 x 28672 (120.4 / 122.6 against
  // 131.9 / 136.5) and within 3% elsewhere: not established why.
  const int x_rows = m < R ? static_cast<int>((m + 7) / 8 * 8) : R;
  const CUtensorMap xmap = make_activation_map(xp, m, ldxp, x_rows);
  if constexpr (R == 64 && WG == 1 && !kDeep) {
    if (sk.blocks > 0) {
      if (sk.partials == nullptr || sk.counters == nullptr) internal_error("launch_tc_wgmma: no stream-K scratch");
      launch_clustered_smem(tc_wgmma_kernel<R, WG, T, true>, dim3(1, 1, static_cast<unsigned>(sk.blocks)),
                            dim3(WgShape<R, WG>::kThreads), WgShape<R, WG>::kSmemBytes, 1, 1, false, stream,
                            "tc_wgmma_kernel launch", m, static_cast<const std::uint32_t*>(L.tc_qweight.get()),
                            L.tc_tile_words, L.tc_tiles, static_cast<const int4*>(L.tc_chunks.get()), L.num_chunks,
                            static_cast<const __half*>(L.bias.get()), out, L.N, 1, L.tc_ring_ahead, sk.partials,
                            sk.counters, xmap, x_rows);
      return;
    }
  }
  // The largest split of the tile's chunks, 1 to 8, whose blocks fit one wave (any split: 4096 x
  // 14336 at m = 64 runs 3, 336 of 396 blocks, 37.2-37.6 us against 38.4-38.7 at the power of two
  // 2; H100, GPTQ-4, EXL2_CUDA_WGMMA_SPLIT sweep, ab/s15_c3.sh); or EXL2_CUDA_WGMMA_SPLIT.
  const int split = !WgShape<R, WG, kRW>::kCanSplit ? 1
                    : L.tc_wgmma_split > 0     ? L.tc_wgmma_split
                                               : single_wave_split(L, groups * mtiles, 16, per_sm, 8, true);
  launch_clustered_smem(tc_wgmma_kernel<R, WG, T, false, kRW>,
                        dim3(static_cast<unsigned>(mtiles), static_cast<unsigned>(split),
                             static_cast<unsigned>(groups)),
                        dim3(WgShape<R, WG, kRW>::kThreads), WgShape<R, WG, kRW>::kSmemBytes, split, 1, false, stream,
                        "tc_wgmma_kernel launch", m, static_cast<const std::uint32_t*>(L.tc_qweight.get()),
                        L.tc_tile_words, L.tc_tiles, static_cast<const int4*>(L.tc_chunks.get()), L.num_chunks,
                        static_cast<const __half*>(L.bias.get()), out, L.N, split, ahead,
                        static_cast<float*>(nullptr), static_cast<int*>(nullptr), xmap, x_rows);
}

/// The kernel shapes (R rows, WG 4-warp groups), indexed as DeviceLayer::tc_wgmma_blocks_per_sm;
/// then the warp-specialised kernel's (tc_wgmma_ws.cu) with 128, 256 and 192 rows (192: two
/// producer warpgroups).
constexpr int kWgConfigs = 6;
constexpr int kWsConfig128 = 3, kWsConfig256 = 4, kWsConfig192 = 5;
#define EXL2_WG_CONFIGS_ABOVE_0(X) X(1, 128, 2) X(2, 128, 1)
#define EXL2_WG_CONFIGS(X) X(0, 64, 1) EXL2_WG_CONFIGS_ABOVE_0(X)

/// The shape for m rows: 64-row tiles up to m = 64; from m = 129 the warp-specialised kernel's
/// 256-row tiles where their blocks fill at least 4/5 of the multiprocessors (one tile per block,
/// no split-K); else 128-row tiles of two 128-column tiles per block (the activation tile shared
/// by 256 columns) where those fill the GPU, else of one (whose chunk range may be split over a
/// cluster); or the shape EXL2_CUDA_WGMMA_CFG forced at construction (query_tc_wgmma).
/// The warp-specialised kernel, H100, same session (GPTQ-4, m = 256 / 512): 8192 x 28672 291 /
/// 572 us against 379 (this kernel) / 606 (the Python API's dense route), 4096 x 14336 76 / 154
/// against 100 / 161; at m = 128 it lost on 8192 x 28672 (259 against 189 us; 1.7 waves of
/// blocks), at m = 2048 to the dense route (2116 against 1668 us).
/// Of its shapes, 192 rows (two producer warpgroups) where they pad m to fewer rows than 256 do
/// (m = 129..192, 257..384, ...): a 192-row tile costs about 0.86 of a 256-row one (H100,
/// 8192 x 28672 GPTQ-4, same call: m = 129 / 192 / 384 202-209 / 222 / 437-442 us against
/// 247 / 241-243 / 489-498; m = 512 / 2048 641-645 / 2222-2239 against 529-540 / 1921-1923).
int config_for(const DeviceLayer& L, std::int64_t m) {
  if (L.tc_wgmma_forced >= 0) return L.tc_wgmma_forced;
  if (m <= 64) return 0;
  if (m > 128 && L.tc_wgmma_blocks_per_sm[kWsConfig256] > 0 &&
      L.tc_tiles * ((m + 255) / 256) * 5 >= static_cast<std::int64_t>(L.sm_count) * 4) {
    const bool fewer_rows = (m + 191) / 192 * 192 < (m + 255) / 256 * 256;
    return fewer_rows && L.tc_wgmma_blocks_per_sm[kWsConfig192] > 0 ? kWsConfig192 : kWsConfig256;
  }
  return ((m + 127) / 128) * ((L.tc_tiles + 1) / 2) >= L.sm_count ? 1 : 2;
}

template <class T>
void launch_for(const DeviceLayer& L, const __half* xp, std::int64_t m, std::int64_t ldxp, T* out,
                const WgmmaStreamK& sk, cudaStream_t stream) {
  if (!L.tc_wgmma) internal_error("launch_tc_wgmma: the layer has no wgmma path");
  switch (config_for(L, m)) {
#define EXL2_WG_LAUNCH(I, R, WG) \
  case I: launch_rows<R, WG>(L, xp, m, ldxp, out, L.tc_wgmma_blocks_per_sm[I], sk, stream); break;
    case 0:
      if (L.tc_wgmma_deep && sk.blocks == 0)
        launch_rows<64, 1, T, kDeepRingWords>(L, xp, m, ldxp, out, L.tc_wgmma_deep_per_sm, sk, stream);
      else
        launch_rows<64, 1>(L, xp, m, ldxp, out, L.tc_wgmma_blocks_per_sm[0], sk, stream);
      break;
    EXL2_WG_CONFIGS_ABOVE_0(EXL2_WG_LAUNCH)
#undef EXL2_WG_LAUNCH
    case kWsConfig128: launch_tc_wgmma_ws(L, xp, m, ldxp, 128, out, stream); break;
    case kWsConfig256: launch_tc_wgmma_ws(L, xp, m, ldxp, 256, out, stream); break;
    case kWsConfig192: launch_tc_wgmma_ws(L, xp, m, ldxp, 192, out, stream); break;
    default: internal_error("launch_tc_wgmma: no such shape");
  }
}

}  // namespace

/// Whether a layer whose 4-chunk windows leave the usual ring at most 3 steps ahead (8-bit codes)
/// takes the deep ring for its 64-row tiles: where those tiles' launch keeps a split of at most 2
/// at the deep kernel's `per_sm` blocks per multiprocessor (single_wave_split's choice: tiles x 3
/// exceed one wave), so that each block streams a long K range. H100, GPTQ-8, m = 33 / 48 / 64,
/// same build, two rounds (ab/s21_c3.sh): 8192 x 28672 (224 tiles, no split) 107.5-111.9 /
/// 112.7-115.0 / 112.6-114.9 us against 122.6-124.2 / 123.9-126.4 / 126.0-127.8 with the usual
/// ring; 4096 x 14336 (112 tiles, split 2 against 3) 41.8-42.6 against 42.9-44.6; but 14336 x 4096
/// and 4096 x 4096 (32 tiles, split 8) 56-59 / 25 against 43-45 / 18.3-18.9: their 256 blocks in
/// clusters of 8 are 0.97 of a wave at two blocks per multiprocessor, and clusters that find no
/// room in a GPC wait for a second one (Nsight Compute, ab/s21_c7.sh: as many active cycles per
/// multiprocessor, 1.4x the time). The 4-bit and mixed layers, forced onto it, were level or up to
/// 9% slower (GPTQ-4 8192 x 28672 m = 64 96.9-97.4 against 91.3-92.5 us): they decode slower than
/// they stream.
static bool deep_ring_wanted(const DeviceLayer& L, int per_sm) {
  return per_sm > 0 && L.tc_tiles * 3 > static_cast<std::int64_t>(per_sm) * L.sm_count;
}

/// Stream-K blocks for the 64-row tiles (m <= 64): 0 (one tile per block, the default), or
/// EXL2_CUDA_WGMMA_SK = 1..3 blocks per multiprocessor sharing all the tiles' chunks evenly.
/// Stream-K was the default where a layer has more column tiles than multiprocessors and no split
/// of them fits one wave (8192 x 28672: 224 tiles on 132 multiprocessors, one tile per block runs
/// 2 blocks on 92 of them and 1 on the rest): it measured 2-6% faster there at m = 33 / 48 / 64
/// (ab/s15_c4.sh), then level (ab/s18_c11.sh). Since the activation tiles come by TMA, which cut
/// the per-iteration work but not stream-K's per-segment restarts and partial tiles, one tile per
/// block is faster or level on every row measured: H100, 8192 x 28672, same build, 4 rounds
/// alternating (ab/s19_c10.sh; first seen in ab/s19_c9.sh): GPTQ-4 m = 64 90.0-95.2 us against
/// 93.8-99.5, m = 48 level, EXL2 2.5-6.0 bpw at m = 64 1-3% faster.
int tc_wgmma_stream_k_blocks(const DeviceLayer& L, std::int64_t m) {
  if (!L.tc_wgmma || m > 64 || config_for(L, m) != 0 || L.tc_wgmma_split > 0 || L.tc_wgmma_sk <= 0) return 0;
  const int per_sm = L.tc_wgmma_sk;
  if (L.tc_wgmma_sk_per_sm < per_sm || L.tc_tiles * L.num_chunks > 0x7fffffffLL) return 0;
  // (at most one block per chunk position: every block's range is then non-empty)
  const std::int64_t blocks = static_cast<std::int64_t>(per_sm) * L.sm_count;
  const std::int64_t positions = L.tc_tiles * L.num_chunks;
  return static_cast<int>(blocks < positions ? blocks : positions);
}

void query_tc_wgmma(DeviceLayer& L) {
  L.tc_wgmma = false;
  if (L.cc_major != 9 || L.cc_minor != 0 || L.tc_qweight.get() == nullptr) return;
  int compiled = 0;
  EXL2_CUDA_CHECK(cudaMemcpyFromSymbol(&compiled, tc_wgmma_compiled, sizeof(int)));
  // The kernels copy their activation tiles by TMA (tma_map.cuh).
  if (compiled != 1 || !tma_available()) return;
#define EXL2_WG_QUERY(I, R, WG) L.tc_wgmma_blocks_per_sm[I] = blocks_per_sm<R, WG>();
  EXL2_WG_CONFIGS(EXL2_WG_QUERY)
#undef EXL2_WG_QUERY
  L.tc_wgmma_blocks_per_sm[kWsConfig128] = tc_wgmma_ws_blocks_per_sm(128);
  L.tc_wgmma_blocks_per_sm[kWsConfig256] = tc_wgmma_ws_blocks_per_sm(256);
  L.tc_wgmma_blocks_per_sm[kWsConfig192] = tc_wgmma_ws_blocks_per_sm(192);
  L.tc_wgmma = true;  // (the warp-specialised shapes are optional: config_for checks them)
  for (int i = 0; i < kWsConfig128; ++i) L.tc_wgmma = L.tc_wgmma && L.tc_wgmma_blocks_per_sm[i] > 0;
  // EXL2_CUDA_WGMMA_CFG=0..5: the shape for every m.
  L.tc_wgmma_forced = env::integer_in("EXL2_CUDA_WGMMA_CFG", 0, kWgConfigs - 1, -1);
  // EXL2_CUDA_WGMMA_SPLIT=1..8: the cluster split of every launch that can split.
  if (const int split = env::integer_in("EXL2_CUDA_WGMMA_SPLIT", 1, 8, -1); split > 0) L.tc_wgmma_split = split;
  if (L.tc_wgmma_forced >= 0 && L.tc_wgmma_blocks_per_sm[L.tc_wgmma_forced] == 0) L.tc_wgmma_forced = -1;
  // EXL2_CUDA_WGMMA_SK=1..3: stream-K blocks per multiprocessor for the 64-row tiles at every
  // m <= 64 (0 or unset: none, tc_wgmma_stream_k_blocks).
  // The stream-K instantiation's occupancy is queried only then (two queries per layer saved).
  L.tc_wgmma_sk = env::integer_in("EXL2_CUDA_WGMMA_SK", 0, 3, 0);
  L.tc_wgmma_sk_per_sm = 0;
  if (L.tc_wgmma_sk > 0)
    L.tc_wgmma_sk_per_sm = blocks_per_sm_with_smem(
        {reinterpret_cast<const void*>(tc_wgmma_kernel<64, 1, __half, true>),
         reinterpret_cast<const void*>(tc_wgmma_kernel<64, 1, __nv_bfloat16, true>)},
        WgShape<64, 1>::kThreads, WgShape<64, 1>::kSmemBytes);
  // The deep ring of the 64-row tiles (deep_ring_wanted), or EXL2_CUDA_WGMMA_DEEP=1 / 0: always /
  // never.
  // (its occupancy is queried only for a candidate layer)
  const int deep = env::integer_in("EXL2_CUDA_WGMMA_DEEP", 0, 1, -1);
  const bool candidate = deep == 1 || (deep < 0 && L.tc_ring_ahead <= 3);
  const int deep_per_sm = candidate ? blocks_per_sm<64, 1, kDeepRingWords>() : 0;
  L.tc_wgmma_deep = deep_per_sm > 0 && (deep == 1 || deep_ring_wanted(L, deep_per_sm));
  L.tc_wgmma_deep_per_sm = L.tc_wgmma_deep ? deep_per_sm : 0;
}

void launch_tc_wgmma(const DeviceLayer& L, const __half* xp, std::int64_t m, std::int64_t ldxp, __half* out,
                     const WgmmaStreamK& sk, cudaStream_t stream) {
  launch_for(L, xp, m, ldxp, out, sk, stream);
}

void launch_tc_wgmma(const DeviceLayer& L, const __half* xp, std::int64_t m, std::int64_t ldxp,
                     __nv_bfloat16* out, const WgmmaStreamK& sk, cudaStream_t stream) {
  launch_for(L, xp, m, ldxp, out, sk, stream);
}

}  // namespace exl2::detail::cuda
