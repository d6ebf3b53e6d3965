"""``python -m exl2 bench``: time QMatrix.matmul against dense ``torch.matmul`` (in the
same dtype, float16 or bfloat16: ``--dtype``) and the memory-bandwidth floor, with CUDA
graphs (replay time per call), in one run.

The floor is the layer's stored bytes (codes, scales, zeros) divided by the copy
bandwidth measured in the same run (device-to-device copy, bytes read + written).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional

import torch

from . import __version__
from .qmatrix import QMatrix


def _random_gptq(K: int, N: int, group_size: int, act_order: bool, g: torch.Generator, bits: int = 4) -> QMatrix:
    G = K // group_size
    qweight = torch.randint(-2**31, 2**31 - 1, (K * bits // 32, N), dtype=torch.int32, device="cuda", generator=g)
    qzeros = torch.randint(-2**31, 2**31 - 1, (G, N * bits // 32), dtype=torch.int32, device="cuda", generator=g)
    scales = (torch.rand((G, N), device="cuda", generator=g) * 0.004 + 0.001).half()
    g_idx = torch.arange(K, device="cuda", dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(K, device="cuda", generator=g)].contiguous()
    return QMatrix.from_gptq(qweight, qzeros, scales, g_idx=g_idx if act_order else None, bits=bits)


def _random_awq(K: int, N: int, group_size: int, g: torch.Generator) -> QMatrix:
    G = K // group_size
    qweight = torch.randint(-2**31, 2**31 - 1, (K, N // 8), dtype=torch.int32, device="cuda", generator=g)
    qzeros = torch.randint(-2**31, 2**31 - 1, (G, N // 8), dtype=torch.int32, device="cuda", generator=g)
    scales = (torch.rand((G, N), device="cuda", generator=g) * 0.004 + 0.001).half()
    return QMatrix.from_awq(qweight, qzeros, scales)


def _random_exl2(K: int, N: int, groups: List[tuple], g: torch.Generator) -> QMatrix:
    """groups: (bits, rows) in non-increasing bits, rows a multiple of 32."""
    q_groups, words = [], 0
    for bits, rows in groups:
        q_groups += [bits, words]
        words += rows * bits // 32
    assert sum(r for _, r in groups) == K
    q_weight = torch.randint(-2**31, 2**31 - 1, (words, N), dtype=torch.int32, device="cuda", generator=g)
    G = len(groups)
    q_scale = torch.randint(-2**31, 2**31 - 1, (G, N // 8), dtype=torch.int32, device="cuda", generator=g)
    q_scale_max = (torch.rand((G,), device="cuda", generator=g) * 0.018 + 0.002).half()
    q_invperm = torch.randperm(K, device="cuda", generator=g).int()
    return QMatrix.from_exl2(q_weight, q_invperm, q_scale, q_scale_max,
                             torch.tensor(q_groups, dtype=torch.int16, device="cuda"))


def _exl2_groups(K: int, bpw: float, group: int = 128) -> List[tuple]:
    """A mix of 5/4/3-bit groups of `group` rows averaging about `bpw` code bits."""
    n = K // group
    if bpw >= 8:
        return [(8, group)] * n
    if bpw <= 2:
        return [(2, group)] * n
    lo = int(bpw)
    hi = lo + 1 if lo + 1 != 7 else 8
    n_hi = round(n * (bpw - lo) / (hi - lo))
    return [(hi, group)] * n_hi + [(lo, group)] * (n - n_hi)


def _graph_time_us(fn: Callable[[], Any], iters: int = 50) -> float:
    """Median replay time of a CUDA graph holding `iters` calls, per call, in µs."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / iters)
    times.sort()
    return times[len(times) // 2]


def _copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = _graph_time_us(lambda: b.copy_(a), iters=10)
    del a, b
    return 2 * n / (us * 1e-6)


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def run(ms: Optional[List[int]] = None, json_path: Optional[str] = None, quick: bool = False,
        fmt: Optional[str] = None, bits: int = 4, dtype: str = "float16") -> Dict[str, Any]:
    """Run the benchmark table and print it; optionally write JSON. ``fmt`` ("exl2",
    "gptq" with ``bits``, or "awq") restricts it to layers of one format; ``dtype`` is the
    activation/output dtype ("float16" or "bfloat16"), recorded in the output."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected 'float16' or 'bfloat16', got {dtype!r}")
    tdtype = _DTYPES[dtype]
    if not torch.cuda.is_available():
        raise SystemExit("bench needs a CUDA device")
    ms = ms or [1, 8, 16, 32, 64, 512, 2048]
    g = torch.Generator(device="cuda").manual_seed(0)
    bw = _copy_bandwidth()
    shapes = [(4096, 4096), (8192, 28672)] if not quick else [(4096, 4096)]
    layers: List[tuple] = []
    for K, N in shapes:
        if fmt in (None, "gptq"):
            layers.append((f"gptq{bits} g128 act {K}x{N}",
                           lambda K=K, N=N: _random_gptq(K, N, 128, True, g, bits)))
        if fmt == "awq":
            layers.append((f"awq4 g128 {K}x{N}", lambda K=K, N=N: _random_awq(K, N, 128, g)))
        if fmt in (None, "exl2"):
            layers.append((f"exl2 4.0bpw {K}x{N}", lambda K=K, N=N: _random_exl2(K, N, _exl2_groups(K, 4.0), g)))
        if fmt in (None, "exl2") and not quick and (K, N) == (8192, 28672):
            for bpw in (2.5, 4.5, 6.0):
                layers.append((f"exl2 {bpw}bpw {K}x{N}", lambda K=K, N=N, b=bpw: _random_exl2(K, N, _exl2_groups(K, b), g)))
    rows: List[Dict[str, Any]] = []
    print(f"exl2 {__version__} bench on {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"dtype {dtype}")
    print(f"{'layer':34s} {'m':>5s} {'exl2 us':>9s} {'dense us':>9s} {'floor us':>9s} {'x floor':>8s} {'x dense':>8s}")
    for name, make in layers:
        q = make()
        K, N = q.in_features, q.out_features
        w = q.dequantize(tdtype)
        # The floor: the layer's weight bytes as stored (codes, scales, zeros; bits_per_weight),
        # which is what a kernel must read at least once. (q.nbytes, what the QMatrix holds on
        # the device, also counts fp16 scales expanded per column and, with EXL2_CUDA_TC=1,
        # the second copy of the codes.)
        floor_us = q.bits_per_weight * K * N / 8 / bw * 1e6
        for m in ms:
            x = torch.randn((m, K), dtype=tdtype, device="cuda")
            out = torch.empty((m, N), dtype=tdtype, device="cuda")
            dense_out = torch.empty_like(out)
            t_q = _graph_time_us(lambda: q.matmul(x, out=out))
            t_d = _graph_time_us(lambda: torch.matmul(x, w, out=dense_out))
            row = dict(layer=name, K=K, N=N, m=m, bpw=q.bits_per_weight, exl2_us=t_q, dense_us=t_d,
                       floor_us=floor_us, vs_floor=t_q / floor_us, vs_dense=t_q / t_d, dtype=dtype)
            rows.append(row)
            print(f"{name:34s} {m:5d} {t_q:9.1f} {t_d:9.1f} {floor_us:9.1f} {t_q / floor_us:8.2f} {t_q / t_d:8.2f}")
        del w
        q.close()
    result = dict(device=torch.cuda.get_device_name(), copy_bandwidth=bw, version=__version__, rows=rows,
                  dtype=dtype)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result
