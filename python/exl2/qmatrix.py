"""The Python face of ``exl2::QMatrix``: a quantized weight that owns its memory."""

from __future__ import annotations

import contextlib
import operator
import os
from typing import Any, Iterator, Optional

import torch

from ._convert import (
    DeviceLike,
    as_optional_tensor,
    as_tensor,
    check_memory,
    native_view,
    parse_device,
    stream_handle,
)
from ._loader import load_extension

_ext = load_extension()

__all__ = ["QMatrix"]

# Layers in the canonical layout (by default below compute capability 9.0, or EXL2_CUDA_TC=0 at construction): from this
# many rows on, matmul on CUDA dequantizes into a scratch tensor (in x's dtype) and runs a dense GEMM in that dtype
# (cuBLAS through torch, fp32 accumulation) instead of the library's kernels. Measured on the H100 (same run, every
# bench layer): the float16 GEMV beats that route up to m = 12 (8192x28672 GPTQ-4 at m = 9: 288 against 398 us;
# m = 12: 311 against 398 us), is level at m = 16, and the fused canonical-layout kernel above m = 16 is 2-7x slower
# than it. The bfloat16 GEMV spills registers from m = 9 on (unmeasured there), so bfloat16 keeps 9. The C++ library
# keeps its own kernels for every m (no cuBLAS dependency). Layers in the tensor-core layout: _native_max_rows.
_DENSE_MIN_ROWS = {torch.float16: 13, torch.bfloat16: 9}


def _dense_min_rows_from_env() -> dict:
    """EXL2_DENSE_MIN_ROWS (read at import) sets that threshold for both dtypes, e.g. to measure the native
    kernels at every m (``EXL2_DENSE_MIN_ROWS=1000000 python -m exl2 bench``)."""
    value = os.environ.get("EXL2_DENSE_MIN_ROWS")
    if value is None or value == "":
        return dict(_DENSE_MIN_ROWS)
    try:
        rows = int(value)
    except ValueError:
        rows = 0
    if rows < 1:
        raise ValueError(f"EXL2_DENSE_MIN_ROWS: expected a positive integer, got {value!r}")
    return {dtype: rows for dtype in _DENSE_MIN_ROWS}


_DENSE_MIN_ROWS = _dense_min_rows_from_env()
# Layers in the tensor-core stream layout (QMatrix.tensor_core_layout: CUDA, compute capability
# 9.0+ by default, 8.0+ with EXL2_CUDA_TC=1 at construction) stay native up to m = _TC_MAX_ROWS:
# the library's tensor-core kernels (src/cuda/tc_gemm.cu, tc_wgmma.cu) stream each weight byte
# once per call, 0.4-0.9x the dense fp16 time at m <= 64 on large layers (H100), where the dense
# route costs an extra write and read of the whole weight. Layers in the canonical layout follow
# _DENSE_MIN_ROWS alone.
_TC_MAX_ROWS = 64
# On compute capability 9.0 (H100, H200) with a build that holds sm_90a code, the tc layout also
# has the library's wgmma kernel (src/cuda/tc_wgmma.cu), which serves m up to _WGMMA_MAX_ROWS
# natively on layers of at least _WGMMA_MIN_WEIGHTS weights. Measured on the H100 (GPTQ-4, one
# session): 8192x28672 197 / 380 us at m = 128 / 256 against 454 / 458 for the dense route, but
# about 730 against 612 at m = 512; on smaller layers its few blocks lose to the dense route from
# m = 128 on (H200, 4096x4096: 42.7 against about 28 us). On layers of 32 tiles of 128 columns it
# loses from m = 129 (H100, later session, GPTQ-4, m = 129 / 256: 14336x4096 166 / 202 us against
# 113 / 124 for the dense route, 8192x4096 103 / 122 against 67 / 73; level or faster at m <= 128),
# so layers where the warp-specialised kernel does not take over (_WS_MAX_ROWS) stop at 128.
_WGMMA_MAX_ROWS = 128
_WGMMA_MIN_WEIGHTS = 1 << 25
# Up to m = _WS_MAX_ROWS where the warp-specialised wgmma kernel (src/cuda/tc_wgmma_ws.cu) runs:
# its blocks of 128 columns x 256 rows fill at least 4/5 of the multiprocessors at m = 512 (the
# rule of tc_wgmma.cu's config_for). H100, one session (GPTQ-4, m = 512): 8192x28672 572 us
# against 606 for the dense route, 4096x14336 154 against 161; at m = 2048 the dense route wins
# (1668 against 2116 us on 8192x28672).
_WS_MAX_ROWS = 512


def _native_max_rows(device: torch.device, weights: int, tensor_core_layout: bool, n: int) -> int:
    """The largest m that matmul on `device` sends to the library's own kernels instead of the
    dense route (besides _DENSE_MIN_ROWS), for a layer of `weights` = K * N weights and N = `n`
    columns: 0 for the canonical layout, else _TC_MAX_ROWS, or where the wgmma kernels run and
    the layer is large enough _WGMMA_MAX_ROWS, or _WS_MAX_ROWS where the warp-specialised kernel
    takes m = 129.._WS_MAX_ROWS."""
    if device.type != "cuda" or not tensor_core_layout:
        return 0
    if weights < _WGMMA_MIN_WEIGHTS:
        return _TC_MAX_ROWS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(index) == (9, 0) and any(
            a.startswith("90a") for a in _ext.cuda_architectures().split()):
        tiles = -(-n // 128)
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        if tiles * (-(-_WS_MAX_ROWS // 256)) * 5 >= sms * 4:
            return _WS_MAX_ROWS
        return max(_TC_MAX_ROWS, _WGMMA_MAX_ROWS)
    return _TC_MAX_ROWS


# The activation/output dtypes matmul and dequantize support.
_DTYPES = (torch.float16, torch.bfloat16)


def _check_dtype(dtype: Any, name: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise TypeError(f"{name}: expected torch.float16 or torch.bfloat16, got {dtype}")
    return dtype


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """Make ``device`` current for the duration (a no-op for the CPU)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def _infer_device(device: DeviceLike, first: torch.Tensor) -> torch.device:
    dev = parse_device(first.device if device is None else device)
    if dev.type == "cuda":
        # Before torch touches the device: a clear "built without CUDA" / "no CUDA device".
        _ext.check_cuda_device(dev.index)
    return dev


def _place(t: Optional[torch.Tensor], device: torch.device) -> Any:
    """Tensors for construction may live on the CPU or on the target device; CUDA
    tensors on another device are copied to the target (never modified)."""
    if t is None:
        return None
    if t.device.type == "cuda" and t.device != device:
        t = t.to(device)
    return native_view(t)


def _own_bias(bias: Optional[torch.Tensor], device: torch.device) -> Optional[dict]:
    """Private copies of the bias on `device`, one per activation dtype (CUDA only: the
    dense large-m path, whose torch.addmm needs the bias in x's dtype)."""
    if bias is None or device.type != "cuda":
        return None
    return {dt: bias.to(device=device, dtype=dt, copy=True).contiguous() for dt in _DTYPES}


class QMatrix:
    """A quantized linear weight ``W`` of shape ``[in_features, out_features]``.

    Build one with :meth:`from_exl2`, :meth:`from_gptq` or :meth:`from_awq`; the tensors given are
    validated, copied and repacked into memory the QMatrix owns, so they may be
    modified or freed right afterwards. ``matmul`` computes ``x @ W (+ bias)`` for
    float16 or bfloat16 ``x`` (the result has x's dtype) with float32 accumulation;
    ``dequantize`` returns ``W`` in float16 or bfloat16.

    Use ``close()`` (or a ``with`` block) to free the memory before the object is
    garbage collected.
    """

    __slots__ = ("_native", "_device", "_bias", "_k", "_n", "_native_rows")

    def __init__(self, native: Any, device: torch.device, bias: Optional[dict] = None) -> None:
        # Internal: use from_exl2 / from_gptq / from_awq. `bias` holds our own copies on
        # `device` ({dtype: tensor}), used only by the large-m dense path (the native layer
        # holds its own fp16 copy too).
        self._native = native
        self._device = device
        self._bias = bias
        self._k = int(native.in_features)  # cached: read on every matmul
        self._n = int(native.out_features)
        # cached: read on every matmul
        self._native_rows = _native_max_rows(device, self._k * self._n, bool(native.tensor_core_layout), self._n)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_exl2(
        cls,
        q_weight: Any,
        q_invperm: Any,
        q_scale: Any,
        q_scale_max: Any,
        q_groups: Any,
        *,
        q_perm: Any = None,
        bias: Any = None,
        device: DeviceLike = None,
        scale_max_prescaled: bool = False,
    ) -> "QMatrix":
        """Build from EXL2 checkpoint tensors.

        Args:
            q_weight: int32 ``[Q, N]`` packed codes.
            q_invperm: int32 ``[K]`` inverse row permutation.
            q_scale: int32 ``[G, N/8]`` 4-bit scale codes.
            q_scale_max: float16 ``[G]`` per-group maximum scale as stored in checkpoints.
            q_groups: int16 ``[2G]`` (bits, first q_weight row) pairs.
            q_perm: optional int32 ``[K]``; must equal ``argsort(q_invperm)``.
            bias: optional float16 ``[N]``.
            device: target device; ``None`` means the device of ``q_weight``.
            scale_max_prescaled: ``q_scale_max`` was already divided by 256 (the
                reference bindings' convention).
        """
        names = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")
        tensors = [as_tensor(v, n) for v, n in zip((q_weight, q_invperm, q_scale, q_scale_max, q_groups), names)]
        opt = [as_optional_tensor(q_perm, "q_perm"), as_optional_tensor(bias, "bias")]
        for t, n in zip(tensors + opt, names + ("q_perm", "bias")):
            check_memory(t, n)
        dev = _infer_device(device, tensors[0])
        with _on_device(dev):
            native = _ext.QMatrix.from_exl2(
                *[_place(t, dev) for t in tensors],
                _place(opt[0], dev),
                _place(opt[1], dev),
                bool(scale_max_prescaled),
                dev.type,
                dev.index or 0,
                stream_handle(dev),
            )
        return cls(native, dev, _own_bias(opt[1], dev))

    @classmethod
    def from_gptq(
        cls,
        qweight: Any,
        qzeros: Any,
        scales: Any,
        *,
        g_idx: Any = None,
        bias: Any = None,
        zero_format: str = "v1",
        bits: int = 4,
        device: DeviceLike = None,
    ) -> "QMatrix":
        """Build from GPTQ checkpoint tensors (AutoGPTQ packing), 2, 3, 4 or 8 bits.

        Args:
            qweight: int32 ``[K*bits/32, N]``; each column is a little-endian
                ``bits``-bit stream along K (4-bit: 8 codes per word; 3-bit: 32 rows
                in 3 words).
            qzeros: int32 ``[G, N*bits/32]``; each row a ``bits``-bit stream along N.
            scales: float16 ``[G, N]``.
            g_idx: optional int32 ``[K]`` group of each row (act-order checkpoints).
            bias: optional float16 ``[N]``.
            zero_format: ``"v1"`` (AutoGPTQ: stored zero + 1, wrapping to ``bits``
                bits) or ``"v2"`` (zero as stored).
            bits: code width, 2, 3, 4 or 8. The shapes are checked against it (a
                wrong width fails with a message naming the mismatching tensor).
            device: target device; ``None`` means the device of ``qweight``.
        """
        if zero_format not in ("v1", "v2"):
            raise ValueError(f"zero_format: expected 'v1' or 'v2', got {zero_format!r}")
        try:
            nbits = None if isinstance(bits, bool) else operator.index(bits)
        except TypeError:
            nbits = None
        if nbits not in (2, 3, 4, 8):
            raise ValueError(f"bits: expected 2, 3, 4 or 8 for GPTQ, got {bits!r}")
        names = ("qweight", "qzeros", "scales")
        tensors = [as_tensor(v, n) for v, n in zip((qweight, qzeros, scales), names)]
        opt = [as_optional_tensor(g_idx, "g_idx"), as_optional_tensor(bias, "bias")]
        for t, n in zip(tensors + opt, names + ("g_idx", "bias")):
            check_memory(t, n)
        dev = _infer_device(device, tensors[0])
        with _on_device(dev):
            native = _ext.QMatrix.from_gptq(
                *[_place(t, dev) for t in tensors],
                _place(opt[0], dev),
                _place(opt[1], dev),
                zero_format == "v2",
                nbits,
                dev.type,
                dev.index or 0,
                stream_handle(dev),
            )
        return cls(native, dev, _own_bias(opt[1], dev))

    @classmethod
    def from_awq(
        cls,
        qweight: Any,
        qzeros: Any,
        scales: Any,
        *,
        bias: Any = None,
        device: DeviceLike = None,
    ) -> "QMatrix":
        """Build from AWQ 4-bit checkpoint tensors (AutoAWQ "GEMM" packing).

        Args:
            qweight: int32 ``[K, N/8]``, 8 codes per word along N in AWQ's
                interleaved order (nibble ``i`` holds column ``8j + [0,2,4,6,1,3,5,7][i]``).
            qzeros: int32 ``[G, N/8]``, packed the same way; the zero is used as stored.
            scales: float16 ``[G, N]``; group ``g`` covers rows ``g*K/G .. (g+1)*K/G - 1``.
            bias: optional float16 ``[N]``.
            device: target device; ``None`` means the device of ``qweight``.
        """
        names = ("qweight", "qzeros", "scales")
        tensors = [as_tensor(v, n) for v, n in zip((qweight, qzeros, scales), names)]
        b = as_optional_tensor(bias, "bias")
        for t, n in zip(tensors + [b], names + ("bias",)):
            check_memory(t, n)
        dev = _infer_device(device, tensors[0])
        with _on_device(dev):
            native = _ext.QMatrix.from_awq(
                *[_place(t, dev) for t in tensors],
                _place(b, dev),
                dev.type,
                dev.index or 0,
                stream_handle(dev),
            )
        return cls(native, dev, _own_bias(b, dev))

    # ------------------------------------------------------------------ properties
    @property
    def in_features(self) -> int:
        """K: the length of an input row."""
        return int(self._native.in_features)

    @property
    def out_features(self) -> int:
        """N: the length of an output row."""
        return int(self._native.out_features)

    @property
    def format(self) -> str:
        """``"exl2"``, ``"gptq"`` (any width) or ``"awq"``."""
        return str(self._native.format)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: codes plus scales (and zeros), as checkpoints count them."""
        return float(self._native.bits_per_weight)

    @property
    def device(self) -> torch.device:
        """The device holding the weights; inputs and results live there."""
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes owned on ``device``."""
        return int(self._native.nbytes)

    @property
    def tensor_core_layout(self) -> bool:
        """True when the codes are held in the tensor-core stream layout: CUDA devices of compute
        capability 9.0+, and 8.0+ with ``EXL2_CUDA_TC=1`` in the environment when the QMatrix was
        built (``EXL2_CUDA_TC=0``: never). False on the CPU and in the canonical layout."""
        return bool(self._native.tensor_core_layout)

    @property
    def has_bias(self) -> bool:
        return bool(self._native.has_bias)

    @property
    def closed(self) -> bool:
        return bool(self._native.closed)

    # ------------------------------------------------------------------- compute
    def _check_input(self, x: Any) -> torch.Tensor:
        if type(x) is not torch.Tensor or x.requires_grad:
            host_array = not isinstance(x, torch.Tensor)
            x = as_tensor(x, "x")
            if host_array and x.device.type == "cpu" and self._device.type == "cuda":
                x = x.to(self._device)  # numpy / host DLPack input: copied to the QMatrix's device
        if x.dtype not in _DTYPES:
            raise TypeError(f"x: expected dtype torch.float16 or torch.bfloat16, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self._k:
            raise ValueError(f"x: expected shape [..., {self._k}] (in_features), got {list(x.shape)}")
        if x.device != self._device:
            raise ValueError(f"x: expected a tensor on {self._device} (the QMatrix's device), got one on {x.device}")
        return x

    def matmul(self, x: Any, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Return ``x @ W (+ bias)`` in x's dtype, accumulated in float32.

        ``x`` is float16 or bfloat16; with dtype ``T`` the result is
        ``round_T(sum_k x[k] * W_T[k, n] + bias[n])`` with ``W_T = dequantize(T)`` (the
        weight rounded once to ``T``) and one final rounding. Except: at most 16 rows on
        CUDA in the tensor-core layout (:attr:`tensor_core_layout`), either dtype, apply the
        scales in float32 to each group's float32 sums of ``x[k] * (q - z)``, i.e. they
        multiply by the exact weight ``(q - z) * s`` rather than its rounding to ``T``
        (the same error bound, against the exact weight; bfloat16 ``x`` beyond about 1e36
        can overflow a group's float32 sum). numpy has no bfloat16:
        bfloat16 input must be a torch tensor (numpy / DLPack arrays are float16).

        Args:
            x: float16 or bfloat16 ``[..., in_features]`` on :attr:`device` (any
                leading batch dims).
            out: optional preallocated contiguous ``[..., out_features]`` tensor of x's
                dtype on :attr:`device`; it is fully overwritten and returned.
        """
        x = self._check_input(x)
        two_d = x.dim() == 2  # the common case: no reshape/view round trips (host overhead per call)
        x2 = x if two_d else x.reshape(-1, self._k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        shape = (x.shape[0], self._n) if two_d else tuple(x.shape[:-1]) + (self._n,)
        if out is None:
            out = torch.empty(shape, dtype=x.dtype, device=self._device)
        else:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
            if out.dtype != x.dtype:
                raise TypeError(f"out: expected dtype {x.dtype} (the dtype of x), got {out.dtype}")
            if tuple(out.shape) != shape:
                raise ValueError(f"out: expected shape {list(shape)}, got {list(out.shape)}")
            if out.device != x.device:
                raise ValueError(f"out: expected a tensor on {self._device}, got one on {out.device}")
            if not out.is_contiguous():
                raise ValueError("out: expected a contiguous tensor")
            if out.requires_grad and torch.is_grad_enabled():
                # matmul writes into `out` outside autograd (as torch's out= functions do,
                # which refuse such tensors too); under torch.no_grad() it is allowed.
                raise ValueError("out: must not require grad (it is written in place outside autograd); "
                                 "pass one with requires_grad=False or call under torch.no_grad()")
        out2 = out if two_d else out.view(-1, self._n)
        rows = x2.shape[0]
        dev = self._device
        bf16 = x.dtype == torch.bfloat16
        if dev.type == "cuda":
            if rows >= max(_DENSE_MIN_ROWS[x.dtype], self._native_rows + 1):
                with _on_device(dev):
                    self._dense_matmul(x2, out2)
                return out
            # The hot decode path: raw pointers of the already-checked tensors (no DLPack
            # export), torch's current stream of the QMatrix's device, no device switch
            # when that device is already current (the native call guards it anyway).
            self._native.gemm_ptr(x2.data_ptr(), rows, out2.data_ptr(), stream_handle(dev),
                                  bf16)
        else:
            self._native.gemm_ptr(x2.data_ptr(), rows, out2.data_ptr(), 0, bf16)
        return out

    def _dense_matmul(self, x2: torch.Tensor, out2: torch.Tensor) -> None:
        """Large m on CUDA: W in x's dtype into a stream-ordered scratch (torch's allocator,
        so CUDA graph capture works), then one dense GEMM in that dtype with the bias in its
        epilogue. For bfloat16 that bias is our bfloat16 copy (torch.addmm needs one dtype):
        it is rounded to bfloat16 before the fp32 addition, unlike the native kernels,
        which add the fp16 bias exactly."""
        if x2.data_ptr() < out2.data_ptr() + out2.numel() * 2 and out2.data_ptr() < x2.data_ptr() + x2.numel() * 2:
            raise ValueError("out: must not overlap x")
        w = self.dequantize(x2.dtype)
        if self._bias is None:
            torch.mm(x2, w, out=out2)
        else:
            torch.addmm(self._bias[x2.dtype], x2, w, out=out2)

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """Return the dense weight ``W`` as ``[in_features, out_features]`` in ``dtype``.

        ``dtype`` is torch.float16 (bit-exact with the reference kernels) or
        torch.bfloat16: ``W_T = round_T((q - z) * s)``, the exact float32 product of the
        integer ``q - z`` and the fp16 scale, rounded once (to nearest even).
        """
        _check_dtype(dtype, "dtype")
        out = torch.empty((self.in_features, self.out_features), dtype=dtype, device=self._device)
        with _on_device(self._device):
            self._native.dequantize(native_view(out), stream_handle(self._device))
        return out

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the owned memory now. Later calls raise ValueError."""
        self._native.close()
        self._bias = None

    def __enter__(self) -> "QMatrix":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "QMatrix(closed)"
        return (
            f"QMatrix(format={self.format!r}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bits_per_weight={self.bits_per_weight:.3f}, device={str(self._device)!r})"
        )
