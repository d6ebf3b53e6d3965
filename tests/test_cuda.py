"""CUDA backend behaviour: m buckets, determinism, streams, graph capture, agreement
with the CPU backend, construction from device tensors, device errors."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import exl2
from exl2 import reference as R
from layers import bits_equal, build, capture_graph, expected, native_gemm, random_x, rel_err

pytestmark = pytest.mark.cuda
TOL = 2e-3


@pytest.fixture(scope="module")
def layers():
    rng = np.random.default_rng(100)
    return {
        "exl2": R.random_exl2(rng, 1024, 256, bits=[(8, 64), (6, 64), (5, 96), (4, 416), (3, 256), (2, 128)], bias=True),
        "gptq": R.random_gptq(rng, 1024, 256, group_size=64, act_order=True, bias=True),
    }


@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_every_m_bucket_boundary(layers, fmt: str) -> None:
    layer = layers[fmt]
    rng = np.random.default_rng(1)
    with build(layer, "cuda") as q:
        for m in [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000]:
            x = random_x(rng, (m, 1024))
            y = q.matmul(torch.from_numpy(x).cuda())
            assert rel_err(y, expected(layer, x)) < TOL, f"m={m}"


def test_large_m() -> None:
    rng = np.random.default_rng(2)
    layer = R.random_gptq(rng, 512, 128, group_size=128)
    x = random_x(rng, (8192, 512))
    with build(layer, "cuda") as q:
        assert rel_err(q.matmul(torch.from_numpy(x).cuda()), expected(layer, x)) < TOL


@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_cpu_and_cuda_agree(layers, fmt: str) -> None:
    layer = layers[fmt]
    x = torch.from_numpy(random_x(np.random.default_rng(3), (5, 1024)))
    with build(layer, "cpu") as qc, build(layer, "cuda") as qg:
        assert torch.equal(qc.dequantize(), qg.dequantize().cpu())
        yc, yg = qc.matmul(x), qg.matmul(x.cuda()).cpu()
        # both accumulate in fp32 but in different orders: within fp16 rounding of each other
        assert (yc.float() - yg.float()).abs().max() <= 2e-3 * yc.float().abs().max()


@pytest.mark.parametrize("m", [1, 8, 33, 300])
def test_deterministic_50_repeats(layers, m: int) -> None:
    x = torch.from_numpy(random_x(np.random.default_rng(4), (m, 1024))).cuda()
    with build(layers["exl2"], "cuda") as q:
        first = q.matmul(x)
        for _ in range(50):
            assert torch.equal(q.matmul(x), first)


def test_side_stream(layers) -> None:
    x = torch.from_numpy(random_x(np.random.default_rng(5), (16, 1024))).cuda()
    with build(layers["gptq"], "cuda") as q:
        ref = q.matmul(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            y = q.matmul(x)
            w = q.dequantize()
        torch.cuda.current_stream().wait_stream(s)
        assert torch.equal(y, ref)
        assert bits_equal(w, layers["gptq"]["weight"])


@pytest.mark.parametrize("m", [1, 4, 64])
def test_graph_capture_and_replay(layers, m: int) -> None:
    with build(layers["exl2"], "cuda") as q:
        x = torch.zeros((m, 1024), dtype=torch.float16, device="cuda")
        out = torch.empty((m, 256), dtype=torch.float16, device="cuda")
        g = capture_graph(lambda: q.matmul(x, out=out))
        rng = np.random.default_rng(6)
        for _ in range(3):
            xn = random_x(rng, (m, 1024))
            x.copy_(torch.from_numpy(xn))
            out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert rel_err(out, expected(layers["exl2"], xn)) < TOL
            assert torch.equal(out, q.matmul(x))


@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_build_from_device_tensors_matches_host(layers, fmt: str) -> None:
    layer = layers[fmt]
    with build(layer, "cuda") as qd, build(layer, "cpu") as qh:
        assert qd.device.type == "cuda"
        assert torch.equal(qd.dequantize().cpu(), qh.dequantize())
    # host tensors, CUDA target
    host = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in layer.items() if k != "weight"}
    if fmt == "exl2":
        q = exl2.QMatrix.from_exl2(host["q_weight"], host["q_invperm"], host["q_scale"], host["q_scale_max"],
                                   host["q_groups"], bias=host["bias"], device="cuda")
    else:
        q = exl2.QMatrix.from_gptq(host["qweight"], host["qzeros"], host["scales"], g_idx=host["g_idx"],
                                   bias=host["bias"], device="cuda")
    with q:
        assert q.device == torch.device("cuda", 0)
        assert bits_equal(q.dequantize(), layer["weight"])


def test_golden_error_level() -> None:
    """State our error on the golden cases (the reference lands at 0.6e-3 .. 1.2e-3)."""
    from layers import load_golden

    worst = 0.0
    for case in {**load_golden("exl2"), **load_golden("gptq")}.values():
        with build(case, "cuda") as q:
            worst = max(worst, rel_err(q.matmul(torch.from_numpy(case["x"]).cuda()), case["y_ref"].astype(np.float64)))
    print(f"worst golden relative error on CUDA: {worst:.2e}")
    assert worst <= 1.2e-3


def test_x_on_other_device_raises(layers) -> None:
    with build(layers["gptq"], "cuda") as q:
        with pytest.raises(ValueError, match="x: expected a tensor on cuda:0"):
            q.matmul(torch.zeros((1, 1024), dtype=torch.float16))


def test_no_such_device() -> None:
    layer = R.random_gptq(np.random.default_rng(7), 64, 8, group_size=32)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        build(layer, f"cuda:{torch.cuda.device_count()}", as_torch=False)


def test_large_layer_construction_under_a_second() -> None:
    K, N = 8192, 28672
    g = torch.Generator(device="cuda").manual_seed(0)
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device="cuda", generator=g)
    qzeros = torch.randint(-2**31, 2**31 - 1, (K // 128, N // 8), dtype=torch.int32, device="cuda", generator=g)
    scales = (torch.rand((K // 128, N), device="cuda", generator=g) * 0.01).half()
    g_idx = (torch.randperm(K, device="cuda", generator=g) // 128).int()
    exl2.QMatrix.from_gptq(qweight, qzeros, scales, g_idx=g_idx).close()  # warm-up (context, kernels)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    q = exl2.QMatrix.from_gptq(qweight, qzeros, scales, g_idx=g_idx)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"8192x28672 act-order GPTQ construction from device tensors: {dt * 1e3:.0f} ms")
    assert dt < 1.0
    x = torch.randn((1, K), dtype=torch.float16, device="cuda")
    ref = x.float() @ q.dequantize().float()
    assert ((q.matmul(x).float() - ref).abs().max() / ref.abs().max()).item() < 2e-3
    q.close()


def test_freeing_memory_returns_to_baseline() -> None:
    layer = R.random_gptq(np.random.default_rng(8), 4096, 4096, group_size=128)
    torch.cuda.synchronize()
    base = torch.cuda.mem_get_info()[0]
    for _ in range(3):
        q = build(layer, "cuda", as_torch=False)
        assert q.nbytes > 4096 * 4096 // 2
        q.close()
    torch.cuda.synchronize()
    assert abs(torch.cuda.mem_get_info()[0] - base) < 4 * 2**20


@pytest.mark.parametrize("m", [17, 64, 256, 300, 1000])
def test_native_kernel_large_m(layers, m: int) -> None:
    """The library's own fused kernel (what C++ users get) at sizes where the Python API
    takes the dense path."""
    layer = layers["exl2"]
    x = random_x(np.random.default_rng(9), (m, 1024))
    with build(layer, "cuda") as q:
        xt = torch.from_numpy(x).cuda()
        out = native_gemm(q, xt)
        assert rel_err(out, expected(layer, x)) < TOL
        assert torch.equal(native_gemm(q, xt), out)


@pytest.mark.parametrize("max_split", ["1", "2", "4", "8", "bogus"])
def test_max_split_knob(monkeypatch, max_split: str) -> None:
    """EXL2_CUDA_MAX_SPLIT (read at construction) caps the cluster split-K factor: every cap
    gives correct, run-to-run identical results on the layer's kernels (compute capability 9.0:
    the mma.sync tensor-core kernel at m = 1, 5, 12, the wgmma kernel at m = 40; the canonical
    layout's GEMV and fused kernels elsewhere); other values mean the default."""
    rng = np.random.default_rng(31)
    # 128 chunks; 8 tiles of 128 columns, so that the tensor-core kernels' split rule (H100) takes
    # different splits under different caps (the default: clusters of 16), not 1 for every cap.
    layer = R.random_gptq(rng, 4096, 1024, group_size=128, act_order=True, bias=True)
    monkeypatch.setenv("EXL2_CUDA_MAX_SPLIT", max_split)
    with build(layer, "cuda") as q:
        for m in (1, 5, 12, 40):
            x = random_x(rng, (m, 4096))
            xt = torch.from_numpy(x).cuda()
            outs = [native_gemm(q, xt) for _ in range(2)]
            assert rel_err(outs[0], expected(layer, x)) < TOL, m
            assert torch.equal(outs[0], outs[1])


def test_stream_handle_is_the_current_stream() -> None:
    """The raw-handle fast path names the same stream as torch.cuda.current_stream, also on
    a side stream and for a device that is not current."""
    from exl2._convert import stream_handle

    dev = torch.device("cuda", 0)
    assert stream_handle(dev) == torch.cuda.current_stream(dev).cuda_stream
    side = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(side):
        assert stream_handle(dev) == side.cuda_stream != 0
    assert stream_handle(torch.device("cpu")) == 0
