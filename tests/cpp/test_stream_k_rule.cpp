// Tests of the stream-K partition of the wgmma kernel (src/cuda/stream_k_rule.hpp) on the host:
// for every small layer (tiles x chunks per tile) and block count it simulates the kernel's
// blocks (segments, partial tiles in two slots per block, one counter per tile) and checks that
// block_of matches its definition, that only a block's first and last segments are parts of a
// tile and each takes its own slot, that the parts of a tile come from first_block ..
// last_block, and that in every arrival order exactly one block finds itself last and reads the
// tile's chunks back complete and in order. Needs no GPU and no CUDA toolkit.
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/stream_k_rule.hpp"

namespace sk = exl2::detail::stream_k;

static int g_failures = 0;

static void check(bool ok, const char* what, int tiles, int nc, int P, int extra) {
  if (!ok && g_failures < 20) std::fprintf(stderr, "%s (tiles %d, nc %d, P %d, %d)\n", what, tiles, nc, P, extra);
  if (!ok) ++g_failures;
}

struct Part {
  int block, slot;
  std::vector<int> chunks;  // the tile's chunks this part summed, in order
};

static void simulate(int tiles, int nc, int P, std::mt19937& rng) {
  const int total = tiles * nc;
  for (int p = 0; p < P; ++p)
    check(sk::begin(total, P, p) < sk::begin(total, P, p + 1), "empty range", tiles, nc, P, p);
  for (int x = 0; x < total; ++x) {
    int want = 0;
    while (want + 1 < P && sk::begin(total, P, want + 1) <= x) ++want;
    check(sk::block_of(total, P, x) == want, "block_of", tiles, nc, P, x);
  }
  // The kernel's segment loop: per block, its parts (whole tiles are stored by the block itself).
  std::vector<std::vector<Part>> parts(tiles);
  std::vector<int> whole_by(tiles, -1);
  for (int p = 0; p < P; ++p) {
    const int pos0 = sk::begin(total, P, p), pos1 = sk::begin(total, P, p + 1);
    bool used[2] = {false, false};
    for (int pos = pos0; pos < pos1;) {
      const sk::Segment sg = sk::segment(pos, pos1, nc);
      const int tile = sg.tile, cb = sg.cb, ce = sg.ce;
      check(cb < ce && ce <= nc && pos + (ce - cb) <= pos1 && (ce == nc || pos + (ce - cb) == pos1), "segment",
            tiles, nc, P, pos);
      if (cb == 0 && ce == nc) {
        check(whole_by[tile] < 0 && parts[tile].empty(), "tile stored twice", tiles, nc, P, tile);
        whole_by[tile] = p;
      } else {
        const int slot = pos == pos0 ? 0 : 1;
        check(pos == pos0 || pos + (ce - cb) == pos1, "a middle segment is a part", tiles, nc, P, p);
        check(!used[slot], "slot used twice", tiles, nc, P, p);
        check(sk::slot(total, P, nc, p, tile) == slot, "slot rule", tiles, nc, P, p);
        used[slot] = true;
        Part part{p, slot, {}};
        for (int c = cb; c < ce; ++c) part.chunks.push_back(c);
        parts[tile].push_back(part);
      }
      pos += ce - cb;
    }
  }
  for (int t = 0; t < tiles; ++t) {
    const int pa = sk::first_block(total, P, nc, t), pb = sk::last_block(total, P, nc, t);
    if (whole_by[t] >= 0) {
      check(pa == pb && pa == whole_by[t], "whole tile's blocks", tiles, nc, P, t);
      continue;
    }
    check(static_cast<int>(parts[t].size()) == pb - pa + 1, "parts of a tile", tiles, nc, P, t);
    for (int i = 0; i < static_cast<int>(parts[t].size()); ++i)
      check(parts[t][i].block == pa + i, "part's block", tiles, nc, P, t);
    // Arrival orders: the counter counts the parts added before; the block that sees pb - pa adds
    // the parts of blocks pa .. pb from their slots (sk::slot) in block order.
    std::vector<int> order(parts[t].size());
    for (int i = 0; i < static_cast<int>(order.size()); ++i) order[i] = i;
    for (int trial = 0; trial < 4; ++trial) {
      std::shuffle(order.begin(), order.end(), rng);
      int counter = 0, lasts = 0;
      for (int i : order) {
        if (counter++ != pb - pa) continue;
        ++lasts;
        std::vector<int> sum;
        for (int q = pa; q <= pb; ++q) {
          const int s = sk::slot(total, P, nc, q, t);
          const Part& part = parts[t][q - pa];
          check(part.slot == s, "reader's slot", tiles, nc, P, q);
          sum.insert(sum.end(), part.chunks.begin(), part.chunks.end());
        }
        bool complete = static_cast<int>(sum.size()) == nc;
        for (int c = 0; complete && c < nc; ++c) complete = sum[c] == c;
        check(complete, "tile's chunks", tiles, nc, P, parts[t][i].block);
      }
      check(lasts == 1, "one last block", tiles, nc, P, t);
    }
  }
}

int main() {
  std::mt19937 rng(1);
  for (int nc : {1, 2, 3, 5, 8, 13})
    for (int tiles = 1; tiles <= 12; ++tiles)
      for (int P = 1; P <= tiles * nc && P <= 60; ++P) simulate(tiles, nc, P, rng);
  // The bench layer's launch on an H100: 8192 x 28672 (224 tiles of 256 chunks), 3 x 132 blocks.
  simulate(224, 256, 396, rng);
  if (g_failures != 0) {
    std::fprintf(stderr, "%d failures\n", g_failures);
    return 1;
  }
  std::printf("stream-k rule: ok\n");
  return 0;
}
