"""Subprocess worker for tests/test_fuzz.py: runs exl2 calls described by small,
JSON-able *case* dicts, so that a crash of the native code kills this process, not
pytest, and the case that did it is known.

Protocol (one JSON object per line): the worker prints ``{"ready": ...}`` once, then for
every case line it reads on stdin it prints one result line on its (private) stdout.
Everything else the process prints goes to stderr.

A case::

    {"api": "exl2" | "gptq" | "awq" | "matmul",
     "device": "cpu" | "cuda",          # where the QMatrix is built
     "seed": int,                       # values of the base layer and of mutations
     "layer": {...},                    # base layer (see base_layer); GPTQ: "bits" 2/3/4/8;
                                        # matmul: "fmt" and "dtype" (of x: float16 / bfloat16)
     "container": "torch" | "numpy",    # how the arrays are handed over
     "explicit_device": bool,           # pass device= (else inferred from the first tensor)
     "mutations": [{"kind": str, "arg": str, "a": int, "b": int}, ...]}

A result: ``{"outcome": "accepted" | "TypeError" | "ValueError" | "other", "exc_type",
"message", "wrong": None | str, "skipped": None | str}``; ``wrong`` is set when a call
was accepted but gave numbers that differ from the reference (or wrote to its inputs).

Reproduce a case by hand: ``python tests/fuzz_worker.py --replay case.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

EXL2_REQUIRED = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")
EXL2_OPTIONAL = ("q_perm", "bias")
GPTQ_REQUIRED = ("qweight", "qzeros", "scales")
GPTQ_OPTIONAL = ("g_idx", "bias")
AWQ_REQUIRED = ("qweight", "qzeros", "scales")
AWQ_OPTIONAL = ("bias",)
ARGS = {
    "exl2": EXL2_REQUIRED + EXL2_OPTIONAL + ("device", "scale_max_prescaled"),
    "gptq": GPTQ_REQUIRED + GPTQ_OPTIONAL + ("device", "zero_format", "bits"),
    "awq": AWQ_REQUIRED + AWQ_OPTIONAL + ("device",),
    "matmul": ("x", "out"),
}
REQUIRED = {"exl2": EXL2_REQUIRED, "gptq": GPTQ_REQUIRED, "awq": AWQ_REQUIRED}

# Hostile values for element mutations; ints are cast with wrap-around to the array's
# dtype, floats only go into float arrays.
HOSTILE_INTS = (0, 1, -1, 2, 3, 7, 8, 9, 16, 31, 32, 33, 127, 128, 255, 256, 32767, -32768, 65535, 65536,
                2**31 - 1, -(2**31))
HOSTILE_FLOATS = (float("nan"), float("inf"), float("-inf"), 65504.0, -65504.0, 0.0, -0.0, 6e-8, 1e-4, 1.0,
                  -1.0, 70000.0)
NUMPY_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
                "float64", "bool", "complex64", "object")
TORCH_ONLY_DTYPES = ("bfloat16", "complex32")
PY_OBJECTS = ("list", "int", "float", "str", "dict", "np_scalar", "bytes", "tuple")
DEVICE_ARGS = ("tpu", "meta", -1, True, "obj", "cpu:0", "", "cuda:x", 3.5, "mps")
ZERO_FORMATS = ("v3", None, 1, "V1", b"v1", "", "v2 ")
# Invalid `bits` for from_gptq (the valid widths are 2, 3, 4, 8); "np" is np.int64(7).
GPTQ_BAD_BITS = (0, 5, 16, 4.0, True, "4", None, -4, 1, 6, 7, 32, 2**40, 3.5, "np", b"4", [4])
GPTQ_WIDTHS = (2, 3, 4, 8)


def _i(v: int, n: int) -> int:
    """An index in [0, n) from a fuzzed non-negative int (n > 0)."""
    return int(v) % max(int(n), 1)


# ----------------------------------------------------------------------------- base layers
def base_layer(case: Dict[str, Any]) -> Dict[str, Any]:
    """The valid layer a case starts from, as numpy arrays (copies)."""
    from exl2 import reference as R

    rng = np.random.default_rng(case["seed"])
    lay = case["layer"]
    fmt = case["api"] if case["api"] != "matmul" else lay["fmt"]
    N = int(lay["N"])
    if fmt == "exl2":
        groups = [(int(b), int(r)) for b, r in lay["groups"]]
        K = sum(r for _, r in groups)
        d = R.random_exl2(rng, K, N, bits=groups, permute=bool(lay.get("permute", True)), bias=bool(lay.get("bias")))
        arrays = {k: np.array(d[k]) for k in EXL2_REQUIRED}
        arrays["q_perm"] = np.array(d["q_perm"]) if lay.get("q_perm") else None
        arrays["bias"] = np.array(d["bias"]) if lay.get("bias") else None
    elif fmt == "awq":
        K = int(lay["G"]) * int(lay["gs"])
        d = R.random_awq(rng, K, N, group_size=int(lay["gs"]), bias=bool(lay.get("bias")))
        arrays = {k: np.array(d[k]) for k in AWQ_REQUIRED}
        arrays["bias"] = np.array(d["bias"]) if lay.get("bias") else None
    else:
        K = int(lay["G"]) * int(lay["gs"])
        d = R.random_gptq(rng, K, N, group_size=int(lay["gs"]), act_order=bool(lay.get("act_order")),
                          zero_format=lay.get("zero_format", "v1"), bias=bool(lay.get("bias")),
                          with_g_idx=bool(lay.get("g_idx")), bits=int(lay.get("bits", 4)))
        arrays = {k: np.array(d[k]) for k in GPTQ_REQUIRED}
        arrays["g_idx"] = np.array(d["g_idx"]) if d.get("g_idx") is not None else None
        arrays["bias"] = np.array(d["bias"]) if lay.get("bias") else None
    return {"fmt": fmt, "arrays": arrays, "rng": rng}


def gptq_bits_of(kw: Dict[str, Any]) -> int:
    """The GPTQ width a call passes (4 when omitted or not a valid width)."""
    b = kw.get("bits", 4)
    return int(b) if isinstance(b, (int, np.integer)) and not isinstance(b, bool) and int(b) in GPTQ_WIDTHS else 4


# ----------------------------------------------------------------------------- mutations
def _cast_int(v: int, dtype: np.dtype) -> Any:
    if dtype.kind in "iu":
        bits = dtype.itemsize * 8
        v &= (1 << bits) - 1
        if dtype.kind == "i" and v >= 1 << (bits - 1):
            v -= 1 << bits
        return v
    if dtype.kind == "b":
        return bool(v & 1)
    return float(v)


def _set_element(a: np.ndarray, idx: int, value: Any) -> np.ndarray:
    a = np.array(a)  # copy
    if a.size == 0:
        return a
    flat = a.reshape(-1)
    i = _i(idx, flat.size)
    if a.dtype.kind in "fc":
        flat[i] = value if isinstance(value, float) else float(value)
    else:
        flat[i] = _cast_int(int(value) if not isinstance(value, float) or math.isfinite(value) else 0, a.dtype)
    return flat.reshape(a.shape)


def _garbage(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    a = np.array(a)
    raw = rng.integers(0, 256, size=a.nbytes, dtype=np.uint8)
    return raw.view(a.dtype).reshape(a.shape) if a.nbytes else a


def _resize(a: np.ndarray, axis: int, delta: int, rng: np.random.Generator) -> np.ndarray:
    if a.ndim == 0:
        return a
    axis = _i(axis, a.ndim)
    n = a.shape[axis]
    if delta < 0:
        return np.array(np.take(a, np.arange(max(n + delta, 0)), axis=axis))
    extra_shape = list(a.shape)
    extra_shape[axis] = delta
    extra = np.resize(a, extra_shape) if a.size else np.zeros(extra_shape, a.dtype)
    return np.concatenate([a, extra], axis=axis)


def _gptq_regroup(arrays: Dict[str, Any], choice: int, rows_per_word: float = 8) -> None:
    """Give qzeros/scales a different (consistent between them) group count
    (GPTQ: K = qweight rows * 32 / bits; AWQ: rows_per_word = 1)."""
    qz, sc = arrays.get("qzeros"), arrays.get("scales")
    if not isinstance(qz, np.ndarray) or not isinstance(sc, np.ndarray) or qz.ndim != 2 or sc.ndim != 2:
        return
    G = qz.shape[0]
    qw = arrays.get("qweight")
    K = int(qw.shape[0] * rows_per_word) if isinstance(qw, np.ndarray) and qw.ndim == 2 else 8
    new_g = (G + 1, max(G - 1, 1), 2 * G, max(K // 4, 1), K + 8, 3, K // 8 or 1, max(K // 16, 1))[_i(choice, 8)]
    idx = np.arange(new_g) % max(G, 1)
    arrays["qzeros"], arrays["scales"] = np.array(qz[idx]), np.array(sc[idx])


def apply_array_mutation(m: Dict[str, Any], arrays: Dict[str, Any], kw: Dict[str, Any], fmt: str,
                         rng: np.random.Generator) -> None:
    """Mutations on the logical (numpy) values, shapes and dtypes, and on keyword args.
    One that does not apply (e.g. an element of an empty array) leaves the arrays as they are."""
    try:
        _array_mutation(m, arrays, kw, fmt, rng)
    except (IndexError, ValueError, TypeError, OverflowError):
        pass


def _array_mutation(m: Dict[str, Any], arrays: Dict[str, Any], kw: Dict[str, Any], fmt: str,
                    rng: np.random.Generator) -> None:
    kind, arg, a, b = m["kind"], m["arg"], int(m["a"]), int(m["b"])
    t = arrays.get(arg)
    is_arr = isinstance(t, np.ndarray)
    if kind == "set" and is_arr:
        pool = HOSTILE_FLOATS if t.dtype.kind in "fc" else HOSTILE_INTS
        arrays[arg] = _set_element(t, a, pool[_i(b, len(pool))])
    elif kind == "set_random" and is_arr:
        arrays[arg] = _set_element(t, a, int(rng.integers(-(2**31), 2**31)))
    elif kind == "garbage" and is_arr:
        arrays[arg] = _garbage(t, rng)
    elif kind == "dtype" and is_arr:
        name = NUMPY_DTYPES[_i(b, len(NUMPY_DTYPES))]
        with np.errstate(all="ignore"):
            arrays[arg] = t.astype(name)
    elif kind == "resize" and is_arr:
        delta = (-1, 1, -2, 2, -7, 8, -1000)[_i(b, 7)]
        arrays[arg] = _resize(t, a, delta, rng)
    elif kind == "zero_dim" and is_arr and t.ndim:
        arrays[arg] = np.array(np.take(t, [], axis=_i(a, t.ndim)))
    elif kind == "rank" and is_arr:
        choice = _i(b, 5)
        if choice == 0:
            arrays[arg] = t[None]
        elif choice == 1:
            arrays[arg] = t[..., None]
        elif choice == 2:
            arrays[arg] = t.reshape(-1)
        elif choice == 3:
            arrays[arg] = np.array(t.reshape(-1)[0] if t.size else 0, dtype=t.dtype)  # 0-D
        else:
            arrays[arg] = t.reshape(1, 1, -1)
    elif kind == "transpose" and is_arr and t.ndim == 2:
        # a non-contiguous view with another shape (t.T of a [1, n] or [n, 1] array is
        # contiguous, i.e. merely another shape: take every other element of a doubled copy)
        arrays[arg] = t.T if t.T.shape[0] > 1 and t.T.shape[1] > 1 else np.repeat(t.T, 2, axis=1)[:, ::2]
    elif kind == "none":
        arrays[arg] = None
    elif kind == "pyobj":
        arrays[arg] = ("pyobj", PY_OBJECTS[_i(b, len(PY_OBJECTS))])
    elif kind == "swap":
        names = list(arrays)
        other = names[_i(b, len(names))]
        arrays[arg], arrays[other] = arrays.get(other), t
    # ---- EXL2 semantics
    elif kind == "bits" and arg == "q_groups" and is_arr and t.size >= 2:
        pool = (-1, 0, 1, 7, 9, 16, 32767, -32768, 2, 3, 4, 5, 6, 8)
        arrays[arg] = _set_element(t, 2 * _i(a, t.size // 2), pool[_i(b, len(pool))])
    elif kind == "start" and arg == "q_groups" and is_arr and t.size >= 2:
        G = t.size // 2
        g = _i(a, G)
        Q = arrays["q_weight"].shape[0] if isinstance(arrays.get("q_weight"), np.ndarray) and arrays["q_weight"].ndim else 1
        starts = [int(t.reshape(-1)[2 * j + 1]) for j in range(G)]
        prev = starts[g - 1] if g else 0
        nxt = starts[g + 1] if g + 1 < G else Q
        pool = (0, prev, nxt, Q - 1, Q, Q + 1, -1, 32767, -32768, starts[g] + 1, starts[g] - 1, 65535)
        arrays[arg] = _set_element(t, 2 * g + 1, pool[_i(b, len(pool))])
    elif kind == "groups_len" and arg == "q_groups" and is_arr:
        arrays[arg] = _resize(t.reshape(-1), 0, (-1, 1, 2, -2)[_i(b, 4)], rng)
    elif kind == "perm_dup" and is_arr and t.size >= 2:
        flat = t.reshape(-1)
        arrays[arg] = _set_element(t, a, int(flat[_i(b, flat.size)]))
    elif kind == "perm_range" and is_arr and t.size:
        K = t.size
        arrays[arg] = _set_element(t, a, (K, -1, K + 5, 2**31 - 1, -(2**31), K - 1)[_i(b, 6)])
    elif kind == "perm_swap" and is_arr and t.size >= 2:
        u = np.array(t)
        flat = u.reshape(-1)
        i, j = _i(a, flat.size), _i(b, flat.size)
        flat[i], flat[j] = flat[j], flat[i]
        arrays[arg] = u
    elif kind == "k_change" and fmt == "exl2":
        # A new, consistent permutation of a different length: the groups' rows no longer sum to K.
        inv = arrays.get("q_invperm")
        K = inv.size if isinstance(inv, np.ndarray) else 1
        newK = max(1, K + (-1, 1, -8, 8, -32, 32, K)[_i(b, 7)])
        p = rng.permutation(newK).astype(np.int32)
        arrays["q_invperm"] = p
        if isinstance(arrays.get("q_perm"), np.ndarray):
            arrays["q_perm"] = np.argsort(p).astype(np.int32)
    elif kind == "prescaled" and fmt == "exl2":
        kw["scale_max_prescaled"] = bool(b & 1)
    # ---- GPTQ semantics
    elif kind == "gidx_range" and arg == "g_idx" and is_arr and t.size:
        G = arrays["qzeros"].shape[0] if isinstance(arrays.get("qzeros"), np.ndarray) and arrays["qzeros"].ndim else 1
        arrays[arg] = _set_element(t, a, (-1, G, G + 1, 2**31 - 1, -(2**31), 2**16)[_i(b, 6)])
    elif kind == "gidx_move" and arg == "g_idx" and is_arr and t.size:
        flat = t.reshape(-1)
        i = _i(a, flat.size)
        G = arrays["qzeros"].shape[0] if isinstance(arrays.get("qzeros"), np.ndarray) and arrays["qzeros"].ndim else 1
        arrays[arg] = _set_element(t, i, (int(flat[i]) + 1 + _i(b, max(G - 1, 1))) % max(G, 1))
    elif kind == "gidx_shuffle" and arg == "g_idx" and is_arr:
        arrays[arg] = rng.permutation(t.reshape(-1)).astype(t.dtype).reshape(t.shape)
    elif kind == "regroup" and fmt in ("gptq", "awq"):
        _gptq_regroup(arrays, b, 1 if fmt == "awq" else 32 / gptq_bits_of(kw))
    elif kind == "gptq_bits" and fmt == "gptq":  # an invalid `bits` argument
        kw["bits"] = GPTQ_BAD_BITS[_i(b, len(GPTQ_BAD_BITS))]
    elif kind == "gptq_width" and fmt == "gptq":  # another valid width: the shapes disagree with it
        others = [w for w in GPTQ_WIDTHS if w != gptq_bits_of(kw)]
        kw["bits"] = others[_i(b, len(others))]
    elif kind == "gptq_pad" and fmt == "gptq":
        # qweight rows that do not hold whole b-bit rows / qzeros words (K, N not multiples of the unit)
        name = ("qweight", "qzeros")[_i(a, 2)]
        t = arrays.get(name)
        if isinstance(t, np.ndarray) and t.ndim == 2:
            arrays[name] = _resize(t, 0 if name == "qweight" else 1, (1, -1, 2, 3)[_i(b, 4)], rng)
    elif kind == "zero_format" and fmt == "gptq":
        kw["zero_format"] = ZERO_FORMATS[_i(b, len(ZERO_FORMATS))]
    elif kind == "device_arg":
        kw["device"] = DEVICE_ARGS[_i(b, len(DEVICE_ARGS))]


VIEW_KINDS = ("noncontig", "negstride", "fortran", "offset", "expand", "meta", "cuda", "cpu", "bigendian",
              "readonly", "dlpack", "torch_dtype", "requires_grad")


class _DLPackOnly:
    """An object that is only a DLPack producer (neither a torch.Tensor nor a numpy array)."""

    def __init__(self, t: Any) -> None:
        self._t = t

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self._t.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> Any:
        return self._t.__dlpack_device__()


def _py_object(name: str) -> Any:
    return {"list": [1, 2, 3], "int": 7, "float": 1.5, "str": "q", "dict": {"a": 1}, "np_scalar": np.int32(3),
            "bytes": b"\x00\x01", "tuple": (1, 2)}[name]


def to_container(value: Any, container: str, device: str, bf16: bool = False) -> Any:
    """The value as handed over: numpy, or a torch tensor on ``device``. ``bf16``: a
    float32 array holding bfloat16 values becomes a torch.bfloat16 tensor (numpy has no
    bfloat16, so that is always a torch tensor)."""
    import torch

    if isinstance(value, tuple) and len(value) == 2 and value[0] == "pyobj":
        return _py_object(value[1])
    if not isinstance(value, np.ndarray):
        return value
    if bf16 and value.dtype == np.float32:
        t = torch.from_numpy(value if value.strides == () or all(st >= 0 for st in value.strides)
                             else np.ascontiguousarray(value)).to(torch.bfloat16)  # exact: bf16 values
        return t.to(device) if device == "cuda" else t
    if container == "numpy":
        return value
    if value.dtype.kind in "uO" and value.dtype != np.uint8:
        return value  # torch lacks most unsigned types (and objects): hand those over as numpy
    try:
        t = torch.from_numpy(value)  # keeps the strides (a transposed array stays non-contiguous)
    except (TypeError, ValueError, RuntimeError):
        t = torch.from_numpy(np.ascontiguousarray(value))
    return t.to(device) if device == "cuda" else t


def apply_view_mutation(kind: str, value: Any, b: int) -> Any:
    """Mutations of how the same logical values are handed over (strides, device, ...).
    A mutation that does not apply to this value (e.g. on an empty array) leaves it as is."""
    try:
        return _view_mutation(kind, value, b)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return value


def _view_mutation(kind: str, value: Any, b: int) -> Any:
    import torch

    if isinstance(value, np.ndarray):
        if kind == "noncontig" and value.ndim:
            return np.stack([value, value], axis=-1)[..., 0]
        if kind == "negstride" and value.ndim:
            return np.flip(np.flip(value).copy())
        if kind == "fortran" and value.ndim >= 2:
            return np.asfortranarray(value)
        if kind == "offset":
            flat = np.concatenate([np.zeros(3, value.dtype), value.reshape(-1)])
            return flat[3:].reshape(value.shape)
        if kind == "expand" and value.ndim:
            return np.broadcast_to(value.reshape(-1)[:1].reshape((1,) * value.ndim), value.shape)
        if kind == "bigendian" and value.dtype.itemsize > 1:
            return value.astype(value.dtype.newbyteorder(">"))
        if kind == "readonly":
            v = np.array(value)
            v.setflags(write=False)
            return v
        if kind == "dlpack" and value.dtype.kind != "u":
            return _DLPackOnly(torch.from_numpy(np.ascontiguousarray(value)))
        if kind in ("meta", "cuda", "torch_dtype", "requires_grad", "cpu"):
            if value.dtype.kind == "u" and value.dtype != np.uint8:
                return value
            return _view_mutation(kind, torch.from_numpy(np.ascontiguousarray(value)), b)
        return value
    if not isinstance(value, torch.Tensor):
        return value
    t = value
    if kind == "noncontig" and t.dim():
        return torch.stack([t, t], dim=-1)[..., 0]
    if kind == "fortran" and t.dim() == 2:
        return t.t().contiguous().t()
    if kind == "offset":
        flat = torch.cat([torch.zeros(3, dtype=t.dtype, device=t.device), t.reshape(-1)])
        return flat[3:].view(t.shape)
    if kind == "expand" and t.dim():
        if b & 1:  # an enormous stride-0 view: must be rejected without being read
            return t.reshape(-1)[:1].reshape((1,) * t.dim()).expand(*([2**40] + list(t.shape[1:])))
        return t.reshape(-1)[:1].reshape((1,) * t.dim()).expand(*t.shape)
    if kind == "meta":
        return t.to("meta")
    if kind == "cuda" and torch.cuda.is_available():
        return t.cuda()
    if kind == "cpu":
        return t.cpu()
    if kind == "torch_dtype":
        name = TORCH_ONLY_DTYPES[_i(b, len(TORCH_ONLY_DTYPES))]
        try:
            return t.to(getattr(torch, name))
        except (RuntimeError, TypeError):
            return t
    if kind == "requires_grad" and t.is_floating_point():
        return t.detach().clone().requires_grad_(True)
    if kind == "dlpack":
        return _DLPackOnly(t)
    return t


# ----------------------------------------------------------------------------- reference
def logical(value: Any) -> Optional[np.ndarray]:
    """The values a caller handed over, as a numpy array (None if not readable)."""
    import torch

    if isinstance(value, _DLPackOnly):
        value = value._t
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta" or value.numel() > 1 << 24:  # meta, or an enormous stride-0 view
            return None
        v = value.detach().cpu()
        if v.dtype == torch.bfloat16:
            return np.array(v.float().numpy())  # exact (and injective, NaN payloads included)
        if v.dtype == torch.complex32:
            return None
        return np.array(v.numpy())
    if isinstance(value, np.ndarray):
        if value.size > 1 << 24:
            return None
        if value.dtype.byteorder not in ("=", "|"):  # the values, in native byte order
            return value.astype(value.dtype.newbyteorder("="))
        return np.array(value)
    return None


def ref_exl2(q_weight, q_invperm, q_scale, q_scale_max, q_groups, prescaled: bool,
             dtype: str = "float16") -> np.ndarray:
    """Independent dense EXL2 weight (no bit-width ordering rule), float16 [K, N]
    (dtype="bfloat16": float32 holding the products rounded once to bfloat16)."""
    from exl2 import reference as R

    words = np.asarray(q_weight).view(np.uint32).astype(np.uint64)
    Q, N = words.shape
    qg = np.asarray(q_groups).astype(np.int64).reshape(-1)
    bits = qg[0::2]
    starts = qg[1::2] & 0xFFFF
    K = np.asarray(q_invperm).size
    ends = np.append(starts[1:], Q)
    rows = (ends - starts) * 32 // bits
    rows[-1] = K - rows[:-1].sum()
    scales = R.f16_scale_exl2(R.unpack_exl2_scale_codes(q_scale), q_scale_max, prescaled)
    padded = np.concatenate([words, np.zeros((1, N), np.uint64)])
    wp = np.empty((K, N), np.float16 if dtype == "float16" else np.float32)
    r = 0
    for g in range(bits.size):
        i = np.arange(rows[g])
        off = i * bits[g]
        w = starts[g] + off // 32
        sh = (off % 32).astype(np.uint64)
        v = ((padded[w] | (padded[w + 1] << np.uint64(32))) >> sh[:, None]) & np.uint64((1 << bits[g]) - 1)
        centred = (v.astype(np.int64) - (1 << (bits[g] - 1))).astype(np.float32)
        prod = centred * scales[g].astype(np.float32)
        wp[r:r + rows[g]] = prod.astype(np.float16) if dtype == "float16" else R.round_bf16(prod)
        r += rows[g]
    return wp[np.asarray(q_invperm).astype(np.int64).reshape(-1)]


def ref_gptq(qweight, qzeros, scales, g_idx, zero_format: str, bits: int = 4, dtype: str = "float16") -> np.ndarray:
    from exl2 import reference as R

    return R.dequantize_gptq(qweight, qzeros, scales, g_idx, zero_format, bits=bits, dtype=dtype)


def ref_weight(fmt: str, arr: Dict[str, Any], kw: Dict[str, Any], dtype: str) -> np.ndarray:
    """The reference weight (exl2.reference) of a layer in ``dtype`` ("float16": float16
    array; "bfloat16": float32 array of bfloat16 values)."""
    from exl2 import reference as R

    if fmt == "exl2":  # the independent ref_exl2: exl2.reference insists on non-increasing widths, the library not
        return ref_exl2(arr["q_weight"], arr["q_invperm"], arr["q_scale"], arr["q_scale_max"], arr["q_groups"],
                        bool(kw.get("scale_max_prescaled")), dtype)
    if fmt == "awq":
        return R.dequantize_awq(arr["qweight"], arr["qzeros"], arr["scales"], dtype=dtype)
    return ref_gptq(arr["qweight"], arr["qzeros"], arr["scales"], arr.get("g_idx"), kw.get("zero_format", "v1"),
                    gptq_bits_of(kw), dtype)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality of float16 (or float32) arrays where any NaN equals any NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    au, bu = a.view(a.dtype.str.replace("f", "u")), b.view(b.dtype.str.replace("f", "u"))
    both_nan = np.isnan(a) & np.isnan(b)
    return bool(np.all((au == bu) | both_nan))


def gemm_problem(y: np.ndarray, x: np.ndarray, W: np.ndarray, bias: Optional[np.ndarray], dtype: str,
                 device: str = "cpu", what: str = "gemm") -> Optional[str]:
    """y = x @ W (+ bias) within the error bound of one output rounding (float16: 2^-11
    relative, bfloat16: 2^-9; with a factor 2 margin) plus the float32 accumulation
    ((K + 2) 2^-23 of the magnitudes), as tests/test_bf16.py assert_within_bound; on
    CUDA also the dense (cuBLAS) path's slack (tests/test_cuda_bf16.py dense_slack: a
    reduced-precision split-K reduction and, for bfloat16, the bias rounded to bfloat16).
    Entries whose exact value is not finite or overflows the output dtype are skipped."""
    K = W.shape[0]
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    b = bias.astype(np.float64) if bias is not None else 0.0
    with np.errstate(all="ignore"):
        exact = x64 @ W64 + b
        mag = np.abs(x64) @ np.abs(W64) + np.abs(b)
        y = y.astype(np.float64)
        rel = 2.0**-10 if dtype == "float16" else 2.0**-8
        tiny = 2.0**-24 if dtype == "float16" else 2.0**-133
        mag_term = 0.0 if device == "cpu" else rel
        tol = rel * np.abs(exact) + ((K + 2) * 2.0**-23 + mag_term) * mag + tiny
        if device != "cpu":
            tol = tol + rel * np.abs(b)
        limit = 65000.0 if dtype == "float16" else 3.3e38
        ok = np.isfinite(exact) & (np.abs(exact) < limit) & (mag < 3.3e38)  # (mag: no float32 overflow)
        if device != "cpu":
            # the CUDA tensor-core kernels' group sums (m <= 16) add x (q - z) in float32 before the
            # scale: rows whose |x| sum, times the largest |q - z| (255), could overflow it are
            # outside the contract (docs/quickstart.md; only bfloat16 x reaches that, beyond ~1e36)
            ok = ok & (np.abs(x64).sum(axis=1, keepdims=True) * 255.0 < 3.3e38)
        bad_mask = ok & ~(np.abs(y - exact) <= tol)  # NaN y fails
    if np.any(bad_mask):
        bad = tuple(np.argwhere(bad_mask)[0])
        return f"{what} ({dtype}) differs from float64 at {bad}: {y[bad]} vs {exact[bad]} (bound {tol[bad]})"
    return None


def check_gemm(q: Any, W: np.ndarray, bias: Optional[np.ndarray], rng: np.random.Generator,
               dtype: str = "float16") -> Optional[str]:
    """x @ W (+ bias) from the QMatrix against float64, for a small random x of ``dtype``
    (W: the reference weight in that dtype)."""
    import torch

    from exl2 import reference as R

    if not np.all(np.isfinite(W)):
        return None
    K, N = W.shape
    for M in (1, 5):
        x = rng.standard_normal((M, K)) * 0.5
        if dtype == "float16":
            x = x.astype(np.float16)
            xt = torch.from_numpy(x).to(q.device)
        else:
            x = R.round_bf16(x)
            xt = torch.from_numpy(x).to(torch.bfloat16).to(q.device)
        yt = q.matmul(xt)
        if yt.dtype != xt.dtype:
            return f"gemm M={M}: result dtype {yt.dtype} for x of {xt.dtype}"
        y = logical(yt)
        problem = gemm_problem(y, x, W, bias, dtype, q.device.type, f"gemm M={M}")
        if problem:
            return problem
    return None


# ----------------------------------------------------------------------------- running cases
def _classify(exc: BaseException) -> str:
    if type(exc) is TypeError or (isinstance(exc, TypeError) and not isinstance(exc, ValueError)):
        return "TypeError"
    if isinstance(exc, ValueError):
        return "ValueError"
    return "other"


def _snapshot(values: Dict[str, Any]) -> Dict[str, bytes]:
    out = {}
    for k, v in values.items():
        arr = logical(v)
        if arr is not None:
            out[k] = arr.tobytes()
    return out


def build_call(case: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """(values passed per argument name, keyword args, base info) for a construction case."""
    base = base_layer(case)
    fmt, arrays, rng = base["fmt"], base["arrays"], base["rng"]
    kw: Dict[str, Any] = {}
    if fmt == "exl2":
        kw["scale_max_prescaled"] = False
    elif fmt == "gptq":
        kw["zero_format"] = case["layer"].get("zero_format", "v1")
        if not case["layer"].get("omit_bits"):  # else the default (4)
            kw["bits"] = int(case["layer"].get("bits", 4))
    if case.get("explicit_device"):
        kw["device"] = case["device"]
    views: List[Dict[str, Any]] = []
    for m in case["mutations"]:
        if m["kind"] in VIEW_KINDS:
            views.append(m)
        else:
            apply_array_mutation(m, arrays, kw, fmt, rng)
    values = {k: to_container(v, case["container"], case["device"]) for k, v in arrays.items()}
    for m in views:
        if m["arg"] in values:
            values[m["arg"]] = apply_view_mutation(m["kind"], values[m["arg"]], int(m["b"]))
    if kw.get("device") == "obj":
        kw["device"] = object()
    if kw.get("bits") == "np":
        kw["bits"] = np.int64(7)
    return values, kw, base


def run_construction(case: Dict[str, Any]) -> Dict[str, Any]:
    import exl2

    values, kw, base = build_call(case)
    fmt = base["fmt"]
    before = _snapshot(values)
    try:
        if fmt == "exl2":
            q = exl2.QMatrix.from_exl2(*[values.get(k) for k in EXL2_REQUIRED], q_perm=values.get("q_perm"),
                                       bias=values.get("bias"), **kw)
        elif fmt == "awq":
            q = exl2.QMatrix.from_awq(*[values.get(k) for k in AWQ_REQUIRED], bias=values.get("bias"), **kw)
        else:
            q = exl2.QMatrix.from_gptq(*[values.get(k) for k in GPTQ_REQUIRED], g_idx=values.get("g_idx"),
                                       bias=values.get("bias"), **kw)
    except Exception as exc:  # noqa: BLE001 - classifying is the point
        return {"outcome": _classify(exc), "exc_type": type(exc).__name__, "message": str(exc),
                "traceback": traceback.format_exc()[-2000:] if _classify(exc) == "other" else None}
    result: Dict[str, Any] = {"outcome": "accepted", "exc_type": None, "message": "", "wrong": None}
    try:
        if _snapshot(values) != before:
            result["wrong"] = "construction modified an input tensor"
            return result
        arr = {k: logical(v) for k, v in values.items()}
        W = ref_weight(fmt, arr, kw, "float16")
        got = q.dequantize().cpu().numpy()
        if not same_bits(got, W):
            result["wrong"] = "dequantize differs from the reference"
            return result
        import torch

        W_bf16 = ref_weight(fmt, arr, kw, "bfloat16")
        if not same_bits(logical(q.dequantize(torch.bfloat16)), W_bf16):
            result["wrong"] = "dequantize(torch.bfloat16) differs from the reference (dtype='bfloat16')"
            return result
        bias = arr.get("bias")
        result["wrong"] = check_gemm(q, W, bias, np.random.default_rng(case["seed"] + 1)) or \
            check_gemm(q, W_bf16, bias, np.random.default_rng(case["seed"] + 2), "bfloat16")
    except Exception as exc:  # noqa: BLE001
        result["wrong"] = f"checking the accepted layer raised {type(exc).__name__}: {exc}"
    finally:
        q.close()
    return result


class _Skip(Exception):
    """A case the harness could not set up (not an outcome of the library)."""


def run_matmul(case: Dict[str, Any]) -> Dict[str, Any]:
    try:
        return _run_matmul(case)
    except _Skip as exc:
        return {"outcome": "skipped", "exc_type": None, "message": str(exc), "wrong": None}


def _run_matmul(case: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    import exl2

    base = base_layer(case)
    arrays, rng = base["arrays"], base["rng"]
    dev = case["device"]
    T = {k: (torch.from_numpy(np.ascontiguousarray(v)).to(dev) if isinstance(v, np.ndarray) else None)
         for k, v in arrays.items()}
    lay = case["layer"]
    if base["fmt"] == "exl2":
        q = exl2.QMatrix.from_exl2(*[T[k] for k in EXL2_REQUIRED], q_perm=T["q_perm"], bias=T["bias"])
    elif base["fmt"] == "awq":
        q = exl2.QMatrix.from_awq(*[T[k] for k in AWQ_REQUIRED], bias=T["bias"])
    else:
        q = exl2.QMatrix.from_gptq(*[T[k] for k in GPTQ_REQUIRED], g_idx=T["g_idx"], bias=T["bias"],
                                   zero_format=lay.get("zero_format", "v1"), bits=int(lay.get("bits", 4)))
    K, N = q.in_features, q.out_features
    M = int(lay.get("M", 3))
    # bfloat16 x: a float32 array of bfloat16 values until it is handed over (numpy has no
    # bfloat16); a "dtype" mutation of x makes it a plain numpy array of that dtype
    x_bf16 = lay.get("dtype", "float16") == "bfloat16"
    x_np = rng.standard_normal((M, K)) * float(lay.get("x_scale", 1.0))
    if x_bf16:
        from exl2 import reference as R

        x_np = R.round_bf16(x_np * 2.0 ** rng.integers(-6, 7, size=(M, K)))  # a wide dynamic range
    else:
        x_np = x_np.astype(np.float16)
    xs: Dict[str, Any] = {"x": x_np, "out": None}
    out_mode = "none"
    views: List[Dict[str, Any]] = []
    closed = False
    for m in case["mutations"]:
        kind, arg, a, b = m["kind"], m["arg"], int(m["a"]), int(m["b"])
        if kind in VIEW_KINDS:
            views.append(m)
        elif kind == "out_alloc":  # out: a fresh buffer, exact alias of x, overlapping, adjacent or offset
            out_mode = ("fresh", "alias", "overlap", "adjacent", "offset", "wrong_shape")[_i(b, 6)]
        elif kind == "close":
            closed = True
        elif kind == "x_values":
            if isinstance(xs["x"], np.ndarray) and xs["x"].dtype.kind == "f":
                pool = HOSTILE_FLOATS + ((3.3895e38, -3.3895e38, 1e-40, 2.0**-133) if x_bf16 else ())
                xs["x"] = _set_element(xs["x"], a, pool[_i(b, len(pool))])
                if x_bf16:
                    from exl2 import reference as R

                    xs["x"] = R.round_bf16(xs["x"])  # still bfloat16 values
        elif arg == "x":
            sub: Dict[str, Any] = {"x": xs["x"]}
            apply_array_mutation(m, sub, {}, "matmul", rng)
            if kind == "dtype" and sub["x"] is not xs["x"]:
                x_bf16 = False  # now a numpy array of the drawn dtype
            xs["x"] = sub["x"]
    try:
        x_val, out_val = _matmul_inputs(case, xs, dev, M, N, views, out_mode, x_bf16)
    except Exception as exc:  # noqa: BLE001 - setting up the inputs is the harness's business
        q.close()
        raise _Skip(f"{type(exc).__name__}: {exc}") from exc
    x_before = logical(x_val)
    x_dtype = x_val.dtype if isinstance(x_val, torch.Tensor) else None
    # mixed: a valid 16-bit x with a tensor out of another dtype (must be rejected, naming out)
    mixed = isinstance(out_val, torch.Tensor) and x_dtype in (torch.float16, torch.bfloat16) \
        and out_val.dtype != x_dtype
    if closed:
        q.close()
    try:
        y = q.matmul(x_val, out=out_val) if out_val is not None else q.matmul(x_val)
    except Exception as exc:  # noqa: BLE001
        if not closed:
            q.close()
        return {"outcome": _classify(exc), "exc_type": type(exc).__name__, "message": str(exc), "mixed": mixed,
                "traceback": traceback.format_exc()[-2000:] if _classify(exc) == "other" else None}
    res = _check_matmul_result(q, y, x_val, out_val, x_before, closed, base, lay)
    res["mixed"] = mixed
    if mixed and not res.get("wrong"):
        res["wrong"] = f"matmul accepted x of {x_dtype} with out of {out_val.dtype}"
    return res


def _matmul_inputs(case, xs, dev, M, N, views, out_mode, x_bf16=False):
    import torch

    x_val = to_container(xs["x"], case["container"], dev, bf16=x_bf16)
    for m in views:
        if m["arg"] == "x":
            x_val = apply_view_mutation(m["kind"], x_val, int(m["b"]))
    # out buffers (torch only: the API takes a torch.Tensor out)
    out_val: Any = None
    x_arr = logical(x_val)
    lead = tuple(x_arr.shape[:-1]) if x_arr is not None and x_arr.ndim >= 1 else (M,)
    if out_mode != "none":
        shape = lead + (N,)
        numel = int(np.prod(shape))
        # out has x's dtype (float16 or bfloat16; float16 when x is not a 16-bit float tensor)
        odt = x_val.dtype if isinstance(x_val, torch.Tensor) and x_val.dtype in (torch.float16, torch.bfloat16) \
            else torch.float16
        if out_mode in ("alias", "overlap", "adjacent") and isinstance(x_val, torch.Tensor) and x_val.dtype == odt \
                and x_val.is_contiguous() and x_val.device.type != "meta":
            storage = x_val.reshape(-1)
            start = {"alias": 0, "overlap": max(storage.numel() // 2, 0), "adjacent": storage.numel()}[out_mode]
            big = storage if out_mode != "adjacent" else None
            if out_mode == "adjacent" or start + numel > storage.numel():
                # one buffer holding x then out (adjacent) or x overlapping out's head
                buf = torch.empty(storage.numel() + numel + 8, dtype=odt, device=x_val.device)
                buf[: storage.numel()] = storage
                x_val = buf[: storage.numel()].view(x_val.shape)
                out_val = buf[start:start + numel].view(shape)
            else:
                out_val = big[start:start + numel].view(shape)
        elif out_mode == "offset":
            out_val = torch.empty(numel + 5, dtype=odt, device=dev)[5:].view(shape)
        elif out_mode == "wrong_shape":
            out_val = torch.empty(shape[:-1] + (N + 1,), dtype=odt, device=dev)
        else:
            out_val = torch.empty(shape, dtype=odt, device=dev)
        for m in views:
            if m["arg"] == "out":
                out_val = apply_view_mutation(m["kind"], out_val, int(m["b"]))
        for m in case["mutations"]:
            if m["arg"] == "out" and m["kind"] not in VIEW_KINDS and m["kind"] != "out_alloc":
                if m["kind"] == "dtype" and isinstance(out_val, torch.Tensor) and out_val.device.type != "meta":
                    # float32, or the other 16-bit float (bfloat16 x with float16 out and vice versa)
                    other = torch.bfloat16 if odt == torch.float16 else torch.float16
                    out_val = out_val.to(torch.float32 if m["b"] & 1 else other)
                elif m["kind"] == "pyobj":
                    out_val = _py_object(PY_OBJECTS[_i(int(m["b"]), len(PY_OBJECTS))])
                elif m["kind"] == "rank" and isinstance(out_val, torch.Tensor):
                    out_val = out_val.reshape(-1)
    return x_val, out_val


def _check_matmul_result(q, y, x_val, out_val, x_before, closed, base, lay) -> Dict[str, Any]:
    import torch

    result: Dict[str, Any] = {"outcome": "accepted", "exc_type": None, "message": "", "wrong": None}
    try:
        if closed:
            result["wrong"] = "matmul on a closed QMatrix returned"
            return result
        if out_val is not None and y is not out_val:
            result["wrong"] = "matmul(out=...) did not return out"
            return result
        # same numbers as a clean, contiguous call on a copy of x taken before the call
        # fresh, with row-major strides even when empty (torch.tensor / from_numpy of an empty
        # array keep numpy's (0, 0) strides, which trip the empty-tensor-strides bug)
        x_dtype = x_val._t.dtype if isinstance(x_val, _DLPackOnly) else \
            (x_val.dtype if isinstance(x_val, torch.Tensor) else torch.float16)
        if y.dtype != x_dtype:
            result["wrong"] = f"matmul returned {y.dtype} for x of {x_dtype}"
            return result
        clean = torch.empty(x_before.shape, dtype=x_dtype).copy_(torch.from_numpy(x_before)).to(q.device)
        y_ref = q.matmul(clean)
        if tuple(y.shape) != tuple(y_ref.shape) or not same_bits(logical(y), logical(y_ref)):
            result["wrong"] = "matmul differs from the clean call"
            return result
        if out_val is None:
            x_after = logical(x_val)
            if x_after is None or x_after.tobytes() != x_before.tobytes():
                result["wrong"] = "matmul modified x"
                return result
        # against exl2.reference in x's dtype semantics (the weight rounded once to it)
        dtype = "bfloat16" if x_dtype == torch.bfloat16 else "float16"
        arrays = base["arrays"]
        kw = {"zero_format": lay.get("zero_format", "v1"), "bits": int(lay.get("bits", 4))}
        W = ref_weight(base["fmt"], arrays, kw, dtype)
        K = W.shape[0]
        y2 = logical(y_ref).reshape(-1, W.shape[1])
        result["wrong"] = gemm_problem(y2, x_before.reshape(-1, K), W, arrays.get("bias"), dtype, q.device.type,
                                       "matmul")
    except Exception as exc:  # noqa: BLE001
        result["wrong"] = f"checking the accepted call raised {type(exc).__name__}: {exc}"
    finally:
        q.close()
    return result


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    if case["api"] == "__selftest_crash__":  # for the harness's own test: a real SIGSEGV
        import ctypes

        ctypes.string_at(0)
    if case["api"] == "__selftest_hang__":
        import time

        time.sleep(3600)
    if case["api"] == "matmul":
        return run_matmul(case)
    return run_construction(case)


# ----------------------------------------------------------------------------- main loop
def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--replay":
        with open(sys.argv[2]) as f:
            case = json.load(f)
        case = case.get("case", case)
        print(json.dumps(run_case(case), indent=1, default=str))
        return 0
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol
    sys.stdout = sys.stderr
    import torch  # noqa: F401  (warm the imports before reporting ready)

    import exl2  # noqa: F401

    proto.write(json.dumps({"ready": True, "cuda": bool(torch.cuda.is_available())}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        case = json.loads(line)
        try:
            res = run_case(case)
        except Exception as exc:  # noqa: BLE001 - a harness error, reported as such
            res = {"outcome": "harness_error", "exc_type": type(exc).__name__, "message": str(exc),
                   "traceback": traceback.format_exc()[-3000:]}
        proto.write(json.dumps(res, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
