"""``QuantLinear``: a ``torch.nn.Module`` around a QMatrix.

Forward calls the custom operator ``torch.ops.exl2.gemm`` (see :mod:`exl2.ops`),
so models using it compile with ``torch.compile(fullgraph=True)``.

Memory: a QMatrix lives on one device and cannot be copied or read back into
checkpoint tensors. To support ``.to(device)`` and ``state_dict()``, a
QuantLinear keeps the layer's checkpoint tensors (its *source*) as a CPU copy, a
plain attribute rather than buffers, so that ``Module.to`` never moves it. That
costs host memory about equal to the layer's checkpoint size (and no GPU
memory). ``state_dict()`` returns these CPU tensors under their checkpoint names
(``q_weight``, ... / ``qweight``, ...), and ``load_state_dict()`` rebuilds the
QMatrix from them on the module's device. Pass ``keep_source=False`` to drop the
copy; such a layer cannot change device and contributes nothing to ``state_dict()``.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from . import ops as _ops  # noqa: F401  (registers torch.ops.exl2.gemm)
from ._convert import DeviceLike, as_tensor, parse_device
from .compat import register_qmatrix, unregister_qmatrix
from .loaders import (TENSOR_NAMES, Source, detect_format, layer_format, qmatrix_from_tensors, read_awq_tensors,
                      read_exl2_tensors, read_gptq_tensors)
from .qmatrix import QMatrix

__all__ = ["QuantLinear"]


def _release(handle: int, close: bool) -> None:
    """Finalizer: drop the registry entry (and free the QMatrix if the module built it)."""
    try:
        q = unregister_qmatrix(handle)
    except ValueError:
        return
    if close:
        q.close()


def _cpu_copy(tensors: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    # A copy, never a view: the caller may modify or free its tensors afterwards.
    return {k: as_tensor(v, k).to("cpu", copy=True) for k, v in tensors.items()}


class QuantLinear(torch.nn.Module):
    """``y = x @ W (+ bias)`` with a quantized ``W`` (EXL2, GPTQ or AWQ); x is float16 or bfloat16
    ``[..., K]`` and y has x's dtype (see :meth:`exl2.QMatrix.matmul`).

    Build with ``QuantLinear(qmatrix)`` (the module does not close a QMatrix it was
    given), :meth:`from_tensors` or :meth:`from_state_dict`.

    Args:
        qmatrix: the weight.
        source: the checkpoint tensors ``qmatrix`` was built from (the dict layout of
            ``exl2.reference.random_*``); kept as a CPU copy for ``.to()`` and
            ``state_dict()``. Without it the module is pinned to its device.
        zero_format: GPTQ zero convention of ``source`` (``"v1"`` or ``"v2"``).
    """

    def __init__(self, qmatrix: QMatrix, *, source: Optional[Mapping[str, Any]] = None,
                 zero_format: str = "v1") -> None:
        super().__init__()
        if not isinstance(qmatrix, QMatrix):
            raise TypeError(f"qmatrix: expected an exl2.QMatrix, got {type(qmatrix).__name__}")
        if zero_format not in ("v1", "v2"):
            raise ValueError(f"zero_format: expected 'v1' or 'v2', got {zero_format!r}")
        self.zero_format = zero_format
        self._source: Optional[Dict[str, torch.Tensor]] = None
        if source is not None:
            if detect_format(source) != qmatrix.format:
                raise ValueError(f"source: holds {detect_format(source)} tensors, qmatrix is {qmatrix.format}")
            names = TENSOR_NAMES[qmatrix.format]
            self._source = _cpu_copy({k: source[k] for k in names[0] + names[1] if source.get(k) is not None})
        self._finalizer: Optional[Callable[[], None]] = None
        self._attach(qmatrix, owned=False)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any], *, format: Optional[str] = None,  # noqa: A002
                     zero_format: str = "v1", device: DeviceLike = None, keep_source: bool = True) -> "QuantLinear":
        """From a format-tensor dict (extra keys ignored); ``format`` is detected when ``None``
        (see :func:`exl2.loaders.qmatrix_from_tensors`); ``device=None`` keeps the tensors' device."""
        q = qmatrix_from_tensors(tensors, format=format, zero_format=zero_format, device=device)
        m = cls(q, source=tensors if keep_source else None, zero_format=zero_format)
        m._take_ownership()
        return m

    @classmethod
    def from_state_dict(cls, sd: Source, prefix: str, format: Optional[str] = None, *,  # noqa: A002
                        device: DeviceLike = None, keep_source: bool = True, bits: Optional[int] = None,
                        group_size: Optional[int] = None, desc_act: Optional[bool] = None,
                        zero_format: Optional[str] = None) -> "QuantLinear":
        """From the tensors ``<prefix>.<name>`` of a state dict, safetensors file or model
        directory (see :mod:`exl2.loaders`). ``format`` (``"exl2"``/``"gptq"``/``"awq"``) is
        detected when ``None`` and honoured otherwise (GPTQ tensors requested as AWQ, or AWQ
        as GPTQ, are rejected); the GPTQ settings are those of :func:`exl2.load_gptq`
        (``group_size`` also applies to AWQ)."""
        fmt = layer_format(sd, prefix) if format is None else format
        if fmt == "exl2":
            tensors, zf = read_exl2_tensors(sd, prefix), "v1"
        elif fmt == "gptq":
            tensors, zf = read_gptq_tensors(sd, prefix, bits=bits, group_size=group_size, desc_act=desc_act,
                                            zero_format=zero_format)
        elif fmt == "awq":
            tensors, zf = read_awq_tensors(sd, prefix, group_size=group_size), "v1"
        else:
            raise ValueError(f"format: expected 'exl2', 'gptq', 'awq' or None, got {format!r}")
        return cls.from_tensors(tensors, format=fmt, zero_format=zf, device=device, keep_source=keep_source)

    def _attach(self, qmatrix: QMatrix, owned: bool) -> None:
        """Make ``qmatrix`` the weight, releasing the previous one."""
        old = self._finalizer
        self.qmatrix = qmatrix
        self.handle = register_qmatrix(qmatrix)
        # The finalizer must not reference self; it keeps only the handle.
        self._finalizer = weakref.finalize(self, _release, self.handle, owned)
        if old is not None:
            old()

    def _take_ownership(self) -> None:
        """The module built its QMatrix itself: close it when the module goes away."""
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _release, self.handle, True)

    def close(self) -> None:
        """Free the weight now (if this module built it); the module is unusable after."""
        self._finalizer()

    # ----------------------------------------------------------------- properties
    @property
    def in_features(self) -> int:
        return self.qmatrix.in_features

    @property
    def out_features(self) -> int:
        return self.qmatrix.out_features

    @property
    def format(self) -> str:
        return self.qmatrix.format

    @property
    def bits_per_weight(self) -> float:
        return self.qmatrix.bits_per_weight

    @property
    def device(self) -> torch.device:
        return self.qmatrix.device

    # -------------------------------------------------------------------- compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float16/bfloat16 ``[..., in_features]`` -> ``[..., out_features]`` of the same dtype on :attr:`device`."""
        return torch.ops.exl2.gemm(x, self.handle)

    def extra_repr(self) -> str:
        if self.qmatrix.closed:
            return "closed"
        return (f"format={self.format}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bits_per_weight={self.bits_per_weight:.2f}, bias={self.qmatrix.has_bias}, device={self.device}")

    # -------------------------------------------------------- device moves, state
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "QuantLinear":
        # Module.to/cuda/cpu reach us only as a tensor->tensor function. Applying it to an
        # integer probe reveals the target device; dtype casts (.half(), .bfloat16()) leave
        # integer tensors alone: the layer has no dtype of its own, it computes in the dtype
        # of each input (float16 or bfloat16).
        target = fn(torch.empty(0, dtype=torch.int32, device=self.device)).device
        target = parse_device(target)
        if target != self.device:
            if self._source is None:
                raise RuntimeError(
                    f"QuantLinear: cannot move from {self.device} to {target}: built without its source "
                    "tensors (keep_source=False or QuantLinear(qmatrix) without source=)"
                )
            q = qmatrix_from_tensors(self._source, format=self.format, zero_format=self.zero_format, device=target)
            self._attach(q, True)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name, t in (self._source or {}).items():
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        required, optional = TENSOR_NAMES[self.format]
        ours = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        missing = [prefix + n for n in required if n not in ours]
        if strict:
            unexpected_keys.extend(prefix + n for n in ours if n not in required + optional)
        if missing:
            missing_keys.extend(missing)
            return
        tensors = {n: ours[n] for n in required + optional if n in ours}
        where = prefix.rstrip(".") or "QuantLinear"
        try:
            fmt = detect_format(tensors)
        except ValueError as exc:
            error_msgs.append(f"While loading {where}: {exc}")
            return
        if fmt != self.format:
            error_msgs.append(f"While loading {where}: the state dict holds {fmt} tensors, but this QuantLinear is "
                              f"{self.format}; build a new module (QuantLinear.from_state_dict) to change format")
            return
        try:
            q = qmatrix_from_tensors(tensors, format=self.format, zero_format=self.zero_format, device=self.device)
        except (TypeError, ValueError) as exc:
            error_msgs.append(f"While loading {where}: {exc}")
            return
        self._source = _cpu_copy(tensors)
        self._attach(q, True)
