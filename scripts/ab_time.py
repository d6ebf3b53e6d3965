"""Times the installed exl2 on a fixed set of layers, for same-call A/B comparisons of builds.

    PYTHONPATH=/tmp/pkg_base python scripts/ab_time.py base 1,8,16 gptq2,gptq4 --out $OUT/ab.jsonl
    python scripts/ab_time.py new 1,8,16 gptq2,gptq4 --out $OUT/ab.jsonl
    python scripts/ab_time.py --summary $OUT/ab.jsonl base new

The import path decides which build runs (scripts/ab_build.sh installs variants into
/tmp/pkg_NAME). Each layer is built on the GPU from a fixed seed, so every variant times the same
weights; each (layer, m) is timed with the bench's CUDA-graph timer and its output's bytes are
hashed, so that the summary can say whether the variants gave the same bits. Alternate the
variants over two or more rounds in one call: the summary takes each variant's fastest round.
Layers (8192 x 28672 unless named): gptq2, gptq3, gptq4, gptq8, awq, exl2_2.5, exl2_4.0, exl2_4.5,
exl2_6.0, bf16_gptq4, bf16_exl2_2.5, bf16_exl2_4.0, gptq4_4096 (4096 x 4096).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import sys
from typing import Callable, Dict, List, Optional, Tuple


def layers() -> Dict[str, Tuple[Callable, "object"]]:
    """name -> (build(generator) -> QMatrix, activation dtype)."""
    import torch
    from exl2 import bench as B

    K, N = 8192, 28672
    f16, bf16 = torch.float16, torch.bfloat16
    gptq = lambda bits, k=K, n=N: (lambda g: B._random_gptq(k, n, 128, True, g, bits))  # noqa: E731
    exl2 = lambda bpw: (lambda g: B._random_exl2(K, N, B._exl2_groups(K, bpw), g))  # noqa: E731
    return {
        "gptq2": (gptq(2), f16), "gptq3": (gptq(3), f16), "gptq4": (gptq(4), f16), "gptq8": (gptq(8), f16),
        "awq": (lambda g: B._random_awq(K, N, 128, g), f16),
        "exl2_2.5": (exl2(2.5), f16), "exl2_4.0": (exl2(4.0), f16), "exl2_4.5": (exl2(4.5), f16),
        "exl2_6.0": (exl2(6.0), f16),
        "bf16_gptq4": (gptq(4), bf16), "bf16_exl2_2.5": (exl2(2.5), bf16), "bf16_exl2_4.0": (exl2(4.0), bf16),
        "gptq4_4096": (gptq(4, 4096, 4096), f16),
    }


def time_variant(variant: str, ms: List[int], names: List[str], out: str) -> None:
    """Times each layer of `names` at each m of `ms` (CUDA), appending one JSON line per row to `out`."""
    import torch
    import exl2
    from exl2 import bench as B

    table = layers()
    unknown = [n for n in names if n not in table]
    if unknown:
        sys.exit(f"ab_time.py: unknown layers {unknown}; known: {sorted(table)}")
    print(variant, exl2.__file__, flush=True)
    for name in names:
        build, dtype = table[name]
        g = torch.Generator(device="cuda")
        g.manual_seed(1234)
        q = build(g)
        for m in ms:
            gx = torch.Generator(device="cuda")
            gx.manual_seed(m)
            x = torch.randn(m, q.in_features, device="cuda", generator=gx).to(dtype)
            y = q.matmul(x)
            torch.cuda.synchronize()
            digest = hashlib.sha1(y.view(torch.int16).cpu().numpy().tobytes()).hexdigest()[:12]
            us = B._graph_time_us(lambda: q.matmul(x))
            rec = dict(variant=variant, layer=name, m=m, us=round(us, 2), digest=digest)
            print(json.dumps(rec), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        del q
        torch.cuda.empty_cache()


def summary(path: str, base: str, other: str) -> Optional[float]:
    """Prints, per (layer, m) that both variants timed, each one's fastest round, the ratio
    other / base and whether all their outputs had the same bits; returns the ratios' geometric
    mean (None if no row has both)."""
    rows = [json.loads(line) for line in open(path)]
    t: Dict[tuple, List[float]] = collections.defaultdict(list)
    d: Dict[tuple, set] = collections.defaultdict(set)
    for r in rows:
        if r["variant"] in (base, other):
            t[(r["layer"], r["m"], r["variant"])].append(r["us"])
            d[(r["layer"], r["m"])].add(r["digest"])
    logs = []
    for layer, m in sorted({(r["layer"], r["m"]) for r in rows}):
        b, n = t[(layer, m, base)], t[(layer, m, other)]
        if not b or not n:
            continue
        logs.append(math.log(min(n) / min(b)))
        bits = "same bits" if len(d[(layer, m)]) == 1 else "BITS DIFFER"
        print(f"{layer:14s} m={m:4d} {base} {min(b):8.2f} ({'/'.join(map(str, b))}) {other} {min(n):8.2f} "
              f"({'/'.join(map(str, n))}) {min(n) / min(b):.3f} {bits}")
    if not logs:
        return None
    geomean = math.exp(sum(logs) / len(logs))
    print(f"geometric mean {other}/{base}: {geomean:.4f}")
    return geomean


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", nargs="?", help="name recorded with the rows")
    p.add_argument("ms", nargs="?", help="row counts, comma-separated")
    p.add_argument("layers", nargs="?", default="gptq2,gptq3,gptq4,exl2_2.5,bf16_gptq4",
                   help="layer names, comma-separated (default: %(default)s)")
    p.add_argument("--out", default="ab.jsonl", help="JSON-lines file the rows are appended to")
    p.add_argument("--summary", nargs=3, metavar=("FILE", "BASE", "OTHER"),
                   help="compare two variants' rows of FILE instead of timing")
    a = p.parse_args()
    if a.summary:
        summary(*a.summary)
    elif a.variant and a.ms:
        time_variant(a.variant, [int(v) for v in a.ms.split(",")], a.layers.split(","), a.out)
    else:
        p.error("give VARIANT and MS to time, or --summary FILE BASE OTHER")


if __name__ == "__main__":
    main()
