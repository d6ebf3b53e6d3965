"""The C++/CPU code under AddressSanitizer + UndefinedBehaviorSanitizer.

Runs scripts/sanitize_cpu.sh: a separate ASan+UBSan build of the static library and the
CTest suite (three runs: default, scalar kernels, 3 threads), a close()-while-gemm()
stress program, and the replay of the libFuzzer regression corpora (fuzz/corpus,
fuzz/corpus_huge) through the fuzzing harness. Measured on a 2-core x86-64 box with GCC 12:
about 2 minutes (build 105 s, CTest + stress 2 s, corpus replay 10 s).

Needs a source checkout, cmake and a compiler with -fsanitize=address,undefined; skipped
otherwise, or when EXL2_TEST_SANITIZERS=0.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sanitize_cpu.sh"
CORPUS = ROOT / "fuzz" / "corpus"
CXX = os.environ.get("CXX", "c++")

pytestmark = [
    pytest.mark.skipif(not SCRIPT.exists() or not (ROOT / "CMakeLists.txt").exists(),
                       reason="needs a source checkout (scripts/sanitize_cpu.sh)"),
    pytest.mark.skipif(shutil.which("cmake") is None or shutil.which(CXX) is None, reason="needs cmake and a C++ compiler"),
    pytest.mark.skipif(os.environ.get("EXL2_TEST_SANITIZERS") == "0", reason="EXL2_TEST_SANITIZERS=0"),
]


def _sanitizers_work(tmp: Path) -> bool:
    src = tmp / "probe.cpp"
    src.write_text("#include <vector>\nint main() { std::vector<int> v(4); return v[1]; }\n")
    r = subprocess.run([CXX, "-fsanitize=address,undefined", str(src), "-o", str(tmp / "probe")],
                       capture_output=True, text=True)
    return r.returncode == 0 and subprocess.run([str(tmp / "probe")]).returncode == 0


def test_sanitizer_toolchain_catches_a_heap_overflow(tmp_path: Path) -> None:
    """The flags the script uses really instrument: a one-past-the-end read must abort."""
    if not _sanitizers_work(tmp_path):
        pytest.skip(f"{CXX} cannot build and run -fsanitize=address,undefined programs here")
    src = tmp_path / "overflow.cpp"
    src.write_text("#include <vector>\nint main(int argc, char**) { std::vector<int> v(4); return v.data()[3 + argc]; }\n")
    exe = tmp_path / "overflow"
    subprocess.run([CXX, "-fsanitize=address,undefined", "-g", "-O1", str(src), "-o", str(exe)], check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr


def test_fuzz_regression_corpus_is_kept() -> None:
    files = [p for p in CORPUS.iterdir() if p.is_file()] if CORPUS.is_dir() else []
    assert len(files) >= 100, f"fuzz/corpus holds {len(files)} inputs"


def test_asan_ubsan_build_ctest_and_corpus(tmp_path: Path) -> None:
    if not _sanitizers_work(tmp_path):
        pytest.skip(f"{CXX} cannot build and run -fsanitize=address,undefined programs here")
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "build")], capture_output=True, text=True,
                       timeout=3600, cwd=str(ROOT))
    dt = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"sanitize_cpu.sh failed after {dt:.0f} s:\n{out[-12000:]}"
    assert "== sanitize_cpu: OK" in r.stdout
    assert "100% tests passed" in r.stdout
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out
    if CORPUS.is_dir():
        assert "replayed" in r.stdout
    print(f"sanitize_cpu.sh: {dt:.0f} s")
