// Tests of the tensor-core weight layout (src/cuda/tc_layout.hpp) on the host, with the
// functions the CUDA kernels use: for every bit width, packing a chunk's codes into the
// lanes' words and extracting the 16 pairs of every lane gives exactly the codes that
// the mma.m16n8k16 B fragment of that lane must hold (rows 16s + 8h + 2t + {0, 1},
// column 8jj + g), and the header unit and unit placement of the stream layout. Needs no GPU and no CUDA toolkit.
#include <cstdint>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "cuda/tc_layout.hpp"

namespace tc = exl2::detail::tc;

static int g_failures = 0;

// The kernel's extraction (tc_gemm.cu, pair_with_magic without the magic): main pairs of
// b <= 5 tc::main_pair_scaled (2^b q for tc::pair_times_k pairs, scaled back here), other main pairs
// tc::main_pair_shifted and the mask, spare pairs tc::spare_pair (P is a template argument
// there: dispatched here over every pair index).
template <int B, int P>
static std::uint32_t fast_pair_at(const std::uint32_t (&w)[B]) {
  if constexpr (tc::pair_scaled_layout(B) && P < tc::main_pairs(B))
    return tc::main_pair_scaled<B, P>(w) >> (tc::pair_times_k(B, P) ? B : 0);
  else if constexpr (P < tc::main_pairs(B))
    return tc::main_pair_shifted<B, P>(w) & tc::pair_mask(B);
  else
    return tc::spare_pair<B, P - tc::main_pairs(B)>(w);
}

template <int B, int... Ps>
static std::uint32_t fast_pair(const std::uint32_t (&w)[B], int p, std::integer_sequence<int, Ps...>) {
  std::uint32_t r = 0;
  ((p == Ps ? (r = fast_pair_at<B, Ps>(w), 0) : 0), ...);
  return r;
}

template <int B>
static void check_width(std::mt19937& rng) {
  std::uint32_t codes[32][32];  // [row][col] of one chunk x column block
  for (int trial = 0; trial < 20; ++trial) {
    for (auto& row : codes)
      for (auto& c : row) c = rng() & ((1u << B) - 1u);
    bool seen[32][32] = {};
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      std::uint32_t w[B];
      tc::pack_lane<B>(g, t, [&](int r, int c) { return codes[r][c]; }, w);
      for (int p = 0; p < tc::kPairs; ++p) {
        // The fragment element this pair feeds: p = 4*jj + 2*s + h.
        const int jj = p / 4, s = (p / 2) % 2, h = p % 2;
        const int row = 16 * s + 8 * h + 2 * t, col = 8 * jj + g;
        if (tc::pair_row(p, t) != row || tc::pair_col(p, g) != col) {
          std::fprintf(stderr, "B=%d lane %d pair %d: wrong fragment position\n", B, lane, p);
          ++g_failures;
        }
        const std::uint32_t packed = tc::extract_pair<B>(w, p);
        if (fast_pair<B>(w, p, std::make_integer_sequence<int, tc::kPairs>{}) != packed) {
          std::fprintf(stderr, "B=%d lane %d pair %d: the kernel's extraction differs\n", B, lane, p);
          ++g_failures;
        }
        const std::uint32_t lo = packed & 0xffffu, hi = packed >> 16;
        if (lo != codes[row][col] || hi != codes[row + 1][col]) {
          std::fprintf(stderr, "B=%d lane %d pair %d: got (%u, %u), want (%u, %u)\n", B, lane, p, lo, hi,
                       codes[row][col], codes[row + 1][col]);
          ++g_failures;
        }
        seen[row][col] = seen[row + 1][col] = true;
      }
    }
    // The 32 lanes together cover the whole 32 x 32 tile exactly once per element.
    for (int r = 0; r < 32; ++r)
      for (int c = 0; c < 32; ++c)
        if (!seen[r][c]) {
          std::fprintf(stderr, "B=%d: element (%d, %d) not covered\n", B, r, c);
          ++g_failures;
          return;
        }
  }
  // The code bits of the 32 codes are a permutation of the lane's 32 * B bits (no two codes
  // share bits, no bit is left out).
  std::vector<bool> used(32 * B, false);
  for (int p = 0; p < tc::kPairs; ++p)
    for (int e = 0; e < 2; ++e)
      for (int k = 0; k < B; ++k) {
        const int cb = tc::code_bit(B, p, e, k);
        if (cb < 0 || cb >= 32 * B || used[cb]) {
          std::fprintf(stderr, "B=%d: pair %d code %d bit %d at %d: reused or out of range\n", B, p, e, k, cb);
          ++g_failures;
        } else {
          used[cb] = true;
        }
      }
  // Main pairs: both codes in one word, 16 bits apart (what the kernel's one-shift extraction
  // relies on); b = 2, 4, 8 have no other pairs.
  for (int p = 0; p < tc::main_pairs(B); ++p)
    for (int k = 0; k < B; ++k)
      if (tc::code_bit(B, p, 1, k) != tc::code_bit(B, p, 0, k) + 16 || tc::code_bit(B, p, 0, k) / 32 !=
                                                                          tc::code_bit(B, p, 0, 0) / 32) {
        std::fprintf(stderr, "B=%d: main pair %d is not one word's two halves\n", B, p);
        ++g_failures;
      }
  if (tc::pow2_bits(B) && tc::main_pairs(B) != tc::kPairs) {
    std::fprintf(stderr, "B=%d: expected only main pairs\n", B);
    ++g_failures;
  }
}

// The header unit: header_word is a bijection of the 128 tile columns, and the four words
// lane g of warp w reads with one 16-byte load (32*w + 4*g + jj) are its columns
// 32*w + 8*jj + g, jj = 0..3 (the columns of its B fragments).
static void check_header() {
  bool used[tc::kUnitWords] = {};
  for (int cc = 0; cc < tc::kTileCols; ++cc) {
    const int w = tc::header_word(cc);
    if (w < 0 || w >= tc::kUnitWords || used[w]) {
      std::fprintf(stderr, "header word %d of column %d reused or out of range\n", w, cc);
      ++g_failures;
      continue;
    }
    used[w] = true;
  }
  for (int warp = 0; warp < tc::kTileBlocks; ++warp)
    for (int g = 0; g < 8; ++g)
      for (int jj = 0; jj < 4; ++jj)
        if (tc::header_word(32 * warp + 8 * jj + g) != 32 * warp + 4 * g + jj) {
          std::fprintf(stderr, "header: warp %d lane group %d column block %d misplaced\n", warp, g, jj);
          ++g_failures;
        }
  if (tc::header_value(0x3c00, 5) != (0x3c00u | (0x6405u << 16))) {
    std::fprintf(stderr, "header_value packs the wrong bits\n");
    ++g_failures;
  }
}

// Stream unit placement: codes and headers tile [0, units) without overlap, one header per
// group right before its first chunk, and unit0 == header + 1 exactly for a group's first
// chunk (what the kernel uses to tell whether its first chunk's header is in its stream).
static void check_place_units(std::mt19937& rng) {
  const int widths[6] = {2, 3, 4, 5, 6, 8};
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 40);
    std::vector<int> group(n), bits(n);
    int g = 0;
    for (int c = 0; c < n; ++c) {
      if (c > 0 && rng() % 3 == 0) g += 1 + static_cast<int>(rng() % 2);  // gaps: groups without rows
      group[c] = g;
      bits[c] = widths[rng() % 6];  // one width per chunk (also within a group: a stronger test)
    }
    std::vector<std::int64_t> unit0(n), header(n);
    const std::int64_t units = tc::place_units(n, group.data(), bits.data(), unit0.data(), header.data());
    std::vector<int> owner(units > 0 ? static_cast<std::size_t>(units) : 0, 0);
    std::int64_t groups = 0, code_units = 0;
    for (int c = 0; c < n; ++c) {
      const bool first = c == 0 || group[c] != group[c - 1];
      groups += first ? 1 : 0;
      code_units += bits[c];
      if ((unit0[c] == header[c] + 1) != first || (!first && header[c] != header[c - 1])) {
        std::fprintf(stderr, "place_units: chunk %d header %lld unit0 %lld\n", c, static_cast<long long>(header[c]),
                     static_cast<long long>(unit0[c]));
        ++g_failures;
        return;
      }
      if (first) ++owner[static_cast<std::size_t>(header[c])];
      for (int i = 0; i < bits[c]; ++i) ++owner[static_cast<std::size_t>(unit0[c] + i)];
    }
    if (units != groups + code_units) {
      std::fprintf(stderr, "place_units: %lld units for %lld groups and %lld code units\n",
                   static_cast<long long>(units), static_cast<long long>(groups), static_cast<long long>(code_units));
      ++g_failures;
      return;
    }
    for (std::int64_t u = 0; u < units; ++u)
      if (owner[static_cast<std::size_t>(u)] != 1) {
        std::fprintf(stderr, "place_units: unit %lld used %d times\n", static_cast<long long>(u),
                     owner[static_cast<std::size_t>(u)]);
        ++g_failures;
        return;
      }
  }
  const int group[3] = {0, 2, 1}, bits[3] = {4, 4, 4};
  std::int64_t unit0[3], header[3];
  if (tc::place_units(3, group, bits, unit0, header) != -1) {
    std::fprintf(stderr, "place_units accepted groups out of order\n");
    ++g_failures;
  }
}

// Ring lookahead (tc::ring_lookahead): simulating every block start a split can give and every
// iteration of 4 chunks from it, the steps an iteration's data spans plus the lookahead never
// exceed the ring (8 steps of 8 units), so no refill overwrites data the iteration still reads;
// and the bound is the documented one for uniform layers.
static void check_ring_lookahead(std::mt19937& rng) {
  const int widths[6] = {2, 3, 4, 5, 6, 8};
  constexpr int kSteps = 8, kStepUnits = 8, kQ = 4;
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 48);
    const int rows_per_group = 1 << (rng() % 3);  // 1, 2 or 4 chunks per group
    const bool mixed = trial % 2 == 1;
    std::vector<int> group(n), bits(n);
    int b = widths[rng() % 6];
    for (int c = 0; c < n; ++c) {
      group[c] = c / rows_per_group;
      if (mixed && c % rows_per_group == 0) b = widths[rng() % 6];  // one width per group
      bits[c] = b;
    }
    std::vector<std::int64_t> unit0(n), header(n);
    tc::place_units(n, group.data(), bits.data(), unit0.data(), header.data());
    const int ahead = tc::ring_lookahead(n, unit0.data(), header.data(), bits.data(), kQ, kSteps, kStepUnits);
    if (ahead < 2) {
      std::fprintf(stderr, "ring_lookahead: %d steps (< 2) for a layer of %d chunks\n", ahead, n);
      ++g_failures;
      return;
    }
    for (int cb = 0; cb < n; ++cb) {
      auto begin = [&](int c) { return unit0[c] == header[c] + 1 ? header[c] : unit0[c]; };
      const std::int64_t s0 = begin(cb);
      for (int c0 = cb; c0 < n; c0 += kQ) {
        const int last = c0 + kQ - 1 < n ? c0 + kQ - 1 : n - 1;
        const std::int64_t first_step = (begin(c0) - s0) / kStepUnits;
        const std::int64_t last_step = (unit0[last] + bits[last] - 1 - s0) / kStepUnits;
        if (last_step - first_step + 1 + ahead > kSteps) {
          std::fprintf(stderr, "ring_lookahead: %d steps ahead overwrite chunk %d's data (block from chunk %d)\n", ahead,
                       c0, cb);
          ++g_failures;
          return;
        }
      }
    }
  }
  // 4-bit codes in groups of 4 chunks: 17 units per iteration; 8-bit codes, one chunk per group: 36.
  std::vector<int> group(16), bits4(16, 4), bits8(16, 8), group1(16);
  for (int c = 0; c < 16; ++c) group[c] = c / 4, group1[c] = c;
  std::vector<std::int64_t> unit0(16), header(16);
  tc::place_units(16, group.data(), bits4.data(), unit0.data(), header.data());
  const int a4 = tc::ring_lookahead(16, unit0.data(), header.data(), bits4.data(), kQ, kSteps, kStepUnits);
  tc::place_units(16, group1.data(), bits8.data(), unit0.data(), header.data());
  const int a8 = tc::ring_lookahead(16, unit0.data(), header.data(), bits8.data(), kQ, kSteps, kStepUnits);
  if (a4 != 5 || a8 != 2) {
    std::fprintf(stderr, "ring_lookahead: %d (4-bit, g128) and %d (8-bit, g32), expected 5 and 2\n", a4, a8);
    ++g_failures;
  }
}

// The uniform-iteration flags of the chunk descriptors: bit uniform_flag_bit(q) of chunk c is
// set exactly when chunks c .. c + q - 1 exist and all have chunk c's width, and the flags sit
// above the bits | rows << 8 fields.
static void check_uniform_flags(std::mt19937& rng) {
  const int widths[3] = {3, 4, 8};
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 12);
    std::vector<int> bits(n);
    for (int& b : bits) b = widths[rng() % (trial % 2 ? 3 : 1)];  // half the trials: one width
    for (int c = 0; c < n; ++c) {
      const int flags = tc::uniform_flags(n, bits.data(), c);
      if ((flags & 0xffff) != 0) {
        std::fprintf(stderr, "uniform_flags overlaps the bits / rows fields\n");
        ++g_failures;
        return;
      }
      for (int q : {2, 4}) {
        bool want = c + q <= n;
        for (int k = 0; want && k < q; ++k) want = bits[c + k] == bits[c];
        if (((flags >> tc::uniform_flag_bit(q)) & 1) != (want ? 1 : 0)) {
          std::fprintf(stderr, "uniform_flags: n %d chunk %d q %d wrong\n", n, c, q);
          ++g_failures;
          return;
        }
      }
    }
  }
}

// The one-group flag: bit one_group_flag_bit() of chunk c is set exactly when chunks c .. c + 3
// exist and all lie in chunk c's group; then their code units are consecutive (place_units: no
// header unit between them), as the kernels' one-group iterations assume, and the flag sits
// above the bits / rows fields and apart from the uniform flags.
static void check_one_group_flag(std::mt19937& rng) {
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 20);
    std::vector<int> group(n), bits(n);
    int gnum = 0;
    for (int c = 0; c < n; ++c) {
      if (c > 0 && rng() % (trial % 3 + 2) == 0) ++gnum;  // groups of 1 to many chunks
      group[c] = gnum;
      bits[c] = 2 + gnum % 3;
    }
    std::vector<std::int64_t> unit0(n), header(n);
    tc::place_units(n, group.data(), bits.data(), unit0.data(), header.data());
    for (int c = 0; c < n; ++c) {
      const int flag = tc::one_group_flag(n, group.data(), c);
      if ((flag & 0xffff) != 0 || (flag & tc::uniform_flags(n, bits.data(), c)) != 0) {
        std::fprintf(stderr, "one_group_flag overlaps the other fields\n");
        ++g_failures;
        return;
      }
      bool want = c + 4 <= n;
      for (int k = 1; want && k < 4; ++k) want = group[c + k] == group[c];
      if (((flag >> tc::one_group_flag_bit()) & 1) != (want ? 1 : 0)) {
        std::fprintf(stderr, "one_group_flag: n %d chunk %d wrong\n", n, c);
        ++g_failures;
        return;
      }
      if (want) {
        if (!((tc::uniform_flags(n, bits.data(), c) >> tc::uniform_flag_bit(4)) & 1)) {
          std::fprintf(stderr, "one_group_flag: chunk %d one group but not uniform\n", c);
          ++g_failures;
          return;
        }
        for (int k = 1; k < 4; ++k)
          if (unit0[c + k] != unit0[c] + k * bits[c] || header[c + k] != header[c]) {
            std::fprintf(stderr, "one_group_flag: chunk %d + %d not at unit0 + k b\n", c, k);
            ++g_failures;
            return;
          }
      }
    }
  }
}

/// codes_below_ring_end against every word the kernels read: chunk q of 4 (b bits) at units
/// unit_offset + q b, warp w's lane l's words at w 32 b + l b + i of its chunk (chunk_lane_word).
/// "Below the ring's end" must mean that no such word's index reaches the end (so reading it
/// unmasked is reading it masked), and it must not hold when one does.
static void check_codes_below_ring_end() {
  for (const int ring_words : {8192, 16384}) {
    for (const int b : {2, 3, 4, 5, 6, 8}) {
      for (std::int64_t unit_offset = -300; unit_offset < 300; ++unit_offset) {
        const std::int64_t base = (unit_offset * tc::kUnitWords) & (ring_words - 1);
        bool any_wraps = false;
        for (int q = 0; q < 4; ++q)
          for (int w = 0; w < tc::kTileBlocks; ++w)
            for (int lane = 0; lane < 32; ++lane)
              for (int i = 0; i < b; ++i)
                if (base + static_cast<std::int64_t>(q) * b * tc::kUnitWords + w * 32 * b + lane * b + i >= ring_words)
                  any_wraps = true;
        if (tc::codes_below_ring_end(unit_offset, b, 4, ring_words) == any_wraps) {
          std::fprintf(stderr, "codes_below_ring_end: ring %d b %d unit offset %lld: %d, a word wraps: %d\n",
                       ring_words, b, static_cast<long long>(unit_offset),
                       tc::codes_below_ring_end(unit_offset, b, 4, ring_words) ? 1 : 0, any_wraps ? 1 : 0);
          ++g_failures;
          return;
        }
      }
    }
  }
}

int main() {
  std::mt19937 rng(1234);
  check_codes_below_ring_end();
  check_header();
  check_place_units(rng);
  check_uniform_flags(rng);
  check_one_group_flag(rng);
  check_ring_lookahead(rng);
  check_width<2>(rng);
  check_width<3>(rng);
  check_width<4>(rng);
  check_width<5>(rng);
  check_width<6>(rng);
  check_width<8>(rng);
  if (g_failures == 0) std::printf("tc layout: all widths ok\n");
  return g_failures == 0 ? 0 : 1;
}
