"""Bad inputs: one test per validation rule, asserting the exception type and that the
message names the offending argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import exl2
from exl2 import reference as R

RNG = np.random.default_rng(0)
EXL2 = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
        R.random_exl2(RNG, 128, 16, bits=[(8, 32), (4, 64), (2, 32)], bias=True).items()}
GPTQ = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
        R.random_gptq(RNG, 128, 16, group_size=32, act_order=True, bias=True).items()}


def make_exl2(**override):
    t = {**EXL2, **override}
    return exl2.QMatrix.from_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"],
                                  q_perm=t.get("q_perm"), bias=t.get("bias"))


def make_gptq(zero_format="v1", **override):
    t = {**GPTQ, **override}
    return exl2.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx=t.get("g_idx"), bias=t.get("bias"),
                                  zero_format=zero_format)


def test_valid_inputs_build() -> None:
    make_exl2().close()
    make_gptq().close()


# ------------------------------------------------------------------ EXL2 rules
@pytest.mark.parametrize("name", ["q_weight", "q_invperm", "q_scale", "q_perm"])
def test_exl2_int32_dtype(name: str) -> None:
    with pytest.raises(TypeError, match=f"{name}: expected dtype int32"):
        make_exl2(**{name: EXL2[name].to(torch.int64)})


def test_exl2_q_groups_dtype() -> None:
    with pytest.raises(TypeError, match="q_groups: expected dtype int16"):
        make_exl2(q_groups=EXL2["q_groups"].to(torch.int32))


def test_exl2_q_scale_max_dtype() -> None:
    with pytest.raises(TypeError, match="q_scale_max: expected dtype float16"):
        make_exl2(q_scale_max=EXL2["q_scale_max"].float())


def test_exl2_rank() -> None:
    with pytest.raises(ValueError, match="q_weight: expected a 2-D tensor"):
        make_exl2(q_weight=EXL2["q_weight"].flatten())


def test_exl2_n_multiple_of_8() -> None:
    with pytest.raises(ValueError, match="q_weight: expected the column count N to be a multiple of 8"):
        make_exl2(q_weight=EXL2["q_weight"][:, :12].contiguous())


def test_exl2_q_groups_even_length() -> None:
    with pytest.raises(ValueError, match="q_groups: expected an even length"):
        make_exl2(q_groups=EXL2["q_groups"][:-1].contiguous())


def test_exl2_q_scale_shape() -> None:
    with pytest.raises(ValueError, match=r"q_scale: expected shape \[G, N/8\]"):
        make_exl2(q_scale=EXL2["q_scale"][:2].contiguous())


def test_exl2_q_scale_max_shape() -> None:
    with pytest.raises(ValueError, match=r"q_scale_max: expected shape \[G\]"):
        make_exl2(q_scale_max=torch.cat([EXL2["q_scale_max"], EXL2["q_scale_max"][:1]]))


@pytest.mark.parametrize("bits", [0, 1, 7, 9, 16])
def test_exl2_bits(bits: int) -> None:
    g = EXL2["q_groups"].clone()
    g[2] = bits
    with pytest.raises(ValueError, match=f"q_groups: group 1 has bits = {bits}, expected one of 2, 3, 4, 5, 6, 8"):
        make_exl2(q_groups=g)


def test_exl2_group_starts_increasing() -> None:
    g = EXL2["q_groups"].clone()
    g[3] = g[5]  # group 1 starts where group 2 does
    with pytest.raises(ValueError, match="q_groups: group 1 starts at"):
        make_exl2(q_groups=g)


def test_exl2_first_group_starts_at_zero() -> None:
    g = EXL2["q_groups"].clone()
    g[1] = 1
    with pytest.raises(ValueError, match="q_groups: the first group must start at q_weight row 0"):
        make_exl2(q_groups=g)


def test_exl2_partial_inner_group() -> None:
    g = EXL2["q_groups"].clone()
    g[2] = 3  # 4-bit group re-labelled 3-bit: 8 words are not a whole number of 3-bit rows
    with pytest.raises(ValueError, match="q_groups: group 1 .* not a whole number of rows"):
        make_exl2(q_groups=g)


def test_exl2_group_rows_sum_to_k() -> None:
    invperm = torch.from_numpy(np.random.default_rng(1).permutation(160).astype(np.int32))
    with pytest.raises(ValueError, match="q_invperm: its length K = 160 does not fit q_groups and q_weight"):
        make_exl2(q_invperm=invperm, q_perm=None)


def test_exl2_invperm_out_of_range() -> None:
    p = EXL2["q_invperm"].clone()
    p[5] = 128
    with pytest.raises(ValueError, match="q_invperm: expected a permutation of 0..127, but element 5 is 128"):
        make_exl2(q_invperm=p, q_perm=None)


def test_exl2_invperm_duplicate() -> None:
    p = EXL2["q_invperm"].clone()
    p[5] = p[6]
    with pytest.raises(ValueError, match="q_invperm: expected a permutation .* appears twice"):
        make_exl2(q_invperm=p, q_perm=None)


def test_exl2_q_perm_must_be_argsort_of_invperm() -> None:
    p = EXL2["q_perm"].clone()
    p[[0, 1]] = p[[1, 0]]
    with pytest.raises(ValueError, match=r"q_perm: expected argsort\(q_invperm\)"):
        make_exl2(q_perm=p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_exl2_scale_max_finite(bad: float) -> None:
    s = EXL2["q_scale_max"].clone()
    s[1] = bad
    with pytest.raises(ValueError, match="q_scale_max: expected finite values"):
        make_exl2(q_scale_max=s)


def test_non_contiguous_rejected() -> None:
    qw = torch.cat([EXL2["q_weight"], EXL2["q_weight"]], dim=1)[:, ::2]
    with pytest.raises(ValueError, match="q_weight: expected a contiguous"):
        make_exl2(q_weight=qw)


def test_missing_required_tensor_type() -> None:
    with pytest.raises(TypeError, match="q_scale: expected a torch.Tensor"):
        make_exl2(q_scale=[1, 2, 3])


# ------------------------------------------------------------------ GPTQ rules
@pytest.mark.parametrize("name", ["qweight", "qzeros", "g_idx"])
def test_gptq_int32_dtype(name: str) -> None:
    with pytest.raises(TypeError, match=f"{name}: expected dtype int32"):
        make_gptq(**{name: GPTQ[name].to(torch.int64)})


def test_gptq_scales_dtype() -> None:
    with pytest.raises(TypeError, match="scales: expected dtype float16"):
        make_gptq(scales=GPTQ["scales"].float())


def test_gptq_n_multiple_of_8() -> None:
    with pytest.raises(ValueError, match="qweight: expected the column count N to be a multiple of 8"):
        make_gptq(qweight=GPTQ["qweight"][:, :12].contiguous())


def test_gptq_qzeros_shape() -> None:
    with pytest.raises(ValueError, match=r"qzeros: expected shape \[G, N/8\]"):
        make_gptq(qzeros=GPTQ["qzeros"][:, :1].contiguous())


def test_gptq_scales_shape() -> None:
    with pytest.raises(ValueError, match=r"scales: expected shape \[G, N\]"):
        make_gptq(scales=GPTQ["scales"][:3].contiguous())


def test_gptq_groups_divide_rows() -> None:
    # K = 128 rows, G = 3 groups
    with pytest.raises(ValueError, match="qzeros: the group count G = 3 must divide the row count K = 128"):
        make_gptq(qzeros=GPTQ["qzeros"][:3].contiguous(), scales=GPTQ["scales"][:3].contiguous(), g_idx=None)


def test_gptq_group_size_multiple_of_8() -> None:
    # K = 128 rows in 32 groups of 4 rows
    qz = GPTQ["qzeros"].repeat(8, 1)
    sc = GPTQ["scales"].repeat(8, 1)
    with pytest.raises(ValueError, match="qzeros: the group size K/G = 4 must be a multiple of 8"):
        make_gptq(qzeros=qz, scales=sc, g_idx=None)


def test_gptq_g_idx_range() -> None:
    g = GPTQ["g_idx"].clone()
    g[3] = 4
    with pytest.raises(ValueError, match="g_idx: expected group indices in 0..3, element 3 is 4"):
        make_gptq(g_idx=g)


def test_gptq_g_idx_equal_groups() -> None:
    g = GPTQ["g_idx"].clone()
    g[g == 1] = 0
    with pytest.raises(ValueError, match="g_idx: expected every group to hold K/G = 32 rows"):
        make_gptq(g_idx=g)


def test_gptq_g_idx_shape() -> None:
    with pytest.raises(ValueError, match=r"g_idx: expected shape \[K\]"):
        make_gptq(g_idx=GPTQ["g_idx"][:64].contiguous())


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_gptq_scales_finite(bad: float) -> None:
    s = GPTQ["scales"].clone()
    s[2, 3] = bad
    with pytest.raises(ValueError, match="scales: expected finite values"):
        make_gptq(scales=s)


def test_gptq_zero_format() -> None:
    with pytest.raises(ValueError, match="zero_format: expected 'v1' or 'v2'"):
        make_gptq(zero_format="v3")


# ------------------------------------------------------------------ shared rules
@pytest.mark.parametrize("make,fmt", [(make_exl2, EXL2), (make_gptq, GPTQ)])
def test_bias(make, fmt) -> None:
    with pytest.raises(ValueError, match=r"bias: expected shape \[N\]"):
        make(bias=fmt["bias"][:8].contiguous())
    with pytest.raises(TypeError, match="bias: expected dtype float16"):
        make(bias=fmt["bias"].float())
    b = fmt["bias"].clone()
    b[0] = float("nan")
    with pytest.raises(ValueError, match="bias: expected finite values"):
        make(bias=b)


def test_device_spec() -> None:
    with pytest.raises(ValueError, match="device: expected"):
        exl2.QMatrix.from_gptq(GPTQ["qweight"], GPTQ["qzeros"], GPTQ["scales"], device="tpu")


def test_cuda_target_without_cuda() -> None:
    if exl2.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="(built without CUDA|no CUDA device)"):
        exl2.QMatrix.from_gptq(GPTQ["qweight"], GPTQ["qzeros"], GPTQ["scales"], device="cuda:0")


# ------------------------------------------------------------------ matmul inputs
@pytest.fixture(scope="module")
def q():
    with make_gptq() as qm:
        yield qm


def test_matmul_dtype(q) -> None:
    with pytest.raises(TypeError, match="x: expected dtype torch.float16"):
        q.matmul(torch.zeros((1, 128)))


def test_matmul_wrong_k(q) -> None:
    with pytest.raises(ValueError, match=r"x: expected shape \[..., 128\]"):
        q.matmul(torch.zeros((1, 64), dtype=torch.float16))


def test_matmul_x_type(q) -> None:
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        q.matmul("hello")


def test_matmul_out_checks(q) -> None:
    x = torch.zeros((2, 128), dtype=torch.float16)
    with pytest.raises(ValueError, match=r"out: expected shape \[2, 16\]"):
        q.matmul(x, out=torch.empty((2, 8), dtype=torch.float16))
    with pytest.raises(TypeError, match="out: expected dtype torch.float16"):
        q.matmul(x, out=torch.empty((2, 16)))
    with pytest.raises(ValueError, match="out: expected a contiguous tensor"):
        q.matmul(x, out=torch.empty((16, 2), dtype=torch.float16).t())


def test_matmul_out_aliasing_x(q) -> None:
    buf = torch.zeros((2, 128), dtype=torch.float16)
    with pytest.raises(ValueError, match="out: must not overlap x"):
        q.matmul(buf, out=buf.view(-1)[:32].view(2, 16))


@pytest.mark.cuda
def test_matmul_device_mismatch_cuda() -> None:
    qg = exl2.QMatrix.from_gptq(GPTQ["qweight"], GPTQ["qzeros"], GPTQ["scales"], device="cuda")
    with pytest.raises(ValueError, match="x: expected a tensor on cuda:0"):
        qg.matmul(torch.zeros((1, 128), dtype=torch.float16))
    with make_gptq() as qc:
        with pytest.raises(ValueError, match="x: expected a tensor on cpu"):
            qc.matmul(torch.zeros((1, 128), dtype=torch.float16, device="cuda"))
    qg.close()
