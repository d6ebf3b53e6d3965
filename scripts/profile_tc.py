"""Runs one layer's matmul a few times (for Nsight Compute): python scripts/profile_tc.py K N M [gptq|exl2]."""
import sys

import numpy as np
import torch

from exl2 import reference as R

K, N, M = (int(v) for v in sys.argv[1:4])
fmt = sys.argv[4] if len(sys.argv) > 4 else "gptq"
rng = np.random.default_rng(0)
layer = R.random_gptq(rng, K, N, group_size=128, act_order=True) if fmt == "gptq" else R.random_exl2(rng, K, N, bits=[(4, K)])
sys.path.insert(0, "tests")
from layers import build  # noqa: E402

with build(layer, "cuda") as q:
    x = torch.randn(M, K, dtype=torch.float16, device="cuda")
    for _ in range(5):
        y = q.matmul(x)
    torch.cuda.synchronize()
    print("ok", y.shape, float(y.float().abs().mean()))
