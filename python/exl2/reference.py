"""Pure-numpy reference for the EXL2, GPTQ and AWQ weight formats.

This module is the executable form of ``FORMAT.md``. It has no dependency on
torch or on the rest of the package, and every dequantization here is bit
exact with the reference CUDA implementation (checked against the golden
vectors in ``tests/data``).

Notation: ``K`` = in_features (rows of ``W`` in ``y = x @ W``), ``N`` =
out_features (columns). Packed words are ``int32`` tensors whose bits are read
as ``uint32``, little-endian, low bits first.

EXL2 (per-group mixed bit width)
--------------------------------
``q_weight`` int32 ``[Q, N]`` holds the codes of the *permuted* weight ``Wp``,
group after group. ``q_groups`` int16 ``[2G]`` gives per group ``g`` its bit
width ``q_groups[2g]`` (2, 3, 4, 5, 6 or 8, non-increasing from group to
group) and its first word row ``q_groups[2g+1]``. A group of ``w`` words has
``w * 32 / bits`` rows, except the last group, which has whatever is left of
``K`` (it may be short; its stream is padded with zero bits to a whole word).
Within a group, column ``n`` is one little-endian bit stream: the code of the
group's ``i``-th row sits at bit offset ``i * bits`` (3/5/6-bit codes may
straddle two words).

``q_scale`` int32 ``[G, N/8]`` holds 4-bit scale codes, 8 per word along N;
``q_scale_max`` float16 ``[G]`` is stored undivided. In float16, rounding after
every operation::

    qsm     = f16(q_scale_max[g] / 256)
    scale   = f16(f16((code + 1)^2) * qsm)
    Wp[r,n] = f16((q[r,n] - 2^(bits-1)) * scale[g,n])       # one rounding
    W[k,n]  = Wp[q_invperm[k], n]                            # q_perm = argsort(q_invperm)

GPTQ (2, 3, 4 or 8 bits, AutoGPTQ packing)
------------------------------------------
``qweight`` int32 ``[K*b/32, N]``: each column is one little-endian ``b``-bit
stream along K, the code of row ``k`` at bit offset ``k*b`` (4-bit: nibble
``k % 8`` of word row ``k // 8``; 3-bit: 32 rows in 3 words, a code may
straddle two words). ``qzeros`` int32 ``[G, N*b/32]``: each row one ``b``-bit
stream along N; the effective zero is ``(stored + 1) & (2**b - 1)`` in the
AutoGPTQ "v1" convention and ``stored`` in "v2". ``scales`` float16 ``[G, N]``.
Optional ``g_idx`` int32 ``[K]`` gives the group of each row (out of order for
act-order checkpoints, every group still holding ``K / G`` rows); without it
row ``k`` is in group ``k // (K / G)``::

    W[k,n] = f16(scales[g,n] * (q[k,n] - z[g,n])),   g = g_idx[k]

AWQ (4-bit, AutoAWQ "GEMM" packing)
-----------------------------------
``qweight`` int32 ``[K, N/8]`` and ``qzeros`` int32 ``[G, N/8]`` pack 8
columns per word along N in AWQ's interleaved order: nibble ``i`` of word ``j``
holds column ``8*j + AWQ_ORDER[i]`` with ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``.
``scales`` float16 ``[G, N]``; group ``g`` covers rows ``g*K/G`` to
``(g+1)*K/G - 1``; the zero is used as stored::

    W[k,n] = f16(scales[g,n] * (q[k,n] - z[g,n])),   g = k // (K / G)

bfloat16
--------
The dequantizers take ``dtype="bfloat16"`` for the weight in bfloat16:
``bf16((q - z) * s)`` with the same fp16 scale ``s`` (for EXL2 the float16
scale above), i.e. the exact float32 product rounded once, to nearest even.
numpy has no bfloat16 type, so such weights are returned as float32 arrays
whose values are all bfloat16 values (:func:`round_bf16`; :func:`bf16_bits`
gives the 16-bit patterns).

``dtype="float32"`` returns the exact, unrounded weight ``(q - z) * s`` (exact
in float32: at most 8 bits times the 11 of a float16 scale). It is what the
CUDA tensor-core kernel up to 16 rows multiplies by, in float16 and bfloat16
(it applies each group's scale in float32 to the group's sums of
``x * (q - z)``), so its results are bounded against this weight rather than
the rounded one.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "EXL2_BITS",
    "f16_scale_exl2",
    "exl2_group_layout",
    "exl2_group_map",
    "unpack_exl2_codes",
    "unpack_exl2_scale_codes",
    "dequantize_exl2",
    "pack_exl2",
    "GPTQ_BITS",
    "AWQ_ORDER",
    "unpack_gptq_codes",
    "unpack_gptq_zeros",
    "dequantize_gptq",
    "pack_gptq",
    "act_order_perm",
    "unpack_awq_codes",
    "unpack_awq_zeros",
    "dequantize_awq",
    "pack_awq",
    "random_awq",
    "round_bf16",
    "bf16_bits",
    "random_exl2",
    "random_gptq",
    "gemm",
]

#: Bit widths an EXL2 group may use.
EXL2_BITS = (2, 3, 4, 5, 6, 8)

_NIBBLE_SHIFTS = np.arange(8, dtype=np.uint32) * 4  # shifts of the 8 nibbles in a word

#: Bit widths of GPTQ checkpoints (AutoGPTQ packing).
GPTQ_BITS = (2, 3, 4, 8)

#: AWQ's nibble order: nibble ``i`` of a packed word holds column ``AWQ_ORDER[i]`` of its 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_NIBBLE_OF_COLUMN = np.argsort(AWQ_ORDER)  # column c sits in nibble [0, 4, 1, 5, 2, 6, 3, 7][c]


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _as_u32(a: Any) -> np.ndarray:
    """Reinterpret packed words (int32 or uint32; other ints via their low 32 bits) as uint32."""
    a = np.asarray(a)
    if a.dtype == np.uint32:
        return a
    if a.dtype == np.int32:
        return a.view(np.uint32)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"packed words must be an integer array, got {a.dtype}")
    return (a.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)


def _u32_to_i32(a: np.ndarray) -> np.ndarray:
    """uint32/uint64 words (< 2**32) -> int32 with the same bits."""
    return np.ascontiguousarray(a.astype(np.uint32)).view(np.int32)


def _unpack_nibbles_along_last(words: np.ndarray) -> np.ndarray:
    """[..., M] words -> [..., 8*M] nibbles; element j is nibble j % 8 of word j // 8."""
    w = _as_u32(words)
    nib = (w[..., None] >> _NIBBLE_SHIFTS) & 15
    return nib.reshape(*w.shape[:-1], w.shape[-1] * 8).astype(np.int32)


def _pack_nibbles_along_last(vals: np.ndarray) -> np.ndarray:
    """[..., 8*M] values in 0..15 -> [..., M] int32 words (inverse of the above)."""
    v = np.asarray(vals).astype(np.uint64)
    if v.shape[-1] % 8:
        raise ValueError(f"last dimension must be a multiple of 8, got {v.shape[-1]}")
    v = v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)
    return _u32_to_i32((v << _NIBBLE_SHIFTS.astype(np.uint64)).sum(axis=-1))


def _check_range(name: str, a: np.ndarray, lo: int, hi: int) -> None:
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got [{a.min()}, {a.max()}]")


def _f16(a: np.ndarray) -> np.ndarray:
    """Round (float32/float64 values) to float16, round-to-nearest-even."""
    return np.asarray(a).astype(np.float16)


def _unpack_stream_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """[W, M] words, each column a little-endian ``bits``-bit stream along axis 0 ->
    int32 [W*32/bits, M] codes (code ``i`` at bit offset ``i*bits``)."""
    w = _as_u32(words)
    if w.ndim != 2 or (w.shape[0] * 32) % bits:
        raise ValueError(f"{w.shape} words do not hold a whole number of {bits}-bit codes per column")
    n = w.shape[0] * 32 // bits
    offset = np.arange(n, dtype=np.int64) * bits
    word, shift = offset // 32, (offset % 32).astype(np.uint64)
    w64 = np.concatenate([w, np.zeros((1, w.shape[1]), np.uint32)]).astype(np.uint64)
    pair = (w64[word + 1] << np.uint64(32)) | w64[word]
    return ((pair >> shift[:, None]) & np.uint64((1 << bits) - 1)).astype(np.int32)


def _pack_stream_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_unpack_stream_rows`: int [n, M] codes (n*bits a multiple of 32)
    -> int32 [n*bits/32, M] words."""
    codes = np.asarray(codes)
    n, m = codes.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    Q = n * bits // 32
    offset = np.arange(n, dtype=np.int64) * bits
    word, shift = offset // 32, (offset % 32).astype(np.uint64)
    # Each code shifted into a 64-bit lane gives its low half to `word` and its high half
    # (nonzero only when it straddles) to `word + 1`; `word` is non-decreasing, so both
    # are OR-reduced over runs of equal targets.
    lane = codes.astype(np.uint64) << shift[:, None]
    out = np.zeros((Q + 1, m), np.uint64)
    if n:
        for target, part in ((word, lane & np.uint64(0xFFFFFFFF)), (word + 1, lane >> np.uint64(32))):
            run_start = np.flatnonzero(np.r_[True, np.diff(target) != 0])
            out[target[run_start]] |= np.bitwise_or.reduceat(part, run_start, axis=0)
    assert not out[Q].any()
    return _u32_to_i32(out[:Q])


def _check_gptq_bits(bits: int) -> int:
    # An integer (int, numpy integer: anything with __index__), like QMatrix.from_gptq:
    # not a bool, not a float such as 4.0.
    try:
        b = None if isinstance(bits, bool) else operator.index(bits)
    except TypeError:
        b = None
    if b not in GPTQ_BITS:
        raise ValueError(f"bits must be one of {GPTQ_BITS}, got {bits!r}")
    return b


def round_bf16(a: Any) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest even), returned as float32.

    Float64 input is first converted to float32 (exact for the products this
    module forms). NaN stays NaN (as ``sign | 0x7fc0``); overflow gives +-inf.
    """
    f = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    nan = np.isnan(f)
    if nan.any():
        r = np.where(nan, (f.view(np.uint32) & np.uint32(0x80000000)) | np.uint32(0x7FC00000), r)
    return r.view(np.float32).reshape(f.shape)


def bf16_bits(a: Any) -> np.ndarray:
    """The uint16 bfloat16 bit patterns of ``round_bf16(a)``."""
    return (round_bf16(a).view(np.uint32) >> 16).astype(np.uint16)


def _round_weight(prod: np.ndarray, dtype: str) -> np.ndarray:
    """The one rounding of the exact float32 weight products: float16 or bfloat16; float32:
    none (the products themselves)."""
    if dtype == "float16":
        return _f16(prod)
    if dtype == "bfloat16":
        return round_bf16(prod)
    if dtype == "float32":
        return np.ascontiguousarray(prod, dtype=np.float32)
    raise ValueError(f"dtype: expected 'float16', 'bfloat16' or 'float32', got {dtype!r}")


# ---------------------------------------------------------------------------
# EXL2
# ---------------------------------------------------------------------------


def f16_scale_exl2(
    scale_codes: np.ndarray, q_scale_max: np.ndarray, prescaled: bool = False
) -> np.ndarray:
    """Effective EXL2 scales, float16 ``[G, N]``.

    ``scale = f16(f16((code + 1)**2) * qsm)`` with ``qsm = f16(q_scale_max / 256)``
    (or ``qsm = q_scale_max`` when ``prescaled``, i.e. already divided by 256 as
    the servers do before calling the reference binding). Each step is rounded
    to float16; the float32 intermediates are exact, so there is one rounding
    per step.

    Args:
        scale_codes: integer ``[G, N]`` 4-bit scale codes (0..15).
        q_scale_max: ``[G]`` per-group maximum scale (converted to float16 first).
        prescaled: ``q_scale_max`` is already divided by 256.
    """
    codes = np.asarray(scale_codes).astype(np.int64)
    _check_range("scale codes", codes, 0, 15)
    qsm = np.asarray(q_scale_max).astype(np.float16).reshape(-1)
    if codes.ndim != 2 or codes.shape[0] != qsm.shape[0]:
        raise ValueError(f"scale_codes {codes.shape} does not match q_scale_max {qsm.shape}")
    if not prescaled:
        qsm = _f16(qsm.astype(np.float32) / np.float32(256))
    sq = _f16((codes + 1) ** 2)  # exact: integers <= 256
    return _f16(sq.astype(np.float32) * qsm.astype(np.float32)[:, None])


def exl2_group_layout(
    q_groups: np.ndarray, Q: int, K: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode ``q_groups`` into per-group ``(bits, first_word, rows)``, int64 ``[G]`` each.

    Every group but the last has ``words * 32 / bits`` rows (must be whole).
    The last group has ``K - (rows of the others)`` rows when ``K`` is given,
    else ``words * 32 // bits``; its words must hold them.

    Raises:
        ValueError: on bit widths outside :data:`EXL2_BITS`, increasing bit
            widths, non-increasing or out-of-range word starts, or row counts
            that do not fit.
    """
    qg = np.asarray(q_groups).astype(np.int64).reshape(-1)
    if qg.size == 0 or qg.size % 2:
        raise ValueError(f"q_groups must hold 2*G > 0 entries, got {qg.size}")
    bits, starts = qg[0::2], qg[1::2]
    if not np.isin(bits, EXL2_BITS).all():
        raise ValueError(f"group bit widths must be in {EXL2_BITS}, got {np.unique(bits)}")
    if np.any(np.diff(bits) > 0):
        raise ValueError("groups must be in order of non-increasing bit width")
    if starts[0] != 0:
        raise ValueError(f"first group must start at word 0, got {starts[0]}")
    words = np.diff(np.append(starts, Q))
    if np.any(words <= 0):
        raise ValueError(f"group word starts must increase and stay below Q={Q}")
    stream_bits = words * 32
    rows = stream_bits // bits
    if np.any(stream_bits[:-1] % bits[:-1]):
        g = int(np.nonzero(stream_bits[:-1] % bits[:-1])[0][0])
        raise ValueError(
            f"group {g}: {words[g]} words of {bits[g]}-bit codes is not a whole number of rows"
        )
    if K is not None:
        last = K - int(rows[:-1].sum())
        if last <= 0 or last * bits[-1] > stream_bits[-1]:
            raise ValueError(
                f"K={K} leaves {last} rows for the last group, which has "
                f"{words[-1]} words of {bits[-1]}-bit codes"
            )
        rows = rows.copy()
        rows[-1] = last
    return bits, starts, rows


def exl2_group_map(q_groups: np.ndarray, Q: int, K: int) -> np.ndarray:
    """The ``q_group_map`` servers pass to the reference binding: int16 ``[2K]``.

    For row ``j`` (storage order, 0-based) of group ``g`` with ``rows_g`` rows,
    the pair ``(g, rows_g - j)``.
    """
    _, _, rows = exl2_group_layout(q_groups, Q, K)
    g = np.repeat(np.arange(rows.size), rows)
    j = np.arange(K) - np.repeat(np.cumsum(rows) - rows, rows)
    return np.stack([g, rows[g] - j], axis=1).reshape(-1).astype(np.int16)


def _exl2_row_positions(
    bits: np.ndarray, starts: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per storage row: (group, bits, word index, bit shift within that word)."""
    group = np.repeat(np.arange(rows.size), rows)
    first_row = np.cumsum(rows) - rows
    local = np.arange(int(rows.sum())) - first_row[group]
    offset = local * bits[group]
    return group, bits[group], starts[group] + offset // 32, offset % 32


def unpack_exl2_codes(
    q_weight: np.ndarray, q_groups: np.ndarray, K: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Unpack EXL2 codes, in storage (permuted) row order.

    Args:
        q_weight: int32 ``[Q, N]`` packed words.
        q_groups: int16 ``[2G]`` (bits, first word) per group.
        K: number of rows; needed only when the last group is short and its
            zero padding is not a whole number of rows (see
            :func:`exl2_group_layout`). ``len(q_invperm)`` is always right.

    Returns:
        ``(codes, bits_per_row)``: int32 ``[K, N]`` codes in ``0 .. 2**bits - 1``
        and int32 ``[K]`` bit width of each storage row.
    """
    words = _as_u32(q_weight)
    if words.ndim != 2:
        raise ValueError(f"q_weight must be 2-D, got shape {words.shape}")
    Q, N = words.shape
    bits, starts, rows = exl2_group_layout(q_groups, Q, K)
    _, row_bits, word, shift = _exl2_row_positions(bits, starts, rows)
    # A code of row r lives in bits [shift, shift + bits) of the 64-bit value
    # (words[word + 1] << 32) | words[word]; one zero row makes word + 1 valid.
    w64 = np.concatenate([words, np.zeros((1, N), np.uint32)]).astype(np.uint64)
    pair = (w64[word + 1] << np.uint64(32)) | w64[word]
    mask = (np.uint64(1) << row_bits.astype(np.uint64)) - np.uint64(1)
    codes = (pair >> shift.astype(np.uint64)[:, None]) & mask[:, None]
    return codes.astype(np.int32), row_bits.astype(np.int32)


def unpack_exl2_scale_codes(q_scale: np.ndarray) -> np.ndarray:
    """int32 ``[G, N/8]`` -> int32 ``[G, N]`` 4-bit scale codes (nibble ``n % 8`` of word ``n / 8``)."""
    return _unpack_nibbles_along_last(q_scale)


def dequantize_exl2(
    q_weight: np.ndarray,
    q_invperm: np.ndarray,
    q_scale: np.ndarray,
    q_scale_max: np.ndarray,
    q_groups: np.ndarray,
    *,
    prescaled: bool = False,
    dtype: str = "float16",
) -> np.ndarray:
    """Dense EXL2 weight, float16 ``[K, N]``, bit exact with the reference kernels.

    ``Wp[r, n] = f16((q - 2**(b-1)) * scale[g, n])`` for storage row ``r`` in
    group ``g`` of ``b`` bits (the product is exact in float32, so one
    rounding), then ``W[k] = Wp[q_invperm[k]]``.

    Args:
        q_weight, q_invperm, q_scale, q_scale_max, q_groups: the checkpoint tensors.
        prescaled: ``q_scale_max`` was already divided by 256 (see
            :func:`f16_scale_exl2`).
        dtype: ``"float16"``, ``"bfloat16"`` (``bf16((q - 2**(b-1)) * scale)`` with
            the same float16 scale, returned as float32 holding bfloat16 values) or
            ``"float32"`` (the exact product, unrounded).
    """
    _round_weight(np.zeros(0, np.float32), dtype)  # validates dtype before any work
    invperm = np.asarray(q_invperm).astype(np.int64).reshape(-1)
    K = invperm.size
    if not np.array_equal(np.sort(invperm), np.arange(K)):
        raise ValueError("q_invperm is not a permutation of 0..K-1")
    codes, _ = unpack_exl2_codes(q_weight, q_groups, K)
    bits, starts, rows = exl2_group_layout(q_groups, np.asarray(q_weight).shape[0], K)
    group, row_bits, _, _ = _exl2_row_positions(bits, starts, rows)
    scale_codes = unpack_exl2_scale_codes(q_scale)
    if scale_codes.shape != (bits.size, codes.shape[1]):
        raise ValueError(
            f"q_scale unpacks to {scale_codes.shape}, expected {(bits.size, codes.shape[1])}"
        )
    scales = f16_scale_exl2(scale_codes, q_scale_max, prescaled)
    centred = (codes - (1 << (row_bits - 1))[:, None]).astype(np.float32)
    wp = _round_weight(centred * scales[group].astype(np.float32), dtype)
    return wp[invperm]


def pack_exl2(
    codes: np.ndarray,
    group_bits: Sequence[int],
    group_rows: Sequence[int],
    scale_codes: np.ndarray,
    q_scale_max: np.ndarray,
    q_invperm: np.ndarray,
) -> dict[str, np.ndarray]:
    """Pack an EXL2 layer (inverse of :func:`unpack_exl2_codes` & co.).

    Args:
        codes: integer ``[K, N]`` codes in storage (permuted) row order,
            group ``g`` covering the next ``group_rows[g]`` rows with codes in
            ``0 .. 2**group_bits[g] - 1``.
        group_bits: ``[G]`` bit widths, each in :data:`EXL2_BITS`, non-increasing.
        group_rows: ``[G]`` rows per group, summing to ``K``. Every group but the
            last must fill whole words (``rows * bits % 32 == 0``); the last one
            is padded with zero bits to a whole word.
        scale_codes: integer ``[G, N]`` 4-bit scale codes; ``N`` a multiple of 8.
        q_scale_max: ``[G]`` undivided maximum scales (stored as float16).
        q_invperm: ``[K]`` permutation with ``W[k] = Wp[q_invperm[k]]``.

    Returns:
        dict with ``q_weight`` int32 ``[Q, N]``, ``q_groups`` int16 ``[2G]``,
        ``q_scale`` int32 ``[G, N/8]``, ``q_scale_max`` float16 ``[G]``,
        ``q_invperm`` int32 ``[K]`` and ``q_perm`` int32 ``[K]`` (``argsort(q_invperm)``).

    Raises:
        ValueError: on any inconsistency listed above.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be a 2-D integer array, got {codes.dtype} {codes.shape}")
    K, N = codes.shape
    bits = np.asarray(group_bits, dtype=np.int64).reshape(-1)
    rows = np.asarray(group_rows, dtype=np.int64).reshape(-1)
    G = bits.size
    if G == 0 or rows.size != G:
        raise ValueError(f"need one row count per group: {G} bit widths, {rows.size} row counts")
    if not np.isin(bits, EXL2_BITS).all():
        raise ValueError(f"group bit widths must be in {EXL2_BITS}, got {np.unique(bits)}")
    if np.any(np.diff(bits) > 0):
        raise ValueError(f"groups must be in order of non-increasing bit width, got {bits.tolist()}")
    if np.any(rows <= 0) or rows.sum() != K:
        raise ValueError(f"group rows must be positive and sum to K={K}, got sum {rows.sum()}")
    if np.any(rows[:-1] * bits[:-1] % 32):
        g = int(np.nonzero(rows[:-1] * bits[:-1] % 32)[0][0])
        raise ValueError(
            f"group {g} ({rows[g]} rows of {bits[g]} bits) does not fill whole words; "
            "only the last group may"
        )
    if N % 8:
        raise ValueError(f"N must be a multiple of 8, got {N}")
    scale_codes = np.asarray(scale_codes)
    if scale_codes.shape != (G, N):
        raise ValueError(f"scale_codes must be {(G, N)}, got {scale_codes.shape}")
    _check_range("scale codes", scale_codes, 0, 15)
    q_scale_max = np.asarray(q_scale_max).astype(np.float16).reshape(-1)
    if q_scale_max.shape != (G,):
        raise ValueError(f"q_scale_max must be [{G}], got {q_scale_max.shape}")
    invperm = np.asarray(q_invperm).astype(np.int64).reshape(-1)
    if not np.array_equal(np.sort(invperm), np.arange(K)):
        raise ValueError("q_invperm is not a permutation of 0..K-1")
    row_bits = np.repeat(bits, rows)
    if K and (codes.min() < 0 or np.any(codes.max(axis=1) >= (1 << row_bits))):
        raise ValueError("codes out of range for their group's bit width")

    words = -(-rows * bits // 32)  # ceil: the last group may be padded
    starts = np.cumsum(words) - words
    Q = int(words.sum())
    if Q > np.iinfo(np.int16).max:
        raise ValueError(f"Q={Q} word rows do not fit int16 q_groups")
    _, _, word, shift = _exl2_row_positions(bits, starts, rows)

    # Each code, shifted into place in a 64-bit lane, contributes its low half
    # to word `word` and its high half (nonzero only if it straddles) to
    # `word + 1`. `word` is non-decreasing, so both can be OR-reduced over runs.
    lane = codes.astype(np.uint64) << shift.astype(np.uint64)[:, None]
    out = np.zeros((Q + 1, N), np.uint64)
    for target, part in ((word, lane & np.uint64(0xFFFFFFFF)), (word + 1, lane >> np.uint64(32))):
        run_start = np.flatnonzero(np.r_[True, np.diff(target) != 0])
        out[target[run_start]] |= np.bitwise_or.reduceat(part, run_start, axis=0)
    assert not out[Q].any()

    q_groups = np.stack([bits, starts], axis=1).reshape(-1).astype(np.int16)
    return {
        "q_weight": _u32_to_i32(out[:Q]),
        "q_groups": q_groups,
        "q_scale": _pack_nibbles_along_last(scale_codes),
        "q_scale_max": q_scale_max,
        "q_invperm": invperm.astype(np.int32),
        "q_perm": np.argsort(invperm).astype(np.int32),
    }


# ---------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------


def unpack_gptq_codes(qweight: np.ndarray, bits: int = 4) -> np.ndarray:
    """int32 ``[K*bits/32, N]`` -> int32 ``[K, N]`` codes; row ``k`` sits at bit offset
    ``k*bits`` of its column's little-endian stream (4-bit: nibble ``k % 8`` of word row ``k / 8``)."""
    bits = _check_gptq_bits(bits)
    w = _as_u32(qweight)
    if w.ndim != 2:
        raise ValueError(f"qweight must be 2-D, got shape {w.shape}")
    return _unpack_stream_rows(w, bits)


def unpack_gptq_zeros(qzeros: np.ndarray, zero_format: str = "v1", bits: int = 4) -> np.ndarray:
    """int32 ``[G, N*bits/32]`` -> int32 ``[G, N]`` *effective* zeros.

    ``zero_format="v1"`` (AutoGPTQ): ``z = (stored + 1) & (2**bits - 1)``; ``"v2"``: ``z = stored``.
    """
    bits = _check_gptq_bits(bits)
    w = _as_u32(qzeros)
    if w.ndim != 2:
        raise ValueError(f"qzeros must be 2-D, got shape {w.shape}")
    stored = _unpack_stream_rows(w.T, bits).T
    if zero_format == "v1":
        return (stored + 1) & ((1 << bits) - 1)
    if zero_format == "v2":
        return stored
    raise ValueError(f"zero_format must be 'v1' or 'v2', got {zero_format!r}")


def _gptq_groups(K: int, G: int, g_idx: np.ndarray | None) -> np.ndarray:
    """Group of every row: ``g_idx`` if given, else ``k // (K / G)``."""
    if g_idx is None:
        if G <= 0 or K % G:
            raise ValueError(f"K={K} is not a multiple of the number of groups G={G}")
        return np.arange(K) // (K // G)
    g = np.asarray(g_idx).astype(np.int64).reshape(-1)
    if g.size != K:
        raise ValueError(f"g_idx must have K={K} entries, got {g.size}")
    _check_range("g_idx", g, 0, G - 1)
    return g


def dequantize_gptq(
    qweight: np.ndarray,
    qzeros: np.ndarray,
    scales: np.ndarray,
    g_idx: np.ndarray | None = None,
    zero_format: str = "v1",
    bits: int = 4,
    dtype: str = "float16",
) -> np.ndarray:
    """Dense GPTQ weight, float16 ``[K, N]``, bit exact with the reference kernels.

    ``W[k, n] = f16(scales[g, n] * (q[k, n] - z[g, n]))`` with ``g = g_idx[k]``,
    or ``g = k // (K / G)`` without ``g_idx``. The product is exact in float32.
    ``dtype="bfloat16"`` rounds it to bfloat16 instead (float32 array of bfloat16 values),
    ``dtype="float32"`` returns it unrounded.
    """
    _round_weight(np.zeros(0, np.float32), dtype)  # validates dtype before any work
    q = unpack_gptq_codes(qweight, bits)
    z = unpack_gptq_zeros(qzeros, zero_format, bits)
    s = np.asarray(scales).astype(np.float16)
    K, N = q.shape
    if s.ndim != 2 or s.shape[1] != N or z.shape != s.shape:
        raise ValueError(f"shapes disagree: qweight -> {q.shape}, qzeros -> {z.shape}, scales {s.shape}")
    g = _gptq_groups(K, s.shape[0], g_idx)
    return _round_weight(s[g].astype(np.float32) * (q - z[g]).astype(np.float32), dtype)


def pack_gptq(
    codes: np.ndarray,
    zeros: np.ndarray,
    scales: np.ndarray,
    g_idx: np.ndarray | None = None,
    zero_format: str = "v1",
    bits: int = 4,
) -> dict[str, np.ndarray]:
    """Pack a GPTQ layer (inverse of :func:`unpack_gptq_codes` / :func:`unpack_gptq_zeros`).

    Args:
        codes: integer ``[K, N]`` codes in ``0 .. 2**bits - 1``; ``K*bits`` and
            ``N*bits`` multiples of 32 (3-bit: K and N multiples of 32) and N a
            multiple of 8.
        zeros: integer ``[G, N]`` *effective* zeros in ``0 .. 2**bits - 1`` (v1
            stores ``(z - 1) & (2**bits - 1)``).
        scales: ``[G, N]`` scales (stored as float16).
        g_idx: optional ``[K]`` group per row (returned as int32).
        zero_format: ``"v1"`` or ``"v2"``.
        bits: 2, 3, 4 or 8.

    Returns:
        dict with ``qweight`` int32 ``[K*bits/32, N]``, ``qzeros`` int32
        ``[G, N*bits/32]``, ``scales`` float16 ``[G, N]`` and, if given,
        ``g_idx`` int32 ``[K]``.
    """
    bits = _check_gptq_bits(bits)
    codes = np.asarray(codes)
    zeros = np.asarray(zeros)
    if codes.ndim != 2 or (codes.shape[0] * bits) % 32 or (codes.shape[1] * bits) % 32 or codes.shape[1] % 8:
        raise ValueError(
            f"codes must be [K, N] with K*bits, N*bits multiples of 32 and N of 8 (bits={bits}), got {codes.shape}"
        )
    K, N = codes.shape
    s = np.asarray(scales).astype(np.float16)
    if s.ndim != 2 or s.shape[1] != N or zeros.shape != s.shape:
        raise ValueError(f"zeros {zeros.shape} and scales {s.shape} must both be [G, {N}]")
    mask = (1 << bits) - 1
    _check_range("codes", codes, 0, mask)
    _check_range("zeros", zeros, 0, mask)
    if zero_format == "v1":
        stored = (zeros.astype(np.int64) - 1) & mask
    elif zero_format == "v2":
        stored = zeros.astype(np.int64)
    else:
        raise ValueError(f"zero_format must be 'v1' or 'v2', got {zero_format!r}")
    g = _gptq_groups(K, s.shape[0], g_idx)  # validates g_idx / K % G
    out = {
        "qweight": _pack_stream_rows(codes, bits),
        "qzeros": np.ascontiguousarray(_pack_stream_rows(stored.T, bits).T),
        "scales": s,
    }
    if g_idx is not None:
        out["g_idx"] = g.astype(np.int32)
    return out


def act_order_perm(g_idx: np.ndarray) -> np.ndarray:
    """Rows sorted by group, stable: int32 ``perm`` with ``g_idx[perm]`` non-decreasing.

    This is the ``q_perm`` the reference binding fills for GPTQ with ``g_idx``;
    its inverse (``argsort(perm)``) is ``q_invperm``.
    """
    return np.argsort(np.asarray(g_idx).reshape(-1), kind="stable").astype(np.int32)


# ---------------------------------------------------------------------------
# AWQ
# ---------------------------------------------------------------------------


def _unpack_awq_along_last(words: np.ndarray) -> np.ndarray:
    """[..., M] words -> [..., 8*M] values: column ``8j + c`` is nibble ``[0,4,1,5,2,6,3,7][c]`` of word ``j``."""
    nib = _unpack_nibbles_along_last(words)  # column 8j + i = nibble i
    nib = nib.reshape(*nib.shape[:-1], -1, 8)[..., _AWQ_NIBBLE_OF_COLUMN]
    return nib.reshape(*nib.shape[:-2], -1)


def _pack_awq_along_last(vals: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_unpack_awq_along_last`: nibble ``i`` of word ``j`` gets column ``8j + AWQ_ORDER[i]``."""
    v = np.asarray(vals)
    if v.shape[-1] % 8:
        raise ValueError(f"last dimension must be a multiple of 8, got {v.shape[-1]}")
    v = v.reshape(*v.shape[:-1], -1, 8)[..., list(AWQ_ORDER)]
    return _pack_nibbles_along_last(v.reshape(*v.shape[:-2], -1))


def unpack_awq_codes(qweight: np.ndarray) -> np.ndarray:
    """int32 ``[K, N/8]`` -> int32 ``[K, N]`` 4-bit codes (AWQ nibble order)."""
    w = _as_u32(qweight)
    if w.ndim != 2:
        raise ValueError(f"qweight must be 2-D, got shape {w.shape}")
    return _unpack_awq_along_last(w)


def unpack_awq_zeros(qzeros: np.ndarray) -> np.ndarray:
    """int32 ``[G, N/8]`` -> int32 ``[G, N]`` zeros (AWQ nibble order, used as stored)."""
    w = _as_u32(qzeros)
    if w.ndim != 2:
        raise ValueError(f"qzeros must be 2-D, got shape {w.shape}")
    return _unpack_awq_along_last(w)


def dequantize_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
                   dtype: str = "float16") -> np.ndarray:
    """Dense AWQ weight, float16 ``[K, N]``: ``W[k, n] = f16(scales[g, n] * (q[k, n] - z[g, n]))``
    with ``g = k // (K / G)``. The product is exact in float32 (one rounding).
    ``dtype="bfloat16"`` rounds it to bfloat16 instead (float32 array of bfloat16 values),
    ``dtype="float32"`` returns it unrounded."""
    _round_weight(np.zeros(0, np.float32), dtype)  # validates dtype before any work
    q = unpack_awq_codes(qweight)
    z = unpack_awq_zeros(qzeros)
    s = np.asarray(scales).astype(np.float16)
    K, N = q.shape
    if s.ndim != 2 or s.shape[1] != N or z.shape != s.shape:
        raise ValueError(f"shapes disagree: qweight -> {q.shape}, qzeros -> {z.shape}, scales {s.shape}")
    g = _gptq_groups(K, s.shape[0], None)
    return _round_weight(s[g].astype(np.float32) * (q - z[g]).astype(np.float32), dtype)


def pack_awq(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray) -> dict[str, np.ndarray]:
    """Pack an AWQ layer (inverse of :func:`unpack_awq_codes` / :func:`unpack_awq_zeros`).

    Args:
        codes: integer ``[K, N]`` codes in 0..15, ``N`` a multiple of 8.
        zeros: integer ``[G, N]`` zeros in 0..15 (``G`` divides ``K``).
        scales: ``[G, N]`` scales (stored as float16).

    Returns:
        dict with ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[G, N/8]`` and
        ``scales`` float16 ``[G, N]``.
    """
    codes = np.asarray(codes)
    zeros = np.asarray(zeros)
    if codes.ndim != 2 or codes.shape[1] % 8:
        raise ValueError(f"codes must be [K, N] with N a multiple of 8, got {codes.shape}")
    K, N = codes.shape
    s = np.asarray(scales).astype(np.float16)
    if s.ndim != 2 or s.shape[1] != N or zeros.shape != s.shape:
        raise ValueError(f"zeros {zeros.shape} and scales {s.shape} must both be [G, {N}]")
    _gptq_groups(K, s.shape[0], None)  # G divides K
    _check_range("codes", codes, 0, 15)
    _check_range("zeros", zeros, 0, 15)
    return {"qweight": _pack_awq_along_last(codes), "qzeros": _pack_awq_along_last(zeros), "scales": s}


# ---------------------------------------------------------------------------
# random layers and a float64 GEMM, for tests
# ---------------------------------------------------------------------------


def random_exl2(
    rng: np.random.Generator,
    K: int,
    N: int,
    *,
    bits: int | Sequence[tuple[int, int]] = 4,
    group_size: int = 32,
    permute: bool = True,
    bias: bool = False,
    scale_max_range: tuple[float, float] = (0.002, 0.02),
) -> dict[str, np.ndarray]:
    """A random EXL2 layer of any shape.

    Args:
        rng: numpy random generator.
        K, N: shape of ``W``; ``N`` a multiple of 8.
        bits: one bit width for all groups (``K // group_size`` groups of
            ``group_size`` rows, plus a short last group if ``K`` is not a
            multiple), or an explicit list of ``(bits, rows)`` groups whose rows
            sum to ``K``; those are put in non-increasing bit order (stable),
            and only the last one may leave a partial word.
        group_size: rows per group when ``bits`` is an int.
        permute: use a random ``q_invperm`` (else the identity).
        bias: add a random float16 ``bias`` ``[N]``.
        scale_max_range: ``q_scale_max`` (undivided, as stored) is uniform in
            this range, then float16. The default matches the golden data and
            real checkpoints, where ``q_scale_max / 256`` is float16-subnormal.

    Returns:
        :func:`pack_exl2`'s dict (``q_weight``, ``q_groups``, ``q_scale``,
        ``q_scale_max``, ``q_invperm``, ``q_perm``), plus ``bias`` if asked and
        ``weight``: the float16 ``[K, N]`` dense weight (:func:`dequantize_exl2`).
    """
    if isinstance(bits, (int, np.integer)):
        n_full, rest = divmod(K, group_size)
        groups = [(int(bits), group_size)] * n_full + ([(int(bits), rest)] if rest else [])
    else:
        groups = sorted(((int(b), int(r)) for b, r in bits), key=lambda br: -br[0])
    group_bits = [b for b, _ in groups]
    group_rows = [r for _, r in groups]
    if sum(group_rows) != K:
        raise ValueError(f"group rows sum to {sum(group_rows)}, not K={K}")
    row_bits = np.repeat(np.asarray(group_bits, np.int64), group_rows)
    codes = (rng.integers(0, 1 << 30, size=(K, N)) % (1 << row_bits)[:, None]).astype(np.int32)
    G = len(groups)
    scale_codes = rng.integers(0, 16, size=(G, N))
    q_scale_max = rng.uniform(*scale_max_range, size=G).astype(np.float16)
    invperm = rng.permutation(K) if permute else np.arange(K)
    out = pack_exl2(codes, group_bits, group_rows, scale_codes, q_scale_max, invperm)
    if bias:
        out["bias"] = rng.uniform(-0.5, 0.5, size=N).astype(np.float16)
    out["weight"] = dequantize_exl2(
        out["q_weight"], out["q_invperm"], out["q_scale"], out["q_scale_max"], out["q_groups"]
    )
    return out


def random_gptq(
    rng: np.random.Generator,
    K: int,
    N: int,
    *,
    group_size: int | None = 128,
    act_order: bool = False,
    zero_format: str = "v1",
    bias: bool = False,
    with_g_idx: bool = False,
    bits: int = 4,
) -> dict[str, np.ndarray]:
    """A random GPTQ layer of any shape :func:`pack_gptq` accepts.

    Args:
        rng: numpy random generator.
        K, N: shape of ``W``.
        group_size: rows per group (must divide ``K``); ``None`` = one group
            (per-channel quantization).
        act_order: ``g_idx`` is a random permutation of the ordered assignment,
            every group still holding exactly ``group_size`` rows.
        zero_format: ``"v1"`` or ``"v2"`` storage of ``qzeros``.
        bias: add a random float16 ``bias`` ``[N]``.
        with_g_idx: also store the (ordered) ``g_idx`` when not ``act_order``,
            as many checkpoints do.
        bits: code width, 2, 3, 4 or 8.

    Returns:
        :func:`pack_gptq`'s dict (``qweight``, ``qzeros``, ``scales``, ``g_idx``
        when act-order or asked), plus ``bias`` if asked and ``weight``: the
        float16 ``[K, N]`` dense weight (:func:`dequantize_gptq`).
    """
    bits = _check_gptq_bits(bits)
    if group_size is None:
        group_size = K
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group_size={group_size} must divide K={K}")
    G = K // group_size
    codes = rng.integers(0, 1 << bits, size=(K, N))
    zeros = rng.integers(0, 1 << bits, size=(G, N))
    scales = rng.uniform(0.001, 0.02, size=(G, N)).astype(np.float16)
    g_idx = np.arange(K) // group_size
    if act_order:
        g_idx = rng.permutation(g_idx)
    out = pack_gptq(codes, zeros, scales, g_idx if (act_order or with_g_idx) else None, zero_format, bits)
    if bias:
        out["bias"] = rng.uniform(-0.5, 0.5, size=N).astype(np.float16)
    out["weight"] = dequantize_gptq(
        out["qweight"], out["qzeros"], out["scales"], out.get("g_idx"), zero_format, bits
    )
    return out


def random_awq(
    rng: np.random.Generator,
    K: int,
    N: int,
    *,
    group_size: int | None = 128,
    bias: bool = False,
) -> dict[str, np.ndarray]:
    """A random AWQ 4-bit layer (``N`` a multiple of 8, ``group_size`` dividing ``K``;
    ``None`` = one group).

    Returns:
        :func:`pack_awq`'s dict (``qweight``, ``qzeros``, ``scales``), plus ``bias`` if
        asked and ``weight``: the float16 ``[K, N]`` dense weight (:func:`dequantize_awq`).
    """
    if group_size is None:
        group_size = K
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group_size={group_size} must divide K={K}")
    G = K // group_size
    codes = rng.integers(0, 16, size=(K, N))
    zeros = rng.integers(0, 16, size=(G, N))
    scales = rng.uniform(0.001, 0.02, size=(G, N)).astype(np.float16)
    out = pack_awq(codes, zeros, scales)
    if bias:
        out["bias"] = rng.uniform(-0.5, 0.5, size=N).astype(np.float16)
    out["weight"] = dequantize_awq(out["qweight"], out["qzeros"], out["scales"])
    return out


def gemm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight (+ bias)`` in float64: x ``[..., K]``, weight ``[K, N]`` -> float64 ``[..., N]``.

    For bfloat16 semantics pass the bfloat16 weight (``dequantize_*(..., dtype="bfloat16")``)
    and bfloat16-valued x; the exact result then still needs the one rounding to the
    output dtype (:func:`round_bf16`), which the kernels apply after fp32 accumulation.
    """
    y = np.asarray(x).astype(np.float64) @ np.asarray(weight).astype(np.float64)
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float64)
    return y
