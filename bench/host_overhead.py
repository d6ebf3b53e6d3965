"""Per-call time of the pieces of an eager QMatrix.matmul (m = 1, 4096x4096 GPTQ-4): torch.empty,
the stream handle, input checks, the native call, the whole call, and dense torch.matmul; 20,000
calls each, one synchronisation.

    python bench/host_overhead.py

When the native call alone takes the GPU time per call (about 10 us on an H100), the calls are
GPU-bound and the host side is hidden behind it.
"""
import time

import torch

from exl2 import bench as B
from exl2._convert import stream_handle

setup = B._make_setup(torch.device("cuda"), "float16")
q = B.layer_specs(4096, 4096, "gptq")[0].build(setup.generator)
x = torch.randn(1, 4096, device="cuda").half()
out = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
dev = torch.device("cuda", 0)


def per_call_us(name, fn, n=20000):
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    print(f"{name:40s} {(time.perf_counter() - t0) / n * 1e6:7.2f} us", flush=True)


per_call_us("torch.empty((1, 4096))", lambda: torch.empty((1, 4096), dtype=torch.float16, device=dev))
per_call_us("stream_handle", lambda: stream_handle(dev))
per_call_us("_check_input", lambda: q._check_input(x))
per_call_us("native gemm_ptr (preallocated out)",
            lambda: q._native.gemm_ptr(x.data_ptr(), 1, out.data_ptr(), stream_handle(dev), False))
per_call_us("matmul(x, out=out)", lambda: q.matmul(x, out=out))
per_call_us("matmul(x)", lambda: q.matmul(x))
w = q.dequantize()
per_call_us("torch.matmul dense (x @ w)", lambda: torch.matmul(x, w))
q.close()
