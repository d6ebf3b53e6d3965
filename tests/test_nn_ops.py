"""torch integration: the exl2::gemm custom op (opcheck, torch.compile) and exl2.nn.QuantLinear."""

from __future__ import annotations

import gc
import sys
import timeit
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

import exl2
from exl2 import compat
from exl2 import reference as R
from exl2.nn import QuantLinear

sys.path.insert(0, str(Path(__file__).parent))
from layers import DEVICES, rel_err  # noqa: E402

RNG = np.random.default_rng(11)
LAYERS: Dict[str, Dict[str, np.ndarray]] = {
    "exl2": R.random_exl2(RNG, 256, 128, bits=[(8, 32), (5, 64), (4, 96), (2, 64)], bias=True),
    "gptq": R.random_gptq(RNG, 128, 256, group_size=32, act_order=True, bias=True),
    "gptq_v2": R.random_gptq(RNG, 256, 64, group_size=64, zero_format="v2"),
}
ZERO = {"exl2": "v1", "gptq": "v1", "gptq_v2": "v2"}


def make(name: str, device: str = "cpu", **kw) -> QuantLinear:
    return QuantLinear.from_tensors(LAYERS[name], zero_format=ZERO[name], device=device, **kw)


def x_for(name: str, *lead: int, device: str = "cpu") -> torch.Tensor:
    K = LAYERS[name]["weight"].shape[0]
    return torch.from_numpy(np.random.default_rng(sum(lead)).standard_normal((*lead, K)).astype(np.float16)).to(device)


def check(y: torch.Tensor, name: str, x: torch.Tensor) -> None:
    lay = LAYERS[name]
    assert y.dtype == torch.float16 and y.shape == (*x.shape[:-1], lay["weight"].shape[1])
    assert rel_err(y, R.gemm(x.cpu().numpy(), lay["weight"], lay.get("bias"))) < 2e-3


# ---------------------------------------------------------------- custom op
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3), ()])
def test_opcheck(name: str, lead: tuple) -> None:
    m = make(name)
    x = x_for(name, *lead)
    torch.library.opcheck(torch.ops.exl2.gemm.default, (x, m.handle))
    check(torch.ops.exl2.gemm(x, m.handle), name, x)


def test_op_unknown_handle() -> None:
    with pytest.raises(ValueError, match="not a live exl2 handle"):
        torch.ops.exl2.gemm(torch.zeros(1, 8, dtype=torch.half), 10**12)


class TinyModel(torch.nn.Module):
    """Two quantized layers with ordinary torch ops in between."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.up = make("gptq", device)      # 128 -> 256
        self.down = make("exl2", device)    # 256 -> 128
        self.norm = torch.nn.LayerNorm(128, dtype=torch.float16, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(torch.nn.functional.silu(self.up(x))) + x)


def _compile_and_compare(model: torch.nn.Module, backend: str, device: str, mode=None, **kw) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    # A compile mode needs the backend by name; fullgraph=True still fails on any graph break.
    counter = CompileCounterWithBackend(backend) if mode is None else None
    compiled = torch.compile(model, backend=counter or backend, fullgraph=True, mode=mode, **kw)
    for m in (1, 5, 9, 5):
        x = x_for("gptq", m, device=device)
        with torch.no_grad():
            y_ref = model(x)
            y = compiled(x).clone()  # clone: CUDA-graph outputs are overwritten by the next replay
        torch.testing.assert_close(y, y_ref, rtol=2e-3, atol=2e-3)
    if counter is None:
        return
    # Each captured graph (one for m=1, one for dynamic m; dynamic=True adds an empty
    # one) must hold both quantized layers.
    graphs = [g for g in counter.graphs if any(n.op == "call_function" for n in g.graph.nodes)]
    assert 1 <= len(graphs) <= 2
    for g in graphs:
        calls = [n for n in g.graph.nodes if n.target in (torch.ops.exl2.gemm, torch.ops.exl2.gemm.default)]
        assert len(calls) == 2, g.graph


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend: str) -> None:
    _compile_and_compare(TinyModel(), backend, "cpu")


def test_torch_compile_dynamic() -> None:
    _compile_and_compare(TinyModel(), "aot_eager", "cpu", dynamic=True)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile_cuda(mode) -> None:
    _compile_and_compare(TinyModel("cuda"), "inductor", "cuda", mode=mode)


@pytest.mark.parametrize("device", DEVICES)
def test_op_overhead_report(device: str) -> None:
    """Eager host overhead of the custom op vs a direct QMatrix.matmul (printed, not asserted).
    Run with ``-s`` to see it. m=1 on a small layer, so that the call, not the kernel, dominates."""
    m = make("gptq", device)
    q, x = m.qmatrix, x_for("gptq", 1, device=device)
    n = 2000
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def best(fn) -> float:
        def loop() -> None:
            for _ in range(n):
                fn()
            sync()
        loop()  # warm-up
        return min(timeit.repeat(loop, number=1, repeat=5)) / n * 1e6

    with torch.inference_mode():
        t_direct = best(lambda: q.matmul(x))
        t_op = best(lambda: torch.ops.exl2.gemm(x, m.handle))
        t_module = best(lambda: m(x))
    print(f"\n[exl2 op overhead, {device}, m=1, K=128, N=256, per call] QMatrix.matmul {t_direct:.1f} us, "
          f"torch.ops.exl2.gemm {t_op:.1f} us (+{t_op - t_direct:.1f}), QuantLinear {t_module:.1f} us "
          f"(+{t_module - t_direct:.1f})")
    assert t_direct > 0 and t_op > 0


# -------------------------------------------------------------- QuantLinear
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LAYERS))
def test_quantlinear_forward(name: str, device: str) -> None:
    m = make(name, device)
    assert m.device.type == device
    for lead in ((1,), (300,), (2, 5)):
        x = x_for(name, *lead, device=device)
        check(m(x), name, x)
    with torch.no_grad():
        check(m(x), name, x)
    with torch.inference_mode():
        y = m(x)
        assert y.is_inference()
        check(y, name, x)


def test_quantlinear_from_qmatrix_not_owned() -> None:
    q = exl2.loaders.qmatrix_from_tensors(LAYERS["exl2"])
    m = QuantLinear(q)
    x = x_for("exl2", 3)
    check(m(x), "exl2", x)
    h = m.handle
    del m
    gc.collect()
    assert h not in compat.registry  # finalizer dropped the registry entry...
    assert not q.closed  # ...but did not close a QMatrix it was given
    q.close()


def test_quantlinear_owned_closed_on_collect() -> None:
    m = make("gptq")
    q, h = m.qmatrix, m.handle
    del m
    gc.collect()
    assert h not in compat.registry and q.closed


def test_quantlinear_close() -> None:
    m = make("exl2")
    m.close()
    assert m.qmatrix.closed and m.handle not in compat.registry
    assert "closed" in repr(m)
    with pytest.raises(ValueError, match="not a live exl2 handle"):
        m(x_for("exl2", 1))


def test_quantlinear_extra_repr() -> None:
    r = repr(make("exl2"))
    assert r.startswith("QuantLinear(") and "format=exl2" in r and "in_features=256" in r
    assert "out_features=128" in r and "bits_per_weight=" in r and "bias=True" in r
    assert "format=gptq" in repr(make("gptq"))


def test_quantlinear_properties() -> None:
    m = make("gptq")
    assert (m.in_features, m.out_features, m.format) == (128, 256, "gptq")
    assert m.bits_per_weight == m.qmatrix.bits_per_weight
    assert list(m.parameters()) == [] and list(m.buffers()) == []


def test_quantlinear_input_errors() -> None:
    m = make("exl2")
    with pytest.raises(TypeError, match="x: expected dtype torch.float16"):
        m(x_for("exl2", 2).float())
    with pytest.raises(ValueError, match=r"x: expected shape \[..., 256\]"):
        m(torch.zeros(2, 100, dtype=torch.half))


def test_quantlinear_from_state_dict() -> None:
    lay = LAYERS["exl2"]
    sd = {f"model.proj.{k}": torch.from_numpy(np.array(v)) for k, v in lay.items() if k != "weight"}
    m = QuantLinear.from_state_dict(sd, "model.proj")
    x = x_for("exl2", 4)
    check(m(x), "exl2", x)
    g = {f"p.{k}": v for k, v in LAYERS["gptq_v2"].items()}
    m2 = QuantLinear.from_state_dict(g, "p", format="gptq", zero_format="v2")
    x2 = x_for("gptq_v2", 4)
    check(m2(x2), "gptq_v2", x2)
    with pytest.raises(ValueError, match="format: expected 'exl2', 'gptq', 'awq' or None"):
        QuantLinear.from_state_dict(g, "p", format="marlin")
    awq = R.random_awq(np.random.default_rng(6), 128, 64, group_size=32, bias=True)
    a = {f"p.{k}": torch.from_numpy(v) for k, v in awq.items() if k != "weight"}
    m3 = QuantLinear.from_state_dict(a, "p")  # AWQ told from GPTQ by shape
    assert m3.qmatrix.format == "awq"
    x3 = torch.from_numpy(np.random.default_rng(7).standard_normal((3, 128)).astype(np.float16))
    y3 = m3(x3).numpy().astype(np.float64)
    ref = R.gemm(x3.numpy(), awq["weight"], awq["bias"])
    assert np.abs(y3 - ref).max() / np.abs(ref).max() < 2e-3


def test_quantlinear_from_checkpoint_files() -> None:
    data = Path(__file__).parent / "data"
    m = QuantLinear.from_state_dict(data / "tiny_gptq", "model.layers.0.mlp.down_proj")
    assert (m.format, m.in_features, m.out_features) == ("gptq", 256, 64)
    m = QuantLinear.from_state_dict(data / "tiny_exl2.safetensors", "lm_head")
    assert (m.format, m.in_features, m.out_features) == ("exl2", 64, 128)


def test_quantlinear_constructor_errors() -> None:
    with pytest.raises(TypeError, match="qmatrix: expected an exl2.QMatrix"):
        QuantLinear(LAYERS["exl2"])  # type: ignore[arg-type]
    q = exl2.loaders.qmatrix_from_tensors(LAYERS["exl2"])
    with pytest.raises(ValueError, match="source: holds gptq tensors"):
        QuantLinear(q, source=LAYERS["gptq"])
    with pytest.raises(ValueError, match="zero_format"):
        QuantLinear(q, zero_format="v9")
    q.close()


def test_quantlinear_to_same_device_and_dtype_casts() -> None:
    m = make("gptq")
    q, h = m.qmatrix, m.handle
    assert m.to("cpu") is m and m.qmatrix is q and m.handle == h  # no rebuild
    m.half()
    m.float()
    m.to(torch.bfloat16)
    assert m.qmatrix is q  # dtype casts do not touch the quantized weight
    x = x_for("gptq", 2)
    check(m(x), "gptq", x)
    with pytest.raises(ValueError, match="expected a cpu or cuda device"):
        m.to("meta")


def test_quantlinear_source_is_a_copy() -> None:
    t = {k: torch.from_numpy(np.array(v)) for k, v in LAYERS["gptq"].items()}
    m = QuantLinear.from_tensors(t)
    for v in t.values():
        v.zero_()
    assert torch.equal(m.state_dict()["qweight"], torch.from_numpy(LAYERS["gptq"]["qweight"]))


def test_state_dict_roundtrip() -> None:
    class Block(torch.nn.Module):
        def __init__(self, a: str, b: str) -> None:
            super().__init__()
            self.proj = make(a)
            self.other = make(b)

    src = Block("exl2", "gptq")
    sd = src.state_dict()
    assert "proj.q_weight" in sd and "other.qweight" in sd and "other.g_idx" in sd
    assert all(v.device.type == "cpu" for v in sd.values())

    # A second block with different weights of the same shapes takes them over.
    dst = Block("exl2", "gptq")
    rng = np.random.default_rng(99)
    new = R.random_gptq(rng, 128, 256, group_size=32, act_order=True, bias=True)
    dst.other = QuantLinear.from_tensors(new)
    dst.load_state_dict(sd)
    x = x_for("gptq", 3)
    check(dst.other(x), "gptq", x)
    assert torch.equal(dst.other(x), src.other(x))

    missing = {k: v for k, v in sd.items() if k != "other.scales"}
    with pytest.raises(RuntimeError, match="Missing key.*other.scales"):
        dst.load_state_dict(missing)
    with pytest.raises(RuntimeError, match="Unexpected key.*other.bogus"):
        dst.load_state_dict({**sd, "other.bogus": torch.zeros(1)})
    bad = dict(sd)
    bad["other.scales"] = bad["other.scales"][:1]
    with pytest.raises(RuntimeError, match="scales"):
        dst.load_state_dict(bad)


def test_from_state_dict_honours_format() -> None:
    rng = np.random.default_rng(12)
    awq = {f"p.{k}": torch.from_numpy(v) for k, v in R.random_awq(rng, 128, 64, group_size=32).items()
           if k != "weight"}
    gptq = {f"p.{k}": torch.from_numpy(v) for k, v in R.random_gptq(rng, 128, 64, group_size=32).items()
            if k not in ("weight", "g_idx")}
    with pytest.raises(ValueError, match=r"p\.qweight: .* is AWQ packing"):
        QuantLinear.from_state_dict(awq, "p", format="gptq")
    with pytest.raises(ValueError, match=r"p\.qweight: .* is GPTQ packing"):
        QuantLinear.from_state_dict(gptq, "p", format="awq")
    assert QuantLinear.from_state_dict(awq, "p", format="awq").format == "awq"
    assert QuantLinear.from_state_dict(gptq, "p", format="gptq").format == "gptq"
    with pytest.raises(ValueError, match="qweight: .* is AWQ packing"):
        QuantLinear.from_tensors({k[2:]: v for k, v in awq.items()}, format="gptq")


def test_load_state_dict_checks_format() -> None:
    rng = np.random.default_rng(13)
    awq_t = {k: v for k, v in R.random_awq(rng, 128, 64, group_size=32, bias=True).items() if k != "weight"}
    gptq_t = {k: v for k, v in R.random_gptq(rng, 128, 64, group_size=32, act_order=True, bias=True).items()
              if k != "weight"}
    m_awq, m_gptq = QuantLinear.from_tensors(awq_t), QuantLinear.from_tensors(gptq_t)
    assert m_awq.format == "awq" and m_gptq.format == "gptq"
    assert set(m_awq.state_dict()) == {"qweight", "qzeros", "scales", "bias"}
    # An AWQ module does not turn into GPTQ (nor the other way round).
    gsd, asd = m_gptq.state_dict(), m_awq.state_dict()
    for m, sd, fmt in ((m_awq, gsd, "gptq"), (m_gptq, asd, "awq")):
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=f"holds {fmt} tensors, but this QuantLinear is {m.format}"):
                m.load_state_dict(sd, strict=strict)
    assert m_awq.format == "awq" and m_gptq.format == "gptq"
    # AWQ has no g_idx: strict loading rejects it, non-strict reports it and loads the rest.
    with pytest.raises(RuntimeError, match="Unexpected key.*g_idx"):
        m_awq.load_state_dict({**asd, "g_idx": torch.zeros(128, dtype=torch.int32)})
    r = m_awq.load_state_dict({**asd, "g_idx": torch.zeros(128, dtype=torch.int32)}, strict=False)
    assert r.unexpected_keys == ["g_idx"] and r.missing_keys == [] and m_awq.format == "awq"
    assert set(m_awq.state_dict()) == {"qweight", "qzeros", "scales", "bias"}
    # An AWQ source passed to the constructor keeps AWQ's names only.
    q = exl2.loaders.qmatrix_from_tensors(awq_t)
    m = QuantLinear(q, source={**awq_t, "g_idx": np.zeros(128, dtype=np.int32)})
    assert set(m.state_dict()) == {"qweight", "qzeros", "scales", "bias"}
    q.close()


def test_without_source() -> None:
    m = make("exl2", keep_source=False)
    assert m.state_dict() == {}
    x = x_for("exl2", 2)
    check(m(x), "exl2", x)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(LAYERS))
def test_quantlinear_to_cuda_and_back(name: str) -> None:
    m = make(name)
    x = x_for(name, 5)
    y_cpu = m(x)
    old = m.qmatrix
    m.cuda()
    assert m.device.type == "cuda" and old.closed and m.qmatrix is not old
    check(m(x.cuda()), name, x)
    m.to("cpu")
    assert torch.equal(m(x), y_cpu)


@pytest.mark.cuda
def test_quantlinear_pinned_without_source() -> None:
    m = make("exl2", keep_source=False)
    with pytest.raises(RuntimeError, match="built without its source"):
        m.cuda()
    q = exl2.loaders.qmatrix_from_tensors(LAYERS["exl2"])
    with pytest.raises(RuntimeError, match="built without its source"):
        QuantLinear(q).to("cuda")
