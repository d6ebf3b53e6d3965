"""Build QMatrix objects from checkpoints (safetensors files, model directories or
in-memory state dicts).

A layer's tensors are named ``<prefix>.<name>``:

- EXL2: ``q_weight``, ``q_invperm``, ``q_scale``, ``q_scale_max``, ``q_groups``,
  optional ``q_perm`` and ``bias``;
- GPTQ: ``qweight``, ``qzeros``, ``scales``, optional ``g_idx`` and ``bias``.

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

import torch

from ._convert import DeviceLike, as_tensor
from .qmatrix import QMatrix

__all__ = [
    "EXL2_TENSORS",
    "GPTQ_TENSORS",
    "GPTQConfig",
    "read_gptq_config",
    "read_exl2_tensors",
    "read_gptq_tensors",
    "detect_format",
    "layer_format",
    "qmatrix_from_tensors",
    "load_exl2",
    "load_gptq",
]

Source = Union[str, os.PathLike, Mapping[str, Any]]

#: (required, optional) tensor names of each format.
EXL2_TENSORS = (("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups"), ("q_perm", "bias"))
GPTQ_TENSORS = (("qweight", "qzeros", "scales"), ("g_idx", "bias"))

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


# ------------------------------------------------------------------ GPTQ config
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


_CHECKPOINT_FORMATS = {"gptq": "v1", "gptq_v1": "v1", "v1": "v1", "gptq_v2": "v2", "v2": "v2"}


def read_gptq_config(model_dir: Union[str, os.PathLike]) -> GPTQConfig:
    """Read ``quantize_config.json`` (or ``config.json``'s ``quantization_config``).

    Raises:
        FileNotFoundError: neither file has a GPTQ config.
        ValueError: a non-GPTQ ``quant_method`` or an unknown ``checkpoint_format``.
    """
    d = Path(model_dir)
    cfg: Optional[Dict[str, Any]] = None
    if (d / "quantize_config.json").is_file():
        cfg = json.loads((d / "quantize_config.json").read_text())
    elif (d / "config.json").is_file():
        cfg = json.loads((d / "config.json").read_text()).get("quantization_config")
    if cfg is None:
        raise FileNotFoundError(f"model_dir: no quantize_config.json or config.json quantization_config in {d}")
    method = cfg.get("quant_method", "gptq")
    if method != "gptq":
        raise ValueError(f"quant_method: expected 'gptq', got {method!r} (in {d})")
    fmt = cfg.get("checkpoint_format", "gptq")
    if fmt not in _CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format: expected 'gptq' or 'gptq_v2', got {fmt!r} (in {d})")
    return GPTQConfig(
        bits=int(cfg.get("bits", 4)),
        group_size=int(cfg.get("group_size", -1)),
        desc_act=bool(cfg.get("desc_act", False)),
        sym=bool(cfg.get("sym", True)),
        zero_format=_CHECKPOINT_FORMATS[fmt],
    )


def _check_bits(bits: int, where: str) -> None:
    if bits != 4:
        raise ValueError(f"bits: only 4-bit GPTQ is supported, got bits={bits} ({where})")


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
    bits: int = 4,
    group_size: Optional[int] = None,
    desc_act: Optional[bool] = None,
    zero_format: Optional[str] = None,
) -> Tuple[Dict[str, torch.Tensor], str]:
    """The GPTQ tensors of layer ``prefix`` and their zero format, checked against the
    quantization settings.

    Settings left ``None`` come from the directory's ``quantize_config.json`` when
    ``source`` is a model directory that has one; explicit values take precedence.
    ``group_size`` (``-1`` = per-channel) is checked against the tensors' shapes;
    ``desc_act=True`` requires ``g_idx``; ``desc_act=False`` rejects an unordered ``g_idx``.

    Returns:
        ``(tensors, zero_format)``.

    Raises:
        KeyError: a required tensor is missing.
        ValueError: ``bits`` is not 4, or the settings do not match the tensors.
    """
    _check_bits(bits, "argument")
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        try:
            cfg: Optional[GPTQConfig] = read_gptq_config(source)
        except FileNotFoundError:
            cfg = None
        if cfg is not None:
            _check_bits(cfg.bits, f"quantize config of {source}")
            group_size = cfg.group_size if group_size is None else group_size
            desc_act = cfg.desc_act if desc_act is None else desc_act
            zero_format = cfg.zero_format if zero_format is None else zero_format
    zero_format = "v1" if zero_format is None else zero_format
    if zero_format not in ("v1", "v2"):
        raise ValueError(f"zero_format: expected 'v1' or 'v2', got {zero_format!r}")
    t = _read(_Source(source), prefix, GPTQ_TENSORS)
    K, G = int(t["qweight"].shape[0]) * 8, int(t["qzeros"].shape[0])
    if group_size is not None:
        want = 1 if group_size == -1 else (K // group_size if group_size > 0 and K % group_size == 0 else None)
        if want != G:
            raise ValueError(
                f"group_size: {group_size} does not match layer {prefix!r}: K = {K} rows in {G} groups"
            )
    g_idx = t.get("g_idx")
    if desc_act and g_idx is None:
        raise ValueError(f"desc_act: True, but layer {prefix!r} has no g_idx")
    if desc_act is False and g_idx is not None and bool((g_idx[1:] < g_idx[:-1]).any()):
        raise ValueError(f"desc_act: False, but layer {prefix!r} has an act-order (unsorted) g_idx")
    return t, zero_format


def detect_format(tensors: Mapping[str, Any]) -> str:
    """``"exl2"`` or ``"gptq"`` from the keys of a format-tensor dict."""
    if "q_weight" in tensors:
        return "exl2"
    if "qweight" in tensors:
        return "gptq"
    raise ValueError(f"tensors: expected EXL2 (q_weight, ...) or GPTQ (qweight, ...) keys, got {sorted(tensors)}")


def layer_format(source: Source, prefix: str) -> str:
    """``"exl2"`` or ``"gptq"``: which format's tensors layer ``prefix`` has in ``source``."""
    src = _Source(source)
    for fmt, key in (("exl2", "q_weight"), ("gptq", "qweight")):
        if _key(prefix, key) in src:
            return fmt
    raise KeyError(f"{_key(prefix, 'q_weight')} / {_key(prefix, 'qweight')}: neither found in {src.name}")


def qmatrix_from_tensors(
    tensors: Mapping[str, Any], *, zero_format: str = "v1", device: DeviceLike = None
) -> QMatrix:
    """Build a QMatrix from a format-tensor dict (the layout of
    ``exl2.reference.random_*`` and of :func:`read_exl2_tensors`; extra keys such as
    ``weight`` or ``rows`` are ignored). ``zero_format`` applies to GPTQ only."""
    t = tensors
    if detect_format(t) == "exl2":
        return QMatrix.from_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"],
                                 q_perm=t.get("q_perm"), bias=t.get("bias"), device=device)
    return QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx=t.get("g_idx"), bias=t.get("bias"),
                             zero_format=zero_format, device=device)


# --------------------------------------------------------------------- loaders
def load_exl2(path_or_dict: Source, prefix: str, *, device: DeviceLike = None) -> QMatrix:
    """Load the EXL2 layer ``prefix``. ``device=None`` keeps the tensors' device
    (the CPU for files)."""
    return qmatrix_from_tensors(read_exl2_tensors(path_or_dict, prefix), device=device)


def load_gptq(
    path_or_dict: Source,
    prefix: str,
    *,
    bits: int = 4,
    group_size: Optional[int] = None,
    desc_act: Optional[bool] = None,
    zero_format: Optional[str] = None,
    device: DeviceLike = None,
) -> QMatrix:
    """Load the 4-bit GPTQ layer ``prefix`` (see :func:`read_gptq_tensors` for the
    settings). ``device=None`` keeps the tensors' device (the CPU for files).

    Raises:
        ValueError: ``bits`` (argument or config) is not 4, or the settings do not
            match the tensors.
    """
    tensors, zf = read_gptq_tensors(path_or_dict, prefix, bits=bits, group_size=group_size,
                                    desc_act=desc_act, zero_format=zero_format)
    return qmatrix_from_tensors(tensors, zero_format=zf, device=device)
