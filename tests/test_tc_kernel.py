"""The tensor-core stream layout and its mma.sync kernel (src/cuda/tc_gemm.cu) and dequantize
(tc_dequant.cu): the default layout of CUDA layers on compute capability 9.0+, and on 8.0+ with
EXL2_CUDA_TC=1, which these tests set (EXL2_CUDA_TC=0 keeps the canonical layout).

Its weight layout is checked on the host by the CTest exl2_test_tc_layout; these tests
run the kernel itself (CUDA, compute capability 8.0+): every bit width, act-order,
short chunks, column counts that are not multiples of 32, bias, every m it serves,
determinism, graph capture, and agreement with the canonical layout's kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import exl2
import exl2.qmatrix as qmatrix_module
from exl2 import reference as R
from layers import build, capture_graph, expected, native_gemm, random_x, rel_err

pytestmark = pytest.mark.cuda
TOL = 2e-3
TC_MAX_ROWS = 64


@pytest.fixture(autouse=True)
def _tc_on(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tc kernel needs compute capability 8.0+")
    monkeypatch.setenv("EXL2_CUDA_TC", "1")  # the tc layout on any compute capability 8.0+
    # Every m up to 64 native (the Python API's routing, test_tc_routes_by_m).
    monkeypatch.setattr(qmatrix_module, "_TC_MAX_ROWS", TC_MAX_ROWS)
    # The mma.sync kernel for every m up to 64 (on compute capability 9.0 the wgmma kernel takes
    # m >= 33 by default; tests/test_tc_wgmma.py covers it).
    monkeypatch.setenv("EXL2_CUDA_WGMMA_MIN_ROWS", "65")


def _layers():
    rng = np.random.default_rng(700)
    return {
        "exl2_mixed": R.random_exl2(rng, 1024, 256, bits=[(8, 64), (6, 64), (5, 96), (4, 416), (3, 256), (2, 128)],
                                    bias=True),
        "exl2_n40_short_groups": R.random_exl2(rng, 198, 40, bits=[(5, 96), (4, 40), (3, 62)], bias=True),
        "gptq_act_order": R.random_gptq(rng, 1024, 96, group_size=64, act_order=True, bias=True),
        "gptq_g40": R.random_gptq(rng, 320, 64, group_size=40),
        "gptq3_act_order": R.random_gptq(rng, 512, 96, group_size=128, act_order=True, bits=3),
        "gptq8": R.random_gptq(rng, 256, 64, group_size=64, bits=8, bias=True),
        "awq": R.random_awq(rng, 512, 64, group_size=128),
    }


LAYERS = _layers()


def _without_tc(layer):
    """The layer in the canonical layout (EXL2_CUDA_TC=0 at construction)."""
    import os
    old = os.environ.get("EXL2_CUDA_TC")
    os.environ["EXL2_CUDA_TC"] = "0"
    try:
        return build(layer, "cuda")
    finally:
        if old is None:
            del os.environ["EXL2_CUDA_TC"]
        else:
            os.environ["EXL2_CUDA_TC"] = old


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_tc_layout_is_built_and_results_match(name: str) -> None:
    layer = LAYERS[name]
    K = layer["weight"].shape[0]
    rng = np.random.default_rng(1)
    with build(layer, "cuda") as q, _without_tc(layer) as q0:
        assert q.tensor_core_layout and not q0.tensor_core_layout
        # One copy of the codes: the canonical arrays are released once the stream is packed (two
        # copies would be about twice the canonical size, for N padded to the stream's 128-column
        # tiles).
        N = layer["weight"].shape[1]
        assert q.nbytes < 1.5 * q0.nbytes * (-(-N // 128) * 128) / N, (q.nbytes, q0.nbytes)
        for m in [1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 47, 64]:
            x = torch.from_numpy(random_x(rng, (m, K))).cuda()
            y = q.matmul(x)
            assert rel_err(y, expected(layer, x.cpu().numpy())) < TOL, f"m={m}"
            y0 = q0.matmul(x)
            assert (y.float() - y0.float()).abs().max() <= 2e-3 * y0.float().abs().max() + 1e-6, f"m={m}"
        # dequantize reads the tc layout (tc_dequant.cu) and gives the canonical layout's bits
        for dtype in (torch.float16, torch.bfloat16):
            assert torch.equal(q.dequantize(dtype), q0.dequantize(dtype)), dtype


def check_deterministic_and_graph_safe(q, x: torch.Tensor, repeats: int = 20) -> None:
    """q.matmul(x) gives the same bits every call, and replayed from a CUDA graph."""
    first = q.matmul(x)
    for _ in range(repeats):
        assert torch.equal(q.matmul(x), first)
    out = torch.empty_like(first)
    graph = capture_graph(lambda: q.matmul(x, out=out))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)


@pytest.mark.parametrize("m", [1, 16, 32, 64])
def test_tc_deterministic_and_graph_safe(m: int) -> None:
    layer = LAYERS["exl2_mixed"]
    x = torch.from_numpy(random_x(np.random.default_rng(2), (m, 1024))).cuda()
    with build(layer, "cuda") as q:
        check_deterministic_and_graph_safe(q, x)


def check_one_hot_rows(layer, dtype: torch.dtype, tile_rows, min_rows: int = 1) -> None:
    """matmul of x = consecutive rows of the identity, `rows` at a time for each of `tile_rows`
    (slices of fewer than `min_rows` skipped), must give dequantize(dtype)'s rows exactly."""
    K = layer["weight"].shape[0]
    with build(layer, "cuda", bias=False) as q:
        w = q.dequantize(dtype)
        for rows in tile_rows:
            for k0 in range(0, K, rows):
                k = torch.arange(k0, min(k0 + rows, K), device="cuda")
                if k.numel() < min_rows:
                    continue
                x = torch.zeros((k.numel(), K), dtype=dtype, device="cuda")
                x[torch.arange(k.numel(), device="cuda"), k] = 1.0
                y = q.matmul(x)
                assert torch.equal(y, w[k]), f"rows {k0}..{k0 + k.numel() - 1} (tiles of {rows})"


def check_bf16_within_bound(q, layer, ms) -> None:
    """bfloat16 matmul at each m of `ms`: bfloat16 output within the bfloat16 bound (test_bf16) of
    the weight its kernel multiplies by (cuda_bf16_weight: the exact weight up to m = 16, else
    bfloat16's), and the same bits on a second call."""
    from test_bf16 import assert_within_bound, cuda_bf16_weight, random_bf16_x

    K = layer["weight"].shape[0]
    for m in ms:
        w = cuda_bf16_weight(q, layer, m)
        x = random_bf16_x(np.random.default_rng(m), m, K)
        xt = torch.from_numpy(x).to(torch.bfloat16).cuda()
        y = q.matmul(xt)
        assert y.dtype == torch.bfloat16
        assert_within_bound(y, layer, x, w, mag_term=1026 * 2.0**-23)
        assert torch.equal(q.matmul(xt), y), f"m={m}: not deterministic"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_tc_one_hot_rows_give_the_weights_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    """x = rows of the identity: output row i is 1.0 * W[k_i, :] accumulated in fp32 with zeros,
    so it must equal dequantize(dtype)[k_i, :] exactly. This checks the kernel's own decode (every
    width, pair position, zero, scale and the padding of short chunks) bit for bit, for the
    tile heights of m = 32 and 64 (MT = 2, 4) and clusters of several blocks; one row at a
    time, where the kernel gathers the row through perm itself (m = 1, kGather); and up to 16
    rows, the transposed 8- and 16-row tiles (m = 2..8, kT8; m = 16, kNB = 2; the last slice of a
    layer can be shorter). The usual 16-row tiles: test_tc_usual_16_row_tiles_one_hot_rows."""
    check_one_hot_rows(LAYERS[name], dtype, (1, 3, 8, 16, 32, 64))


def test_tc_large_layer_and_batch_dims() -> None:
    rng = np.random.default_rng(3)
    layer = R.random_gptq(rng, 4096, 1024, group_size=128, act_order=True)
    x = random_x(rng, (2, 3, 4096))
    with build(layer, "cuda") as q:
        y = q.matmul(torch.from_numpy(x).cuda())
        assert y.shape == (2, 3, 1024)
        assert rel_err(y.reshape(6, 1024), expected(layer, x.reshape(6, 4096))) < TOL


def _profiled(fn):
    """torch.profiler's record of the CUDA activity of fn() (synchronised before and after)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


def _kernels_run(fn) -> set:
    """Names of the CUDA kernels that fn() launches (torch.profiler)."""
    return {e.name for e in _profiled(fn).events() if e.device_type == torch.autograd.DeviceType.CUDA}


def _ran(kernels: set, name: str) -> bool:
    return any(name in k for k in kernels)


def test_tc_routes_by_m(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default routing (no EXL2_CUDA_TC, the Python API's own limits): with thread-block clusters
    (compute capability 9.0+) layers get the tc layout, every m up to 64 runs the tc kernels, on
    small, wide and long-K layers (the long-K one with clusters of 16), and m = 65 takes the dense
    route (dequantize from the tc layout + torch.mm); the canonical layout's kernels never run.
    Below 9.0 the default is the canonical layout."""
    monkeypatch.undo()
    monkeypatch.delenv("EXL2_CUDA_TC", raising=False)
    if torch.cuda.get_device_capability()[0] < 9:
        with build(LAYERS["gptq_g40"], "cuda") as q:
            assert not q.tensor_core_layout
        return
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rng = np.random.default_rng(4)
    small = R.random_gptq(rng, 256, 128 * (sms - 1), group_size=128)
    large = R.random_gptq(rng, 256, 128 * sms, group_size=128)
    long_k = R.random_gptq(rng, 8192, 128, group_size=128, act_order=True, bias=True)
    for layer in (small, large, long_k):
        K = layer["weight"].shape[0]
        with build(layer, "cuda") as q:
            assert q.tensor_core_layout
            for m in (1, 2, 13, TC_MAX_ROWS, TC_MAX_ROWS + 1):
                x = torch.from_numpy(random_x(rng, (m, K))).cuda()
                kernels = _kernels_run(lambda: q.matmul(x))
                if not kernels:  # e.g. under compute-sanitizer, which excludes the CUDA profiler
                    pytest.skip("the CUDA profiler recorded no kernels")
                native = m <= TC_MAX_ROWS
                canonical = ("::gemv_kernel<", "::mma_kernel<", "::dequant_kernel<")
                assert not any(_ran(kernels, k) for k in canonical), sorted(kernels)
                assert (_ran(kernels, "tc_gemm_kernel") or _ran(kernels, "tc_wgmma_kernel")) == native, (
                    f"N={q.out_features} m={m}: ran {sorted(kernels)}")
                assert _ran(kernels, "tc_dequant_kernel") != native, f"m={m}: ran {sorted(kernels)}"
                assert rel_err(q.matmul(x), expected(layer, x.cpu().numpy())) < TOL


def test_tc_m1_gathers_inside_the_kernel_where_the_blocks_fit_one_wave() -> None:
    """m = 1 gathers the activation row inside the tc kernel (no tc_gather_x_kernel launch) where
    its blocks fit one wave, and launches the gather first where they do not (8 tiles of 128
    columns per multiprocessor, more than the 6 blocks of the kernel that fit one); both against
    fp64, with act-order."""
    rng = np.random.default_rng(12)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    small = LAYERS["gptq_act_order"]
    many_tiles = R.random_gptq(rng, 256, 128 * 8 * sms, group_size=128, act_order=True)
    for layer, gathers_first in ((small, False), (many_tiles, True)):
        K = layer["weight"].shape[0]
        with build(layer, "cuda") as q:
            x = torch.from_numpy(random_x(rng, (1, K))).cuda()
            kernels = _kernels_run(lambda: q.matmul(x))
            if kernels:  # (compute-sanitizer excludes the CUDA profiler)
                assert _ran(kernels, "tc_gemm_kernel"), sorted(kernels)
                assert _ran(kernels, "tc_gather_x_kernel") == gathers_first, sorted(kernels)
            assert rel_err(q.matmul(x), expected(layer, x.cpu().numpy())) < TOL


def _tc_grid_y(fn) -> int:
    """grid.y (the split-K factor) of the one tc_gemm_kernel launch of fn(), from the profiler's
    trace; 0 where the profiler records no kernels (compute-sanitizer)."""
    import json
    import tempfile

    prof = _profiled(fn)
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/trace.json"
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    grids = [e["args"]["grid"] for e in events if "tc_gemm_kernel" in e.get("name", "") and "grid" in e.get("args", {})]
    assert len(grids) <= 1, grids
    return grids[0][1] if grids else 0


@pytest.mark.parametrize("m", [1, 2, 8, 16])
def test_tc_4bit_layer_of_many_tiles_takes_the_one_wave_split(m: int) -> None:
    """The transposed tiles after the gather launch (m <= 16; m = 1 too on layers whose blocks do
    not fit one wave at cluster_split's split, like this one) of a layer of 4-bit codes take the
    largest split whose blocks fit one wave (tc_rows_split), a mixed-width layer of the same shape
    cluster_split's fuller waves: 1.7 tiles of 128 columns per multiprocessor (on the H100 224
    tiles, as 8192 x 28672 has: split 2 against 8). Both give dequantize's rows bit for bit for
    one-hot rows across the split's K ranges."""
    from exl2.bench import _exl2_groups, _random_exl2, _random_gptq

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    K, N = 4096, 128 * int(1.7 * sms)
    g = torch.Generator(device="cuda")
    g.manual_seed(m)
    splits = []
    for q in (_random_gptq(K, N, 128, True, g), _random_exl2(K, N, _exl2_groups(K, 4.5), g)):
        with q:
            w = q.dequantize()
            k = torch.arange(m, device="cuda") * (K // m) + m - 1
            x = torch.zeros((m, K), dtype=torch.float16, device="cuda")
            x[torch.arange(m, device="cuda"), k] = 1.0
            splits.append(_tc_grid_y(lambda: q.matmul(x)))
            assert torch.equal(q.matmul(x), w[k]), f"rows {k.tolist()}"
    if splits[0] == 0:  # (compute-sanitizer excludes the CUDA profiler)
        pytest.skip("the CUDA profiler recorded no kernels")
    assert splits[0] < splits[1], f"split of the 4-bit layer {splits[0]}, of the mixed one {splits[1]}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_tc_m1_segments_give_the_weights_bit_for_bit(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """m = 1 with one block per tile (EXL2_CUDA_MAX_SPLIT=1): a block's 71 chunks span two of
    kGather's 64-chunk activation segments; one-hot rows across the boundary, mixed widths and
    short groups give dequantize's rows exactly."""
    monkeypatch.setenv("EXL2_CUDA_MAX_SPLIT", "1")
    rng = np.random.default_rng(13)
    layer = R.random_exl2(rng, 2272, 72, bits=[(6, 96), (4, 1280), (3, 544), (5, 352)], bias=True)
    check_one_hot_rows(layer, dtype, (1,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_tc_m1_without_the_in_kernel_gather(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """EXL2_CUDA_TC_GATHER=0 at construction: m = 1 launches the gather and runs kT8, as on layers
    whose blocks do not fit one wave. 4096 x 1000 (8 tiles, the last partial; 128 chunks) takes
    split-K (clusters of 16 on the H100), and kT8 at m <= 4 pushes its partials into a receive
    buffer of its own (m = 1 and 2 two rows of it, m = 3 and 4 all four; m = 5 the ring): one-hot
    rows give dequantize's rows exactly, random rows (with bias) are within tolerance and
    deterministic."""
    monkeypatch.setenv("EXL2_CUDA_TC_GATHER", "0")
    rng = np.random.default_rng(14)
    layer = R.random_gptq(rng, 4096, 1000, group_size=128, act_order=True, bias=True)
    check_one_hot_rows(layer, dtype, (1, 2, 3, 4, 5))
    with build(layer, "cuda") as q:
        for m in (1, 2, 3, 4, 5):
            x = torch.from_numpy(random_x(rng, (m, 4096))).to(dtype).cuda()
            kernels = _kernels_run(lambda: q.matmul(x))
            if kernels:  # (compute-sanitizer excludes the CUDA profiler)
                assert _ran(kernels, "tc_gather_x_kernel"), sorted(kernels)
            y = q.matmul(x)
            tol = TOL if dtype == torch.float16 else 2e-2
            assert rel_err(y.float(), expected(layer, x.float().cpu().numpy())) < tol, m
            assert torch.equal(q.matmul(x), y), f"m={m}: not deterministic"


def test_tc_layout_off_keeps_the_canonical_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """EXL2_CUDA_TC=0 at construction: the canonical layout, its GEMV at m = 1 and the same results."""
    layer = LAYERS["gptq_act_order"]
    rng = np.random.default_rng(9)
    x = torch.from_numpy(random_x(rng, (1, 1024))).cuda()
    monkeypatch.setenv("EXL2_CUDA_TC", "0")
    with build(layer, "cuda") as q0:
        assert not q0.tensor_core_layout
        kernels = _kernels_run(lambda: q0.matmul(x))
        if kernels:
            assert _ran(kernels, "gemv_kernel") and not _ran(kernels, "tc_gemm_kernel"), sorted(kernels)
        assert rel_err(q0.matmul(x), expected(layer, x.cpu().numpy())) < TOL


def test_tc_large_m_in_cpp_runs_row_tiles_and_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Native calls above m = 64 (the C++ library has no dense route): more row tiles of the tc
    kernels, and above 4096 rows several launches (kTcSliceRows); results against fp64."""
    monkeypatch.setattr(qmatrix_module, "_TC_MAX_ROWS", 1 << 30)
    layer = LAYERS["exl2_mixed"]
    rng = np.random.default_rng(10)
    with build(layer, "cuda") as q:
        for m in (65, 200, 4097):
            x = torch.from_numpy(random_x(rng, (m, 1024))).cuda()
            assert rel_err(q.matmul(x), expected(layer, x.cpu().numpy())) < TOL, f"m={m}"


@pytest.mark.parametrize("name", ["exl2_mixed", "exl2_n40_short_groups", "gptq_act_order", "gptq3_act_order",
                                  "gptq8", "awq"])
def test_tc_bfloat16_within_bound(name: str) -> None:
    """bfloat16 through the tc kernel: up to m = 16 the exact weights (q - z) * s (group sums
    scaled in fp32), on the 32- and 64-row tiles bf16((q - z) * s) as dequantize(bfloat16)
    gives them; fp32 accumulation (tensor cores: twice the accumulation term, as for the fused
    bfloat16 kernel in test_cuda_bf16), the same bound as every other bfloat16 path; and
    deterministic."""
    from test_bf16 import bf16_weight

    layer = LAYERS[name]
    w = bf16_weight(layer)
    with build(layer, "cuda") as q:
        assert torch.equal(q.dequantize(torch.bfloat16).cpu(), torch.from_numpy(w).to(torch.bfloat16))
        check_bf16_within_bound(q, layer, [1, 2, 5, 8, 9, 16, 17, 33, 64])


def _group_x(g_idx: np.ndarray, groups) -> np.ndarray:
    """x whose row r is 1 on the rows of group groups[r] (g_idx: each row's group), 0 elsewhere."""
    return (g_idx[None, :] == np.asarray(groups)[:, None]).astype(np.float32)


def _group_indicator_layer(bits: int):
    """A GPTQ act-order layer of `bits`-bit codes in groups of 32 rows, its g_idx, and
    group_x(groups): x whose row r is 1 on the rows of group groups[r], 0 elsewhere."""
    rng = np.random.default_rng(31 + bits)
    layer = R.random_gptq(rng, 512, 160, group_size=32, act_order=True, bits=bits)
    g_idx = np.asarray(layer["g_idx"]).astype(np.int64)
    return layer, g_idx, lambda groups: _group_x(g_idx, groups)


def _bf16_weight_sums(layer, x: np.ndarray) -> np.ndarray:
    """bf16(x @ dequantize(bfloat16)) for 0/1 rows x of one group each: exact in fp32 in any order
    (a group's weights share one scale, so their sum spans fewer than 24 bits)."""
    from test_bf16 import bf16_weight

    return R.bf16_bits(x.astype(np.float64) @ bf16_weight(layer).astype(np.float64))


def _f16_weight_sums(layer, x: np.ndarray) -> np.ndarray:
    """f16(x @ dequantize()) for 0/1 rows x of one group each, as bits: exact in fp32 in any
    order (a group's float16 weights share one scale: their sum spans at most 24 bits)."""
    return (x.astype(np.float64) @ np.asarray(layer["weight"]).astype(np.float64)).astype(np.float16).view(np.uint16)


def _contract_bits(layer, g_idx, groups: np.ndarray, dtype: torch.dtype, bits: int):
    """(group sums, weight sums) as 16-bit patterns for 0/1 rows x of one group each (row r: group
    groups[r]): T(s[g, n] * sum of (q - z) over the group), the transposed tiles' contract, and
    T(sum of T(s (q - z))), the weights' contract. Both exact in fp32 in any order (groups of 32)."""
    d = R.unpack_gptq_codes(layer["qweight"], bits) - R.unpack_gptq_zeros(layer["qzeros"], "v1", bits)[g_idx]
    s = np.asarray(layer["scales"]).astype(np.float64)
    x = _group_x(g_idx, groups)
    sums = np.stack([d[g_idx == g].sum(axis=0) for g in groups]).astype(np.float64)  # exact integers
    if dtype is torch.bfloat16:
        return R.bf16_bits(sums * s[groups]), _bf16_weight_sums(layer, x)
    return (sums * s[groups]).astype(np.float16).view(np.uint16), _f16_weight_sums(layer, x)


@pytest.mark.parametrize("t16", ["1", "0"], ids=["t16", "usual16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 12, 16, 24])
def test_tc_group_sums_bit_exact(bits: int, m: int, dtype: torch.dtype, t16: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to m = 16 (the transposed tiles; m <= 8 with EXL2_CUDA_T16=0), both dtypes: each group's
    x (q - z) summed in fp32, times the scale once. With x = 1 on the rows of one group (row r of
    x: group r % G, act-order), output row r is exactly T(s[g, n] * sum of (q - z) over the
    group) (groups of 32: the sums and the products are exact in fp32, however split-K divides
    the group). The usual 16-row tiles (m = 12 / 16 with EXL2_CUDA_T16=0) and the 32-row tiles
    (m = 24) sum the T weights instead, also exactly here: T(sum of T(s (q - z))). The two
    contracts differ (checked)."""
    monkeypatch.setenv("EXL2_CUDA_T16", t16)
    layer, g_idx, group_x = _group_indicator_layer(bits)
    groups = np.arange(m) % (int(g_idx.max()) + 1)
    x = group_x(groups)
    group_sums, weight_sums = _contract_bits(layer, g_idx, groups, dtype, bits)
    assert not np.array_equal(group_sums, weight_sums)
    with build(layer, "cuda", bias=False) as q:
        y = q.matmul(torch.from_numpy(x).to(dtype).cuda())
    np.testing.assert_array_equal(y.cpu().view(torch.int16).numpy().view(np.uint16),
                                  group_sums if m <= (16 if t16 == "1" else 8) else weight_sums)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["exl2_mixed", "exl2_n40_short_groups", "gptq_act_order", "gptq3_act_order",
                                  "awq"])
def test_tc_usual_16_row_tiles_one_hot_rows(name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """With EXL2_CUDA_T16=0 at construction m = 9..16 run the usual 16-row tiles (the default runs
    the transposed ones, which test_tc_one_hot_rows_give_the_weights_bit_for_bit covers at 16):
    their decode, bit for bit, on full and partial tiles."""
    monkeypatch.setenv("EXL2_CUDA_T16", "0")
    check_one_hot_rows(LAYERS[name], dtype, (16, 11), min_rows=9)


@pytest.mark.parametrize("name", ["exl2_mixed", "gptq_act_order", "awq"])
@pytest.mark.parametrize("m", [9, 13, 16])
def test_tc_transposed_16_row_tiles_match_the_usual_ones(name: str, m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 at m = 9..16: the transposed 16-row tiles (group sums, the exact weight) and the
    usual 16-row tiles (EXL2_CUDA_T16=0, the float16 weight) both within the float16 bound of the
    float64 result (that of the float16 weights, plus their rounding for the exact ones)."""
    layer = LAYERS[name]
    K = layer["weight"].shape[0]
    x = random_x(np.random.default_rng(m), (m, K))
    ys = []
    for t16 in ("1", "0"):
        monkeypatch.setenv("EXL2_CUDA_T16", t16)
        with build(layer, "cuda") as q:
            ys.append(q.matmul(torch.from_numpy(x).cuda()).float().cpu().numpy())
    ref = expected(layer, x)
    b = np.abs(np.asarray(layer["bias"]).astype(np.float64)) if layer.get("bias") is not None else 0.0
    mag = np.abs(x.astype(np.float64)) @ np.abs(np.asarray(layer["weight"]).astype(np.float64)) + b
    # one float16 rounding of the output, fp32 accumulation on tensor cores, the weights' rounding
    bound = 2.0**-10 * np.abs(ref) + ((K + 2) * 2.0**-22 + 2.0**-11) * mag
    for y in ys:
        assert np.all(np.abs(y - ref) <= bound), f"max excess {(np.abs(y - ref) - bound).max()}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_tc_sliced_call_keeps_one_contract(dtype: torch.dtype) -> None:
    """A native call of more than 4096 rows runs in slices of 4096 rows (launch_tc_for). Its last
    slice (rows 4096..4098, which alone would take the transposed tiles' group sums) keeps the
    other rows' contract, the weights of x's dtype: every row gives T(sum of T(s (q - z)))."""
    layer, g_idx, group_x = _group_indicator_layer(4)
    G = int(g_idx.max()) + 1
    rows = 4096 + 3
    group_sums, weight_sums = _contract_bits(layer, g_idx, np.arange(G), dtype, 4)
    tail = np.arange(4096, rows) % G
    assert not np.array_equal(group_sums[tail], weight_sums[tail])  # the last slice can tell them apart
    xl = torch.from_numpy(group_x(np.arange(rows) % G)).to(dtype).cuda()
    with build(layer, "cuda", bias=False) as q:
        out = native_gemm(q, xl)
    np.testing.assert_array_equal(out.cpu().view(torch.int16).numpy().view(np.uint16), weight_sums[np.arange(rows) % G])


def test_tc_bfloat16_runs_the_tc_kernel() -> None:
    layer = LAYERS["gptq_act_order"]
    with build(layer, "cuda") as q:
        x = torch.from_numpy(random_x(np.random.default_rng(5), (8, 1024))).to(torch.bfloat16).cuda()
        kernels = _kernels_run(lambda: q.matmul(x))
        if not kernels:  # e.g. under compute-sanitizer, which excludes the CUDA profiler
            pytest.skip("the CUDA profiler recorded no kernels")
        assert any("tc_gemm_kernel" in k and "bfloat16" in k for k in kernels), sorted(kernels)


def _one_group_layers():
    """Layers whose 4-chunk iterations lie in one group (groups of 128 rows and more), of every
    width the one-group iterations unroll for, one whose last group (488 rows) ends in a short
    chunk of 8 rows."""
    rng = np.random.default_rng(701)
    return {
        "gptq2_g128_act": R.random_gptq(rng, 1024, 256, group_size=128, act_order=True, bits=2, bias=True),
        "gptq3_g256": R.random_gptq(rng, 1024, 160, group_size=256, bits=3),
        "gptq4_g128_act": R.random_gptq(rng, 1024, 200, group_size=128, act_order=True, bias=True),
        "gptq8_g128": R.random_gptq(rng, 512, 128, group_size=128, bits=8),
        "awq_g128": R.random_awq(rng, 768, 256, group_size=128, bias=True),
        "exl2_g128_mixed": R.random_exl2(rng, 1024, 160, bits=[(6, 128), (5, 128), (4, 384), (3, 128), (2, 256)],
                                         group_size=128),
        "exl2_g128_short": R.random_exl2(rng, 1000, 96, bits=[(4, 512), (3, 488)], group_size=128, bias=True),
    }


ONE_GROUP_LAYERS = _one_group_layers()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(ONE_GROUP_LAYERS))
def test_tc_one_group_iterations_give_the_same_bits(name: str, dtype: torch.dtype,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Iterations of 4 chunks that lie in one group (tc::one_group_flag, set at construction unless
    EXL2_CUDA_ONE_GROUP=0) check the group once and take every chunk's ring words from the first
    chunk's: the same bits as the per-chunk path, for every kernel that runs them (the in-kernel
    gather at m = 1, the transposed 8- and 16-row tiles, the usual 16-row tiles (EXL2_CUDA_T16=0)
    and the 32-row ones and, on compute capability 9.0, the wgmma kernel from m = 33, with its
    usual and its deep ring) and those that ignore the flag (the 64-row mma.sync tiles), split-K
    or one block per tile (where a block's iterations start off the groups' boundaries), and
    within tolerance of float64. With one block per tile each block streams 72 to 136 units of
    codes and headers through the mma.sync kernels' 64-unit ring, so its one-group iterations take
    both paths of one_group_wrap_free: codes read without masks, and masked where they wrap."""
    layer = ONE_GROUP_LAYERS[name]
    K = layer["weight"].shape[0]
    rng = np.random.default_rng(702)
    ms = (1, 2, 5, 8, 12, 16, 24, 32, 40, 64)
    xs = [torch.from_numpy(random_x(rng, (m, K))).to("cuda", dtype) for m in ms]
    for max_split in ("1", None):
        if max_split is None:
            monkeypatch.delenv("EXL2_CUDA_MAX_SPLIT", raising=False)
        else:
            monkeypatch.setenv("EXL2_CUDA_MAX_SPLIT", max_split)
        # the mma.sync kernel up to m = 64 (m = 9..16: transposed or usual 16-row tiles), or the
        # wgmma one from 33 with either ring
        for min_rows, deep, t16 in (("65", "0", "1"), ("65", "0", "0"), ("33", "0", "1"), ("33", "1", "1")):
            monkeypatch.setenv("EXL2_CUDA_WGMMA_MIN_ROWS", min_rows)
            monkeypatch.setenv("EXL2_CUDA_WGMMA_DEEP", deep)
            monkeypatch.setenv("EXL2_CUDA_T16", t16)
            outs = {}
            for flag in ("0", "1"):
                monkeypatch.setenv("EXL2_CUDA_ONE_GROUP", flag)
                with build(layer, "cuda") as q:
                    assert q.tensor_core_layout
                    outs[flag] = [q.matmul(x) for x in xs]
            for m, x, a, b in zip(ms, xs, outs["0"], outs["1"]):
                where = f"m={m} max_split={max_split} min_rows={min_rows} deep={deep} t16={t16}"
                assert torch.equal(a, b), where
                tol = TOL if dtype == torch.float16 else 1e-2
                assert rel_err(b.float(), expected(layer, x.float().cpu().numpy())) < tol, where
