"""Tests of the pure-numpy format reference against the golden vectors and
against independent, deliberately naive re-implementations of FORMAT.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file

from exl2 import reference as R

DATA = Path(__file__).parent / "data"
EXL2_TENSORS = ("q_weight", "q_groups", "q_scale", "q_scale_max", "q_invperm")
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def _load(name: str) -> dict[str, dict[str, np.ndarray]]:
    cases: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(DATA / f"golden_{name}.safetensors").items():
        case, tensor = key.split(".", 1)
        cases.setdefault(case, {})[tensor] = value
    return cases


GOLDEN_EXL2 = _load("exl2")
GOLDEN_GPTQ = _load("gptq")


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float16 and a.shape == b.shape and np.array_equal(
        a.view(np.uint16), b.view(np.uint16)
    )


# ---------------------------------------------------------------------------
# independent implementations (bit matrices, numpy float16 arithmetic)
# ---------------------------------------------------------------------------


def naive_pack_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """[rows, N] codes -> uint32 [words, N] via an explicit bit matrix, zero padded."""
    rows, n = codes.shape
    bitmat = (codes[:, None, :].astype(np.uint64) >> np.arange(bits, dtype=np.uint64)[None, :, None]) & 1
    stream = bitmat.reshape(rows * bits, n)
    pad = -len(stream) % 32
    stream = np.concatenate([stream, np.zeros((pad, n), np.uint64)]).reshape(-1, 32, n)
    return (stream << np.arange(32, dtype=np.uint64)[None, :, None]).sum(axis=1).astype(np.uint32)


def naive_pack_exl2_weight(codes: np.ndarray, groups: list[tuple[int, int]]) -> np.ndarray:
    out, r = [], 0
    for bits, rows in groups:
        out.append(naive_pack_stream(codes[r : r + rows], bits))
        r += rows
    return np.concatenate(out).view(np.int32)


def naive_dequant_exl2(codes, groups, scale_codes, q_scale_max, invperm) -> np.ndarray:
    """FORMAT.md formulas written with numpy float16 scalar-style arithmetic."""
    h = np.float16
    qsm = np.asarray(q_scale_max, h) / h(256)  # f16 / f16 -> f16, correctly rounded
    wp, r = [], 0
    for g, (bits, rows) in enumerate(groups):
        scale = ((scale_codes[g] + 1) ** 2).astype(h) * qsm[g]  # f16 * f16 -> f16
        wp.append((codes[r : r + rows] - 2 ** (bits - 1)).astype(h) * scale[None, :])
        r += rows
    return np.concatenate(wp)[np.asarray(invperm)]


def naive_dequant_gptq(codes, zeros, scales, g) -> np.ndarray:
    return np.asarray(scales, np.float16)[g] * (codes - zeros[g]).astype(np.float16)


# ---------------------------------------------------------------------------
# golden vectors
# ---------------------------------------------------------------------------


def test_golden_case_names():
    assert len(GOLDEN_EXL2) == 8 and len(GOLDEN_GPTQ) == 5
    for case in GOLDEN_EXL2.values():
        assert set(case) == {*EXL2_TENSORS, "weight", "x", "y_ref"}
    for case in GOLDEN_GPTQ.values():
        assert set(case) == {*GPTQ_TENSORS, "weight", "x", "y_ref"}


@pytest.mark.parametrize("name", sorted(GOLDEN_EXL2))
def test_golden_exl2_dequantize_bit_exact(name):
    c = GOLDEN_EXL2[name]
    w = R.dequantize_exl2(c["q_weight"], c["q_invperm"], c["q_scale"], c["q_scale_max"], c["q_groups"])
    assert bits_equal(w, c["weight"])
    # the servers' convention: q_scale_max already divided by 256 in float16
    qsm = (c["q_scale_max"] / np.float16(256)).astype(np.float16)
    w2 = R.dequantize_exl2(c["q_weight"], c["q_invperm"], c["q_scale"], qsm, c["q_groups"], prescaled=True)
    assert bits_equal(w2, c["weight"])


@pytest.mark.parametrize("name", sorted(GOLDEN_EXL2))
def test_golden_exl2_independent_and_round_trip(name):
    c = GOLDEN_EXL2[name]
    K = c["q_invperm"].size
    codes, row_bits = R.unpack_exl2_codes(c["q_weight"], c["q_groups"])
    bits, starts, rows = R.exl2_group_layout(c["q_groups"], c["q_weight"].shape[0], K)
    groups = list(zip(bits.tolist(), rows.tolist()))
    assert codes.shape == c["weight"].shape and rows.sum() == K
    assert np.array_equal(row_bits, np.repeat(bits, rows))
    assert np.all(codes < (1 << row_bits)[:, None])
    # independent packing of the unpacked codes gives the stored words back
    assert np.array_equal(naive_pack_exl2_weight(codes, groups), c["q_weight"])
    scale_codes = R.unpack_exl2_scale_codes(c["q_scale"])
    w = naive_dequant_exl2(codes, groups, scale_codes, c["q_scale_max"], c["q_invperm"])
    assert bits_equal(w, c["weight"])
    # pack(unpack(golden)) reproduces every stored tensor, dtype included
    packed = R.pack_exl2(codes, bits, rows, scale_codes, c["q_scale_max"], c["q_invperm"])
    for t in EXL2_TENSORS:
        assert packed[t].dtype == c[t].dtype and np.array_equal(packed[t], c[t]), t
    assert np.array_equal(packed["q_perm"], np.argsort(c["q_invperm"]))


@pytest.mark.parametrize("name", sorted(GOLDEN_GPTQ))
def test_golden_gptq_dequantize_bit_exact(name):
    c = GOLDEN_GPTQ[name]
    w = R.dequantize_gptq(c["qweight"], c["qzeros"], c["scales"], c["g_idx"])
    assert bits_equal(w, c["weight"])
    if np.all(np.diff(c["g_idx"]) >= 0):  # ordered g_idx: the same without it
        assert bits_equal(R.dequantize_gptq(c["qweight"], c["qzeros"], c["scales"]), c["weight"])
    # the v2 convention with the zeros re-stored as v2 gives the same weight
    zeros = R.unpack_gptq_zeros(c["qzeros"], "v1")
    codes = R.unpack_gptq_codes(c["qweight"])
    v2 = R.pack_gptq(codes, zeros, c["scales"], c["g_idx"], zero_format="v2")
    assert bits_equal(R.dequantize_gptq(v2["qweight"], v2["qzeros"], v2["scales"], v2["g_idx"], "v2"), c["weight"])
    assert bits_equal(naive_dequant_gptq(codes, zeros, c["scales"], c["g_idx"]), c["weight"])


@pytest.mark.parametrize("name", sorted(GOLDEN_GPTQ))
def test_golden_gptq_round_trip(name):
    c = GOLDEN_GPTQ[name]
    codes = R.unpack_gptq_codes(c["qweight"])
    zeros = R.unpack_gptq_zeros(c["qzeros"])
    packed = R.pack_gptq(codes, zeros, c["scales"], c["g_idx"])
    for t in GPTQ_TENSORS:
        assert packed[t].dtype == c[t].dtype and np.array_equal(packed[t], c[t]), t
    # nibble order, checked the slow way on a few words
    u = c["qweight"].view(np.uint32)
    for k in (0, 5, 7, 8, codes.shape[0] - 1):
        assert np.array_equal(codes[k], (u[k // 8] >> (4 * (k % 8))) & 15)


@pytest.mark.parametrize("name", sorted(GOLDEN_GPTQ))
def test_golden_gptq_act_order_perm(name):
    g_idx = GOLDEN_GPTQ[name]["g_idx"]
    G = GOLDEN_GPTQ[name]["scales"].shape[0]
    assert np.all(np.bincount(g_idx, minlength=G) == g_idx.size // G)
    perm = R.act_order_perm(g_idx)
    assert np.array_equal(g_idx[perm], np.repeat(np.arange(G), g_idx.size // G))
    for g in range(G):  # stable: rows of a group keep their order
        assert np.all(np.diff(perm[g_idx[perm] == g]) > 0)


@pytest.mark.parametrize("name", sorted(GOLDEN_EXL2) + sorted(GOLDEN_GPTQ))
def test_golden_gemm_matches_y_ref(name):
    c = GOLDEN_EXL2.get(name) or GOLDEN_GPTQ[name]
    y = R.gemm(c["x"], c["weight"])
    assert y.dtype == np.float64 and y.shape == c["y_ref"].shape
    np.testing.assert_allclose(y, c["y_ref"], rtol=1e-6, atol=1e-6 * np.abs(y).max())
    assert np.array_equal(y.astype(np.float32), c["y_ref"])  # y_ref is this, rounded to fp32


def test_exl2_group_map():
    c = GOLDEN_EXL2["exl2_mixed_all"]
    K, Q = c["q_invperm"].size, c["q_weight"].shape[0]
    gm = R.exl2_group_map(c["q_groups"], Q, K)
    _, _, rows = R.exl2_group_layout(c["q_groups"], Q, K)
    expected = [(g, rows[g] - j) for g in range(rows.size) for j in range(rows[g])]
    assert gm.dtype == np.int16 and np.array_equal(gm.reshape(-1, 2), expected)


# ---------------------------------------------------------------------------
# random layers
# ---------------------------------------------------------------------------


def check_exl2_pack(rng, N, groups, permute=True):
    """Pack random codes, then compare against the independent implementations."""
    K = sum(r for _, r in groups)
    row_bits = np.repeat([b for b, _ in groups], [r for _, r in groups])
    codes = rng.integers(0, 1 << 8, size=(K, N)) % (1 << row_bits)[:, None]
    scale_codes = rng.integers(0, 16, size=(len(groups), N))
    q_scale_max = rng.uniform(0.002, 0.02, size=len(groups)).astype(np.float16)
    invperm = rng.permutation(K) if permute else np.arange(K)
    bits, rows = zip(*groups)
    p = R.pack_exl2(codes, bits, rows, scale_codes, q_scale_max, invperm)
    assert p["q_weight"].dtype == np.int32 and p["q_groups"].dtype == np.int16
    assert p["q_scale"].dtype == np.int32 and p["q_scale"].shape == (len(groups), N // 8)
    assert p["q_scale_max"].dtype == np.float16 and p["q_invperm"].dtype == p["q_perm"].dtype == np.int32
    assert np.array_equal(p["q_weight"], naive_pack_exl2_weight(codes, groups))
    assert np.array_equal(p["q_perm"], np.argsort(invperm))
    got, got_bits = R.unpack_exl2_codes(p["q_weight"], p["q_groups"], K)
    assert np.array_equal(got, codes) and np.array_equal(got_bits, row_bits)
    assert np.array_equal(R.unpack_exl2_scale_codes(p["q_scale"]), scale_codes)
    w = R.dequantize_exl2(p["q_weight"], p["q_invperm"], p["q_scale"], p["q_scale_max"], p["q_groups"])
    assert bits_equal(w, naive_dequant_exl2(codes, groups, scale_codes, q_scale_max, invperm))
    return p, w


@pytest.mark.parametrize("bits", R.EXL2_BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_exl2_random_each_width(bits, group_size):
    rng = np.random.default_rng(bits * 1000 + group_size)
    check_exl2_pack(rng, 24, [(bits, group_size)] * 5)


def test_exl2_random_mixed_widths():
    rng = np.random.default_rng(1)
    groups = [(8, 32), (8, 64), (6, 32), (6, 16), (5, 32), (5, 64), (4, 128), (4, 8), (3, 32), (3, 96), (2, 16), (2, 128)]
    check_exl2_pack(rng, 40, groups)


@pytest.mark.parametrize("bits", R.EXL2_BITS)
@pytest.mark.parametrize("last_rows", [1, 7, 13, 31, 32, 45])
def test_exl2_short_last_group(bits, last_rows):
    rng = np.random.default_rng(bits * 100 + last_rows)
    groups = [(8, 32), (bits, 64), (bits, last_rows)]
    p, _ = check_exl2_pack(rng, 16, groups)
    last_words = -(-last_rows * bits // 32)
    assert p["q_weight"].shape[0] == 8 + 2 * bits + last_words
    # the stream of the last group is padded with zero bits
    padded = p["q_weight"][-last_words:].view(np.uint32).astype(np.uint64)
    used = last_rows * bits - 32 * (last_words - 1)
    assert not np.any(padded[-1] >> np.uint64(used))


def test_exl2_random_helper_and_large_k():
    rng = np.random.default_rng(2)
    layer = R.random_exl2(rng, 70000, 64, bits=3, permute=True, bias=True)
    K = 70000
    assert layer["weight"].shape == (K, 64) and layer["bias"].shape == (64,) and layer["bias"].dtype == np.float16
    codes, _ = R.unpack_exl2_codes(layer["q_weight"], layer["q_groups"], K)
    bits, _, rows = R.exl2_group_layout(layer["q_groups"], layer["q_weight"].shape[0], K)
    assert rows[-1] == K % 32 and np.all(rows[:-1] == 32) and np.all(bits == 3)  # 16-row short last group
    groups = list(zip(bits.tolist(), rows.tolist()))
    scale_codes = R.unpack_exl2_scale_codes(layer["q_scale"])
    expected = naive_dequant_exl2(codes, groups, scale_codes, layer["q_scale_max"], layer["q_invperm"])
    assert bits_equal(layer["weight"], expected)
    # y = x @ W = x[:, q_perm] @ Wp
    x = rng.standard_normal((2, K)).astype(np.float16)
    y = R.gemm(x, layer["weight"], layer["bias"])
    wp = layer["weight"][layer["q_perm"]]
    np.testing.assert_allclose(y, R.gemm(x[:, layer["q_perm"]], wp) + layer["bias"], rtol=1e-9, atol=1e-9)


def test_exl2_random_helper_bits_list():
    rng = np.random.default_rng(3)
    layer = R.random_exl2(rng, 244, 8, bits=[(4, 128), (8, 32), (2, 64), (2, 20)], permute=False)
    bits, _, rows = R.exl2_group_layout(layer["q_groups"], layer["q_weight"].shape[0], 244)
    assert bits.tolist() == [8, 4, 2, 2] and rows.tolist() == [32, 128, 64, 20]  # stable sort by bits
    assert layer["q_weight"].shape[0] == 8 + 16 + 4 + 2  # 20 2-bit rows padded to 2 words
    assert np.array_equal(layer["q_invperm"], np.arange(244))
    with pytest.raises(ValueError, match="whole words"):  # a partial group that would not be last
        R.random_exl2(rng, 84, 8, bits=[(2, 64), (3, 20)])


def test_exl2_validation():
    codes = np.zeros((64, 8), np.int64)
    sc, qsm, ip = np.zeros((2, 8), np.int64), np.ones(2, np.float16), np.arange(64)
    with pytest.raises(ValueError, match="non-increasing"):
        R.pack_exl2(codes, [3, 4], [32, 32], sc, qsm, ip)
    with pytest.raises(ValueError, match="bit widths"):
        R.pack_exl2(codes, [7, 7], [32, 32], sc, qsm, ip)
    with pytest.raises(ValueError, match="whole words"):
        R.pack_exl2(codes, [3, 3], [16, 48], sc, qsm, ip)
    with pytest.raises(ValueError, match="sum to K"):
        R.pack_exl2(codes, [4, 4], [32, 16], sc, qsm, ip)
    with pytest.raises(ValueError, match="out of range"):
        R.pack_exl2(codes + 16, [4, 4], [32, 32], sc, qsm, ip)
    with pytest.raises(ValueError, match="permutation"):
        R.pack_exl2(codes, [4, 4], [32, 32], sc, qsm, np.zeros(64))
    with pytest.raises(ValueError, match="non-increasing"):
        R.exl2_group_layout(np.array([2, 0, 4, 2], np.int16), 4)
    with pytest.raises(ValueError, match="whole number of rows"):
        R.exl2_group_layout(np.array([3, 0, 3, 1], np.int16), 4)


@pytest.mark.parametrize("zero_format", ["v1", "v2"])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, None])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_random(group_size, act_order, zero_format):
    rng = np.random.default_rng([16 if group_size is None else group_size, act_order, zero_format == "v2"])
    K, N = 512, 24
    layer = R.random_gptq(rng, K, N, group_size=group_size, act_order=act_order, zero_format=zero_format, bias=True)
    gs = K if group_size is None else group_size
    G = K // gs
    assert layer["qweight"].shape == (K // 8, N) and layer["qweight"].dtype == np.int32
    assert layer["qzeros"].shape == (G, N // 8) and layer["qzeros"].dtype == np.int32
    assert layer["scales"].shape == (G, N) and layer["scales"].dtype == np.float16
    assert layer["bias"].dtype == np.float16
    assert ("g_idx" in layer) == act_order
    g = layer["g_idx"] if act_order else np.arange(K) // gs
    if act_order:
        assert layer["g_idx"].dtype == np.int32 and np.all(np.bincount(g, minlength=G) == gs)
        if G > 1:
            assert np.any(np.diff(g) < 0)
    codes = R.unpack_gptq_codes(layer["qweight"])
    zeros = R.unpack_gptq_zeros(layer["qzeros"], zero_format)
    assert bits_equal(layer["weight"], naive_dequant_gptq(codes, zeros, layer["scales"], g))
    # pack(unpack) round trip, and independent nibble packing
    again = R.pack_gptq(codes, zeros, layer["scales"], layer.get("g_idx"), zero_format)
    for t in ("qweight", "qzeros", "scales", "g_idx"):
        if t in layer:
            assert np.array_equal(again[t], layer[t]), t
    stored = (zeros - 1) & 15 if zero_format == "v1" else zeros
    naive_qz = (stored.reshape(G, N // 8, 8).astype(np.uint64) << np.arange(0, 32, 4, dtype=np.uint64)).sum(-1)
    assert np.array_equal(layer["qzeros"], naive_qz.astype(np.uint32).view(np.int32))
    # the act-order permutation makes groups contiguous
    perm = R.act_order_perm(g)
    assert np.array_equal(g[perm], np.repeat(np.arange(G), gs))


def test_gptq_zero_conventions():
    qz = np.array([[np.uint32(0xFEDCBA98).view(np.int32), 0x76543210]], np.int32)
    stored = np.array([[8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7]])
    assert np.array_equal(R.unpack_gptq_zeros(qz, "v2"), stored)
    assert np.array_equal(R.unpack_gptq_zeros(qz, "v1"), (stored + 1) & 15)
    with pytest.raises(ValueError):
        R.unpack_gptq_zeros(qz, "v3")


def test_gptq_large_k_and_ordered_g_idx():
    rng = np.random.default_rng(4)
    K = 70000
    layer = R.random_gptq(rng, K, 64, group_size=16, with_g_idx=True)
    assert np.array_equal(layer["g_idx"], np.arange(K) // 16)
    w = R.dequantize_gptq(layer["qweight"], layer["qzeros"], layer["scales"])  # no g_idx: same groups
    assert bits_equal(w, layer["weight"])
    codes = R.unpack_gptq_codes(layer["qweight"])
    zeros = R.unpack_gptq_zeros(layer["qzeros"])
    assert bits_equal(w, naive_dequant_gptq(codes, zeros, layer["scales"], np.arange(K) // 16))
    one = R.random_gptq(rng, K, 64, group_size=None, act_order=True)
    assert one["scales"].shape == (1, 64) and not one["g_idx"].any()


def test_gemm_bias():
    x = np.array([[1, 2]], np.float16)
    w = np.array([[1, 0], [0.5, 1]], np.float16)
    y = R.gemm(x, w, np.array([0.25, -1], np.float16))
    assert y.dtype == np.float64 and np.array_equal(y, [[2.25, 1.0]])


def test_f16_scale_rounds_each_step():
    # q_scale_max / 256 lands in float16 subnormals: it must be rounded there first
    qsm = np.array([0.003328], np.float16)
    codes = np.arange(16)[None, :]
    got = R.f16_scale_exl2(codes, qsm)
    step = np.float16(np.float32(qsm[0]) / 256)
    assert np.array_equal(got[0], [np.float16(np.float32((c + 1) ** 2) * np.float32(step)) for c in range(16)])
    assert np.array_equal(R.f16_scale_exl2(codes, np.array([step]), prescaled=True), got)


# ---------------------------------------------------------------------------
# property test: any valid group layout round-trips
# ---------------------------------------------------------------------------


@st.composite
def exl2_layouts(draw):
    n_groups = draw(st.integers(1, 6))
    widths = sorted(draw(st.lists(st.sampled_from(R.EXL2_BITS), min_size=n_groups, max_size=n_groups)), reverse=True)
    groups = [(b, 32 * draw(st.integers(1, 4))) for b in widths[:-1]]
    groups.append((widths[-1], draw(st.integers(1, 130))))  # last group: any length
    return groups, draw(st.sampled_from([8, 16, 48])), draw(st.integers(0, 2**32 - 1))


@given(exl2_layouts())
def test_exl2_property_round_trip(layout):
    groups, N, seed = layout
    p, w = check_exl2_pack(np.random.default_rng(seed), N, groups)
    K = sum(r for _, r in groups)
    assert np.array_equal(R.exl2_group_layout(p["q_groups"], p["q_weight"].shape[0], K)[2], [r for _, r in groups])
    gm = R.exl2_group_map(p["q_groups"], p["q_weight"].shape[0], K).reshape(-1, 2)
    assert np.array_equal(gm[:, 1], np.concatenate([np.arange(r, 0, -1) for _, r in groups]))


def test_gptq_bits_must_be_an_integer():
    # Like QMatrix.from_gptq: 4.0 or True is not a width; numpy integers are.
    layer = R.random_gptq(np.random.default_rng(3), 64, 32, group_size=32, bits=4)
    for bad in (4.0, 3.0, True, "4", 5):
        with pytest.raises(ValueError, match="bits must be one of"):
            R.unpack_gptq_codes(layer["qweight"], bits=bad)
        with pytest.raises(ValueError, match="bits must be one of"):
            R.unpack_gptq_zeros(layer["qzeros"], bits=bad)
    assert np.array_equal(R.unpack_gptq_codes(layer["qweight"], bits=np.int64(4)),
                          R.unpack_gptq_codes(layer["qweight"], bits=4))
