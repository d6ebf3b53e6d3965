"""A small program using exl2's public API, checked with ``mypy --strict`` against the
installed package (its py.typed marker and the generated stub exl2/_ext.pyi).

Not a test module (pytest collects ``test_*.py`` only); tests/test_packaging.py and
scripts/wheel_proof.sh run mypy on it, and running it executes it on the CPU.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

import exl2
from exl2 import QMatrix, QuantLinear
from exl2._ext import version as native_version  # typed by the generated stub exl2/_ext.pyi


def make_layer(seed: int) -> Dict[str, np.ndarray]:
    return exl2.reference.random_gptq(np.random.default_rng(seed), 256, 64, group_size=64, bias=True)


def build_layer(seed: int = 0) -> Tuple[QMatrix, Dict[str, np.ndarray]]:
    layer = make_layer(seed)
    q = QMatrix.from_gptq(
        layer["qweight"], layer["qzeros"], layer["scales"], g_idx=layer.get("g_idx"), bias=layer["bias"], device="cpu"
    )
    return q, layer


def describe(q: QMatrix) -> str:
    k: int = q.in_features
    n: int = q.out_features
    bpw: float = q.bits_per_weight
    dev: torch.device = q.device
    return f"{q.format} {k}x{n} {bpw:.2f} bpw on {dev}, {q.nbytes} bytes"


def run() -> float:
    version: str = exl2.__version__
    cuda: bool = exl2.built_with_cuda()
    archs: str = exl2.cuda_architectures()
    devices: int = exl2.cuda_device_count()
    assert native_version() == version
    q, layer = build_layer()
    with q:
        print(describe(q), f"(exl2 {version}, cuda built: {cuda} [{archs}], devices: {devices})")
        x = torch.randn(3, q.in_features, dtype=torch.float16)
        y: torch.Tensor = q.matmul(x)
        w: torch.Tensor = q.dequantize()
        ref = exl2.reference.gemm(x.numpy(), layer["weight"], layer["bias"])
        err = float(np.abs(y.float().numpy() - ref).max())
        assert tuple(w.shape) == (q.in_features, q.out_features)
    assert q.closed
    try:
        exl2.QMatrix.from_gptq(layer["qweight"][:1], layer["qzeros"], layer["scales"])
    except (ValueError, TypeError, exl2.UnsupportedError, exl2.CudaError) as exc:
        print(f"rejected as expected: {type(exc).__name__}")
    g3 = exl2.reference.random_gptq(np.random.default_rng(2), 64, 32, group_size=32, bits=3)
    awq = exl2.reference.random_awq(np.random.default_rng(3), 64, 32, group_size=32)
    with QMatrix.from_gptq(g3["qweight"], g3["qzeros"], g3["scales"], bits=3) as q3, \
            QMatrix.from_awq(awq["qweight"], awq["qzeros"], awq["scales"], bias=None, device="cpu") as qa:
        assert describe(q3).startswith("gptq") and describe(qa).startswith("awq")
    lin: QuantLinear = QuantLinear.from_tensors(make_layer(1), device="cpu")
    out: torch.Tensor = lin(torch.zeros(2, lin.in_features, dtype=torch.float16))
    assert out.shape[-1] == lin.out_features
    lin.close()
    return err


if __name__ == "__main__":
    print(f"max |error| = {run():.3g}")
