// Internal: the tensor-core ("tc") weight layout, in plain C++ so that host tests can
// check it (tests/cpp/test_tc_layout.cpp) with the very functions the kernels use.
//
// The tc kernel (tc_gemm.cu) runs `mma.sync.m16n8k16` (fp16 x fp16 -> fp32) with the
// weight as operand B. One warp owns a block of 32 output columns (four n8 tiles) and
// walks K chunk by chunk (a chunk = 32 permuted rows of one group, one bit width b; see
// device_layer.cuh). For one chunk and one column block, lane l = 4*g + t needs, per n8
// tile jj (column 8*jj + g) and k16 step s, the B fragment registers
//   b0 = rows 16*s + 2*t + {0, 1},   b1 = rows 16*s + 8 + 2*t + {0, 1}
// i.e. 16 "pairs" (two codes of one column, consecutive rows) = 32 codes = b words.
//
// Lane words: for one chunk and one column block, lane l's b words hold exactly those 32
// codes, and the 32 lanes' words are stored lane-major (word lane * b + i, i = 0 .. b-1), so a
// warp reads 128*b contiguous bytes and a lane its b words with vector loads where alignment
// allows. Where these blocks are stored is the stream layout below. The same bytes as the
// canonical layout, except short chunks (padded to 32 rows with the code z, i.e. weight 0)
// and the column padding (code 0, scale 0).
//
// Within a lane's b words the 32 codes form a little-endian b-bit stream of 32 "virtual
// rows". Pair p (p = 4*jj + 2*s + h, h = 0 for b0, 1 for b1) sits at virtual rows
// (pair_lo(b, p), pair_hi(b, p)), chosen so that extraction is cheap:
//   b = 2, 4, 8: both codes of a pair lie in one word, 16 bits apart, so one shift and
//                one mask put them in the low bits of the two halves of a half2
//                (then the magic-1024 trick makes fp16 1024 + q);
//   b = 3, 5, 6: consecutive virtual rows 2p, 2p + 1 (codes may straddle words).
// For b = 4, word jj holds exactly n8 tile jj's eight codes.
//
// Stream layout (what is stored). Columns are cut into tiles of kTileCols = 128 (four
// 32-column blocks, one per warp of the kernel's block). Each tile's data is one contiguous
// stream of 512-byte units (kUnitWords = 128 words), in K order:
//   for every group: one header unit (per column: fp16 scale bits | (fp16 1024 + zero) << 16,
//                    at header_word(column in tile)), then
//                    for every chunk of the group: b units = the four blocks' lane words
//                    above, block w at word w*32*b + lane*b + i of the chunk.
// So a block of the kernel streams one contiguous byte range per tile and K range, with the
// scales and zeros it needs arriving in the same stream just before the group's codes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EXL2_TC_HD __host__ __device__ __forceinline__
#else
#define EXL2_TC_HD inline
#endif

namespace exl2::detail::tc {

constexpr int kBlockCols = 32;  // output columns per warp (four mma n8 tiles)
constexpr int kPairs = 16;      // half2 B-fragment registers per lane and chunk

constexpr int kTileBlocks = 4;                          // 32-column blocks per tile
constexpr int kTileCols = kTileBlocks * kBlockCols;     // 128
constexpr int kUnitWords = kTileCols;                   // 32 rows x 128 columns x 1 bit

/// Header word (0..127) of tile column cc: lane g of warp w reads its four columns
/// 32*w + 8*jj + g (jj = 0..3) as the four words at 32*w + 4*g (one 16-byte load).
EXL2_TC_HD constexpr int header_word(int cc) { return (cc / 32) * 32 + (cc % 8) * 4 + (cc % 32) / 8; }

/// Unit placement of the stream layout for n chunks in K order (chunk c: group group[c], b =
/// bits[c]): its codes at units unit0[c] .. unit0[c] + b - 1, its group's header at header[c].
/// A group's header unit comes right before the group's first chunk, so "chunk c starts its
/// group" is exactly unit0[c] == header[c] + 1 (the kernel relies on it). Returns the stream
/// length in units, or -1 when the groups are not in non-decreasing order.
inline std::int64_t place_units(int n, const int* group, const int* bits, std::int64_t* unit0,
                                std::int64_t* header) {
  std::int64_t u = 0, h = -1;
  for (int c = 0; c < n; ++c) {
    if (c == 0 || group[c] != group[c - 1]) {
      if (c > 0 && group[c] < group[c - 1]) return -1;
      h = u++;
    }
    header[c] = h;
    unit0[c] = u;
    u += bits[c];
  }
  return u;
}

/// Header value of a column: fp16 scale bits, and fp16 (1024 + zero) for the exact q - z.
EXL2_TC_HD constexpr std::uint32_t header_value(std::uint16_t scale_bits, std::uint32_t zero) {
  return scale_bits | ((0x6400u + zero) << 16);
}

EXL2_TC_HD constexpr bool pow2_bits(int b) { return b == 2 || b == 4 || b == 8; }

/// Virtual row (position in the lane's code stream) of the low / high code of pair p.
EXL2_TC_HD constexpr int pair_lo(int b, int p) {
  return pow2_bits(b) ? (p / (16 / b)) * (32 / b) + p % (16 / b) : 2 * p;
}
EXL2_TC_HD constexpr int pair_hi(int b, int p) { return pow2_bits(b) ? pair_lo(b, p) + 16 / b : 2 * p + 1; }

/// Chunk row of the low code of pair p for lane quad index t (lane = 4*g + t); the high
/// code is the next row. Column within the 32-column block: 8 * (p / 4) + g.
EXL2_TC_HD constexpr int pair_row(int p, int t) { return 16 * ((p / 2) % 2) + 8 * (p % 2) + 2 * t; }
EXL2_TC_HD constexpr int pair_col(int p, int g) { return 8 * (p / 4) + g; }

/// Code at virtual row v of a b-bit little-endian stream held in words w[0 .. b-1].
template <int B>
EXL2_TC_HD std::uint32_t stream_code(const std::uint32_t* w, int v) {
  const int bit = v * B;
  const int lo = bit >> 5, sh = bit & 31;
  std::uint32_t val = w[lo] >> sh;
  if (sh + B > 32) val |= w[lo + 1] << (32 - sh);
  return val & ((1u << B) - 1u);
}

/// Pair p of a lane's words: low code in bits 0..15, high code in bits 16..31.
template <int B>
EXL2_TC_HD std::uint32_t extract_pair(const std::uint32_t* w, int p) {
  if constexpr (pow2_bits(B)) {
    constexpr int kHalf = 16 / B;  // pairs per word
    constexpr std::uint32_t kMask = ((1u << B) - 1u) * 0x00010001u;
    return (w[p / kHalf] >> ((p % kHalf) * B)) & kMask;
  } else {
    return stream_code<B>(w, 2 * p) | (stream_code<B>(w, 2 * p + 1) << 16);
  }
}

/// Builds lane (g, t)'s B words from code(row, col) (row 0..31 of the chunk, col 0..31 of
/// the block). `code` must return values below 2^B.
template <int B, class CodeFn>
EXL2_TC_HD void pack_lane(int g, int t, CodeFn&& code, std::uint32_t* w) {
  for (int i = 0; i < B; ++i) w[i] = 0;
  for (int p = 0; p < kPairs; ++p) {
    const int row = pair_row(p, t), col = pair_col(p, g);
    const int v[2] = {pair_lo(B, p), pair_hi(B, p)};
    for (int e = 0; e < 2; ++e) {
      const std::uint32_t q = code(row + e, col);
      const int bit = v[e] * B;
      const int lo = bit >> 5, sh = bit & 31;
      w[lo] |= q << sh;
      if (sh + B > 32) w[lo + 1] |= q >> (32 - sh);
    }
  }
}

}  // namespace exl2::detail::tc
