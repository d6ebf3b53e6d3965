"""Tensor-parallel splitting of quantized layers, on format-tensor dicts.

A format-tensor dict has the layout ``exl2.reference.random_*`` returns: EXL2
``q_weight, q_invperm, q_scale, q_scale_max, q_groups[, q_perm][, bias]`` or GPTQ
``qweight, qzeros, scales[, g_idx][, bias]`` (values: torch tensors or numpy
arrays; other keys are ignored). Every shard is again such a dict of contiguous
torch tensors on the input's device, so it can be handed to
``exl2.loaders.qmatrix_from_tensors`` or ``exl2.nn.QuantLinear.from_tensors``.

- :func:`split_columns` (column parallel): ``y = concat(x @ W_i, dim=-1)``.
- :func:`split_rows` (row parallel): ``y = sum(x[..., rows_i] @ W_i)``, where
  ``rows_i`` (key ``"rows"``) lists the input columns shard ``i`` consumes. Shards
  hold whole quantization groups, so they need no re-quantization; with act-order
  the rows of a group are scattered over ``K``, hence the explicit index.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import torch

from ._convert import as_tensor
from .loaders import EXL2_TENSORS, GPTQ_TENSORS, _implied_gptq_bits, _normalise, _shape, detect_format
from .reference import exl2_group_layout

__all__ = ["split_columns", "split_rows"]

Tensors = Dict[str, torch.Tensor]


def _load(tensors: Mapping[str, Any]) -> tuple[str, Tensors]:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors: expected a mapping of format tensors, got {type(tensors).__name__}")
    fmt = detect_format(tensors)
    if fmt not in ("exl2", "gptq"):
        raise ValueError(f"tensors: splitting supports EXL2 and 4-bit GPTQ layers, got {fmt}")
    qz, sc = tensors.get("qzeros"), tensors.get("scales")
    bits = None if fmt != "gptq" or qz is None or sc is None else _implied_gptq_bits(_shape(qz), _shape(sc))
    if bits not in (4, None):
        raise ValueError(f"tensors: splitting supports EXL2 and 4-bit GPTQ layers, got a {bits}-bit GPTQ layer")
    required, optional = EXL2_TENSORS if fmt == "exl2" else GPTQ_TENSORS
    missing = [k for k in required if tensors.get(k) is None]
    if missing:
        raise ValueError(f"tensors: {fmt} layer lacks {missing}")
    return fmt, {k: _normalise(k, as_tensor(tensors[k], k)) for k in required + optional if tensors.get(k) is not None}


def _check_n(n: Any, units: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected at least 1 shard, got {n}")
    if n > units:
        raise ValueError(f"n: cannot split into {n} shards, the layer has only {units} {what}")
    return int(n)


def _even_cuts(units: int, n: int) -> List[int]:
    """Boundaries splitting ``units`` into ``n`` parts differing by at most one (larger first)."""
    base, rem = divmod(units, n)
    return [i * base + min(i, rem) for i in range(n + 1)]


def _nearest_cuts(bounds: Sequence[int], n: int) -> List[int]:
    """Indices into the increasing ``bounds`` (``bounds[0] = 0``, ``bounds[-1] = total``)
    picking ``n`` non-empty parts whose sizes are as close to ``total / n`` as possible."""
    total, last = bounds[-1], len(bounds) - 1
    cuts = [0]
    for i in range(1, n):
        lo, hi = cuts[-1] + 1, last - (n - i)  # leave at least one unit per later part
        cuts.append(min(range(lo, hi + 1), key=lambda j: abs(bounds[j] - i * total / n)))
    return cuts + [last]


def _c(t: torch.Tensor) -> torch.Tensor:
    # Shards must own their memory (views of a big checkpoint tensor would keep it alive).
    return t.contiguous().clone() if t.is_contiguous() else t.contiguous()


# ------------------------------------------------------------------------- columns
def split_columns(tensors: Mapping[str, Any], n: int) -> List[Tensors]:
    """Split ``W`` along N (output features) into ``n`` shards of whole 8-column blocks.

    Shard widths differ by at most 8 columns; ``bias`` is split with the columns.
    ``concat([x @ W_i for i], dim=-1) == x @ W`` exactly (each output column is
    computed from the same codes and scales).
    """
    fmt, t = _load(tensors)
    w = t["q_weight" if fmt == "exl2" else "qweight"]
    N = int(w.shape[1])
    if N % 8:
        raise ValueError(f"tensors: N = {N} columns is not a multiple of 8")
    cuts = [8 * c for c in _even_cuts(N // 8, _check_n(n, N // 8, "blocks of 8 columns"))]
    by_column = ("q_weight", "qweight", "scales", "bias")  # sliced [.., c0:c1]
    by_word = ("q_scale", "qzeros")  # 8 columns per int32 word
    shards = []
    for c0, c1 in zip(cuts[:-1], cuts[1:]):
        shard = {}
        for k, v in t.items():
            if k in by_column:
                shard[k] = _c(v[..., c0:c1])
            elif k in by_word:
                shard[k] = _c(v[:, c0 // 8:c1 // 8])
            else:
                shard[k] = _c(v)
        shards.append(shard)
    return shards


# ---------------------------------------------------------------------------- rows
def split_rows(tensors: Mapping[str, Any], n: int) -> List[Tensors]:
    """Split ``W`` along K (input features) into ``n`` shards of whole quantization groups.

    Each shard carries ``"rows"``: int64 indices of the input columns it consumes,
    in increasing order, so ``sum(x[..., s["rows"]] @ W_s) == x @ W`` up to float
    rounding of the sum. ``bias`` goes to shard 0 only.

    - EXL2: groups are taken in storage order, cut where the row counts come
      closest to ``K/n``; each shard's ``q_invperm`` (and ``q_perm``) is re-indexed
      to its own rows.
    - GPTQ: groups are dealt out evenly (``G/n`` each, +-1). With ``g_idx`` a shard
      takes the rows of its groups wherever they lie (act-order), re-packs their
      codes and relabels ``g_idx`` from 0. A per-channel layer (one group) is split
      into blocks of 8 rows instead.
    """
    fmt, t = _load(tensors)
    shards = _split_rows_exl2(t, n) if fmt == "exl2" else _split_rows_gptq(t, n)
    for i, s in enumerate(shards):
        if "bias" in s and i > 0:
            del s["bias"]
    return shards


def _split_rows_exl2(t: Tensors, n: int) -> List[Tensors]:
    q_weight, invperm = t["q_weight"], t["q_invperm"].to(torch.int64)
    Q, K = int(q_weight.shape[0]), int(invperm.shape[0])
    groups = t["q_groups"].cpu().numpy().astype(np.int64)
    groups[1::2] &= 0xFFFF  # start rows are int16 in storage, read as unsigned
    bits, starts, rows = exl2_group_layout(groups, Q, K)
    G = int(bits.size)
    row_bounds = np.concatenate([[0], np.cumsum(rows)]).tolist()
    word_bounds = starts.tolist() + [Q]
    perm = torch.argsort(invperm)  # storage row r holds input column perm[r]
    shards = []
    cuts = _nearest_cuts(row_bounds, _check_n(n, G, "groups"))
    for g0, g1 in zip(cuts[:-1], cuts[1:]):
        r0, r1, w0, w1 = row_bounds[g0], row_bounds[g1], word_bounds[g0], word_bounds[g1]
        cols = torch.sort(perm[r0:r1]).values
        shard_invperm = (invperm[cols] - r0).to(torch.int32)
        shard_groups = np.stack([bits[g0:g1], starts[g0:g1] - w0], axis=1).reshape(-1).astype(np.int16)
        shard = {
            "q_weight": _c(q_weight[w0:w1]),
            "q_invperm": shard_invperm.contiguous(),
            "q_scale": _c(t["q_scale"][g0:g1]),
            "q_scale_max": _c(t["q_scale_max"][g0:g1]),
            "q_groups": torch.from_numpy(shard_groups).to(q_weight.device),
            "rows": cols,
        }
        if "q_perm" in t:
            shard["q_perm"] = torch.argsort(shard_invperm).to(torch.int32)
        if "bias" in t:
            shard["bias"] = _c(t["bias"])
        shards.append(shard)
    return shards


_SHIFTS = torch.arange(8, dtype=torch.int64) * 4


def _unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """int32 ``[K/8, N]`` -> int64 ``[K, N]`` 4-bit codes (row k = nibble k%8 of word k/8)."""
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = (w[:, None, :] >> _SHIFTS.to(w.device)[None, :, None]) & 15
    return codes.reshape(-1, w.shape[1])


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_unpack_rows` (K a multiple of 8)."""
    c = codes.reshape(-1, 8, codes.shape[1]) << _SHIFTS.to(codes.device)[None, :, None]
    words = c.sum(dim=1)  # disjoint nibbles: sum == bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _split_rows_gptq(t: Tensors, n: int) -> List[Tensors]:
    qweight, g_idx = t["qweight"], t.get("g_idx")
    K, G = int(qweight.shape[0]) * 8, int(t["qzeros"].shape[0])
    if G < 1 or K % G or (K // G) % 8:
        raise ValueError(f"tensors: K = {K} rows do not split into G = {G} equal groups of a multiple of 8 rows")
    gs = K // G
    dev = qweight.device
    shards = []
    if G == 1:  # per-channel: any 8-row block boundary is a group boundary
        cuts = [8 * c for c in _even_cuts(K // 8, _check_n(n, K // 8, "blocks of 8 rows"))]
        spans = [(k0, k1, 0, 1) for k0, k1 in zip(cuts[:-1], cuts[1:])]
    else:
        cuts = _even_cuts(G, _check_n(n, G, "groups"))
        spans = [(g0 * gs, g1 * gs, g0, g1) for g0, g1 in zip(cuts[:-1], cuts[1:])]
    codes = _unpack_rows(qweight) if g_idx is not None and G > 1 else None
    for k0, k1, g0, g1 in spans:
        if codes is None:  # rows k0..k1 are exactly the shard's
            rows = torch.arange(k0, k1, dtype=torch.int64, device=dev)
            shard_qweight = _c(qweight[k0 // 8:k1 // 8])
        else:  # act-order: the shard's groups own rows anywhere in K
            gi = g_idx.to(torch.int64)
            rows = torch.nonzero((gi >= g0) & (gi < g1)).flatten().to(dev)
            shard_qweight = _pack_rows(codes[rows])
        shard = {
            "qweight": shard_qweight,
            "qzeros": _c(t["qzeros"][g0:g1]),
            "scales": _c(t["scales"][g0:g1]),
            "rows": rows,
        }
        if g_idx is not None:
            shard["g_idx"] = (g_idx.to(rows.device)[rows].to(torch.int64) - g0).to(torch.int32)
        if "bias" in t:
            shard["bias"] = _c(t["bias"])
        shards.append(shard)
    return shards
