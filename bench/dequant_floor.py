"""CUDA-graph time of QMatrix.dequantize against its byte floor (codes read + fp16 written at the
copy bandwidth measured in the same run), on 8192x28672 and 4096x14336 GPTQ-4 and EXL2 4.0/4.5.

    python bench/dequant_floor.py

On the H200 (2026-11-26) it printed 0.95-1.01x the floor: the dequantize + cuBLAS route's extra
cost at large m is the traffic of a dense weight, not the kernel.
"""
import torch

from exl2 import bench as B

setup = B._make_setup(torch.device("cuda"), "float16")
for K, N in [(8192, 28672), (4096, 14336)]:
    for spec in B.layer_specs(K, N):
        if not (spec.name.startswith("gptq") or "4.0bpw" in spec.name or "4.5bpw" in spec.name):
            continue
        q = spec.build(setup.generator)
        t = setup.timer(lambda: q.dequantize())
        nbytes = q.bits_per_weight * K * N / 8 + 2 * K * N
        floor = nbytes / setup.bandwidth * 1e6
        print(f"dequant {spec.name:28s} {t:8.1f} us  floor {floor:7.1f} us  x floor {t / floor:5.2f}", flush=True)
        q.close()
