"""QMatrix on random layers from exl2.reference: every bit width, mixed widths, short
last groups, act-order GPTQ, large K, many row counts, bias, batch dims, v1/v2 zeros;
ownership (inputs never modified, may be freed), lifetime and metadata."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import exl2
from exl2 import reference as R
from layers import DEVICES, bits_equal, build, check_layer, expected, random_x, rel_err

TOL = 2e-3
ROWS = [1, 3, 8, 17, 64, 300]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", R.EXL2_BITS)
def test_exl2_every_bit_width(bits: int, device: str) -> None:
    rng = np.random.default_rng(bits)
    layer = R.random_exl2(rng, 256, 64, bits=bits, group_size=32, bias=True)
    check_layer(layer, device, ROWS, rng=rng)


@pytest.mark.parametrize("device", DEVICES)
def test_exl2_mixed_widths_and_short_last_group(device: str) -> None:
    rng = np.random.default_rng(1)
    groups = [(8, 32), (6, 64), (5, 32), (4, 128), (3, 96), (2, 13)]  # last group: 13 rows, padded word
    layer = R.random_exl2(rng, sum(r for _, r in groups), 48, bits=groups, bias=True)
    check_layer(layer, device, ROWS, rng=rng)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, None])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_groups_and_act_order(group_size, act_order: bool, device: str) -> None:
    rng = np.random.default_rng(3)
    layer = R.random_gptq(rng, 512, 64, group_size=group_size, act_order=act_order, bias=True)
    check_layer(layer, device, ROWS, rng=rng)


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_v2_zeros(device: str) -> None:
    rng = np.random.default_rng(4)
    layer = R.random_gptq(rng, 256, 32, group_size=64, act_order=True, zero_format="v2")
    check_layer(layer, device, rows=[1, 17], rng=rng, zero_format="v2")
    # the same tensors read as v1 give a different (v1) weight: the flag is honoured
    w_v1 = R.dequantize_gptq(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], "v1")
    with build(layer, device, zero_format="v1") as q:
        assert bits_equal(q.dequantize(), w_v1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_large_k(fmt: str, device: str) -> None:
    rng = np.random.default_rng(5)
    K = 70000 if fmt == "gptq" else 70016
    layer = (R.random_gptq(rng, K, 16, group_size=112, act_order=True) if fmt == "gptq"
             else R.random_exl2(rng, K, 16, bits=4, group_size=64))
    check_layer(layer, device, rows=[1, 8], rng=rng)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [32, 40, 96, 1000])
def test_small_shapes(K: int, device: str) -> None:
    rng = np.random.default_rng(K)
    check_layer(R.random_gptq(rng, K, 8, group_size=8 if K % 8 == 0 else None), device, rows=[1, 5], rng=rng)
    check_layer(R.random_exl2(rng, K, 8, bits=3, group_size=32), device, rows=[1, 5], rng=rng)


@given(
    K_groups=st.lists(st.sampled_from([(8, 32), (6, 16), (6, 32), (5, 32), (4, 32), (4, 64), (3, 32), (2, 64)]),
                      min_size=1, max_size=6),
    N=st.sampled_from([8, 16, 24, 40, 72]),
    m=st.integers(1, 20),
    seed=st.integers(0, 2**31),
)
def test_exl2_property_cpu(K_groups, N: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    layer = R.random_exl2(rng, sum(r for _, r in K_groups), N, bits=K_groups, bias=bool(seed % 2))
    check_layer(layer, "cpu", rows=[m], rng=rng)


@given(
    G=st.integers(1, 8), group_size=st.sampled_from([8, 16, 32, 64, 128]), N=st.sampled_from([8, 16, 48]),
    act_order=st.booleans(), m=st.integers(1, 20), seed=st.integers(0, 2**31),
)
def test_gptq_property_cpu(G: int, group_size: int, N: int, act_order: bool, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    layer = R.random_gptq(rng, G * group_size, N, group_size=group_size, act_order=act_order, bias=bool(seed % 2))
    check_layer(layer, "cpu", rows=[m], rng=rng)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_batch_dims_and_bias(device: str) -> None:
    rng = np.random.default_rng(6)
    layer = R.random_exl2(rng, 128, 24, bits=5, bias=True)
    x = random_x(rng, (2, 3, 5, 128))
    with build(layer, device) as q:
        assert q.has_bias
        y = q.matmul(torch.from_numpy(x).to(device))
        assert y.shape == (2, 3, 5, 24)
        assert rel_err(y, expected(layer, x)) < TOL
    with build(layer, device, bias=False) as q:
        assert not q.has_bias
        assert rel_err(q.matmul(torch.from_numpy(x).to(device)), expected(layer, x, bias=False)) < TOL


@pytest.mark.parametrize("device", DEVICES)
def test_out_is_fully_written_and_returned(device: str) -> None:
    rng = np.random.default_rng(7)
    layer = R.random_gptq(rng, 128, 16, group_size=32)
    x = torch.from_numpy(random_x(rng, (4, 128))).to(device)
    with build(layer, device) as q:
        out = torch.full((4, 16), float("nan"), dtype=torch.float16, device=device)
        y = q.matmul(x, out=out)
        assert y is out
        assert torch.isfinite(out).all()
        assert torch.equal(out, q.matmul(x))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows(device: str) -> None:
    layer = R.random_gptq(np.random.default_rng(8), 64, 8, group_size=32)
    with build(layer, device) as q:
        assert q.matmul(torch.empty((0, 64), dtype=torch.float16, device=device)).shape == (0, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_x_is_accepted(device: str) -> None:
    rng = np.random.default_rng(9)
    layer = R.random_exl2(rng, 64, 16, bits=4)
    x = torch.from_numpy(random_x(rng, (64, 6))).to(device).t()  # [6, 64], strided
    with build(layer, device) as q:
        assert rel_err(q.matmul(x), expected(layer, x.cpu().numpy())) < TOL


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device: str) -> None:
    rng = np.random.default_rng(10)
    layer = R.random_exl2(rng, 512, 64, bits=[(6, 128), (4, 256), (3, 128)])
    x = torch.from_numpy(random_x(rng, (33, 512))).to(device)
    with build(layer, device) as q:
        first = q.matmul(x)
        for _ in range(5):
            assert torch.equal(q.matmul(x), first)


# ------------------------------------------------------------------ ownership
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_inputs_never_modified(fmt: str, device: str) -> None:
    rng = np.random.default_rng(11)
    layer = (R.random_exl2(rng, 256, 32, bits=[(8, 64), (4, 192)], bias=True) if fmt == "exl2"
             else R.random_gptq(rng, 256, 32, group_size=64, act_order=True, bias=True))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in layer.items() if k != "weight"}
    before = {k: v.clone() for k, v in tensors.items()}
    with build(tensors | {"weight": layer["weight"]}, device, as_torch=False) as q:
        x = torch.from_numpy(random_x(rng, (3, 256))).to(device)
        x_before = x.clone()
        q.matmul(x)
        q.dequantize()
        assert torch.equal(x, x_before)
    for k in tensors:
        assert torch.equal(tensors[k], before[k]), k


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_may_be_freed_after_construction(device: str) -> None:
    rng = np.random.default_rng(12)
    layer = R.random_gptq(rng, 256, 32, group_size=32, act_order=True)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in layer.items() if k != "weight"}
    q = exl2.QMatrix.from_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], g_idx=tensors["g_idx"])
    for t in tensors.values():
        t.fill_(7)  # overwrite, then drop the caller's memory
    del tensors
    gc.collect()
    junk = [torch.randint(0, 2**30, (4096,), dtype=torch.int32, device=device) for _ in range(16)]
    assert bits_equal(q.dequantize(), layer["weight"])
    x = random_x(rng, (2, 256))
    assert rel_err(q.matmul(torch.from_numpy(x).to(device)), expected(layer, x)) < TOL
    del junk
    q.close()


def test_numpy_inputs_and_default_device() -> None:
    layer = R.random_exl2(np.random.default_rng(13), 64, 8, bits=2)
    q = build(layer, "cpu", as_torch=False)
    assert q.device == torch.device("cpu")
    x = random_x(np.random.default_rng(0), (2, 64))
    assert rel_err(q.matmul(x), expected(layer, x)) < TOL  # numpy x too


def test_metadata_and_close() -> None:
    layer = R.random_gptq(np.random.default_rng(14), 256, 64, group_size=128)
    q = build(layer, "cpu")
    assert (q.in_features, q.out_features, q.format) == (256, 64, "gptq")
    assert q.bits_per_weight == pytest.approx(4 + 20 / 128)
    assert q.nbytes >= 256 * 64 // 2
    assert "gptq" in repr(q)
    q.close()
    assert q.closed and "closed" in repr(q)
    with pytest.raises(ValueError, match="closed"):
        q.matmul(torch.zeros((1, 256), dtype=torch.float16))
    with pytest.raises(ValueError, match="closed"):
        q.dequantize()
    q.close()  # idempotent

    layer = R.random_exl2(np.random.default_rng(15), 128, 16, bits=[(8, 64), (4, 64)])
    with build(layer, "cpu") as q:
        assert q.format == "exl2"
        assert q.bits_per_weight == pytest.approx((8 * 64 + 4 * 64) / 128 + 4 * 2 / 128 + 16 * 2 / (128 * 16))
    assert q.closed


@pytest.mark.parametrize("value, expect", [("5", "rows 5 5"), ("", "rows 13 9"),
                                           ("0", "EXL2_DENSE_MIN_ROWS: expected a positive"),
                                           ("many", "EXL2_DENSE_MIN_ROWS: expected a positive")])
def test_dense_min_rows_env(value: str, expect: str) -> None:
    """EXL2_DENSE_MIN_ROWS moves the CUDA dense-route threshold at import; bad values fail
    at import with an error naming the variable."""
    env = dict(os.environ, EXL2_DENSE_MIN_ROWS=value)
    proc = subprocess.run([sys.executable, "-c", "import torch, exl2.qmatrix as m; "
                           "print('rows', m._DENSE_MIN_ROWS[torch.float16], m._DENSE_MIN_ROWS[torch.bfloat16])"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert expect in proc.stdout + proc.stderr
    assert (proc.returncode == 0) == expect.startswith("rows")
