"""The command line: python -m exl2 info / demo / bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

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
    rest = {"device": None, "shapes": None, "plot_path": None}
    assert calls[0][1] == {"fmt": "gptq", "bits": 3, "dtype": "float16", **rest} and calls[0][0][2] is True
    assert calls[1][1] == {"fmt": "awq", "bits": 4, "dtype": "float16", **rest} and calls[1][0][0] == [1, 8]
    assert calls[2][1] == {"fmt": "awq", "bits": 4, "dtype": "bfloat16", **rest}


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


# ------------------------------------------------------------------------------ bench
def _record_bench(monkeypatch: pytest.MonkeyPatch) -> List[tuple]:
    """Replace exl2.bench.run by a recorder (argument parsing only)."""
    import exl2.bench

    calls: List[tuple] = []
    monkeypatch.setattr(exl2.bench, "run", lambda *a, **k: calls.append((a, k)) or {})
    return calls


def test_bench_device_shapes_json_plot_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import exl2.__main__ as main
    import exl2.bench

    calls = _record_bench(monkeypatch)
    monkeypatch.setattr(exl2.bench, "require_matplotlib", lambda: None)
    out = str(tmp_path / "b.json")
    png = str(tmp_path / "b.png")
    assert main.main(["bench", "--device", "cpu", "--shapes", "4096x14336", "256X64", "--json", out,
                      "--plot", png]) == 0
    assert main.main(["bench"]) == 0
    (a, k), (a0, k0) = calls
    assert a == (None, out, False) and k["device"] == "cpu" and k["plot_path"] == png
    assert k["shapes"] == [(4096, 14336), (256, 64)]
    assert a0 == (None, None, False) and k0["device"] is None and k0["shapes"] is None and k0["plot_path"] is None


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "1000x4096"], "argument --shapes: K must be a multiple of 128"),
    (["--shapes", "4096x4040"], "argument --shapes: N must be a multiple of 32"),
    (["--shapes", "0x4096"], "argument --shapes: K and N must be positive"),
    (["--shapes", "4096"], "argument --shapes: expected KxN"),
    (["--shapes", "4096x-32"], "argument --shapes: expected KxN"),
    (["--shapes", "4096x4096", "4096x4096"], "argument --shapes: 4096x4096 is given more than once"),
    (["--shapes"], "argument --shapes: expected at least one argument"),
    (["--quick", "--shapes", "4096x4096"], "argument --shapes: not allowed with argument --quick"),
    (["--m", "0"], "argument --m: expected a positive integer, got '0'"),
    (["--m", "two"], "argument --m: expected a positive integer"),
    (["--m", "1", "8", "1"], "argument --m: 1 is given more than once"),
    (["--m"], "argument --m: expected at least one argument"),
    (["--device", "gpu"], "argument --device: expected 'cpu', 'cuda' or 'cuda:N'"),
    (["--format", "fp8"], "argument --format: invalid choice"),
    (["--dtype", "float32"], "argument --dtype: invalid choice"),
    (["--bits", "5", "--format", "gptq"], "argument --bits: invalid choice"),
    (["--json", "no/such/dir/b.json"], "argument --json: the directory of"),
    (["--plot", "b.jpg"], "argument --plot: expected a .png file name"),
])
def test_bench_argument_errors(argv: List[str], message: str, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    import exl2.__main__ as main

    calls = _record_bench(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main.main(["bench", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert calls == []


def test_bench_device_cuda_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import torch

    import exl2.__main__ as main

    calls = _record_bench(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main.main(["bench", "--device", "cuda"])
    assert e.value.code == 2 and "argument --device: 'cuda': " in capsys.readouterr().err
    assert calls == []


@pytest.mark.cuda
def test_bench_host_overhead_reports_a_bare_torch_op_beside_matmul() -> None:
    """The bench's host-overhead figures (CUDA): eager QMatrix.matmul and a bare torch.add on the same
    row, timed alike, next to the call's graph-replay time; all positive, for the calls asked."""
    import torch

    from exl2 import bench

    result = bench.eager_call_us(bench._make_setup(torch.device("cuda"), "float16"), calls=10)
    assert set(result) == {"eager_us", "graph_us", "torch_add_us", "calls"} and result["calls"] == 10
    assert all(result[k] > 0 for k in ("eager_us", "graph_us", "torch_add_us")), result


def test_bench_shapes_and_layers() -> None:
    import torch

    from exl2 import bench

    assert bench.parse_shape("4096x14336") == (4096, 14336) and bench.parse_shape("128X32") == (128, 32)
    for bad in ("4096", "4096x", "x4096", "4096x4096x1", "4096*4096", "64x4096", "4096x48", "-128x32"):
        with pytest.raises(ValueError):
            bench.parse_shape(bad)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert bench.resolve_shapes(None, False, cuda) == (list(bench.SHAPES), None)
    assert bench.SHAPES == ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))
    shapes, note = bench.resolve_shapes(None, False, cpu)
    assert shapes == [(4096, 4096)] and note and "--shapes" in note
    assert bench.resolve_shapes(None, True, cuda) == ([(4096, 4096)], None)
    assert bench.resolve_shapes([(256, 64)], False, cpu) == ([(256, 64)], None)
    with pytest.raises(ValueError):
        bench.resolve_shapes([(256, 64)], True, cpu)
    assert bench.DEFAULT_MS == (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048)
    for K, N in bench.SHAPES:  # every shape: EXL2 2.5 / 4.0 / 4.5 / 6.0 and GPTQ-4 act-order
        names = [s.name for s in bench.layer_specs(K, N)]
        assert names == [f"gptq4 g128 act {K}x{N}"] + [f"exl2 {b}bpw {K}x{N}" for b in (2.5, 4.0, 4.5, 6.0)]
        for bpw in bench.EXL2_BPWS:
            groups = bench._exl2_groups(K, bpw)
            assert sum(r for _, r in groups) == K
            assert abs(sum(b * r for b, r in groups) / K - bpw) < 0.05
    assert [s.name for s in bench.layer_specs(256, 64, "gptq", 3)] == ["gptq3 g128 act 256x64"]
    assert [s.name for s in bench.layer_specs(256, 64, "awq")] == ["awq4 g128 256x64"]


def test_bench_measures_every_layer_at_one_m_before_the_next(capsys: pytest.CaptureFixture) -> None:
    """bench_shape times all layers at one m before the next m (so that the large GEMMs of large m,
    which hold a GPU at its power limit, do not precede the next layer's small-m rows), and returns
    and prints the rows layer by layer."""
    import torch

    from exl2 import bench

    timed = []

    class FakeLayer:
        bits_per_weight = 4.0

        def __init__(self, name: str) -> None:
            self.name = name

        def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros((128, 64), dtype=dtype)

        def matmul(self, x: torch.Tensor, out: torch.Tensor) -> None:
            timed.append((self.name, x.shape[0]))

        def close(self) -> None:
            timed.append((self.name, "closed"))

    specs = [bench.LayerSpec(name, lambda g, name=name: FakeLayer(name)) for name in ("a", "b")]
    setup = bench.BenchSetup(device=torch.device("cpu"), device_name="cpu", dtype="float16", dense_dtype="float32",
                             timer=lambda fn: (fn(), 2.0)[1], timing="", bandwidth=1e9,
                             generator=torch.Generator().manual_seed(0))
    rows = bench.bench_shape(128, 64, specs, [1, 4], setup)
    assert timed == [("a", 1), ("b", 1), ("a", 4), ("b", 4), ("a", "closed"), ("b", "closed")]
    assert [(r["layer"], r["m"]) for r in rows] == [("a", 1), ("a", 4), ("b", 1), ("b", 4)]
    assert all(r["exl2_us"] == 2.0 and r["dense_us"] == 2.0 for r in rows)
    printed = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert printed == [["a", "1"], ["a", "4"], ["b", "1"], ["b", "4"]]


def _check_rows(data: Dict[str, Any], n_rows: int) -> None:
    assert data["device_type"] == "cpu" and data["dense_dtype"] == "float32" and data["copy_bandwidth"] > 0
    assert len(data["rows"]) == n_rows
    for r in data["rows"]:
        for key in ("layer", "K", "N", "m", "bpw", "exl2_us", "dense_us", "floor_us", "vs_floor", "vs_dense",
                    "dtype", "tb_s", "pct_floor", "dense_dtype"):
            assert key in r, key
        assert r["exl2_us"] > 0 and r["dense_us"] > 0 and r["floor_us"] > 0
        assert r["pct_floor"] == pytest.approx(100 * r["floor_us"] / r["exl2_us"])
        assert r["vs_floor"] == pytest.approx(r["exl2_us"] / r["floor_us"])
        assert r["vs_dense"] == pytest.approx(r["exl2_us"] / r["dense_us"])
        assert r["tb_s"] == pytest.approx(r["bpw"] * r["K"] * r["N"] / 8 / (r["exl2_us"] * 1e-6) / 1e12)
        assert r["floor_us"] == pytest.approx(r["bpw"] * r["K"] * r["N"] / 8 / data["copy_bandwidth"] * 1e6)


def test_bench_cpu_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import exl2.__main__ as main

    out = tmp_path / "bench.json"
    assert main.main(["bench", "--device", "cpu", "--shapes", "256x64", "--m", "1", "3", "--format", "gptq",
                      "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    _check_rows(data, 2)
    assert [(r["layer"], r["m"], r["K"], r["N"], r["dtype"]) for r in data["rows"]] == [
        ("gptq4 g128 act 256x64", 1, 256, 64, "float16"), ("gptq4 g128 act 256x64", 3, 256, 64, "float16")]
    printed = capsys.readouterr().out
    assert "dense baseline: torch.matmul in float32" in printed and "wall-clock" in printed
    assert "TB/s" in printed and "% floor" in printed
    assert printed.count("gptq4 g128 act 256x64") == 2


def test_bench_cpu_run_exl2_bfloat16(tmp_path: Path) -> None:
    from exl2 import bench

    result = bench.run([2], str(tmp_path / "b.json"), fmt="exl2", dtype="bfloat16", device="cpu",
                       shapes=[(128, 32)])
    _check_rows(result, 4)
    assert [r["layer"] for r in result["rows"]] == [f"exl2 {b}bpw 128x32" for b in (2.5, 4.0, 4.5, 6.0)]
    assert {r["dtype"] for r in result["rows"]} == {"bfloat16"}
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == result["rows"]


def test_bench_plot_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import exl2.__main__ as main

    png = tmp_path / "bench.png"
    assert main.main(["bench", "--device", "cpu", "--shapes", "128x32", "256x64", "--m", "1", "2",
                      "--format", "gptq", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_plot_without_matplotlib(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                       tmp_path: Path) -> None:
    import exl2.__main__ as main
    from exl2 import bench

    # An import of matplotlib fails as if it were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    calls = _record_bench(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main.main(["bench", "--device", "cpu", "--plot", str(tmp_path / "b.png")])
    assert e.value.code == 2
    assert "--plot needs matplotlib: pip install exl2[plot]" in capsys.readouterr().err
    assert calls == []
    # bench.run itself fails before measuring anything.
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(bench, "_make_setup", lambda *a: pytest.fail("measured before checking matplotlib"))
    with pytest.raises(ImportError, match=r"pip install exl2\[plot\]"):
        bench.run([1], device="cpu", shapes=[(128, 32)], plot_path=str(tmp_path / "b.png"))
    assert not (tmp_path / "b.png").exists()
