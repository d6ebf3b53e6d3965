"""The C++ side without Python: a plain CMake build (EXL2_PYTHON=OFF) of the static
library, its CTest suite, `cmake --install`, and the example consumer built against the
installed prefix with find_package(exl2). CPU-only (EXL2_CUDA=OFF) to keep CI lean; the
CUDA variant runs on a GPU machine with EXL2_TEST_CPP_CUDA=1."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or not (ROOT / "CMakeLists.txt").exists(),
    reason="needs cmake and a source checkout",
)


def sh(*cmd: str, cwd: Path = ROOT) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def test_cmake_build_ctest_install_and_example(tmp_path: Path) -> None:
    build, prefix, ex_build = tmp_path / "build", tmp_path / "prefix", tmp_path / "example"
    cuda = "ON" if os.environ.get("EXL2_TEST_CPP_CUDA") == "1" else "OFF"
    jobs = str(os.cpu_count() or 2)
    sh("cmake", "-S", str(ROOT), "-B", str(build), "-DEXL2_PYTHON=OFF", f"-DEXL2_CUDA={cuda}",
       "-DEXL2_CUDA_ARCHITECTURES=host", "-DCMAKE_BUILD_TYPE=Release")
    sh("cmake", "--build", str(build), "--parallel", jobs)
    out = sh("ctest", "--test-dir", str(build), "--output-on-failure")
    assert "100% tests passed" in out
    sh("cmake", "--install", str(build), "--prefix", str(prefix))
    assert (prefix / "include" / "exl2" / "qmatrix.hpp").exists()
    assert list(prefix.glob("lib*/cmake/exl2/exl2Config.cmake"))
    assert list(prefix.glob("lib*/cmake/exl2/exl2ConfigVersion.cmake"))
    assert list(prefix.glob("lib*/libexl2.a"))
    sh("cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(ex_build), f"-DCMAKE_PREFIX_PATH={prefix}")
    sh("cmake", "--build", str(ex_build), "--parallel", jobs)
    exe = ex_build / "exl2_example"
    out = sh(str(exe))
    assert "example passed" in out
    assert "cpu: max |error| vs dense = 0" in out


@pytest.mark.skipif(shutil.which(os.environ.get("CUDACXX", "nvcc")) is None, reason="needs nvcc")
def test_cuda_library_compiles_for_the_oldest_release_architectures(tmp_path: Path) -> None:
    """The release architecture list (cmake/Exl2Cuda.cmake, what wheels and `pip install .` on a
    GPU machine build) starts at sm_75, and below sm_80 / sm_90 the kernels' device code takes
    other preprocessor paths (traps where cp.async, bfloat16 arithmetic or clusters do not
    exist). The CI build compiles sm_90a only, so the static library is built here for sm_75 and
    sm_80 as well: this is where bfloat16 arithmetic that cuda_bf16.h does not declare below
    sm_80 broke every release build."""
    build = tmp_path / "build"
    sh("cmake", "-S", str(ROOT), "-B", str(build), "-DEXL2_PYTHON=OFF", "-DEXL2_CUDA=ON",
       "-DEXL2_CUDA_ARCHITECTURES=75-real;80-real", "-DEXL2_BUILD_TESTS=OFF", "-DEXL2_INSTALL=OFF",
       "-DCMAKE_BUILD_TYPE=Release")
    sh("cmake", "--build", str(build), "--target", "exl2", "--parallel", str(os.cpu_count() or 2))
    assert list(build.glob("**/libexl2.a"))


def test_add_subdirectory_consumer_without_python(tmp_path: Path) -> None:
    """A plain CMake project that vendors exl2 with add_subdirectory (as FetchContent
    does): no Python, no nanobind, no install step."""
    project = tmp_path / "app"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.24)\n"
        "project(vendored LANGUAGES CXX)\n"
        "set(EXL2_CUDA OFF CACHE STRING \"\")\n"
        f"add_subdirectory(\"{ROOT.as_posix()}\" exl2)\n"
        "add_executable(app main.cpp)\n"
        "target_link_libraries(app PRIVATE exl2::exl2)\n"
    )
    (project / "main.cpp").write_text((ROOT / "examples" / "cpp" / "main.cpp").read_text())
    build = tmp_path / "build"
    out = sh("cmake", "-S", str(project), "-B", str(build))
    assert "nanobind" not in out.lower()
    sh("cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 2))
    assert "example passed" in sh(str(build / "app"))
    cache = (build / "CMakeCache.txt").read_text()
    assert "EXL2_PYTHON:BOOL=OFF" in cache and "EXL2_INSTALL:BOOL=OFF" in cache


def test_public_headers_have_no_torch_or_cuda_includes() -> None:
    for header in (ROOT / "src" / "include" / "exl2").glob("*.hpp"):
        text = header.read_text()
        for banned in ("torch", "ATen", "#include <cuda", "#include \"cuda", "pybind", "nanobind"):
            assert banned not in text, f"{header.name} mentions {banned}"
