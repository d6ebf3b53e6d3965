"""exl2: fast, owning, deterministic quantized matrix multiplication for EXL2, GPTQ and AWQ weights.

>>> q = exl2.QMatrix.from_gptq(qweight, qzeros, scales, g_idx=g_idx)
>>> y = q.matmul(x)          # x: float16 [..., K] -> float16 [..., N]
"""

from __future__ import annotations

from ._loader import load_extension
from .qmatrix import QMatrix
from . import reference
from . import compat, loaders, nn, ops, parallel
from .loaders import load_awq, load_exl2, load_gptq
from .nn import QuantLinear

_ext = load_extension()

__version__: str = _ext.version()
CudaError = _ext.CudaError
UnsupportedError = _ext.UnsupportedError


def built_with_cuda() -> bool:
    """True when the extension was compiled with the CUDA backend."""
    return bool(_ext.built_with_cuda())


def cuda_architectures() -> str:
    """The CUDA architectures the kernels were compiled for ("" without CUDA)."""
    return str(_ext.cuda_architectures())


def cuda_device_count() -> int:
    """CUDA devices usable by exl2 (0 without CUDA build, driver or device)."""
    return int(_ext.cuda_device_count())


__all__ = [
    "QMatrix",
    "reference",
    "compat",
    "loaders",
    "nn",
    "ops",
    "parallel",
    "load_exl2",
    "load_gptq",
    "load_awq",
    "QuantLinear",
    "CudaError",
    "UnsupportedError",
    "built_with_cuda",
    "cuda_architectures",
    "cuda_device_count",
    "__version__",
]
