"""bfloat16 activations and outputs on the CPU backend (CUDA: tests/test_cuda_bf16.py).

The contract (src/include/exl2/qmatrix.hpp, docs/api): for x of dtype T (float16 or
bfloat16) the weight is W_T = round_T((q - z) * s), the exact fp32 product rounded once,
and matmul returns round_T(sum_k x[k] * W_T[k, n] + bias[n]) accumulated in fp32. On the
CPU the bfloat16 accumulation order is fully specified (src/cpu/kernels.hpp): storage
order, acc = fl(acc + fl(x * w)) from +0, so the tests below emulate it exactly in numpy
float32 and require bit equality; they also check the float64 error bound

    |y - x @ W_bf16 - b| <= 2^-8 |x @ W_bf16 + b| + (K + 2) 2^-23 (|x| @ |W_bf16| + |b|)

(the output's one bfloat16 rounding, at most 2^-9 relative, with a factor 2 margin, plus
the fp32 accumulation error, at most (K + 1) 2^-24 times the sum of magnitudes, also
with a factor 2 margin). The CUDA tensor-core kernel's transposed tiles (m <= 16; m <= 8 with
EXL2_CUDA_T16=0) apply each group's scale in fp32 to the group's sums instead
(cuda_bf16_weight): the same bound holds there with the exact weight (q - z) * s in place of
W_bf16.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import numpy as np
import pytest
import torch

import exl2
from exl2 import reference as R
from layers import build, load_golden

BF16 = torch.bfloat16


def bits(t: torch.Tensor) -> np.ndarray:
    """The 16-bit patterns of a float16/bfloat16 tensor."""
    return t.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def reference_weight(layer: Dict[str, Any], dtype: str, zero_format: str = "v1") -> np.ndarray:
    """The reference weight in `dtype` (exl2.reference: "float16", "bfloat16" or "float32")."""
    if "q_weight" in layer:
        return R.dequantize_exl2(layer["q_weight"], layer["q_invperm"], layer["q_scale"], layer["q_scale_max"],
                                 layer["q_groups"], dtype=dtype)
    if exl2.loaders.detect_format(layer) == "awq":
        return R.dequantize_awq(layer["qweight"], layer["qzeros"], layer["scales"], dtype=dtype)
    gptq_bits = 32 * layer["qzeros"].shape[1] // layer["scales"].shape[1]
    return R.dequantize_gptq(layer["qweight"], layer["qzeros"], layer["scales"], layer.get("g_idx"), zero_format,
                             bits=gptq_bits, dtype=dtype)


def bf16_weight(layer: Dict[str, Any], zero_format: str = "v1") -> np.ndarray:
    """The reference weight in bfloat16 (float32 array of bfloat16 values)."""
    return reference_weight(layer, "bfloat16", zero_format)


def exact_weight(layer: Dict[str, Any], zero_format: str = "v1") -> np.ndarray:
    """The exact weight (q - z) * s (float32, unrounded)."""
    return reference_weight(layer, "float32", zero_format)


def group_sum_rows() -> int:
    """The largest m that the CUDA tensor-core layout runs on its transposed tiles, which sum each
    group in fp32 and apply its scale after the mma (fold_group, src/cuda/tc_gemm.cu): 16, or 8
    where the layers were built with EXL2_CUDA_T16=0 (the usual 16-row tiles for m = 9..16)."""
    return 8 if os.environ.get("EXL2_CUDA_T16") == "0" else 16


def cuda_bf16_weight(q: Any, layer: Dict[str, Any], m: int, zero_format: str = "v1") -> np.ndarray:
    """The weight that a bfloat16 matmul of `m` rows of the layer `q` is bounded against: on CUDA
    in the tensor-core layout up to m = group_sum_rows() (the mma.sync kernel's transposed tiles,
    which apply each group's scale in fp32 after the mma), the exact weight; every other path
    multiplies by dequantize(bfloat16)'s weight."""
    if q.device.type == "cuda" and q.tensor_core_layout and m <= group_sum_rows():
        return exact_weight(layer, zero_format)
    return bf16_weight(layer, zero_format)


def storage_perm(layer: Dict[str, Any]) -> np.ndarray:
    """The row order the CPU kernels sum in (src/core/layer.hpp: x[:, perm] @ Wp)."""
    if "q_weight" in layer:
        return np.argsort(np.asarray(layer["q_invperm"]).astype(np.int64), kind="stable")
    K = np.asarray(layer["weight"]).shape[0]
    g_idx = layer.get("g_idx")
    return np.arange(K) if g_idx is None else np.argsort(np.asarray(g_idx), kind="stable")


def emulate_cpu(layer: Dict[str, Any], x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The CPU bfloat16 contract in numpy float32: the exact expected output bits."""
    perm = storage_perm(layer)
    xp, wp = x.astype(np.float32)[:, perm], w[perm]
    acc = np.zeros((x.shape[0], w.shape[1]), np.float32)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        for r in range(xp.shape[1]):
            acc = acc + xp[:, r:r + 1] * wp[r]  # float32 multiply, then float32 add
        if layer.get("bias") is not None:
            acc = acc + np.asarray(layer["bias"]).astype(np.float32)
    out = R.bf16_bits(acc)
    out[np.isnan(acc)] = 0x7FC0  # the canonical NaN the kernels store
    return out


def assert_within_bound(y: torch.Tensor, layer: Dict[str, Any], x: np.ndarray, w: np.ndarray,
                        bias_term: float = 0.0, mag_term: float = 0.0) -> None:
    """The float64 error bound of the module docstring; bias_term and mag_term add that
    multiple of |b| and of |x| @ |W| + |b| (paths with extra roundings: see the callers)."""
    b = np.asarray(layer["bias"]).astype(np.float64) if layer.get("bias") is not None else 0.0
    exact = x.astype(np.float64) @ w.astype(np.float64) + b
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)) + np.abs(b)
    K = w.shape[0]
    bound = 2.0**-8 * np.abs(exact) + ((K + 2) * 2.0**-23 + mag_term) * mag + bias_term * np.abs(b)
    err = np.abs(y.detach().cpu().double().numpy() - exact)
    assert np.isfinite(y.detach().cpu().double().numpy()).all()
    assert (err <= bound).all(), f"max excess {(err - bound).max()} (max error {err.max()})"


def random_bf16_x(rng: np.random.Generator, m: int, K: int, scale: float = 1.0) -> np.ndarray:
    """x as float32 holding bfloat16 values, with a wide dynamic range."""
    return R.round_bf16(rng.standard_normal((m, K)) * scale * 2.0 ** rng.integers(-6, 7, size=(m, K)))


RNG = np.random.default_rng(2024)
LAYERS: Dict[str, Dict[str, Any]] = {
    **{f"exl2_b{b}": R.random_exl2(RNG, 320, 64, bits=b, group_size=64, bias=True) for b in R.EXL2_BITS},
    "exl2_mixed": R.random_exl2(RNG, 563, 200, bits=[(8, 32), (6, 48), (5, 96), (4, 128), (3, 96), (2, 163)],
                                bias=True),
    "gptq_act": R.random_gptq(RNG, 256, 104, group_size=32, act_order=True, bias=True),
    "gptq_plain": R.random_gptq(RNG, 384, 64, group_size=128),
    # the other GPTQ widths and AWQ run the same kernels on the canonical layout
    "gptq3_act": R.random_gptq(RNG, 256, 64, group_size=64, act_order=True, bits=3, bias=True),
    "gptq2": R.random_gptq(RNG, 256, 64, group_size=128, bits=2),
    "gptq8": R.random_gptq(RNG, 128, 40, group_size=32, bits=8, bias=True),
    "awq": R.random_awq(RNG, 256, 64, group_size=64, bias=True),
}


# ------------------------------------------------------------ reference rounding
def test_round_bf16_matches_torch() -> None:
    """The reference's bfloat16 rounding equals torch's float32 -> bfloat16 conversion
    (round to nearest even): random values, exact ties, subnormals, overflow, inf."""
    rng = np.random.default_rng(0)
    u = rng.integers(0, 2**32, size=200000, dtype=np.uint64).astype(np.uint32)
    u = u[(u & 0x7F800000) != 0x7F800000]  # finite (NaN is checked separately)
    ties = (rng.integers(0, 2**16, size=2000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    ties = ties[(ties & 0x7F800000) != 0x7F800000]
    special = np.array([0x00000000, 0x80000000, 0x00000001, 0x00008000, 0x00018000, 0x7F7FFFFF, 0xFF7FFFFF,
                        0x7F7F8000, 0x7F7F7FFF, 0x7F800000, 0xFF800000, 0x3F808000, 0x3F818000], np.uint32)
    f = np.concatenate([u, ties, special]).view(np.float32)
    expected = torch.from_numpy(f.copy()).to(BF16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(R.bf16_bits(f), expected)
    nan = np.array([np.nan, -np.nan], np.float32)
    assert np.isnan(R.round_bf16(nan)).all()
    assert list(R.bf16_bits(np.array([0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32))) == [0x7FC0, 0xFFC0]


def test_reference_dtype_argument() -> None:
    layer = LAYERS["exl2_b4"]
    with pytest.raises(ValueError, match="dtype: expected 'float16', 'bfloat16' or 'float32'"):
        R.dequantize_exl2(layer["q_weight"], layer["q_invperm"], layer["q_scale"], layer["q_scale_max"],
                          layer["q_groups"], dtype="float64")
    # float16 stays the default and unchanged
    w16 = R.dequantize_exl2(layer["q_weight"], layer["q_invperm"], layer["q_scale"], layer["q_scale_max"],
                            layer["q_groups"])
    assert w16.dtype == np.float16 and np.array_equal(w16.view(np.uint16), layer["weight"].view(np.uint16))
    wb = bf16_weight(layer)
    assert wb.dtype == np.float32 and np.array_equal(R.round_bf16(wb), wb)
    # one rounding of the exact product, not a second rounding of the fp16 weight: the two
    # differ somewhere in a layer of this size
    assert not np.array_equal(wb, R.round_bf16(w16.astype(np.float32)))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_reference_exact_weight(name: str) -> None:
    """dtype="float32": the unrounded product (q - z) * s, whose float16 and bfloat16 roundings are
    the reference's weights, and which differs from both somewhere."""
    layer = LAYERS[name]
    w32 = exact_weight(layer)
    assert w32.dtype == np.float32 and w32.shape == layer["weight"].shape
    assert np.array_equal(w32.astype(np.float16).view(np.uint16), np.asarray(layer["weight"]).view(np.uint16))
    assert np.array_equal(R.round_bf16(w32), bf16_weight(layer))
    if name != "gptq8":  # (small codes and scales can be exact in float16)
        assert not np.array_equal(w32, R.round_bf16(w32))


# ------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("name", list(LAYERS))
def test_dequantize_bit_exact(name: str) -> None:
    layer = LAYERS[name]
    with build(layer, "cpu") as q:
        w = q.dequantize(torch.bfloat16)
        assert w.dtype == BF16 and w.shape == layer["weight"].shape
        assert np.array_equal(bits(w), R.bf16_bits(bf16_weight(layer)))
        assert np.array_equal(bits(q.dequantize()), layer["weight"].view(np.uint16))  # fp16 unchanged
        assert np.array_equal(bits(q.dequantize(dtype=torch.float16)), layer["weight"].view(np.uint16))


def test_dequantize_gptq_v2_and_g_idx() -> None:
    rng = np.random.default_rng(5)
    for kw in ({"zero_format": "v2"}, {"with_g_idx": True}):
        layer = R.random_gptq(rng, 256, 64, group_size=64, **kw)
        zf = kw.get("zero_format", "v1")
        with build(layer, "cpu", zero_format=zf) as q:
            assert np.array_equal(bits(q.dequantize(BF16)), R.bf16_bits(bf16_weight(layer, zf)))


@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_golden_cases_in_bf16(fmt: str) -> None:
    """The golden layers re-dequantized to bfloat16 equal the reference in bfloat16, and
    their inputs (rounded to bfloat16) give results within the stated bound."""
    for name, case in load_golden(fmt).items():
        with build(case, "cpu") as q:
            w = bf16_weight(case)
            assert np.array_equal(bits(q.dequantize(BF16)), R.bf16_bits(w)), name
            x = R.round_bf16(case["x"].astype(np.float32))
            y = q.matmul(torch.from_numpy(x).to(BF16))
            assert y.dtype == BF16
            assert_within_bound(y, case, x, w)


# ------------------------------------------------------------------------ matmul
@pytest.mark.parametrize("name", ["exl2_b3", "exl2_b6", "exl2_mixed", "gptq_act", "gptq_plain", "gptq3_act",
                                  "gptq8", "awq"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 70])
def test_matmul_exact_contract_and_bound(name: str, m: int) -> None:
    layer = LAYERS[name]
    rng = np.random.default_rng(m)
    w = bf16_weight(layer)
    x = random_bf16_x(rng, m, w.shape[0])
    with build(layer, "cpu") as q:
        y = q.matmul(torch.from_numpy(x).to(BF16))
        assert y.dtype == BF16 and y.shape == (m, w.shape[1])
        assert np.array_equal(bits(y), emulate_cpu(layer, x, w))
        assert_within_bound(y, layer, x, w)
        # out= and leading batch dimensions
        out = torch.empty((m, w.shape[1]), dtype=BF16)
        assert q.matmul(torch.from_numpy(x).to(BF16), out=out) is out and torch.equal(out, y)
        y3 = q.matmul(torch.from_numpy(x).to(BF16).reshape(1, m, -1))
        assert y3.shape == (1, m, w.shape[1]) and torch.equal(y3[0], y)


def test_matmul_without_bias() -> None:
    layer = dict(LAYERS["exl2_mixed"])
    x = random_bf16_x(np.random.default_rng(7), 6, 563)
    with build(layer, "cpu", bias=False) as q:
        y = q.matmul(torch.from_numpy(x).to(BF16))
    layer.pop("bias")
    w = bf16_weight(layer)
    assert np.array_equal(bits(y), emulate_cpu(layer, x, w))
    assert_within_bound(y, layer, x, w)


@pytest.mark.parametrize("m", [1, 4, 33])
def test_large_activations_beyond_fp16_range(m: int) -> None:
    """Activations around 1e6 (fp16 would be inf) give finite, correct bfloat16 results."""
    layer = LAYERS["gptq_act"]
    w = bf16_weight(layer)
    x = R.round_bf16(np.random.default_rng(m).standard_normal((m, w.shape[0])) * 1e6)
    with np.errstate(over="ignore"):
        assert np.isinf(x.astype(np.float16)).any()  # really out of fp16's range
    with build(layer, "cpu") as q:
        y = q.matmul(torch.from_numpy(x).to(BF16))
    assert torch.isfinite(y).all()
    assert y.abs().max().item() > 1e5
    assert np.array_equal(bits(y), emulate_cpu(layer, x, w))
    assert_within_bound(y, layer, x, w)


def test_special_values_stored_canonically() -> None:
    layer = LAYERS["exl2_b4"]
    x = random_bf16_x(np.random.default_rng(9), 5, 320)
    x[1, 3], x[2, 7], x[3, 11], x[4, :] = np.inf, -np.inf, np.nan, 0.0
    with build(layer, "cpu") as q:
        y = q.matmul(torch.from_numpy(x).to(BF16))
    yb = bits(y)
    assert np.array_equal(yb, emulate_cpu(layer, x, bf16_weight(layer)))
    assert (yb[3] == 0x7FC0).all()  # NaN input: every output of that row NaN, stored as 0x7fc0
    assert np.array_equal(yb[4], R.bf16_bits(layer["bias"].astype(np.float32)))  # x = 0: bf16(bias)


def test_fp16_and_bf16_agree_within_rounding() -> None:
    """The same layer and (exactly representable) input in both dtypes."""
    layer = LAYERS["exl2_mixed"]
    x = np.random.default_rng(3).integers(-8, 9, size=(4, 563)).astype(np.float32) / 8  # exact in both
    with build(layer, "cpu") as q:
        y16 = q.matmul(torch.from_numpy(x).half()).double()
        yb = q.matmul(torch.from_numpy(x).to(BF16)).double()
    ref = torch.from_numpy(R.gemm(x, layer["weight"], layer["bias"]))
    scale = ref.abs().max()
    assert (y16 - ref).abs().max() <= 2e-3 * scale
    assert (yb - ref).abs().max() <= 2**-6 * scale  # output and weight bfloat16 rounding


# ------------------------------------------------------------------------ errors
def test_dtype_errors_name_the_argument() -> None:
    layer = LAYERS["exl2_b4"]
    with build(layer, "cpu") as q:
        xb = torch.zeros((2, 320), dtype=BF16)
        with pytest.raises(TypeError, match=r"x: expected dtype torch.float16 or torch.bfloat16, got torch.float32"):
            q.matmul(torch.zeros((2, 320), dtype=torch.float32))
        with pytest.raises(TypeError, match=r"out: expected dtype torch.bfloat16 \(the dtype of x\), got torch.float16"):
            q.matmul(xb, out=torch.empty((2, 64), dtype=torch.float16))
        with pytest.raises(TypeError, match=r"out: expected dtype torch.float16 \(the dtype of x\), got torch.bfloat16"):
            q.matmul(xb.half(), out=torch.empty((2, 64), dtype=BF16))
        for bad in (torch.float32, torch.float64, torch.int16, "bfloat16", None):
            with pytest.raises(TypeError, match="dtype: expected torch.float16 or torch.bfloat16"):
                q.dequantize(bad)
        # the native API: the same rules, checked in C++
        from exl2._convert import native_view

        with pytest.raises(TypeError, match=r"out: expected dtype bfloat16 \(the dtype of x\), got float16"):
            q._native.gemm(native_view(xb), native_view(torch.empty((2, 64), dtype=torch.float16)), 0)
        with pytest.raises(TypeError, match="x: expected dtype float16 or bfloat16, got float32"):
            q._native.gemm(native_view(xb.float()), native_view(torch.empty((2, 64), dtype=torch.float32)), 0)
        with pytest.raises(TypeError, match="out: expected dtype float16 or bfloat16, got float32"):
            q._native.dequantize(native_view(torch.empty((320, 64), dtype=torch.float32)), 0)
        out = torch.empty((320, 64), dtype=BF16)
        q._native.dequantize(native_view(out), 0)
        assert torch.equal(out, q.dequantize(BF16))


def test_numpy_input_stays_float16() -> None:
    """numpy has no bfloat16: numpy input is float16 and gives float16 results."""
    layer = LAYERS["exl2_b4"]
    x = np.random.default_rng(1).standard_normal((2, 320)).astype(np.float16)
    with build(layer, "cpu") as q:
        y = q.matmul(x)
        assert y.dtype == torch.float16 and torch.equal(y, q.matmul(torch.from_numpy(x)))
        with pytest.raises(TypeError, match="x: expected dtype"):
            q.matmul(x.astype(np.float32))


def test_compat_stays_float16_only() -> None:
    from exl2 import compat

    layer = LAYERS["gptq_plain"]
    with build(layer, "cpu") as q:
        h = compat.register_qmatrix(q)
        try:
            a = torch.zeros((2, 384), dtype=BF16)
            c = torch.empty((2, 64), dtype=BF16)
            with pytest.raises(TypeError, match="a: expected dtype torch.float16, got torch.bfloat16"):
                compat.gemm_half_q_half(a, h, c, False)
        finally:
            compat.unregister_qmatrix(h)


# ----------------------------------------------------------- custom op, nn module
def test_custom_op_and_quantlinear_bf16() -> None:
    from exl2.nn import QuantLinear

    layer = LAYERS["gptq_act"]
    w = bf16_weight(layer)
    m = QuantLinear.from_tensors(layer)
    for lead in [(3,), (2, 2), ()]:
        x = torch.from_numpy(random_bf16_x(np.random.default_rng(len(lead)), int(np.prod(lead or (1,))), 256)
                             ).to(BF16).reshape(*lead, 256)
        torch.library.opcheck(torch.ops.exl2.gemm.default, (x, m.handle))
        y = torch.ops.exl2.gemm(x, m.handle)
        assert y.dtype == BF16 and y.shape == (*lead, 104)
        assert torch.equal(m(x), y)
        assert torch.equal(y, m.qmatrix.matmul(x))
        x2 = x.reshape(-1, 256).float().numpy()
        assert_within_bound(y.reshape(-1, 104), layer, x2, w)
    m.to(torch.bfloat16)  # a dtype cast leaves the layer alone; it follows its input's dtype
    assert m(torch.zeros(1, 256, dtype=torch.float16)).dtype == torch.float16
    assert m(torch.zeros(1, 256, dtype=BF16)).dtype == BF16
    with pytest.raises(TypeError, match="x: expected dtype torch.float16 or torch.bfloat16"):
        m(torch.zeros(1, 256, dtype=torch.float32))
    # the fake (meta) implementation gives x's dtype
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty((5, 256), dtype=BF16)
        out = torch.ops.exl2.gemm(fake, m.handle)
        assert out.dtype == BF16 and out.shape == (5, 104)
    m.close()
