"""``python -m exl2 bench``: time QMatrix.matmul against dense ``torch.matmul`` and the
memory-bandwidth floor, in one run, on CUDA or on the CPU.

Every shape (K x N) gets the same layers: EXL2 at 2.5, 4.0, ~4.5 (mixed 5/4-bit) and 6.0
bits per weight and GPTQ 4-bit, group 128, act-order (``--format``/``--bits`` narrow that
to one format). For each layer and row count m it reports the time per call, the achieved
bandwidth (stored weight bytes / time), how close that is to the floor and the ratio to
dense ``torch.matmul`` measured in the same run.

- CUDA: CUDA graphs of 50 calls, median of 7 replays after at least 50 ms of warm-up
  replays; the dense baseline in the activation dtype (``--dtype``).
- CPU: wall-clock time (``time.perf_counter``) after a warm-up, median of 5 batches of
  calls; the dense baseline in float32 (``x.float() @ W``, ``W`` converted to float32
  before timing), as float16 matmul on the CPU is slow or missing in many torch builds.

The floor is the layer's stored bytes (codes, scales, zeros: ``bits_per_weight * K * N / 8``)
divided by the copy bandwidth of the device measured in the same run (a large tensor
``copy_``, bytes read + written).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import __version__, built_with_cuda, cuda_device_count
from ._convert import parse_device
from .qmatrix import QMatrix

Shape = Tuple[int, int]
#: A timer: runs ``fn`` repeatedly and returns the time of one call in µs.
Timer = Callable[[Callable[[], Any]], float]

#: Row counts m of the activation when ``--m`` is not given.
DEFAULT_MS: Tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048)
#: Shapes (K x N) of the full run: attention/MLP projections of 7B-70B class models.
SHAPES: Tuple[Shape, ...] = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))
#: ``--quick``, and the CPU default without ``--shapes``.
QUICK_SHAPES: Tuple[Shape, ...] = ((4096, 4096),)
#: The EXL2 layers of every shape, in target bits per weight.
EXL2_BPWS: Tuple[float, ...] = (2.5, 4.0, 4.5, 6.0)
#: Rows per quantization group of every layer (GPTQ/AWQ groups, EXL2 bit-width groups).
GROUP_SIZE = 128
#: ``--shapes`` constraints: K whole groups; N a multiple of 32 (GPTQ 3-bit packs 32 zeros
#: into 3 words, EXL2/AWQ pack 8 columns per word).
K_MULTIPLE, N_MULTIPLE = GROUP_SIZE, 32
FORMATS = ("exl2", "gptq", "awq")
GPTQ_BITS = (2, 3, 4, 8)
PLOT_HINT = "--plot needs matplotlib: pip install exl2[plot]"

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # activation dtypes
_DENSE_DTYPES = dict(_DTYPES, float32=torch.float32)
_CUDA_GRAPH_CALLS, _CUDA_REPLAYS = 50, 7
# GPU warm-up before each timing: replays for at least this long. The layers are built on the
# host while the GPU idles, and the first rows timed after a large layer was built measured up
# to 1.6x slow without it (H100, 8192x28672 GPTQ-4, m = 1: 103.5 us as the first row of a
# shape, 67.2 us when another shape had run just before).
_CUDA_WARMUP_S = 0.05
_CPU_BATCHES, _CPU_MIN_BATCH_S = 5, 0.02
_COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}


# ------------------------------------------------------------------ random layers
def _random_gptq(K: int, N: int, group_size: int, act_order: bool, g: torch.Generator, bits: int = 4) -> QMatrix:
    """A GPTQ layer of random codes, zeros and scales on the generator's device."""
    dev = g.device
    G = K // group_size
    qweight = torch.randint(-2**31, 2**31 - 1, (K * bits // 32, N), dtype=torch.int32, device=dev, generator=g)
    qzeros = torch.randint(-2**31, 2**31 - 1, (G, N * bits // 32), dtype=torch.int32, device=dev, generator=g)
    scales = (torch.rand((G, N), device=dev, generator=g) * 0.004 + 0.001).half()
    g_idx = torch.arange(K, device=dev, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(K, device=dev, generator=g)].contiguous()
    return QMatrix.from_gptq(qweight, qzeros, scales, g_idx=g_idx if act_order else None, bits=bits)


def _random_awq(K: int, N: int, group_size: int, g: torch.Generator) -> QMatrix:
    """An AWQ 4-bit layer of random codes, zeros and scales on the generator's device."""
    dev = g.device
    G = K // group_size
    qweight = torch.randint(-2**31, 2**31 - 1, (K, N // 8), dtype=torch.int32, device=dev, generator=g)
    qzeros = torch.randint(-2**31, 2**31 - 1, (G, N // 8), dtype=torch.int32, device=dev, generator=g)
    scales = (torch.rand((G, N), device=dev, generator=g) * 0.004 + 0.001).half()
    return QMatrix.from_awq(qweight, qzeros, scales)


def _random_exl2(K: int, N: int, groups: List[tuple], g: torch.Generator) -> QMatrix:
    """An EXL2 layer of random codes, scales and permutation on the generator's device.
    groups: (bits, rows) in non-increasing bits, rows a multiple of 32."""
    dev = g.device
    q_groups, words = [], 0
    for bits, rows in groups:
        q_groups += [bits, words]
        words += rows * bits // 32
    assert sum(r for _, r in groups) == K
    q_weight = torch.randint(-2**31, 2**31 - 1, (words, N), dtype=torch.int32, device=dev, generator=g)
    G = len(groups)
    q_scale = torch.randint(-2**31, 2**31 - 1, (G, N // 8), dtype=torch.int32, device=dev, generator=g)
    q_scale_max = (torch.rand((G,), device=dev, generator=g) * 0.018 + 0.002).half()
    q_invperm = torch.randperm(K, device=dev, generator=g).int()
    return QMatrix.from_exl2(q_weight, q_invperm, q_scale, q_scale_max,
                             torch.tensor(q_groups, dtype=torch.int16, device=dev))


def _exl2_groups(K: int, bpw: float, group: int = GROUP_SIZE) -> List[tuple]:
    """A mix of groups of `group` rows at the two widths around `bpw` (e.g. 4.5: half 5-bit,
    half 4-bit; 6.0: all 6-bit), averaging about `bpw` code bits."""
    n = K // group
    if bpw >= 8:
        return [(8, group)] * n
    if bpw <= 2:
        return [(2, group)] * n
    lo = int(bpw)
    hi = lo + 1 if lo + 1 != 7 else 8
    n_hi = round(n * (bpw - lo) / (hi - lo))
    return [(hi, group)] * n_hi + [(lo, group)] * (n - n_hi)


@dataclass(frozen=True)
class LayerSpec:
    """One benchmark layer: its name (``"<kind> KxN"``) and how to build it."""

    name: str
    build: Callable[[torch.Generator], QMatrix]


def layer_specs(K: int, N: int, fmt: Optional[str] = None, bits: int = 4) -> List[LayerSpec]:
    """The layers of one shape: GPTQ ``bits``-bit g128 act-order and EXL2 at every width of
    EXL2_BPWS (``fmt`` None), or only the layers of ``fmt`` ("exl2", "gptq" or "awq")."""
    shape = f"{K}x{N}"
    specs: List[LayerSpec] = []
    if fmt in (None, "gptq"):
        specs.append(LayerSpec(f"gptq{bits} g128 act {shape}",
                               lambda g: _random_gptq(K, N, GROUP_SIZE, True, g, bits)))
    if fmt == "awq":
        specs.append(LayerSpec(f"awq4 g128 {shape}", lambda g: _random_awq(K, N, GROUP_SIZE, g)))
    if fmt in (None, "exl2"):
        for bpw in EXL2_BPWS:
            build = functools.partial(_random_exl2, K, N, _exl2_groups(K, bpw))
            specs.append(LayerSpec(f"exl2 {bpw}bpw {shape}", build))
    return specs


# ------------------------------------------------------------------ option checks
def check_shape(K: int, N: int) -> Shape:
    """Return (K, N) if every benchmark layer can have that shape, else raise ValueError."""
    if K <= 0 or N <= 0:
        raise ValueError(f"K and N must be positive, got {K}x{N}")
    if K % K_MULTIPLE:
        raise ValueError(f"K must be a multiple of {K_MULTIPLE} (whole groups of {GROUP_SIZE} rows), got K = {K}")
    if N % N_MULTIPLE:
        raise ValueError(f"N must be a multiple of {N_MULTIPLE} (GPTQ 3-bit packs 32 zeros into 3 words), got N = {N}")
    return K, N


def parse_shape(text: str) -> Shape:
    """Parse ``"KxN"`` (e.g. ``"4096x14336"``) and check it with :func:`check_shape`."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"expected KxN with integers K and N (e.g. 4096x14336), got {text!r}")
    return check_shape(int(parts[0]), int(parts[1]))


def check_device(device: Optional[str]) -> torch.device:
    """The device to benchmark on: ``device`` ("cpu", "cuda" or "cuda:N") if usable, or with
    None CUDA when available, else the CPU. Raises ValueError for an unusable device."""
    if device is None:
        from .cli import default_device

        device = default_device()
    try:
        dev = parse_device(device)
    except ValueError:
        raise ValueError(f"expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not built_with_cuda():
            raise ValueError(f"{device!r}: this exl2 was built without CUDA (python -m exl2 info)")
        if not torch.cuda.is_available() or cuda_device_count() == 0:
            raise ValueError(f"{device!r}: no CUDA device is available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{device!r}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def _check_options(fmt: Optional[str], bits: int, dtype: str, ms: Sequence[int]) -> None:
    """ValueError for a format, GPTQ width, dtype or row count run() cannot use."""
    if fmt not in (None,) + FORMATS:
        raise ValueError(f"fmt: expected None or one of {FORMATS}, got {fmt!r}")
    if bits not in GPTQ_BITS:
        raise ValueError(f"bits: expected one of {GPTQ_BITS}, got {bits!r}")
    if bits != 4 and fmt != "gptq":
        raise ValueError(f"bits: {bits} needs fmt='gptq' (EXL2 and AWQ have their own widths)")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected 'float16' or 'bfloat16', got {dtype!r}")
    bad = [m for m in ms if not isinstance(m, int) or m <= 0]
    if bad:
        raise ValueError(f"ms: expected positive integers, got {bad}")


def resolve_shapes(shapes: Optional[Iterable[Shape]], quick: bool, device: torch.device
                   ) -> Tuple[List[Shape], Optional[str]]:
    """The shapes to run and a note to print, if any. Explicit ``shapes`` win; ``quick``
    means QUICK_SHAPES; otherwise SHAPES on CUDA and QUICK_SHAPES on the CPU (with a note)."""
    if shapes is not None and quick:
        raise ValueError("shapes and quick are mutually exclusive")
    if shapes is not None:
        chosen = [check_shape(K, N) for K, N in shapes]
        if not chosen:
            raise ValueError("shapes: expected at least one KxN")
        return chosen, None
    if quick:
        return list(QUICK_SHAPES), None
    if device.type == "cpu":
        shown = " ".join(f"{K}x{N}" for K, N in SHAPES)
        return list(QUICK_SHAPES), f"note: on the CPU only 4096x4096 by default; --shapes {shown} for the full set"
    return list(SHAPES), None


def require_matplotlib() -> Any:
    """matplotlib's Figure class; ImportError with PLOT_HINT when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(PLOT_HINT) from exc
    return Figure


# ------------------------------------------------------------------------- timing
def _graph_time_us(fn: Callable[[], Any], iters: int = _CUDA_GRAPH_CALLS) -> float:
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
    start = time.perf_counter()
    while time.perf_counter() - start < _CUDA_WARMUP_S:
        for _ in range(4):
            graph.replay()
        torch.cuda.synchronize()
    times = []
    for _ in range(_CUDA_REPLAYS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / iters)
    times.sort()
    return times[len(times) // 2]


def _wall_time_us(fn: Callable[[], Any], batches: int = _CPU_BATCHES, min_batch_s: float = _CPU_MIN_BATCH_S) -> float:
    """Wall-clock time per call in µs (CPU): one warm-up call, which also sizes the batches
    (enough calls for ``min_batch_s``), then the median over ``batches`` batches."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = max(1, min(100_000, math.ceil(min_batch_s / max(first, 1e-9))))
    per_call = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        per_call.append((time.perf_counter() - t0) / reps)
    return statistics.median(per_call) * 1e6


def _timer(device: torch.device) -> Timer:
    """CUDA graphs on CUDA, wall-clock batches on the CPU."""
    return _graph_time_us if device.type == "cuda" else _wall_time_us


def _copy_bandwidth(device: torch.device = torch.device("cuda")) -> float:
    """Copy bandwidth of ``device`` in bytes/s (a large tensor copy_, bytes read + written),
    timed like the layers (``_timer``)."""
    n = _COPY_BYTES[device.type]
    a = torch.zeros(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    if device.type == "cuda":
        us = _graph_time_us(lambda: b.copy_(a), iters=10)
    else:
        us = _wall_time_us(lambda: b.copy_(a))
    del a, b
    return 2 * n / (us * 1e-6)


# -------------------------------------------------------------------------- setup
@dataclass
class BenchSetup:
    """What every measurement of one run shares."""

    device: torch.device
    device_name: str
    dtype: str  # activation/output dtype of matmul
    dense_dtype: str  # dtype of the dense baseline (float32 on the CPU)
    timer: Timer
    timing: str  # how times are measured, in words
    bandwidth: float  # copy bandwidth, bytes/s
    generator: torch.Generator


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} ({torch.get_num_threads()} torch threads)"


def _cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else its architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _make_setup(device: torch.device, dtype: str) -> BenchSetup:
    """Measure the copy bandwidth and collect the run's settings."""
    if device.type == "cuda":
        dense_dtype = dtype
        timing = (f"CUDA-graph replay time per call, microseconds (median of {_CUDA_REPLAYS} replays of "
                  f"{_CUDA_GRAPH_CALLS} calls, after {_CUDA_WARMUP_S * 1e3:.0f} ms of warm-up replays)")
    else:
        dense_dtype = "float32"
        timing = (f"wall-clock time per call, microseconds (time.perf_counter; median of {_CPU_BATCHES} batches "
                  f"of at least {_CPU_MIN_BATCH_S * 1e3:.0f} ms after a warm-up call)")
    return BenchSetup(device=device, device_name=_device_name(device), dtype=dtype, dense_dtype=dense_dtype,
                      timer=_timer(device), timing=timing, bandwidth=_copy_bandwidth(device),
                      generator=torch.Generator(device=device).manual_seed(0))


EAGER_CALLS = 1000


def _eager_wall_us(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Wall-clock microseconds per call of ``fn``: the best of 3 runs of ``calls`` calls back to
    back with one synchronisation at the end, after 20 warm-up calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize(device)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def eager_call_us(setup: BenchSetup, calls: int = EAGER_CALLS) -> Dict[str, float]:
    """Host overhead as a caller sees it (CUDA): wall-clock time per eager ``QMatrix.matmul``
    at m = 1 on a 4096 x 4096 GPTQ-4 act-order layer, ``calls`` calls back to back (each
    allocating its output, as a caller would) and one synchronisation at the end; next to it
    the same call's CUDA-graph replay time (the GPU's share) and, timed the same way, a bare
    ``torch.add`` on the same activation row: the host's own cost per launch, which varies
    between machines (and between processes on one machine) as much as the matmul's does."""
    q = _random_gptq(4096, 4096, GROUP_SIZE, True, setup.generator)
    try:
        x = torch.randn((1, 4096), dtype=_DTYPES[setup.dtype], device=setup.device, generator=setup.generator)
        eager = _eager_wall_us(lambda: q.matmul(x), calls, setup.device)
        y = torch.empty_like(x)
        torch_add = _eager_wall_us(lambda: torch.add(x, 1.0, out=y), calls, setup.device)
        return {"eager_us": eager, "graph_us": _graph_time_us(lambda: q.matmul(x)), "torch_add_us": torch_add,
                "calls": calls}
    finally:
        q.close()


def _on_device(device: torch.device) -> ContextManager[Any]:
    """Make a CUDA device current for the duration (nothing for the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------- measuring
def _dense_time(w: torch.Tensor, x: torch.Tensor, setup: BenchSetup) -> float:
    """Time dense torch.matmul of ``x`` with the weight ``w`` (already in the dense dtype): in
    the activation dtype on CUDA, in float32 on the CPU (``x.float() @ W32``)."""
    out = torch.empty((x.shape[0], w.shape[1]), dtype=w.dtype, device=setup.device)
    if setup.device.type == "cuda":
        return setup.timer(lambda: torch.matmul(x, w, out=out))
    return setup.timer(lambda: torch.matmul(x.float(), w, out=out))


def make_row(name: str, K: int, N: int, m: int, bpw: float, exl2_us: float, dense_us: float, floor_us: float,
             setup: BenchSetup) -> Dict[str, Any]:
    """One result row; ``tb_s`` counts the stored weight bytes (bpw * K * N / 8) only."""
    weight_bytes = bpw * K * N / 8
    return dict(layer=name, K=K, N=N, m=m, bpw=bpw, exl2_us=exl2_us, dense_us=dense_us, floor_us=floor_us,
                vs_floor=exl2_us / floor_us, vs_dense=exl2_us / dense_us,
                tb_s=weight_bytes / (exl2_us * 1e-6) / 1e12, pct_floor=100 * floor_us / exl2_us,
                dtype=setup.dtype, dense_dtype=setup.dense_dtype)


def bench_shape(K: int, N: int, specs: Sequence[LayerSpec], ms: Sequence[int], setup: BenchSetup
                ) -> List[Dict[str, Any]]:
    """Measure every layer of one shape at every m; returns (and prints, once the shape is done)
    the rows layer by layer. The dense baseline is timed once per m, with the first layer's
    dequantized weight.

    The rows are measured in increasing m, every layer at one m before the next m. The large
    GEMMs (m >= 512: the dense baseline, and the dense route) hold an H100 at its power limit,
    which lowers the SM clock for a while after them. Measured layer by layer, each layer's decode
    rows followed the previous layer's m = 2048 rows: the SM clock was 1260-1700 MHz during a full
    run against 1980 MHz in a short one, and the kernels whose time follows the SM clock (the
    tensor-core kernel at m = 16 / 32, issue-bound) measured up to 10% slower than in runs of those
    rows alone (8192 x 28672 GPTQ-4 m = 16: 69-70 us in four of five full runs, 63-67 us alone)."""
    dev, g, tdtype = setup.device, setup.generator, _DTYPES[setup.dtype]
    xs = {m: torch.randn((m, K), dtype=torch.float32, device=dev, generator=g).to(tdtype) for m in ms}
    layers = []
    rows: List[List[Dict[str, Any]]] = [[] for _ in specs]
    try:
        for spec in specs:
            layers.append(spec.build(g))
        dense_w = layers[0].dequantize(tdtype).to(_DENSE_DTYPES[setup.dense_dtype])
        # The floor: the layer's weight bytes as stored (codes, scales, zeros; bits_per_weight),
        # which is what a kernel must read at least once. (q.nbytes, what the QMatrix holds on
        # the device, counts the tensor-core stream's 512-byte group headers and its columns padded
        # to tiles of 128, or in the canonical layout the fp16 scales expanded per column.)
        bpws = [q.bits_per_weight for q in layers]
        floors_us = [bpw * K * N / 8 / setup.bandwidth * 1e6 for bpw in bpws]
        for m, x in xs.items():
            dense_us = _dense_time(dense_w, x, setup)
            out = torch.empty((m, N), dtype=tdtype, device=dev)
            for i, (spec, q) in enumerate(zip(specs, layers)):
                t_q = setup.timer(lambda: q.matmul(x, out=out))
                rows[i].append(make_row(spec.name, K, N, m, bpws[i], t_q, dense_us, floors_us[i], setup))
        del dense_w
    finally:
        for q in layers:
            q.close()
    flat = [row for layer_rows in rows for row in layer_rows]
    for row in flat:
        print(format_row(row), flush=True)
    return flat


# ------------------------------------------------------------------------- output
_COLUMNS = (("layer", "<28"), ("m", ">5"), ("exl2 us", ">9"), ("TB/s", ">8"), ("% floor", ">7"),
            ("dense us", ">9"), ("floor us", ">9"), ("x floor", ">7"), ("x dense", ">7"))


def _bandwidth_text(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e12:.2f} TB/s" if bytes_per_s >= 1e11 else f"{bytes_per_s / 1e9:.1f} GB/s"


def header_lines(setup: BenchSetup) -> List[str]:
    """The lines printed above the table: device, bandwidth, dtypes, timing, column names."""
    if setup.device.type == "cuda":
        dense = f"dense baseline: torch.matmul in {setup.dense_dtype}"
    else:
        dense = (f"dense baseline: torch.matmul in {setup.dense_dtype} (x.float() @ W, W converted before timing; "
                 "float16 matmul is slow or missing on the CPU)")
    return [
        f"exl2 {__version__} bench on {setup.device_name}; copy bandwidth {_bandwidth_text(setup.bandwidth)}; "
        f"dtype {setup.dtype}",
        dense,
        f"timing: {setup.timing}",
        " ".join(f"{name:{spec}}" for name, spec in _COLUMNS),
    ]


def format_row(row: Dict[str, Any]) -> str:
    """One table line, columns as in header_lines."""
    values = (row["layer"], row["m"], f"{row['exl2_us']:.1f}", f"{row['tb_s']:.3g}", f"{row['pct_floor']:.1f}",
              f"{row['dense_us']:.1f}", f"{row['floor_us']:.1f}", f"{row['vs_floor']:.2f}", f"{row['vs_dense']:.2f}")
    return " ".join(f"{v:{spec}}" for v, (_, spec) in zip(values, _COLUMNS))


def write_json(result: Dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def _plot_shape(ax: Any, rows: List[Dict[str, Any]], dense_dtype: str) -> None:
    """One subplot: time vs m (log-log) of every layer of one shape, its floor (dotted, in
    the layer's colour) and the dense baseline (black, dashed)."""
    names = list(dict.fromkeys(r["layer"] for r in rows))
    for i, name in enumerate(names):
        lr = sorted((r for r in rows if r["layer"] == name), key=lambda r: r["m"])
        color = f"C{i}"
        ax.plot([r["m"] for r in lr], [r["exl2_us"] for r in lr], marker="o", markersize=3, color=color,
                label=f"{name.rsplit(' ', 1)[0]} ({lr[0]['bpw']:.2f} bpw)")
        ax.axhline(lr[0]["floor_us"], color=color, linestyle=":", linewidth=1)
    dense = sorted({r["m"]: r["dense_us"] for r in rows}.items())
    ax.plot([m for m, _ in dense], [t for _, t in dense], color="black", linestyle="--", marker="s", markersize=3,
            label=f"dense torch.matmul ({dense_dtype})")
    ax.plot([], [], color="gray", linestyle=":", linewidth=1, label="bandwidth floor (layer's colour)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("m (rows of x)")
    ax.set_ylabel("µs per call")
    ax.set_title(f"{rows[0]['K']} × {rows[0]['N']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def plot(result: Dict[str, Any], path: str) -> None:
    """Draw time vs m per shape (one subplot each) of a run() result into ``path`` (PNG)."""
    Figure = require_matplotlib()
    shapes = list(dict.fromkeys((r["K"], r["N"]) for r in result["rows"]))
    ncols = min(2, len(shapes))
    nrows = math.ceil(len(shapes) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 4.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        _plot_shape(ax, [r for r in result["rows"] if (r["K"], r["N"]) == shape], result["dense_dtype"])
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    fig.suptitle(f"exl2 {result['version']} on {result['device']}, {result['dtype']}: time per call")
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- run
def run(ms: Optional[Sequence[int]] = None, json_path: Optional[str] = None, quick: bool = False,
        fmt: Optional[str] = None, bits: int = 4, dtype: str = "float16", *, device: Optional[str] = None,
        shapes: Optional[Sequence[Shape]] = None, plot_path: Optional[str] = None) -> Dict[str, Any]:
    """Run the benchmark table and print it; optionally write JSON and a plot.

    Args:
        ms: row counts m (default DEFAULT_MS).
        json_path: write the result (the rows and the run's settings) there.
        quick: only QUICK_SHAPES.
        fmt: only the layers of one format ("exl2", "gptq" with ``bits``, or "awq").
        bits: the GPTQ code width (2, 3, 4 or 8; other than 4 only with fmt "gptq").
        dtype: activation/output dtype ("float16" or "bfloat16"), recorded in the output.
        device: "cpu", "cuda" or "cuda:N" (default: CUDA when available, else the CPU).
        shapes: (K, N) pairs instead of the default shapes (not with ``quick``).
        plot_path: draw time vs m per shape there (needs matplotlib; checked first).
    """
    ms = list(ms) if ms else list(DEFAULT_MS)
    _check_options(fmt, bits, dtype, ms)
    if plot_path:
        require_matplotlib()  # before minutes of measuring
    try:
        dev = check_device(device)
    except ValueError as exc:
        raise SystemExit(f"bench: device {exc}") from exc
    shape_list, note = resolve_shapes(shapes, quick, dev)
    if note:
        print(note, flush=True)
    with _on_device(dev):
        setup = _make_setup(dev, dtype)
        print("\n".join(header_lines(setup)), flush=True)
        rows: List[Dict[str, Any]] = []
        for K, N in shape_list:
            rows += bench_shape(K, N, layer_specs(K, N, fmt, bits), ms, setup)
        eager = eager_call_us(setup) if dev.type == "cuda" else None
    if eager:
        print(f"host overhead: eager QMatrix.matmul, m=1, 4096x4096 gptq4 g128 act: {eager['eager_us']:.1f} us per "
              f"call (wall clock, best of 3 runs of {eager['calls']} calls, one sync each); CUDA-graph replay of "
              f"the same call: {eager['graph_us']:.1f} us; a bare torch.add on the same row, timed the same way: "
              f"{eager['torch_add_us']:.1f} us", flush=True)
    result = dict(device=setup.device_name, device_type=dev.type, copy_bandwidth=setup.bandwidth,
                  version=__version__, timing=setup.timing, dtype=dtype, dense_dtype=setup.dense_dtype, rows=rows,
                  eager_m1=eager)
    if json_path:
        write_json(result, json_path)
    if plot_path:
        plot(result, plot_path)
    return result
