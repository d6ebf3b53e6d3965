"""The Hopper wgmma kernel on the tc stream layout (src/cuda/tc_wgmma.cu), for m >= 33 on
compute capability 9.0 (from m = 17 with EXL2_CUDA_WGMMA_MIN_ROWS, a
measurement knob used here to give its 64-row tiles partial tiles too).

Every bit width, act-order, short chunks, column counts that are not multiples of 32, bias,
both tile heights, split-K clusters of any size and single blocks, stream-K (the 64-row tiles'
blocks sharing all tiles' chunks), the 64-row tiles' deep ring, bit-exact weights through the kernel, determinism, graph
capture, bfloat16 and agreement with the fp64 reference.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import pytest
import torch

import exl2
import exl2.qmatrix as qmatrix_module
from exl2 import reference as R
from layers import build, expected, random_x, rel_err
from test_tc_kernel import (LAYERS, _kernels_run, _ran, check_bf16_within_bound, check_deterministic_and_graph_safe,
                            check_one_hot_rows)

pytestmark = pytest.mark.cuda
TOL = 2e-3


def _wgmma_built() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and any(
        a.startswith("90a") for a in exl2.cuda_architectures().split())


@pytest.fixture(autouse=True)
def _wgmma_on(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _wgmma_built():
        pytest.skip("the wgmma kernel needs compute capability 9.0 and a build for 90a")
    monkeypatch.delenv("EXL2_CUDA_TC", raising=False)  # the default on compute capability 9.0: the tc layout
    # Every m native (not the Python API's dense route).
    monkeypatch.setattr(qmatrix_module, "_TC_MAX_ROWS", 1 << 30)


# The kernel shapes (EXL2_CUDA_WGMMA_CFG, tc_wgmma.cu): rows per block and 4-warp groups (0-2),
# the warp-specialised kernel with 128 or 256 rows (3, 4, tc_wgmma_ws.cu) and with 192 rows and
# two producer warpgroups (5); None: the default choice by m.
CONFIGS = [None, "0", "1", "2", "3", "4", "5"]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_wgmma_results_match(name: str, cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXL2_CUDA_WGMMA_MIN_ROWS", "17")
    if cfg is not None:
        monkeypatch.setenv("EXL2_CUDA_WGMMA_CFG", cfg)
    layer = LAYERS[name]
    K = layer["weight"].shape[0]
    rng = np.random.default_rng(11)
    with build(layer, "cuda") as q:
        for m in [17, 33, 64, 65, 100, 128, 129, 200, 300]:
            x = torch.from_numpy(random_x(rng, (m, K))).cuda()
            y = q.matmul(x)
            assert rel_err(y, expected(layer, x.cpu().numpy())) < TOL, f"m={m}"


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_wgmma_one_hot_rows_give_the_weights_bit_for_bit(name: str, dtype: torch.dtype, cfg,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """x = rows of the identity: output row i must equal dequantize(dtype)[k_i, :] exactly, for
    every kernel shape, with full and partial row tiles."""
    monkeypatch.setenv("EXL2_CUDA_WGMMA_MIN_ROWS", "17")
    if cfg is not None:
        monkeypatch.setenv("EXL2_CUDA_WGMMA_CFG", cfg)
    # (slices of 16 rows or fewer are below the wgmma kernel's range even with the knob)
    check_one_hot_rows(LAYERS[name], dtype, (64, 128, 200), min_rows=17)


@pytest.mark.parametrize("m,cfg", [(33, None), (65, None), (256, None), (256, "4"), (300, "3"), (400, "5")])
def test_wgmma_deterministic_and_graph_safe(m: int, cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    if cfg is not None:  # the warp-specialised kernel (its TMA descriptor is made per call)
        monkeypatch.setenv("EXL2_CUDA_WGMMA_CFG", cfg)
    layer = LAYERS["exl2_mixed"]
    x = torch.from_numpy(random_x(np.random.default_rng(2), (m, 1024))).cuda()
    with build(layer, "cuda") as q:
        check_deterministic_and_graph_safe(q, x, repeats=10)


@pytest.mark.parametrize("name", ["gptq_act_order", "gptq3_act_order", "awq"])
def test_wgmma_results_do_not_depend_on_the_ring_lookahead(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wgmma kernels copy a layer's weights as far ahead as its chunk windows allow (4 ring steps
    for these layers' 4-bit codes in groups of 64, 5 for 3- and 4-bit codes in groups of 128; 2 for
    8-bit codes); EXL2_CUDA_RING_AHEAD=2 at construction (a measurement knob) gives the mma.sync
    kernel's fixed lookahead. The outputs must be the same bits either way, for split-K clusters
    (m = 33, 64), 128-row tiles and the warp-specialised kernel (m = 200)."""
    monkeypatch.setenv("EXL2_CUDA_WGMMA_MIN_ROWS", "17")
    layer = LAYERS[name]
    rng = np.random.default_rng(12)
    xs = [torch.from_numpy(random_x(rng, (m, layer["weight"].shape[0]))).cuda() for m in (33, 64, 128, 200)]
    with build(layer, "cuda") as q:
        deep = [q.matmul(x) for x in xs]
    monkeypatch.setenv("EXL2_CUDA_RING_AHEAD", "2")
    with build(layer, "cuda") as q:
        shallow = [q.matmul(x) for x in xs]
    for x, a, b in zip(xs, deep, shallow):
        assert torch.equal(a, b), f"m={x.shape[0]}"
        assert rel_err(a, expected(layer, x.cpu().numpy())) < TOL, f"m={x.shape[0]}"


def _ran_deep_ring(kernels: set) -> bool:
    """Whether `kernels` hold the 64-row wgmma kernel with the deep ring (its last template argument
    16384 ring words: "tc_wgmma_kernel<64, 1, __half, false, 16384>" or "..., (int)16384>")."""
    return any(re.search(r"tc_wgmma_kernel<.*(\(int\))?16384>", k) for k in kernels)


@pytest.mark.parametrize("name", ["gptq8", "gptq_act_order", "exl2_mixed", "awq"])
def test_wgmma_deep_ring_gives_the_same_bits(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 64-row tiles' deep ring (64 KB, 8 steps further ahead; by default on layers whose 4-chunk
    windows leave the usual ring 3 steps or fewer ahead, i.e. 8-bit codes) only changes how far ahead
    the weights are copied: EXL2_CUDA_WGMMA_DEEP=1 / 0 at construction forces it on / off, and the
    outputs must be the same bits either way, for partial and full row tiles, with and without
    split-K (the knob EXL2_CUDA_WGMMA_SPLIT=3), and agree with fp64."""
    monkeypatch.setenv("EXL2_CUDA_WGMMA_MIN_ROWS", "17")
    layer = LAYERS[name]
    K = layer["weight"].shape[0]
    rng = np.random.default_rng(16)
    xs = [torch.from_numpy(random_x(rng, (m, K))).cuda() for m in (17, 33, 64)]
    outs = {}
    for split in (None, "3"):
        if split is not None:
            monkeypatch.setenv("EXL2_CUDA_WGMMA_SPLIT", split)
        for deep in ("0", "1"):
            monkeypatch.setenv("EXL2_CUDA_WGMMA_DEEP", deep)
            with build(layer, "cuda") as q:
                kernels = _kernels_run(lambda: q.matmul(xs[-1]))
                if kernels:  # (compute-sanitizer excludes the CUDA profiler)
                    assert _ran_deep_ring(kernels) == (deep == "1"), sorted(kernels)
                outs[split, deep] = [q.matmul(x) for x in xs]
                if deep == "1":
                    check_deterministic_and_graph_safe(q, xs[1], repeats=3)
    for split in (None, "3"):
        for x, a, b in zip(xs, outs[split, "0"], outs[split, "1"]):
            assert torch.equal(a, b), f"m={x.shape[0]} split={split}"
            assert rel_err(b, expected(layer, x.cpu().numpy())) < TOL, f"m={x.shape[0]} split={split}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_wgmma_deep_ring_by_default_on_large_8bit_layers(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the knob the 64-row tiles take the deep ring on an 8-bit layer of many column tiles
    (two per multiprocessor: no split-K beyond 2), and the usual ring on an 8-bit layer of 32 tiles
    (split 8) and on a 4-bit layer; through the deep ring one-hot rows still give dequantize(dtype)'s
    rows bit for bit."""
    monkeypatch.delenv("EXL2_CUDA_WGMMA_DEEP", raising=False)
    rng = np.random.default_rng(17)
    wide = 128 * 2 * torch.cuda.get_device_properties(0).multi_processor_count
    large8 = R.random_gptq(rng, 256, wide, group_size=128, act_order=True, bits=8, bias=True)
    for layer, deep in ((large8, True), (R.random_gptq(rng, 256, 4096, group_size=128, bits=8), False),
                        (R.random_gptq(rng, 256, wide, group_size=128, bits=4), False)):
        x = torch.from_numpy(random_x(rng, (64, 256))).to("cuda", dtype)
        with build(layer, "cuda") as q:
            kernels = _kernels_run(lambda: q.matmul(x))
            if kernels:  # (compute-sanitizer excludes the CUDA profiler)
                assert _ran_deep_ring(kernels) == deep, (layer["qweight"].shape, sorted(kernels))
    check_one_hot_rows(large8, dtype, (33, 64), min_rows=33)


@pytest.mark.parametrize("split", ["3", "5", "7"])
@pytest.mark.parametrize("name", ["exl2_mixed", "gptq_act_order", "awq"])
def test_wgmma_any_split_of_the_cluster_reduction(name: str, split: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wgmma kernel's split-K takes any number of cluster blocks (the layer's choice is the
    largest that fits one wave, 3 on some layers); EXL2_CUDA_WGMMA_SPLIT (a measurement knob)
    forces one: splits that divide neither the chunks nor the partial tile's 64 x 128 or 128 x 128
    elements must still sum and store every element, deterministically (64-row tiles at m = 33, 64,
    128-row ones at m = 100)."""
    monkeypatch.setenv("EXL2_CUDA_WGMMA_SPLIT", split)
    monkeypatch.setenv("EXL2_CUDA_WGMMA_MIN_ROWS", "17")
    layer = LAYERS[name]
    rng = np.random.default_rng(13)
    with build(layer, "cuda") as q:
        for m in (33, 64, 100):
            x = torch.from_numpy(random_x(rng, (m, layer["weight"].shape[0]))).cuda()
            y = q.matmul(x)
            assert torch.isfinite(y).all() and rel_err(y, expected(layer, x.cpu().numpy())) < TOL, f"m={m}"
            assert torch.equal(y, q.matmul(x)), f"m={m}: not deterministic"


@pytest.mark.parametrize("sk", ["1", "3"])
@pytest.mark.parametrize("name", ["exl2_mixed", "gptq_act_order", "awq", "gptq8"])
def test_wgmma_stream_k_matches(name: str, sk: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stream-K (the 64-row tiles on layers with more column tiles than multiprocessors; forced
    here with EXL2_CUDA_WGMMA_SK = blocks per multiprocessor, a measurement knob): blocks share the
    tiles' chunks evenly, so on these small layers most tiles are summed from many blocks' partial
    tiles (one chunk a block where the blocks outnumber the chunks). Every element must be stored,
    agree with fp64, be deterministic, and survive graph capture."""
    monkeypatch.setenv("EXL2_CUDA_WGMMA_SK", sk)
    monkeypatch.setenv("EXL2_CUDA_WGMMA_MIN_ROWS", "17")
    layer = LAYERS[name]
    K = layer["weight"].shape[0]
    rng = np.random.default_rng(14)
    with build(layer, "cuda") as q:
        for m in (17, 33, 64):
            x = torch.from_numpy(random_x(rng, (m, K))).cuda()
            kernels = _kernels_run(lambda: q.matmul(x))
            if kernels:  # (compute-sanitizer excludes the CUDA profiler)
                assert _ran_stream_k(kernels), sorted(kernels)
            y = q.matmul(x)
            assert torch.isfinite(y).all() and rel_err(y, expected(layer, x.cpu().numpy())) < TOL, f"m={m}"
        check_deterministic_and_graph_safe(q, x, repeats=5)


@pytest.mark.parametrize("sk", [None, "3"])
def test_wgmma_on_a_layer_of_more_tiles_than_multiprocessors(
    sk: Optional[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer of 2.3 64-row tiles per multiprocessor, where no split fits one wave: by default one
    tile per block (stream-K measured slower once the activation tiles came by TMA); with
    EXL2_CUDA_WGMMA_SK=3, stream-K, whose partial tiles of blocks that cross tile boundaries must add
    up. Both for m = 33 and 64, against fp64 and an identical second call."""
    if sk is not None:
        monkeypatch.setenv("EXL2_CUDA_WGMMA_SK", sk)
    props = torch.cuda.get_device_properties(0)
    rng = np.random.default_rng(15)
    n = 128 * (props.multi_processor_count * 7 // 3)
    layer = R.random_gptq(rng, 1024, n, group_size=128, act_order=True, bias=True)
    with build(layer, "cuda") as q:
        for m in (33, 64):
            x = torch.from_numpy(random_x(rng, (m, 1024))).cuda()
            kernels = _kernels_run(lambda: q.matmul(x))
            if kernels:
                assert _ran_stream_k(kernels) == (sk is not None), sorted(kernels)
            y = q.matmul(x)
            assert rel_err(y, expected(layer, x.cpu().numpy())) < TOL, f"m={m}"
            assert torch.equal(y, q.matmul(x)), f"m={m}: not deterministic"


def _ran_stream_k(kernels: set) -> bool:
    """Whether `kernels` hold the wgmma kernel's stream-K instantiation (its fourth template argument
    true, before the ring's size: "tc_wgmma_kernel<64, 1, __half, true, 8192>" or "..., (bool)1,
    (int)8192>" depending on the demangler)."""
    return any(re.search(r"tc_wgmma_kernel<.*(true|\(bool\)1), (\(int\))?\d+>", k) for k in kernels)


def _ws_rows(kernels: set) -> Optional[int]:
    """The row count R of the warp-specialised kernel among `kernels` (its first template argument,
    "tc_wgmma_ws_kernel<192, ..." or "<(int)192, ..." depending on the demangler), else None."""
    for k in kernels:
        found = re.search(r"tc_wgmma_ws_kernel<(?:\(int\))?(\d+)", k)
        if found:
            return int(found.group(1))
    return None


def test_wgmma_large_layer_runs_the_kernel() -> None:
    """A layer with more tiles than one wave holds (no split), an odd tile count and act-order: the
    register-operand kernel at m = 128, the warp-specialised one from m = 129, with the 192-row
    shape where it pads m to fewer rows than the 256-row one (m = 129, 192, 257, 384)."""
    rng = np.random.default_rng(3)
    layer = R.random_gptq(rng, 2048, 128 * 301, group_size=128, act_order=True, bias=True)
    with build(layer, "cuda") as q:
        for m, rows in ((128, None), (129, 192), (192, 192), (193, 256), (256, 256), (257, 192), (384, 192),
                        (385, 256), (512, 256)):
            x = torch.from_numpy(random_x(rng, (m, 2048))).cuda()
            kernels = _kernels_run(lambda: q.matmul(x))
            if kernels:  # (compute-sanitizer excludes the CUDA profiler)
                kernel = "tc_wgmma_ws_kernel" if rows else "tc_wgmma_kernel"
                assert _ran(kernels, kernel) and not _ran(kernels, "tc_gemm_kernel"), sorted(kernels)
                assert _ws_rows(kernels) == rows, (m, sorted(kernels))
            assert rel_err(q.matmul(x), expected(layer, x.cpu().numpy())) < TOL, f"m={m}"


@pytest.mark.parametrize("name", ["exl2_mixed", "gptq_act_order", "gptq8", "awq"])
def test_wgmma_bfloat16_within_bound(name: str) -> None:
    layer = LAYERS[name]
    with build(layer, "cuda") as q:
        check_bf16_within_bound(q, layer, [65, 128, 200])


def test_wgmma_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a wgmma GPU (the default tc layout): m <= 32 runs the mma.sync tc kernel, 33 <= m <= 128 the
    wgmma kernel on a layer of at least 2^25 weights, 129 <= m <= 512 the warp-specialised wgmma
    kernel where its blocks fill the GPU (else the dense route from m = 129), larger m the Python
    API's dense route (dequantize + cuBLAS); on a smaller layer the dense route from m = 65 on."""
    monkeypatch.setattr(qmatrix_module, "_TC_MAX_ROWS", 64)
    rng = np.random.default_rng(6)
    large = R.random_gptq(rng, 2048, 16384, group_size=128)  # 128 tiles
    few_tiles = R.random_gptq(rng, 8192, 4096, group_size=128)  # 32 tiles
    small = LAYERS["gptq_act_order"]
    for layer, cases in ((large, ((32, "tc_gemm_kernel"), (33, "tc_wgmma_kernel"), (65, "tc_wgmma_kernel"),
                                  (128, "tc_wgmma_kernel"), (129, "tc_wgmma_ws_kernel"), (256, "tc_wgmma_ws_kernel"),
                                  (512, "tc_wgmma_ws_kernel"), (513, None))),
                         (few_tiles, ((128, "tc_wgmma_kernel"), (129, None))),
                         (small, ((64, "tc_wgmma_kernel"), (65, None)))):
        K = layer["weight"].shape[0]
        with build(layer, "cuda") as q:
            for m, kernel in cases:
                x = torch.from_numpy(random_x(np.random.default_rng(m), (m, K))).cuda()
                kernels = _kernels_run(lambda: q.matmul(x))
                if not kernels:  # (compute-sanitizer excludes the CUDA profiler)
                    pytest.skip("the CUDA profiler recorded no kernels")
                tc = {k for k in kernels if "tc_gemm_kernel" in k or "tc_wgmma" in k}
                where = f"{K}x{q.out_features} m={m}"
                if kernel is None:
                    assert not tc, f"{where}: expected the dense route, ran {sorted(kernels)}"
                else:
                    assert tc and all(kernel in k for k in tc), f"{where}: expected {kernel}, ran {sorted(kernels)}"
                assert rel_err(q.matmul(x), expected(layer, x.cpu().numpy())) < TOL, where
