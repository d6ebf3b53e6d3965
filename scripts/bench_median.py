"""Merge several ``python -m exl2 bench --json`` results of the same command into one, per row
the median of the runs' times (exl2 and dense) and floors, so that one noisy run does not set
a row.

    python scripts/bench_median.py run1.json run2.json run3.json --out merged.json

All inputs must hold the same rows (layer, m) and device; the derived columns (ratios,
TB/s, % of floor) are recomputed from the medians, the copy bandwidth and the eager
host-overhead figures are medians too, and ``timing`` says how many runs were merged.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

from exl2.bench import make_row


def merge(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The per-row median of ``runs`` (bench JSON dicts of one command)."""
    if len(runs) < 2:
        raise ValueError(f"runs: expected at least 2 bench results, got {len(runs)}")
    first = runs[0]
    key = lambda r: (r["layer"], r["m"])  # noqa: E731
    keys = [key(r) for r in first["rows"]]
    for i, run in enumerate(runs[1:], 2):
        if run.get("device") != first.get("device"):
            raise ValueError(f"run {i}: device {run.get('device')!r}, expected {first.get('device')!r}")
        if [key(r) for r in run["rows"]] != keys:
            raise ValueError(f"run {i}: its rows (layer, m) differ from run 1's")
    rows = []
    for j, r0 in enumerate(first["rows"]):
        t, d, f = (statistics.median(run["rows"][j][k] for run in runs) for k in ("exl2_us", "dense_us", "floor_us"))
        # The bench's own row builder derives the ratio columns from the medians.
        dtypes = SimpleNamespace(dtype=r0["dtype"], dense_dtype=r0["dense_dtype"])
        rows.append(make_row(r0["layer"], r0["K"], r0["N"], r0["m"], r0["bpw"], t, d, f, dtypes))
    out = dict(first, rows=rows, copy_bandwidth=statistics.median(run["copy_bandwidth"] for run in runs))
    out["timing"] = f"{first['timing']}; per row the median of {len(runs)} runs of the command"
    if all("eager_m1" in run for run in runs):
        out["eager_m1"] = {f: statistics.median(run["eager_m1"][f] for run in runs) for f in first["eager_m1"]}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="bench JSON files of the same command")
    p.add_argument("--out", type=Path, required=True, help="where to write the merged JSON")
    args = p.parse_args(argv)
    try:
        merged = merge([json.loads(path.read_text()) for path in args.runs])
    except ValueError as e:
        p.error(str(e))
    args.out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {args.out}: {len(merged['rows'])} rows, median of {len(args.runs)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
