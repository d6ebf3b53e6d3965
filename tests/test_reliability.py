"""Reliability measurements kept as tests: leaks, lifetime on streams, concurrency,
the GIL, numerics at the edges of fp16 and run-to-run determinism.

- Leaks: 10,000 create / matmul / destroy cycles of a QMatrix (CPU; CUDA when present)
  and of exl2.compat handles, in a fresh subprocess, leave the malloc'd heap, the RSS
  and the free device memory at their baseline (measured after a warm-up; numbers are
  printed).
- Lifetime: a QMatrix closed while a GEMM that reads it is still queued on a stream
  (behind a spin kernel) gives the right result, on the same and on another stream.
- Concurrency: 8 Python threads sharing one QMatrix (CUDA: each thread its own stream)
  give results bit-identical to the serial run; long native calls release the GIL.
- Numerics: activations up to +-65504 whose partial sums overflow fp16 give exactly
  f16(true result) (fp32 accumulation of integers is exact here, so this is bit exact);
  NaN/Inf activations propagate as in IEEE and do not leak into other rows; 100
  repeated GEMMs are bit-identical.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

import exl2
from exl2 import reference as R

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from layers import DEVICES, build  # noqa: E402

CYCLES = 10_000
# Repeats of the determinism test; scripts/sanitize_cuda.sh lowers it under compute-sanitizer.
REPEATS = int(os.environ.get("EXL2_TEST_REPEATS", "100"))


def _report(capsys: pytest.CaptureFixture, line: str) -> None:
    with capsys.disabled():
        print(f"\n[reliability] {line}")


def _run_script(code: str, env: Dict[str, str] | None = None, timeout: int = 900) -> Dict:
    """Run `code` in a fresh interpreter; it prints one JSON object as its last line."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})}, cwd=str(HERE))
    assert r.returncode == 0, f"returncode {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- leaks
_MEASURE = textwrap.dedent(r"""
    import ctypes, gc, json, os, sys, time
    import numpy as np, torch
    import exl2
    from exl2 import reference as R

    _libc = ctypes.CDLL(None)

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    def heap_in_use():
        # bytes handed out by malloc (small chunks + mmapped chunks); None off glibc
        try:
            f = _libc.mallinfo2
        except AttributeError:
            return None
        f.restype = _MallInfo2
        mi = f()
        return int(mi.uordblks + mi.hblkhd)

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def settle():
        gc.collect()
        if hasattr(_libc, "malloc_trim"):
            _libc.malloc_trim(0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def device_free():
        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else 0

    def measure(cycle, n, warmup):
        for i in range(warmup):
            cycle(i)
        settle()
        h0, r0, d0 = heap_in_use(), rss(), device_free()
        samples = []
        t0 = time.perf_counter()
        for i in range(n):
            cycle(i)
            if (i + 1) % (n // 5) == 0:
                settle()
                samples.append(heap_in_use())
        dt = time.perf_counter() - t0
        settle()
        h1, r1, d1 = heap_in_use(), rss(), device_free()
        return {"cycles": n, "seconds": dt, "heap_before": h0, "heap_after": h1,
                "heap_delta": None if h0 is None else h1 - h0, "heap_samples": samples,
                "rss_before": r0, "rss_after": r1, "rss_delta": r1 - r0,
                "device_free_delta": d0 - d1}

    rng = np.random.default_rng(0)
    EXL2 = R.random_exl2(rng, 256, 128, bits=[(8, 32), (5, 64), (4, 96), (3, 64)], bias=True)
    GPTQ = R.random_gptq(rng, 256, 128, group_size=64, act_order=True, bias=True)
""")

_QMATRIX_CYCLES = _MEASURE + textwrap.dedent(r"""
    dev = sys.argv[1] if len(sys.argv) > 1 else os.environ["EXL2_LEAK_DEVICE"]
    T = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in {**EXL2, **GPTQ}.items()
         if k != "weight"}
    x = torch.from_numpy(rng.standard_normal((3, 256)).astype(np.float16)).to(dev)

    def cycle(i):
        if i % 2:
            q = exl2.QMatrix.from_exl2(T["q_weight"], T["q_invperm"], T["q_scale"], T["q_scale_max"],
                                       T["q_groups"], q_perm=T["q_perm"], bias=T["bias"])
        else:
            q = exl2.QMatrix.from_gptq(T["qweight"], T["qzeros"], T["scales"], g_idx=T["g_idx"], bias=T["bias"])
        y = q.matmul(x)
        if SELFTEST:
            kept.append(q)  # a deliberate leak: proves the measurement sees one
        elif i % 4 < 2:
            q.close()   # explicit release
        del q, y        # else: freed by reference counting

    SELFTEST = bool(os.environ.get("EXL2_LEAK_SELFTEST"))
    kept = []

    print(json.dumps(measure(cycle, int(os.environ.get("EXL2_LEAK_CYCLES", "10000")), 500)))
""")

_COMPAT_CYCLES = _MEASURE + textwrap.dedent(r"""
    from exl2 import compat
    dev = os.environ["EXL2_LEAK_DEVICE"]
    NONE = torch.empty((1, 1), device="meta")
    T = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in {**EXL2, **GPTQ}.items()
         if k != "weight"}
    qsm = T["q_scale_max"] / 256        # the servers' prescaled convention
    perm16, invperm16 = T["q_perm"].short(), T["q_invperm"].short()
    temp_dq = torch.empty(256 * 128, dtype=torch.float16, device=dev)
    a = torch.from_numpy(rng.standard_normal((3, 256)).astype(np.float16)).to(dev)
    c = torch.empty((3, 128), dtype=torch.float16, device=dev)
    gp = torch.empty(256, dtype=torch.int16, device=dev)
    gi = torch.empty(256, dtype=torch.int16, device=dev)
    base_registry = len(compat.registry)

    def cycle(i):
        if i % 2:
            h = compat.make_q_matrix(T["q_weight"], perm16, invperm16, T["q_scale"], qsm, T["q_groups"], NONE,
                                     NONE, NONE, NONE, temp_dq)
        else:
            h = compat.make_q_matrix(T["qweight"], gp, gi, NONE, NONE, NONE, NONE, T["qzeros"], T["scales"],
                                     T["g_idx"], temp_dq)
        compat.gemm_half_q_half(a, h, c, False)
        compat.free_q_matrix(h)

    res = measure(cycle, int(os.environ.get("EXL2_LEAK_CYCLES", "10000")), 500)
    res["registry_delta"] = len(compat.registry) - base_registry
    print(json.dumps(res))
""")

# Budgets: a leak of one small layer per cycle would be ~100 KB x 10,000 = 1 GB; even 100
# bytes per cycle (one std::vector header) shows as 1 MB of heap.
HEAP_BUDGET = 512 * 1024
RSS_BUDGET = 16 * 1024 * 1024
DEVICE_BUDGET = 8 * 1024 * 1024  # cudaMalloc granularity is 2 MB; 10,000 leaked layers would be ~1 GB


def _check_leak(res: Dict, capsys: pytest.CaptureFixture, label: str) -> None:
    mb = 1024 * 1024
    heap = "n/a" if res["heap_delta"] is None else f"{res['heap_delta'] / 1024:+.1f} KiB"
    _report(capsys, f"{label}: {res['cycles']} cycles in {res['seconds']:.1f} s; heap in use {heap} "
                    f"(samples {[round((s or 0) / mb, 2) for s in res['heap_samples']]} MiB), "
                    f"RSS {res['rss_delta'] / mb:+.2f} MiB ({res['rss_before'] / mb:.1f} -> {res['rss_after'] / mb:.1f}), "
                    f"device free memory {-res['device_free_delta'] / mb:+.2f} MiB")
    if res["heap_delta"] is not None:
        assert abs(res["heap_delta"]) < HEAP_BUDGET, res
    assert res["rss_delta"] < RSS_BUDGET, res
    assert res["device_free_delta"] < DEVICE_BUDGET, res


@pytest.mark.parametrize("device", DEVICES)
def test_qmatrix_create_destroy_cycles_do_not_leak(device: str, capsys: pytest.CaptureFixture) -> None:
    res = _run_script(_QMATRIX_CYCLES, {"EXL2_LEAK_DEVICE": device, "EXL2_LEAK_CYCLES": str(CYCLES)})
    _check_leak(res, capsys, f"QMatrix {device}")


def test_leak_measurement_sees_a_leak(capsys: pytest.CaptureFixture) -> None:
    """The method itself: keeping every QMatrix alive for 1,000 cycles must exceed the budgets."""
    res = _run_script(_QMATRIX_CYCLES, {"EXL2_LEAK_DEVICE": "cpu", "EXL2_LEAK_CYCLES": "1000",
                                        "EXL2_LEAK_SELFTEST": "1"})
    with pytest.raises(AssertionError):
        _check_leak(res, capsys, "deliberate leak (self-test)")


@pytest.mark.parametrize("device", DEVICES)
def test_compat_handle_cycles_do_not_leak(device: str, capsys: pytest.CaptureFixture) -> None:
    try:
        from exl2 import compat
    except ImportError:
        pytest.skip("exl2.compat is not available")
    if not all(hasattr(compat, f) for f in ("make_q_matrix", "gemm_half_q_half", "free_q_matrix")):
        pytest.skip("exl2.compat lacks make_q_matrix / gemm_half_q_half / free_q_matrix")
    res = _run_script(_COMPAT_CYCLES, {"EXL2_LEAK_DEVICE": device, "EXL2_LEAK_CYCLES": str(CYCLES)})
    assert res["registry_delta"] == 0, res
    _check_leak(res, capsys, f"compat handles {device}")


# ----------------------------------------------------------------------------- lifetime on streams
def _big_layer(fmt: str, seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if fmt == "exl2":
        return R.random_exl2(rng, 2048, 1024, bits=[(6, 512), (4, 1024), (3, 512)])
    return R.random_gptq(rng, 2048, 1024, group_size=128, act_order=True)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
@pytest.mark.parametrize("close_on", ["same_stream", "other_stream"])
def test_close_while_gemm_is_queued_is_safe(fmt: str, close_on: str) -> None:
    """close() while the GEMM reading the weights waits on the stream behind a ~50 ms spin
    kernel; then a new QMatrix (which may reuse the freed memory) is built. The result
    must be the first layer's (stream-ordered frees, or a synchronising free)."""
    a, b = _big_layer(fmt, 1), _big_layer(fmt, 2)
    rng = np.random.default_rng(3)
    x_np = rng.standard_normal((512, 2048)).astype(np.float16)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(s1):
        x = torch.from_numpy(x_np).cuda()
        q1 = build(a, "cuda", bias=False)
        expected = q1.matmul(x).clone()
        s1.synchronize()
        torch.cuda._sleep(100_000_000)  # keep s1 busy so the GEMM below is still queued
        y = q1.matmul(x)
    with torch.cuda.stream(s1 if close_on == "same_stream" else s2):
        q1.close()
        q2 = build(b, "cuda", bias=False)  # new allocations, possibly at q1's addresses
        with torch.cuda.stream(s1):
            y2 = q2.matmul(x)
    torch.cuda.synchronize()
    assert torch.equal(y, expected), "a GEMM queued before close() read freed or reused memory"
    assert y2.shape == y.shape
    q2.close()


_CLOSE_RACE = textwrap.dedent(r"""
    import json, threading, time
    import numpy as np, torch, exl2
    from exl2 import reference as R
    L = R.random_gptq(np.random.default_rng(0), 4096, 4096, group_size=128)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((64, 4096)).astype(np.float16))
    outcomes = []
    for attempt in range(3):
        q = exl2.QMatrix.from_gptq(L["qweight"], L["qzeros"], L["scales"])
        ref = q.matmul(x)
        errors = []
        def work():
            try:
                for _ in range(6):
                    y = q.matmul(x)
                    if not torch.equal(y, ref):
                        errors.append("wrong result")
            except ValueError as exc:  # "the QMatrix is closed": fine
                errors.append("closed")
        th = threading.Thread(target=work)
        th.start()
        time.sleep(0.03)
        q.close()  # while the other thread is (most likely) inside the native GEMM
        th.join()
        outcomes.append(errors)
    print(json.dumps({"outcomes": outcomes}))
""")


def test_close_from_another_thread_during_matmul_is_safe() -> None:
    """close() racing a matmul on another thread must either wait for it or make it raise
    ValueError; never crash or give wrong numbers."""
    res = _run_script(_CLOSE_RACE, env={"EXL2_CPU_THREADS": "1"}, timeout=600)
    for errors in res["outcomes"]:
        assert "wrong result" not in errors, res


# ----------------------------------------------------------------------------- concurrency
def _inputs(K: int, seed: int) -> List[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy((rng.standard_normal((m, K)) * 2).astype(np.float16)) for m in (1, 2, 3, 4, 5, 8, 17, 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_eight_threads_share_one_qmatrix(device: str, fmt: str) -> None:
    rng = np.random.default_rng(7)
    if fmt == "exl2":
        layer = R.random_exl2(rng, 1024, 512, bits=[(8, 64), (6, 128), (5, 192), (4, 384), (3, 256)], bias=True)
    else:
        layer = R.random_gptq(rng, 1024, 512, group_size=128, act_order=True, bias=True)
    xs = [x.to(device) for x in _inputs(1024, 8)]
    with build(layer, device) as q:
        serial = [q.matmul(x) for x in xs]
        dq = q.dequantize()
        if device == "cuda":
            torch.cuda.synchronize()
        n_threads, reps = 8, 6
        barrier = threading.Barrier(n_threads)
        results: List[List] = [[] for _ in range(n_threads)]
        errors: List[BaseException] = []

        def work(tid: int) -> None:
            try:
                stream = torch.cuda.Stream() if device == "cuda" else None
                barrier.wait()
                for rep in range(reps):
                    for j in np.random.default_rng(tid * 100 + rep).permutation(len(xs)):
                        if stream is not None:
                            with torch.cuda.stream(stream):
                                x = xs[j]
                                x.record_stream(stream)
                                out = torch.empty((x.shape[0], q.out_features), dtype=torch.float16, device=device)
                                y = q.matmul(x, out=out) if rep % 2 else q.matmul(x)
                                d = q.dequantize() if rep == 0 and j == 0 else None
                            stream.synchronize()
                        else:
                            out = torch.empty((xs[j].shape[0], q.out_features), dtype=torch.float16)
                            y = q.matmul(xs[j], out=out) if rep % 2 else q.matmul(xs[j])
                            d = q.dequantize() if rep == 0 and j == 0 else None
                        results[tid].append((int(j), y, d))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for tid in range(n_threads):
            assert len(results[tid]) == reps * len(xs)
            for j, y, d in results[tid]:
                assert torch.equal(y, serial[j]), f"thread {tid}, input {j}: differs from the serial run"
                if d is not None:
                    assert torch.equal(d, dq)


@pytest.mark.parametrize("device", DEVICES)
def test_concurrent_construction_from_shared_tensors(device: str) -> None:
    """8 threads build QMatrix objects from the same (read-only) tensors at once."""
    rng = np.random.default_rng(9)
    layer = R.random_gptq(rng, 512, 256, group_size=64, act_order=True, bias=True)
    x = torch.from_numpy(rng.standard_normal((5, 512)).astype(np.float16)).to(device)
    with build(layer, device) as q0:
        ref = q0.matmul(x)
    T = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in layer.items() if k != "weight"}
    snapshot = {k: v.clone() for k, v in T.items()}
    if device == "cuda":
        torch.cuda.synchronize()  # the side streams below read T and x
    errors: List[BaseException] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        try:
            stream = torch.cuda.Stream() if device == "cuda" else None
            barrier.wait()
            for _ in range(10):
                if stream is not None:
                    with torch.cuda.stream(stream):
                        q = exl2.QMatrix.from_gptq(T["qweight"], T["qzeros"], T["scales"], g_idx=T["g_idx"],
                                                   bias=T["bias"])
                        y = q.matmul(x)
                    stream.synchronize()
                else:
                    q = exl2.QMatrix.from_gptq(T["qweight"], T["qzeros"], T["scales"], g_idx=T["g_idx"],
                                               bias=T["bias"])
                    y = q.matmul(x)
                assert torch.equal(y, ref)
                q.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in T:
        assert torch.equal(T[k], snapshot[k]), f"construction modified {k}"


def _gil_progress(call, target_s: float = 0.3) -> tuple:
    """Run `call` (repeated to last about target_s) on a thread while this thread spins in
    Python, and measure how much of that time the spinning thread could run: the sum of
    the short (< 2 ms) gaps between its iterations over the wall time. A native call that
    releases the GIL leaves this thread running (close to 1.0 with a free core); one that
    holds it stalls the thread for the whole call (close to 0). Returns (seconds per call,
    calls, progress fraction, longest stall)."""
    t0 = time.perf_counter()
    call()  # warm-up, and the time of one call
    single = time.perf_counter() - t0
    reps = max(1, math.ceil(target_s / max(single, 1e-4)))
    done = threading.Event()
    span = {}

    def target() -> None:
        span["start"] = time.perf_counter()
        for _ in range(reps):
            call()
        span["end"] = time.perf_counter()
        done.set()

    th = threading.Thread(target=target)
    stamps = []
    th.start()
    while not done.is_set():
        stamps.append(time.perf_counter())
    th.join()
    inside = [t for t in stamps if span["start"] <= t <= span["end"]]
    edges = [span["start"]] + inside + [span["end"]]
    gaps = [b - a for a, b in zip(edges, edges[1:])]
    duration = span["end"] - span["start"]
    progress = sum(g for g in gaps if g < 0.002) / duration
    return duration / reps, reps, progress, max(gaps)


def _released_gil_progress(call, attempts: int = 3) -> tuple:
    """_gil_progress of the best of up to `attempts` measurements, stopping at the first above
    0.5: another process busy on the machine's cores can take the spinning thread's core for
    part of one measurement (a 2-core CI machine read 49% once under such load), while a call
    that holds the GIL stalls the thread in every attempt (test_gil_measurement_sees_a_held_gil)."""
    best = None
    for _ in range(attempts):
        result = _gil_progress(call)
        if best is None or result[2] > best[2]:
            best = result
        if best[2] > 0.5:
            break
    return best


def test_gil_is_released_during_native_calls(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("EXL2_CPU_THREADS", "1")  # leave a core to the Python thread
    # A large act-order layer (random words: only the cost matters here), so that every call
    # takes well over 100 ms on one core.
    K, N, gs = 16384, 4096, 128
    g = torch.Generator().manual_seed(11)
    T = {"qweight": torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, generator=g),
         "qzeros": torch.randint(-2**31, 2**31 - 1, (K // gs, N // 8), dtype=torch.int32, generator=g),
         "scales": (torch.rand((K // gs, N), generator=g) * 0.01).half(),
         "g_idx": (torch.randperm(K, generator=g) // gs).int()}
    x = (torch.randn((96, K), generator=g)).half()
    holder = {}

    def construct() -> None:
        holder["q"] = exl2.QMatrix.from_gptq(T["qweight"], T["qzeros"], T["scales"], g_idx=T["g_idx"])

    def matmul() -> None:
        holder["q"].matmul(x)

    def dequantize() -> None:
        holder["q"].dequantize()

    lines = []
    for name, call in (("from_gptq", construct), ("matmul", matmul), ("dequantize", dequantize)):
        per_call, reps, progress, stall = _released_gil_progress(call)
        lines.append(f"{name} {per_call * 1e3:.0f} ms x {reps}: Python thread ran {progress:.0%} of the time, "
                     f"longest stall {stall * 1e3:.1f} ms")
        # With the GIL held the Python thread could not run during the calls at all.
        assert progress > 0.5, f"{name}: the Python thread ran only {progress:.0%} of the time"
    holder["q"].close()
    _report(capsys, "GIL: " + "; ".join(lines))


def test_gil_measurement_sees_a_held_gil() -> None:
    """The method itself: sorting a list (C code that keeps the GIL) must show as a stall."""
    values = list(np.random.default_rng(13).standard_normal(300_000))
    _, _, progress, _ = _gil_progress(lambda: sorted(values))
    assert progress < 0.3, progress


@pytest.mark.cuda
def test_gil_is_released_during_cuda_construction() -> None:
    rng = np.random.default_rng(12)
    layer = R.random_gptq(rng, 8192, 4096, group_size=128, act_order=True)
    T = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in layer.items() if k != "weight"}
    holder = {}

    def construct() -> None:  # host tensors: upload + repack + synchronise
        holder["q"] = exl2.QMatrix.from_gptq(T["qweight"], T["qzeros"], T["scales"], g_idx=T["g_idx"], device="cuda")

    construct()  # warm-up: CUDA context, module loading, torch's stream objects
    torch.cuda.synchronize()
    per_call, reps, progress, stall = _released_gil_progress(construct)
    assert progress > 0.5, (per_call, reps, progress, stall)
    holder["q"].close()


# ----------------------------------------------------------------------------- numerics
def _ternary_gptq(W: np.ndarray) -> Dict[str, np.ndarray]:
    """A GPTQ layer whose weight is exactly W (entries in -8..7): scale 1, zero 8."""
    K, N = W.shape
    G = K // 32
    d = R.pack_gptq(W.astype(np.int64) + 8, np.full((G, N), 8), np.ones((G, N), np.float16), None, "v1")
    d["weight"] = R.dequantize_gptq(d["qweight"], d["qzeros"], d["scales"], None, "v1")
    assert np.array_equal(d["weight"], W.astype(np.float16))
    return d


def _small_int_exl2(W: np.ndarray, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """An EXL2 layer (2-bit groups, scale exactly 1) whose weight is exactly W (entries in -2..1)."""
    K, N = W.shape
    invperm = rng.permutation(K)
    codes = np.empty_like(W, dtype=np.int64)
    codes[invperm] = W.astype(np.int64) + 2  # storage row invperm[k] holds W[k]
    G = K // 32
    d = R.pack_exl2(codes, [2] * G, [32] * G, np.zeros((G, N), np.int64), np.full(G, 256.0, np.float16), invperm)
    d["weight"] = R.dequantize_exl2(d["q_weight"], d["q_invperm"], d["q_scale"], d["q_scale_max"], d["q_groups"])
    assert np.array_equal(d["weight"], W.astype(np.float16))
    return d


def _exact_product(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """x @ W in float64, elementwise (IEEE NaN/Inf rules, no BLAS shortcuts)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return (x.astype(np.float64)[:, :, None] * W.astype(np.float64)[None, :, :]).sum(axis=1)


def _overflow_inputs(K: int, N: int, wmax: int, rng: np.random.Generator):
    """W with small integer entries and x with +-65504-scale integer activations arranged so
    that partial sums leave the fp16 range while many true results fit it. Every product
    and partial sum is an integer below 2^24, so fp32 accumulation is exact in any order."""
    W = rng.integers(-wmax, 2, size=(K, N))   # gptq: -1..1, exl2 (2-bit): -2..1
    W[:, 0] = 1                                   # column 0: sum of x
    W[:, 1] = np.where(np.arange(K) % 2 == 0, 1, -1)  # column 1: alternating
    big = np.float16(65504)
    rows = []
    half = K // 2
    rows.append(np.concatenate([np.full(half, big), np.full(K - half, -big)]))         # +S then -S: sum 0
    r = np.concatenate([np.full(half, big), np.full(K - half, -big)])
    r[0] = 3                                                                            # ... with a small rest
    rows.append(r.astype(np.float16))
    rows.append(np.tile(np.array([big, big, -big, -big], np.float16), K // 4))         # pairs
    rows.append(rng.choice(np.array([-65504, -32768, -2048, 0, 1, 2048, 32768, 65504], np.float16), size=K))
    rows.append(rng.integers(-2048, 2048, size=K).astype(np.float16))                 # ordinary
    x = np.stack([np.asarray(r, np.float16) for r in rows])
    assert np.abs(x.astype(np.float64)).sum(axis=1).max() * wmax < 2**24
    return x, W


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
@pytest.mark.parametrize("m_pad", [0, 4, 60])  # extra rows to reach the other GEMM paths (m > 4, dense m >= 13)
def test_large_activations_and_overflowing_partial_sums(device: str, fmt: str, m_pad: int) -> None:
    rng = np.random.default_rng(21)
    K, N = 256, 64
    wmax = 1 if fmt == "gptq" else 2
    x, W = _overflow_inputs(K if fmt == "gptq" else 128, N, wmax, rng)
    K = x.shape[1]
    layer = _ternary_gptq(W) if fmt == "gptq" else _small_int_exl2(W, rng)
    if m_pad:
        x = np.concatenate([x, rng.integers(-64, 64, size=(m_pad, K)).astype(np.float16)])
    exact = _exact_product(x, W)
    with np.errstate(over="ignore"):
        expect = exact.astype(np.float16)  # the only rounding: float64 == fp32 here (integers < 2^24)
    with build(layer, device, bias=False) as q:
        y = q.matmul(torch.from_numpy(x).to(device)).cpu().numpy()
    fits = np.abs(exact) <= 65504
    assert fits[:3, :2].all()  # the designed rows and columns fit
    assert np.isfinite(y[fits]).all(), "a result that fits fp16 came out non-finite"
    bad = np.argwhere(y.view(np.uint16) != expect.view(np.uint16))
    assert bad.size == 0, f"{len(bad)} results differ from f16(exact), first at {tuple(bad[0])}: " \
                          f"{y[tuple(bad[0])]} vs {expect[tuple(bad[0])]} (exact {exact[tuple(bad[0])]})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
@pytest.mark.parametrize("m", [3, 7, 40])
def test_nan_and_inf_activations_propagate_as_ieee(device: str, fmt: str, m: int) -> None:
    rng = np.random.default_rng(31)
    K, N = (128, 48)
    W = rng.integers(-1, 2, size=(K, N))  # includes zeros: Inf * 0 = NaN
    W[:, 0] = 1
    W[:, 1] = -1
    W[:, 2] = 0
    layer = _ternary_gptq(W) if fmt == "gptq" else _small_int_exl2(W, rng)
    x = rng.integers(-100, 100, size=(m, K)).astype(np.float16)
    poisoned = {0: [(5, np.nan)], 1: [(7, np.inf)], 2: [(9, -np.inf)]}
    if m > 3:
        poisoned[3] = [(1, np.inf), (2, -np.inf)]  # +Inf and -Inf in one row: NaN wherever both weights are nonzero
        poisoned[m - 1] = [(K - 1, np.nan), (0, np.inf)]
    for i, entries in poisoned.items():
        for k, v in entries:
            x[i, k] = v
    exact = _exact_product(x, W)
    with np.errstate(invalid="ignore", over="ignore"):
        expect = exact.astype(np.float16)
    with build(layer, device, bias=False) as q:
        y = q.matmul(torch.from_numpy(x).to(device)).cpu().numpy()
    assert np.array_equal(np.isnan(y), np.isnan(expect)), "NaN pattern differs from IEEE"
    assert np.array_equal(np.isposinf(y), np.isposinf(expect)) and np.array_equal(np.isneginf(y), np.isneginf(expect))
    finite = np.isfinite(expect)
    assert np.array_equal(y[finite], expect[finite]), "finite results differ (other rows must be unaffected)"
    clean_rows = [i for i in range(m) if i not in poisoned]
    assert np.isfinite(y[clean_rows]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_100_repeated_gemms_are_bit_identical(device: str, fmt: str) -> None:
    rng = np.random.default_rng(41)
    if fmt == "exl2":
        layer = R.random_exl2(rng, 1024, 256, bits=[(8, 64), (6, 64), (5, 96), (4, 416), (3, 256), (2, 128)],
                              bias=True)
    else:
        layer = R.random_gptq(rng, 1024, 256, group_size=64, act_order=True, bias=True)
    with build(layer, device) as q:
        for m in (1, 4, 5, 33, 300):
            x = torch.from_numpy(rng.standard_normal((m, 1024)).astype(np.float16)).to(device)
            first = q.matmul(x)
            out = torch.empty_like(first)
            for i in range(REPEATS):
                y = q.matmul(x, out=out) if i % 2 else q.matmul(x)
                assert torch.equal(y, first), f"m={m}: repeat {i} differs"
