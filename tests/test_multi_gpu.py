"""Multi-GPU behaviour: any device of a multi-GPU host, and tensor-parallel shards.

Tests marked ``multi_gpu`` (the ``skipif`` below) need two CUDA devices usable by
torch and by exl2; with fewer they are skipped:

- a QMatrix built on cuda:1 while cuda:0 is current: construction (from CPU,
  cuda:1 and cuda:0 tensors), dequantize, matmul (GEMV and dense paths, ``out=``),
  ``exl2.compat`` and ``torch.ops.exl2.gemm`` run on cuda:1, bit-identical to the
  single-GPU run, with nothing allocated on cuda:0 (torch's counters and the
  driver's free memory of both devices); in a fresh process, no CUDA context is
  ever created on cuda:0;
- the work runs on cuda:1's *current* stream, also when that stream is a side
  stream and cuda:0 is the current device (ordering checked with a busy stream,
  and by CUDA graph capture/replay);
- inputs on the wrong device raise ValueError naming the argument and both devices;
- two devices used from several threads at once (each thread with the *other*
  device current) give the serial results;
- ``QuantLinear.to("cuda:1")`` moves a layer between GPUs;
- tensor parallelism: ``tests/mgpu_tp_worker.py`` under ``torch.distributed.run``
  with NCCL, one process per GPU (column and act-order-aware row shards, gathered
  and all-reduced, against the unsplit result).

What runs without two GPUs: the device-guard logic on the CPU (a meta tensor is
"another device" for a CPU QMatrix), ``device="cuda:1"`` with fewer than two
devices, the device parsing helpers, the thread harness on the CPU, and the whole
tensor-parallel worker with the gloo backend on the CPU (2 and 3 processes, plus
negative controls showing that a wrong shard makes it fail). With one GPU the
``cuda``-marked tests also run: CPU inputs to a CUDA QMatrix, and the TP worker
with CUDA compute on one shared GPU (gloo collectives).
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch

import exl2
from exl2 import reference as R
from exl2._convert import native_view, parse_device, stream_handle
from exl2.compat import NONE_TENSOR, free_q_matrix, gemm_half_q_half, make_q_matrix, register_qmatrix, \
    unregister_qmatrix
from exl2.loaders import qmatrix_from_tensors
from exl2.nn import QuantLinear

sys.path.insert(0, str(Path(__file__).parent))
from layers import bits_equal, build, expected, random_x, rel_err  # noqa: E402

TOL = 2e-3
WORKER = Path(__file__).with_name("mgpu_tp_worker.py")
FORMAT_KEYS = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "q_perm",
               "qweight", "qzeros", "scales", "g_idx", "bias")


# torch.cuda.device_count() asks NVML and initialises no CUDA state in this process (so a later
# fork stays usable); a CPU-only build of exl2 counts no devices.
N_GPUS = torch.cuda.device_count() if exl2.built_with_cuda() else 0
multi_gpu = pytest.mark.skipif(
    N_GPUS < 2,
    reason=f"multi_gpu: needs 2 CUDA devices usable by torch and exl2 (torch.cuda.device_count() = "
           f"{torch.cuda.device_count()}, exl2 built with CUDA: {exl2.built_with_cuda()})",
)
D0, D1 = torch.device("cuda", 0), torch.device("cuda", 1)
SHAPES = [(1,), (5,), (8,), (9,), (40,), (2, 3)]  # leading dims of x: GEMV (m <= 12) and dense (m >= 13) paths


@pytest.fixture(scope="module")
def layers() -> Dict[str, Dict[str, np.ndarray]]:
    rng = np.random.default_rng(2024)
    return {
        "exl2": R.random_exl2(rng, 1024, 256, bits=[(8, 64), (6, 64), (5, 96), (4, 416), (3, 256), (2, 128)],
                              bias=True),
        "gptq": R.random_gptq(rng, 1024, 256, group_size=64, act_order=True, bias=True),
    }


def _torch_dict(layer: Dict[str, np.ndarray], device: Any) -> Dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)).to(device) for k, v in layer.items() if k in FORMAT_KEYS}


def _xs(layer: Dict[str, np.ndarray], seed: int = 0) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    K = layer["weight"].shape[0]
    return [random_x(rng, lead + (K,)) for lead in SHAPES]


def _compat_args(layer: Dict[str, np.ndarray], fmt: str, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """make_q_matrix's 11 arguments as text-generation-inference / LoRAX pass them, on ``device``."""
    t = _torch_dict(layer, device)
    K, N = layer["weight"].shape
    temp_dq = torch.empty((K * N,), dtype=torch.float16, device=device)
    if fmt == "exl2":
        return (t["q_weight"], t["q_perm"].short(), t["q_invperm"].short(), t["q_scale"], t["q_scale_max"] / 256,
                t["q_groups"], NONE_TENSOR, NONE_TENSOR, NONE_TENSOR, NONE_TENSOR, temp_dq)
    q_perm = torch.empty((K,), dtype=torch.int16, device=device)
    q_invperm = torch.empty((K,), dtype=torch.int16, device=device)
    return (t["qweight"], q_perm, q_invperm, NONE_TENSOR, NONE_TENSOR, NONE_TENSOR, NONE_TENSOR,
            t["qzeros"], t["scales"], t["g_idx"], temp_dq)


def _mem(index: int) -> Dict[str, int]:
    torch.cuda.synchronize(index)
    return {
        "memory_allocated": torch.cuda.memory_allocated(index),
        "memory_reserved": torch.cuda.memory_reserved(index),
        "mem_get_info free": torch.cuda.mem_get_info(index)[0],
    }


def _assert_untouched(before: Dict[str, int], after: Dict[str, int], what: str) -> None:
    assert after["memory_allocated"] == before["memory_allocated"], f"{what}: torch allocated on cuda:0"
    assert after["memory_reserved"] == before["memory_reserved"], f"{what}: torch reserved memory on cuda:0"
    # The driver's view catches what torch does not count (cudaMalloc by the library, a new
    # context); it moves in pages, and the driver may sub-allocate small buffers inside
    # pages it already holds, so only a drift of a page or more is an allocation here.
    # (Stray contexts are checked exactly in test_using_only_cuda1_creates_no_context_on_cuda0.)
    drift = before["mem_get_info free"] - after["mem_get_info free"]
    assert drift < 2 * 2**20, f"{what}: cuda:0 lost {drift} bytes of free memory (driver view)"


def _same_model() -> bool:
    return (torch.cuda.get_device_name(0) == torch.cuda.get_device_name(1)
            and torch.cuda.get_device_capability(0) == torch.cuda.get_device_capability(1))


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Identical to the single-GPU run (same kernels on the same GPU model); within fp16
    rounding when the two GPUs differ (cuBLAS may pick other algorithms)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, what
    if _same_model():
        assert torch.equal(got, want), f"{what}: differs from the single-GPU run"
    else:
        scale = max(want.float().abs().max().item(), 1e-30)
        assert (got.float() - want.float()).abs().max().item() <= TOL * scale, what


# =========================================================================================
# Runs anywhere: device guard logic on the CPU, missing devices, device parsing
# =========================================================================================
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_input_on_another_device_raises_cpu(fmt: str) -> None:
    """The guard logic without a GPU: for a CPU QMatrix a meta tensor is on another device."""
    rng = np.random.default_rng(1)
    layer = (R.random_exl2(rng, 128, 32, bits=4, group_size=32) if fmt == "exl2"
             else R.random_gptq(rng, 128, 32, group_size=32, act_order=True))
    x = torch.from_numpy(random_x(rng, (3, 128)))
    meta_x = torch.empty((3, 128), dtype=torch.float16, device="meta")
    with build(layer, "cpu") as q:
        with pytest.raises(ValueError,
                           match=r"^x: expected a tensor on cpu \(the QMatrix's device\), got one on meta"):
            q.matmul(meta_x)
        with pytest.raises(ValueError, match=r"^out: expected a tensor on cpu, got one on meta"):
            q.matmul(x, out=torch.empty((3, 32), dtype=torch.float16, device="meta"))
        h = register_qmatrix(q)
        try:
            c = torch.empty((3, 32), dtype=torch.float16)
            a_msg = r"^a: expected a tensor on cpu \(the layer's device\), got one on meta"
            with pytest.raises(ValueError, match=a_msg):
                gemm_half_q_half(meta_x, h, c, False)
            with pytest.raises(ValueError, match=a_msg.replace("^a", "^c")):
                gemm_half_q_half(x, h, torch.empty((3, 32), dtype=torch.float16, device="meta"), False)
            # and nothing was half-done: the right call still works
            gemm_half_q_half(x, h, c, False)
            assert rel_err(c, expected(layer, x.numpy())) < TOL
        finally:
            unregister_qmatrix(h)


@pytest.mark.skipif(N_GPUS >= 2, reason="cuda:1 exists here (the multi_gpu tests use it)")
@pytest.mark.parametrize("spec", ["cuda:1", "device_object"])
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_missing_cuda1_raises_runtime_error(fmt: str, spec: str) -> None:
    """device='cuda:1' with fewer than two devices: exl2's own clear RuntimeError, raised before
    torch touches the device (not torch's "not compiled with CUDA" / "invalid device ordinal")."""
    if exl2.cuda_device_count() >= 2:
        pytest.skip("exl2 sees a cuda:1 (torch does not)")
    layer = (R.random_exl2(np.random.default_rng(2), 64, 16, bits=4, group_size=32) if fmt == "exl2"
             else R.random_gptq(np.random.default_rng(2), 64, 16, group_size=32))
    device = "cuda:1" if spec == "cuda:1" else torch.device("cuda", 1)
    want = r"no CUDA device" if exl2.built_with_cuda() else r"built without CUDA support"
    for source in ("numpy", "torch"):
        tensors = layer if source == "numpy" else _torch_dict(layer, "cpu")
        with pytest.raises(RuntimeError, match=want) as info:
            qmatrix_from_tensors(tensors, device=device)
        assert isinstance(info.value, exl2.UnsupportedError)
        if exl2.built_with_cuda() and torch.cuda.device_count() == 1:
            assert "no CUDA device with index 1 (1 CUDA device(s) visible)" in str(info.value)
    with pytest.raises(RuntimeError, match=want):
        QuantLinear.from_tensors(layer, device=device)


def test_device_helpers_keep_the_index() -> None:
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    assert parse_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    # an index-less "cuda" means the current device (cuda:0 without CUDA)
    want = torch.cuda.current_device() if torch.cuda.is_available() else 0
    assert parse_device("cuda") == torch.device("cuda", want)
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device: expected a cpu or cuda device"):
        parse_device("meta")
    t = torch.zeros(2)
    assert native_view(t) is t and stream_handle(torch.device("cpu")) == 0


# =========================================================================================
# One GPU: CPU tensors given to a CUDA QMatrix
# =========================================================================================
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_cpu_inputs_to_cuda_qmatrix_raise(layers, fmt: str) -> None:
    layer = layers[fmt]
    x_cpu = torch.from_numpy(random_x(np.random.default_rng(3), (2, 1024)))
    with build(layer, "cuda:0") as q:
        dev = str(q.device)
        with pytest.raises(ValueError,
                           match=rf"^x: expected a tensor on {dev} \(the QMatrix's device\), got one on cpu"):
            q.matmul(x_cpu)
        with pytest.raises(ValueError, match=rf"^out: expected a tensor on {dev}, got one on cpu"):
            q.matmul(x_cpu.to(q.device), out=torch.empty((2, 256), dtype=torch.float16))
        h = register_qmatrix(q)
        try:
            a_msg = rf"^a: expected a tensor on {dev} \(the layer's device\), got one on cpu"
            with pytest.raises(ValueError, match=a_msg):
                gemm_half_q_half(x_cpu, h, torch.empty((2, 256), dtype=torch.float16, device=q.device), False)
            with pytest.raises(ValueError, match=a_msg.replace("^a", "^c")):
                gemm_half_q_half(x_cpu.to(q.device), h, torch.empty((2, 256), dtype=torch.float16), False)
            with pytest.raises(ValueError, match=rf"^x: expected a tensor on {dev}"):
                torch.ops.exl2.gemm(x_cpu, h)
        finally:
            unregister_qmatrix(h)


# =========================================================================================
# Two GPUs: a layer on cuda:1 while cuda:0 is current
# =========================================================================================
def _run_all(fmt: str, tensors: Dict[str, torch.Tensor], device: Any,
             xs: List[torch.Tensor], outs: List[torch.Tensor], compat_args: Tuple[torch.Tensor, ...],
             cs: List[torch.Tensor], current: int) -> Dict[str, Any]:
    """Everything the Python API does with a layer on ``device`` (inputs allocated by the caller,
    so that memory checks see only what the library allocates). Checks that every result lives
    on the layer's device and that the current device is never changed."""
    target = parse_device(device if device is not None else tensors["q_weight" if fmt == "exl2" else "qweight"].device)

    def here(t: torch.Tensor, what: str) -> torch.Tensor:
        assert t.device == target, f"{what} on {t.device}, expected {target}"
        assert torch.cuda.current_device() == current, f"{what}: the current device was changed"
        return t

    res: Dict[str, Any] = {}
    q = qmatrix_from_tensors(tensors, device=device)
    try:
        assert q.device == target
        here(torch.empty(0, device=target), "construction")
        res["w"] = here(q.dequantize(), "dequantize")
        res["y"] = [here(q.matmul(x), f"matmul x{list(x.shape)}") for x in xs]
        for x, o in zip(xs, outs):
            assert here(q.matmul(x, out=o), "matmul(out=)") is o
        res["out"] = outs
        h = register_qmatrix(q)
        try:
            res["op"] = [here(torch.ops.exl2.gemm(x, h), "torch.ops.exl2.gemm") for x in xs]
        finally:
            unregister_qmatrix(h)
        hc = make_q_matrix(*compat_args)
        try:
            here(torch.empty(0, device=target), "make_q_matrix")
            for x, c in zip(xs, cs):
                gemm_half_q_half(x.reshape(-1, x.shape[-1]), hc, c, False)
                here(c, "gemm_half_q_half")
            res["compat"] = cs
            if fmt == "gptq":
                res["perm"] = [compat_args[1], compat_args[2]]
        finally:
            free_q_matrix(hc)
    finally:
        q.close()
    torch.cuda.synchronize(target)
    return res


def _prepare(layer: Dict[str, np.ndarray], fmt: str, xs_np: List[np.ndarray], device: torch.device):
    N = layer["weight"].shape[1]
    xs = [torch.from_numpy(x).to(device) for x in xs_np]
    outs = [torch.full(x.shape[:-1] + (N,), float("nan"), dtype=torch.float16, device=device) for x in xs]
    cs = [torch.full((int(np.prod(x.shape[:-1])), N), float("nan"), dtype=torch.float16, device=device) for x in xs]
    return xs, outs, _compat_args(layer, fmt, device), cs


@pytest.mark.cuda
@multi_gpu
@pytest.mark.parametrize("source", ["cpu", "cuda:1", "cuda:0"])
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_layer_on_cuda1_while_cuda0_current(layers, fmt: str, source: str) -> None:
    """Construction (from CPU / cuda:1 / cuda:0 tensors), dequantize, matmul, out=, the custom
    op and exl2.compat on cuda:1 with cuda:0 current: same results as the single-GPU run on
    cuda:0, nothing allocated on cuda:0, current device untouched."""
    layer = layers[fmt]
    xs_np = _xs(layer)
    torch.cuda.set_device(0)
    # The single-GPU run: everything on cuda:0, cuda:0 current.
    single = _run_all(fmt, _torch_dict(layer, D0), None, *_prepare(layer, fmt, xs_np, D0), current=0)
    assert bits_equal(single["w"], layer["weight"])
    for x, y in zip(xs_np, single["y"]):
        assert rel_err(y, expected(layer, x)) < TOL

    # Inputs of the cuda:1 run, allocated before the baseline.
    tensors = _torch_dict(layer, source)
    device = None if source == "cuda:1" else "cuda:1"  # None: inferred from the tensors
    prepared = _prepare(layer, fmt, xs_np, D1)
    torch.cuda.mem_get_info(1)  # cuda:1's context exists before the baseline
    gc.collect()
    before0 = _mem(0)
    assert torch.cuda.current_device() == 0
    multi = _run_all(fmt, tensors, device, *prepared, current=0)
    after0 = _mem(0)
    _assert_untouched(before0, after0, f"layer on cuda:1 built from {source} tensors")
    assert torch.cuda.current_device() == 0

    _assert_same(multi["w"], single["w"], "dequantize")
    for key in ("y", "out", "op", "compat"):
        for i, (a, b) in enumerate(zip(multi[key], single[key])):
            _assert_same(a, b, f"{key} x{list(xs_np[i].shape)}")
    if fmt == "gptq":
        for a, b in zip(multi["perm"], single["perm"]):
            assert torch.equal(a.cpu(), b.cpu()), "make_q_matrix q_perm/q_invperm outputs differ on cuda:1"


@pytest.mark.cuda
@multi_gpu
def test_layer_memory_lives_on_cuda1_only() -> None:
    """A 4096x4096 GPTQ layer built and used on cuda:1 with cuda:0 current: cuda:1's memory
    (outside torch's cache) grows by nbytes and returns on close(); cuda:0 does not change."""
    K = N = 4096
    g = torch.Generator().manual_seed(0)
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, generator=g)
    qzeros = torch.randint(-2**31, 2**31 - 1, (K // 128, N // 8), dtype=torch.int32, generator=g)
    scales = (torch.rand((K // 128, N), generator=g) * 0.01).half()
    g_idx = (torch.randperm(K, generator=g) // 128).int()
    x = [torch.randn((m, K), generator=g).half().to(D1) for m in (1, 16)]
    torch.cuda.set_device(0)
    # Warm-up on cuda:1 (context, lazily loaded kernels, cuBLAS), then the baselines.
    warm_g_idx = (torch.randperm(512, generator=g) // 256).int()  # act-order, 2 groups
    with exl2.QMatrix.from_gptq(qweight[:64, :512].contiguous(), qzeros[:2, :64].contiguous(),
                                scales[:2, :512].contiguous(), g_idx=warm_g_idx, device="cuda:1") as warm:
        for m in (1, 16):
            warm.matmul(torch.zeros((m, 512), dtype=torch.float16, device=D1))
        warm.dequantize()
    single_x = [t.to(D0) for t in x]
    with exl2.QMatrix.from_gptq(qweight, qzeros, scales, g_idx=g_idx, device="cuda:0") as q0:
        single = [q0.matmul(t).cpu() for t in single_x]
    gc.collect()

    def native_used(index: int) -> int:  # device memory not counted by torch's caching allocator
        torch.cuda.synchronize(index)
        free, total = torch.cuda.mem_get_info(index)
        return total - free - torch.cuda.memory_reserved(index)

    before0, base1 = _mem(0), native_used(1)
    q = exl2.QMatrix.from_gptq(qweight, qzeros, scales, g_idx=g_idx, device="cuda:1")
    assert q.device == D1 and torch.cuda.current_device() == 0
    grown = native_used(1) - base1
    assert grown >= q.nbytes - 2 * 2**20, f"cuda:1 grew by {grown} bytes, the layer owns {q.nbytes}"
    ys = [q.matmul(t) for t in x]
    for y, want in zip(ys, single):
        _assert_same(y, want, "4096x4096 matmul on cuda:1")
    q.close()
    del ys
    assert native_used(1) - base1 < 8 * 2**20, "cuda:1 memory not returned by close()"
    _assert_untouched(before0, _mem(0), "4096x4096 layer on cuda:1")


_FRESH_PROCESS = r"""
import gc
import sys
import threading

import numpy as np
import torch

mode = sys.argv[1]
has_ctx = getattr(torch._C, "_cuda_hasPrimaryContext", None)
if has_ctx is None:
    print("SKIP: this torch has no torch._C._cuda_hasPrimaryContext"); sys.exit(3)
d1 = torch.device("cuda", 1)


def check(step):
    if has_ctx(0):
        print(f"FAIL: a CUDA context appeared on cuda:0 after: {step}"); sys.exit(1)


def in_new_thread(fn):
    # A new host thread starts with device 0 current (and no context made current).
    errors = []
    def run():
        try:
            fn()
        except BaseException as exc:
            errors.append(repr(exc))
    th = threading.Thread(target=run)
    th.start()
    th.join()
    if errors:
        print(f"ERROR in thread: {errors[0]}"); sys.exit(2)


if mode == "control":
    # What exl2's Python layer does with torch, without exl2: must leave cuda:0 alone.
    def torch_ops():
        with torch.cuda.device(d1):
            torch.cuda.current_stream(d1).cuda_stream
            a = torch.randn(64, 64, device=d1).half()
            a.__dlpack__(stream=-1)
        torch.empty((8, 8), dtype=torch.float16, device=d1)
        (a @ a).sum().item()
        s = torch.cuda.Stream(device=d1)
        with torch.cuda.stream(s):
            b = a @ a
        torch.cuda.synchronize(d1)
        b.cpu()
    torch_ops(); check("torch alone on cuda:1")
    in_new_thread(torch_ops); check("torch alone on cuda:1, from a new thread")
    print("OK"); sys.exit(0)

import exl2
from exl2 import reference as R
from exl2.compat import NONE_TENSOR, free_q_matrix, gemm_half_q_half, make_q_matrix, register_qmatrix
check("import exl2")
layer = R.random_gptq(np.random.default_rng(0), 256, 64, group_size=64, act_order=True, bias=True)
t = {k: torch.from_numpy(v) for k, v in layer.items() if k != "weight"}


def build(**kw):
    return exl2.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx=t["g_idx"], bias=t["bias"], **kw)


if mode == "first_use":
    # exl2 does the first CUDA work of the process; cuda:0 is the (uninitialised) current device.
    q = build(device="cuda:1")
    check("QMatrix.from_gptq(CPU tensors, device='cuda:1') as the first CUDA work of the process")
    t1 = {k: v.to(d1) for k, v in t.items()}
    q2 = exl2.QMatrix.from_gptq(t1["qweight"], t1["qzeros"], t1["scales"], g_idx=t1["g_idx"], bias=t1["bias"])
    check("QMatrix.from_gptq(cuda:1 tensors)")
    x1 = torch.randn((1, 256)).half().to(d1)
    x16 = torch.randn((16, 256)).half().to(d1)
    q.matmul(x1); check("matmul m=1")
    q.matmul(x16); check("matmul m=16 (dense path)")
    q.dequantize(); check("dequantize")
    s = torch.cuda.Stream(device=d1)
    with torch.cuda.stream(s):
        q.matmul(x1)
    check("matmul on a side stream of cuda:1")
    h = register_qmatrix(q)
    torch.ops.exl2.gemm(x1, h); check("torch.ops.exl2.gemm")
    K, N = 256, 64
    perm = torch.empty((K,), dtype=torch.int16, device=d1)
    invperm = torch.empty((K,), dtype=torch.int16, device=d1)
    hc = make_q_matrix(t1["qweight"], perm, invperm, NONE_TENSOR, NONE_TENSOR, NONE_TENSOR, NONE_TENSOR,
                       t1["qzeros"], t1["scales"], t1["g_idx"],
                       torch.empty((K * N,), dtype=torch.float16, device=d1))
    c = torch.empty((1, N), dtype=torch.float16, device=d1)
    gemm_half_q_half(x1, hc, c, False); check("exl2.compat make_q_matrix + gemm_half_q_half")
    torch.cuda.synchronize(d1)
    free_q_matrix(hc); q.close(); q2.close(); check("close()")
    q3 = build(device="cuda:1")
    del q3, q, q2
    gc.collect(); check("garbage collection of a QMatrix")
elif mode == "other_thread":
    # cuda:1 current in the main thread; new threads start with device 0 current.
    torch.cuda.set_device(1); check("torch.cuda.set_device(1)")
    q = build(device="cuda:1")
    x1 = torch.randn((1, 256)).half().to(d1)
    x16 = torch.randn((16, 256)).half().to(d1)
    q.matmul(x1); torch.cuda.synchronize(d1); check("build and matmul with cuda:1 current")

    def use():
        q.matmul(x1); q.matmul(x16); q.dequantize(); torch.cuda.synchronize(d1)

    in_new_thread(use); check("matmul / dequantize from a new thread")
    in_new_thread(lambda: build(device="cuda:1").close()); check("build + close() in a new thread")
    in_new_thread(q.close); check("close() from a new thread")
    box = [build(device="cuda:1")]

    def drop():
        box.clear(); gc.collect()

    in_new_thread(drop); check("a QMatrix garbage-collected on a new thread")
else:
    print(f"unknown mode {mode}"); sys.exit(2)
print("OK"); sys.exit(0)
"""


def _fresh(mode: str) -> subprocess.CompletedProcess:
    pkg_root = str(Path(exl2.__file__).resolve().parent.parent)  # the exl2 this test imported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [pkg_root] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ else []))}
    return subprocess.run([sys.executable, "-c", _FRESH_PROCESS, mode], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.cuda
@multi_gpu
@pytest.mark.parametrize("mode", ["first_use", "other_thread"])
def test_using_only_cuda1_creates_no_context_on_cuda0(mode: str) -> None:
    """A process that only ever uses cuda:1 must not create a CUDA context (hundreds of MiB)
    on cuda:0: neither when exl2 does its first CUDA work while the uninitialised cuda:0 is
    current, nor from threads (which start with device 0 current), nor when freeing. The
    control (torch alone) tells whether torch itself is to blame."""
    control = _fresh("control")
    if control.returncode in (1, 3):
        pytest.skip(f"cannot check with this torch: {control.stdout.strip()} {control.stderr[-500:]}")
    assert control.returncode == 0, control.stdout + control.stderr
    p = _fresh(mode)
    if p.returncode == 3:
        pytest.skip(p.stdout.strip())
    assert p.returncode == 0, (
        f"{p.stdout.strip()}\n{p.stderr[-3000:]}\n(since CUDA 12, cudaSetDevice(0) creates the primary context of "
        "device 0 when it has none: e.g. a native DeviceGuard restoring device 0 after switching to device 1)")


# ----------------------------------------------------------------------------- streams
@pytest.mark.cuda
@multi_gpu
@pytest.mark.parametrize("current", [0, 1])
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_work_runs_on_the_current_stream_of_cuda1(layers, fmt: str, current: int) -> None:
    """A side stream s1 of cuda:1 is busy (sleep), then writes x; matmul / compat / the custom op
    / dequantize issued right after (with cuda:``current`` the current device) must wait for x,
    i.e. run on s1, and must not block the host."""
    layer = layers[fmt]
    xs_np = _xs(layer, seed=4)
    torch.cuda.set_device(0)
    q = build(layer, "cuda:1")
    h = register_qmatrix(q)
    try:
        src = [torch.from_numpy(x).to(D1) for x in xs_np]
        ref_y = [q.matmul(s) for s in src]
        ref_w = q.dequantize()
        dst = [torch.zeros_like(s) for s in src]
        cs = [torch.full((int(np.prod(s.shape[:-1])), q.out_features), float("nan"), dtype=torch.float16,
                         device=D1) for s in src]
        s1 = torch.cuda.Stream(device=D1)
        torch.cuda.synchronize(1)
        with torch.cuda.stream(s1):  # warm-up on s1: lazy kernel loading, cuBLAS handle/workspace
            for s, c in zip(src, cs):
                q.matmul(s)
                torch.ops.exl2.gemm(s, h)
                gemm_half_q_half(s.reshape(-1, s.shape[-1]), h, c, False)
            q.dequantize()
        torch.cuda.synchronize(1)
        with torch.cuda.stream(s1):
            torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU time on s1
            for d, s in zip(dst, src):
                d.copy_(s)  # x becomes valid only after the sleep, in s1's order
            with torch.cuda.device(current):
                assert torch.cuda.current_device() == current
                assert torch.cuda.current_stream(D1) == s1
                ys = [q.matmul(d) for d in dst]
                ops = [torch.ops.exl2.gemm(d, h) for d in dst]
                for d, c in zip(dst, cs):
                    gemm_half_q_half(d.reshape(-1, d.shape[-1]), h, c, False)
                w = q.dequantize()
                assert torch.cuda.current_device() == current
            still_busy = not s1.query()
        s1.synchronize()
        assert still_busy, "a call synchronised with s1 (or the sleep was too short): the host was blocked"
        assert bits_equal(w, layer["weight"]) and torch.equal(w, ref_w)
        for i, (y, op, c, r) in enumerate(zip(ys, ops, cs, ref_y)):
            what = f"x{list(xs_np[i].shape)}"
            assert torch.equal(y, r), f"matmul {what}: ran before s1 wrote x (not on cuda:1's current stream?)"
            assert torch.equal(op, r), f"torch.ops.exl2.gemm {what}: not on cuda:1's current stream"
            assert torch.equal(c, r.reshape(c.shape)), f"gemm_half_q_half {what}: not on cuda:1's current stream"
    finally:
        unregister_qmatrix(h)
        q.close()


@pytest.mark.cuda
@multi_gpu
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_graph_capture_on_cuda1_with_cuda0_current(layers, fmt: str) -> None:
    """Captured on a side stream of cuda:1 while cuda:0 is current: every launch (GEMV, dense
    path, dequantize) must land in the graph, i.e. on that stream; replays recompute."""
    layer = layers[fmt]
    torch.cuda.set_device(0)
    q = build(layer, "cuda:1")
    try:
        xs = [torch.zeros((m, 1024), dtype=torch.float16, device=D1) for m in (1, 9)]
        s1 = torch.cuda.Stream(device=D1)
        torch.cuda.synchronize(1)
        with torch.cuda.stream(s1):
            for _ in range(2):
                [q.matmul(x) for x in xs]
                q.dequantize()
        torch.cuda.synchronize(1)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s1):
            with torch.cuda.device(0):
                ys = [q.matmul(x) for x in xs]
                w = q.dequantize()
        assert torch.cuda.current_device() == 0
        assert all(y.device == D1 for y in ys) and w.device == D1
        rng = np.random.default_rng(6)
        for _ in range(3):
            xn = [random_x(rng, tuple(x.shape)) for x in xs]
            for x, v in zip(xs, xn):
                x.copy_(torch.from_numpy(v))
            for y in ys:
                y.fill_(float("nan"))
            w.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize(1)
            assert bits_equal(w, layer["weight"]), "dequantize was not captured on cuda:1's current stream"
            for x, v, y in zip(xs, xn, ys):
                assert rel_err(y, expected(layer, v)) < TOL, f"m={x.shape[0]}: not captured / wrong stream"
                assert torch.equal(y, q.matmul(x))
    finally:
        torch.cuda.synchronize(1)
        q.close()


# ----------------------------------------------------------------------- wrong device
@pytest.mark.cuda
@multi_gpu
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_inputs_on_the_wrong_gpu_raise(layers, fmt: str) -> None:
    layer = layers[fmt]
    x = torch.from_numpy(random_x(np.random.default_rng(7), (2, 1024)))
    with build(layer, "cuda:0") as q0, build(layer, "cuda:1") as q1:
        for q, other in ((q0, D1), (q1, D0)):
            here = q.device
            xo, xh = x.to(other), x.to(here)
            with pytest.raises(ValueError, match=rf"^x: expected a tensor on {here} \(the QMatrix's device\), "
                                                 rf"got one on {other}"):
                q.matmul(xo)
            with pytest.raises(ValueError, match=rf"^out: expected a tensor on {here}, got one on {other}"):
                q.matmul(xh, out=torch.empty((2, 256), dtype=torch.float16, device=other))
            h = register_qmatrix(q)
            try:
                with pytest.raises(ValueError, match=rf"^a: expected a tensor on {here} \(the layer's device\), "
                                                     rf"got one on {other}"):
                    gemm_half_q_half(xo, h, torch.empty((2, 256), dtype=torch.float16, device=here), False)
                with pytest.raises(ValueError, match=rf"^c: expected a tensor on {here} \(the layer's device\), "
                                                     rf"got one on {other}"):
                    gemm_half_q_half(xh, h, torch.empty((2, 256), dtype=torch.float16, device=other), False)
                with pytest.raises(ValueError, match=rf"^x: expected a tensor on {here}"):
                    torch.ops.exl2.gemm(xo, h)
                with pytest.raises(ValueError, match=rf"^x: expected a tensor on {here}"):
                    QuantLinear(q)(xo)
            finally:
                unregister_qmatrix(h)
            # still usable, and right
            assert rel_err(q.matmul(xh), expected(layer, x.numpy())) < TOL


@pytest.mark.cuda
@multi_gpu
def test_quantlinear_moves_between_gpus(layers) -> None:
    layer = layers["gptq"]
    x = torch.from_numpy(random_x(np.random.default_rng(8), (3, 1024)))
    torch.cuda.set_device(0)
    lin = QuantLinear.from_tensors(layer, device="cuda:0")
    y0 = lin(x.to(D0))
    assert lin.to("cuda:1") is lin and lin.device == D1 and torch.cuda.current_device() == 0
    _assert_same(lin(x.to(D1)), y0, "QuantLinear after .to('cuda:1')")
    with pytest.raises(ValueError, match="x: expected a tensor on cuda:1"):
        lin(x.to(D0))
    lin.cuda(0)
    assert lin.device == D0 and torch.equal(lin(x.to(D0)), y0)


# ---------------------------------------------------------------------------- threads
def _threads_on_devices(layers: Dict[str, Dict[str, np.ndarray]], devices: List[str], iters: int,
                        thread_context: Callable[[int, torch.device], Any]) -> None:
    """len(devices) * 2 threads: thread t builds its own QMatrix (format t // n_dev % 2) on
    devices[t % n_dev] from shared read-only CPU tensors, then runs matmul (GEMV and dense
    sizes) and dequantize ``iters`` times inside ``thread_context(t, device)``; all at once
    (barrier). Results must equal the serial run on the same device."""
    fmts = ["exl2", "gptq"]
    shared = {f: _torch_dict(layers[f], "cpu") for f in fmts}
    xs_np = {f: [random_x(np.random.default_rng(9), (m, 1024)) for m in (1, 6, 33)] for f in fmts}
    n_dev = len(devices)
    plan = [(t, torch.device(devices[t % n_dev]), fmts[(t // n_dev) % 2]) for t in range(2 * n_dev)]
    serial: Dict[Tuple[str, str], Tuple[torch.Tensor, List[torch.Tensor]]] = {}
    for _, dev, fmt in plan:
        if (str(dev), fmt) not in serial:
            with qmatrix_from_tensors(shared[fmt], device=dev) as q:
                serial[(str(dev), fmt)] = (q.dequantize().cpu(), [q.matmul(torch.from_numpy(x).to(dev)).cpu()
                                                                  for x in xs_np[fmt]])
    barrier = threading.Barrier(len(plan))
    errors: List[str] = []
    results: Dict[int, List[Tuple[torch.Tensor, List[torch.Tensor]]]] = {}

    def work(t: int, dev: torch.device, fmt: str) -> None:
        try:
            with thread_context(t, dev):
                xs = [torch.from_numpy(x).to(dev) for x in xs_np[fmt]]
                barrier.wait(timeout=120)
                q = qmatrix_from_tensors(shared[fmt], device=dev)  # concurrent construction too
                with q:
                    assert q.device == dev
                    runs = [(q.dequantize(), [q.matmul(x) for x in xs]) for _ in range(iters)]
                    if dev.type == "cuda":
                        torch.cuda.current_stream(dev).synchronize()
                    results[t] = [(w.cpu(), [y.cpu() for y in ys]) for w, ys in runs]
        except BaseException as exc:  # noqa: BLE001 - reported below
            barrier.abort()
            errors.append(f"thread {t} ({fmt} on {dev}): {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=p) for p in plan]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, "\n".join(errors)
    for t, dev, fmt in plan:
        w_ref, ys_ref = serial[(str(dev), fmt)]
        for it, (w, ys) in enumerate(results[t]):
            assert torch.equal(w, w_ref), f"thread {t} ({fmt} on {dev}) iteration {it}: dequantize differs"
            for y, r in zip(ys, ys_ref):
                assert torch.equal(y, r), f"thread {t} ({fmt} on {dev}) iteration {it}: matmul m={y.shape[0]} differs"


def test_thread_harness_on_cpu(layers) -> None:
    """The two-device thread test's harness, with two CPU 'devices' (runs without a GPU)."""
    _threads_on_devices(layers, ["cpu", "cpu"], iters=2, thread_context=lambda t, dev: contextlib.nullcontext())


@pytest.mark.cuda
@multi_gpu
def test_two_devices_used_from_threads_at_once(layers) -> None:
    """4 threads, 2 per GPU; each makes the *other* GPU current; threads 0-1 use their own side
    stream of their layer's device, threads 2-3 its default stream."""

    @contextlib.contextmanager
    def ctx(t: int, dev: torch.device):
        other = 1 - dev.index
        with contextlib.ExitStack() as stack:
            if t < 2:
                stack.enter_context(torch.cuda.stream(torch.cuda.Stream(device=dev)))
            stack.enter_context(torch.cuda.device(other))
            assert torch.cuda.current_device() == other
            yield

    _threads_on_devices(layers, ["cuda:0", "cuda:1"], iters=20, thread_context=ctx)


# ================================================================ tensor parallelism
def _run_tp(nproc: int, backend: str, device: str, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    pkg_root = str(Path(exl2.__file__).resolve().parent.parent)  # the exl2 this test imported
    env = {
        **os.environ,
        "NCCL_NVLS_ENABLE": "0",  # NVLink SHARP multicast: off on the lender's machines
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([pkg_root] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ else [])),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max-restarts=0", str(WORKER), "--backend", backend, "--device", device, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_tp_ok(p: subprocess.CompletedProcess, nproc: int) -> None:
    log = f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
    assert p.returncode == 0, log
    assert f"TP OK: world {nproc}" in p.stdout, log


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("nproc", [2, 3])
def test_tensor_parallel_gloo_cpu(nproc: int) -> None:
    """The TP worker's shard / gather / reduce arithmetic, all on the CPU (runs anywhere)."""
    _assert_tp_ok(_run_tp(nproc, "gloo", "cpu"), nproc)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("corrupt", ["column", "row"])
def test_tensor_parallel_worker_fails_on_a_wrong_shard(corrupt: str) -> None:
    """Negative control: a perturbed partial result on the last rank must make every rank exit 1."""
    p = _run_tp(2, "gloo", "cpu", "--corrupt", corrupt)
    assert p.returncode != 0, p.stdout + p.stderr
    assert f"{corrupt}-parallel" in p.stderr and "TP OK" not in p.stdout, p.stdout + p.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_tensor_parallel_cuda_compute_gloo() -> None:
    """CUDA compute, collectives through gloo on CPU copies: runs with one GPU (both ranks share it)."""
    _assert_tp_ok(_run_tp(2, "gloo", "cuda"), 2)


@pytest.mark.cuda
@multi_gpu
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_nccl_available(),
                    reason="torch.distributed with NCCL is not available")
def test_tensor_parallel_nccl_two_gpus() -> None:
    """Column and row (act-order) shards on cuda:0 and cuda:1, one process each, combined with
    NCCL all_gather / all_reduce(SUM): equal to the unsplit result within fp16 rounding."""
    _assert_tp_ok(_run_tp(2, "nccl", "cuda"), 2)
