"""The CPU backend's kernel families and thread counts give bit-identical results.

The CPU backend has a portable scalar path and, on x86-64 CPUs with AVX2/FMA/F16C, a
vectorised path (fused few-row GEMV, tiled GEMM, exact fallbacks for large scales), each
for float16 and for bfloat16 activations/outputs; both
follow one summation contract (src/cpu/kernels.hpp), and columns are split across threads
without changing any column's arithmetic. Two environment variables, read on every call,
select them: ``EXL2_CPU_SCALAR=1`` forces the scalar kernels and ``EXL2_CPU_THREADS=n``
fixes the thread count. Each configuration runs in a subprocess (same interpreter and
environment otherwise) on the same seeded layers and inputs; every output must match the
default configuration's bit for bit, and dequantize must equal the reference weight.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

# Runs in the subprocess: build the cases, write every output to an .npz file.
CHILD = textwrap.dedent(
    r'''
    import sys
    import numpy as np
    import torch
    import exl2
    from exl2 import reference as R

    ROWS = [1, 2, 3, 4, 5, 8, 13, 70]

    def layers():
        rng = np.random.default_rng(1234)
        out = {}
        for b in R.EXL2_BITS:  # every bit width; K not a multiple of the group size
            out[f"exl2_b{b}"] = (R.random_exl2(rng, 320, 72, bits=b, group_size=64, bias=True), {})
        # mixed widths, short last groups that end mid-period, odd K
        out["exl2_mixed"] = (R.random_exl2(rng, 563, 200, bits=[(8, 32), (6, 48), (5, 96), (4, 128), (3, 96),
                                                                 (2, 163)], bias=True), {})
        out["exl2_tail3"] = (R.random_exl2(rng, 292, 40, bits=[(6, 96), (5, 96), (3, 100)]), {})
        # large scales (|s| >= 256: the exact fallback) mixed with small ones: scale code 0
        # gives s = q_scale_max / 256 < 256 for whole 8-column words of q_scale
        big = R.random_exl2(rng, 256, 72, bits=[(4, 128), (8, 64), (3, 64)], scale_max_range=(2000.0, 60000.0))
        big["q_scale"][:, [0, 1, 2, 3, 5, 7]] = 0
        out["exl2_big"] = (big, {})
        # ... and infinite ones (prescaled q_scale_max: f16(256 * 60000) = inf)
        out["exl2_inf"] = (R.random_exl2(rng, 128, 48, bits=[(4, 64), (6, 64)], scale_max_range=(30000.0, 60000.0)),
                           {"scale_max_prescaled": True})
        out["gptq_g32_act"] = (R.random_gptq(rng, 256, 104, group_size=32, act_order=True, bias=True), {})
        out["gptq_g128_v2"] = (R.random_gptq(rng, 384, 64, group_size=128, zero_format="v2"), {"zero_format": "v2"})
        neg = R.random_gptq(rng, 128, 56, group_size=64)
        big_cols = (np.arange(56) // 8) % 3 == 0  # 8-column blocks 0, 3, 6: |s| >= 256
        neg["scales"] = (-neg["scales"].astype(np.float32) * np.where(big_cols, 30000.0, 1.0)).astype(
            np.float16)  # negative scales (signed zero weights)
        out["gptq_neg_big"] = (neg, {})
        # GPTQ 2/3/8-bit (3-bit and 8-bit with unaligned groups too) and AWQ
        out.update(NEW_FORMATS(rng))
        return out

    def NEW_FORMATS(rng):
        return {
            "gptq2_act": (R.random_gptq(rng, 256, 80, group_size=64, act_order=True, bits=2, bias=True), {"bits": 2}),
            "gptq3_act": (R.random_gptq(rng, 384, 96, group_size=128, act_order=True, bits=3), {"bits": 3}),
            "gptq3_g8_v2": (R.random_gptq(rng, 96, 64, group_size=8, bits=3, zero_format="v2"),
                            {"bits": 3, "zero_format": "v2"}),
            "gptq8": (R.random_gptq(rng, 256, 72, group_size=32, bits=8, bias=True), {"bits": 8}),
            "gptq8_g4_act": (R.random_gptq(rng, 64, 40, group_size=4, act_order=True, bits=8), {"bits": 8}),
            "awq": (R.random_awq(rng, 256, 104, group_size=64, bias=True), {"awq": True}),
            "awq_g5": (R.random_awq(rng, 135, 48, group_size=5), {"awq": True}),
        }

    def build(layer, opts):
        t = lambda k: torch.from_numpy(np.ascontiguousarray(layer[k]))
        bias = t("bias") if "bias" in layer else None
        if "q_weight" in layer:
            return exl2.QMatrix.from_exl2(t("q_weight"), t("q_invperm"), t("q_scale"), t("q_scale_max"),
                                          t("q_groups"), bias=bias,
                                          scale_max_prescaled=opts.get("scale_max_prescaled", False))
        if opts.get("awq"):
            return exl2.QMatrix.from_awq(t("qweight"), t("qzeros"), t("scales"), bias=bias)
        return exl2.QMatrix.from_gptq(t("qweight"), t("qzeros"), t("scales"),
                                      g_idx=t("g_idx") if "g_idx" in layer else None, bias=bias,
                                      zero_format=opts.get("zero_format", "v1"), bits=opts.get("bits", 4))

    results = {}
    rng = np.random.default_rng(99)
    for name, (layer, opts) in layers().items():
        q = build(layer, opts)
        K = q.in_features
        results[f"{name}.dequant"] = q.dequantize().numpy().view(np.uint16)
        results[f"{name}.bf16.dequant"] = q.dequantize(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        for m in ROWS:
            # a wide dynamic range makes fp32 rounding differences visible in fp16 outputs
            x = (rng.standard_normal((m, K)) * 2.0 ** rng.integers(-8, 9, size=(m, K))).astype(np.float16)
            if m == 5:  # special values in x
                x[1, 3] = np.inf
                x[2, 7] = -np.inf
                x[3, 11] = np.nan
                x[4, :] = 0.0
            results[f"{name}.m{m}"] = q.matmul(torch.from_numpy(x)).numpy().view(np.uint16)
            # bfloat16: the same x widened (exact), plus values beyond fp16's range
            xb = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
            if m == 70:
                xb[::3] *= 2.0 ** 60
            yb = q.matmul(xb)
            results[f"{name}.bf16.m{m}"] = yb.view(torch.int16).numpy().view(np.uint16)
            if m <= 4:
                # bfloat16 x at the edges of the few-row GEMV's FMA range (GemmArgs::bf16_fma):
                # magnitudes in [2^-102, 2^-96) keep every product a normal fp32 value (FMAs);
                # in [2^112, 2^125) products overflow, where an FMA would differ from the
                # contract's multiply-and-add (inf + -inf = NaN against an FMA's inf), so those
                # calls must multiply and add: both must match the scalar kernels bit for bit.
                sign = np.where(rng.random((m, K)) < 0.5, -1.0, 1.0)
                for tag, lo, hi in (("edge", -102, -96), ("huge", 112, 125)):
                    mag = 2.0 ** rng.uniform(lo, hi, size=(m, K))
                    xe = torch.from_numpy((sign * mag).astype(np.float32)).to(torch.bfloat16)
                    if tag == "edge":  # bfloat16 rounding may not leave the range
                        xe = torch.where(xe.abs() < 2.0 ** -102, xe.sign() * 2.0 ** -102, xe)
                    ye = q.matmul(xe)
                    results[f"{name}.bf16.{tag}.m{m}"] = ye.view(torch.int16).numpy().view(np.uint16)
    np.savez(sys.argv[1], **results)
    '''
)

CONFIGS = {
    "default": {},
    "scalar": {"EXL2_CPU_SCALAR": "1"},
    "threads1": {"EXL2_CPU_THREADS": "1"},
    "threads3": {"EXL2_CPU_THREADS": "3"},
    "threads7": {"EXL2_CPU_THREADS": "7"},
    "scalar_threads2": {"EXL2_CPU_SCALAR": "1", "EXL2_CPU_THREADS": "2"},
}


def run_config(tmp: Path, name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("EXL2_CPU_SCALAR", "EXL2_CPU_THREADS")}
    env.update(CONFIGS[name])
    out = tmp / f"{name}.npz"
    script = tmp / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{name}: child failed\n{proc.stdout}\n{proc.stderr}"
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("cpu_paths")
    return {name: run_config(tmp, name) for name in CONFIGS}


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "default"])
def test_bit_identical_to_default(outputs: dict, config: str) -> None:
    base, other = outputs["default"], outputs[config]
    assert sorted(base) == sorted(other)
    bad = [k for k in base if not np.array_equal(base[k], other[k])]
    assert not bad, f"{config}: outputs differ from the default configuration: {bad}"


def test_dequantize_matches_reference(outputs: dict) -> None:
    """Both kernel families dequantize bit-exactly (the child rebuilds the same layers)."""
    from exl2 import reference as R

    rng = np.random.default_rng(1234)
    expected = {f"exl2_b{b}": R.random_exl2(rng, 320, 72, bits=b, group_size=64, bias=True)["weight"]
                for b in R.EXL2_BITS}
    # the layers after the EXL2 ones, rebuilt with the child's generator state
    exec(compile(CHILD.split("\ndef build(")[0], "child", "exec"), ns := {})
    with warnings.catch_warnings():  # the exl2_inf layer overflows on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        rebuilt = ns["layers"]()
    for name, (layer, _) in rebuilt.items():
        if name.startswith(("gptq2", "gptq3", "gptq8", "awq")):
            expected[name] = layer["weight"]
    assert len(expected) == len(R.EXL2_BITS) + 7
    for config in ("default", "scalar"):
        for name, w in expected.items():
            got = outputs[config][f"{name}.dequant"]
            assert np.array_equal(got, w.view(np.uint16)), f"{config}: {name}"


def test_outputs_are_sane(outputs: dict) -> None:
    """Sanity of the special cases the comparison relies on: the large-scale layers really
    produce non-finite values, and NaN outputs are stored canonically."""
    base = outputs["default"]
    inf_w = base["exl2_inf.dequant"].view(np.float16)
    assert np.isinf(inf_w).any()
    y = base["exl2_b4.m5"]
    nan = np.isnan(y.view(np.float16))
    assert nan.any() and (y[nan] == 0x7E00).all()
    assert np.isfinite(base["exl2_b4.m1"].view(np.float16)).all()
    yb = base["exl2_b4.bf16.m5"]
    nan = (yb & 0x7FFF) > 0x7F80
    assert nan.any() and (yb[nan] == 0x7FC0).all()
    assert (base["exl2_inf.bf16.dequant"] & 0x7FFF == 0x7F80).any()  # infinite bf16 weights too
    big = base["exl2_b4.bf16.m70"].view(np.int16).astype(np.int32) & 0x7FFF
    assert (big < 0x7F80).all() and (big > 0x5C00).any()  # finite, far beyond fp16's range


def test_bf16_dequantize_matches_reference(outputs: dict) -> None:
    from exl2 import reference as R

    rng = np.random.default_rng(1234)
    for b in R.EXL2_BITS:
        lay = R.random_exl2(rng, 320, 72, bits=b, group_size=64, bias=True)
        w = R.dequantize_exl2(lay["q_weight"], lay["q_invperm"], lay["q_scale"], lay["q_scale_max"], lay["q_groups"],
                              dtype="bfloat16")
        for config in ("default", "scalar"):
            assert np.array_equal(outputs[config][f"exl2_b{b}.bf16.dequant"], R.bf16_bits(w)), f"{config}: b{b}"


def _round_nearest_even_bits(f: np.ndarray, drop: int) -> np.ndarray:
    """fp32 values rounded to nearest even after dropping the low `drop` significand bits."""
    u = f.view(np.uint32).astype(np.uint64)
    lsb = (u >> drop) & 1
    mask = (0xFFFFFFFF >> drop) << drop
    return (((u + (1 << (drop - 1)) - 1 + lsb) & mask) & 0xFFFFFFFF).astype(np.uint32)


def test_veltkamp_split_rounds_weights_like_nearest_even() -> None:
    """The AVX2 GEMM rounds its bfloat16 weights f = (code - z) * s (exact in fp32) with
    Veltkamp's split c = f * (2^16 + 1); w = c - (c - f) (round_bf16_weight) instead of the bit
    arithmetic of the scalar kernels: equal for every finite fp16 scale with |s| < 256 (the fast
    path's range) and every code - z in [-255, 255], in IEEE fp32 arithmetic without contraction,
    as the kernels run it."""
    s = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    s = s[np.isfinite(s) & (np.abs(s) < 256)].astype(np.float32)
    k16 = np.float32(65537.0)
    for d in range(-255, 256):
        f = (np.float32(d) * s).astype(np.float32)  # exact: at most 19 significant bits
        c = f * k16
        w = (c - (c - f)).astype(np.float32)
        assert np.array_equal(w.view(np.uint32), _round_nearest_even_bits(f, 16)), f"code - z = {d}"
