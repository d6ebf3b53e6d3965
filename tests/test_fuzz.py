"""Fuzzing the Python API with malformed inputs, in a subprocess so that a crash is caught.

Hypothesis draws *cases*: a valid random base layer (EXL2, GPTQ of a drawn width 2, 3,
4 or 8, AWQ, or a valid QMatrix of any of them plus float16 or bfloat16 matmul inputs)
and 0..3 mutations of it: wrong dtypes (int64 for int32, ...), ranks, shapes, zero-size
dims, inconsistent groups, bit widths outside {2,3,4,5,6,8}, group rows not summing to
K, q_invperm not a permutation, out-of-range g_idx, unequal act-order groups, GPTQ
``bits`` that are invalid (0, 5, 16, 4.0, True, "4", ...) or disagree with the shapes,
packed shapes that hold no whole number of b-bit rows, group counts not dividing K,
non-contiguous / negative-stride / Fortran / stride-0 / offset views, NaN/Inf scales,
meta and other-device tensors, Python objects instead of tensors, hostile device /
zero_format arguments; for matmul: wrong K, dtype, device, rank, non-contiguous or
aliasing ``out``, an ``out`` of the other 16-bit dtype (bfloat16 x, float16 out: must be
rejected naming ``out``), NaN/Inf/65504 activations, a closed QMatrix.

Each case runs in tests/fuzz_worker.py (one worker process per batch of BATCH cases,
restarted after a crash so the crash is attributed to its case; the crashing case is
saved as JSON, replay it with ``python tests/fuzz_worker.py --replay FILE``).

Outcomes are counted: accepted (valid; then dequantize, in float16 and in bfloat16, must
equal exl2.reference bit for bit, the float16 and bfloat16 GEMMs must be within the
error bound of float64 (fuzz_worker.gemm_problem), and the inputs must be unchanged;
an accepted matmul must equal a clean call on a copy of x and be within that bound of
the reference weight in x's dtype),
TypeError, ValueError, other exception, crash (the worker died) and hang. Asserted:
0 crash, 0 hang, 0 other, 0 wrong results, and every TypeError/ValueError message names
an argument of the call ("q_scale: expected ..."); for a single mutation of one argument
that can be judged on its own (dtype, rank, contiguity, ...), the message names *that*
argument.

Profiles (tests/conftest.py, HYPOTHESIS_PROFILE): "ci" (default) runs CI_EXAMPLES cases
per test (well under a minute in all); "long" runs LONG_EXAMPLES per test and asserts at
least 2,000 malformed (rejected) constructions per format (EXL2, GPTQ of all widths
together, AWQ) and at least MIN_REJECTED_LONG_PER_WIDTH per GPTQ width. The counts are
printed (GPTQ and matmul also per width / format: the "by ..." lines); set
EXL2_FUZZ_REPORT=path.json to also get them as JSON.

Known bugs (KNOWN_BUGS) are counted under "known:<id>" instead of failing the fuzz
tests; each has a strict-xfail test below. When one is fixed, its xfail test starts to
XPASS (and so fails): remove the xfail mark and the KNOWN_BUGS entry.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "fuzz_worker.py"
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
LONG = PROFILE == "long"
CI_EXAMPLES = 150
LONG_EXAMPLES = 5000
N_EXAMPLES = LONG_EXAMPLES if LONG else CI_EXAMPLES
MIN_REJECTED_LONG = 2000
MIN_REJECTED_LONG_PER_WIDTH = 200  # GPTQ: each of 2, 3, 4 and 8 bits
BATCH = 400            # cases per worker process
CASE_TIMEOUT_S = 120.0  # a case taking longer is a hang

sys.path.insert(0, str(HERE))
import fuzz_worker as FW  # noqa: E402


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


HAS_CUDA = _cuda_available()


# ----------------------------------------------------------------------------- the worker
class FuzzWorker:
    """A persistent subprocess running cases; restarted every BATCH cases and after a crash."""

    def __init__(self, crash_dir: Path, env: Optional[Dict[str, str]] = None,
                 case_timeout: float = CASE_TIMEOUT_S) -> None:
        self.crash_dir = crash_dir
        self.case_timeout = case_timeout
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None
        self.count = 0
        self.restarts = 0
        self._buf = b""
        self._stderr: Optional[Any] = None

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=self.env, cwd=str(HERE))
        self._buf = b""
        self.count = 0
        ready = self._read_line(180.0)
        if ready is None:
            raise RuntimeError(f"fuzz worker did not start:\n{self._stderr_tail()}")
        self.restarts += 1

    def _stderr_tail(self, n: int = 4000) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-n:]

    def _read_line(self, timeout: float) -> Optional[Dict[str, Any]]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None  # EOF: the worker died
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _save(self, case: Dict[str, Any], res: Dict[str, Any]) -> Path:
        self.crash_dir.mkdir(parents=True, exist_ok=True)
        path = self.crash_dir / f"{res['outcome']}-{abs(hash(json.dumps(case, sort_keys=True))) % 10**10}.json"
        path.write_text(json.dumps({"case": case, "result": res}, indent=1, default=str))
        return path

    def run(self, case: Dict[str, Any]) -> Dict[str, Any]:
        if self.proc is None or self.count >= BATCH:
            self.stop()
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.count += 1
        try:
            self.proc.stdin.write((json.dumps(case) + "\n").encode())
            self.proc.stdin.flush()
            res = self._read_line(self.case_timeout)
        except BrokenPipeError:
            res = None
        except TimeoutError:
            self.proc.kill()
            self.proc.wait()
            res = {"outcome": "hang", "message": f"no result after {self.case_timeout} s", "stderr": self._stderr_tail()}
            self.proc = None
            res["saved"] = str(self._save(case, res))
            return res
        if res is None:
            rc = self.proc.wait()
            res = {"outcome": "crash", "returncode": rc, "message": f"worker died with returncode {rc}",
                   "stderr": self._stderr_tail()}
            self.proc = None
            res["saved"] = str(self._save(case, res))
        return res


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):
    crash_dir = Path(os.environ.get("EXL2_FUZZ_CRASH_DIR", tmp_path_factory.mktemp("fuzz_crashes")))
    w = FuzzWorker(crash_dir)
    yield w
    w.stop()


# ----------------------------------------------------------------------------- strategies
BITS = (8, 6, 5, 4, 3, 2)
ROWS_UNIT = {2: 16, 3: 32, 4: 8, 5: 32, 6: 16, 8: 4}  # whole words of b-bit rows
GENERIC_KINDS = ["set", "set", "set_random", "garbage", "dtype", "dtype", "resize", "zero_dim", "rank",
                 "transpose", "none", "pyobj", "swap"]
VIEW_KINDS = ["noncontig", "negstride", "fortran", "offset", "expand", "meta", "bigendian", "readonly", "dlpack",
              "torch_dtype", "requires_grad"]
EXL2_KINDS = ["bits", "bits", "start", "start", "groups_len", "perm_dup", "perm_range", "perm_swap", "k_change",
              "k_change", "prescaled", "device_arg"]
GPTQ_KINDS = ["gidx_range", "gidx_move", "gidx_move", "gidx_shuffle", "regroup", "regroup", "zero_format",
              "device_arg", "gptq_bits", "gptq_bits", "gptq_width", "gptq_width", "gptq_pad"]
AWQ_KINDS = ["regroup", "regroup", "device_arg"]
SEMANTIC_ARG = {"bits": "q_groups", "start": "q_groups", "groups_len": "q_groups", "gidx_range": "g_idx",
                "gidx_move": "g_idx", "gidx_shuffle": "g_idx", "gptq_pad": "qweight"}
ARG_OF_KIND = {"device_arg": "device", "zero_format": "zero_format", "prescaled": "scale_max_prescaled",
               "gptq_bits": "bits", "gptq_width": "bits"}
# Mutations whose error is decided by the mutated argument alone: the message must name it.
LOCAL_KINDS = {"dtype", "zero_dim", "rank", "transpose", "pyobj", "noncontig", "fortran", "negstride", "meta",
               "bigendian", "torch_dtype", "device_arg", "zero_format", "gptq_bits"}
FORMATS = ("exl2", "gptq", "awq")
GPTQ_WIDTHS = (4, 2, 3, 8)  # 4 first: hypothesis shrinks towards it
GPTQ_K_UNIT = {2: 16, 3: 32, 4: 8, 8: 4}  # rows that fill whole words of b-bit codes
GPTQ_N_UNIT = {2: 16, 3: 32, 4: 8, 8: 8}  # N a multiple of 8 with N*b/32 whole qzeros words


def _device_view_kinds(device: str) -> List[str]:
    if device == "cuda":
        return ["cpu"]  # a host tensor for a CUDA target (allowed)
    return ["cuda"] if HAS_CUDA else []  # a CUDA tensor for a CPU target (copied or refused)


@st.composite
def exl2_layers(draw: Callable) -> Dict[str, Any]:
    n = draw(st.integers(1, 4))
    bits = sorted(draw(st.lists(st.sampled_from(BITS), min_size=n, max_size=n)), reverse=True)
    groups = [[b, ROWS_UNIT[b] * draw(st.integers(1, 3))] for b in bits[:-1]] + [[bits[-1], draw(st.integers(1, 48))]]
    return {"N": 8 * draw(st.integers(1, 4)), "groups": groups, "permute": draw(st.booleans()),
            "q_perm": draw(st.booleans()), "bias": draw(st.booleans())}


@st.composite
def gptq_layers(draw: Callable) -> Dict[str, Any]:
    """K = G * gs rows of b-bit codes filling whole words (groups need not: e.g. 3-bit
    groups of 16 rows, 8-bit groups of 2), N a multiple of 8 filling whole qzeros words."""
    bits = draw(st.sampled_from(GPTQ_WIDTHS))
    G = draw(st.integers(1, 4))
    step = GPTQ_K_UNIT[bits] // math.gcd(GPTQ_K_UNIT[bits], G)
    gs = step * draw(st.integers(1, max(1, min(4, 192 // (G * step)))))
    unit_n = GPTQ_N_UNIT[bits]
    return {"N": unit_n * draw(st.integers(1, max(2, 32 // unit_n))), "G": G, "gs": gs, "bits": bits,
            "omit_bits": bits == 4 and draw(st.booleans()),  # rely on the default bits=4
            "act_order": draw(st.booleans()), "g_idx": draw(st.booleans()), "bias": draw(st.booleans()),
            "zero_format": draw(st.sampled_from(["v1", "v2"]))}


@st.composite
def awq_layers(draw: Callable) -> Dict[str, Any]:
    """AWQ: any group size dividing K (groups of 5 or 3 rows included), N a multiple of 8."""
    return {"N": 8 * draw(st.integers(1, 4)), "G": draw(st.integers(1, 4)), "gs": draw(st.integers(1, 40)),
            "bias": draw(st.booleans())}


def layers(fmt: str) -> st.SearchStrategy:
    return {"exl2": exl2_layers, "gptq": gptq_layers, "awq": awq_layers}[fmt]()


def mutation(fmt: str, device: str) -> st.SearchStrategy:
    args = list(FW.REQUIRED[fmt] + {"exl2": FW.EXL2_OPTIONAL, "gptq": FW.GPTQ_OPTIONAL, "awq": FW.AWQ_OPTIONAL}[fmt])
    kinds = GENERIC_KINDS + VIEW_KINDS + _device_view_kinds(device) + \
        {"exl2": EXL2_KINDS, "gptq": GPTQ_KINDS, "awq": AWQ_KINDS}[fmt]

    @st.composite
    def one(draw: Callable) -> Dict[str, Any]:
        kind = draw(st.sampled_from(kinds))
        if kind in SEMANTIC_ARG:
            arg = SEMANTIC_ARG[kind]
        elif kind in ("perm_dup", "perm_range", "perm_swap"):
            arg = draw(st.sampled_from(["q_invperm", "q_invperm", "q_perm"]))
        else:
            arg = ARG_OF_KIND.get(kind) or draw(st.sampled_from(args))
        return {"kind": kind, "arg": arg, "a": draw(st.integers(0, 2**16)), "b": draw(st.integers(0, 2**16))}

    return one()


@st.composite
def construction_cases(draw: Callable, fmt: str, device: str) -> Dict[str, Any]:
    n_mut = draw(st.sampled_from([0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3]))
    container = draw(st.sampled_from(["torch", "torch", "numpy"]))
    # numpy arrays live on the host: a CUDA target must then be named explicitly
    explicit = True if (device == "cuda" and container == "numpy") else draw(st.booleans())
    return {"api": fmt, "device": device, "seed": draw(st.integers(0, 2**31)),
            "layer": draw(layers(fmt)),
            "container": container, "explicit_device": explicit,
            "mutations": draw(st.lists(mutation(fmt, device), min_size=n_mut, max_size=n_mut))}


MATMUL_X_KINDS = ["set", "dtype", "dtype", "resize", "resize", "zero_dim", "rank", "rank", "transpose", "none",
                  "pyobj", "x_values", "x_values", "noncontig", "negstride", "fortran", "offset", "expand", "meta",
                  "readonly", "dlpack", "torch_dtype", "requires_grad"]
MATMUL_OUT_KINDS = ["out_alloc", "out_alloc", "out_alloc", "noncontig", "offset", "expand", "meta", "dtype",
                    "pyobj", "rank", "requires_grad"]


@st.composite
def matmul_cases(draw: Callable, device: str, dtype: str = "float16") -> Dict[str, Any]:
    """A valid QMatrix (any format, GPTQ of any width) and x of ``dtype`` (float16 or
    bfloat16; a "dtype" mutation of x may change it), out of x's dtype when allocated."""
    fmt = draw(st.sampled_from(FORMATS))
    layer = draw(layers(fmt))
    layer.update(fmt=fmt, dtype=dtype, M=draw(st.sampled_from([0, 1, 2, 3, 5, 8, 9, 17, 33])),
                 x_scale=draw(st.sampled_from([1.0, 100.0, 1e-3])))
    muts = []
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3]))):
        target = draw(st.sampled_from(["x", "x", "out", "close"]))
        if target == "close":
            muts.append({"kind": "close", "arg": "", "a": 0, "b": 0})
            continue
        kinds = MATMUL_X_KINDS if target == "x" else MATMUL_OUT_KINDS
        kind = draw(st.sampled_from(kinds + _device_view_kinds(device)))
        muts.append({"kind": kind, "arg": target, "a": draw(st.integers(0, 2**16)), "b": draw(st.integers(0, 2**16))})
    if draw(st.booleans()) and not any(m["kind"] == "out_alloc" for m in muts):
        muts.append({"kind": "out_alloc", "arg": "out", "a": 0, "b": 0})  # a valid out most of the time
    return {"api": "matmul", "device": device, "seed": draw(st.integers(0, 2**31)), "layer": layer,
            "container": draw(st.sampled_from(["torch", "torch", "numpy"])), "explicit_device": False,
            "mutations": muts}


# ----------------------------------------------------------------------------- judging
def _names_in_prefix(message: str, names) -> List[str]:
    """Argument names in the message's subject (the text before its first ': ')."""
    head = message.split(": ", 1)[0] if ": " in message else ""
    return [n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", head)]


def _kinds(case: Dict[str, Any]) -> set:
    return {m["kind"] for m in case["mutations"]}


# Known bugs: (id, predicate(case, result)). See the strict-xfail tests at the bottom.
KNOWN_BUGS: List[tuple] = [
    # none open: the bugs this fuzzer found (unnamed numpy/DLPack conversion errors, meta
    # tensors blamed on `device`, empty x/out with numpy's (0, 0) strides) are fixed and
    # their regression tests are at the bottom of this file
]

# out_alloc modes (fuzz_worker.run_matmul) that give a valid out buffer
VALID_OUT_MODES = (0, 3, 4)  # fresh, adjacent, offset


def must_accept(case: Dict[str, Any]) -> bool:
    """Cases whose inputs are valid by construction."""
    muts = case["mutations"]
    if case["api"] != "matmul":
        return not muts
    return all(m["kind"] == "out_alloc" and m["b"] % 6 in VALID_OUT_MODES for m in muts)


OOM_MESSAGES = ("can't allocate memory", "out of memory", "CUDA out of memory")


def classify(case: Dict[str, Any], res: Dict[str, Any]) -> str:
    outcome = res["outcome"]
    if outcome == "other" and res.get("exc_type") in ("RuntimeError", "MemoryError", "OutOfMemoryError") \
            and any(s in res.get("message", "") for s in OOM_MESSAGES) and "expand" in _kinds(case):
        # a valid but enormous stride-0 view (2^40 rows) that matmul must materialise: an
        # allocation failure is the honest answer (no crash, no wrong numbers)
        return "out_of_memory"
    if outcome in ("TypeError", "ValueError", "other"):
        for bug_id, pred in KNOWN_BUGS:
            if pred(case, res):
                return f"known:{bug_id}"
    if outcome == "accepted" and res.get("wrong"):
        return "wrong"
    return outcome


def judge(case: Dict[str, Any], res: Dict[str, Any], kind: str) -> Optional[str]:
    """None when the outcome is acceptable, else what is wrong with it."""
    if kind in ("crash", "hang", "other", "wrong", "harness_error"):
        return f"{kind}: {res.get('message') or res.get('wrong')}"
    if kind.startswith("known:"):
        return None
    if must_accept(case) and kind != "accepted":
        return f"valid input rejected: {kind}: {res.get('message', '')[:300]}"
    if kind not in ("TypeError", "ValueError"):
        return None
    names = FW.ARGS[case["api"]]
    msg = res["message"]
    if "close" in _kinds(case) and kind == "ValueError" and "QMatrix is closed" in msg:
        return None  # a closed QMatrix (other malformed inputs may be reported first)
    if "incompatible function arguments" in msg:
        return f"{kind} from the nanobind layer (no argument named): {msg[:300]}"
    named = _names_in_prefix(msg, names)
    if not named:
        return f"{kind} message does not name an argument: {msg[:300]}"
    muts = case["mutations"]
    if res.get("mixed") and "out" not in named and not any(m["arg"] == "x" or m["kind"] == "close" for m in muts):
        return f"{kind} for x and out of different dtypes (x unmutated) names {named}, not 'out': {msg[:300]}"
    if case["api"] != "matmul" and len(muts) == 1 and muts[0]["kind"] in LOCAL_KINDS:
        arg = muts[0]["arg"]
        if arg not in named and not (muts[0]["kind"] == "none" and arg in ("q_perm", "bias", "g_idx")):
            return f"{kind} after mutating only {arg!r} ({muts[0]['kind']}) names {named} instead: {msg[:300]}"
    return None


def _report(label: str, stats: Counter, elapsed: float, capsys: pytest.CaptureFixture,
            by: Optional[Dict[str, Counter]] = None, by_name: str = "") -> None:
    line = f"[fuzz {PROFILE}] {label}: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())) + \
        f" (total {sum(stats.values())}, {elapsed:.1f} s)"
    if by:
        line += f"\n[fuzz {PROFILE}] {label} by {by_name}: " + "; ".join(
            f"{g}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())) for g, c in sorted(by.items()))
    with capsys.disabled():
        print("\n" + line)
    path = os.environ.get("EXL2_FUZZ_REPORT")
    if path:
        data = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        data[label] = {"profile": PROFILE, "counts": dict(stats), "seconds": round(elapsed, 1)}
        if by:
            data[label]["by_" + by_name] = {g: dict(c) for g, c in sorted(by.items())}
        Path(path).write_text(json.dumps(data, indent=1))


def _bucket(kind: str) -> str:
    """accepted / rejected (TypeError, ValueError, known bugs) / the outcome itself."""
    return "rejected" if kind in ("TypeError", "ValueError") or kind.startswith("known:") else kind


def gptq_width(case: Dict[str, Any]) -> str:
    return f"bits={case['layer'].get('bits', 4)}"


def matmul_format(case: Dict[str, Any]) -> str:
    lay = case["layer"]
    return "gptq%d" % lay.get("bits", 4) if lay["fmt"] == "gptq" else lay["fmt"]


def run_fuzz(worker: FuzzWorker, strategy: st.SearchStrategy, label: str,
             capsys: pytest.CaptureFixture, group: Optional[Callable[[Dict[str, Any]], str]] = None,
             by: Optional[Dict[str, Counter]] = None, by_name: str = "") -> Counter:
    """Run the cases; ``group`` (with ``by``, filled here) also counts accepted / rejected
    per group of cases (GPTQ width, matmul format)."""
    stats: Counter = Counter()
    t0 = time.monotonic()

    @settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=strategy)
    def run(case: Dict[str, Any]) -> None:
        res = worker.run(case)
        kind = classify(case, res)
        stats[kind] += 1
        if group is not None and by is not None:
            by.setdefault(group(case), Counter())[_bucket(kind)] += 1
        problem = judge(case, res, kind)
        if problem:
            detail = {k: res.get(k) for k in ("saved", "traceback", "stderr") if res.get(k)}
            raise AssertionError(f"{problem}\ncase: {json.dumps(case)}\n{json.dumps(detail, indent=1)[:6000]}")

    try:
        run()
    finally:
        _report(label, stats, time.monotonic() - t0, capsys, by, by_name)
    return stats


def _check_skips(stats: Counter) -> None:
    """Cases the harness could not set up must stay rare, or the counts mean little."""
    assert stats["skipped"] <= 0.02 * sum(stats.values()), stats


def _rejected(stats: Counter) -> int:
    return sum(v for k, v in stats.items() if k in ("TypeError", "ValueError") or k.startswith("known:"))


# ----------------------------------------------------------------------------- the fuzz tests
def _fuzz_construction(worker: FuzzWorker, fmt: str, device: str, capsys: pytest.CaptureFixture) -> None:
    by: Dict[str, Counter] = {}
    stats = run_fuzz(worker, construction_cases(fmt, device), f"construction {fmt} {device}", capsys,
                     gptq_width if fmt == "gptq" else None, by, "width")
    assert stats["accepted"] > 0 and _rejected(stats) > 0
    if LONG:
        assert _rejected(stats) >= MIN_REJECTED_LONG, stats
        if fmt == "gptq":  # every width gets its share
            for b in GPTQ_WIDTHS:
                assert by.get(f"bits={b}", Counter())["rejected"] >= MIN_REJECTED_LONG_PER_WIDTH, by


def _fuzz_matmul(worker: FuzzWorker, device: str, dtype: str, capsys: pytest.CaptureFixture) -> None:
    label = f"matmul {device}" if dtype == "float16" else f"matmul bf16 {device}"
    by: Dict[str, Counter] = {}
    stats = run_fuzz(worker, matmul_cases(device, dtype), label, capsys, matmul_format, by, "format")
    assert stats["accepted"] > 0 and _rejected(stats) > 0
    _check_skips(stats)
    if LONG:  # every format accepted and rejected
        for fmt in ("exl2", "awq") + tuple(f"gptq{b}" for b in GPTQ_WIDTHS):
            assert by.get(fmt, Counter())["accepted"] > 0 and by[fmt]["rejected"] > 0, by


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_construction_cpu(worker: FuzzWorker, fmt: str, capsys: pytest.CaptureFixture) -> None:
    _fuzz_construction(worker, fmt, "cpu", capsys)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fuzz_matmul_cpu(worker: FuzzWorker, dtype: str, capsys: pytest.CaptureFixture) -> None:
    _fuzz_matmul(worker, "cpu", dtype, capsys)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_construction_cuda(worker: FuzzWorker, fmt: str, capsys: pytest.CaptureFixture) -> None:
    _fuzz_construction(worker, fmt, "cuda", capsys)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fuzz_matmul_cuda(worker: FuzzWorker, dtype: str, capsys: pytest.CaptureFixture) -> None:
    _fuzz_matmul(worker, "cuda", dtype, capsys)


# ----------------------------------------------------------------------------- the harness itself
def test_worker_attributes_crashes_and_hangs(tmp_path: Path) -> None:
    """The machinery itself: a worker killed by a signal is reported as a crash of that case
    (saved as JSON), a case that never returns as a hang, and the next case runs in a fresh worker."""
    w = FuzzWorker(tmp_path, case_timeout=5.0)
    valid = {"api": "exl2", "device": "cpu", "seed": 1, "layer": {"N": 8, "groups": [[4, 16]]},
             "container": "torch", "explicit_device": False, "mutations": []}
    try:
        assert w.run(valid)["outcome"] == "accepted"
        res = w.run({"api": "__selftest_crash__"})
        assert res["outcome"] == "crash" and res["returncode"] < 0 and Path(res["saved"]).exists(), res
        assert w.run(valid)["outcome"] == "accepted"
        res = w.run({"api": "__selftest_hang__"})
        assert res["outcome"] == "hang" and Path(res["saved"]).exists(), res
        assert w.run(valid)["outcome"] == "accepted"
    finally:
        w.stop()


def test_valid_base_layers_are_accepted(worker: FuzzWorker) -> None:
    """Without mutations every generated layer builds and matches the reference."""
    for fmt, layer in [("exl2", {"N": 16, "groups": [[8, 4], [6, 16], [5, 32], [3, 32], [2, 17]], "q_perm": True,
                                 "bias": True}),
                       ("gptq", {"N": 24, "G": 3, "gs": 16, "act_order": True, "bias": True, "zero_format": "v2"}),
                       ("gptq", {"N": 32, "G": 2, "gs": 16, "bits": 3, "act_order": True, "bias": True}),
                       ("gptq", {"N": 16, "G": 4, "gs": 4, "bits": 2, "g_idx": True}),
                       ("gptq", {"N": 8, "G": 2, "gs": 6, "bits": 8, "act_order": True, "zero_format": "v2"}),
                       ("awq", {"N": 16, "G": 3, "gs": 5, "bias": True}),
                       ("awq", {"N": 8, "G": 1, "gs": 40})]:
        for container in ("torch", "numpy"):
            res = worker.run({"api": fmt, "device": "cpu", "seed": 5, "layer": layer, "container": container,
                              "explicit_device": True, "mutations": []})
            assert res["outcome"] == "accepted" and not res.get("wrong"), res


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_out_of_the_other_dtype_is_rejected(worker: FuzzWorker, fmt: str, dtype: str) -> None:
    """The mixed-dtype cases the matmul fuzzing relies on: a valid x and out of the other
    16-bit dtype (b even: bfloat16 x with float16 out and vice versa) is a TypeError naming out."""
    layer = {"exl2": {"N": 16, "groups": [[4, 32]]}, "gptq": {"N": 32, "G": 1, "gs": 32, "bits": 3},
             "awq": {"N": 8, "G": 2, "gs": 3}}[fmt]
    layer.update(fmt=fmt, dtype=dtype, M=2, x_scale=1.0)
    case = {"api": "matmul", "device": "cpu", "seed": 1, "layer": layer, "container": "torch",
            "explicit_device": False, "mutations": [{"kind": "out_alloc", "arg": "out", "a": 0, "b": 0},
                                                    {"kind": "dtype", "arg": "out", "a": 0, "b": 0}]}
    res = worker.run(case)
    assert res["outcome"] == "TypeError" and res["mixed"] and res["message"].startswith("out:"), res
    case["mutations"] = case["mutations"][:1]
    res = worker.run(case)
    assert res["outcome"] == "accepted" and not res["wrong"] and not res["mixed"], res


# ----------------------------------------------------------------------------- regressions of fixed bugs
def _small_exl2():
    from exl2 import reference as R

    return R.random_exl2(np.random.default_rng(0), 64, 16, bits=4, group_size=32)


def _build_exl2(**override):
    import exl2

    d = {k: v for k, v in _small_exl2().items() if k in FW.EXL2_REQUIRED}
    d.update(override)
    return exl2.QMatrix.from_exl2(*[d[k] for k in FW.EXL2_REQUIRED])


@pytest.mark.parametrize("flavor", ["negative_strides", "byte_swapped", "object_dtype"])
def test_numpy_conversion_errors_are_named_or_copied(flavor: str) -> None:
    layer = _small_exl2()
    a = layer["q_weight"]
    bad = {"negative_strides": lambda: np.flip(np.flip(a).copy()),  # same values, negative strides
           "byte_swapped": lambda: a.astype(">i4"),                 # same values, big-endian
           "object_dtype": lambda: a.astype(object)}[flavor]()
    try:
        q = _build_exl2(q_weight=bad)
    except (TypeError, ValueError) as exc:
        assert str(exc).startswith("q_weight:"), str(exc)
    else:  # copying / converting is fine too, if the result is right
        assert np.array_equal(q.dequantize().numpy(), layer["weight"])


@pytest.mark.parametrize("flavor", ["meta", "requires_grad"])
def test_dlpack_export_error_is_named(flavor: str) -> None:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(_small_exl2()["q_scale_max"]).astype(np.float32))
    t = t.to("meta") if flavor == "meta" else t.requires_grad_(True)
    with pytest.raises((TypeError, ValueError)) as info:
        _build_exl2(q_scale_max=FW._DLPackOnly(t))
    assert str(info.value).startswith("q_scale_max:"), str(info.value)


@pytest.mark.parametrize("which", ["x", "out"])
def test_empty_matmul_with_numpy_strides(which: str) -> None:
    import torch

    import exl2
    from exl2 import reference as R

    layer = R.random_gptq(np.random.default_rng(0), 64, 16, group_size=32)
    with exl2.QMatrix.from_gptq(layer["qweight"], layer["qzeros"], layer["scales"]) as q:
        x = np.zeros((0, 64), np.float16)  # strides (0, 0)
        if which == "x":
            y = q.matmul(x)
        else:
            y = q.matmul(torch.zeros((0, 64), dtype=torch.float16), out=torch.from_numpy(np.zeros((0, 16), np.float16)))
        assert tuple(y.shape) == (0, 16)


@pytest.mark.parametrize("name", ["q_weight", "q_scale"])
def test_meta_tensor_is_named(name: str) -> None:
    import torch

    layer = _small_exl2()
    t = torch.from_numpy(np.ascontiguousarray(layer[name])).to("meta")
    with pytest.raises((TypeError, ValueError)) as info:
        _build_exl2(**{name: t})
    assert str(info.value).startswith(f"{name}:"), str(info.value)
