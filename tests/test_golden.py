"""Every golden case (produced by the reference CUDA implementation) dequantizes bit
for bit and its GEMM lands within 2e-3 relative of the fp64 result, on each backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layers import DEVICES, bits_equal, build, load_golden, rel_err

GOLDEN = {**load_golden("exl2"), **load_golden("gptq")}
CASES = sorted(GOLDEN)


def test_all_cases_present() -> None:
    assert len(CASES) == 13


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_golden_dequantize_bit_exact(case: str, device: str) -> None:
    layer = GOLDEN[case]
    with build(layer, device) as q:
        assert (q.in_features, q.out_features) == layer["weight"].shape
        w = q.dequantize()
        assert w.device.type == device and w.dtype == torch.float16
        assert bits_equal(w, layer["weight"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_golden_gemm(case: str, device: str) -> None:
    layer = GOLDEN[case]
    with build(layer, device) as q:
        y = q.matmul(torch.from_numpy(layer["x"]).to(device))
        assert y.shape == layer["y_ref"].shape and y.dtype == torch.float16
        assert rel_err(y, layer["y_ref"].astype(np.float64)) < 2e-3
