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
// Within a lane's b words, pair p (p = 4*jj + 2*s + h, h = 0 for b0, 1 for b1) is placed
// (code_bit) so that extraction is cheap: each 16-bit half of a word holds n = 16 / b codes
// at offsets 0, b, .., (n - 1) b, and "main" pair p < b * n sits in word p / n at offset
// (p % n) * b of both halves (low code in the low half, high code 16 bits up), so one shift
// and one mask put the pair in the low bits of the two halves of a half2 (then the
// magic-1024 trick makes fp16 1024 + q). b = 2, 4, 8 have only main pairs (for b = 4, word jj
// holds exactly n8 tile jj's eight codes). b = 3, 5, 6 leave s = 16 - n b spare bits at the
// top of every half (1, 1, 4): the remaining 16 - b n pairs (1, 1, 4) are stored in them, the
// spare bits of words 0 .. b-1 read as one little-endian stream per half (a few shifts and
// masks per pair; before this layout, 3/5/6-bit codes formed one b-bit stream across the
// words and every code could straddle two words).
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

#include <cstddef>
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

/// Steps of lookahead for a kernel ring of `ring_steps` steps of `step_units` units whose
/// iterations consume q consecutive chunks (placed by place_units). A kernel refills the ring
/// only after the barrier that ends the previous iteration, up to `ahead` steps past the last
/// step the current iteration reads; step p overwrites step p - ring_steps, so the iteration's
/// data (from its first chunk's header unit when that chunk starts a group, else its first code
/// unit, to its last chunk's last unit) must span at most ring_steps - ahead steps. A span of
/// u units covers at most (u + step_units - 2) / step_units + 1 steps (it may start on a step's
/// last unit: blocks of a split start anywhere). Returns the largest safe `ahead` over every
/// window of q chunks: 2 for 8-bit codes (4 chunks of 8 units and 4 headers), 5 for 4-bit codes
/// in groups of 128 rows (17 units).
inline int ring_lookahead(int n, const std::int64_t* unit0, const std::int64_t* header, const int* bits, int q,
                          int ring_steps, int step_units) {
  std::int64_t span_units = 0;
  for (int c = 0; c < n; ++c) {
    const int last = c + q - 1 < n ? c + q - 1 : n - 1;
    const std::int64_t begin = unit0[c] == header[c] + 1 ? header[c] : unit0[c];
    const std::int64_t end = unit0[last] + bits[last];
    if (end - begin > span_units) span_units = end - begin;
  }
  const std::int64_t span_steps = (span_units + step_units - 2) / step_units + 1;
  return static_cast<int>(ring_steps - span_steps);
}

/// Flags in bits 16 and up of a tc chunk descriptor's `z` (bits | rows << 8 below them):
/// chunks c .. c + q - 1 all exist and share chunk c's bit width, for the kernel's iterations of
/// q = 4 (MT = 1, 2) and q = 2 (MT = 4) chunks, which then run unrolled for that width without
/// comparing the q widths themselves.
EXL2_TC_HD constexpr int uniform_flag_bit(int q) { return q == 4 ? 16 : 17; }
inline int uniform_flags(int n, const int* bits, int c) {
  int flags = 0;
  for (int q : {2, 4}) {
    bool same = c + q <= n;
    for (int k = 1; same && k < q; ++k) same = bits[c + k] == bits[c];
    if (same) flags |= 1 << uniform_flag_bit(q);
  }
  return flags;
}

/// Bit 18 of a descriptor's z: chunks c .. c + 3 all exist and belong to chunk c's group (so they
/// share its width and uniform_flag_bit(4) is set too), for the iterations of 4 chunks (tc_gemm.cu's
/// 8-row transposed and 16- / 32-row tiles, tc_wgmma.cu). Such an iteration reads at most one group header,
/// chunk c's, and its chunks' codes are the consecutive units unit0[c] + q b (q = 0..3:
/// place_units puts no header unit between the chunks of one group), so the kernel derives every
/// chunk's lane word from chunk c's instead of reading four descriptors and checking four group
/// changes. Set for whole groups of 128 rows at iterations aligned to them (and inside groups of
/// 256 or more), never for groups of 32 or 64 rows.
EXL2_TC_HD constexpr int one_group_flag_bit() { return 18; }
inline int one_group_flag(int n, const int* group, int c) {
  constexpr int q = 4;
  if (c + q > n) return 0;
  for (int k = 1; k < q; ++k)
    if (group[c + k] != group[c]) return 0;
  return 1 << one_group_flag_bit();
}

/// Whether the codes of `chunks` consecutive chunks of b bits (consecutive units of the stream,
/// as one_group_flag's chunks are), the first of them `unit_offset` units past the stream unit at
/// ring word 0, lie below the end of a ring of `ring_words` words (a power of two, a multiple of
/// kUnitWords): then no word of any lane's codes of them wraps to the ring's start, and the
/// kernels read them without masking each index (tc_device.cuh, one_group_wrap_free).
EXL2_TC_HD constexpr bool codes_below_ring_end(std::int64_t unit_offset, int b, int chunks, int ring_words) {
  const int base = static_cast<int>((unit_offset * kUnitWords) & (ring_words - 1));
  return base + chunks * b * kUnitWords <= ring_words;
}

/// Header value of a column: fp16 scale bits, and fp16 (1024 + zero) for the exact q - z.
EXL2_TC_HD constexpr std::uint32_t header_value(std::uint16_t scale_bits, std::uint32_t zero) {
  return scale_bits | ((0x6400u + zero) << 16);
}

EXL2_TC_HD constexpr bool pow2_bits(int b) { return b == 2 || b == 4 || b == 8; }

/// Codes per 16-bit half of a lane word, pairs stored whole in one word, spare bits per half.
EXL2_TC_HD constexpr int half_codes(int b) { return 16 / b; }
EXL2_TC_HD constexpr int main_pairs(int b) { return b * half_codes(b) < kPairs ? b * half_codes(b) : kPairs; }
EXL2_TC_HD constexpr int spare_bits(int b) { return 16 - b * half_codes(b); }

/// Position (32 * word + bit) in the lane's b words of bit k of code e (0: low, 1: high) of
/// pair p: main pairs at (word p / n, offset (p % n) b) of half e; the others in the spare
/// bits, bit j b + k of the stream of the halves' spare bits (s per word, words in order).
EXL2_TC_HD constexpr int code_bit(int b, int p, int e, int k) {
  const int n = half_codes(b);
  if (p < main_pairs(b)) return 32 * (p / n) + 16 * e + (p % n) * b + k;
  const int s = spare_bits(b), sb = (p - main_pairs(b)) * b + k;
  return 32 * (sb / s) + 16 * e + n * b + sb % s;
}

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

/// Pair p of a lane's words: low code in bits 0..15, high code in bits 16..31 (the
/// reference extraction, bit by bit; the kernel's pair_with_magic is the fast equivalent).
template <int B>
EXL2_TC_HD std::uint32_t extract_pair(const std::uint32_t* w, int p) {
  std::uint32_t r = 0;
  for (int e = 0; e < 2; ++e)
    for (int k = 0; k < B; ++k) {
      const int cb = code_bit(B, p, e, k);
      r |= ((w[cb >> 5] >> (cb & 31)) & 1u) << (16 * e + k);
    }
  return r;
}

/// Mask of a b-bit code in both halves of a word.
EXL2_TC_HD constexpr std::uint32_t pair_mask(int b) { return ((1u << b) - 1u) * 0x00010001u; }

/// Main pair P (P < main_pairs(B)) of a lane's words shifted to bit 0 of both halves; the
/// bits above the codes are not cleared (the kernel masks them in the lop3 that adds the
/// magic exponent, the host test with pair_mask).
template <int B, int P, std::size_t kWords>
EXL2_TC_HD constexpr std::uint32_t main_pair_shifted(const std::uint32_t (&w)[kWords]) {
  static_assert(P < main_pairs(B), "not a main pair");
  return w[P / half_codes(B)] >> ((P % half_codes(B)) * B);
}

/// b <= 5, main pair P (word P / n, offset j b with j = P % n, n = 16 / b codes per half) as the
/// kernel extracts it with one shift per two pairs: from w >> 2 b (j / 2), the code itself for
/// even j (mask at bit 0) and 2^b times the code for odd j (mask at bit b; pair_times_k). Both
/// fit the 10 mantissa bits of fp16 1024 (2 b <= 10), so the magic-1024 trick gives 1024 + q or
/// 1024 + 2^b q, both exact. Wider codes (6, 8 bits) are shifted down (main_pair_shifted).
EXL2_TC_HD constexpr bool pair_scaled_layout(int b) { return b <= 5; }
EXL2_TC_HD constexpr bool pair_times_k(int b, int p) {
  return pair_scaled_layout(b) && p < main_pairs(b) && (p % half_codes(b)) % 2 == 1;
}
/// The shifted word of main_pair_scaled (the kernel masks it in the lop3 that adds the magic).
template <int B, int P, std::size_t kWords>
EXL2_TC_HD constexpr std::uint32_t main_pair_scaled_word(const std::uint32_t (&w)[kWords]) {
  static_assert(pair_scaled_layout(B) && P < main_pairs(B), "a main pair of b <= 5");
  return w[P / half_codes(B)] >> (2 * B * ((P % half_codes(B)) / 2));
}
template <int B, int P>
EXL2_TC_HD constexpr std::uint32_t main_pair_scaled_mask() {
  return pair_mask(B) << (B * ((P % half_codes(B)) % 2));
}
template <int B, int P, std::size_t kWords>
EXL2_TC_HD constexpr std::uint32_t main_pair_scaled(const std::uint32_t (&w)[kWords]) {
  return main_pair_scaled_word<B, P>(w) & main_pair_scaled_mask<B, P>();
}

/// Bits [kLo, kLo + kLen) of both halves of `v`, moved to bit kTo of each half.
template <int kLo, int kLen, int kTo>
EXL2_TC_HD constexpr std::uint32_t half_bits(std::uint32_t v) {
  constexpr std::uint32_t kMask = (((1u << kLen) - 1u) * 0x00010001u) << kTo;
  if constexpr (kLo >= kTo)
    return (v >> (kLo - kTo)) & kMask;
  else
    return (v << (kTo - kLo)) & kMask;
}

/// Code bits kK0 .. B-1 of both codes of spare pair J (pair main_pairs(B) + J; b = 3, 5, 6), at
/// bits kK0.. of the two halves: segment by segment, the bits one word contributes each (one
/// shift and one mask), as the kernel extracts them; equal to extract_pair (host-tested).
template <int B, int J, int kK0 = 0, std::size_t kWords>
EXL2_TC_HD std::uint32_t spare_pair(const std::uint32_t (&w)[kWords]) {
  if constexpr (kK0 >= B) {
    return 0u;
  } else {
    constexpr int kS = spare_bits(B), kN = half_codes(B);
    constexpr int kSb = J * B + kK0;  // bit of the spare stream
    constexpr int kWord = kSb / kS, kOff = kSb % kS;
    constexpr int kLen = (kS - kOff) < (B - kK0) ? (kS - kOff) : (B - kK0);  // bits from this word
    static_assert(kWord < static_cast<int>(kWords), "spare bits past the lane's words");
    return half_bits<kN * B + kOff, kLen, kK0>(w[kWord]) | spare_pair<B, J, kK0 + kLen>(w);
  }
}

/// Builds lane (g, t)'s B words from code(row, col) (row 0..31 of the chunk, col 0..31 of
/// the block). `code` must return values below 2^B.
template <int B, class CodeFn>
EXL2_TC_HD void pack_lane(int g, int t, CodeFn&& code, std::uint32_t* w) {
  for (int i = 0; i < B; ++i) w[i] = 0;
  for (int p = 0; p < kPairs; ++p) {
    const int row = pair_row(p, t), col = pair_col(p, g);
    for (int e = 0; e < 2; ++e) {
      const std::uint32_t q = code(row + e, col);
      for (int k = 0; k < B; ++k) {
        const int cb = code_bit(B, p, e, k);
        w[cb >> 5] |= ((q >> k) & 1u) << (cb & 31);
      }
    }
  }
}

}  // namespace exl2::detail::tc
