"""Run QMatrix.matmul on an 8192x28672 GPTQ layer a few times (for ncu profiling).

Usage: ncu --kernel-name regex:gemv --launch-skip 3 --launch-count 1 python bench/profile_gemv.py [m]
"""
import sys

import torch

from exl2.bench import _random_gptq

m = int(sys.argv[1]) if len(sys.argv) > 1 else 1
g = torch.Generator(device="cuda").manual_seed(0)
q = _random_gptq(8192, 28672, 128, True, g)
x = torch.randn((m, 8192), dtype=torch.float16, device="cuda")
for _ in range(6):
    y = q.matmul(x)
torch.cuda.synchronize()
print("done", y.shape)
