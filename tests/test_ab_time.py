"""scripts/ab_time.py: the same-call A/B timer's summary of two builds' rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_module import SCRIPTS, load_script

SCRIPT = SCRIPTS / "ab_time.py"
pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="needs a source checkout (scripts/)")


def _rows(path: Path) -> Path:
    rows = [
        # two rounds of each variant; the summary takes each one's fastest
        ("base", "gptq2", 1, 40.0, "aa"), ("new", "gptq2", 1, 36.5, "aa"),
        ("base", "gptq2", 1, 41.0, "aa"), ("new", "gptq2", 1, 36.0, "aa"),
        ("base", "gptq4", 8, 50.0, "bb"), ("new", "gptq4", 8, 50.0, "cc"),  # different bits
        ("other", "gptq4", 8, 10.0, "dd"),  # a third variant, not compared
        ("base", "gptq3", 1, 44.0, "ee"),  # timed by one variant only
    ]
    with open(path, "w") as f:
        for v, layer, m, us, digest in rows:
            f.write(json.dumps(dict(variant=v, layer=layer, m=m, us=us, digest=digest)) + "\n")
    return path


def test_summary_compares_fastest_rounds_and_bits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ab = load_script("ab_time")
    geomean = ab.summary(str(_rows(tmp_path / "ab.jsonl")), "base", "new")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3, out  # two rows both variants timed, and the geometric mean
    assert "gptq2" in out[0] and "0.900" in out[0] and "same bits" in out[0]
    assert "gptq4" in out[1] and "1.000" in out[1] and "BITS DIFFER" in out[1]
    assert geomean == pytest.approx((36.0 / 40.0) ** 0.5)
    assert out[2].endswith(f"{geomean:.4f}")


def test_summary_without_common_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ab = load_script("ab_time")
    assert ab.summary(str(_rows(tmp_path / "ab.jsonl")), "base", "missing") is None
    assert capsys.readouterr().out == ""


def test_arguments_are_checked(tmp_path: Path) -> None:
    ab = load_script("ab_time")
    with pytest.raises(SystemExit, match="unknown layers"):
        ab.time_variant("x", [1], ["no_such_layer"], str(tmp_path / "ab.jsonl"))
    assert not (tmp_path / "ab.jsonl").exists()
