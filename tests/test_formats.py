"""GPTQ 2/3/8-bit and AWQ 4-bit: the reference packers against literal ports of
AutoGPTQ's and AutoAWQ's packing loops, dequantize bit-exact and matmul within the fp32
accumulation bound on every backend, act-order, both zero conventions, unaligned group
sizes, property tests over shapes, and that inputs are never modified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import exl2
from exl2 import reference as R
from layers import DEVICES, bits_equal, build, check_layer, expected, native_gemm, random_x, rel_err

TOL = 2e-3
ROWS = [1, 3, 8, 17, 64]


# --------------------------------------------------------- literal packer ports
def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ ``QuantLinear.pack``'s qweight loop, as written there (uint32 words)."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << np.uint32(bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << np.uint32(30)
            row += 1
            qweight[row] |= (intweight[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << np.uint32(31)
            row += 1
            qweight[row] |= (intweight[i] >> np.uint32(1)) & np.uint32(3)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


def autogptq_pack_zeros(zeros: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qzeros loop (v1: the caller passes ``z - 1``); the same stream along N."""
    return np.ascontiguousarray(autogptq_pack_rows(np.ascontiguousarray(zeros.T), bits).T)


def autoawq_pack(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ ``WQLinear_GEMM.from_linear``'s packing loop (4-bit, along the last axis)."""
    intweight = intweight.astype(np.uint32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    q = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            q[:, col] |= intweight[:, col * 8 + order_map[i]] << np.uint32(i * 4)
    return q.view(np.int32)


@pytest.mark.parametrize("bits", R.GPTQ_BITS)
def test_pack_gptq_matches_autogptq(bits: int) -> None:
    rng = np.random.default_rng(bits)
    K, N, G = 128, 64, 2
    codes = rng.integers(0, 1 << bits, size=(K, N))
    zeros = rng.integers(0, 1 << bits, size=(G, N))
    zeros[0, :3] = 0  # v1 wraps these to 2^bits - 1
    packed = R.pack_gptq(codes, zeros, np.ones((G, N), np.float16), bits=bits)
    assert packed["qweight"].shape == (K * bits // 32, N)
    assert packed["qzeros"].shape == (G, N * bits // 32)
    assert np.array_equal(packed["qweight"], autogptq_pack_rows(codes, bits))
    stored = (zeros - 1) & ((1 << bits) - 1)
    assert np.array_equal(packed["qzeros"], autogptq_pack_zeros(stored, bits))
    # unpacking inverts packing, for both zero conventions
    assert np.array_equal(R.unpack_gptq_codes(packed["qweight"], bits), codes)
    assert np.array_equal(R.unpack_gptq_zeros(packed["qzeros"], "v1", bits), zeros)
    v2 = R.pack_gptq(codes, zeros, np.ones((G, N), np.float16), zero_format="v2", bits=bits)
    assert np.array_equal(R.unpack_gptq_zeros(v2["qzeros"], "v2", bits), zeros)


def test_gptq3_stream_layout() -> None:
    """3-bit: row 10 straddles words 0 and 1 (bits 30..32), row 21 words 1 and 2."""
    codes = np.zeros((32, 32), np.int64)
    codes[10, 0] = 0b101
    codes[21, 1] = 0b011
    w = R.pack_gptq(codes, np.zeros((1, 32), np.int64), np.ones((1, 32), np.float16), bits=3)["qweight"]
    w = w.view(np.uint32)
    assert (w[0, 0], w[1, 0], w[2, 0]) == (0b01 << 30, 0b1, 0)
    assert (w[0, 1], w[1, 1], w[2, 1]) == (0, 0b1 << 31, 0b01)


def test_pack_awq_matches_autoawq() -> None:
    rng = np.random.default_rng(5)
    K, N, G = 64, 48, 4
    codes = rng.integers(0, 16, size=(K, N))
    zeros = rng.integers(0, 16, size=(G, N))
    packed = R.pack_awq(codes, zeros, np.ones((G, N), np.float16))
    assert np.array_equal(packed["qweight"], autoawq_pack(codes))
    assert np.array_equal(packed["qzeros"], autoawq_pack(zeros))
    assert np.array_equal(R.unpack_awq_codes(packed["qweight"]), codes)
    assert np.array_equal(R.unpack_awq_zeros(packed["qzeros"]), zeros)
    # column c of a word sits in nibble [0, 4, 1, 5, 2, 6, 3, 7][c]
    one = np.zeros((1, 8), np.int64)
    one[0, 1] = 0xF
    assert R.pack_awq(one, np.zeros((1, 8), np.int64), np.ones((1, 8)))["qweight"].view(np.uint32)[0, 0] == 0xF << 16


def test_reference_dequantize_formula() -> None:
    """dequantize_* equals f16(s * (q - z)) computed element by element from the codes."""
    rng = np.random.default_rng(11)
    for bits in R.GPTQ_BITS:
        K, N, gs = 64, 32, 16
        codes = rng.integers(0, 1 << bits, size=(K, N))
        zeros = rng.integers(0, 1 << bits, size=(K // gs, N))
        s = rng.uniform(-0.02, 0.02, size=(K // gs, N)).astype(np.float16)
        g_idx = rng.permutation(np.arange(K) // gs)
        p = R.pack_gptq(codes, zeros, s, g_idx, "v2", bits)
        w = R.dequantize_gptq(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], "v2", bits)
        k, n = 37, 5
        want = np.float16(np.float32(s[g_idx[k], n]) * np.float32(codes[k, n] - zeros[g_idx[k], n]))
        assert w[k, n].view(np.uint16) == want.view(np.uint16)
    codes = rng.integers(0, 16, size=(64, 16))
    zeros = rng.integers(0, 16, size=(2, 16))
    s = rng.uniform(0.001, 0.02, size=(2, 16)).astype(np.float16)
    p = R.pack_awq(codes, zeros, s)
    w = R.dequantize_awq(p["qweight"], p["qzeros"], p["scales"])
    assert w[40, 9] == np.float16(np.float32(s[1, 9]) * np.float32(codes[40, 9] - zeros[1, 9]))


# ----------------------------------------------------------------- QMatrix
# (K, group_size) per width: aligned groups, one group, and groups that do not fill
# whole words (the canonical layout pads them: 3-bit g8/g96, 2-bit g8, 4-bit g4).
GPTQ_CASES = [
    (2, 256, 32), (2, 256, 128), (2, 256, None), (2, 128, 8),
    (3, 384, 32), (3, 384, 128), (3, 384, None), (3, 96, 8), (3, 192, 96),
    (4, 256, 64), (4, 64, 4),
    (8, 256, 32), (8, 256, 128), (8, 128, None), (8, 64, 4),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits, K, group_size", GPTQ_CASES)
def test_gptq_widths(bits: int, K: int, group_size, act_order: bool, device: str) -> None:
    rng = np.random.default_rng(bits * 1000 + K)
    N = {2: 80, 3: 96, 4: 72, 8: 72}[bits]  # qzeros need N * bits % 32 == 0
    layer = R.random_gptq(rng, K, N, group_size=group_size, act_order=act_order, bits=bits, bias=True)
    fmt, bpw = check_layer(layer, device, ROWS)
    G = K // (group_size or K)
    assert fmt == "gptq"
    assert bpw == pytest.approx((K * N * bits + G * N * (16 + bits)) / (K * N))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", R.GPTQ_BITS)
def test_gptq_v2_zeros_and_wrapping(bits: int, device: str) -> None:
    rng = np.random.default_rng(bits)
    K = 96 if bits == 3 else 64
    layer = R.random_gptq(rng, K, 64, group_size=32, zero_format="v2", bits=bits, with_g_idx=True)
    check_layer(layer, device, zero_format="v2", rows=[1, 8])
    # v1 with z = 0 stores 2^bits - 1, which must wrap back to 0
    codes = rng.integers(0, 1 << bits, size=(K, 64))
    zeros = np.zeros((2, 64), np.int64)
    p = R.pack_gptq(codes, zeros, np.full((2, 64), 0.5, np.float16), bits=bits)
    assert (R.unpack_gptq_zeros(p["qzeros"], "v2", bits) == (1 << bits) - 1).all()
    p["weight"] = (codes * 0.5).astype(np.float16)
    check_layer(p, device, rows=[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K, N, group_size", [(128, 64, 32), (256, 72, 128), (128, 8, None), (96, 40, 8),
                                              (60, 16, 4), (64, 24, 64)])
def test_awq(K: int, N: int, group_size, device: str) -> None:
    layer = R.random_awq(np.random.default_rng(K + N), K, N, group_size=group_size, bias=True)
    fmt, bpw = check_layer(layer, device, ROWS)
    G = K // (group_size or K)
    assert fmt == "awq"
    assert bpw == pytest.approx((K * N * 4 + G * N * 20) / (K * N))


def test_gptq4_unchanged_by_bits_argument() -> None:
    layer = R.random_gptq(np.random.default_rng(2), 128, 32, group_size=32, act_order=True)
    t = [torch.from_numpy(layer[k]) for k in ("qweight", "qzeros", "scales", "g_idx")]
    with exl2.QMatrix.from_gptq(*t[:3], g_idx=t[3]) as a, exl2.QMatrix.from_gptq(*t[:3], g_idx=t[3], bits=4) as b:
        assert torch.equal(a.dequantize(), b.dequantize())
        assert bits_equal(a.dequantize(), layer["weight"])


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_never_modified(device: str) -> None:
    rng = np.random.default_rng(4)
    layers = [R.random_gptq(rng, 96, 64, group_size=8, act_order=True, bits=3, bias=True),
              R.random_awq(rng, 64, 32, group_size=16, bias=True)]
    for layer in layers:
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in layer.items() if k != "weight"}
        before = {k: v.clone() for k, v in t.items()}
        if "g_idx" in t:
            q = exl2.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx=t["g_idx"], bias=t["bias"],
                                       bits=3, device=device)
        else:
            q = exl2.QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"], bias=t["bias"], device=device)
        with q:
            for k, v in t.items():
                assert torch.equal(v, before[k]), k
                v.fill_(0)  # overwriting the inputs afterwards does not affect the QMatrix
            assert bits_equal(q.dequantize(), layer["weight"])


def test_numpy_inputs_and_repr() -> None:
    layer = R.random_awq(np.random.default_rng(8), 64, 16, group_size=32)
    with exl2.QMatrix.from_awq(layer["qweight"], layer["qzeros"], layer["scales"]) as q:
        assert q.device == torch.device("cpu") and q.in_features == 64 and q.out_features == 16
        assert "format='awq'" in repr(q) and not q.has_bias
    layer = R.random_gptq(np.random.default_rng(8), 64, 16, group_size=32, bits=8)
    with exl2.QMatrix.from_gptq(layer["qweight"], layer["qzeros"], layer["scales"], bits=np.int64(8)) as q:
        assert bits_equal(q.dequantize(), layer["weight"])


# ---------------------------------------------------------------- properties
@given(
    bits=st.sampled_from(R.GPTQ_BITS), G=st.integers(1, 5), gs_units=st.integers(1, 4),
    n_units=st.integers(1, 3), act_order=st.booleans(), zero_format=st.sampled_from(["v1", "v2"]),
    m=st.integers(1, 12), seed=st.integers(0, 2**31),
)
def test_gptq_widths_property_cpu(bits, G, gs_units, n_units, act_order, zero_format, m, seed) -> None:
    # K * bits and N * bits must fill whole words (N also a multiple of 8): sizes in
    # units of 32 / gcd(bits, 32) rows / columns.
    unit = {2: 16, 3: 32, 4: 8, 8: 4}[bits]
    group_size = unit * gs_units
    N = max(unit, 8) * n_units
    rng = np.random.default_rng(seed)
    layer = R.random_gptq(rng, G * group_size, N, group_size=group_size, act_order=act_order,
                          zero_format=zero_format, bits=bits, bias=bool(seed % 2))
    check_layer(layer, "cpu", rows=[m], rng=rng, zero_format=zero_format)


@given(K=st.integers(1, 160), G_div=st.integers(1, 6), n_units=st.integers(1, 6), m=st.integers(1, 12),
       seed=st.integers(0, 2**31))
def test_awq_property_cpu(K: int, G_div: int, n_units: int, m: int, seed: int) -> None:
    divisors = [d for d in range(1, K + 1) if K % d == 0]
    G = divisors[G_div % len(divisors)]
    rng = np.random.default_rng(seed)
    layer = R.random_awq(rng, K, 8 * n_units, group_size=K // G, bias=bool(seed % 2))
    check_layer(layer, "cpu", rows=[m], rng=rng)


# ---------------------------------------------------------------------- CUDA
def _cuda_cases():
    rng = np.random.default_rng(77)
    return {
        "gptq2": (R.random_gptq(rng, 512, 256, group_size=128, act_order=True, bits=2, bias=True), "v1"),
        "gptq3": (R.random_gptq(rng, 768, 320, group_size=64, act_order=True, bits=3, bias=True), "v1"),
        "gptq3_g8": (R.random_gptq(rng, 96, 64, group_size=8, bits=3, zero_format="v2"), "v2"),
        "gptq8": (R.random_gptq(rng, 512, 264, group_size=32, bits=8, zero_format="v2"), "v2"),
        "gptq4_g4": (R.random_gptq(rng, 64, 40, group_size=4, act_order=True), "v1"),
        "awq": (R.random_awq(rng, 512, 256, group_size=128, bias=True), "v1"),
        "awq_g1": (R.random_awq(rng, 100, 48, group_size=None), "v1"),
    }


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(_cuda_cases()))
def test_cpu_and_cuda_agree(case: str) -> None:
    layer, zf = _cuda_cases()[case]
    K = layer["weight"].shape[0]
    rng = np.random.default_rng(1)
    with build(layer, "cpu", zero_format=zf) as qc, build(layer, "cuda", zero_format=zf) as qg, \
            build(layer, "cuda", zero_format=zf, as_torch=False) as qh:
        wc, wg = qc.dequantize(), qg.dequantize()
        assert bits_equal(wg, layer["weight"]) and torch.equal(wc, wg.cpu())
        assert torch.equal(qh.dequantize(), wg)  # host (numpy) inputs, same layer
        for m in (1, 2, 5, 8, 16, 33, 300):
            x = random_x(rng, (m, K))
            yc = qc.matmul(torch.from_numpy(x))
            yg = qg.matmul(torch.from_numpy(x).cuda())
            assert rel_err(yg, expected(layer, x)) < TOL, f"m={m}"
            assert rel_err(yc, expected(layer, x)) < TOL, f"m={m}"


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["gptq3", "gptq8", "awq"])
def test_cuda_native_kernels_every_m(case: str) -> None:
    """The library's own GEMV / tensor-core kernels (not the dense fallback) on the new formats."""
    layer, zf = _cuda_cases()[case]
    K = layer["weight"].shape[0]
    rng = np.random.default_rng(2)
    with build(layer, "cuda", zero_format=zf) as q:
        for m in (1, 3, 8, 17, 64, 300):
            x = torch.from_numpy(random_x(rng, (m, K))).cuda()
            out = native_gemm(q, x)
            assert rel_err(out, expected(layer, x.cpu().numpy())) < TOL, f"m={m}"
