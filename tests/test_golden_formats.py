"""Golden-style cases for GPTQ 2/3/8-bit, unaligned GPTQ-4 groups and AWQ, in float16 and
bfloat16 (tests/data/golden_formats.safetensors, written by scripts/make_golden_formats.py
from exl2.reference with fixed seeds; see that script for the tensors of a case).

On every backend: dequantize() is bit-exact with the stored weights in both dtypes, and
matmul is within the stated bounds of the stored float64 products. The reference itself
must still reproduce the stored weights, so a change to either shows up here.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import pytest
import torch

from exl2 import loaders
from exl2 import reference as R
from layers import build, load_golden, rel_err
from test_bf16 import assert_within_bound, cuda_bf16_weight

CASES: Dict[str, Dict[str, np.ndarray]] = load_golden("formats")
# float16: the golden cases of the reference kernels are held to 1.2e-3 (max |err| / max |y|)
TOL_F16 = 1.2e-3

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def zero_format(name: str) -> str:
    return "v2" if name.endswith("_v2") else "v1"


def is_awq(case: Dict[str, Any]) -> bool:
    return loaders.detect_format(case) == "awq"


def bf16_tensor(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_the_file_covers_every_new_format() -> None:
    widths = {32 * c["qzeros"].shape[1] // c["scales"].shape[1] for c in CASES.values() if not is_awq(c)}
    assert widths == {2, 3, 4, 8}
    assert any(is_awq(c) for c in CASES.values())
    assert any("g_idx" in c for c in CASES.values()) and any(n.endswith("_v2") for n in CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_reproduces_the_stored_weights(name: str) -> None:
    c = CASES[name]
    if is_awq(c):
        w = R.dequantize_awq(c["qweight"], c["qzeros"], c["scales"])
        wb = R.dequantize_awq(c["qweight"], c["qzeros"], c["scales"], dtype="bfloat16")
    else:
        bits = 32 * c["qzeros"].shape[1] // c["scales"].shape[1]
        args = (c["qweight"], c["qzeros"], c["scales"], c.get("g_idx"), zero_format(name))
        w = R.dequantize_gptq(*args, bits=bits)
        wb = R.dequantize_gptq(*args, bits=bits, dtype="bfloat16")
    assert np.array_equal(w.view(np.uint16), c["weight"].view(np.uint16))
    assert np.array_equal(R.bf16_bits(wb), c["weight_bf16"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_dequantize_bit_exact(name: str, device: str) -> None:
    c = CASES[name]
    with build(c, device, zero_format=zero_format(name)) as q:
        w16 = q.dequantize().cpu().numpy()
        assert np.array_equal(w16.view(np.uint16), c["weight"].view(np.uint16))
        wb = q.dequantize(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(wb, c["weight_bf16"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matmul_against_float64(name: str, device: str) -> None:
    c = CASES[name]
    with build(c, device, zero_format=zero_format(name)) as q:
        y = q.matmul(torch.from_numpy(c["x"]).to(device))
        assert y.dtype == torch.float16
        assert rel_err(y, c["y"]) < TOL_F16, name
        yb = q.matmul(bf16_tensor(c["x_bf16"]).to(device))
        assert yb.dtype == torch.bfloat16
        x, w = bf16_values(c["x_bf16"]), bf16_values(c["weight_bf16"])
        # the stored product is the float64 value of the bfloat16 contract's inputs
        assert np.allclose(R.gemm(x, w, c.get("bias")), c["y_bf16"], rtol=0, atol=0)
        # these cases have m = 5: the native kernels on CUDA (in the canonical layout m >= 13 for float16 and
        # m >= 9 for bfloat16 would take the dense route); in the tensor-core layout bfloat16 sums groups there
        assert_within_bound(yb, c, x, w if device == "cpu" else cuda_bf16_weight(q, c, x.shape[0], zero_format(name)))
