"""Conversions between user inputs (torch tensors, numpy arrays, DLPack producers)
and what the native extension takes.

The extension receives DLPack views. CUDA tensors are exported with
``__dlpack__(stream=-1)`` ("no synchronisation"), because the compute stream is
passed to the native call explicitly; a plain export would synchronise with the
legacy default stream and break CUDA graph capture.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch

DeviceLike = Union[str, int, torch.device, None]


def as_tensor(value: Any, name: str) -> torch.Tensor:
    """A torch tensor viewing ``value`` (no copy where possible); TypeError otherwise."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if not value.flags.writeable:
            # torch.from_numpy warns on read-only arrays; a copy keeps the caller's array untouched.
            value = value.copy()
        try:
            return torch.from_numpy(value)
        except (TypeError, ValueError, RuntimeError):
            pass
        # Arrays torch cannot view (negative strides, non-native byte order): a native,
        # contiguous copy; dtypes torch has no equivalent for are a TypeError.
        try:
            return torch.from_numpy(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("=")))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name}: unsupported numpy array (dtype {value.dtype}): {exc}") from exc
    if hasattr(value, "__dlpack__"):
        try:
            return torch.from_dlpack(value)
        except (BufferError, ValueError, RuntimeError, TypeError) as exc:
            raise ValueError(f"{name}: could not import it through DLPack: {exc}") from exc
    raise TypeError(
        f"{name}: expected a torch.Tensor, a numpy.ndarray or a DLPack-compatible array, "
        f"got {type(value).__name__}"
    )


def as_optional_tensor(value: Any, name: str) -> Optional[torch.Tensor]:
    return None if value is None else as_tensor(value, name)


def check_memory(t: Optional[torch.Tensor], name: str) -> None:
    """Weights must live in CPU or CUDA memory (not meta, mps, ...)."""
    if t is not None and t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a tensor in CPU or CUDA memory, got one on {t.device}")


def parse_device(device: DeviceLike, name: str = "device") -> torch.device:
    """Normalise a device spec to a torch.device of type cpu or cuda (with an index)."""
    try:
        dev = torch.device(device) if not isinstance(device, torch.device) else device
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name}: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        return dev
    raise ValueError(f"{name}: expected a cpu or cuda device, got {dev}")


def native_view(t: torch.Tensor) -> Any:
    """What to hand to the extension for tensor ``t``: the tensor itself on the CPU, a
    no-sync DLPack capsule on CUDA (the caller must have made t.device current)."""
    if t.device.type == "cuda":
        return t.__dlpack__(stream=-1)
    return t


# torch's C-level getter of the current stream's raw handle (what its own compiled kernels
# use): about 2 us cheaper per call than building a torch.cuda.Stream object. CPU-only torch
# builds lack it.
_raw_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on ``device`` (0 on the CPU)."""
    if device.type == "cuda":
        if _raw_current_stream is not None and device.index is not None:
            return int(_raw_current_stream(device.index))
        return int(torch.cuda.current_stream(device).cuda_stream)
    return 0
