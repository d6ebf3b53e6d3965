"""scripts/ncu_hotspots.py: the summary of Nsight Compute's per-instruction stall samples."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from script_module import SCRIPTS, load_script

SCRIPT = SCRIPTS / "ncu_hotspots.py"
pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="needs a source checkout (scripts/)")

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
          "# Samples", "Instructions Executed", "stall_wait", "stall_long_sb", "stall_selected",
          "stall_wait (Not Issued)"]
# (address, text, samples, executed, wait, long_sb, selected): ncu writes thousands with commas.
ROWS = [("0x10", "IMAD.MOV.U32 R1, RZ, RZ, R2", "10", "1,000", "6", "0", "4"),
        ("0x20", "@!P4  BRA 0x10", "60", "2,000", "6", "50", "4"),
        ("0x30", "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]", "20", "500", "15", "0", "5"),
        ("0x40", "IMAD R3, R4, R5, RZ", "10", "1,500", "2", "0", "8")]


def _module():
    return load_script("ncu_hotspots")


def _write(path: Path, rows=ROWS, first=("Kernel Name", "void k<64>(int)")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(first)
        w.writerow(HEADER)
        for a, text, s, e, wait, lsb, sel in rows:
            w.writerow([a, text, s, "0", s, e, wait, lsb, sel, "0"])
    return path


def test_shares_hotspots_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    nh = _module()
    kernel, rows = nh.load(_write(tmp_path / "k.csv"))
    assert kernel == "void k<64>(int)" and len(rows) == 4
    assert [r.opcode for r in rows] == ["IMAD", "BRA", "LDGSTS", "IMAD"]  # predicate and modifiers dropped
    assert rows[1].executed == 2000 and rows[1].stalls == {"wait": 6, "long_sb": 50, "selected": 4}
    shares = nh.stall_shares(rows)
    assert list(shares) == ["long_sb", "wait", "selected"]
    assert shares["long_sb"] == pytest.approx(50 / 100) and sum(shares.values()) == pytest.approx(1.0)
    by_samples, by_executed = nh.opcode_shares(rows)
    assert by_samples == pytest.approx({"BRA": 0.6, "IMAD": 0.2, "LDGSTS": 0.2})
    assert by_executed["IMAD"] == pytest.approx(2500 / 5000) and list(by_executed)[0] == "IMAD"
    # the two hottest, in program order
    assert [r.index for r in nh.hotspots(rows, 2)] == [1, 2]
    text = nh.report(kernel, rows, 2, (2, 3))
    assert "long_sb 50.0%" in text and "60.00%" in text and "long_sb 0.83" in text
    # listed once as a hot spot and once in the range
    assert text.count("LDGSTS.E.BYPASS") == 2 and text.splitlines()[-1].endswith("IMAD R3, R4, R5, RZ")
    assert nh.main([str(tmp_path / "k.csv"), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "top 1 by samples" in out and "BRA 0x10" in out and "instructions 2..3" not in out


def test_rejects_other_csv(tmp_path: Path) -> None:
    nh = _module()
    with pytest.raises(ValueError, match="Kernel Name"):
        nh.load(_write(tmp_path / "a.csv", first=("ID", "x")))
    bad = tmp_path / "b.csv"
    bad.write_text('"Kernel Name","k"\n"Address","Source"\n"0x0","NOP"\n')
    with pytest.raises(ValueError, match="SourceCounters"):
        nh.load(bad)
    with pytest.raises(SystemExit):
        nh.main([str(tmp_path / "a.csv"), "--top", "-1"])


def test_execution_classes_per_unit_of_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--per N groups the instructions that ran equally often (one loop level each) and gives
    their executions per unit of work and their share of the samples; instructions that never
    ran belong to no class."""
    nh = _module()
    rows = ROWS + [("0x50", "LOP3.LUT R1, R2, 0xf, RZ, 0xc0, !PT", "20", "2,000", "20", "0", "0"),
                   ("0x60", "EXIT", "0", "0", "0", "0", "0")]
    kernel, loaded = nh.load(_write(tmp_path / "k.csv", rows))
    classes = nh.execution_classes(loaded)
    assert [(c.executions, c.instructions) for c in classes] == [(2000, 2), (1500, 1), (1000, 1), (500, 1)]
    assert classes[0].executed == 4000 and classes[0].samples == 80
    text = nh.report(kernel, loaded, 0, per=100)
    assert "per unit of 100" in text
    assert "2000      2     40.0   66.7%" in text  # 4000 executions / 100 units, 80 of 120 samples
    assert text.splitlines()[-1].split()[:3] == ["all", "6", "70.0"]
    assert nh.main([str(tmp_path / "k.csv"), "--top", "0", "--per", "10"]) == 0
    assert "per unit of 10" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        nh.main([str(tmp_path / "k.csv"), "--per", "0"])
