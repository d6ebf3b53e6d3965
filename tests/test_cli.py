"""The command line: python -m exl2 info / demo."""

from __future__ import annotations

import subprocess
import sys

import exl2


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exl2", *args], capture_output=True, text=True, timeout=600)


def test_info() -> None:
    r = run("info")
    assert r.returncode == 0, r.stderr
    assert f"exl2 {exl2.__version__}" in r.stdout
    assert "backends: cpu" in r.stdout
    assert ("cuda architectures:" in r.stdout) == exl2.built_with_cuda()


def test_demo_cpu() -> None:
    r = run("demo", "--device", "cpu", "--rows", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dequantize bit-exact: True" in r.stdout
    assert r.stdout.strip().endswith("demo passed")


def test_version_matches_package_metadata() -> None:
    from importlib.metadata import version

    assert exl2.__version__ == version("exl2")
