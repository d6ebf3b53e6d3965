// Tensor-core kernel for small m (decode and small batches), on the tc stream layout
// (tc_layout.hpp).
//
// Layers are converted to the stream layout at construction (its only copy of the codes, scales
// and zeros) on compute capability 9.0+ by default, and on 8.0+ (cp.async, ldmatrix, mma.sync
// m16n8k16) with EXL2_CUDA_TC=1 (tc_layout_wanted; EXL2_CUDA_TC=0 keeps the canonical layout);
// gemm() then uses this kernel for every m that the wgmma kernel (tc_wgmma.cu, Hopper, m >= 33)
// does not take: row tiles of 8 (m <= 8, transposed: kT8), 16, 32 or 64 rows, more than one row
// tile above m = 64. See src/cuda/README.md for its status and measurements.
//
// Work split:
//   block   = 4 warps and one tile of 128 output columns (warp w: columns 32w .. 32w+31,
//             four mma n8 tiles) x one tile of 16*MT rows;
//   K       = the block's chunk range (all chunks, or 1/split of them with a cluster);
//   cluster = on compute capability 9.0+, up to 8 (16) blocks of a cluster split the chunk range
//             (split-K) and add their fp32 partial tiles in rank order through distributed
//             shared memory (no workspace, no atomics): up to 16 rows each block pushes its
//             partials into their owners' rings or receive buffers (push_reduce_store), the
//             32- and 64-row tiles are read by their owners (cluster_reduce_store).
//
// Memory pipeline: because the stream layout stores a tile's data for consecutive chunks
// contiguously, a block's whole K range is one contiguous byte range of the tile's stream.
// All 128 threads copy it into a shared-memory ring with cp.async, 4 KB per step (2 x 16 bytes a
// thread), kLookahead steps ahead of what the current iteration consumes, whatever the
// layer's bit widths. Scales and zeros arrive in the same stream (a header unit before each
// group's codes). The activations are first gathered by perm into a chunk-padded copy
// (tc_gather_x_kernel, through the layer's tc_xsrc, into a stream-ordered scratch), so the kernel
// reads them with contiguous 16-byte loads, one iteration ahead, with no dependent load chain.
// One iteration handles Q = 4 chunks (2 for MT = 4): two barriers, one activation tile, one
// descriptor set.
//
// Per chunk a warp reads its lane's b words from the ring, decodes 16 half2 B-fragment
// registers (magic 1024: (1024 + q) - (1024 + z) is the exact q - z, or (1024 + 2^b q) / 2^b -
// (1024 / 2^b + z) for the pairs kept 2^b times their code; one __hmul2 by the scale rounds like
// the reference: f16((q - z) * s); bfloat16: decode_pair_bf16), loads its A fragments with
// ldmatrix and issues 8 * MT mma.m16n8k16 with fp32 accumulation. For m <= 16 the mma runs
// transposed (the decoded weights as the A operand, 4 mma per chunk and 8-row group of x; kT8,
// kNB and kGather below) on the exact integers q - z, and each group's fp32 sums are scaled after
// the mma (group sums, below). Every output element is summed in a fixed order (chunks in order
// inside the fragments, then cluster ranks 0..S-1) and written once: deterministic and
// graph-capture safe.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

#include "core/cuda_backend.hpp"
#include "core/env_knob.hpp"
#include "cuda/cuda_check.cuh"
#include "cuda/device_layer.cuh"
#include "cuda/gemv.cuh"
#include "cuda/tc_gemm.cuh"
#include "cuda/tc_device.cuh"
#include "cuda/tc_layout.hpp"
#include "cuda/tc_wgmma.cuh"

namespace exl2::detail::cuda {

namespace {

constexpr int kPackThreads = 256;

// ---------------------------------------------------------------------------------
// Construction: canonical layout -> tc stream layout.
// ---------------------------------------------------------------------------------

/// Per chunk the tc descriptor, per group its header unit; `units` = stream length.
struct StreamTables {
  std::vector<int4> chunks;           // { row0, first code unit, bits | rows << 8 | flags, header unit }
  std::vector<std::int32_t> header;   // [G] header unit of each group
  std::int64_t units = 0;
  int ring_ahead = 0;                 // tc::ring_lookahead for iterations of 4 chunks
};

/// `one_group_flags`: set tc::one_group_flag in the descriptors (EXL2_CUDA_ONE_GROUP=0 at
/// construction leaves it out, to measure the per-chunk path against it).
StreamTables make_stream_tables(const std::vector<int4>& canonical, std::int64_t G, bool one_group_flags) {
  const int n = static_cast<int>(canonical.size());
  std::vector<int> group(canonical.size()), bits(canonical.size());
  for (int c = 0; c < n; ++c) {
    group[c] = canonical[c].w;
    bits[c] = canonical[c].z & 0xff;
    if (group[c] < 0 || group[c] >= G) internal_error("tc layout: chunk group out of range");
    // The kernel derives a group's decode constants for its width once, from the header
    // (unpack_header): every chunk of a group must have that width.
    if (c > 0 && group[c] == group[c - 1] && bits[c] != bits[c - 1])
      internal_error("tc layout: chunk widths differ within a group");
  }
  std::vector<std::int64_t> unit0(canonical.size()), header(canonical.size());
  StreamTables t;
  t.units = tc::place_units(n, group.data(), bits.data(), unit0.data(), header.data());
  if (t.units < 0) internal_error("tc layout: chunks are not in group order");
  if (t.units > 0x7fffffffLL / tc::kUnitWords) internal_error("tc layout: stream too long");
  t.ring_ahead = tc::ring_lookahead(n, unit0.data(), header.data(), bits.data(), 4, kRingSteps, kStepUnits);
  if (t.ring_ahead < kLookahead) internal_error("tc layout: an iteration's chunks do not fit the ring");
  t.chunks.resize(canonical.size());
  t.header.assign(static_cast<std::size_t>(G), -1);
  for (int c = 0; c < n; ++c) {
    const int flags =
        tc::uniform_flags(n, bits.data(), c) | (one_group_flags ? tc::one_group_flag(n, group.data(), c) : 0);
    t.chunks[c] = make_int4(canonical[c].x, static_cast<int>(unit0[c]), canonical[c].z | flags,
                            static_cast<int>(header[c]));
    t.header[static_cast<std::size_t>(group[c])] = static_cast<std::int32_t>(header[c]);
  }
  return t;
}

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
  // Columns past N have code 0 and scale 0 (header).
  tc::pack_lane<B>(
      g, t,
      [&](int r, int c) -> std::uint32_t { return r < ci.rows ? tc::stream_code<B>(colw[c / 8], r) : zero[c / 8]; },
      w);
  for (int i = 0; i < B; ++i) dst[i] = w[i];
}

/// Code units: thread = (chunk, tile, 32-column block, lane).
__global__ void tc_pack_codes_kernel(const std::uint32_t* __restrict__ qw, const std::uint8_t* __restrict__ zeros,
                                     std::int64_t N, std::int64_t tiles, std::int64_t tile_words,
                                     const int4* __restrict__ chunks, const int4* __restrict__ tc_chunks,
                                     int num_chunks, std::uint32_t* __restrict__ out) {
  const std::int64_t blocks = tiles * tc::kTileBlocks;
  const std::int64_t total = static_cast<std::int64_t>(num_chunks) * blocks * 32;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int lane = static_cast<int>(i & 31);
    const std::int64_t jb = (i >> 5) % blocks;  // global 32-column block
    const int c = static_cast<int>((i >> 5) / blocks);
    const ChunkInfo ci = load_chunk(chunks, c);
    const std::int64_t tile = jb / tc::kTileBlocks;
    const int w = static_cast<int>(jb % tc::kTileBlocks);
    const int unit0 = tc_chunks[c].y;
    std::uint32_t* dst = out + tile * tile_words + static_cast<std::int64_t>(unit0) * tc::kUnitWords +
                         w * 32 * ci.bits + lane * ci.bits;
    const std::int64_t n_base = jb * tc::kBlockCols;
    with_code_width(ci.bits, [&](auto b) { tc_pack_lane<decltype(b)::value>(qw, zeros, N, ci, n_base, lane, dst); });
  }
}

/// Header units: thread = (group, padded column).
__global__ void tc_pack_headers_kernel(const __half* __restrict__ scales, const std::uint8_t* __restrict__ zeros,
                                       std::int64_t N, std::int64_t G, std::int64_t tiles, std::int64_t tile_words,
                                       const std::int32_t* __restrict__ header, std::uint32_t* __restrict__ out) {
  const std::int64_t npad = tiles * tc::kTileCols;
  const std::int64_t total = G * npad;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const std::int64_t g = i / npad, n = i % npad;
    if (header[g] < 0) continue;  // a group without rows (possible with act-order) has no header
    const std::int64_t tile = n / tc::kTileCols;
    const int cc = static_cast<int>(n % tc::kTileCols);
    // Columns past N: scale 0 and zero 0, so their (zero) codes give exactly 0.
    const std::uint16_t s = n < N ? __half_as_ushort(scales[g * N + n]) : std::uint16_t{0};
    const std::uint32_t z = n < N ? zeros[g * N + n] : 0u;
    out[tile * tile_words + static_cast<std::int64_t>(header[g]) * tc::kUnitWords + tc::header_word(cc)] =
        tc::header_value(s, z);
  }
}

/// Decode one chunk's B fragments from the lane's words and accumulate.
template <int MT, int B, class T>
__device__ __forceinline__ void tc_chunk_words(const std::uint32_t (&w)[8], const std::uint32_t (&a)[MT][2][4],
                                               const GroupConsts& gc, float (&acc)[MT][4][4]) {
  std::uint32_t b[4][2][2];  // [n8 tile][k16 step][b0 / b1]
  decode_chunk<B, T>(w, gc, b);
#pragma unroll
  for (int jj = 0; jj < 4; ++jj)
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_16816<T>(acc[mt][jj], a[mt][s], b[jj][s][0], b[jj][s][1]);
}

template <int MT, int B, class T, bool kNoWrap = false>
__device__ __forceinline__ void tc_chunk(const std::uint32_t* ring, int wo, const std::uint32_t (&a)[MT][2][4],
                                         const GroupConsts& gc, float (&acc)[MT][4][4]) {
  std::uint32_t w[8];
  ring_lane_words<B, kRingWords, kNoWrap>(ring, wo, w);
  tc_chunk_words<MT, B, T>(w, a, gc, acc);
}

/// The activations (16-bit values of either type) in the order the kernel reads them:
/// xp[row, 32 * c + r] = x[row, perm[row0_c + r]] for the rows r < rows_c of chunk c, else 0
/// (short chunks padded to 32 rows), then kXTailPad zeros. One thread per 8 consecutive elements:
/// their 8 source columns from the layer's tc_xsrc (two 16-byte loads, -1 past a chunk's rows),
/// the 8 scattered (act-order) reads of x, one 16-byte store. Against one thread per element
/// reading the chunk descriptor and perm: one dependent load fewer, a quarter of the loads.
/// Also zeroes zero[0 .. zero_n) (the wgmma kernel's stream-K counters, in the same scratch).
__global__ void tc_gather_x_kernel(const std::uint16_t* __restrict__ x, std::int64_t M, std::int64_t K,
                                   const int* __restrict__ xsrc, int num_chunks, std::uint16_t* __restrict__ xp,
                                   int* __restrict__ zero, std::int64_t zero_n) {
  // Where the tc kernel after this one is a programmatic dependent launch (launch_tc_rows), its
  // blocks may start now and fill their weight rings while this kernel runs; they read xp only
  // after pdl_wait, which waits for this whole kernel.
  pdl_trigger();
  const std::int64_t ld8 = static_cast<std::int64_t>(num_chunks) * 4;  // 8-element pieces per row
  const std::int64_t total8 = M * ld8;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total8; i += stride) {
    const std::int64_t row = i / ld8, k8 = 8 * (i % ld8);
    const int4 a = __ldg(reinterpret_cast<const int4*>(xsrc + k8));
    const int4 b = __ldg(reinterpret_cast<const int4*>(xsrc + k8 + 4));
    const int src[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    const std::uint16_t* __restrict__ xr = x + row * K;
    std::uint32_t v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const std::uint32_t lo = src[2 * u] >= 0 ? xr[src[2 * u]] : 0u;  // +0 in float16 and bfloat16
      const std::uint32_t hi = src[2 * u + 1] >= 0 ? xr[src[2 * u + 1]] : 0u;
      v[u] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(xp + 8 * i) = make_uint4(v[0], v[1], v[2], v[3]);
  }
  // The tail padding the tc kernel may read past the last row (kXTailPad), zeroed so that
  // nothing reads uninitialised memory.
  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < kXTailPad) xp[8 * total8 + t] = 0;
  for (std::int64_t i = t; i < zero_n; i += stride) zero[i] = 0;
}

/// The layer's tc_xsrc: per chunk c and row r < 32 the row of x that chunk row multiplies,
/// perm[row0_c + r] (or row0_c + r without perm), -1 past the chunk's rows.
__global__ void tc_xsrc_kernel(const int* __restrict__ perm, const int4* __restrict__ tc_chunks, int num_chunks,
                               int* __restrict__ xsrc) {
  const int i = static_cast<int>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= num_chunks * 32) return;
  const int4 d = tc_chunks[i >> 5];
  const int r = i & 31;
  xsrc[i] = r < ((d.z >> 8) & 0xff) ? (perm ? perm[d.x + r] : d.x + r) : -1;
}

/// The A fragments (activations) of chunk q of an iteration from the activation tile `xs`.
template <int MT, int kXRow>
__device__ __forceinline__ void load_a_tile(const __half* xs, int q, std::uint32_t (&a)[MT][2][4]) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int s = 0; s < 2; ++s)
      ldmatrix_x4(a[mt][s],
                  xs + (mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kXRow + 32 * q + 16 * s + (lane >> 4) * 8);
}

/// Per chunk q of an iteration (descriptor d, b bits): on a group change the scales and zeros
/// from the group's header unit in the ring, the A fragments from the activation tile, and
/// the ring word where the lane's b code words start (returned).
template <int MT, int kXRow, class T>
__device__ __forceinline__ int tc_chunk_setup(const std::uint32_t* ring, const __half* xs, const int4& d, int q, int b,
                                              std::int64_t s0, int& header, GroupConsts& gc,
                                              std::uint32_t (&a)[MT][2][4]) {
  load_group_header<T>(ring, d, b, s0, header, gc);
  load_a_tile<MT, kXRow>(xs, q, a);
  return chunk_lane_word(d, b, s0);
}

// Chunks per iteration ("super-chunk"): one barrier pair, one activation tile and one
// descriptor set per Q chunks, so per-iteration latencies are paid once per Q * 32 rows.
template <int MT, int kRows = 16 * MT>
struct TcShape {
  static constexpr int R = kRows;                   // rows of the block's m tile (8: kT8)
  static constexpr int Q = MT == 4 ? 2 : 4;         // chunks per iteration
  static constexpr int kXRow = 32 * Q + 8;          // halves per activation tile row (+16 bytes: no ldmatrix bank conflicts)
  static constexpr int kXVecs = R * 4 * Q / kTcThreads;  // 16-byte activation loads per thread and iteration
  static_assert(R * 4 * Q % kTcThreads == 0, "activation tile / threads");
  // Blocks per multiprocessor that the register budget must allow (the 32 KB ring allows 6):
  // the kernel is latency-bound, so ptxas may not trade occupancy for registers.
  static constexpr int kMinBlocks = MT == 1 ? 6 : MT == 2 ? 4 : 3;
};

/// One full iteration of TcShape<MT>::Q chunks of one bit width B, unrolled (see
/// tc_gemm_kernel, F). kOneGroup: the chunks lie in one group (tc::one_group_flag): one header
/// check, and every chunk's lane words from the first chunk's (one_group_lane_word); kNoWrap
/// (with kOneGroup): and below the ring's end (one_group_wrap_free).
template <int MT, int B, class T, bool kOneGroup, bool kNoWrap = false>
__device__ __forceinline__ void tc_iter(const std::uint32_t* ring, const __half* xs, const int4* dcur,
                                        std::int64_t s0, int& header, GroupConsts& gc,
                                        float (&acc)[MT][4][4]) {
  int wo0 = 0;
  if constexpr (kOneGroup) {
    load_group_header<T>(ring, dcur[0], B, s0, header, gc);
    wo0 = chunk_lane_word(dcur[0], B, s0);
  }
#pragma unroll
  for (int q = 0; q < TcShape<MT>::Q; ++q) {
    std::uint32_t a[MT][2][4];
    int wo;
    if constexpr (kOneGroup) {
      load_a_tile<MT, TcShape<MT>::kXRow>(xs, q, a);
      wo = one_group_lane_word<B, kRingWords, kNoWrap>(wo0, q);
    } else {
      wo = tc_chunk_setup<MT, TcShape<MT>::kXRow, T>(ring, xs, dcur[q], q, B, s0, header, gc, a);
    }
    tc_chunk<MT, B, T, kNoWrap>(ring, wo, a, gc, acc);
  }
}

// ---------------------------------------------------------------------------------
// m <= 8 (kT8; kGather at m = 1 on small layers, which also gathers the block's whole activation
// segment once): the mma runs transposed, out^T = W^T x^T.
//
// With one activation row, 15 of the 16 rows of the usual A tile are padding. Transposed, the
// decoded weights are the A operand (the B fragments of n8 tiles 2i and 2i + 1 are exactly the
// A fragment of the 16 output columns 16i .. 16i + 15) and the activations the B operand, the
// same row in all 8 of its columns: half the mma of the usual form, and a lane's B fragments of a
// chunk are 4 words that one 16-byte shared-memory load fetches, with no ldmatrix and no
// activation tile per iteration.
// ---------------------------------------------------------------------------------

/// Chunks of the activation segment that kGather holds in shared memory (the xs array): a block
/// gathers the activations of its first kSegChunks chunks before its loop and of the next ones
/// each kSegChunks chunks (a block has K / 32 / split chunks; 14336 x 4096 at split 16: 28).
constexpr int kSegChunks = 64;

/// kT8 at m <= kT8OwnRows (decode on layers whose blocks do not fit one wave, where kGather does
/// not run) pushes its split-K partials into a receive buffer of its own (kT8OwnRows x 128
/// floats), so its blocks never wait for the cluster's slowest one (push_reduce_store,
/// !kRingRecv). 4 rows (2 KB) still fit 6 blocks per multiprocessor beside the ring; 8 would not.
/// H100, same build (ab/s20_c3.sh, two rounds), m = 4 with 4 rows against 2 (m = 3 and 4 then took
/// the ring): 8192 x 28672 GPTQ-2 44.9-45.1 -> 43.7 us, GPTQ-3 49.9-50.2 -> 48.6-49.0, GPTQ-4
/// 52.3-52.4 -> 51.6; 4096 x 14336 GPTQ-4 16.3-16.4 -> 15.4-15.6. Buffers for all 8 rows (and all
/// 16 of the 16-row tiles) at 5 blocks per multiprocessor were level at m = 8 and 16 for GPTQ-2 / 3
/// / 4 and up to 6% slower for EXL2 4.5 / 6.0 bpw (m = 8: 76.1-76.3 -> 80.8-80.9 us at 6.0 bpw).
constexpr int kT8OwnRows = 4;

/// Position of chunk row r (0..31) in the chunk's 32 halves of the kGather segment: word
/// 4t + 2s + h holds rows 16s + 2t + 8h and + 1, the B fragment register b_h of k16 step s for
/// lanes 4g + t, so lane t's four words are contiguous.
__device__ __forceinline__ int row1_pos(int r) {
  const int s = r >> 4, rr = r & 15;
  return 2 * (4 * ((rr & 7) >> 1) + 2 * s + (rr >> 3)) + (rr & 1);
}

/// Group sums, in the transposed kernels (kT8 with kNB = 1 or 2, kGather: m <= 16), both types.
/// The mma multiplies x by the exact integers q - z (decode_chunk<..., true>: two operations per
/// pair instead of three for f16((q - z) * s) and four for bf16((q - z) * s)) into `grp1`, the
/// group's fp32 sums; at each group change and after the block's last chunk (fold_group) they are
/// multiplied by the group's scale in fp32 (the exact fp16 scale) and added to acc1. So y = sum
/// over groups of s * fp32(sum of x (q - z)): the weights are never rounded to T, and the result
/// is within T's bound of the exact weights (q - z) * s rather than of dequantize(T) (one-hot rows
/// still give dequantize(T)'s bits, T(s (q - z)), an exact fp32 product rounded once). No fp32
/// overflow for float16 x (|x (q - z)| <= 65504 * 255 per product); bfloat16 x beyond about
/// 1e36 can overflow a group's sum where the exact result is finite (docs/quickstart.md).
/// H100, same calls: bfloat16 (ab/s9_ab1.sh) 8192 x 28672 GPTQ-4 59.5 -> 53.4 us at m = 1, 60.9
/// -> 56.5 at m = 8, the smaller layers 7-17% faster; float16 (ab/s12_c3.sh) 0.91-0.97x on
/// 4096 x 4096, 4096 x 14336 and 14336 x 4096 at m = 1..8, 8192 x 28672 GPTQ-2 0.92x and 4-bit
/// 0.97-0.98x at m = 8, but 4-bit 1.04x at m = 1 / 2 there (52.1 -> 54.1 us). The usual 16- and
/// 32-row tiles keep T((q - z) * s): there a second accumulator set with its fold (scales of
/// other lanes' columns through shuffles) measured 8-35% slower (8192 x 28672 bfloat16 m = 16:
/// 70.7 -> 94.7 us); the transposed 16-row tiles (kNB = 2) replace them at m = 9..16.

/// acc1 += s * grp1 and grp1 = 0, with the scales of the group just finished (gc): acc1[i][e] holds
/// column 16 i + g + 8 (e >> 1), the lane's own column 8 jj + g for jj = 2i + (e >> 1).
template <int NB>
__device__ __forceinline__ void fold_group(float (&acc1)[NB][2][4], float (&grp1)[NB][2][4], const GroupConsts& gc) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc1[nb][i][e] = fmaf(grp1[nb][i][e], gc.sf[2 * i + (e >> 1)], acc1[nb][i][e]);
        grp1[nb][i][e] = 0.0f;
      }
}

/// The transposed kernels: one chunk, decoded from the lane's words at ring word `wo`, times the
/// activation words xa[nb] of each 8-row group nb (row1_pos, transposed_x), into acc1[nb][i] = the
/// 16 x 8 transposed tile of columns 16i .. 16i + 15 and batch rows 8 nb .. 8 nb + 7 (the group
/// sums). The decoded A fragments serve all NB groups.
template <int B, class T, int NB, bool kNoWrap = false>
__device__ __forceinline__ void tc_chunk_row1(const std::uint32_t* ring, int wo, const uint4 (&xa)[NB],
                                              const GroupConsts& gc, float (&acc1)[NB][2][4]) {
  std::uint32_t w[8];
  ring_lane_words<B, kRingWords, kNoWrap>(ring, wo, w);
  std::uint32_t b[4][2][2];
  decode_chunk<B, T, true>(w, gc, b);
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const std::uint32_t a[4] = {b[2 * i][s][0], b[2 * i + 1][s][0], b[2 * i][s][1], b[2 * i + 1][s][1]};
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
        mma_16816<T>(acc1[nb][i], a, s ? xa[nb].z : xa[nb].x, s ? xa[nb].w : xa[nb].y);
    }
}

/// The transposed kernels' activation words of chunk q of an iteration (the B fragments of both
/// k16 steps, as tc_chunk_row1 takes them): kGather from the segment (`xit`: the iteration's
/// first chunk in it, row1_pos order); kT8 from rows 8 nb .. 8 nb + 7 of the activation tile `xs`
/// with one ldmatrix (matrix j: those rows, columns 8j.. of the chunk, so register j of lane
/// 4g + t holds row 8 nb + g, columns 8j + 2t, + 1: b_{j & 1} of k16 step j / 2 for batch row
/// 8 nb + g).
template <bool kGather, int kXRow>
__device__ __forceinline__ uint4 transposed_x(const __half* xit, const __half* xs, int q, int nb) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  if constexpr (kGather) {
    return *reinterpret_cast<const uint4*>(xit + q * 32 + (lane & 3) * 8);
  } else {
    std::uint32_t r[4];
    ldmatrix_x4(r, xs + (8 * nb + (lane & 7)) * kXRow + 32 * q + (lane >> 3) * 8);
    return make_uint4(r[0], r[1], r[2], r[3]);
  }
}

/// The transposed kernels: chunk q of an iteration whose lane words start at ring word `wo`, with
/// its activation words.
template <int B, class T, bool kGather, int kXRow, int NB, bool kNoWrap = false>
__device__ __forceinline__ void tc_chunk_row1_q(const std::uint32_t* ring, const __half* xit, const __half* xs, int q,
                                                int wo, const GroupConsts& gc, float (&grp1)[NB][2][4]) {
  uint4 xa[NB];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) xa[nb] = transposed_x<kGather, kXRow>(xit, xs, q, nb);
  tc_chunk_row1<B, T, NB, kNoWrap>(ring, wo, xa, gc, grp1);
}

/// The transposed kernels: the group of a chunk (descriptor d, b bits): on a
/// change, the previous group's sums folded and the new header unpacked; returns the chunk's lane word.
template <class T, int NB>
__device__ __forceinline__ int tc_group_row1(const std::uint32_t* ring, const int4& d, int b, std::int64_t s0,
                                             int& header, GroupConsts& gc, float (&acc1)[NB][2][4],
                                             float (&grp1)[NB][2][4]) {
  if (d.w != header) fold_group(acc1, grp1, gc);  // (before load_group_header replaces gc)
  load_group_header<T>(ring, d, b, s0, header, gc);
  return chunk_lane_word(d, b, s0);
}

/// The transposed kernels: chunk q of an iteration (descriptor d, b bits).
template <int B, class T, bool kGather, int kXRow, int NB>
__device__ __forceinline__ void tc_chunk_row1_at(const std::uint32_t* ring, const __half* xit, const __half* xs,
                                                 const int4& d, int q, std::int64_t s0, int& header, GroupConsts& gc,
                                                 float (&acc1)[NB][2][4], float (&grp1)[NB][2][4]) {
  const int wo = tc_group_row1<T>(ring, d, B, s0, header, gc, acc1, grp1);
  tc_chunk_row1_q<B, T, kGather, kXRow, NB>(ring, xit, xs, q, wo, gc, grp1);
}

/// The transposed kernels: one full iteration of Q chunks of one bit width B, unrolled.
/// kOneGroup: the chunks lie in one group (tc::one_group_flag): the group change is checked and
/// the lane word computed once, the other chunks' from it (one_group_lane_word); kNoWrap (with
/// kOneGroup): and they lie below the ring's end (one_group_wrap_free).
template <int B, class T, bool kGather, int kXRow, int NB, int Q, bool kOneGroup, bool kNoWrap = false>
__device__ __forceinline__ void tc_iter_row1(const std::uint32_t* ring, const __half* xit, const __half* xs,
                                             const int4* dcur, std::int64_t s0, int& header, GroupConsts& gc,
                                             float (&acc1)[NB][2][4], float (&grp1)[NB][2][4]) {
  int wo0 = 0;
  if constexpr (kOneGroup) wo0 = tc_group_row1<T>(ring, dcur[0], B, s0, header, gc, acc1, grp1);
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    if constexpr (kOneGroup) {
      const int wo = one_group_lane_word<B, kRingWords, kNoWrap>(wo0, q);
      tc_chunk_row1_q<B, T, kGather, kXRow, NB, kNoWrap>(ring, xit, xs, q, wo, gc, grp1);
    } else {
      tc_chunk_row1_at<B, T, kGather, kXRow, NB>(ring, xit, xs, dcur[q], q, s0, header, gc, acc1, grp1);
    }
  }
}

/// Blocks per multiprocessor of the transposed 16-row tiles (kT8, kNB = 2): their 16 group sums
/// besides 16 accumulators take 96 registers; at 6 blocks (80 registers) ptxas spills 116 bytes
/// inside the loop, which measured 1.20-1.48x slower than 5 blocks (H100, bfloat16 GPTQ-4 at
/// m = 9..16, ab/s12_c2.sh). With 5 blocks against the usual 16-row tiles (6 blocks), same call
/// (ab/s12_c3.sh, GPTQ-4): float16 0.91-0.98x, 8192 x 28672 m = 16 62.9 -> 60.5 us (EXL2 4.0 bpw
/// 64.2 -> 60.8); bfloat16 (ab/s12_c2.sh) 0.84-0.93x, 8192 x 28672 m = 16 73.1 -> 61.6 us.
constexpr int kT16MinBlocks = 5;

/// T: the activation / output type (__half or __nv_bfloat16); `xp` holds its bits.
/// kGather (MT = 1, M = 1 only): `xp` is the caller's single activation row itself, in checkpoint
/// order; the block gathers its chunks' activations through `xsrc` (the layer's tc_xsrc: per
/// chunk row the row of x it multiplies, -1 past a short chunk's rows) into shared memory once
/// (per kSegChunks chunks) and runs the transposed mma above: no gather launch and no scratch
/// allocation per call (host overhead at decode).
/// kT8 (MT = 1, M <= 8): the transposed mma on an 8-row activation tile of the gathered `xp`:
/// against the 16-row tiles, H100, same session (GPTQ-4, m = 2 / 8): 8192x28672 61.6 / 62.6 ->
/// 54.8 / 55.8 us, 14336x4096 21.4 / 22.0 -> 19.1 / 19.6, 4096x4096 11.4 / 11.7 -> 10.3 / 10.6.
/// kT8 with kNB = 2 (M = 9..16): the same on a 16-row tile, two 8-row groups of x, each decoded
/// A fragment used by two mma (kT16MinBlocks).
template <int MT, class T, bool kGather = false, bool kT8 = false, int kNB = 1>
__global__ void __launch_bounds__(kTcThreads,
                                  kNB == 2 ? kT16MinBlocks : TcShape<MT, kT8 ? 8 * kNB : 16 * MT>::kMinBlocks)
    tc_gemm_kernel(const __half* __restrict__ xp, std::int64_t M, std::int64_t ldxp,
                   const std::uint32_t* __restrict__ stream, std::int64_t tile_words,
                   const int4* __restrict__ tc_chunks, int num_chunks, const __half* __restrict__ bias,
                   T* __restrict__ out, std::int64_t N, int split, const int* __restrict__ xsrc) {
  using S = TcShape<MT, kT8 ? 8 * kNB : 16 * MT>;
  constexpr bool kTrans = kGather || kT8;  // the transposed mma (acc1)
  static_assert(!kGather || MT == 1, "kGather: one row");
  static_assert(!kT8 || (MT == 1 && !kGather), "kT8: up to 8 kNB rows, from the gathered activations");
  static_assert(kNB == 1 || (kT8 && kNB == 2), "kNB: 8-row groups of the transposed tiles (kT8: 1 or 2)");
  // kT8's rows with a split-K receive buffer of their own (rrow): kT8OwnRows (kNB = 1), none for
  // the 16-row tiles (kNB = 2).
  constexpr int kOwnRows = kT8 && kNB == 1 ? kT8OwnRows : 0;
  static_assert(!kGather || (kSegChunks % S::Q == 0 && kSegChunks * 32 <= S::R * S::kXRow),
                "kGather: the segment is whole iterations and fits xs");
  constexpr int R = S::R, Q = S::Q;
  __shared__ __align__(128) std::uint32_t ring[kRingWords];
  __shared__ __align__(16) __half xs[R * S::kXRow];
  // descriptors of the current and the next iteration's chunks (aligned so that the loop toggles
  // between the two halves with an XOR of its address)
  static_assert((Q & (Q - 1)) == 0, "dring halves toggled with an XOR");
  __shared__ __align__(2 * Q * 16) int4 dring[2][Q];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // kGather with split-K, and kT8 with M <= kT8OwnRows: push_reduce_store's receive buffer of its
  // own ([sender rank][its share of 1 or kT8OwnRows rows]).
  __shared__ float rrow[kGather ? tc::kTileCols : kOwnRows > 0 ? kOwnRows * tc::kTileCols : 1];
  __shared__ __align__(8) std::uint64_t rbar;  // push_reduce_store's mbarrier
#endif

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int rank = static_cast<int>(blockIdx.y);  // cluster rank (the cluster spans grid.y)
  const std::int64_t tile = blockIdx.x;
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.z) * R;
  const std::uint32_t* __restrict__ tsrc = stream + tile * tile_words;
  // kT8 at M <= kT8OwnRows: split-K partials into a receive buffer of its own (rrow), published at
  // the start (push_reduce_init_early) instead of by a barrier after the loop.
  [[maybe_unused]] const bool own_recv = kOwnRows > 0 && M <= kOwnRows;
  // the rows it pushes there: M rounded up to the lanes' row pairs (m = 1 and 2 push 2 rows)
  [[maybe_unused]] const int own_rows = own_recv ? (static_cast<int>(M) + 1) & ~1 : 0;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kGather) {
    // the receive mbarrier of push_reduce_store's one-row buffer, published before the loop
    if (split > 1) push_reduce_init_early<1>(smem_u32(&rbar), tid);
  } else {
    // push_reduce_store's mbarrier: own_recv's published now, the others by the barrier after the
    // loop
    if (MT == 1 && split > 1) {
      if (own_recv)
        push_reduce_init_early<kOwnRows>(smem_u32(&rbar), tid, own_rows);
      else if (tid == 0)
        push_reduce_init<R>(smem_u32(&rbar));
    }
  }
#endif
  const int cb = static_cast<int>(static_cast<std::int64_t>(num_chunks) * rank / split);
  const int ce = static_cast<int>(static_cast<std::int64_t>(num_chunks) * (rank + 1) / split);

  float acc[MT][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][jj][e] = 0.0f;
  float acc1[kNB][2][4];  // kGather, kT8 (transposed tiles)
  float grp1[kNB][2][4];  // the current group's sums (transposed tiles)
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc1[nb][i][e] = grp1[nb][i][e] = 0.0f;

  if (cb < ce) {
    // The block's stream (chunk_range); its first chunk's header is read directly below when
    // that chunk does not start its group.
    const ChunkRange cr = chunk_range(tc_chunks, cb, ce);
    const std::int64_t s0 = cr.s0;
    RingFill fill(tsrc, s0, cr.s1, tid, ring);
#pragma unroll 1
    for (int p = 0; p < kLookahead; ++p) fill.issue_step();

    // Scales and zeros of the current group: lane g's four columns 8*jj + g of its block.
    GroupConsts gc;
    int header = first_group_header<T>(tsrc, cr, g, warp, gc);

    // Descriptors: lanes q < Q of warp 0 load chunk (first of iteration) + q, two iterations
    // ahead; they reach dring one iteration before use.
    auto load_desc = [&](int c0) { return prefetch_chunk_desc<Q>(tc_chunks, c0, ce, warp == 0, lane); };
    // Activations: the tile [R rows x 32 Q] of xp at chunk c0, as 16-byte pieces (row,
    // 8 columns); piece k of this thread is xoff[k] bytes from the block's first row, plus 32 c0
    // halves.
    // No bounds checks: rows past M read row M - 1 instead (an mma output row depends only on
    // its own A row, and those rows are never stored), and the chunks of a last, partial
    // iteration past ce read the following row or the scratch's tail padding (launch_tc);
    // their values are never used (the iteration runs nq chunks).
    uint4 xv[S::kXVecs];
    const __half* __restrict__ xblock = xp + m0 * ldxp;
    unsigned xoff[S::kXVecs];
#pragma unroll
    for (int k = 0; k < S::kXVecs; ++k) {
      const unsigned piece = static_cast<unsigned>(tid + kTcThreads * k);
      const unsigned row = piece / (4 * Q), col8 = piece % (4 * Q);
      const unsigned last = static_cast<unsigned>(M - 1 - m0);
      xoff[k] = opaque_u32(((row < last ? row : last) * static_cast<unsigned>(ldxp) + col8 * 8) * 2u);
    }
    // (xoff in bytes from the chunk's block-uniform address: one 64-bit add a piece; the 32-bit
    // sum xoff + 32 c0 in halves, widened and scaled per piece, took about 9 instructions a piece;
    // opaque_u32, or ptxas recomputes xoff from M and ldxp each iteration once the loop keeps a
    // running activation pointer)
    auto load_x_at = [&](const char* __restrict__ xc) {
#pragma unroll
      for (int k = 0; k < S::kXVecs; ++k) xv[k] = __ldg(reinterpret_cast<const uint4*>(xc + xoff[k]));
    };
    // where chunk c0's activations start (the loop keeps the next iteration's in xnext, advanced
    // by Q chunks an iteration)
    auto x_at = [&](int c0) { return reinterpret_cast<const char*>(xblock + static_cast<std::int64_t>(c0) * 32); };
    // kGather: the activations of chunks cf .. (up to kSegChunks of them, at most ce - 1) into xs
    // (row1_pos order; 0 past a short chunk's rows): xsrc -> x, eight elements per thread in
    // flight at a time; a warp takes one chunk's 32 rows.
    auto gather_seg = [&](int cf) {
      const int n = (ce - cf < kSegChunks ? ce - cf : kSegChunks) * 32;
      const unsigned short* __restrict__ xr = reinterpret_cast<const unsigned short*>(xp);
      const int* __restrict__ src = xsrc + static_cast<std::int64_t>(cf) * 32;
      unsigned short* xsu = reinterpret_cast<unsigned short*>(xs);
      for (int i0 = 0; i0 < n; i0 += 8 * kTcThreads) {
        int k[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int i = i0 + u * kTcThreads + tid;
          k[u] = i < n ? __ldg(src + i) : -1;
        }
        unsigned short v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = k[u] >= 0 ? __ldg(xr + k[u]) : static_cast<unsigned short>(0);  // +0
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int i = i0 + u * kTcThreads + tid;
          if (i < n) xsu[(i & ~31) + row1_pos(i & 31)] = v[u];
        }
      }
    };
    if (warp == 0 && lane < Q) dring[0][lane] = load_desc(cb);
    int4 dnext = load_desc(cb + Q);
    // Shared-window addresses the loop uses each iteration, held in registers (opaque_u32): dring,
    // and this thread's first activation piece in xs (piece k lies k kXPieceRows rows below it).
    // With them, a running activation pointer and the descriptor prefetch left to warp 0, the loop
    // takes 69 instructions an iteration in warps 1-3 instead of 96 (kT8, one 4 KB ring step;
    // SASS). H100, same call (ab/s23_c2.sh, two rounds), 8192 x 28672: 0.97-0.99x on GPTQ-2 and
    // EXL2 2.5 bpw at m = 1 to 16, GPTQ-3 0.98x at m = 8 / 16, 4-bit 0.98-0.99x.
    unsigned dcur_s = opaque_u32(smem_u32(&dring[0][0]));  // dring[it & 1]
    constexpr int kXPieceRows = kTcThreads / (4 * Q);
    static_assert(kTcThreads % (4 * Q) == 0, "each piece k of a thread starts a whole number of rows below piece 0");
    [[maybe_unused]] const unsigned xs_s =
        opaque_u32(smem_u32(xs + (tid / (4 * Q)) * S::kXRow + (tid % (4 * Q)) * 8));
    // (a programmatic dependent launch: the layer's own data above may be read before the
    // previous kernel ends (kGather: the previous call's; else the activation gather), x only
    // after it)
    pdl_wait();
    if constexpr (kGather)
      gather_seg(cb);
    else
      load_x_at(x_at(cb));
    [[maybe_unused]] const char* __restrict__ xnext = x_at(cb + Q);
    __syncthreads();  // dring[0] (kGather: and the first segment)

#pragma unroll 1
    for (int it = 0, c0 = cb; c0 < ce; ++it, c0 += Q) {
      const int nq = ce - c0 < Q ? ce - c0 : Q;
      const int4* __restrict__ dcur = dring[it & 1];
      // A. (the barrier ending the previous iteration) everyone is done with its ring data and xs.
      // B. The steps holding this iteration's chunks have landed (this thread's copies).
      fill.issue_through(lds_int4(dcur_s + static_cast<unsigned>((nq - 1) * 16)), s0, kLookahead);
      // C. This iteration's activations and the next iteration's descriptors into shared memory.
      if constexpr (kGather) {
        if (c0 != cb && (c0 - cb) % kSegChunks == 0) gather_seg(c0);  // (after barrier A)
      } else {
#pragma unroll
        for (int k = 0; k < S::kXVecs; ++k) sts_16(xs_s + static_cast<unsigned>(k * kXPieceRows * S::kXRow * 2), xv[k]);
      }
      if (warp == 0 && lane < Q)
        sts_16((dcur_s ^ static_cast<unsigned>(Q * 16)) + static_cast<unsigned>(lane * 16), dnext);
      // D. Everyone's copies, activations and descriptors are visible.
      __syncthreads();
      // E. Loads for later iterations: activations of the next, descriptors of the one after.
      if constexpr (!kGather) {
        if (c0 + Q < ce) load_x_at(xnext);
        xnext += Q * 32 * sizeof(__half);
      }
      if (warp == 0) dnext = load_desc(c0 + 2 * Q);  // (the other warps skip its bookkeeping)
      // F. Consume the chunks: unrolled over the Q chunks when they share one bit width (every
      //    full iteration of a fixed-width layer), so ptxas can overlap one chunk's shared-
      //    memory loads and decoding with the previous chunk's mma; else one chunk at a time.
      const int z0 = lds_s32(dcur_s + 8u);  // dcur[0].z
      const int bits0 = z0 & 0xff;
      // The one-group iterations (tc::one_group_flag) on the transposed tiles and the 16- and
      // 32-row tiles; the 64-row ones, at their register budget, spill with them (ptxas: 44 bytes),
      // so they keep the per-chunk path. The transposed 16-row tiles spilled 64 bytes with them
      // until the leaner skeleton above; now 4 (bfloat16) / 8 (float16) bytes, one register
      // reloaded an iteration, and they run 0.94-0.98x of the per-chunk path on GPTQ-2 / 3, EXL2
      // 2.5 bpw and bfloat16 at m = 9 to 16 (H100, same call, ab/s23_c4.sh, 8192 x 28672; GPTQ-4
      // 0.98-1.01x; same bits).
      constexpr bool kOneGroupIters = kTrans || MT <= 2;
      if constexpr (kTrans) {
        const __half* xit = xs + (kGather ? ((c0 - cb) % kSegChunks) * 32 : 0);
        if (kOneGroupIters && nq == Q && ((z0 >> tc::one_group_flag_bit()) & 1)) {
          with_code_width(bits0, [&](auto b) {
            constexpr int B = decltype(b)::value;
            if (one_group_wrap_free<B, Q>(dcur[0], s0))
              tc_iter_row1<B, T, kGather, S::kXRow, kNB, Q, true, true>(ring, xit, xs, dcur, s0, header, gc, acc1,
                                                                         grp1);
            else
              tc_iter_row1<B, T, kGather, S::kXRow, kNB, Q, true>(ring, xit, xs, dcur, s0, header, gc, acc1, grp1);
          });
        } else if (nq == Q && ((z0 >> tc::uniform_flag_bit(Q)) & 1)) {
          with_code_width(bits0, [&](auto b) {
            tc_iter_row1<decltype(b)::value, T, kGather, S::kXRow, kNB, Q, false>(ring, xit, xs, dcur, s0, header, gc,
                                                                               acc1, grp1);
          });
        } else {
#pragma unroll 1
          for (int q = 0; q < nq; ++q) {
            const int4 d = dcur[q];
            with_code_width(d.z & 0xff, [&](auto b) {
              tc_chunk_row1_at<decltype(b)::value, T, kGather, S::kXRow, kNB>(ring, xit, xs, d, q, s0, header, gc, acc1,
                                                                        grp1);
            });
          }
        }
      } else if (kOneGroupIters && nq == Q && ((z0 >> tc::one_group_flag_bit()) & 1)) {
        with_code_width(bits0, [&](auto b) {
          constexpr int B = decltype(b)::value;
          if (one_group_wrap_free<B, Q>(dcur[0], s0))
            tc_iter<MT, B, T, true, true>(ring, xs, dcur, s0, header, gc, acc);
          else
            tc_iter<MT, B, T, true>(ring, xs, dcur, s0, header, gc, acc);
        });
      } else if (nq == Q && ((z0 >> tc::uniform_flag_bit(Q)) & 1)) {
        with_code_width(bits0,
                        [&](auto b) { tc_iter<MT, decltype(b)::value, T, false>(ring, xs, dcur, s0, header, gc, acc); });
      } else {
#pragma unroll 1
        for (int q = 0; q < nq; ++q) {
          const int4 d = dcur[q];
          const int bits = d.z & 0xff;
          std::uint32_t a[MT][2][4];
          const int wo = tc_chunk_setup<MT, S::kXRow, T>(ring, xs, d, q, bits, s0, header, gc, a);
          with_code_width(bits, [&](auto b) { tc_chunk<MT, decltype(b)::value, T>(ring, wo, a, gc, acc); });
        }
      }
      dcur_s ^= static_cast<unsigned>(Q * 16);
      __syncthreads();  // A. for the next iteration
    }
    cp_async_wait<0>();  // (copies past the stream's end were never issued; this is for form)
    if constexpr (kTrans) fold_group(acc1, grp1, gc);  // the block's last group
  }
  pdl_wait();  // (again for a block without chunks, which stores too; a second wait is free)
  if constexpr (kGather) {
    pdl_trigger();  // the next call's kGather may start its blocks (tc_device.cuh)
    // acc1[i][0] / [2] hold columns 16i + g / 16i + g + 8 of the warp's block (in all 8 columns
    // of the transposed tile, the same value in each); lane t keeps one of the four.
    const int hi = t & 1;
    const float v = (t >> 1) ? (hi ? acc1[0][1][2] : acc1[0][1][0]) : (hi ? acc1[0][0][2] : acc1[0][0][0]);
    const int col = warp * tc::kBlockCols + 16 * (t >> 1) + 8 * hi + g;  // in the tile
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (split > 1) {
      // each thread pushes its one value of row 0 into the column's owner (no barrier after the
      // loop: the buffer was published at the start)
      push_reduce_store<1, false, false>(rrow, smem_u32(&rbar), rank, split, tid, 0, 1, tile, N, bias, out,
                                         [&](auto&& f) { f(0, col, v); });
      return;
    }
#endif
    const std::int64_t n = tile * tc::kTileCols + col;
    if (n < N) store_output(out, 0, N, n, v, bias);
    return;
  } else if constexpr (kT8) {
    // acc1[nb][i][e]: column 16i + g + 8 (e >> 1) of the warp's block, batch row 8 nb + 2t + (e & 1).
    auto col = [&](int i, int e) { return warp * tc::kBlockCols + 16 * i + g + 8 * (e >> 1); };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kOwnRows > 0) {
      if (split > 1 && own_recv) {
        // rows 0 .. own_rows - 1 (lanes t < own_rows / 2) into the owners' own buffers: no wait
        // for the cluster's slowest block before sending
        push_reduce_store<kOwnRows, true, false>(rrow, smem_u32(&rbar), rank, split, tid, 0, M, tile, N, bias, out,
                                                 [&](auto&& f) {
#pragma unroll
                                                   for (int nb = 0; nb < kNB; ++nb)
                                                     if (8 * nb + 2 * t < own_rows) {
#pragma unroll
                                                       for (int i = 0; i < 2; ++i)
#pragma unroll
                                                         for (int e = 0; e < 4; e += 2)
                                                           f(8 * nb + 2 * t, col(i, e), acc1[nb][i][e],
                                                             acc1[nb][i][e + 1]);
                                                     }
                                                 });
        return;
      }
    }
    if (split > 1) {
      static_assert(R * tc::kTileCols <= kRingWords, "the receive buffer must fit the ring");
      // pairs: batch rows 8 nb + 2t, + 1 of column col(i, e)
      push_reduce_store<R, true>(reinterpret_cast<float*>(ring), smem_u32(&rbar), rank, split, tid, 0, M, tile, N,
                                 bias, out, [&](auto&& f) {
#pragma unroll
                                   for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
                                     for (int i = 0; i < 2; ++i)
#pragma unroll
                                       for (int e = 0; e < 4; e += 2)
                                         f(8 * nb + 2 * t, col(i, e), acc1[nb][i][e], acc1[nb][i][e + 1]);
                                 });
      return;
    }
#endif
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const std::int64_t row = 8 * nb + 2 * t + (e & 1);
          const std::int64_t n = tile * tc::kTileCols + col(i, e);
          if (row < M && n < N) store_output(out, row, N, n, acc1[nb][i][e], bias);
        }
    return;
  }
  // Output: lane holds rows g / g + 8 and columns 2t, 2t + 1 of each n8 tile.
  const std::int64_t n_block = tile * tc::kTileCols + warp * tc::kBlockCols;
  auto store = [&](int mt, int jj, int e, float v) {
    const std::int64_t row = m0 + mt * 16 + g + 8 * (e >> 1);
    const std::int64_t n = n_block + 8 * jj + 2 * t + (e & 1);
    if (row < M && n < N) store_output(out, row, N, n, v, bias);
  };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (split > 1) {
    static_assert(R * tc::kTileCols <= kRingWords, "the receive buffer / reduction tile must fit the ring");
    float* red = reinterpret_cast<float*>(ring);  // the ring is free now
    if constexpr (MT == 1) {
      // Partial tiles pushed to their owners: rank r sums a 1/split share of the tile over ranks
      // 0..split-1 in order. Pairs: columns 8 jj + 2t, + 1 of row g (+ 8).
      push_reduce_store<R, false>(red, smem_u32(&rbar), rank, split, tid, m0, M, tile, N, bias, out, [&](auto&& f) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            f(g + 8 * h, warp * tc::kBlockCols + 8 * jj + 2 * t, acc[0][jj][2 * h], acc[0][jj][2 * h + 1]);
      });
    } else {
      // 32-row tiles: partial tiles read through distributed shared memory. Pushing them measured
      // slower on the large layers (H100, 8192 x 28672 GPTQ-4 m = 32: 85.2 against 84.0 us).
      __syncthreads();  // every warp is done reading the ring
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            red[(mt * 16 + g + 8 * (e >> 1)) * tc::kTileCols + warp * tc::kBlockCols + 8 * jj + 2 * t + (e & 1)] =
                acc[mt][jj][e];
      cluster_reduce_store<R>(red, rank, split, tid, m0, M, tile, N, bias, out);
    }
    return;
  }
#endif
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj)
#pragma unroll
      for (int e = 0; e < 4; ++e) store(mt, jj, e, acc[mt][jj][e]);
}

/// Stream-ordered scratch (cudaMallocAsync / cudaFreeAsync on the call's stream): safe for
/// concurrent calls on different streams and under graph capture (memory nodes).
class StreamScratch {
 public:
  StreamScratch(std::size_t bytes, cudaStream_t stream) : stream_(stream) {
    EXL2_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  }
  ~StreamScratch() {
    if (ptr_ != nullptr) (void)cudaFreeAsync(ptr_, stream_);
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  void* get() const noexcept { return ptr_; }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

/// Whether a tc_gemm_kernel grid of `blocks` blocks (`blocks_per_sm` of them fit a
/// multiprocessor) that follows the activation gather is a programmatic dependent launch of it
/// (tc_device.cuh): its first blocks then fill their weight rings while the gather runs and read
/// its output after pdl_wait. Only where an even spread of the blocks would already fill some
/// multiprocessor to its limit (more than (blocks_per_sm - 1) x multiprocessors; every grid of
/// two waves or more): blocks launched while the gather's blocks still hold registers on some
/// multiprocessors may be spread less evenly, and a grid that leaves room on every
/// multiprocessor then runs its most loaded one with more blocks than plain stream order would
/// (a hypothesis that fits the measurements below, not observed directly).
/// H100, GPTQ-4, the same build with every such launch programmatic (EXL2_CUDA_PDL=1) and with
/// none (=0), two calls of two runs each (docs/kernels.md has the table): the grids this rule
/// takes gained, 8192 x 28672 at m <= 16 (split 8: 1792 blocks for 6 x 132 slots) 0.96-0.99x at
/// m = 1 to 8 (m = 8: 57.0 -> 54.7 us) and 0.99-1.00x at m = 16, its 32-row tiles (split 2: 448
/// blocks for 4 x 132) 0.96-0.99x, those of 4096 x 14336 (448 blocks) 0.97-0.99x; the grids it
/// leaves out mostly lost: 14336 x 4096 (512 blocks of 6 a multiprocessor, clusters of 16; 256
/// of 4) 1.07-1.20x at m = 2 to 32, 4096 x 14336 at m = 9..16 (448 of 6) 1.10-1.27x, 4096 x 4096
/// at m = 17..32 (256 of 4) 1.08-1.12x. The wgmma kernels, launched the same way in the first
/// call, took 1.14-1.19x at m = 48 / 64 on 8192 x 28672 and 4096 x 14336 (224 blocks of 2 a
/// multiprocessor: this rule would take them), so they keep plain stream order.
bool tc_pdl_programmatic_after_gather(const DeviceLayer& L, std::int64_t blocks, int blocks_per_sm) {
  const std::int64_t per_sm = blocks_per_sm > 0 ? blocks_per_sm : 1;
  return L.tc_pdl && (L.tc_pdl_all || blocks > (per_sm - 1) * L.sm_count);
}

/// The split-K factor (blocks per cluster) of launch_tc_rows<MT> with `mtiles` row tiles;
/// `one_wave_ok`: the transposed tiles after the gather launch (kT8 with kNB = 1 or 2), which take
/// the one-wave split on layers of one 4- or 8-bit width (below).
template <int MT>
int tc_rows_split(const DeviceLayer& L, std::int64_t mtiles, int per_sm, bool one_wave_ok = false) {
  // Up to 8 blocks per cluster: measured on the H100 (EXL2_CUDA_MAX_SPLIT sweep, GPTQ-4, m = 4):
  // 4096x4096 13.3 us with 8 against 17.3 with 4, 14336x4096 30.3 against 43.7, 8192x28672
  // 73.3 against 78.0, 4096x14336 level.
  // MT = 1: clusters of 16 (at least 8 chunks a block) where the tiles do not fill one wave at
  // 8. Measured on an H200 (GPTQ-4, m = 1..16, against a cap of 8): 4096x4096 11.3-11.7 against
  // 12.0-12.3 us, 14336x4096 22.4-24.2 against 26.5-28.4; MT = 2 got slower (4096x4096 m = 32:
  // 17.7 against 15.1 us), so it keeps 8.
  // MT = 4: the largest split whose blocks fit one wave. Its 64 x 128 partial tiles make the
  // reduction and the extra waves of cluster_split's choice cost more than they save; measured
  // on the H100 (GPTQ-4, every split forced in turn, m = 33 / 64): 8192x28672 134.7 / 142.8 us at
  // split 1 against 150.1 / 148.4 at cluster_split's 8; 4096x14336 46.7 / 47.2 at 2 against
  // 53.1 / 53.8 at 8; 4096x4096 and 14336x4096 unchanged (8 either way).
  // The transposed tiles after the gather launch (m <= 16) on a layer of one width, 4 or 8 bits
  // (GPTQ-4/8, AWQ, EXL2 of one such width): the largest split whose blocks fit one wave. These
  // layers stream their bytes faster than the tiles decode them, so fewer, longer blocks (less
  // reduction, no partial last wave) win over the fuller waves of cluster_split's choice. H100,
  // 8192x28672 (split 2 against 8), same call (ab/s13_c4.sh, fastest of two runs), m = 2 / 4 / 8 /
  // 12 / 16: GPTQ-4 0.94 / 0.95 / 0.98 / 1.01 / 0.97x (54.3 -> 51.2 us at m = 2), EXL2 4.0 bpw
  // 0.94-0.99x, AWQ 0.94-0.98x, bfloat16 GPTQ-4 0.98-1.01x; 8-bit GPTQ (EXL2_CUDA_MAX_SPLIT=4,
  // which gives this split there) 0.96-0.97x. Layers of other widths, whose decode costs more per byte, lost
  // (ab/s13_c3.sh): EXL2 2.5 / 4.5 bpw (mixed) 1.01-1.10x, 6.0 bpw (6-bit) 0.99-1.02x. m = 1: the
  // kGather decision keeps cluster_split's split (at split 2 kGather measured 0.99x in float16 but
  // 1.05x in bfloat16, 52.3 -> 55.0 us: each long block waits for its own gathers), so on this
  // layer m = 1 runs the gather launch and kT8 at the one-wave split: ab/s13_c8.sh, same call,
  // float16 GPTQ-4 54.2 -> 51.0-51.2 us, EXL2 4.0 bpw 54.3 -> 51.1, AWQ 54.9 -> 51.2, bfloat16
  // GPTQ-4 52.3 -> 52.4-52.5. On the other bench shapes both rules pick the same split; where even
  // split 2 does not fit one wave (more tiles than half the resident blocks, unmeasured),
  // cluster_split decides.
  const std::int64_t tiles = L.tc_tiles * mtiles;
  const bool c16 = MT == 1 && L.cluster16 && tiles * 8 < resident_blocks(L, per_sm);
  if (MT == 1 && one_wave_ok && (L.tc_uniform_bits == 4 || L.tc_uniform_bits == 8)) {
    const int one_wave = single_wave_split(L, tiles, c16 ? 8 : 16, per_sm, c16 ? 16 : 8);
    if (one_wave > 1) return one_wave;
  }
  return MT == 4 ? single_wave_split(L, tiles, 16, per_sm, 8)
                 : cluster_split(L, tiles, c16 ? 8 : 16, per_sm, c16 ? 16 : 8);
}

/// kGather: m = 1, `xp` the caller's row itself; kT8: m <= 8 kNB (tc_gemm_kernel's).
template <int MT, class T, bool kGather = false, bool kT8 = false, int kNB = 1>
void launch_tc_rows(const DeviceLayer& L, const __half* xp, std::int64_t m, std::int64_t ldxp, T* out,
                    cudaStream_t stream) {
  const std::int64_t mtiles = (m + 16 * MT - 1) / (16 * MT);
  if (L.tc_tiles > 0x7fffffffLL) throw Unsupported("gemm: N is too large for the tc kernel");
  const int per_sm = kNB == 2 ? L.tc_t16_blocks_per_sm : L.tc_blocks_per_sm[MT];
  const int split = tc_rows_split<MT>(L, mtiles, per_sm, kT8);
  // A programmatic dependent launch (tc_device.cuh): kGather of the stream's previous kernel
  // (it is the whole call); the others of the activation gather just before them, where their
  // blocks fill some multiprocessor to its limit (tc_pdl_programmatic_after_gather).
  const bool programmatic =
      kGather ? L.tc_pdl : tc_pdl_programmatic_after_gather(L, L.tc_tiles * split * mtiles, per_sm);
  launch_clustered_smem(tc_gemm_kernel<MT, T, kGather, kT8, kNB>,
                        dim3(static_cast<unsigned>(L.tc_tiles), static_cast<unsigned>(split),
                             static_cast<unsigned>(mtiles)),
                        dim3(kTcThreads), 0, split, 1, programmatic, stream, "tc_gemm_kernel launch", xp, m,
                        ldxp, static_cast<const std::uint32_t*>(L.tc_qweight.get()), L.tc_tile_words,
                        static_cast<const int4*>(L.tc_chunks.get()), L.num_chunks,
                        static_cast<const __half*>(L.bias.get()), out, L.N, split,
                        kGather ? static_cast<const int*>(L.tc_xsrc.get()) : static_cast<const int*>(nullptr));
}

}  // namespace

/// The smallest m sent to the wgmma kernel where the layer has it: kTcWgmmaMinRows, or
/// EXL2_CUDA_WGMMA_MIN_ROWS=17..65 at construction (65: only above the mma.sync kernel's range),
/// to measure the two kernels against each other and to test the wgmma kernel's 64-row tiles.
static int tc_wgmma_min_rows() {
  return env::integer_in("EXL2_CUDA_WGMMA_MIN_ROWS", 17, kTcMaxRows + 1, kTcWgmmaMinRows);
}

/// Whether the tc kernels may be programmatic dependent launches (tc_device.cuh): compute
/// capability 9.0+, unless EXL2_CUDA_PDL=0 at construction (to measure them and to test both
/// ways); and whether every mma.sync kernel after the activation gather is one (EXL2_CUDA_PDL=1),
/// not only the grids that tc_pdl_programmatic_after_gather takes.
static void tc_pdl_from_env(DeviceLayer& L) {
  L.tc_pdl = L.cc_major >= 9 && !env::equals("EXL2_CUDA_PDL", "0");
  L.tc_pdl_all = L.tc_pdl && env::equals("EXL2_CUDA_PDL", "1");
}

bool tc_layout_wanted(const DeviceLayer& L) noexcept {
  if (env::equals("EXL2_CUDA_TC", "0")) return false;
  if (env::equals("EXL2_CUDA_TC", "1")) return true;
  return L.clusters;
}

/// The ring lookahead of a layer's wgmma kernels (tc_wgmma.cu, tc_wgmma_ws.cu): `safe`
/// (tc::ring_lookahead over the layer's 4-chunk windows), or EXL2_CUDA_RING_AHEAD = n in the
/// environment when the layer is built, for n in kLookahead .. safe (a measurement knob).
static int ring_ahead_from_env(int safe) {
  return env::integer_in("EXL2_CUDA_RING_AHEAD", kLookahead, safe - 1, safe);
}

void build_tc_layout(DeviceLayer& L, const std::vector<int4>& chunks_host, cudaStream_t stream) {
  if (L.cc_major < 8 || L.num_chunks == 0 || L.N == 0) return;
  {
    // The kernel's cp.async / ldmatrix / mma.sync need code for sm_80+: a build for an
    // older virtual architecture (JIT-compiled here) holds only traps, so such a layer
    // gets no tc layout.
    cudaFuncAttributes attr{};
    EXL2_CUDA_CHECK(cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(tc_gemm_kernel<1, __half>)));
    if (attr.ptxVersion < 80) return;
  }
  // The kernel addresses the activation rows of a block with 32-bit offsets (< 64 rows of
  // 32 * num_chunks halves).
  if (static_cast<std::int64_t>(L.num_chunks) * 32 * 64 > 0x7fffffffLL) return;
  const StreamTables tables = make_stream_tables(chunks_host, L.G, env::integer_in("EXL2_CUDA_ONE_GROUP", 0, 1, 1) == 1);
  L.tc_tiles = (L.N + tc::kTileCols - 1) / tc::kTileCols;
  L.tc_tile_words = tables.units * tc::kUnitWords;
  L.tc_ring_ahead = ring_ahead_from_env(tables.ring_ahead);
  L.tc_uniform_bits = chunks_host.empty() ? 0 : chunks_host[0].z & 0xff;
  for (const int4& c : chunks_host)
    if ((c.z & 0xff) != L.tc_uniform_bits) L.tc_uniform_bits = 0;
  L.tc_chunks.allocate(tables.chunks.size(), "tc chunk table");
  EXL2_CUDA_CHECK(cudaMemcpyAsync(L.tc_chunks.get(), tables.chunks.data(), tables.chunks.size() * sizeof(int4),
                                  cudaMemcpyHostToDevice, stream));
  DeviceBuffer<std::int32_t> header;
  header.allocate(tables.header.size(), "tc header table");
  EXL2_CUDA_CHECK(cudaMemcpyAsync(header.get(), tables.header.data(), tables.header.size() * sizeof(std::int32_t),
                                  cudaMemcpyHostToDevice, stream));
  L.tc_qweight.allocate(static_cast<std::size_t>(L.tc_tiles * L.tc_tile_words), "tc qweight");
  const std::int64_t code_threads = static_cast<std::int64_t>(L.num_chunks) * L.tc_tiles * tc::kTileBlocks * 32;
  tc_pack_codes_kernel<<<grid_for(code_threads, kPackThreads), kPackThreads, 0, stream>>>(
      L.qweight.get(), L.zeros.get(), L.N, L.tc_tiles, L.tc_tile_words, L.chunks.get(), L.tc_chunks.get(),
      L.num_chunks, L.tc_qweight.get());
  EXL2_CUDA_CHECK_LAUNCH("tc_pack_codes_kernel");
  const std::int64_t header_threads = L.G * L.tc_tiles * tc::kTileCols;
  tc_pack_headers_kernel<<<grid_for(header_threads, kPackThreads), kPackThreads, 0, stream>>>(
      L.scales.get(), L.zeros.get(), L.N, L.G, L.tc_tiles, L.tc_tile_words, header.get(), L.tc_qweight.get());
  EXL2_CUDA_CHECK_LAUNCH("tc_pack_headers_kernel");
  // (The bfloat16 instantiations fit as many blocks: same launch bounds, no spills.)
  EXL2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&L.tc_blocks_per_sm[1], tc_gemm_kernel<1, __half>,
                                                                kTcThreads, 0));
  EXL2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&L.tc_blocks_per_sm[2], tc_gemm_kernel<2, __half>,
                                                                kTcThreads, 0));
  EXL2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&L.tc_blocks_per_sm[4], tc_gemm_kernel<4, __half>,
                                                                kTcThreads, 0));
  EXL2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &L.tc_t16_blocks_per_sm, tc_gemm_kernel<1, __half, false, true, 2>, kTcThreads, 0));
  if (L.clusters) {  // clusters of 16 for the MT = 1 kernels (launch_tc_rows), where they fit
    const void* mt1[] = {reinterpret_cast<const void*>(tc_gemm_kernel<1, __half>),
                         reinterpret_cast<const void*>(tc_gemm_kernel<1, __nv_bfloat16>),
                         reinterpret_cast<const void*>(tc_gemm_kernel<1, __half, true>),
                         reinterpret_cast<const void*>(tc_gemm_kernel<1, __nv_bfloat16, true>),
                         reinterpret_cast<const void*>(tc_gemm_kernel<1, __half, false, true>),
                         reinterpret_cast<const void*>(tc_gemm_kernel<1, __nv_bfloat16, false, true>),
                         reinterpret_cast<const void*>(tc_gemm_kernel<1, __half, false, true, 2>),
                         reinterpret_cast<const void*>(tc_gemm_kernel<1, __nv_bfloat16, false, true, 2>)};
    L.cluster16 = true;
    for (const void* k : mt1) {
      allow_cluster16(k);
      L.cluster16 = L.cluster16 && cluster16_launchable(k, kTcThreads);
    }
  }
  L.tc_xsrc.allocate(static_cast<std::size_t>(L.num_chunks) * 32, "tc activation index");
  tc_xsrc_kernel<<<grid_for(static_cast<std::int64_t>(L.num_chunks) * 32, kPackThreads), kPackThreads, 0, stream>>>(
      L.kernel_perm(), static_cast<const int4*>(L.tc_chunks.get()), L.num_chunks, L.tc_xsrc.get());
  EXL2_CUDA_CHECK_LAUNCH("tc_xsrc_kernel");
  query_tc_wgmma(L);
  L.tc_wgmma_min_rows = tc_wgmma_min_rows();
  // m = 1 may gather inside the tc kernel (kGather) unless EXL2_CUDA_TC_GATHER=0 (to measure and
  // test the gather launch + kT8 on any layer); m = 9..16 run the transposed 16-row tiles (kT8
  // with kNB = 2) unless EXL2_CUDA_T16=0 (the usual 16-row tiles: to measure and test both).
  L.tc_gather = !env::equals("EXL2_CUDA_TC_GATHER", "0");
  L.tc_t16 = !env::equals("EXL2_CUDA_T16", "0");
  tc_pdl_from_env(L);
  // The host tables and the header buffer are local: the uploads and the pack kernels must
  // finish before they go out of scope; and the pack kernels read the canonical codes, scales and
  // zeros, which the tc stream replaces from here on (one copy of the codes per layer).
  EXL2_CUDA_CHECK(cudaStreamSynchronize(stream));
  L.qweight.release();
  L.scales.release();
  L.zeros.release();
}

bool has_tc_layout(const DeviceLayer& L) noexcept { return L.tc_qweight.get() != nullptr; }

namespace {

/// Rows per launch of launch_tc_slice: bounds the gathered activations' scratch (64 MB at K =
/// 8192) and the grid's row tiles; a larger m runs in slices, which re-read the weights once per
/// 4096 rows.
constexpr std::int64_t kTcSliceRows = 4096;

/// `sliced`: the call has more than kTcSliceRows rows. It then runs no slice on the transposed
/// tiles, so that all rows of one call have the same contract (those tiles sum groups in fp32).
template <class T>
void launch_tc_slice(const DeviceLayer& L, const T* x, std::int64_t m, T* out, bool sliced, cudaStream_t stream) {
  const bool transposed_ok = !sliced;
  // Decode where the blocks fit one wave: the kernel gathers the row itself (the rule: tc_gemm.cuh).
  if (m == 1 && transposed_ok && L.tc_gather &&
      L.tc_tiles * tc_rows_split<1>(L, 1, L.tc_blocks_per_sm[1]) <= resident_blocks(L, L.tc_blocks_per_sm[1])) {
    launch_tc_rows<1, T, true>(L, reinterpret_cast<const __half*>(x), 1, L.K, out, stream);
    return;
  }
  const std::int64_t ldxp = static_cast<std::int64_t>(L.num_chunks) * 32;
  const bool wgmma = L.tc_wgmma && m >= L.tc_wgmma_min_rows;
  // One scratch: the gathered activations (+ kXTailPad: the kernel's unchecked activation loads
  // of a last, partial iteration), then, where the wgmma kernel runs stream-K, its tile counters
  // (zeroed by the gather) and partial tiles.
  WgmmaStreamK sk;
  sk.blocks = wgmma ? tc_wgmma_stream_k_blocks(L, m) : 0;
  auto aligned = [](std::size_t b) { return (b + 255) / 256 * 256; };
  const std::size_t x_bytes = aligned(static_cast<std::size_t>(m * ldxp + kXTailPad) * sizeof(std::uint16_t));
  const std::size_t cnt_bytes = sk.blocks > 0 ? aligned(static_cast<std::size_t>(L.tc_tiles) * sizeof(int)) : 0;
  const std::size_t part_bytes = sk.blocks > 0 ? tc_wgmma_stream_k_floats(sk.blocks) * sizeof(float) : 0;
  StreamScratch xp(x_bytes + cnt_bytes + part_bytes, stream);
  std::uint16_t* xpb = static_cast<std::uint16_t*>(xp.get());
  if (sk.blocks > 0) {
    sk.counters = reinterpret_cast<int*>(static_cast<char*>(xp.get()) + x_bytes);
    sk.partials = reinterpret_cast<float*>(static_cast<char*>(xp.get()) + x_bytes + cnt_bytes);
  }
  tc_gather_x_kernel<<<grid_for(m * ldxp / 8, kPackThreads), kPackThreads, 0, stream>>>(
      reinterpret_cast<const std::uint16_t*>(x), m, L.K, L.tc_xsrc.get(), L.num_chunks, xpb, sk.counters,
      sk.blocks > 0 ? L.tc_tiles : 0);
  EXL2_CUDA_CHECK_LAUNCH("tc_gather_x_kernel");
  const __half* xph = reinterpret_cast<const __half*>(xpb);  // the kernel reads 16-bit values of T
  if (wgmma)
    launch_tc_wgmma(L, xph, m, ldxp, out, sk, stream);
  else if (m <= 8 && transposed_ok)
    launch_tc_rows<1, T, false, true>(L, xph, m, ldxp, out, stream);
  else if (m <= 16 && transposed_ok && L.tc_t16)
    launch_tc_rows<1, T, false, true, 2>(L, xph, m, ldxp, out, stream);
  else if (m <= 16)
    launch_tc_rows<1>(L, xph, m, ldxp, out, stream);
  else if (m <= 32)
    launch_tc_rows<2>(L, xph, m, ldxp, out, stream);
  else
    launch_tc_rows<4>(L, xph, m, ldxp, out, stream);
}

template <class T>
void launch_tc_for(const DeviceLayer& L, const T* x, std::int64_t m, T* out, cudaStream_t stream) {
  if (!has_tc_layout(L)) internal_error("launch_tc: the layer has no tc layout");
  for (std::int64_t r = 0; r < m; r += kTcSliceRows)
    launch_tc_slice(L, x + r * L.K, m - r < kTcSliceRows ? m - r : kTcSliceRows, out + r * L.N, m > kTcSliceRows,
                    stream);
}

}  // namespace

void launch_tc(const DeviceLayer& L, const __half* x, std::int64_t m, __half* out, cudaStream_t stream) {
  launch_tc_for(L, x, m, out, stream);
}

void launch_tc(const DeviceLayer& L, const __nv_bfloat16* x, std::int64_t m, __nv_bfloat16* out,
               cudaStream_t stream) {
  launch_tc_for(L, x, m, out, stream);
}

}  // namespace exl2::detail::cuda
