"""exl2.loaders: safetensors files, model directories, state dicts and GPTQ / AWQ quantization configs.

The committed checkpoints ``tests/data/tiny_exl2.safetensors`` and ``tests/data/tiny_gptq/``
are made by :func:`write_tiny_checkpoints` (regenerate with ``python tests/test_loaders.py``);
``test_tiny_checkpoints_reproducible`` checks that the committed bytes still match it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import exl2
from exl2 import reference as R

sys.path.insert(0, str(Path(__file__).parent))
from layers import DEVICES, bits_equal, rel_err  # noqa: E402

DATA = Path(__file__).parent / "data"
TINY_EXL2 = DATA / "tiny_exl2.safetensors"
TINY_GPTQ = DATA / "tiny_gptq"

EXL2_LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"]
GPTQ_LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
GPTQ_CONFIG = {"bits": 4, "group_size": 32, "desc_act": True, "sym": False, "true_sequential": True,
               "quant_method": "gptq", "checkpoint_format": "gptq"}
_FORMAT_KEYS = {"q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "q_perm",
                "qweight", "qzeros", "scales", "g_idx", "bias"}


def _layer(d: Dict[str, np.ndarray], prefix: str, drop=()) -> Dict[str, np.ndarray]:
    return {f"{prefix}.{k}": np.ascontiguousarray(v) for k, v in d.items() if k in _FORMAT_KEYS and k not in drop}


def write_tiny_checkpoints(out: Path) -> None:
    """Write tiny_exl2.safetensors and tiny_gptq/ (deterministic) into ``out``."""
    rng = np.random.default_rng(20240607)
    exl2_sd: Dict[str, np.ndarray] = {}
    exl2_sd.update(_layer(R.random_exl2(rng, 128, 64, bits=[(8, 32), (6, 32), (4, 64)], bias=True), EXL2_LAYERS[0]))
    # No q_perm (optional), and a short, partially filled last 2-bit group.
    exl2_sd.update(_layer(R.random_exl2(rng, 200, 64, bits=[(5, 64), (3, 96), (2, 40)]), EXL2_LAYERS[1],
                          drop=("q_perm",)))
    exl2_sd.update(_layer(R.random_exl2(rng, 64, 128, bits=4, permute=False), EXL2_LAYERS[2], drop=("q_perm",)))
    save_file(exl2_sd, str(out / TINY_EXL2.name), metadata={"format": "pt"})

    gdir = out / TINY_GPTQ.name
    gdir.mkdir(exist_ok=True)
    shards = [
        _layer(R.random_gptq(rng, 128, 64, group_size=32, act_order=True, bias=True), GPTQ_LAYERS[0]),
        _layer(R.random_gptq(rng, 256, 64, group_size=32, act_order=True), GPTQ_LAYERS[1]),
    ]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(gdir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (gdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (gdir / "quantize_config.json").write_text(json.dumps(GPTQ_CONFIG, indent=2) + "\n")


def _gptq_file_tensors() -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    for f in sorted(TINY_GPTQ.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _sub(sd: Dict[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
    return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}


def _check(q: exl2.QMatrix, t: Dict[str, np.ndarray], zero_format: str = "v1") -> None:
    if "q_weight" in t:
        w = R.dequantize_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])
    elif exl2.loaders.detect_format(t) == "awq":
        w = R.dequantize_awq(t["qweight"], t["qzeros"], t["scales"])
    else:
        bits = 32 * np.shape(t["qzeros"])[1] // np.shape(t["scales"])[1]  # qzeros [G, N*bits/32]
        w = R.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), zero_format, bits)
    assert bits_equal(q.dequantize(), w)
    x = np.random.default_rng(1).standard_normal((5, w.shape[0])).astype(np.float16)
    y = q.matmul(torch.from_numpy(x).to(q.device))
    assert rel_err(y, R.gemm(x, w, t.get("bias"))) < 2e-3


# ----------------------------------------------------------------- checkpoints
def test_tiny_checkpoints_small() -> None:
    files = [TINY_EXL2, *TINY_GPTQ.iterdir()]
    assert sum(f.stat().st_size for f in files) < 200_000


def test_tiny_checkpoints_reproducible(tmp_path: Path) -> None:
    write_tiny_checkpoints(tmp_path)
    assert (tmp_path / TINY_EXL2.name).read_bytes() == TINY_EXL2.read_bytes()
    for f in TINY_GPTQ.iterdir():
        assert (tmp_path / TINY_GPTQ.name / f.name).read_bytes() == f.read_bytes(), f.name


# ------------------------------------------------------------------------ EXL2
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix", EXL2_LAYERS)
def test_load_exl2_file(prefix: str, device: str) -> None:
    with exl2.load_exl2(TINY_EXL2, prefix, device=device) as q:
        assert q.format == "exl2" and q.device.type == device
        _check(q, _sub(load_file(TINY_EXL2), prefix))


def test_load_exl2_bias_and_shape() -> None:
    with exl2.load_exl2(str(TINY_EXL2), EXL2_LAYERS[0]) as q:
        assert (q.in_features, q.out_features, q.has_bias) == (128, 64, True)
    with exl2.load_exl2(TINY_EXL2, EXL2_LAYERS[1]) as q:
        assert (q.in_features, q.out_features, q.has_bias) == (200, 64, False)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_load_exl2_dict(kind: str) -> None:
    sd = load_file(TINY_EXL2)
    if kind == "torch":
        sd = {k: torch.from_numpy(v) for k, v in sd.items()}
    with exl2.load_exl2(sd, EXL2_LAYERS[1] + ".") as q:  # a trailing dot is tolerated
        _check(q, _sub(load_file(TINY_EXL2), EXL2_LAYERS[1]))


def test_load_exl2_int16_and_int64_perms() -> None:
    sd = {k: torch.from_numpy(v) for k, v in load_file(TINY_EXL2).items()}
    p = EXL2_LAYERS[0]
    sd[f"{p}.q_perm"] = sd[f"{p}.q_perm"].to(torch.int16)
    sd[f"{p}.q_invperm"] = sd[f"{p}.q_invperm"].to(torch.int64)
    with exl2.load_exl2(sd, p) as q:
        _check(q, _sub(load_file(TINY_EXL2), p))


def test_load_exl2_missing_tensor() -> None:
    sd = load_file(TINY_EXL2)
    del sd[f"{EXL2_LAYERS[0]}.q_scale"]
    with pytest.raises(KeyError, match=r"self_attn\.q_proj\.q_scale"):
        exl2.load_exl2(sd, EXL2_LAYERS[0])


def test_load_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        exl2.load_exl2(tmp_path / "nope.safetensors", "x")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        exl2.load_exl2(tmp_path, "x")
    with pytest.raises(TypeError, match="source"):
        exl2.load_exl2(42, "x")  # type: ignore[arg-type]


# ------------------------------------------------------------------------ GPTQ
def test_read_gptq_config() -> None:
    cfg = exl2.loaders.read_gptq_config(TINY_GPTQ)
    assert cfg == exl2.loaders.GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False, zero_format="v1")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix", GPTQ_LAYERS)
def test_load_gptq_directory(prefix: str, device: str) -> None:
    with exl2.load_gptq(TINY_GPTQ, prefix, device=device) as q:
        assert q.format == "gptq" and q.device.type == device
        _check(q, _sub(_gptq_file_tensors(), prefix))


def test_load_gptq_single_file_and_dict() -> None:
    f = TINY_GPTQ / "model-00001-of-00002.safetensors"
    with exl2.load_gptq(f, GPTQ_LAYERS[0], group_size=32, desc_act=True) as q:
        assert q.has_bias
        _check(q, _sub(load_file(f), GPTQ_LAYERS[0]))
    with exl2.load_gptq(load_file(f), GPTQ_LAYERS[0]) as q:
        _check(q, _sub(load_file(f), GPTQ_LAYERS[0]))


def test_load_gptq_directory_without_index(tmp_path: Path) -> None:
    for f in TINY_GPTQ.glob("*.safetensors"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with exl2.load_gptq(tmp_path, GPTQ_LAYERS[1]) as q:  # no config: defaults, v1
        _check(q, _sub(_gptq_file_tensors(), GPTQ_LAYERS[1]))


def _gptq_dir(tmp_path: Path, config: dict, *, in_config_json: bool = False, zero_format: str = "v1",
              **layer_kw) -> Dict[str, np.ndarray]:
    layer_kw.setdefault("group_size", 16)
    layer = R.random_gptq(np.random.default_rng(3), 64, 32, zero_format=zero_format, **layer_kw)
    save_file(_layer(layer, "l"), str(tmp_path / "model.safetensors"))
    if in_config_json:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": config}))
    else:
        (tmp_path / "quantize_config.json").write_text(json.dumps(config))
    return layer


def test_load_gptq_v2_from_config(tmp_path: Path) -> None:
    layer = _gptq_dir(tmp_path, {"bits": 4, "group_size": 16, "checkpoint_format": "gptq_v2"},
                      zero_format="v2", group_size=16)
    with exl2.load_gptq(tmp_path, "l") as q:
        _check(q, layer, "v2")
    with exl2.load_gptq(tmp_path, "l", zero_format="v1") as q:  # explicit setting wins
        assert not bits_equal(q.dequantize(), layer["weight"])


def test_load_gptq_config_json_fallback(tmp_path: Path) -> None:
    layer = _gptq_dir(tmp_path, {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False},
                      in_config_json=True, group_size=None)
    assert exl2.loaders.read_gptq_config(tmp_path).group_size == -1
    with exl2.load_gptq(tmp_path, "l") as q:
        _check(q, layer)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_load_gptq_bits_argument_must_match(bits: int) -> None:
    with pytest.raises(ValueError, match=f"bits: {bits} does not match layer .* are 4-bit GPTQ"):
        exl2.load_gptq(TINY_GPTQ, GPTQ_LAYERS[0], bits=bits)
    with pytest.raises(ValueError, match="bits: expected 2, 3, 4 or 8 for GPTQ, got bits=5"):
        exl2.load_gptq(TINY_GPTQ, GPTQ_LAYERS[0], bits=5)


def test_load_gptq_bits_in_config_must_match(tmp_path: Path) -> None:
    _gptq_dir(tmp_path, {"bits": 8, "group_size": 16})  # the layer is 4-bit
    with pytest.raises(ValueError, match="bits: 8 does not match layer 'l'"):
        exl2.load_gptq(tmp_path, "l")


def test_load_gptq_unsupported_bits_in_config(tmp_path: Path) -> None:
    _gptq_dir(tmp_path, {"bits": 5, "group_size": 16})
    with pytest.raises(ValueError, match="bits: expected 2, 3, 4 or 8 for GPTQ, got bits=5"):
        exl2.load_gptq(tmp_path, "l")


@pytest.mark.parametrize("bits, zero_format, in_config_json", [(2, "v1", False), (3, "v1", True), (8, "v2", False),
                                                               (3, "v2", False)])
def test_load_gptq_widths_from_config(tmp_path: Path, bits: int, zero_format: str, in_config_json: bool) -> None:
    cfg = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": True,
           "checkpoint_format": "gptq_v2" if zero_format == "v2" else "gptq"}
    layer = R.random_gptq(np.random.default_rng(bits), 128 if bits != 3 else 96, 64, group_size=32, act_order=True,
                          zero_format=zero_format, bits=bits, bias=True)
    save_file(_layer(layer, "model.l"), str(tmp_path / "model.safetensors"))
    name = "config.json" if in_config_json else "quantize_config.json"
    body = {"quantization_config": cfg} if in_config_json else cfg
    (tmp_path / name).write_text(json.dumps(body))
    assert exl2.loaders.read_gptq_config(tmp_path).bits == bits
    assert exl2.loaders.layer_format(tmp_path, "model.l") == "gptq"
    with exl2.load_gptq(tmp_path, "model.l") as q:
        _check(q, layer, zero_format)
    with exl2.load_gptq(tmp_path, "model.l", bits=bits) as q:
        _check(q, layer, zero_format)
    m = exl2.QuantLinear.from_state_dict(tmp_path, "model.l")
    assert bits_equal(m.qmatrix.dequantize(), layer["weight"])
    # a single file without config: the width comes from the shapes
    with exl2.load_gptq(tmp_path / "model.safetensors", "model.l", zero_format=zero_format) as q:
        _check(q, layer, zero_format)


# ------------------------------------------------------------------------ AWQ
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}


def _awq_dir(tmp_path: Path, config, *, name: str = "config.json", **kw) -> Dict[str, np.ndarray]:
    kw.setdefault("group_size", 32)
    layer = R.random_awq(np.random.default_rng(9), 128, 64, bias=True, **kw)
    save_file(_layer(layer, "model.l"), str(tmp_path / "model.safetensors"))
    if config is not None:
        body = {"model_type": "llama", "quantization_config": config} if name == "config.json" else config
        (tmp_path / name).write_text(json.dumps(body))
    return layer


@pytest.mark.parametrize("device", DEVICES)
def test_load_awq_config_json(tmp_path: Path, device: str) -> None:
    layer = _awq_dir(tmp_path, AWQ_CONFIG)
    assert exl2.loaders.read_awq_config(tmp_path) == exl2.loaders.AWQConfig(group_size=32)
    assert exl2.loaders.layer_format(tmp_path, "model.l") == "awq"
    with exl2.load_awq(tmp_path, "model.l", device=device) as q:
        assert q.format == "awq" and q.has_bias
        _check(q, layer)
    m = exl2.QuantLinear.from_state_dict(tmp_path, "model.l")
    assert m.qmatrix.format == "awq"
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 128)).astype(np.float16))
    assert rel_err(m(x), R.gemm(x.numpy(), layer["weight"], layer["bias"])) < 2e-3


def test_load_awq_autoawq_quant_config(tmp_path: Path) -> None:
    layer = _awq_dir(tmp_path, {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"},
                     name="quant_config.json")
    assert exl2.loaders.read_awq_config(tmp_path).group_size == 32
    assert exl2.loaders.layer_format(tmp_path, "model.l") == "awq"
    with exl2.load_awq(tmp_path, "model.l") as q:
        _check(q, layer)
    with pytest.raises(ValueError, match="quant_method: expected 'gptq', got 'awq'"):
        exl2.load_gptq(tmp_path, "model.l")


def test_awq_without_config_by_shape(tmp_path: Path) -> None:
    layer = _awq_dir(tmp_path, None, group_size=None)
    f = tmp_path / "model.safetensors"
    assert exl2.loaders.layer_format(f, "model.l") == "awq"
    assert exl2.loaders.layer_format(tmp_path, "model.l") == "awq"
    with exl2.load_awq(f, "model.l", group_size=-1) as q:
        _check(q, layer)
    sd = {k[len("model.l."):]: v for k, v in load_file(f).items()}
    assert exl2.loaders.detect_format(sd) == "awq"
    with exl2.loaders.qmatrix_from_tensors(sd) as q:
        _check(q, layer)
    with exl2.load_awq({f"p.{k}": torch.from_numpy(v) for k, v in sd.items()}, "p") as q:
        _check(q, layer)
    with pytest.raises(ValueError, match="group_size: 64 does not match layer 'model.l'"):
        exl2.load_awq(f, "model.l", group_size=64)


@pytest.mark.parametrize("config, match", [
    ({**AWQ_CONFIG, "version": "gemv"}, "version: only AWQ 'gemm' packing"),
    ({**AWQ_CONFIG, "bits": 3}, "bits: only 4-bit AWQ"),
    ({**AWQ_CONFIG, "zero_point": False}, "zero_point"),
    ({**AWQ_CONFIG, "group_size": 64}, "group_size: 64 does not match"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method: expected 'awq'"),
])
def test_load_awq_bad_config(tmp_path: Path, config: dict, match: str) -> None:
    _awq_dir(tmp_path, config)
    with pytest.raises(ValueError, match=match):
        exl2.load_awq(tmp_path, "model.l")


def test_detect_format_gptq_widths() -> None:
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 8):
        layer = R.random_gptq(rng, 96 if bits == 3 else 64, 64, group_size=32, bits=bits)
        assert exl2.loaders.detect_format(layer) == "gptq"
        with exl2.loaders.qmatrix_from_tensors(layer) as q:  # width from the qzeros shape
            _check(q, layer)


@pytest.mark.parametrize("config, match", [
    ({"quant_method": "awq", "bits": 4}, "quant_method: expected 'gptq', got 'awq'"),
    ({"bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format"),
])
def test_load_gptq_bad_config(tmp_path: Path, config: dict, match: str) -> None:
    _gptq_dir(tmp_path, config)
    with pytest.raises(ValueError, match=match):
        exl2.load_gptq(tmp_path, "l")


def test_load_gptq_group_size_mismatch() -> None:
    with pytest.raises(ValueError, match="group_size: 64 does not match"):
        exl2.load_gptq(TINY_GPTQ, GPTQ_LAYERS[0], group_size=64)
    with pytest.raises(ValueError, match="group_size: -1"):
        exl2.load_gptq(TINY_GPTQ, GPTQ_LAYERS[0], group_size=-1)


def test_load_gptq_desc_act_checks() -> None:
    with pytest.raises(ValueError, match="desc_act: False, but .* act-order"):
        exl2.load_gptq(TINY_GPTQ, GPTQ_LAYERS[0], desc_act=False)
    sd = _gptq_file_tensors()
    del sd[f"{GPTQ_LAYERS[0]}.g_idx"]
    with pytest.raises(ValueError, match="desc_act: True, but .* no g_idx"):
        exl2.load_gptq(sd, GPTQ_LAYERS[0], desc_act=True)


def test_load_gptq_normalises_dtypes() -> None:
    sd = {k: torch.from_numpy(v) for k, v in _gptq_file_tensors().items()}
    p = GPTQ_LAYERS[0]
    sd[f"{p}.scales"] = sd[f"{p}.scales"].float()  # exactly representable: same weight
    sd[f"{p}.g_idx"] = sd[f"{p}.g_idx"].long()
    with exl2.load_gptq(sd, p) as q:
        _check(q, _sub(_gptq_file_tensors(), p))


def test_load_gptq_zero_format_value() -> None:
    with pytest.raises(ValueError, match="zero_format"):
        exl2.load_gptq(TINY_GPTQ, GPTQ_LAYERS[0], zero_format="v3")


# ----------------------------------------------------------------- helpers
def test_layer_format_and_from_tensors() -> None:
    assert exl2.loaders.layer_format(TINY_EXL2, EXL2_LAYERS[2]) == "exl2"
    assert exl2.loaders.layer_format(TINY_GPTQ, GPTQ_LAYERS[1]) == "gptq"
    with pytest.raises(KeyError):
        exl2.loaders.layer_format(TINY_GPTQ, "model.nope")
    t = exl2.loaders.read_exl2_tensors(TINY_EXL2, EXL2_LAYERS[0])
    assert set(t) == {"q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "q_perm", "bias"}
    with exl2.loaders.qmatrix_from_tensors({**t, "weight": None}) as q:
        _check(q, {k: v.numpy() for k, v in t.items()})
    with pytest.raises(ValueError, match="expected EXL2"):
        exl2.loaders.detect_format({"foo": 1})


if __name__ == "__main__":
    write_tiny_checkpoints(DATA)
    print("wrote", TINY_EXL2, TINY_GPTQ)


# ------------------------------------------------- an explicit format is honoured
def _awq_and_gptq_dicts():
    rng = np.random.default_rng(11)
    awq = R.random_awq(rng, 128, 64, group_size=32, bias=True)
    gptq = R.random_gptq(rng, 128, 64, group_size=32, bits=4)
    strip = lambda d: {k: v for k, v in d.items() if k in _FORMAT_KEYS}  # noqa: E731
    return strip(awq), strip(gptq)


def test_load_gptq_rejects_awq_tensors(tmp_path: Path) -> None:
    awq, _ = _awq_and_gptq_dicts()
    sd = {f"p.{k}": torch.from_numpy(v) for k, v in awq.items()}
    for kwargs in ({}, {"group_size": 32}, {"bits": 4}, {"desc_act": True}, {"zero_format": "v2"}):
        with pytest.raises(ValueError, match=r"p\.qweight: shape \[128, 8\] with scales \[4, 64\] is AWQ packing"):
            exl2.load_gptq(sd, "p", **kwargs)
    with pytest.raises(ValueError, match=r"p\.qweight: .* is AWQ packing"):
        exl2.loaders.read_gptq_tensors(sd, "p")
    f = tmp_path / "awq.safetensors"
    save_file({f"m.l.{k}": v for k, v in awq.items()}, str(f))
    with pytest.raises(ValueError, match=r"m\.l\.qweight: .* is AWQ packing"):
        exl2.load_gptq(f, "m.l")


def test_load_awq_rejects_gptq_tensors() -> None:
    _, gptq = _awq_and_gptq_dicts()
    sd = {f"p.{k}": torch.from_numpy(v) for k, v in gptq.items() if k != "g_idx"}
    with pytest.raises(ValueError, match=r"p\.qweight: shape \[16, 64\] with scales \[4, 64\] is GPTQ packing"):
        exl2.load_awq(sd, "p")
    with pytest.raises(ValueError, match=r"p\.qweight: .* is GPTQ packing"):
        exl2.load_awq(sd, "p", group_size=32)


def test_qmatrix_from_tensors_format_argument() -> None:
    awq, gptq = _awq_and_gptq_dicts()
    with exl2.loaders.qmatrix_from_tensors(awq, format="awq") as q:
        assert q.format == "awq"
        _check(q, awq)
    with exl2.loaders.qmatrix_from_tensors(gptq, format="gptq", bits=4) as q:
        assert q.format == "gptq"
        _check(q, gptq)
    with pytest.raises(ValueError, match="qweight: .* is AWQ packing"):
        exl2.loaders.qmatrix_from_tensors(awq, format="gptq")
    with pytest.raises(ValueError, match="qweight: .* is GPTQ packing"):
        exl2.loaders.qmatrix_from_tensors(gptq, format="awq")
    with pytest.raises(ValueError, match="format 'exl2' needs 'q_weight'"):
        exl2.loaders.qmatrix_from_tensors(gptq, format="exl2")
    with pytest.raises(ValueError, match="format: expected 'exl2', 'gptq', 'awq' or None"):
        exl2.loaders.qmatrix_from_tensors(gptq, format="marlin")
