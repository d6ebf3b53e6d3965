"""Times the wgmma kernel's shapes against dense fp16 (CUDA-graph replays, as `python -m exl2 bench`).

    python scripts/time_wgmma.py M[,M...] CFG[,CFG...] [gptq|exl2]

CFG: 0, 1 or 2 (EXL2_CUDA_WGMMA_CFG, see config_for in src/cuda/tc_wgmma.cu; a layer is built
per CFG, as the shape is read at construction) or d (the default choice by m).
EXL2_DENSE_MIN_ROWS=1000000 is set here, so every m runs the library's kernels (the tc layout is
the default on compute capability 9.0+). In the
environment: SHAPES=KxN,... picks the layers (default 8192x28672,4096x14336);
EXL2_CUDA_WGMMA_MIN_ROWS=33 or 65 decides whether m = 33..64 run the wgmma or the mma.sync
kernel. Prints one line per layer and m; the rows also go to $OUT/time_wgmma_<pid>.json (or
/tmp). The results of the shapes are checked against the first.
"""
import json
import os
import sys

os.environ["EXL2_DENSE_MIN_ROWS"] = "1000000"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from exl2 import reference as R  # noqa: E402
from exl2.bench import _graph_time_us  # noqa: E402  (the bench's own CUDA-graph timer)

sys.path.insert(0, "tests")
from layers import build  # noqa: E402


def main() -> None:
    ms = [int(v) for v in sys.argv[1].split(",")]
    cfgs = sys.argv[2].split(",")
    fmt = sys.argv[3] if len(sys.argv) > 3 else "gptq"
    shapes = [tuple(int(v) for v in s.split("x")) for s in os.environ.get("SHAPES", "8192x28672,4096x14336").split(",")]
    rows = []
    for K, N in shapes:
        rng = np.random.default_rng(0)
        layer = (R.random_gptq(rng, K, N, group_size=128, act_order=True) if fmt == "gptq"
                 else R.random_exl2(rng, K, N, bits=[(5, K // 2), (4, K // 2)]))
        w = torch.randn(K, N, dtype=torch.float16, device="cuda")
        xs = {m: torch.randn(m, K, dtype=torch.float16, device="cuda") for m in ms}
        shape_rows = {m: {"K": K, "N": N, "m": m, "dense": _graph_time_us(lambda: torch.matmul(xs[m], w))}
                      for m in ms}
        first = {}
        for c in cfgs:
            # The shape is read when the layer is built.
            if c != "d":
                os.environ["EXL2_CUDA_WGMMA_CFG"] = c
            with build(layer, "cuda", bias=False) as q:
                for m in ms:
                    x = xs[m]
                    shape_rows[m][c] = _graph_time_us(lambda: q.matmul(x))
                    y = q.matmul(x)
                    ref = first.setdefault(m, y)
                    assert (y - ref).abs().max().item() <= 1e-2 * ref.abs().max().item(), f"shape {c}, m={m}"
            os.environ.pop("EXL2_CUDA_WGMMA_CFG", None)
        for m in ms:
            row = shape_rows[m]
            rows.append(row)
            print(f"{K}x{N} m={m:5d} dense {row['dense']:8.1f} | "
                  + " ".join(f"{c}: {row[c]:8.1f} ({row[c] / row['dense']:4.2f}x)" for c in cfgs), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"time_wgmma_{os.getpid()}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
