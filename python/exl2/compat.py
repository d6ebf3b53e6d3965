"""Drop-in for the reference bindings (ExLlamaV2's extension as vendored by LoRAX,
text-generation-inference and GPTQModel): ``make_q_matrix``, ``gemm_half_q_half``
and ``free_q_matrix`` with the same positional arguments and the same results.

Differences from the reference, all in the caller's favour:

- The weight tensors are copied into memory the QMatrix owns: they are never
  modified (the reference reorders GPTQ ``qweight`` in place) and may be freed
  right after ``make_q_matrix``. Only the two GPTQ act-order output buffers
  ``q_perm`` / ``q_invperm`` are written.
- ``temp_dq`` is checked for size but never used or kept: the library has its own
  scratch space.
- Handles are small integers, not pointers. A freed or unknown handle raises
  ValueError instead of crashing, and handles are never reused.
- CPU tensors work too (for tests and for machines without a GPU).

Handle registry
---------------
``make_q_matrix`` returns a key into :data:`registry`, a module-level
``dict[int, QMatrix]`` (exposed read-only). Entries stay until
:func:`free_q_matrix`; the registry holds a strong reference, so a layer that is
never freed is never collected (as with the reference). :func:`register_qmatrix`
/ :func:`unregister_qmatrix` let other code (``exl2.nn``, ``exl2.ops``) put its
own QMatrix objects in the same registry, so one integer handle works with both
``gemm_half_q_half`` and ``torch.ops.exl2.gemm``.

Permutation dtypes
------------------
The reference passes ``q_perm`` / ``q_invperm`` as int16 and reads them as
*unsigned* 16-bit values. We do the same, so int16 permutations describe layers
with ``K <= 65536`` rows; int32 permutations are accepted for any ``K``.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import types
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from .qmatrix import QMatrix
from .reference import exl2_group_map

__all__ = [
    "make_q_matrix",
    "gemm_half_q_half",
    "free_q_matrix",
    "register_qmatrix",
    "unregister_qmatrix",
    "get_qmatrix",
    "registry",
    "NONE_TENSOR",
]

#: The reference's "argument not used" marker; any tensor on the ``meta`` device works.
NONE_TENSOR = torch.empty((1, 1), device="meta")

_registry: Dict[int, QMatrix] = {}
_lock = threading.Lock()
# Handles are never reused, so a stale handle can never alias a newer layer.
_next_handle = itertools.count(1)

#: Read-only view of the handle registry: ``{handle: QMatrix}``.
registry: Mapping[int, QMatrix] = types.MappingProxyType(_registry)

_PERM_DTYPES = (torch.int16, torch.int32)


@atexit.register
def _drop_registry() -> None:
    # Servers rarely free their handles. Dropping the registry's references at exit lets
    # the layers be collected before the extension is torn down (nanobind would report
    # them as leaked otherwise).
    with _lock:
        _registry.clear()


# --------------------------------------------------------------------- registry
def register_qmatrix(qmatrix: QMatrix) -> int:
    """Put ``qmatrix`` in the registry and return its new handle.

    The registry keeps a strong reference but does not take ownership: whoever
    registered it decides whether to ``close()`` it after :func:`unregister_qmatrix`
    (``free_q_matrix`` closes it).
    """
    if not isinstance(qmatrix, QMatrix):
        raise TypeError(f"qmatrix: expected an exl2.QMatrix, got {type(qmatrix).__name__}")
    with _lock:
        handle = next(_next_handle)
        _registry[handle] = qmatrix
    return handle


def _check_handle(handle: Any, name: str) -> int:
    # bool is an int subclass, but True as a handle is certainly a mistake.
    if isinstance(handle, bool) or not isinstance(handle, (int, np.integer)):
        raise TypeError(f"{name}: expected an int handle from make_q_matrix, got {type(handle).__name__}")
    return int(handle)


def _lookup(handle: Any, name: str) -> QMatrix:
    h = _check_handle(handle, name)
    try:
        return _registry[h]
    except KeyError:
        raise ValueError(f"{name}: {h} is not a live exl2 handle (never created, or already freed)") from None


def get_qmatrix(handle: int) -> QMatrix:
    """The QMatrix behind ``handle``; ValueError if it is unknown or was freed."""
    return _lookup(handle, "handle")


def unregister_qmatrix(handle: int) -> QMatrix:
    """Remove ``handle`` from the registry and return its QMatrix (not closed)."""
    h = _check_handle(handle, "handle")
    with _lock:
        q = _registry.pop(h, None)
    if q is None:
        raise ValueError(f"handle: {h} is not a live exl2 handle (never created, or already freed)")
    return q


def free_q_matrix(handle: int) -> None:
    """Free the layer behind ``handle`` (its memory is released now). Later use of the
    handle raises ValueError."""
    unregister_qmatrix(handle).close()


# ------------------------------------------------------------------ make_q_matrix
def _is_none(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def _check_tensor_args(args: Mapping[str, Any]) -> None:
    for name, value in args.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name}: expected a torch.Tensor (a meta tensor for 'not used'), got {type(value).__name__}"
            )


def _require(args: Mapping[str, torch.Tensor], names: tuple, fmt: str) -> None:
    for name in names:
        if _is_none(args[name]):
            raise ValueError(f"{name}: required for {fmt}, got a meta ('not used') tensor")


def _forbid(args: Mapping[str, torch.Tensor], names: tuple, fmt: str) -> None:
    for name in names:
        if not _is_none(args[name]):
            raise ValueError(f"{name}: not used for {fmt}; pass a meta tensor (NONE_TENSOR)")


def _perm_in(t: torch.Tensor, name: str, K: Optional[int]) -> torch.Tensor:
    """An input permutation (int16 read as unsigned, or int32) as int32 ``[K]``;
    ``K=None`` takes it from ``t`` itself."""
    if t.dtype not in _PERM_DTYPES:
        raise TypeError(f"{name}: expected dtype torch.int16 or torch.int32, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [K], got shape {list(t.shape)}")
    K = int(t.shape[0]) if K is None else K
    if t.shape[0] != K:
        raise ValueError(f"{name}: expected shape [{K}] (K), got {list(t.shape)}")
    if t.dtype == torch.int16:
        if K > 65536:
            raise ValueError(f"{name}: int16 permutations describe at most 65536 rows, got K = {K}; pass int32")
        return (t.to(torch.int32) & 0xFFFF).contiguous()
    return t.contiguous()


def _perm_out_check(t: torch.Tensor, name: str, K: int) -> None:
    if t.dtype not in _PERM_DTYPES:
        raise TypeError(f"{name}: expected dtype torch.int16 or torch.int32 (output buffer), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != K:
        raise ValueError(f"{name}: expected an output buffer of shape [{K}] (K), got {list(t.shape)}")
    if t.dtype == torch.int16 and K > 65536:
        raise ValueError(f"{name}: an int16 buffer holds at most 65536 row indices, got K = {K}; pass int32")


def _perm_out_write(dst: torch.Tensor, values: torch.Tensor) -> None:
    if dst.dtype == torch.int16:
        # Store as the reference does: the unsigned 16-bit value in int16 storage.
        values = (values + 32768) % 65536 - 32768
    dst.copy_(values.to(dst.dtype))


def _check_temp_dq(temp_dq: torch.Tensor, K: int, N: int) -> None:
    if temp_dq.dtype != torch.float16:
        raise TypeError(f"temp_dq: expected dtype torch.float16, got {temp_dq.dtype}")
    if temp_dq.numel() < K * N:
        raise ValueError(
            f"temp_dq: expected at least K*N = {K}*{N} = {K * N} float16 elements "
            f"(size it for the largest layer), got {temp_dq.numel()}"
        )


def _check_group_map(q_group_map: torch.Tensor, q_groups: torch.Tensor, Q: int, K: int) -> None:
    if q_group_map.dtype != torch.int16:
        raise TypeError(f"q_group_map: expected dtype torch.int16, got {q_group_map.dtype}")
    if q_group_map.dim() != 1 or q_group_map.shape[0] != 2 * K:
        raise ValueError(f"q_group_map: expected shape [{2 * K}] (2*K), got {list(q_group_map.shape)}")
    groups = q_groups.cpu().numpy().astype(np.int64)
    groups[1::2] &= 0xFFFF  # start rows are stored as int16 and read as unsigned
    want = exl2_group_map(groups, Q, K)
    got = q_group_map.cpu().numpy()
    if not np.array_equal(got, want):
        i = int(np.nonzero(got != want)[0][0])
        raise ValueError(
            f"q_group_map: inconsistent with q_groups: element {i} (row {i // 2}) is {int(got[i])}, "
            f"expected {int(want[i])} (pairs (group, rows_in_group - row_in_group))"
        )


# QMatrix.from_gptq names its arguments as checkpoints do; report the names of this API.
_GPTQ_NAMES = {"qweight": "q_weight", "qzeros": "gptq_qzeros", "scales": "gptq_scales", "g_idx": "gptq_g_idx"}


def _renamed(exc: Exception) -> Exception:
    msg = str(exc)
    name, sep, rest = msg.partition(":")
    if sep and name in _GPTQ_NAMES:
        msg = _GPTQ_NAMES[name] + sep + rest
    return type(exc)(msg)


def make_q_matrix(
    q_weight: torch.Tensor,
    q_perm: torch.Tensor,
    q_invperm: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    q_group_map: torch.Tensor,
    gptq_qzeros: torch.Tensor,
    gptq_scales: torch.Tensor,
    gptq_g_idx: torch.Tensor,
    temp_dq: torch.Tensor,
) -> int:
    """Build a layer the reference way and return its handle.

    Every argument is a tensor; one on the ``meta`` device (:data:`NONE_TENSOR`)
    means "not used". The layer lives on ``q_weight``'s device.

    - EXL2 (``q_scale`` real): ``q_weight``, ``q_invperm``, ``q_scale``,
      ``q_scale_max``, ``q_groups`` required; ``q_scale_max`` is ALREADY divided
      by 256 by the caller; ``q_perm`` (``argsort(q_invperm)``) and
      ``q_group_map`` (int16 ``[2K]``) are optional and checked when given.
    - GPTQ 4-bit, AutoGPTQ "v1" zeros (``gptq_qzeros`` real): ``q_weight`` is
      ``qweight``, ``gptq_scales`` float16. With ``gptq_g_idx`` (CPU or GPU),
      ``q_perm`` and ``q_invperm`` are output buffers (int16/int32 ``[K]``) that
      receive the rows sorted by group (stable) and its inverse; without it they
      must be meta.
    - ``temp_dq``: float16, at least ``K*N`` elements; checked, never used or kept.

    Raises:
        TypeError: an argument is not a tensor or has the wrong dtype.
        ValueError: inconsistent shapes or values; the message names the argument.
    """
    args = {
        "q_weight": q_weight, "q_perm": q_perm, "q_invperm": q_invperm, "q_scale": q_scale,
        "q_scale_max": q_scale_max, "q_groups": q_groups, "q_group_map": q_group_map,
        "gptq_qzeros": gptq_qzeros, "gptq_scales": gptq_scales, "gptq_g_idx": gptq_g_idx, "temp_dq": temp_dq,
    }
    _check_tensor_args(args)
    _require(args, ("q_weight",), "any format")
    if q_weight.dim() != 2:
        raise ValueError(f"q_weight: expected a 2-D tensor, got shape {list(q_weight.shape)}")
    exl2_fmt, gptq_fmt = not _is_none(q_scale), not _is_none(gptq_qzeros)
    if exl2_fmt and gptq_fmt:
        raise ValueError("q_scale and gptq_qzeros: both given; pass exactly one (EXL2 or GPTQ), the other as meta")
    if not (exl2_fmt or gptq_fmt):
        raise ValueError("q_scale and gptq_qzeros: both meta; pass q_scale for EXL2 or gptq_qzeros for GPTQ")
    device = q_weight.device
    N = int(q_weight.shape[1])

    if exl2_fmt:
        _require(args, ("q_invperm", "q_scale_max", "q_groups"), "EXL2")
        _forbid(args, ("gptq_scales", "gptq_g_idx"), "EXL2")
        invperm = _perm_in(q_invperm, "q_invperm", None)
        K = int(invperm.shape[0])
        perm = None if _is_none(q_perm) else _perm_in(q_perm, "q_perm", K)
        _check_temp_dq(temp_dq, K, N)
        q = QMatrix.from_exl2(q_weight, invperm, q_scale, q_scale_max, q_groups, q_perm=perm,
                              device=device, scale_max_prescaled=True)
        if not _is_none(q_group_map):
            try:
                _check_group_map(q_group_map, q_groups, int(q_weight.shape[0]), K)
            except BaseException:
                q.close()
                raise
        return register_qmatrix(q)

    _require(args, ("gptq_scales",), "GPTQ")
    _forbid(args, ("q_scale_max", "q_groups", "q_group_map"), "GPTQ")
    K = int(q_weight.shape[0]) * 8
    _check_temp_dq(temp_dq, K, N)
    g_idx: Optional[torch.Tensor] = None
    if _is_none(gptq_g_idx):
        _forbid(args, ("q_perm", "q_invperm"), "GPTQ without gptq_g_idx")
    else:
        _require(args, ("q_perm", "q_invperm"), "GPTQ with gptq_g_idx (they are output buffers)")
        _perm_out_check(q_perm, "q_perm", K)
        _perm_out_check(q_invperm, "q_invperm", K)
        if q_perm.data_ptr() == q_invperm.data_ptr():
            raise ValueError("q_perm and q_invperm: expected two distinct output buffers, got the same memory")
        g_idx = gptq_g_idx
    try:
        q = QMatrix.from_gptq(q_weight, gptq_qzeros, gptq_scales, g_idx=g_idx, zero_format="v1", device=device)
    except (TypeError, ValueError) as exc:
        raise _renamed(exc) from exc
    if g_idx is not None:
        # The QMatrix validated g_idx, so the stable sort below is the permutation it uses.
        perm64 = torch.argsort(g_idx.to(torch.int64).cpu(), stable=True)
        invperm64 = torch.argsort(perm64)
        _perm_out_write(q_perm, perm64)
        _perm_out_write(q_invperm, invperm64)
    return register_qmatrix(q)


# --------------------------------------------------------------- gemm_half_q_half
def gemm_half_q_half(a: torch.Tensor, b: int, c: torch.Tensor, force_cuda: bool) -> None:
    """Write ``a @ W`` into ``c`` (fully overwritten; its old contents do not matter).

    Args:
        a: float16 ``[m, K]`` on the layer's device.
        b: handle from :func:`make_q_matrix` (or :func:`register_qmatrix`).
        c: preallocated contiguous float16 ``[m, N]`` on the layer's device.
        force_cuda: accepted for compatibility and ignored. The reference uses it to
            skip its dequantize-then-cuBLAS path for large ``m``; this library picks
            its kernel from ``m`` (and the device) alone, so a call gives the same
            result with either value.
    """
    if not isinstance(force_cuda, (bool, int, np.bool_)):
        raise TypeError(f"force_cuda: expected a bool, got {type(force_cuda).__name__}")
    q = _lookup(b, "b")
    for name, t in (("a", a), ("c", c)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float16:
            raise TypeError(f"{name}: expected dtype torch.float16, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {list(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (the layer's device), got one on {t.device}")
    if not c.is_contiguous():
        raise ValueError("c: expected a contiguous tensor (as from torch.empty)")
    if a.shape[1] != q.in_features:
        raise ValueError(f"a: expected shape [m, {q.in_features}] (K of handle {int(b)}), got {list(a.shape)}")
    if tuple(c.shape) != (a.shape[0], q.out_features):
        raise ValueError(f"c: expected shape [{a.shape[0]}, {q.out_features}] ([m, N]), got {list(c.shape)}")
    q.matmul(a, out=c)
