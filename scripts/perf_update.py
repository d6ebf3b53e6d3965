"""Turn a fresh ``python -m exl2 bench --json`` result into the performance page's data file.

    python scripts/perf_update.py NEW.json --command "python -m exl2 bench ..." [--out docs/perf/h100_bench.json]

Keeps the ``reference`` section (other kernels' timings on the same GPU, which the bench does
not measure) of the current data file, records the command that produced the rows, and
writes the result; ``python docs/perf_plot.py --update-page`` then rewrites the tables (and,
with matplotlib, the plot).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "perf" / "h100_bench.json"

NOTES = [
    "floor_us = the layer's stored weight bytes (bits_per_weight * K * N / 8) / copy bandwidth measured in the "
    "same run; tb_s = those bytes / exl2_us; pct_floor = 100 * floor_us / exl2_us.",
    "dense_us = torch.matmul with the dequantized weight in the activation dtype, in the same run.",
]
#: Which kernel served which m: by default (the tensor-core layout, compute capability 9.0+), or with
#: EXL2_CUDA_TC=0 in the command (the canonical layout); ``--routing`` overrides.
ROUTING = {
    "tc": "On CUDA (compute capability 9.0+ by default), layers hold their codes in the tensor-core stream layout and "
          "QMatrix.matmul runs exl2's own kernels up to m = 64: the mma.sync tensor-core kernel "
          "(src/cuda/tc_gemm.cu), and on compute capability 9.0 the wgmma kernel (src/cuda/tc_wgmma.cu) from "
          "m = 33, which also serves 64 < m <= 128 on layers of at least 2^25 weights; from m = 129 the "
          "warp-specialised wgmma kernel (src/cuda/tc_wgmma_ws.cu) where its 128-column x 256-row blocks fill "
          "the GPU, up to m = 512 (8192x28672, 4096x14336); larger m dequantize into a scratch tensor and call "
          "torch.mm (cuBLAS).",
    "canonical": "With EXL2_CUDA_TC=0 (the canonical layout), QMatrix.matmul on CUDA with float16 m >= 13 rows "
                 "(bfloat16 m >= 9) dequantizes into a scratch tensor and calls torch.mm (cuBLAS); below that "
                 "exl2's weight-streaming GEMV runs.",
}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench", type=Path, help="JSON written by python -m exl2 bench --json")
    p.add_argument("--command", required=True, help="the bench command line that produced it")
    p.add_argument("--previous", type=Path, default=DATA, help="data file whose reference section is kept")
    p.add_argument("--out", type=Path, default=DATA, help="where to write (default: %(default)s)")
    p.add_argument("--routing", help="the note on which kernel served which m (default: from the command's "
                                     "EXL2_CUDA_TC=0 or its absence)")
    args = p.parse_args(argv)
    new = json.loads(args.bench.read_text())
    if not new.get("rows"):
        p.error(f"bench: {args.bench} holds no rows")
    old = json.loads(args.previous.read_text()) if args.previous.is_file() else {}
    new["command"] = args.command
    new["notes"] = NOTES + [args.routing or ROUTING["canonical" if "EXL2_CUDA_TC=0" in args.command else "tc"]]
    if old.get("reference"):
        new["reference"] = old["reference"]
    args.out.write_text(json.dumps(new, indent=1) + "\n")
    print(f"wrote {args.out}: {len(new['rows'])} rows, reference kept: {bool(old.get('reference'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
