"""bfloat16 on the CUDA backend: dequantize bit-exact with the CPU backend and the
reference, matmul within the bound of tests/test_bf16.py for every kernel path (the
tensor-core layout's kernels, bounded against the exact weight up to m = 16 where they sum
groups in fp32, else against the bfloat16 weight: cuda_bf16_weight; the canonical layout's
GEMV, fused tensor-core kernel or its GEMV-slice fallback below compute capability 8.0, and
the Python dense path), determinism, graph capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exl2 import reference as R
from layers import build, capture_graph, native_gemm
from test_bf16 import assert_within_bound, bf16_weight, bits, cuda_bf16_weight, random_bf16_x

pytestmark = pytest.mark.cuda
BF16 = torch.bfloat16
ROWS = [1, 2, 5, 16, 17, 64, 300]


def dense_slack(m: int) -> dict:
    """Extra bound terms of QMatrix.matmul's cuBLAS path (m >= 9 on CUDA): its bias is the
    bfloat16 copy (2^-9 |b|), and while torch allows reduced-precision reductions in
    bfloat16 GEMMs (its default) cuBLAS may round split-K partial sums to bfloat16
    (2^-8 of the magnitudes, with margin)."""
    from exl2.qmatrix import _DENSE_MIN_ROWS

    if m < _DENSE_MIN_ROWS[torch.bfloat16]:
        return {}
    reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    return {"bias_term": 2.0**-9, "mag_term": 2.0**-8 if reduced else 0.0}


@pytest.fixture(scope="module")
def layers():
    rng = np.random.default_rng(300)
    return {
        "exl2": R.random_exl2(rng, 1024, 256, bits=[(8, 64), (6, 64), (5, 96), (4, 416), (3, 256), (2, 128)],
                              bias=True),
        "gptq": R.random_gptq(rng, 1024, 256, group_size=64, act_order=True, bias=True),
        "gptq3": R.random_gptq(rng, 1024, 256, group_size=128, act_order=True, bits=3, bias=True),
        "awq": R.random_awq(rng, 1024, 256, group_size=128, bias=True),
    }


@pytest.mark.parametrize("fmt", ["exl2", "gptq", "gptq3", "awq"])
def test_dequantize_matches_cpu_and_reference(layers, fmt: str) -> None:
    layer = layers[fmt]
    with build(layer, "cpu") as qc, build(layer, "cuda") as qg:
        wg = qg.dequantize(BF16)
        assert wg.dtype == BF16 and wg.device.type == "cuda"
        assert torch.equal(wg.cpu(), qc.dequantize(BF16))
        assert np.array_equal(bits(wg), R.bf16_bits(bf16_weight(layer)))
        assert torch.equal(qg.dequantize().cpu(), qc.dequantize())  # fp16 unchanged


@pytest.mark.parametrize("fmt", ["exl2", "gptq", "gptq3", "awq"])
@pytest.mark.parametrize("m", ROWS)
def test_matmul_within_bound(layers, fmt: str, m: int) -> None:
    """Python API (m >= 9: dequantize to bfloat16 + torch.addmm, see dense_slack) and the
    native kernels (the tight bound) for every m."""
    layer = layers[fmt]
    x = random_bf16_x(np.random.default_rng(m), m, 1024)
    xt = torch.from_numpy(x).to(BF16).cuda()
    with build(layer, "cuda") as q:
        w = cuda_bf16_weight(q, layer, m)
        y = q.matmul(xt)
        assert y.dtype == BF16 and y.shape == (m, 256)
        assert_within_bound(y, layer, x, w, **dense_slack(m))
        out = native_gemm(q, xt)
        # tensor cores (m > 16) may truncate instead of round in their fp32 accumulation
        # (up to 1 ulp per addition): twice the accumulation term
        assert_within_bound(out, layer, x, w, mag_term=1026 * 2.0**-23 if m > 16 else 0.0)
        with build(layer, "cpu") as qc:  # the CPU backend obeys the same bound (its weight: bfloat16)
            assert_within_bound(qc.matmul(xt.cpu()), layer, x, bf16_weight(layer))


@pytest.mark.parametrize("m", [1, 4, 33])
def test_large_activations_beyond_fp16_range(layers, m: int) -> None:
    layer = layers["gptq"]
    x = R.round_bf16(np.random.default_rng(m).standard_normal((m, 1024)) * 1e6)
    with build(layer, "cuda") as q:
        w = cuda_bf16_weight(q, layer, m)
        y = q.matmul(torch.from_numpy(x).to(BF16).cuda())
    assert torch.isfinite(y).all()
    assert_within_bound(y, layer, x, w, **dense_slack(m))


@pytest.mark.parametrize("m", [1, 8, 17, 33, 300])
def test_deterministic(layers, m: int) -> None:
    x = torch.from_numpy(random_bf16_x(np.random.default_rng(4), m, 1024)).to(BF16).cuda()
    with build(layers["exl2"], "cuda") as q:
        first = q.matmul(x)
        native = native_gemm(q, x)
        for _ in range(20):
            assert torch.equal(q.matmul(x), first)
            assert torch.equal(native_gemm(q, x), native)


@pytest.mark.parametrize("m", [1, 4, 64])
def test_graph_capture_and_replay(layers, m: int) -> None:
    layer = layers["exl2"]
    with build(layer, "cuda") as q:
        w = cuda_bf16_weight(q, layer, m)
        x = torch.zeros((m, 1024), dtype=BF16, device="cuda")
        out = torch.empty((m, 256), dtype=BF16, device="cuda")
        g = capture_graph(lambda: q.matmul(x, out=out))
        rng = np.random.default_rng(6)
        for _ in range(3):
            xn = random_bf16_x(rng, m, 1024)
            x.copy_(torch.from_numpy(xn).to(BF16))
            out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert_within_bound(out, layer, xn, w, **dense_slack(m))
            assert torch.equal(out, q.matmul(x))


@pytest.mark.parametrize("m", [17, 40, 300])
def test_gemv_slice_fallback(layers, monkeypatch, m: int) -> None:
    """The path of GPUs without bfloat16 tensor cores (compute capability 7.5), forced with
    EXL2_CUDA_BF16_NO_MMA=1 at construction: GEMV on slices of <= 16 rows (of the canonical
    layout, EXL2_CUDA_TC=0: a layer in the tensor-core layout never reaches it)."""
    layer = layers["exl2"]
    w = bf16_weight(layer)
    x = random_bf16_x(np.random.default_rng(m + 1), m, 1024)
    xt = torch.from_numpy(x).to(BF16).cuda()
    monkeypatch.setenv("EXL2_CUDA_BF16_NO_MMA", "1")
    monkeypatch.setenv("EXL2_CUDA_TC", "0")
    with build(layer, "cuda") as q:
        monkeypatch.delenv("EXL2_CUDA_BF16_NO_MMA")
        monkeypatch.delenv("EXL2_CUDA_TC")
        assert not q.tensor_core_layout
        out = native_gemm(q, xt)
        assert_within_bound(out, layer, x, w)
        # the slices are GEMV launches of 16 rows (the last one shorter): row i of the
        # result equals the 16-row (or remainder) GEMV of its slice
        r0 = 16 * ((m - 1) // 16)
        assert torch.equal(out[r0:], native_gemm(q, xt[r0:].contiguous()))
        assert torch.equal(native_gemm(q, xt), out)


def test_dtype_errors(layers) -> None:
    with build(layers["gptq"], "cuda") as q:
        xb = torch.zeros((2, 1024), dtype=BF16, device="cuda")
        with pytest.raises(TypeError, match=r"out: expected dtype torch.bfloat16 \(the dtype of x\)"):
            q.matmul(xb, out=torch.empty((2, 256), dtype=torch.float16, device="cuda"))
        with pytest.raises(TypeError, match="dtype: expected torch.float16 or torch.bfloat16"):
            q.dequantize(torch.float32)
