"""Quick CUDA-graph timing of m = 1..4 on the 8192x28672 layers (subset of `exl2 bench`)."""
import torch

from exl2.bench import _exl2_groups, _graph_time_us, _random_exl2, _random_gptq

g = torch.Generator(device="cuda").manual_seed(0)
for name, make in [("gptq4 g128 act", lambda: _random_gptq(8192, 28672, 128, True, g)),
                   ("exl2 4.0bpw", lambda: _random_exl2(8192, 28672, _exl2_groups(8192, 4.0), g))]:
    q = make()
    for m in (1, 2, 4):
        x = torch.randn((m, 8192), dtype=torch.float16, device="cuda")
        out = torch.empty((m, 28672), dtype=torch.float16, device="cuda")
        print(f"{name} 8192x28672 m={m}: {_graph_time_us(lambda: q.matmul(x, out=out)):.1f} us")
    q.close()
