"""Calls that follow each other on one stream without a synchronisation between them.

On compute capability 9.0+ some tensor-core kernels are programmatic dependent launches
(src/cuda/tc_device.cuh, pdl_wait): the m = 1 kernel that gathers its own activations (a whole call
in one launch, on layers whose blocks fit one wave) of the stream's previous kernel, and the
mma.sync kernel of the activation gather launched just before it, where its blocks fill some
multiprocessor to its limit (on these small layers only with EXL2_CUDA_PDL=1, which makes every
such launch programmatic). Their blocks may start while that kernel is still running, and copy
the layer's own data meanwhile; they must not read x (or the gathered activations), nor write the
output, before it has completed. These tests chain calls whose input is the previous call's output and
whose output overwrites the previous call's input, eagerly and in a CUDA graph, on every route, and
compare them bit for bit with the same calls synchronised one by one, with the default launches,
with EXL2_CUDA_PDL=1 and with EXL2_CUDA_PDL=0 (plain stream order).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import pytest
import torch

from exl2 import reference as R
from layers import build, capture_graph, random_x

pytestmark = pytest.mark.cuda

K = 2048  # square layers: a call's output is the next call's input
STEPS = 12


@pytest.fixture(autouse=True)
def _cuda() -> None:
    # (below compute capability 9.0 the layers take the canonical layout: the same chains, in
    # plain stream order)
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _damped(layer):
    """The layer with its scales and bias divided by 4 (exactly), so that a chain of calls keeps
    its values near 1 (the random layers multiply |x| by about 3.5 per call)."""
    layer = dict(layer)
    key = "scales" if "scales" in layer else "q_scale_max"
    for k in (key, "bias", "weight"):
        layer[k] = (layer[k] * 0.25).astype(layer[k].dtype)
    return layer


def _layers():
    rng = np.random.default_rng(31)
    gptq = R.random_gptq(rng, K, K, group_size=128, act_order=True, bias=True)
    exl2 = R.random_exl2(rng, K, K, bits=[(4, K // 2), (3, K // 4), (6, K // 4)], bias=True)
    return {"gptq": _damped(gptq), "exl2": _damped(exl2)}


LAYERS = _layers()


def _ping_pong(q, a: torch.Tensor, b: torch.Tensor, steps: int, sync: bool) -> Callable[[], None]:
    """Calls q.matmul(a, out=b), q.matmul(b, out=a), ... `steps` times: each call reads what the
    previous one wrote and overwrites what it read."""
    def run() -> None:
        for i in range(steps):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            q.matmul(src, out=dst)
            if sync:
                torch.cuda.synchronize()
    return run


def _chain_results(q, x0: torch.Tensor) -> List[torch.Tensor]:
    """The chain's final buffer three ways: synchronised call by call, back to back, and replayed
    from a CUDA graph."""
    results = []
    for sync in (True, False):
        a, b = x0.clone(), torch.empty_like(x0)
        _ping_pong(q, a, b, STEPS, sync)()
        torch.cuda.synchronize()
        results.append((a if STEPS % 2 == 0 else b).clone())
    a, b = x0.clone(), torch.empty_like(x0)
    graph = capture_graph(_ping_pong(q, a, b, STEPS, False))
    a.copy_(x0)
    b.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    results.append((a if STEPS % 2 == 0 else b).clone())
    return results


# (rows, environment at construction): m = 1 runs the kernel that gathers its own row where its
# blocks fit one wave (these layers), or with EXL2_CUDA_TC_GATHER=0 the gather launch and the
# transposed 8-row kernel; every other m the gather launch (whose scratch the allocator hands out
# again to the next call) and then: m = 3 and 8 the transposed 8-row kernel, m = 16 the
# transposed 16-row kernel (with EXL2_CUDA_T16=0 the usual 16-row mma.sync tiles), m = 32 the
# 32-row tiles, m = 48 on Hopper the wgmma kernel's 64-row tiles, or with EXL2_CUDA_WGMMA_CFG=4
# the warp-specialised kernel (elsewhere the 64-row mma.sync tiles).
ROUTES = {
    "m1": (1, {}),
    "m1_gather_launch": (1, {"EXL2_CUDA_TC_GATHER": "0"}),
    "m3": (3, {}),
    "m8": (8, {}),
    "m16": (16, {}),
    "m16_usual_tiles": (16, {"EXL2_CUDA_T16": "0"}),
    "m32": (32, {}),
    "m48": (48, {}),
    "m48_ws": (48, {"EXL2_CUDA_WGMMA_CFG": "4"}),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("pdl", [None, "1", "0"], ids=["pdl_default", "pdl_all", "pdl_off"])
def test_chained_calls_match_synchronised_calls(monkeypatch: pytest.MonkeyPatch, name: str, route: str,
                                                dtype: torch.dtype, pdl: Optional[str]) -> None:
    m, env = ROUTES[route]
    if pdl is not None:
        monkeypatch.setenv("EXL2_CUDA_PDL", pdl)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    layer = LAYERS[name]
    rng = np.random.default_rng(m)
    x0 = torch.from_numpy(random_x(rng, (m, K))).to(dtype).cuda()
    with build(layer, "cuda") as q:
        synced, back_to_back, graphed = _chain_results(q, x0)
    y = synced.float()
    assert torch.isfinite(y).all() and 0.05 < y.abs().max().item() < 100, "the chain's values left a sane range"
    assert torch.equal(back_to_back, synced), "back-to-back calls differ from synchronised ones"
    assert torch.equal(graphed, synced), "the graph's calls differ from synchronised ones"


@pytest.mark.parametrize("m", [1, 4, 16, 32])
def test_programmatic_launch_changes_no_bits(monkeypatch: pytest.MonkeyPatch, m: int) -> None:
    """A chain with a torch kernel between calls (the usual case in a model: the programmatic launch
    of m = 1 then follows a kernel that does not trigger it early) gives the same bits with the
    default launches, with every launch after the gather programmatic (EXL2_CUDA_PDL=1) and with
    none (EXL2_CUDA_PDL=0)."""
    layer = LAYERS["gptq"]
    x0 = torch.from_numpy(random_x(np.random.default_rng(7), (m, K))).cuda()
    outs = []
    for pdl in (None, "1", "0"):
        if pdl is not None:
            monkeypatch.setenv("EXL2_CUDA_PDL", pdl)
        with build(layer, "cuda") as q:
            x = x0.clone()
            for _ in range(STEPS):
                x = q.matmul(x) * 0.75  # a torch kernel writes the next call's input
            torch.cuda.synchronize()
            outs.append(x)
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
