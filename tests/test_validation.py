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


def test_gptq_group_size_not_filling_words() -> None:
    # K = 128 rows in 32 groups of 4 rows (16 bits: groups do not start word-aligned in the
    # checkpoint); accepted and repacked into word-aligned canonical groups.
    layer = R.random_gptq(np.random.default_rng(1), 128, 16, group_size=4, act_order=True)
    with exl2.QMatrix.from_gptq(*(torch.from_numpy(layer[k]) for k in ("qweight", "qzeros", "scales")),
                                g_idx=torch.from_numpy(layer["g_idx"])) as q:
        assert np.array_equal(q.dequantize().numpy().view(np.uint16), layer["weight"].view(np.uint16))


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


# ------------------------------------------------------- GPTQ 2/3/8-bit rules
GPTQ3 = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
         R.random_gptq(RNG, 96, 64, group_size=32, act_order=True, bits=3, bias=True).items()}


def make_gptq3(bits=3, **override):
    t = {**GPTQ3, **override}
    return exl2.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx=t.get("g_idx"), bias=t.get("bias"),
                                  bits=bits)


def test_gptq3_valid() -> None:
    make_gptq3().close()


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16, True, 4.0, "4"])
def test_gptq_bits_value(bits) -> None:
    with pytest.raises(ValueError, match="bits: expected 2, 3, 4 or 8"):
        make_gptq3(bits=bits)


@pytest.mark.parametrize("bits, match", [
    (2, r"qzeros: expected shape \[G, N/16\] = \[4, 1\] for bits = 2 .*got \[4, 2\]; is bits right\?"),
    (8, r"qzeros: expected shape \[G, N/4\] = \[4, 4\] for bits = 8 .*got \[4, 2\]; is bits right\?"),
    (3, r"qweight: for bits = 3 the row count must be a multiple of 3 \(32 rows in 3 words\), got 16"),
])
def test_gptq4_checkpoint_with_wrong_bits(bits: int, match: str) -> None:
    # the 4-bit layer (K = 128, N = 16, G = 4) read at another width
    with pytest.raises(ValueError, match=match):
        exl2.QMatrix.from_gptq(GPTQ["qweight"], GPTQ["qzeros"], GPTQ["scales"], bits=bits)


def test_gptq3_checkpoint_with_bits_4() -> None:
    with pytest.raises(ValueError, match=r"qzeros: expected shape \[G, N/8\] = \[3, 8\] for bits = 4"):
        make_gptq3(bits=4)


def test_gptq3_n_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="qweight: for bits = 3 the column count N must be a multiple of 32"):
        make_gptq3(qweight=GPTQ3["qweight"][:, :48].contiguous())


def test_gptq2_n_multiple_of_16() -> None:
    layer = R.random_gptq(RNG, 64, 32, group_size=32, bits=2)
    with pytest.raises(ValueError, match=r"qweight: for bits = 2 the column count N must be a multiple of 16 \(.*\), got N = 24"):
        exl2.QMatrix.from_gptq(torch.from_numpy(layer["qweight"][:, :24].copy()),
                               torch.from_numpy(layer["qzeros"]), torch.from_numpy(layer["scales"][:, :24].copy()),
                               bits=2)


def test_gptq3_groups_divide_rows() -> None:
    # K = 96 rows, G = 5 groups
    qz = torch.cat([GPTQ3["qzeros"], GPTQ3["qzeros"][:2]])
    sc = torch.cat([GPTQ3["scales"], GPTQ3["scales"][:2]])
    with pytest.raises(ValueError, match="qzeros: the group count G = 5 must divide the row count K = 96"):
        make_gptq3(qzeros=qz, scales=sc, g_idx=None)


def test_gptq3_g_idx_range_and_shape() -> None:
    g = GPTQ3["g_idx"].clone()
    g[7] = 3
    with pytest.raises(ValueError, match="g_idx: expected group indices in 0..2, element 7 is 3"):
        make_gptq3(g_idx=g)
    g[7] = -1
    with pytest.raises(ValueError, match="g_idx: expected group indices in 0..2, element 7 is -1"):
        make_gptq3(g_idx=g)
    with pytest.raises(ValueError, match=r"g_idx: expected shape \[K\] = \[96\] \(K = qweight rows \* 32 / bits, bits = 3\)"):
        make_gptq3(g_idx=GPTQ3["g_idx"][:64].contiguous())


def test_gptq3_scales_shape_and_dtype() -> None:
    with pytest.raises(ValueError, match=r"scales: expected shape \[G, N\] = \[3, 64\]"):
        make_gptq3(scales=GPTQ3["scales"][:, :32].contiguous())
    with pytest.raises(TypeError, match="qzeros: expected dtype int32"):
        make_gptq3(qzeros=GPTQ3["qzeros"].long())


# ------------------------------------------------------------------ AWQ rules
AWQ = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
       R.random_awq(RNG, 128, 32, group_size=32, bias=True).items()}


def make_awq(**override):
    t = {**AWQ, **override}
    return exl2.QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"], bias=t.get("bias"))


def test_awq_valid() -> None:
    make_awq().close()


@pytest.mark.parametrize("name", ["qweight", "qzeros", "scales"])
def test_awq_required(name: str) -> None:
    with pytest.raises(TypeError, match=f"{name}: expected a torch.Tensor"):
        make_awq(**{name: None})


@pytest.mark.parametrize("name", ["qweight", "qzeros"])
def test_awq_int32_dtype(name: str) -> None:
    with pytest.raises(TypeError, match=f"{name}: expected dtype int32"):
        make_awq(**{name: AWQ[name].to(torch.int64)})


def test_awq_scales_dtype_and_finite() -> None:
    with pytest.raises(TypeError, match="scales: expected dtype float16"):
        make_awq(scales=AWQ["scales"].float())
    s = AWQ["scales"].clone()
    s[1, 1] = float("inf")
    with pytest.raises(ValueError, match="scales: expected finite values"):
        make_awq(scales=s)


def test_awq_qzeros_shape() -> None:
    with pytest.raises(ValueError, match=r"qzeros: expected shape \[G, N/8\] with N/8 = 4 \(qweight is \[K, N/8\]"):
        make_awq(qzeros=AWQ["qzeros"][:, :2].contiguous())


def test_awq_qweight_columns_that_qzeros_and_scales_disagree_with() -> None:
    """qzeros and scales agreeing on N while qweight does not (e.g. a transposed qweight): the error
    names qweight (found by the fuzz tests: it used to name qzeros)."""
    q = AWQ["qweight"]
    with pytest.raises(ValueError, match=r"qweight: expected shape \[K, N/8\] with N/8 = 4 \(qzeros is"):
        make_awq(qweight=q.reshape(q.shape[0] // 2, q.shape[1] * 2).contiguous())


def test_awq_scales_shape() -> None:
    with pytest.raises(ValueError, match=r"scales: expected shape \[G, N\] = \[4, 32\] \(N = 8 \* qweight columns\)"):
        make_awq(scales=AWQ["scales"][:, :16].contiguous())


def test_awq_groups_divide_rows() -> None:
    qz = torch.cat([AWQ["qzeros"], AWQ["qzeros"][:1]])
    sc = torch.cat([AWQ["scales"], AWQ["scales"][:1]])
    with pytest.raises(ValueError, match="qzeros: the group count G = 5 must divide the row count K = 128"):
        make_awq(qzeros=qz, scales=sc)


def test_gptq_checkpoint_given_to_from_awq() -> None:
    # GPTQ qweight [K/8, N] read as AWQ's [K, N/8]: qzeros and scales agree on N, qweight does not
    with pytest.raises(ValueError, match=r"qweight: expected shape \[K, N/8\].*a GPTQ checkpoint .*from_gptq"):
        exl2.QMatrix.from_awq(GPTQ["qweight"], GPTQ["qzeros"], GPTQ["scales"])


def test_awq_checkpoint_given_to_from_gptq() -> None:
    # AWQ qweight [K, N/8] = [128, 4] read as GPTQ's [K/8, N]: N = 4
    with pytest.raises(ValueError, match="qweight: expected the column count N to be a multiple of 8, got N = 4"):
        exl2.QMatrix.from_gptq(AWQ["qweight"], AWQ["qzeros"], AWQ["scales"])


# ------------------------------------------------------------------ shared rules
@pytest.mark.parametrize("make,fmt", [(make_exl2, EXL2), (make_gptq, GPTQ), (make_gptq3, GPTQ3), (make_awq, AWQ)])
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
    needs_grad = torch.zeros((2, 16), dtype=torch.float16, requires_grad=True)
    with pytest.raises(ValueError, match="out: must not require grad"):
        q.matmul(x, out=needs_grad)
    with torch.no_grad():  # as torch's out= functions: allowed outside autograd
        assert q.matmul(x, out=needs_grad) is needs_grad


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
