"""exl2.parallel: column and row (act-order aware) tensor-parallel splits of format-tensor dicts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from exl2 import reference as R
from exl2.loaders import qmatrix_from_tensors
from exl2.nn import QuantLinear
from exl2.parallel import split_columns, split_rows

sys.path.insert(0, str(Path(__file__).parent))
from layers import DEVICES, bits_equal, rel_err  # noqa: E402

RNG = np.random.default_rng(5)
LAYERS: Dict[str, Dict[str, np.ndarray]] = {
    "exl2_mixed": R.random_exl2(RNG, 320, 64, bits=[(8, 32), (6, 64), (5, 32), (4, 128), (3, 32), (2, 32)],
                                bias=True),
    "exl2_short_last": R.random_exl2(RNG, 200, 48, bits=[(4, 64), (4, 64), (3, 64), (2, 8)]),
    "exl2_no_perm": {k: v for k, v in R.random_exl2(RNG, 256, 40, bits=4, group_size=32).items() if k != "q_perm"},
    "gptq_act": R.random_gptq(RNG, 256, 64, group_size=32, act_order=True, bias=True),
    "gptq_ordered_g_idx": R.random_gptq(RNG, 256, 64, group_size=64, with_g_idx=True),
    "gptq_plain": R.random_gptq(RNG, 512, 48, group_size=128, bias=True),
    "gptq_per_channel": R.random_gptq(RNG, 96, 40, group_size=None),
    "gptq_per_channel_g_idx": R.random_gptq(RNG, 96, 40, group_size=None, with_g_idx=True),
}


def x_for(layer: Dict[str, np.ndarray], m: int = 6) -> np.ndarray:
    return np.random.default_rng(m).standard_normal((m, layer["weight"].shape[0])).astype(np.float16)


def build(t: Dict, device: str = "cpu"):
    return qmatrix_from_tensors(t, device=device)


def torch_dict(layer: Dict[str, np.ndarray], device: str) -> Dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)).to(device) for k, v in layer.items()}


# ------------------------------------------------------------------ columns
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("name", list(LAYERS))
def test_split_columns(name: str, n: int) -> None:
    lay = LAYERS[name]
    N = lay["weight"].shape[1]
    shards = split_columns(lay, n)
    widths = [s["q_weight" if "q_weight" in s else "qweight"].shape[1] for s in shards]
    assert len(shards) == n and sum(widths) == N and all(w % 8 == 0 for w in widths)
    assert max(widths) - min(widths) <= 8
    x = torch.from_numpy(x_for(lay))
    ys, ws = [], []
    for s in shards:
        assert "rows" not in s and "weight" not in s
        with build(s) as q:
            ys.append(q.matmul(x))
            ws.append(q.dequantize())
    assert bits_equal(torch.cat(ws, dim=1), lay["weight"])
    y = torch.cat(ys, dim=-1)
    assert rel_err(y, R.gemm(x.numpy(), lay["weight"], lay.get("bias"))) < 2e-3
    with build(lay) as q:
        torch.testing.assert_close(y, q.matmul(x), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------- rows
def _row_shards_check(lay: Dict[str, np.ndarray], shards: List[Dict[str, torch.Tensor]], device: str = "cpu") -> None:
    K = lay["weight"].shape[0]
    rows = torch.cat([s["rows"].cpu() for s in shards])
    assert all(s["rows"].dtype == torch.int64 for s in shards)
    assert torch.equal(torch.sort(rows).values, torch.arange(K))  # every input column exactly once
    assert all(bool((s["rows"][1:] > s["rows"][:-1]).all()) for s in shards)  # increasing
    assert ("bias" in shards[0]) == ("bias" in lay) and all("bias" not in s for s in shards[1:])
    x = torch.from_numpy(x_for(lay)).to(device)
    total = torch.zeros(x.shape[0], lay["weight"].shape[1], dtype=torch.float32, device=device)
    for s in shards:
        with build(s, device) as q:
            # Each shard is a valid layer holding exactly the weight rows it claims.
            assert bits_equal(q.dequantize(), lay["weight"][s["rows"].cpu().numpy()])
            total += q.matmul(x[:, s["rows"]]).float()
    assert rel_err(total, R.gemm(x.cpu().numpy(), lay["weight"], lay.get("bias"))) < 2e-3
    with build(lay, device) as q:
        torch.testing.assert_close(total.half(), q.matmul(x), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(LAYERS))
def test_split_rows(name: str, n: int) -> None:
    _row_shards_check(LAYERS[name], split_rows(LAYERS[name], n))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["exl2_mixed", "gptq_act"])
def test_split_torch_inputs_keep_device(name: str, device: str) -> None:
    t = torch_dict(LAYERS[name], device)
    for s in split_rows(t, 3) + split_columns(t, 2):
        assert all(isinstance(v, torch.Tensor) and v.device.type == device and v.is_contiguous() for v in s.values())
    _row_shards_check(LAYERS[name], split_rows(t, 3), device)


def test_split_rows_gptq_act_order_groups() -> None:
    lay = LAYERS["gptq_act"]  # 8 groups of 32 rows scattered over K
    shards = split_rows(lay, 3)
    assert [s["qzeros"].shape[0] for s in shards] == [3, 3, 2]
    for s in shards:
        G = s["qzeros"].shape[0]
        counts = torch.bincount(s["g_idx"].long(), minlength=G)
        assert s["g_idx"].dtype == torch.int32 and counts.tolist() == [32] * G
        assert s["qweight"].shape == (G * 32 // 8, 64)
        # act-order survives: the relabelled g_idx is still out of order
        assert bool((s["g_idx"][1:] < s["g_idx"][:-1]).any())


def test_split_rows_exl2_layout() -> None:
    lay = LAYERS["exl2_mixed"]  # 6 groups of 32, 64, 32, 128, 32, 32 rows
    shards = split_rows(lay, 2)
    assert [int(s["q_invperm"].shape[0]) for s in shards] == [128, 192]
    for s in shards:
        inv = s["q_invperm"].long()
        assert torch.equal(torch.sort(inv).values, torch.arange(inv.numel()))
        assert torch.equal(s["q_perm"].long(), torch.argsort(inv))
        assert s["q_groups"].dtype == torch.int16 and int(s["q_groups"][1]) == 0
    assert shards[1]["q_groups"].tolist()[0::2] == [4, 3, 2]
    assert "q_perm" not in split_rows(LAYERS["exl2_no_perm"], 2)[0]


def test_split_rows_then_columns() -> None:
    lay = LAYERS["gptq_act"]
    x = torch.from_numpy(x_for(lay))
    total = torch.zeros(x.shape[0], 64)
    for rs in split_rows(lay, 2):
        parts = []
        for cs in split_columns(rs, 2):
            with build(cs) as q:
                parts.append(q.matmul(x[:, rs["rows"]]))
        total += torch.cat(parts, dim=-1).float()
    assert rel_err(total, R.gemm(x.numpy(), lay["weight"], lay["bias"])) < 2e-3


def test_shards_feed_quantlinear() -> None:
    lay = LAYERS["exl2_mixed"]
    x = torch.from_numpy(x_for(lay))
    mods = [QuantLinear.from_tensors(s) for s in split_rows(lay, 2)]
    y = sum(m(x[:, s]).float() for m, s in zip(mods, [s["rows"] for s in split_rows(lay, 2)]))
    assert rel_err(y, R.gemm(x.numpy(), lay["weight"], lay["bias"])) < 2e-3


def test_inputs_unmodified() -> None:
    t = torch_dict(LAYERS["gptq_act"], "cpu")
    before = {k: v.clone() for k, v in t.items()}
    split_rows(t, 2)
    split_columns(t, 2)
    assert all(torch.equal(before[k], t[k]) for k in t)


# --------------------------------------------------------------- validation
def test_split_errors() -> None:
    lay = LAYERS["gptq_plain"]  # 4 groups, N = 48
    with pytest.raises(ValueError, match="n: cannot split into 5 shards, the layer has only 4 groups"):
        split_rows(lay, 5)
    with pytest.raises(ValueError, match="n: cannot split into 7 shards, the layer has only 6 blocks of 8 columns"):
        split_columns(lay, 7)
    with pytest.raises(ValueError, match="n: expected at least 1"):
        split_rows(lay, 0)
    with pytest.raises(TypeError, match="n: expected an int"):
        split_columns(lay, "2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tensors: expected a mapping"):
        split_rows([lay], 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected EXL2"):
        split_rows({"weight": lay["weight"]}, 2)
    with pytest.raises(ValueError, match=r"lacks \['scales'\]"):
        split_rows({k: v for k, v in lay.items() if k != "scales"}, 2)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        split_columns({**lay, "qweight": lay["qweight"][:, :12]}, 1)
    with pytest.raises(ValueError, match="only 12 blocks of 8 rows"):
        split_rows(LAYERS["gptq_per_channel"], 13)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="tensors: splitting supports EXL2 and 4-bit GPTQ layers, got a 3-bit GPTQ"):
        split_columns(R.random_gptq(rng, 64, 64, group_size=32, bits=3), 2)
    with pytest.raises(ValueError, match="tensors: splitting supports EXL2 and 4-bit GPTQ layers, got awq"):
        split_rows(R.random_awq(rng, 64, 64, group_size=32), 2)
