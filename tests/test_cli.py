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


def test_demo_new_formats() -> None:
    for args, name in ((("--format", "gptq", "--bits", "3"), "gptq 3-bit"), (("--format", "awq"), "awq 4-bit"),
                       (("--format", "gptq", "--bits", "8"), "gptq 8-bit")):
        r = run("demo", "--device", "cpu", "--rows", "2", *args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert name in r.stdout and "dequantize bit-exact: True" in r.stdout
        assert r.stdout.count("bpw") == 1 and r.stdout.strip().endswith("demo passed")
    r = run("demo", "--device", "cpu", "--format", "gptq", "--bits", "5")
    assert r.returncode != 0 and "--bits" in r.stderr


def test_bench_format_arguments(monkeypatch) -> None:
    import exl2.__main__ as main
    import exl2.bench

    calls = []
    monkeypatch.setattr(exl2.bench, "run", lambda *a, **k: calls.append((a, k)) or {})
    assert main.main(["bench", "--format", "gptq", "--bits", "3", "--quick"]) == 0
    assert main.main(["bench", "--format", "awq", "--m", "1", "8"]) == 0
    assert main.main(["bench", "--format", "awq", "--dtype", "bfloat16"]) == 0
    assert calls[0][1] == {"fmt": "gptq", "bits": 3, "dtype": "float16"} and calls[0][0][2] is True
    assert calls[1][1] == {"fmt": "awq", "bits": 4, "dtype": "float16"} and calls[1][0][0] == [1, 8]
    assert calls[2][1] == {"fmt": "awq", "bits": 4, "dtype": "bfloat16"}


def test_bits_needs_format_gptq(monkeypatch, capsys) -> None:
    import pytest

    import exl2.__main__ as main
    import exl2.bench
    import exl2.cli

    calls = []
    monkeypatch.setattr(exl2.bench, "run", lambda *a, **k: calls.append((a, k)) or {})
    monkeypatch.setattr(exl2.cli, "demo", lambda **k: calls.append(((), k)) or 0)
    for argv in (["demo", "--format", "exl2", "--bits", "3"], ["demo", "--format", "awq", "--bits", "8"],
                 ["demo", "--bits", "2"], ["bench", "--format", "awq", "--bits", "8"],
                 ["bench", "--format", "exl2", "--bits", "3"], ["bench", "--bits", "3"]):
        with pytest.raises(SystemExit) as e:
            main.main(argv)
        assert e.value.code == 2, argv
        assert "needs --format gptq" in capsys.readouterr().err, argv
    assert calls == []
    assert main.main(["demo", "--format", "gptq", "--bits", "3"]) == 0
    assert main.main(["demo", "--format", "awq", "--bits", "4"]) == 0
    assert main.main(["bench", "--format", "gptq", "--bits", "8"]) == 0
    assert [c[1]["bits"] for c in calls] == [3, 4, 8]
