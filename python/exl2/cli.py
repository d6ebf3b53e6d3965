"""Implementations of the ``python -m exl2`` commands."""

from __future__ import annotations

import platform
import time
from typing import Optional

import numpy as np
import torch

from . import __version__, built_with_cuda, cuda_architectures, cuda_device_count, reference
from ._convert import parse_device
from .qmatrix import QMatrix


def info() -> int:
    """Print version, backends, CUDA architectures and the devices exl2 can use."""
    print(f"exl2 {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    print("backends: cpu" + (", cuda" if built_with_cuda() else ""))
    if built_with_cuda():
        print(f"cuda architectures: {cuda_architectures()}")
        n = cuda_device_count()
        print(f"cuda devices: {n}")
        for i in range(n if torch.cuda.is_available() else 0):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i} {p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        print("cuda: not built (no CUDA compiler was found at build time, or EXL2_CUDA=OFF)")
    return 0


def default_device() -> str:
    """"cuda" when exl2 has its CUDA backend and a CUDA device is usable, else "cpu"."""
    return "cuda" if built_with_cuda() and cuda_device_count() > 0 and torch.cuda.is_available() else "cpu"


def _demo_layers(fmt: str = "all", bits: int = 4) -> dict:
    """The embedded demo: small layers made deterministically by exl2.reference
    (``fmt``: "all", "exl2", "gptq" or "awq"; ``bits``: the GPTQ width)."""
    rng = np.random.default_rng(20261125)
    layers = {}
    if fmt in ("all", "exl2"):
        layers["exl2 mixed 8/6/4/3/2-bit, 1024x512"] = reference.random_exl2(
            rng, 1024, 512, bits=[(8, 64), (6, 128), (4, 384), (3, 256), (2, 192)], bias=True
        )
    if fmt in ("all", "gptq"):
        layers[f"gptq {bits}-bit act-order g128, 1024x512"] = reference.random_gptq(
            rng, 1024, 512, group_size=128, act_order=True, bits=bits
        )
    if fmt in ("all", "awq"):
        layers["awq 4-bit g128, 1024x512"] = reference.random_awq(rng, 1024, 512, group_size=128, bias=True)
    if not layers:
        raise ValueError(f"format: expected 'all', 'exl2', 'gptq' or 'awq', got {fmt!r}")
    return layers


def demo(device: Optional[str] = None, rows: int = 8, fmt: str = "all", bits: int = 4) -> int:
    """Run the demo layers on CUDA if available (else CPU) and compare with exl2.reference."""
    if device is None:
        device = default_device()
    dev = parse_device(device)
    print(f"exl2 {__version__} demo on {dev}")
    rng = np.random.default_rng(7)
    worst = 0.0
    for name, layer in _demo_layers(fmt, bits).items():
        K, N = layer["weight"].shape
        x = rng.standard_normal((rows, K)).astype(np.float16)
        if "q_weight" in layer:
            q = QMatrix.from_exl2(
                layer["q_weight"], layer["q_invperm"], layer["q_scale"], layer["q_scale_max"], layer["q_groups"],
                bias=layer.get("bias"), device=dev,
            )
        elif name.startswith("awq"):
            q = QMatrix.from_awq(layer["qweight"], layer["qzeros"], layer["scales"], bias=layer.get("bias"), device=dev)
        else:
            q = QMatrix.from_gptq(
                layer["qweight"], layer["qzeros"], layer["scales"], g_idx=layer.get("g_idx"),
                bias=layer.get("bias"), bits=bits, device=dev,
            )
        with q:
            xt = torch.from_numpy(x).to(dev)
            y = q.matmul(xt)  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            reps = 20
            t0 = time.perf_counter()
            for _ in range(reps):
                y = q.matmul(xt)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = (time.perf_counter() - t0) / reps
            w_exact = np.array_equal(q.dequantize().cpu().numpy().view(np.uint16), layer["weight"].view(np.uint16))
            y_ref = reference.gemm(x, layer["weight"], layer.get("bias"))
            err = float(np.abs(y.cpu().numpy().astype(np.float64) - y_ref).max() / np.abs(y_ref).max())
            worst = max(worst, err)
            print(
                f"  {name}: {q.bits_per_weight:.2f} bpw, m={rows}: max rel. error vs fp64 reference {err:.2e}, "
                f"dequantize bit-exact: {w_exact}, {dt * 1e6:.0f} us per matmul"
            )
            if not w_exact:
                worst = float("inf")
    ok = worst < 2e-3
    print("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
