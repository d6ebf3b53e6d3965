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
from typing import Any, Dict, List, Optional


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
        med = {k: statistics.median(run["rows"][j][k] for run in runs) for k in ("exl2_us", "dense_us", "floor_us")}
        weight_bytes = r0["bpw"] * r0["K"] * r0["N"] / 8
        t, d, f = med["exl2_us"], med["dense_us"], med["floor_us"]
        rows.append(dict(r0, **med, vs_floor=t / f, vs_dense=t / d, tb_s=weight_bytes / (t * 1e-6) / 1e12,
                         pct_floor=100 * f / t))
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
