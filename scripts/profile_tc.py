"""Runs one layer's matmul a few times (for Nsight Compute).

Usage: python scripts/profile_tc.py K N M [FORMAT] [DTYPE]
  FORMAT: gptq (4-bit), gptqB for B in 2, 3, 4, 8 (e.g. gptq8), exl2 (4.0 bpw), awq; default gptq
  DTYPE:  float16 (default) or bfloat16
"""
import sys

import numpy as np
import torch

from exl2 import reference as R

K, N, M = (int(v) for v in sys.argv[1:4])
fmt = sys.argv[4] if len(sys.argv) > 4 else "gptq"
dtype = getattr(torch, sys.argv[5] if len(sys.argv) > 5 else "float16")
rng = np.random.default_rng(0)
if fmt.startswith("gptq"):
    bits = int(fmt[4:] or 4)
    layer = R.random_gptq(rng, K, N, group_size=128, act_order=True, bits=bits)
elif fmt == "exl2":
    layer = R.random_exl2(rng, K, N, bits=[(4, K)])
elif fmt == "awq":
    layer = R.random_awq(rng, K, N, group_size=128)
else:
    sys.exit(f"profile_tc.py: unknown FORMAT {fmt!r} (gptq, gptq2/3/4/8, exl2, awq)")
sys.path.insert(0, "tests")
from layers import build  # noqa: E402

with build(layer, "cuda") as q:
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    for _ in range(5):
        y = q.matmul(x)
    torch.cuda.synchronize()
    print("ok", fmt, dtype, y.shape, float(y.float().abs().mean()))
