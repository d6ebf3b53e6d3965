// Internal: the device-resident canonical layer and the code-decoding helpers shared by
// the dequantization and GEMM kernels. See src/cuda/README.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "core/cuda_backend.hpp"
#include "cuda/cuda_check.cuh"

namespace exl2::detail::cuda {

// ---------------------------------------------------------------------------------
// Chunks: the unit of work along K.
//
// Every group is cut into chunks of (at most) 32 consecutive permuted rows. 32 rows of
// b bits are exactly b words, so every chunk starts word-aligned in its column's bit
// stream (the group's stream starts at bit 0 of word_start[g]) and has a single bit
// width, group, scale and zero. Only the last chunk of a group can be shorter (short
// last group, GPTQ group sizes that are not multiples of 32).
//   int4 { first permuted row, first word row, bits | (rows << 8), group }
// ---------------------------------------------------------------------------------
constexpr int kChunkRows = 32;

// `#pragma unroll` for __host__ __device__ code (the host compiler would warn about it).
#if defined(__CUDA_ARCH__)
#define EXL2_HD_UNROLL _Pragma("unroll")
#else
#define EXL2_HD_UNROLL
#endif

/// Read-only load (through the non-coherent cache on the device; plain load on the host,
/// so that host test harnesses can exercise the decoding logic).
template <class T>
__host__ __device__ __forceinline__ T ro_load(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

struct ChunkInfo {
  int row0;   // first permuted row
  int word0;  // first packed word row
  int bits;   // 2, 3, 4, 5, 6 or 8
  int rows;   // 1..32
  int group;
  int nwords;  // words of this chunk: ceil(rows * bits / 32)
};

__host__ __device__ __forceinline__ ChunkInfo load_chunk(const int4* __restrict__ chunks, int c) {
  const int4 v = ro_load(chunks + c);
  ChunkInfo ci;
  ci.row0 = v.x;
  ci.word0 = v.y;
  ci.bits = v.z & 0xff;
  ci.rows = v.z >> 8;
  ci.group = v.w;
  ci.nwords = (ci.rows * ci.bits + 31) >> 5;
  return ci;
}

/// Decodes rows R0 .. R0+NR-1 of one chunk of one column. `p` points at the chunk's
/// first word of the column (qweight + word0 * N + n), `stride` = N. Words at or past
/// `nwords` are not read (they may lie outside qweight); their codes read as 0.
/// Calls f(row_in_chunk, code) for every row (compile-time indices after unrolling).
template <int B, int R0, int NR, class F>
__host__ __device__ __forceinline__ void decode_rows(const std::uint32_t* __restrict__ p, std::int64_t stride,
                                            int nwords, F&& f) {
  constexpr int LO = (R0 * B) / 32;
  constexpr int HI = ((R0 + NR) * B - 1) / 32;
  constexpr int NW = HI - LO + 1;
  std::uint32_t w[NW];
EXL2_HD_UNROLL
  for (int j = 0; j < NW; ++j) w[j] = (LO + j < nwords) ? ro_load(p + static_cast<std::int64_t>(LO + j) * stride) : 0u;
EXL2_HD_UNROLL
  for (int i = 0; i < NR; ++i) {
    const int bit = (R0 + i) * B - LO * 32;
    const int wi = bit >> 5;
    const int sh = bit & 31;
    std::uint32_t v = w[wi] >> sh;
    if (sh + B > 32) v |= w[wi + 1] << (32 - sh);
    f(R0 + i, v & ((1u << B) - 1u));
  }
}

/// The canonical dequantized value: f16((q - z) * s), exact product in fp32, one rounding.
__host__ __device__ __forceinline__ __half dq_value(std::uint32_t q, int z, float s) {
  return __float2half_rn(static_cast<float>(static_cast<int>(q) - z) * s);
}

// ---------------------------------------------------------------------------------
// Activation/output types. Kernels are templated on T = __half or __nv_bfloat16 (x, out
// and the weights as the GEMM multiplies them); scales and bias stay fp16 in memory.
// ---------------------------------------------------------------------------------
template <class T>
inline constexpr bool kIsBf16 = std::is_same_v<T, __nv_bfloat16>;

__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

/// float -> T, round to nearest even.
template <class T>
__host__ __device__ __forceinline__ T from_float(float v) {
  if constexpr (kIsBf16<T>) {
    return __float2bfloat16_rn(v);
  } else {
    return __float2half_rn(v);
  }
}

/// The canonical dequantized value in T: T((q - z) * s), exact product in fp32, one
/// rounding (for __half exactly dq_value).
template <class T>
__host__ __device__ __forceinline__ T dq_value_as(std::uint32_t q, int z, float s) {
  if constexpr (kIsBf16<T>) {
    return __float2bfloat16_rn(static_cast<float>(static_cast<int>(q) - z) * s);
  } else {
    return dq_value(q, z, s);
  }
}

// ---------------------------------------------------------------------------------
// Host side: validation of the group tables and the chunk table.
// ---------------------------------------------------------------------------------
[[noreturn]] inline void internal_error(const std::string& what) {
  throw InvalidArgument("internal error building a CUDA layer: " + what);
}

/// Validates the group tables of `meta` (defensively: the core validated them already,
/// but the kernels rely on them for memory safety) and builds the chunk table.
inline std::vector<int4> make_chunk_table(const LayerMeta& meta) {
  const std::int64_t K = meta.K, N = meta.N, G = meta.G, Q = meta.Q;
  if (K < 0 || N < 0 || G < 0 || Q < 0) internal_error("negative dimension");
  if (K > 0x7fffffffLL || Q > 0x7fffffffLL) internal_error("K or Q exceeds 2^31 - 1");
  if (N % 8 != 0) internal_error("N = " + std::to_string(N) + " is not a multiple of 8");
  if (static_cast<std::int64_t>(meta.bits.size()) != G ||
      static_cast<std::int64_t>(meta.row_start.size()) != G + 1 ||
      static_cast<std::int64_t>(meta.word_start.size()) != G + 1)
    internal_error("group table sizes do not match G");
  if (!meta.perm.empty() && static_cast<std::int64_t>(meta.perm.size()) != K) internal_error("perm size != K");
  if (!meta.identity_perm && meta.perm.empty()) internal_error("non-identity permutation without perm");
  for (const std::int32_t p : meta.perm)
    if (p < 0 || p >= K) internal_error("perm entry out of range");
  if (!meta.bias.empty() && static_cast<std::int64_t>(meta.bias.size()) != N) internal_error("bias size != N");
  if (G > 0 && (meta.row_start[0] != 0 || meta.row_start[G] != K || meta.word_start[G] != Q))
    internal_error("group tables do not cover [0, K) / [0, Q)");
  if (G == 0 && K != 0) internal_error("no groups");

  std::vector<int4> chunks;
  chunks.reserve(static_cast<std::size_t>(K / kChunkRows + G + 1));
  for (std::int64_t g = 0; g < G; ++g) {
    const int b = meta.bits[g];
    if (!(b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8))
      internal_error("group " + std::to_string(g) + " has unsupported bit width " + std::to_string(b));
    const std::int64_t r0 = meta.row_start[g], r1 = meta.row_start[g + 1];
    const std::int64_t w0 = meta.word_start[g], w1 = meta.word_start[g + 1];
    if (r1 < r0 || w1 < w0) internal_error("group tables are not non-decreasing");
    if ((r1 - r0) * b > (w1 - w0) * 32)
      internal_error("group " + std::to_string(g) + " has more rows than its words hold");
    for (std::int64_t r = r0; r < r1; r += kChunkRows) {
      const std::int64_t rows = (r1 - r < kChunkRows) ? (r1 - r) : kChunkRows;
      const std::int64_t word = w0 + ((r - r0) / kChunkRows) * b;  // 32 rows of b bits = b words
      int4 c;
      c.x = static_cast<int>(r);
      c.y = static_cast<int>(word);
      c.z = b | static_cast<int>(rows << 8);
      c.w = static_cast<int>(g);
      chunks.push_back(c);
    }
  }
  if (chunks.size() > 0x7fffffffu) internal_error("too many chunks");
  return chunks;
}

// ---------------------------------------------------------------------------------
// The device-resident layer. All buffers live on `device` and are freed by RAII.
// ---------------------------------------------------------------------------------
struct DeviceLayer {
  int device = 0;
  Format format = Format::EXL2;
  std::int64_t K = 0, N = 0, G = 0, Q = 0;
  bool identity_perm = true;
  bool has_bias = false;
  int num_chunks = 0;
  int sm_count = 1;   // multiprocessors of `device` (work partitioning)
  int cc_major = 0;   // compute capability major of `device` (9+: thread-block clusters)
  int cc_minor = 0;   // and minor (9.0: the wgmma tc kernel)
  bool clusters = false;  // cc 9.0+ and the kernels' sm_90 code runs (cluster split-K usable)
  bool cluster16 = false;  // the tc kernel's MT = 1 clusters may have 16 blocks (tc layout only)
  // Resident blocks per multiprocessor of each kernel instantiation, queried once at
  // construction (work partitioning without a host query per call).
  int gemv_blocks_per_sm[17] = {};  // index: rows m (1..16)
  int mma_blocks_per_sm[2] = {};    // small tile, large tile
  int tc_blocks_per_sm[5] = {};     // index: m tiles of 16 rows (1, 2, 4); tc layout only
  int tc_wgmma_blocks_per_sm[6] = {};  // wgmma kernel shapes (tc_wgmma.cu); tc layout only
  // The bfloat16 mma_kernel runs code compiled for compute capability 8.0+ on this
  // device (wmma bfloat16); false: bfloat16 with m > 16 uses GEMV slices (gemm.cu).
  bool mma_bf16 = false;
  // Cap on the cluster split-K factor set by EXL2_CUDA_MAX_SPLIT (1, 2, 4, 8 or 16) at
  // construction, a tuning / measurement knob; 0: each kernel's default cap (see
  // cluster_split and src/cuda/README.md).
  int max_split = 0;

  // The canonical layout's codes, scales and zeros: released once the tc layout below is built
  // from them (tc_layout_wanted, build_tc_layout).
  DeviceBuffer<std::uint32_t> qweight;  // [Q, N]
  DeviceBuffer<__half> scales;          // [G, N]
  DeviceBuffer<std::uint8_t> zeros;     // [G, N]
  DeviceBuffer<std::int32_t> perm;      // [K]
  DeviceBuffer<std::int32_t> bits;      // [G]
  DeviceBuffer<std::int32_t> row_start;   // [G + 1]
  DeviceBuffer<std::int32_t> word_start;  // [G + 1]
  DeviceBuffer<int4> chunks;            // [num_chunks]
  DeviceBuffer<__half> bias;            // [N] or empty
  // Compute capability 9.0+, or 8.0+ with EXL2_CUDA_TC=1 (tc_layout_wanted): the codes, scales
  // and zeros in the tensor-core stream layout of tc_layout.hpp, the layer's only copy of them: per tile of 128 columns one contiguous stream of 512-byte
  // units (a header unit of scales/zeros per group, then b units per chunk of b bits),
  // [tc_tiles, tc_tile_words] words, and the per-chunk table
  //   int4 { first permuted row, first code unit, bits | rows << 8 | uniform flags (tc::uniform_flags) | one-group flag
  //         (tc::one_group_flag), header unit }.
  DeviceBuffer<std::uint32_t> tc_qweight;
  DeviceBuffer<int4> tc_chunks;       // [num_chunks]
  DeviceBuffer<int> tc_xsrc;          // [num_chunks * 32] row of x per chunk row, -1 past its rows (m = 1)
  std::int64_t tc_tiles = 0;          // ceil(N / 128)
  std::int64_t tc_tile_words = 0;     // words of one tile's stream (128 per unit)
  int tc_ring_ahead = 2;              // ring steps a kernel may copy ahead (tc::ring_lookahead, 4-chunk iterations)
  int tc_uniform_bits = 0;            // the code width of every chunk, or 0 for mixed widths (tc_rows_split)
  // The tc layout may use the wgmma kernel (tc_wgmma.cu) for m > kTcMaxRows: compute capability
  // 9.0 and the build holds its sm_90a code (query_tc_wgmma).
  bool tc_wgmma = false;
  int tc_wgmma_min_rows = 0;  // smallest m sent to it (tc_gemm.cu)
  // m = 1 gathers inside the tc kernel where its blocks fit one wave (kGather); false with
  // EXL2_CUDA_TC_GATHER=0 at construction (the gather launch + kT8 instead: to measure and test it).
  bool tc_gather = true;
  // m = 9..16 run the transposed 16-row tiles (kT8 with kNB = 2); false with EXL2_CUDA_T16=0 at
  // construction (the usual 16-row tiles: to measure and test both).
  bool tc_t16 = true;
  int tc_t16_blocks_per_sm = 0;
  // Programmatic dependent launches of the tc kernels (tc_device.cuh): compute capability 9.0+,
  // false with EXL2_CUDA_PDL=0 at construction. kGather always; the mma.sync kernel after the
  // activation gather where its blocks fill some multiprocessor to its limit
  // (tc_pdl_programmatic_after_gather), or always with EXL2_CUDA_PDL=1
  // (tc_pdl_all: to measure and test it on any layer).
  bool tc_pdl = false;
  bool tc_pdl_all = false;
  int tc_wgmma_forced = -1;   // its shape for every m (EXL2_CUDA_WGMMA_CFG at construction), or -1
  int tc_wgmma_split = 0;     // its split-K for every m (EXL2_CUDA_WGMMA_SPLIT at construction), or 0
  int tc_wgmma_sk = 0;        // its stream-K blocks per SM (EXL2_CUDA_WGMMA_SK = 1..3), or 0: off
  int tc_wgmma_sk_per_sm = 0;  // blocks of its stream-K instantiation that fit one SM (queried only when on)
  // Its 64-row tiles (m = 33..64) stream through a ring of twice the size (tc_wgmma.cu,
  // kDeepRingWords), 8 more steps ahead: where the layer's 4-chunk windows leave the usual ring at
  // most 3 steps ahead (8-bit codes) and the launch keeps a split of at most 2 (deep_ring_wanted),
  // or always / never with EXL2_CUDA_WGMMA_DEEP = 1 / 0 at construction; per_sm: its blocks that
  // fit one multiprocessor (0 when the deep ring is off).
  bool tc_wgmma_deep = false;
  int tc_wgmma_deep_per_sm = 0;

  /// perm pointer for kernels: nullptr when the permutation is the identity.
  const int* kernel_perm() const noexcept { return identity_perm ? nullptr : perm.get(); }

  std::size_t total_bytes() const noexcept {
    return qweight.bytes() + scales.bytes() + zeros.bytes() + perm.bytes() + bits.bytes() + row_start.bytes() +
           word_start.bytes() + chunks.bytes() + bias.bytes() + tc_qweight.bytes() + tc_chunks.bytes();
  }

  DeviceLayer() = default;
  DeviceLayer(const DeviceLayer&) = delete;
  DeviceLayer& operator=(const DeviceLayer&) = delete;
  ~DeviceLayer() {
    // Free on the layer's own device; never throws.
    NoThrowDeviceGuard guard(device);
    qweight.release();
    scales.release();
    zeros.release();
    perm.release();
    bits.release();
    row_start.release();
    word_start.release();
    chunks.release();
    bias.release();
    tc_qweight.release();
    tc_chunks.release();
  }
};

/// Checks that `layer` and `meta` describe the same shape (internal consistency).
void check_layer_meta(const DeviceLayer& layer, const LayerMeta& meta, const char* what);

}  // namespace exl2::detail::cuda
