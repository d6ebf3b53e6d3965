"""scripts/bench_median.py: the per-row median of several bench runs (docs data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_module import SCRIPTS, load_script

SCRIPT = SCRIPTS / "bench_median.py"
pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="needs a source checkout (scripts/)")


def _module():
    return load_script("bench_median")


def _run(times, dense, bw=2.0e12, eager=10.0):
    rows = [dict(layer="gptq4 g128 act 128x256", K=128, N=256, m=m, bpw=4.0, exl2_us=t, dense_us=d,
                 floor_us=4.0 * 128 * 256 / 8 / bw * 1e6, vs_floor=0.0, vs_dense=0.0, tb_s=0.0, pct_floor=0.0,
                 dtype="float16", dense_dtype="float16") for m, t, d in zip((1, 8), times, dense)]
    return dict(device="GPU", copy_bandwidth=bw, timing="t", rows=rows,
                eager_m1=dict(eager_us=eager, graph_us=eager / 2, calls=1000))


def test_median_per_row_and_recomputed_columns(tmp_path: Path) -> None:
    bm = _module()
    runs = [_run((10.0, 20.0), (5.0, 5.0), eager=12.0), _run((30.0, 21.0), (6.0, 4.0), eager=11.0),
            _run((11.0, 50.0), (7.0, 6.0), bw=4.0e12, eager=13.0)]
    merged = bm.merge(runs)
    r1, r8 = merged["rows"]
    assert (r1["exl2_us"], r1["dense_us"], r8["exl2_us"], r8["dense_us"]) == (11.0, 6.0, 21.0, 5.0)
    assert r1["vs_dense"] == pytest.approx(11.0 / 6.0)
    assert r1["vs_floor"] == pytest.approx(11.0 / r1["floor_us"])
    assert r1["pct_floor"] == pytest.approx(100 * r1["floor_us"] / 11.0)
    assert r1["tb_s"] == pytest.approx(4.0 * 128 * 256 / 8 / 11e-6 / 1e12)
    assert merged["copy_bandwidth"] == 2.0e12 and merged["eager_m1"]["eager_us"] == 12.0
    assert "median of 3 runs" in merged["timing"]
    assert runs[0]["rows"][0]["vs_dense"] == 0.0  # inputs untouched
    files = []
    for i, run in enumerate(runs):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(run))
    out = tmp_path / "merged.json"
    assert bm.main([*map(str, files), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][1]["exl2_us"] == 21.0


def test_rejects_runs_that_do_not_match() -> None:
    bm = _module()
    a, b = _run((1.0, 2.0), (1.0, 1.0)), _run((1.0, 2.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="at least 2"):
        bm.merge([a])
    b["rows"] = b["rows"][:1]
    with pytest.raises(ValueError, match="rows"):
        bm.merge([a, b])
    c = _run((1.0, 2.0), (1.0, 1.0))
    c["device"] = "other"
    with pytest.raises(ValueError, match="device"):
        bm.merge([a, c])
