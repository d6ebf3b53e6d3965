"""exl2.compat: the reference bindings' call contract (make_q_matrix / gemm_half_q_half /
free_q_matrix) as LoRAX, text-generation-inference and GPTQModel use it."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from exl2 import compat
from exl2 import reference as R
from exl2.compat import free_q_matrix, gemm_half_q_half, make_q_matrix

sys.path.insert(0, str(Path(__file__).parent))
from layers import DEVICES, bits_equal, rel_err  # noqa: E402

NONE = torch.empty((1, 1), device="meta")  # the servers' NONE_TENSOR
FORMAT_KEYS = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "q_perm",
               "qweight", "qzeros", "scales", "g_idx")


def torch_layer(layer: Dict[str, np.ndarray], device: str) -> Dict[str, torch.Tensor]:
    # Copies: the server code below modifies its tensors in place (q_scale_max /= 256).
    return {k: torch.from_numpy(np.array(v)).to(device) for k, v in layer.items() if k in FORMAT_KEYS}


def temp_dq_for(layers: List[Dict[str, np.ndarray]], device: str) -> torch.Tensor:
    """One scratch buffer for the whole model, sized for the largest layer, as servers do."""
    size = max(lay["weight"].size for lay in layers)
    scratch = torch.empty((size + 64,), dtype=torch.float16, device=device)
    return scratch.narrow(0, 0, size)


def server_make_exl2(w: Dict[str, torch.Tensor], temp_dq: torch.Tensor, group_map: bool) -> int:
    """text-generation-inference / LoRAX ext_make_q_matrix, EXL2 branch."""
    w["q_scale_max"] /= 256
    w["q_perm"] = w["q_perm"].short()
    w["q_invperm"] = w["q_invperm"].short()
    gmap = NONE
    if group_map:
        K = w["q_invperm"].shape[0]
        gmap = torch.from_numpy(R.exl2_group_map(w["q_groups"].cpu().numpy(), w["q_weight"].shape[0], K))
        gmap = gmap.to(w["q_weight"].device)
    return make_q_matrix(w["q_weight"], w["q_perm"], w["q_invperm"], w["q_scale"], w["q_scale_max"], w["q_groups"],
                         gmap, NONE, NONE, NONE, temp_dq)


def server_make_gptq(w: Dict[str, torch.Tensor], temp_dq: torch.Tensor, g_idx_device: str = "cpu",
                     perm_dtype: torch.dtype = torch.short) -> Tuple[int, Dict[str, torch.Tensor]]:
    """text-generation-inference / LoRAX ext_make_q_matrix, GPTQ branches."""
    if w["scales"].dtype == torch.float:
        w["scales"] = w["scales"].half()
    g_idx = w.get("g_idx")
    if g_idx is not None and not (g_idx == 0).all().item():
        w["q_perm"] = torch.empty((w["qweight"].shape[0] * 8,), dtype=perm_dtype, device=w["qweight"].device)
        w["q_invperm"] = torch.empty_like(w["q_perm"])
        g = g_idx.cpu() if g_idx_device == "cpu" else g_idx
        h = make_q_matrix(w["qweight"], w["q_perm"], w["q_invperm"], NONE, NONE, NONE, NONE, w["qzeros"], w["scales"],
                          g, temp_dq)
        return h, w
    return make_q_matrix(w["qweight"], NONE, NONE, NONE, NONE, NONE, NONE, w["qzeros"], w["scales"], NONE, temp_dq), w


def server_gemm(x: torch.Tensor, handle: int, N: int, force_cuda: bool = False) -> torch.Tensor:
    """ext_gemm_half_q_half: output from torch.empty (stale contents must not matter)."""
    out = torch.empty((x.shape[0], N), dtype=torch.half, device=x.device)
    gemm_half_q_half(x, handle, out, force_cuda)
    return out


RNG = np.random.default_rng(7)
EXL2_LAYERS = [
    R.random_exl2(RNG, 256, 128, bits=[(8, 32), (6, 64), (4, 128), (3, 32)]),
    R.random_exl2(RNG, 200, 64, bits=[(5, 64), (2, 136)]),  # short, partially filled last group
    R.random_exl2(RNG, 128, 256, bits=4, group_size=32),
]
GPTQ_ACT = [R.random_gptq(RNG, 256, 128, group_size=32, act_order=True),
            R.random_gptq(RNG, 128, 64, group_size=64, with_g_idx=True)]  # ordered g_idx: same branch
GPTQ_PLAIN = [R.random_gptq(RNG, 256, 64, group_size=128), R.random_gptq(RNG, 128, 96, group_size=None)]


def _check_gemm(handle: int, layer: Dict[str, np.ndarray], device: str) -> None:
    K, N = layer["weight"].shape
    for m in (1, 300):
        x = np.random.default_rng(m).standard_normal((m, K)).astype(np.float16)
        y = server_gemm(torch.from_numpy(x).to(device), handle, N)
        assert rel_err(y, R.gemm(x, layer["weight"])) < 2e-3, m
        assert torch.equal(y, server_gemm(torch.from_numpy(x).to(device), handle, N, force_cuda=True))


# --------------------------------------------------------------- the four cases
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_map", [False, True])
def test_exl2_server_sequence(device: str, group_map: bool) -> None:
    temp_dq = temp_dq_for(EXL2_LAYERS, device)
    handles = [server_make_exl2(torch_layer(lay, device), temp_dq, group_map) for lay in EXL2_LAYERS]
    for h, lay in zip(handles, EXL2_LAYERS):
        assert bits_equal(compat.get_qmatrix(h).dequantize(), lay["weight"])
        _check_gemm(h, lay, device)
    for h in handles:
        free_q_matrix(h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("g_idx_device", ["cpu", "weight"])
def test_gptq_g_idx_server_sequence(device: str, g_idx_device: str) -> None:
    temp_dq = temp_dq_for(GPTQ_ACT, device)
    for lay in GPTQ_ACT:
        h, w = server_make_gptq(torch_layer(lay, device), temp_dq, g_idx_device)
        perm = R.act_order_perm(lay["g_idx"])
        assert w["q_perm"].dtype == torch.int16 and w["q_perm"].device.type == device
        np.testing.assert_array_equal(w["q_perm"].cpu().numpy(), perm)
        np.testing.assert_array_equal(w["q_invperm"].cpu().numpy(), np.argsort(perm))
        assert bits_equal(compat.get_qmatrix(h).dequantize(), lay["weight"])
        _check_gemm(h, lay, device)
        free_q_matrix(h)


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_plain_server_sequence(device: str) -> None:
    temp_dq = temp_dq_for(GPTQ_PLAIN, device)
    handles = [server_make_gptq(torch_layer(lay, device), temp_dq)[0] for lay in GPTQ_PLAIN]
    for h, lay in zip(handles, GPTQ_PLAIN):
        assert bits_equal(compat.get_qmatrix(h).dequantize(), lay["weight"])
        _check_gemm(h, lay, device)
        free_q_matrix(h)


def test_float32_scales_converted_by_caller() -> None:
    lay = GPTQ_PLAIN[0]
    w = torch_layer(lay, "cpu")
    w["scales"] = w["scales"].float()
    h, _ = server_make_gptq(w, temp_dq_for([lay], "cpu"))
    assert bits_equal(compat.get_qmatrix(h).dequantize(), lay["weight"])
    free_q_matrix(h)


def test_compat_handle_works_with_custom_op() -> None:
    lay = EXL2_LAYERS[2]
    h = server_make_exl2(torch_layer(lay, "cpu"), temp_dq_for([lay], "cpu"), False)
    x = torch.randn(4, 128).half()
    assert torch.equal(torch.ops.exl2.gemm(x, h), server_gemm(x, h, 256))
    free_q_matrix(h)


# ------------------------------------------------------------ inputs and lifetime
def test_inputs_unmodified() -> None:
    temp_dq = temp_dq_for(EXL2_LAYERS + GPTQ_ACT, "cpu")
    w = torch_layer(EXL2_LAYERS[0], "cpu")
    w["q_scale_max"] /= 256
    w["q_perm"], w["q_invperm"] = w["q_perm"].short(), w["q_invperm"].short()
    gmap = torch.from_numpy(R.exl2_group_map(EXL2_LAYERS[0]["q_groups"], w["q_weight"].shape[0], 256))
    before = {k: v.clone() for k, v in w.items()}
    gmap_before = gmap.clone()
    h1 = make_q_matrix(w["q_weight"], w["q_perm"], w["q_invperm"], w["q_scale"], w["q_scale_max"], w["q_groups"],
                       gmap, NONE, NONE, NONE, temp_dq)
    assert all(torch.equal(before[k], w[k]) for k in w) and torch.equal(gmap, gmap_before)

    g = torch_layer(GPTQ_ACT[0], "cpu")
    g_before = {k: v.clone() for k, v in g.items()}
    h2, g = server_make_gptq(g, temp_dq)
    # The reference reorders qweight in place; only the two output buffers may change here.
    assert all(torch.equal(g_before[k], g[k]) for k in g_before)
    free_q_matrix(h1)
    free_q_matrix(h2)


def test_inputs_may_be_freed_or_reused() -> None:
    temp_dq = temp_dq_for(EXL2_LAYERS + GPTQ_ACT, "cpu")
    w = torch_layer(EXL2_LAYERS[0], "cpu")
    h1 = server_make_exl2(w, temp_dq, True)
    g = torch_layer(GPTQ_ACT[0], "cpu")
    h2, g = server_make_gptq(g, temp_dq)
    for t in list(w.values()) + list(g.values()) + [temp_dq]:
        t.fill_(0)  # the memory is reused by someone else...
    del w, g, temp_dq  # ...or freed
    gc.collect()
    _check_gemm(h1, EXL2_LAYERS[0], "cpu")
    _check_gemm(h2, GPTQ_ACT[0], "cpu")
    free_q_matrix(h1)
    free_q_matrix(h2)


def test_freed_and_unknown_handles() -> None:
    lay = EXL2_LAYERS[1]
    h = server_make_exl2(torch_layer(lay, "cpu"), temp_dq_for([lay], "cpu"), False)
    assert h in compat.registry
    free_q_matrix(h)
    assert h not in compat.registry
    x, c = torch.zeros(1, 200, dtype=torch.half), torch.empty(1, 64, dtype=torch.half)
    with pytest.raises(ValueError, match="b: .* not a live exl2 handle"):
        gemm_half_q_half(x, h, c, False)
    with pytest.raises(ValueError, match="not a live exl2 handle"):
        free_q_matrix(h)
    with pytest.raises(ValueError, match="not a live exl2 handle"):
        free_q_matrix(10**12)
    with pytest.raises(TypeError, match="b: expected an int handle"):
        gemm_half_q_half(x, "1", c, False)  # type: ignore[arg-type]
    # Handles are never reused.
    h2 = server_make_exl2(torch_layer(lay, "cpu"), temp_dq_for([lay], "cpu"), False)
    assert h2 != h
    free_q_matrix(h2)


def test_handle_stays_valid_until_freed() -> None:
    lay = GPTQ_PLAIN[1]
    h, _ = server_make_gptq(torch_layer(lay, "cpu"), temp_dq_for([lay], "cpu"))
    gc.collect()
    _check_gemm(h, lay, "cpu")
    _check_gemm(h, lay, "cpu")
    free_q_matrix(h)


def test_int32_perms_accepted() -> None:
    lay = EXL2_LAYERS[0]
    temp_dq = temp_dq_for([lay], "cpu")
    w = torch_layer(lay, "cpu")
    w["q_scale_max"] /= 256
    h = make_q_matrix(w["q_weight"], w["q_perm"], w["q_invperm"], w["q_scale"], w["q_scale_max"], w["q_groups"],
                      NONE, NONE, NONE, NONE, temp_dq)
    assert bits_equal(compat.get_qmatrix(h).dequantize(), lay["weight"])
    free_q_matrix(h)
    # q_perm is optional (meta) for EXL2
    h = make_q_matrix(w["q_weight"], NONE, w["q_invperm"], w["q_scale"], w["q_scale_max"], w["q_groups"],
                      NONE, NONE, NONE, NONE, temp_dq)
    assert bits_equal(compat.get_qmatrix(h).dequantize(), lay["weight"])
    free_q_matrix(h)
    # int32 output buffers for GPTQ
    h, g = server_make_gptq(torch_layer(GPTQ_ACT[0], "cpu"), temp_dq_for(GPTQ_ACT, "cpu"), perm_dtype=torch.int32)
    np.testing.assert_array_equal(g["q_perm"].numpy(), R.act_order_perm(GPTQ_ACT[0]["g_idx"]))
    free_q_matrix(h)


def test_int16_perms_read_unsigned_beyond_32767() -> None:
    # The reference reads int16 permutations as uint16, so K up to 65536 works with them.
    rng = np.random.default_rng(1)
    lay = R.random_exl2(rng, 32800, 8, bits=2, group_size=64)
    w = torch_layer(lay, "cpu")
    h = server_make_exl2(w, temp_dq_for([lay], "cpu"), True)
    assert int(w["q_invperm"].min()) < 0  # really wrapped
    assert bits_equal(compat.get_qmatrix(h).dequantize(), lay["weight"])
    free_q_matrix(h)

    g = R.random_gptq(rng, 32800, 8, group_size=32, act_order=True)
    h, gw = server_make_gptq(torch_layer(g, "cpu"), temp_dq_for([g], "cpu"))
    np.testing.assert_array_equal(gw["q_perm"].numpy().view(np.uint16), R.act_order_perm(g["g_idx"]))
    np.testing.assert_array_equal(gw["q_invperm"].numpy().view(np.uint16),
                                  np.argsort(R.act_order_perm(g["g_idx"])))
    assert bits_equal(compat.get_qmatrix(h).dequantize(), g["weight"])
    free_q_matrix(h)


# ----------------------------------------------------------------- validation
def _exl2_args(lay=EXL2_LAYERS[1]) -> Dict[str, torch.Tensor]:
    w = torch_layer(lay, "cpu")
    w["q_scale_max"] /= 256
    return {"q_weight": w["q_weight"], "q_perm": w["q_perm"].short(), "q_invperm": w["q_invperm"].short(),
            "q_scale": w["q_scale"], "q_scale_max": w["q_scale_max"], "q_groups": w["q_groups"],
            "q_group_map": NONE, "gptq_qzeros": NONE, "gptq_scales": NONE, "gptq_g_idx": NONE,
            "temp_dq": temp_dq_for([lay], "cpu")}


def _gptq_args(lay=GPTQ_ACT[0]) -> Dict[str, torch.Tensor]:
    w = torch_layer(lay, "cpu")
    K = w["qweight"].shape[0] * 8
    return {"q_weight": w["qweight"], "q_perm": torch.empty(K, dtype=torch.short),
            "q_invperm": torch.empty(K, dtype=torch.short), "q_scale": NONE, "q_scale_max": NONE, "q_groups": NONE,
            "q_group_map": NONE, "gptq_qzeros": w["qzeros"], "gptq_scales": w["scales"], "gptq_g_idx": w["g_idx"],
            "temp_dq": temp_dq_for([lay], "cpu")}


def _make(args: Dict[str, torch.Tensor]) -> int:
    return make_q_matrix(*args.values())


def test_valid_args_build() -> None:
    free_q_matrix(_make(_exl2_args()))
    free_q_matrix(_make(_gptq_args()))


@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
@pytest.mark.parametrize("name", ["q_weight", "q_invperm", "q_group_map", "gptq_g_idx", "temp_dq"])
def test_non_tensor_argument(fmt: str, name: str) -> None:
    args = _exl2_args() if fmt == "exl2" else _gptq_args()
    args[name] = args[name].numpy() if args[name].device.type != "meta" else None
    with pytest.raises(TypeError, match=f"{name}: expected a torch.Tensor"):
        _make(args)


@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_temp_dq_too_small(fmt: str) -> None:
    args = _exl2_args() if fmt == "exl2" else _gptq_args()
    args["temp_dq"] = args["temp_dq"][:-1]
    with pytest.raises(ValueError, match=r"temp_dq: expected at least K\*N"):
        _make(args)
    args["temp_dq"] = torch.empty(10**6, dtype=torch.float32)
    with pytest.raises(TypeError, match="temp_dq: expected dtype torch.float16"):
        _make(args)


def test_format_selection_errors() -> None:
    args = _exl2_args()
    args["gptq_qzeros"] = _gptq_args()["gptq_qzeros"]
    with pytest.raises(ValueError, match="q_scale and gptq_qzeros: both given"):
        _make(args)
    args = _exl2_args()
    args["q_scale"] = NONE
    with pytest.raises(ValueError, match="q_scale and gptq_qzeros: both meta"):
        _make(args)
    args = _exl2_args()
    args["q_weight"] = NONE
    with pytest.raises(ValueError, match="q_weight: required"):
        _make(args)


@pytest.mark.parametrize("name", ["q_invperm", "q_scale_max", "q_groups"])
def test_exl2_required(name: str) -> None:
    args = _exl2_args()
    args[name] = NONE
    with pytest.raises(ValueError, match=f"{name}: required for EXL2"):
        _make(args)


def test_exl2_perm_errors() -> None:
    args = _exl2_args()
    args["q_perm"] = torch.flip(args["q_perm"], [0])
    with pytest.raises(ValueError, match="q_perm: expected argsort"):
        _make(args)
    args = _exl2_args()
    args["q_invperm"] = args["q_invperm"].long()
    with pytest.raises(TypeError, match="q_invperm: expected dtype torch.int16 or torch.int32"):
        _make(args)
    args = _exl2_args()
    args["q_perm"] = args["q_perm"][:-1]
    with pytest.raises(ValueError, match=r"q_perm: expected shape \[200\]"):
        _make(args)
    args = _exl2_args()
    args["q_invperm"] = args["q_invperm"].view(2, -1)
    with pytest.raises(ValueError, match="q_invperm: expected a 1-D tensor"):
        _make(args)


def test_exl2_group_map_errors() -> None:
    args = _exl2_args()
    good = torch.from_numpy(R.exl2_group_map(args["q_groups"].numpy(), args["q_weight"].shape[0], 200))
    bad = good.clone()
    bad[11] += 1
    args["q_group_map"] = bad
    with pytest.raises(ValueError, match="q_group_map: inconsistent with q_groups: element 11"):
        _make(args)
    args["q_group_map"] = good[:-2]
    with pytest.raises(ValueError, match=r"q_group_map: expected shape \[400\]"):
        _make(args)
    args["q_group_map"] = good.int()
    with pytest.raises(TypeError, match="q_group_map: expected dtype torch.int16"):
        _make(args)
    assert not [h for h, q in compat.registry.items() if q.closed]  # failures leave nothing behind


def test_exl2_only_args_rejected_for_gptq() -> None:
    for name, value in (("q_groups", _exl2_args()["q_groups"]), ("q_group_map", torch.zeros(512, dtype=torch.short))):
        args = _gptq_args()
        args[name] = value
        with pytest.raises(ValueError, match=f"{name}: not used for GPTQ"):
            _make(args)
    args = _exl2_args()
    args["gptq_g_idx"] = _gptq_args()["gptq_g_idx"]
    with pytest.raises(ValueError, match="gptq_g_idx: not used for EXL2"):
        _make(args)


def test_gptq_output_buffer_errors() -> None:
    args = _gptq_args()
    args["q_perm"] = NONE
    with pytest.raises(ValueError, match="q_perm: required for GPTQ with gptq_g_idx"):
        _make(args)
    args = _gptq_args()
    args["q_invperm"] = torch.empty(255, dtype=torch.short)
    with pytest.raises(ValueError, match=r"q_invperm: expected an output buffer of shape \[256\]"):
        _make(args)
    args = _gptq_args()
    args["q_perm"] = torch.empty(256, dtype=torch.float16)
    with pytest.raises(TypeError, match="q_perm: expected dtype torch.int16 or torch.int32"):
        _make(args)
    args = _gptq_args()
    args["q_invperm"] = args["q_perm"]
    with pytest.raises(ValueError, match="two distinct output buffers"):
        _make(args)
    args = _gptq_args()
    args["gptq_g_idx"] = NONE
    with pytest.raises(ValueError, match="q_perm: not used for GPTQ without gptq_g_idx"):
        _make(args)


def test_gptq_buffers_untouched_on_failure() -> None:
    args = _gptq_args()
    args["q_perm"].fill_(7)
    args["gptq_g_idx"] = args["gptq_g_idx"].clone()
    args["gptq_g_idx"][0] = 99  # out of range -> QMatrix rejects it
    with pytest.raises(ValueError, match="gptq_g_idx: expected group indices"):
        _make(args)
    assert bool((args["q_perm"] == 7).all())


@pytest.mark.parametrize("name, value, exc, match", [
    ("q_weight", lambda a: a["q_weight"].long(), TypeError, "q_weight: expected dtype int32"),
    ("gptq_qzeros", lambda a: a["gptq_qzeros"][:, :3].contiguous(), ValueError, r"gptq_qzeros: expected shape"),
    ("gptq_scales", lambda a: a["gptq_scales"].float(), TypeError, "gptq_scales: expected dtype float16"),
    ("gptq_g_idx", lambda a: a["gptq_g_idx"][:-8].contiguous(), ValueError, r"gptq_g_idx: expected shape"),
])
def test_gptq_errors_use_this_api_names(name, value, exc, match) -> None:
    args = _gptq_args()
    args[name] = value(args)
    with pytest.raises(exc, match=match):
        _make(args)


@pytest.mark.parametrize("name, value, exc, match", [
    ("q_weight", lambda a: a["q_weight"].long(), TypeError, "q_weight: expected dtype int32"),
    ("q_scale", lambda a: a["q_scale"][:1].contiguous(), ValueError, r"q_scale: expected shape"),
    ("q_scale_max", lambda a: a["q_scale_max"].float(), TypeError, "q_scale_max: expected dtype float16"),
    ("q_groups", lambda a: a["q_groups"][:-1].contiguous(), ValueError, "q_groups: expected an even length"),
])
def test_exl2_errors_name_arguments(name, value, exc, match) -> None:
    args = _exl2_args()
    args[name] = value(args)
    with pytest.raises(exc, match=match):
        _make(args)


def test_gemm_errors() -> None:
    h = _make(_exl2_args())
    x, c = torch.zeros(2, 200, dtype=torch.half), torch.empty(2, 64, dtype=torch.half)
    with pytest.raises(TypeError, match="a: expected dtype torch.float16"):
        gemm_half_q_half(x.float(), h, c, False)
    with pytest.raises(TypeError, match="c: expected a torch.Tensor"):
        gemm_half_q_half(x, h, c.numpy(), False)
    with pytest.raises(ValueError, match=r"a: expected shape \[m, 200\]"):
        gemm_half_q_half(x[:, :100], h, c, False)
    with pytest.raises(ValueError, match=r"c: expected shape \[2, 64\]"):
        gemm_half_q_half(x, h, c[:1], False)
    with pytest.raises(ValueError, match="c: expected a contiguous"):
        gemm_half_q_half(x, h, torch.empty(64, 2, dtype=torch.half).t(), False)
    with pytest.raises(ValueError, match="a: expected a 2-D tensor"):
        gemm_half_q_half(x[None], h, c, False)
    with pytest.raises(TypeError, match="force_cuda: expected a bool"):
        gemm_half_q_half(x, h, c, "yes")  # type: ignore[arg-type]
    free_q_matrix(h)


@pytest.mark.cuda
def test_gemm_device_mismatch() -> None:
    h = _make(_exl2_args())  # a CPU layer
    x, c = torch.zeros(2, 200, dtype=torch.half), torch.empty(2, 64, dtype=torch.half)
    with pytest.raises(ValueError, match="a: expected a tensor on cpu"):
        gemm_half_q_half(x.cuda(), h, c, False)
    free_q_matrix(h)
