"""Build QMatrix objects from checkpoints (safetensors files, model directories or
in-memory state dicts).

A layer's tensors are named ``<prefix>.<name>``:

- EXL2: ``q_weight``, ``q_invperm``, ``q_scale``, ``q_scale_max``, ``q_groups``,
  optional ``q_perm`` and ``bias``;
- GPTQ (2, 3, 4 or 8 bits): ``qweight``, ``qzeros``, ``scales``, optional ``g_idx``
  and ``bias``;
- AWQ (4-bit, GEMM packing): ``qweight``, ``qzeros``, ``scales``, optional ``bias``.

GPTQ and AWQ use the same tensor names. They are told apart by the model
directory's quantization config (``quant_method``) when there is one, else by shape:
GPTQ packs ``qweight`` along K (``[K*bits/32, N]``, as many columns as ``scales``),
AWQ along N (``[K, N/8]``, an eighth of ``scales``' columns). A GPTQ layer's width is
likewise implied by ``qzeros`` ``[G, N*bits/32]``.

A *source* is one of: a mapping ``{name: tensor or numpy array}`` (a state dict);
a ``.safetensors`` file; or a directory holding ``*.safetensors`` files (with
``model.safetensors.index.json`` if present, else every file is scanned). Only the
tensors of the requested layer are read from disk.

Dtypes are normalised the way servers do before calling the reference kernels:
float scales / bias become float16; int64 permutations and ``g_idx`` become int32
(int16 permutations are read as unsigned, as the reference does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ._convert import DeviceLike, as_tensor
from .qmatrix import QMatrix

__all__ = [
    "EXL2_TENSORS",
    "GPTQ_TENSORS",
    "AWQ_TENSORS",
    "TENSOR_NAMES",
    "GPTQConfig",
    "AWQConfig",
    "read_gptq_config",
    "read_awq_config",
    "read_exl2_tensors",
    "read_gptq_tensors",
    "read_awq_tensors",
    "detect_format",
    "layer_format",
    "qmatrix_from_tensors",
    "load_exl2",
    "load_gptq",
    "load_awq",
]

Source = Union[str, os.PathLike, Mapping[str, Any]]

#: (required, optional) tensor names of each format.
EXL2_TENSORS = (("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups"), ("q_perm", "bias"))
GPTQ_TENSORS = (("qweight", "qzeros", "scales"), ("g_idx", "bias"))
AWQ_TENSORS = (("qweight", "qzeros", "scales"), ("bias",))
#: format -> its (required, optional) tensor names.
TENSOR_NAMES = {"exl2": EXL2_TENSORS, "gptq": GPTQ_TENSORS, "awq": AWQ_TENSORS}
_GPTQ_BITS = (2, 3, 4, 8)

_FLOAT16_NAMES = ("scales", "q_scale_max", "bias")
_INDEX_NAMES = ("q_perm", "q_invperm", "g_idx")


# ----------------------------------------------------------------- tensor source
class _Source:
    """Lazy ``key -> tensor`` access to a state dict, a safetensors file or a directory."""

    def __init__(self, source: Source) -> None:
        self._dict: Optional[Mapping[str, Any]] = None
        self._files: Dict[str, Path] = {}  # key -> file holding it
        if isinstance(source, Mapping):
            self._dict = source
            self.name = "the state dict"
            return
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source: expected a path or a mapping of tensors, got {type(source).__name__}")
        path = Path(source)
        self.name = str(path)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {k: path / f for k, f in weight_map.items()}
                return
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"source: no *.safetensors files in {path}")
        else:
            raise FileNotFoundError(f"source: {path} does not exist")
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as h:
                self._files.update({k: f for k in h.keys()})

    def __contains__(self, key: str) -> bool:
        return key in (self._dict if self._dict is not None else self._files)

    def shape(self, key: str) -> Optional[Tuple[int, ...]]:
        """The shape of tensor ``key`` (read from the file header, not the data)."""
        if self._dict is not None:
            return tuple(as_tensor(self._dict[key], key).shape) if key in self._dict else None
        f = self._files.get(key)
        if f is None:
            return None
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            return tuple(h.get_slice(key).get_shape())

    def get(self, key: str) -> Optional[torch.Tensor]:
        if self._dict is not None:
            return as_tensor(self._dict[key], key) if key in self._dict else None
        f = self._files.get(key)
        if f is None:
            return None
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            return h.get_tensor(key)


def _key(prefix: str, name: str) -> str:
    prefix = prefix.rstrip(".")
    return f"{prefix}.{name}" if prefix else name


def _normalise(name: str, t: torch.Tensor) -> torch.Tensor:
    if name in _FLOAT16_NAMES and t.is_floating_point() and t.dtype != torch.float16:
        t = t.to(torch.float16)
    elif name in _INDEX_NAMES and t.dtype == torch.int16:
        t = t.to(torch.int32) & 0xFFFF
    elif name in _INDEX_NAMES and t.dtype == torch.int64:
        t = t.to(torch.int32)
    return t.contiguous()


def _read(src: _Source, prefix: str, names: Tuple[Tuple[str, ...], Tuple[str, ...]]) -> Dict[str, torch.Tensor]:
    required, optional = names
    out: Dict[str, torch.Tensor] = {}
    for name in required + optional:
        t = src.get(_key(prefix, name))
        if t is None:
            if name in required:
                raise KeyError(f"{_key(prefix, name)}: tensor not found in {src.name}")
            continue
        out[name] = _normalise(name, t)
    return out


# ------------------------------------------------------------ quantization configs
@dataclass(frozen=True)
class GPTQConfig:
    """The parts of a GPTQ ``quantize_config.json`` that matter for loading.

    ``zero_format`` comes from ``checkpoint_format``: ``"gptq"`` (or absent) is the
    AutoGPTQ "v1" convention (stored zero + 1), ``"gptq_v2"`` stores the zero itself.
    ``group_size`` is ``-1`` for one group per column (per-channel).
    """

    bits: int = 4
    group_size: int = -1
    desc_act: bool = False
    sym: bool = True
    zero_format: str = "v1"


@dataclass(frozen=True)
class AWQConfig:
    """The parts of an AWQ quantization config that matter for loading (AutoAWQ's
    ``quant_config.json`` / ``config.json`` ``quantization_config``: ``bits`` or
    ``w_bit``, ``group_size`` or ``q_group_size``, ``zero_point``, ``version``)."""

    bits: int = 4
    group_size: int = -1
    zero_point: bool = True
    version: str = "gemm"


_CHECKPOINT_FORMATS = {"gptq": "v1", "gptq_v1": "v1", "v1": "v1", "gptq_v2": "v2", "v2": "v2"}


def _quant_config(model_dir: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The quantization config of a model directory: ``quantize_config.json``, AutoAWQ's
    ``quant_config.json``, or ``config.json``'s ``quantization_config`` (first found)."""
    d = Path(model_dir)
    for name in ("quantize_config.json", "quant_config.json"):
        if (d / name).is_file():
            return dict(json.loads((d / name).read_text()))
    if (d / "config.json").is_file():
        cfg = json.loads((d / "config.json").read_text()).get("quantization_config")
        return None if cfg is None else dict(cfg)
    return None


def _method(cfg: Mapping[str, Any]) -> str:
    """``quant_method`` of a config; AutoAWQ's own files have none but ``w_bit``/``version``."""
    default = "awq" if ("w_bit" in cfg or "q_group_size" in cfg) else "gptq"
    return str(cfg.get("quant_method", default)).lower()


def _method_config(model_dir: Union[str, os.PathLike], method: str, config_name: str) -> Tuple[Path, Dict[str, Any]]:
    """``model_dir`` as a Path and its quantization config, which must declare ``method``.
    FileNotFoundError (naming ``config_name``, the format's own config file) when there is
    none, ValueError when it is another method's."""
    d = Path(model_dir)
    cfg = _quant_config(d)
    if cfg is None:
        raise FileNotFoundError(f"model_dir: no {config_name} or config.json quantization_config in {d}")
    found = _method(cfg)
    if found != method:
        raise ValueError(f"quant_method: expected {method!r}, got {found!r} (in {d})")
    return d, cfg


def read_gptq_config(model_dir: Union[str, os.PathLike]) -> GPTQConfig:
    """Read ``quantize_config.json`` (or ``config.json``'s ``quantization_config``).

    Raises:
        FileNotFoundError: neither file has a quantization config.
        ValueError: a non-GPTQ ``quant_method``, an unknown ``checkpoint_format`` or
            ``bits`` other than 2, 3, 4 or 8.
    """
    d, cfg = _method_config(model_dir, "gptq", "quantize_config.json")
    fmt = cfg.get("checkpoint_format", "gptq")
    if fmt not in _CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format: expected 'gptq' or 'gptq_v2', got {fmt!r} (in {d})")
    bits = int(cfg.get("bits", 4))
    _check_bits(bits, f"quantize config of {d}")
    return GPTQConfig(
        bits=bits,
        group_size=int(cfg.get("group_size", -1)),
        desc_act=bool(cfg.get("desc_act", False)),
        sym=bool(cfg.get("sym", True)),
        zero_format=_CHECKPOINT_FORMATS[fmt],
    )


def read_awq_config(model_dir: Union[str, os.PathLike]) -> AWQConfig:
    """Read an AWQ config (``quant_config.json``, ``quantize_config.json`` or
    ``config.json``'s ``quantization_config`` with ``quant_method: "awq"``).

    Raises:
        FileNotFoundError: no quantization config in ``model_dir``.
        ValueError: not AWQ, or an AWQ variant exl2 cannot read (``bits`` other than 4,
            ``zero_point: false``, a ``version`` other than ``"gemm"``).
    """
    d, cfg = _method_config(model_dir, "awq", "quant_config.json")
    bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"bits: only 4-bit AWQ is supported, got bits={bits} (in {d})")
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"version: only AWQ 'gemm' packing is supported, got {version!r} (in {d})")
    zero_point = bool(cfg.get("zero_point", True))
    if not zero_point:
        raise ValueError(f"zero_point: AWQ without zero points is not supported (in {d})")
    return AWQConfig(bits=4, group_size=int(cfg.get("group_size", cfg.get("q_group_size", -1))),
                     zero_point=zero_point, version=version)


def _check_bits(bits: int, where: str) -> None:
    if isinstance(bits, bool) or bits not in _GPTQ_BITS:
        raise ValueError(f"bits: expected 2, 3, 4 or 8 for GPTQ, got bits={bits!r} ({where})")


def _implied_gptq_bits(qzeros_shape: Tuple[int, ...], scales_shape: Tuple[int, ...]) -> Optional[int]:
    """The width a GPTQ layer's shapes imply: qzeros ``[G, N*bits/32]``, scales ``[G, N]``."""
    if len(qzeros_shape) != 2 or len(scales_shape) != 2 or scales_shape[1] <= 0:
        return None
    b, rem = divmod(32 * int(qzeros_shape[1]), int(scales_shape[1]))
    return b if rem == 0 and b in _GPTQ_BITS else None


def _check_group_size(group_size: Optional[int], K: int, G: int, prefix: str) -> None:
    if group_size is None:
        return
    want = 1 if group_size == -1 else (K // group_size if group_size > 0 and K % group_size == 0 else None)
    if want != G:
        raise ValueError(f"group_size: {group_size} does not match layer {prefix!r}: K = {K} rows in {G} groups")


# --------------------------------------------------------------------- readers
def read_exl2_tensors(source: Source, prefix: str) -> Dict[str, torch.Tensor]:
    """The EXL2 tensors of layer ``prefix`` (CPU tensors for files).

    Raises:
        KeyError: a required tensor is missing.
    """
    return _read(_Source(source), prefix, EXL2_TENSORS)


def read_gptq_tensors(
    source: Source,
    prefix: str,
    *,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    desc_act: Optional[bool] = None,
    zero_format: Optional[str] = None,
) -> Tuple[Dict[str, torch.Tensor], str]:
    """The GPTQ tensors of layer ``prefix`` and their zero format, checked against the
    quantization settings.

    Settings left ``None`` come from the directory's ``quantize_config.json`` when
    ``source`` is a model directory that has one; explicit values take precedence.
    ``bits`` (2, 3, 4 or 8) must agree with the width the shapes imply (``qzeros``
    ``[G, N*bits/32]``); without it and without a config the shapes decide.
    ``group_size`` (``-1`` = per-channel) is checked against the tensors' shapes;
    ``desc_act=True`` requires ``g_idx``; ``desc_act=False`` rejects an unordered ``g_idx``.

    Returns:
        ``(tensors, zero_format)``; the width is implied by the tensors' shapes
        (:func:`qmatrix_from_tensors` reads it from there).

    Raises:
        KeyError: a required tensor is missing.
        ValueError: ``bits`` is not 2, 3, 4 or 8, the settings do not match the tensors, or
            the tensors are AWQ-packed (``qweight`` ``[K, N/8]``).
    """
    if bits is not None:
        _check_bits(bits, "argument")
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        try:
            cfg: Optional[GPTQConfig] = read_gptq_config(source)
        except FileNotFoundError:
            cfg = None
        if cfg is not None:
            bits = cfg.bits if bits is None else bits
            group_size = cfg.group_size if group_size is None else group_size
            desc_act = cfg.desc_act if desc_act is None else desc_act
            zero_format = cfg.zero_format if zero_format is None else zero_format
    zero_format = "v1" if zero_format is None else zero_format
    if zero_format not in ("v1", "v2"):
        raise ValueError(f"zero_format: expected 'v1' or 'v2', got {zero_format!r}")
    t = _read(_Source(source), prefix, GPTQ_TENSORS)
    _check_packing("gptq", t, _key(prefix, "qweight"))
    implied = _implied_gptq_bits(tuple(t["qzeros"].shape), tuple(t["scales"].shape))
    if bits is not None and implied is not None and implied != bits:
        raise ValueError(
            f"bits: {bits} does not match layer {prefix!r}: qzeros {list(t['qzeros'].shape)} and scales "
            f"{list(t['scales'].shape)} are {implied}-bit GPTQ"
        )
    b = bits if bits is not None else (implied or 4)
    K, G = int(t["qweight"].shape[0]) * 32 // b, int(t["qzeros"].shape[0])
    _check_group_size(group_size, K, G, prefix)
    g_idx = t.get("g_idx")
    if desc_act and g_idx is None:
        raise ValueError(f"desc_act: True, but layer {prefix!r} has no g_idx")
    if desc_act is False and g_idx is not None and bool((g_idx[1:] < g_idx[:-1]).any()):
        raise ValueError(f"desc_act: False, but layer {prefix!r} has an act-order (unsorted) g_idx")
    return t, zero_format


def read_awq_tensors(source: Source, prefix: str, *, group_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The AWQ tensors of layer ``prefix``, checked against the directory's AWQ config
    (when ``source`` is a model directory that has one) and ``group_size`` (explicit
    values take precedence; ``-1`` = one group).

    Raises:
        KeyError: a required tensor is missing.
        ValueError: the config is not a supported AWQ one, the settings do not match, or
            the tensors are GPTQ-packed (``qweight`` with as many columns as ``scales``).
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        try:
            cfg: Optional[AWQConfig] = read_awq_config(source)
        except FileNotFoundError:
            cfg = None
        if cfg is not None and group_size is None:
            group_size = cfg.group_size
    t = _read(_Source(source), prefix, AWQ_TENSORS)
    _check_packing("awq", t, _key(prefix, "qweight"))
    _check_group_size(group_size, int(t["qweight"].shape[0]), int(t["qzeros"].shape[0]), prefix)
    return t


def _shape(x: Any) -> Tuple[int, ...]:
    """Shape of a tensor, numpy array or anything numpy can read as one."""
    shape = getattr(x, "shape", None)
    return tuple(int(d) for d in (shape if shape is not None else np.shape(x)))


def _format_by_shape(qweight_shape: Tuple[int, ...], scales_shape: Optional[Tuple[int, ...]]) -> str:
    """GPTQ ``qweight`` has as many columns as ``scales`` (N); AWQ's has N/8."""
    if scales_shape is not None and len(qweight_shape) == 2 and len(scales_shape) == 2:
        if scales_shape[1] != qweight_shape[1] and scales_shape[1] == 8 * qweight_shape[1]:
            return "awq"
    return "gptq"


def _check_packing(fmt: str, tensors: Mapping[str, Any], where: str) -> None:
    """Reject GPTQ tensors read as AWQ and vice versa (they share tensor names; the
    packing tells them apart: GPTQ ``qweight`` ``[K*bits/32, N]``, AWQ ``[K, N/8]``)."""
    qw, sc = tensors.get("qweight"), tensors.get("scales")
    if qw is None or sc is None:
        return
    qs, ss = _shape(qw), _shape(sc)
    if len(qs) != 2 or len(ss) != 2:
        return
    if fmt == "gptq" and _format_by_shape(qs, ss) == "awq":
        raise ValueError(
            f"{where}: shape {list(qs)} with scales {list(ss)} is AWQ packing (qweight [K, N/8]), not GPTQ "
            "(qweight [K*bits/32, N]); load this layer as AWQ (exl2.load_awq, format='awq')"
        )
    if fmt == "awq" and qs[1] == ss[1]:
        raise ValueError(
            f"{where}: shape {list(qs)} with scales {list(ss)} is GPTQ packing (qweight [K*bits/32, N]), not AWQ "
            "(qweight [K, N/8]); load this layer as GPTQ (exl2.load_gptq, format='gptq')"
        )


def detect_format(tensors: Mapping[str, Any]) -> str:
    """``"exl2"``, ``"gptq"`` or ``"awq"`` from the keys (and, for qweight/qzeros/scales,
    the shapes) of a format-tensor dict."""
    if "q_weight" in tensors:
        return "exl2"
    if "qweight" in tensors:
        sc = tensors.get("scales")
        return _format_by_shape(_shape(tensors["qweight"]), None if sc is None else _shape(sc))
    raise ValueError(f"tensors: expected EXL2 (q_weight, ...) or GPTQ/AWQ (qweight, ...) keys, got {sorted(tensors)}")


def layer_format(source: Source, prefix: str) -> str:
    """``"exl2"``, ``"gptq"`` or ``"awq"``: which format's tensors layer ``prefix`` has in
    ``source``. GPTQ and AWQ share tensor names: a model directory's quantization config
    decides, else the shapes do (see the module docstring)."""
    src = _Source(source)
    if _key(prefix, "q_weight") in src:
        return "exl2"
    if _key(prefix, "qweight") in src:
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            cfg = _quant_config(source)
            if cfg is not None and _method(cfg) in ("gptq", "awq"):
                return _method(cfg)
        shape = src.shape(_key(prefix, "qweight"))
        return _format_by_shape(shape or (), src.shape(_key(prefix, "scales")))
    raise KeyError(f"{_key(prefix, 'q_weight')} / {_key(prefix, 'qweight')}: neither found in {src.name}")


def qmatrix_from_tensors(
    tensors: Mapping[str, Any],
    *,
    format: Optional[str] = None,  # noqa: A002
    zero_format: str = "v1",
    bits: Optional[int] = None,
    device: DeviceLike = None,
) -> QMatrix:
    """Build a QMatrix from a format-tensor dict (the layout of
    ``exl2.reference.random_*`` and of :func:`read_exl2_tensors`; extra keys such as
    ``weight`` or ``rows`` are ignored). ``format`` (``"exl2"``, ``"gptq"`` or ``"awq"``)
    is detected from the keys and shapes (:func:`detect_format`) when ``None``; an explicit
    format is honoured, and GPTQ/AWQ tensors packed the other format's way are rejected.
    ``zero_format`` and ``bits`` apply to GPTQ only; ``bits=None`` takes the width the
    shapes imply (``qzeros`` ``[G, N*bits/32]``).

    Raises:
        ValueError: an unknown ``format``, or tensors of another format than ``format``.
    """
    t = tensors
    if format is None:
        fmt = detect_format(t)
    elif format in TENSOR_NAMES:
        fmt = format
        key = "q_weight" if fmt == "exl2" else "qweight"
        if key not in t:
            raise ValueError(f"tensors: format {fmt!r} needs {key!r}, got keys {sorted(t)}")
        _check_packing(fmt, t, "qweight")
    else:
        raise ValueError(f"format: expected 'exl2', 'gptq', 'awq' or None, got {format!r}")
    if fmt == "exl2":
        return QMatrix.from_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"],
                                 q_perm=t.get("q_perm"), bias=t.get("bias"), device=device)
    if fmt == "awq":
        return QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"], bias=t.get("bias"), device=device)
    if bits is None:
        bits = _implied_gptq_bits(_shape(t["qzeros"]), _shape(t["scales"])) or 4
    return QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx=t.get("g_idx"), bias=t.get("bias"),
                             zero_format=zero_format, bits=bits, device=device)


# --------------------------------------------------------------------- loaders
def load_exl2(path_or_dict: Source, prefix: str, *, device: DeviceLike = None) -> QMatrix:
    """Load the EXL2 layer ``prefix``. ``device=None`` keeps the tensors' device
    (the CPU for files)."""
    return qmatrix_from_tensors(read_exl2_tensors(path_or_dict, prefix), format="exl2", device=device)


def load_gptq(
    path_or_dict: Source,
    prefix: str,
    *,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    desc_act: Optional[bool] = None,
    zero_format: Optional[str] = None,
    device: DeviceLike = None,
) -> QMatrix:
    """Load the GPTQ layer ``prefix`` (2, 3, 4 or 8 bits; see :func:`read_gptq_tensors`
    for the settings). ``device=None`` keeps the tensors' device (the CPU for files).

    Raises:
        ValueError: ``bits`` (argument or config) is not 2, 3, 4 or 8, or the settings
            do not match the tensors.
    """
    tensors, zf = read_gptq_tensors(path_or_dict, prefix, bits=bits, group_size=group_size,
                                    desc_act=desc_act, zero_format=zero_format)
    return qmatrix_from_tensors(tensors, format="gptq", zero_format=zf, bits=bits, device=device)


def load_awq(
    path_or_dict: Source, prefix: str, *, group_size: Optional[int] = None, device: DeviceLike = None
) -> QMatrix:
    """Load the AWQ 4-bit layer ``prefix`` (see :func:`read_awq_tensors`). ``device=None``
    keeps the tensors' device (the CPU for files)."""
    return qmatrix_from_tensors(read_awq_tensors(path_or_dict, prefix, group_size=group_size), format="awq",
                                device=device)
