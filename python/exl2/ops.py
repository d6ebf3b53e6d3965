"""``torch.ops.exl2.gemm``: the quantized matmul as a torch custom operator.

A QMatrix is an opaque native object, which ``torch.compile`` cannot trace. The
operator therefore takes the layer as an ``int`` handle into the registry of
:mod:`exl2.compat` (see :func:`exl2.compat.register_qmatrix`); dynamo treats the
int as a constant and the fake (meta) implementation below gives the output
shape, so a module calling the op compiles with ``fullgraph=True`` and no graph
break. Handles from ``exl2.compat.make_q_matrix`` work here as well.

The op has no autograd formula: quantized weights are frozen and gradients with
respect to ``x`` are not supported.
"""

from __future__ import annotations

import torch

from .compat import get_qmatrix

__all__ = ["gemm"]


@torch.library.custom_op("exl2::gemm", mutates_args=())
def gemm(x: torch.Tensor, handle: int) -> torch.Tensor:
    """``x @ W (+ bias)`` for the QMatrix registered under ``handle``.

    Args:
        x: float16 or bfloat16 ``[..., in_features]`` on the layer's device.
        handle: a key of :data:`exl2.compat.registry`.

    Returns:
        ``[..., out_features]`` in x's dtype (float32 accumulation, see
        :meth:`exl2.QMatrix.matmul`).
    """
    return get_qmatrix(handle).matmul(x)


@gemm.register_fake
def _gemm_fake(x: torch.Tensor, handle: int) -> torch.Tensor:
    # Only the shape is needed; the registry knows N. The checks mirror QMatrix.matmul
    # so that tracing fails the same way eager execution would.
    q = get_qmatrix(handle)
    torch._check(
        x.dtype in (torch.float16, torch.bfloat16),
        lambda: f"x: expected dtype torch.float16 or torch.bfloat16, got {x.dtype}",
    )
    torch._check(
        x.dim() >= 1 and x.shape[-1] == q.in_features,
        lambda: f"x: expected shape [..., {q.in_features}] (in_features), got {list(x.shape)}",
    )
    return x.new_empty((*x.shape[:-1], q.out_features))  # x's dtype and device
