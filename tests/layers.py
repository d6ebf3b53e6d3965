"""Test helpers: golden data, random layers and building QMatrix objects from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import exl2

DATA = Path(__file__).parent / "data"

# Parametrisation over backends: CUDA cases carry the cuda marker (skipped without a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def load_golden(fmt: str) -> Dict[str, Dict[str, np.ndarray]]:
    cases: Dict[str, Dict[str, np.ndarray]] = {}
    for key, value in load_file(DATA / f"golden_{fmt}.safetensors").items():
        case, tensor = key.split(".", 1)
        cases.setdefault(case, {})[tensor] = value
    return cases


def is_exl2(layer: Dict[str, Any]) -> bool:
    return "q_weight" in layer


def build(layer: Dict[str, Any], device: str, *, as_torch: bool = True, zero_format: str = "v1",
          bias: bool = True) -> exl2.QMatrix:
    """Build a QMatrix from a layer dict (golden case or exl2.reference.random_*; GPTQ width and
    AWQ told apart by shape)."""
    conv = (lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)) if as_torch else (lambda a: a)
    b = conv(layer["bias"]) if bias and layer.get("bias") is not None else None
    if is_exl2(layer):
        q_perm = layer.get("q_perm")
        return exl2.QMatrix.from_exl2(
            conv(layer["q_weight"]), conv(layer["q_invperm"]), conv(layer["q_scale"]), conv(layer["q_scale_max"]),
            conv(layer["q_groups"]), q_perm=None if q_perm is None else conv(q_perm), bias=b, device=device,
        )
    if exl2.loaders.detect_format(layer) == "awq":
        return exl2.QMatrix.from_awq(conv(layer["qweight"]), conv(layer["qzeros"]), conv(layer["scales"]), bias=b,
                                     device=device)
    g_idx = layer.get("g_idx")
    # GPTQ width: qzeros is [G, N*bits/32], scales [G, N]
    bits = 32 * layer["qzeros"].shape[1] // layer["scales"].shape[1]
    return exl2.QMatrix.from_gptq(
        conv(layer["qweight"]), conv(layer["qzeros"]), conv(layer["scales"]),
        g_idx=None if g_idx is None else conv(g_idx), bias=b, zero_format=zero_format, bits=bits, device=device,
    )


def rel_err(y: torch.Tensor, y_ref: np.ndarray) -> float:
    """max |y - y_ref| / max |y_ref| (the metric the golden targets use)."""
    yy = y.detach().cpu().numpy().astype(np.float64)
    return float(np.abs(yy - y_ref).max() / max(np.abs(y_ref).max(), 1e-30))


def bits_equal(a: torch.Tensor, b: np.ndarray) -> bool:
    aa = a.detach().cpu().numpy()
    return aa.dtype == np.float16 and aa.shape == b.shape and np.array_equal(aa.view(np.uint16), b.view(np.uint16))


def random_x(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float16)


def expected(layer: Dict[str, Any], x: np.ndarray, bias: Optional[bool] = True) -> np.ndarray:
    return exl2.reference.gemm(x, layer["weight"], layer.get("bias") if bias else None)


def check_layer(layer: Dict[str, Any], device: str, rows, *, rng: Optional[np.random.Generator] = None,
                zero_format: str = "v1", tol: float = 2e-3) -> tuple:
    """Build ``layer`` on ``device``: dequantize must equal the reference weight bit for bit,
    and matmul at every m in ``rows`` must be within ``tol`` of the float64 reference.
    Returns the QMatrix's (format, bits_per_weight)."""
    rng = rng or np.random.default_rng(0)
    K = layer["weight"].shape[0]
    with build(layer, device, zero_format=zero_format) as q:
        assert bits_equal(q.dequantize(), layer["weight"])
        for m in rows:
            x = random_x(rng, (m, K))
            y = q.matmul(torch.from_numpy(x).to(device))
            assert rel_err(y, expected(layer, x)) < tol, f"m={m}"
        return q.format, q.bits_per_weight


def native_gemm(q: exl2.QMatrix, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The C++ API's QMatrix::matmul through the binding (no dense route, any m), on torch's
    current stream, into ``out`` (a new tensor when None)."""
    from exl2._convert import native_view, stream_handle

    if out is None:
        out = torch.empty((x.shape[0], q.out_features), dtype=x.dtype, device=x.device)
    q._native.gemm(native_view(x), native_view(out), stream_handle(x.device))
    return out


def capture_graph(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """fn() once on a side stream (the warm-up torch asks for before a capture), then fn()
    captured into a new CUDA graph (not run: replay it)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
