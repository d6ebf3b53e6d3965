"""The canonical layout's CUDA kernels, forced with EXL2_CUDA_TC=0 at construction.

Below compute capability 9.0 (A100, Ada, T4, ...) layers keep the checkpoint formats' codes,
scales and zeros (FORMAT.md) and run the weight-streaming GEMV (m <= 12, bfloat16 m <= 8), the
fused mma kernel (the C++ API's larger m; the Python API takes the dense route from m = 13) and
the dequantize kernel. On compute capability 9.0+, where this suite usually runs, every layer
takes the tensor-core layout instead, so without these tests none of those kernels would run
there. Every format and bit width, float16 and bfloat16, the C++ API's kernels at every m bucket
and the Python API's routes: against the float64 reference (bfloat16: within the bound of
tests/test_bf16.py against the bfloat16 weight), run to run identical, and in a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exl2 import reference as R
from layers import build, capture_graph, expected, native_gemm, random_x, rel_err
from test_bf16 import assert_within_bound, bf16_weight, random_bf16_x

pytestmark = pytest.mark.cuda
TOL = 2e-3
K, N = 1024, 256
# The C++ API's kernel buckets: GEMV up to 12 rows (bfloat16: 8), then the fused mma kernel's
# 64 x 64 and 128 x 128 tiles.
NATIVE_ROWS = [1, 5, 8, 9, 12, 13, 16, 17, 33, 64, 65, 129, 300]


@pytest.fixture(autouse=True)
def _canonical(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setenv("EXL2_CUDA_TC", "0")


def _layers():
    rng = np.random.default_rng(900)
    return {
        "exl2": R.random_exl2(rng, K, N, bits=[(8, 64), (6, 64), (5, 96), (4, 416), (3, 256), (2, 128)], bias=True),
        "gptq4_act_order": R.random_gptq(rng, K, N, group_size=64, act_order=True, bias=True),
        "gptq2": R.random_gptq(rng, K, N, group_size=128, bits=2),
        "gptq3_act_order": R.random_gptq(rng, K, N, group_size=128, act_order=True, bits=3, bias=True),
        "gptq8": R.random_gptq(rng, K, N, group_size=32, bits=8),
        "awq": R.random_awq(rng, K, N, group_size=128, bias=True),
    }


LAYERS = _layers()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_canonical_dequantize_matches_cpu(name: str) -> None:
    layer = LAYERS[name]
    with build(layer, "cpu") as qc, build(layer, "cuda") as qg:
        assert not qg.tensor_core_layout
        for dtype in (torch.float16, torch.bfloat16):
            assert torch.equal(qg.dequantize(dtype).cpu(), qc.dequantize(dtype)), dtype


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_canonical_native_kernels_every_bucket(name: str, dtype: torch.dtype) -> None:
    layer = LAYERS[name]
    rng = np.random.default_rng(17)
    w = bf16_weight(layer) if dtype == torch.bfloat16 else None
    with build(layer, "cuda") as q:
        assert not q.tensor_core_layout
        for m in NATIVE_ROWS:
            if dtype == torch.float16:
                x = random_x(rng, (m, K))
                xt = torch.from_numpy(x).cuda()
            else:
                x = random_bf16_x(rng, m, K)
                xt = torch.from_numpy(x).to(dtype).cuda()
            y = native_gemm(q, xt)
            if dtype == torch.float16:
                assert rel_err(y, expected(layer, x)) < TOL, f"m={m}"
            else:
                assert_within_bound(y, layer, x, w)
            assert torch.equal(native_gemm(q, xt), y), f"m={m}: not deterministic"


@pytest.mark.parametrize("name", ["exl2", "gptq4_act_order"])
def test_canonical_python_routes(name: str) -> None:
    """QMatrix.matmul: the GEMV up to m = 12, the dense route (dequantize + torch.mm) above."""
    layer = LAYERS[name]
    rng = np.random.default_rng(23)
    with build(layer, "cuda") as q:
        for m in (1, 2, 8, 12, 13, 64, 300):
            x = random_x(rng, (m, K))
            assert rel_err(q.matmul(torch.from_numpy(x).cuda()), expected(layer, x)) < TOL, f"m={m}"


@pytest.mark.parametrize("m", [1, 12, 40])
def test_canonical_graph_capture(m: int) -> None:
    layer = LAYERS["exl2"]
    x = torch.from_numpy(random_x(np.random.default_rng(m), (m, K))).cuda()
    with build(layer, "cuda") as q:
        first = native_gemm(q, x)
        out = torch.empty_like(first)
        graph = capture_graph(lambda: native_gemm(q, x, out))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
