// Internal: how the wgmma kernel's stream-K blocks share a layer's chunks (tc_wgmma.cu), in
// plain C++ for host and device, so that host tests can check the partition, the partial-tile
// slots and the "last block adds the tile" rule (tests/cpp/test_stream_k_rule.cpp).
//
// The positions are the column tiles' chunks in order, tile by tile: position x is chunk x % nc of
// tile x / nc (nc = chunks per tile), `total` = tiles x nc of them. Block p of P runs the
// positions [begin(p), begin(p + 1)), begin(p) = floor(total p / P), one segment per tile it
// touches. Only a block's first and last segments can be parts of a tile (the segments between
// them cover whole tiles, which the block stores itself); a part goes to the block's slot 0 (its
// first segment) or 1 (its last), so each block needs two partial tiles of scratch. A tile's
// parts come from the blocks first_block(t) .. last_block(t), in chunk order; the block that
// brings the tile's counter to last_block(t) - first_block(t) (the counter counts the parts
// added before) adds them in that order, whatever order they arrived in: deterministic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EXL2_SK_HD __host__ __device__ __forceinline__
#else
#define EXL2_SK_HD inline
#endif

namespace exl2::detail::stream_k {

/// The first position of block p of P (p = P: total, the end of the last block's range).
EXL2_SK_HD constexpr int begin(int total, int P, int p) {
  return static_cast<int>(static_cast<std::int64_t>(total) * p / P);
}

/// The block whose range holds position x (0 <= x < total): the largest q with begin(q) <= x,
/// i.e. ceil((x + 1) P / total) - 1. Every range is non-empty when P <= total.
EXL2_SK_HD constexpr int block_of(int total, int P, int x) {
  return static_cast<int>(((static_cast<std::int64_t>(x) + 1) * P + total - 1) / total - 1);
}

/// The segment of a block's range [pos, pos1) that starts at pos: chunks cb .. ce - 1 of `tile`.
struct Segment {
  int tile, cb, ce;
};
EXL2_SK_HD constexpr Segment segment(int pos, int pos1, int nc) {
  const int tile = pos / nc, cb = pos - tile * nc;
  return Segment{tile, cb, pos1 - pos < nc - cb ? cb + (pos1 - pos) : nc};
}

/// The first and the last block with a part of tile t (nc chunks per tile).
EXL2_SK_HD constexpr int first_block(int total, int P, int nc, int t) { return block_of(total, P, t * nc); }
EXL2_SK_HD constexpr int last_block(int total, int P, int nc, int t) { return block_of(total, P, t * nc + nc - 1); }

/// The slot in which block q keeps its part of tile t: 0 when that part is q's first segment
/// (q's range starts in tile t), else 1 (its last).
EXL2_SK_HD constexpr int slot(int total, int P, int nc, int q, int t) { return begin(total, P, q) / nc == t ? 0 : 1; }

}  // namespace exl2::detail::stream_k
