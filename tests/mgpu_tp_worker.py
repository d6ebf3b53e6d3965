"""Tensor-parallel worker for tests/test_multi_gpu.py: one process per rank.

Launch (what the tests do)::

    NCCL_NVLS_ENABLE=0 python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/mgpu_tp_worker.py --backend nccl --device cuda

Every rank builds the same random layers (seeded), splits each of them with
:func:`exl2.parallel.split_columns` and :func:`exl2.parallel.split_rows` into
``world_size`` shards, builds a QMatrix of its own shard on its device and
computes its partial result:

- column parallel: ``y_i = x @ W_i``; ``all_gather`` and concatenation give ``y``;
- row parallel (act-order aware): ``y_i = x[..., rows_i] @ W_i`` (bias on shard 0
  only); ``all_reduce(SUM)`` gives ``y``.

Rank 0 compares both with the unsplit result (the float64 reference
``exl2.reference.gemm`` and the unsplit QMatrix on the CPU): relative error
``max|y - y_ref| / max|y_ref| < 2e-3`` (fp16 rounding). Each rank also checks its
own shard (device, dequantized rows) and the gathered dequantized column shards
against the dense weight, bit for bit. The number of failures is all-reduced, so
every rank exits 1 when any check failed anywhere (0 otherwise) and rank 0 prints
``TP OK`` on success.

``--backend nccl --device cuda``: rank r computes on ``cuda:r`` and the collectives
run on the GPUs (needs one GPU per rank). ``--backend gloo --device cpu``: all on
the CPU, which proves the shard / gather / reduce arithmetic on any machine.
``--backend gloo --device cuda``: rank r computes on ``cuda:(r % device_count)``
(ranks may share a GPU) and the collectives run on CPU copies.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

import exl2
from exl2 import reference as R
from exl2.loaders import qmatrix_from_tensors
from exl2.parallel import split_columns, split_rows

TOL = 2e-3


def make_layers() -> Dict[str, Dict[str, np.ndarray]]:
    """The same layers on every rank. Each has >= 4 groups and >= 4 blocks of 8 columns,
    so any world size up to 4 splits them; N = 136 (17 blocks) gives uneven column shards."""
    rng = np.random.default_rng(20240611)
    return {
        "exl2_mixed_act": R.random_exl2(rng, 320, 136, bits=[(8, 32), (6, 64), (5, 32), (4, 128), (3, 32), (2, 32)],
                                        bias=True),
        "exl2_plain": R.random_exl2(rng, 256, 128, bits=4, group_size=64, permute=False),
        "gptq_act": R.random_gptq(rng, 512, 136, group_size=64, act_order=True, bias=True),
        "gptq_plain": R.random_gptq(rng, 512, 64, group_size=128),
        "gptq_per_channel": R.random_gptq(rng, 128, 48, group_size=None, with_g_idx=True),
    }


def make_inputs(K: int) -> List[np.ndarray]:
    """Row counts on both sides of the CUDA kernel switches (GEMV C = 4 <= 4 < C = 2 <= 12 < dense),
    plus a 3-D batch."""
    rng = np.random.default_rng(K)
    shapes = [(1, K), (4, K), (8, K), (12, K), (13, K), (33, K), (2, 3, K)]
    return [rng.standard_normal(s).astype(np.float16) for s in shapes]


def rel_err(y: torch.Tensor, y_ref: np.ndarray) -> float:
    yy = y.detach().cpu().numpy().astype(np.float64)
    return float(np.abs(yy - y_ref).max() / max(np.abs(y_ref).max(), 1e-30))


class Ranks:
    """The collectives, on the device the backend needs (NCCL: the GPU; gloo: the CPU)."""

    def __init__(self, backend: str, device: torch.device) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.comm_device = device if backend == "nccl" else torch.device("cpu")

    def gather_columns(self, part: torch.Tensor, widths: List[int]) -> torch.Tensor:
        """Concatenate every rank's ``[..., width_r]`` along the last dim (widths may differ:
        pad to the widest, all_gather, trim)."""
        wmax = max(widths)
        lead = tuple(part.shape[:-1])
        padded = torch.zeros(lead + (wmax,), dtype=part.dtype, device=self.comm_device)
        padded[..., :part.shape[-1]] = part.to(self.comm_device)
        bufs = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(bufs, padded)
        return torch.cat([b[..., :w] for b, w in zip(bufs, widths)], dim=-1)

    def sum(self, part: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (fp32, so the reduction adds no fp16 rounding of its own)."""
        t = part.float().to(self.comm_device).contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def count_failures(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())


def _width(shard: Dict[str, torch.Tensor]) -> int:
    return int(shard["q_weight" if "q_weight" in shard else "qweight"].shape[1])


def run_layer(name: str, lay: Dict[str, np.ndarray], comm: Ranks, device: torch.device,
              failures: List[str], corrupt: str = "none") -> Tuple[float, float]:
    rank, world = comm.rank, comm.world
    weight, bias = lay["weight"], lay.get("bias")
    K = weight.shape[0]

    def fail(msg: str) -> None:
        failures.append(f"[rank {rank}] {name}: {msg}")

    col_shards = split_columns(lay, world)
    row_shards = split_rows(lay, world)
    widths = [_width(s) for s in col_shards]
    # Column shard built from tensors already on the device, row shard from CPU tensors:
    # both construction paths.
    col = {k: v.to(device) for k, v in col_shards[rank].items()}
    row = row_shards[rank]
    rows = row["rows"]
    worst_col = worst_row = 0.0
    unsplit = qmatrix_from_tensors(lay, device="cpu") if rank == 0 else None
    with qmatrix_from_tensors(col, device=device) as qc, qmatrix_from_tensors(row, device=device) as qr:
        for q, what in ((qc, "column shard"), (qr, "row shard")):
            if q.device != device:
                fail(f"{what} lives on {q.device}, expected {device}")
        # Each shard holds exactly its part of W (bit for bit); the column parts gather to W.
        w_rows = qr.dequantize()
        if not np.array_equal(w_rows.cpu().numpy().view(np.uint16), weight[rows.numpy()].view(np.uint16)):
            fail("row shard dequantizes to something other than W[rows]")
        w_cols = comm.gather_columns(qc.dequantize(), widths)
        if rank == 0 and not np.array_equal(w_cols.cpu().numpy().view(np.uint16), weight.view(np.uint16)):
            fail("gathered column shards do not dequantize to W")

        rows_dev = rows.to(device)
        for x in make_inputs(K):
            xd = torch.from_numpy(x).to(device)
            c_part = qc.matmul(xd)
            y_part = qr.matmul(xd[..., rows_dev])
            if rank == world - 1 and corrupt != "none":
                bad = c_part if corrupt == "column" else y_part
                bad.view(-1)[0] += 0.25 * float(np.abs(weight).max()) * K ** 0.5
            y_col = comm.gather_columns(c_part, widths)
            if y_part.device != device:
                fail(f"row-shard result on {y_part.device}, expected {device}")
            y_row = comm.sum(y_part)
            if rank != 0:
                continue
            y_ref = R.gemm(x, weight, bias)
            y_unsplit = unsplit.matmul(torch.from_numpy(x)).double().numpy()
            for y, kind in ((y_col, "column"), (y_row, "row")):
                if tuple(y.shape) != y_ref.shape:
                    fail(f"{kind}-parallel result has shape {list(y.shape)}, expected {list(y_ref.shape)}")
                    continue
                e_ref, e_unsplit = rel_err(y, y_ref), rel_err(y, y_unsplit)
                if kind == "column":
                    worst_col = max(worst_col, e_ref)
                else:
                    worst_row = max(worst_row, e_ref)
                if not (e_ref < TOL and e_unsplit < TOL):
                    fail(f"{kind}-parallel x{list(x.shape)}: rel err {e_ref:.2e} vs reference, "
                         f"{e_unsplit:.2e} vs the unsplit QMatrix (limit {TOL})")
    if unsplit is not None:
        unsplit.close()
    return worst_col, worst_row


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["nccl", "gloo"], required=True)
    ap.add_argument("--device", choices=["cuda", "cpu"], required=True)
    ap.add_argument("--corrupt", choices=["none", "column", "row"], default="none",
                    help="negative control: the last rank perturbs its column or row partial result, "
                         "so the checks must fail (exit 1)")
    args = ap.parse_args(argv)
    if args.backend == "nccl" and args.device != "cuda":
        ap.error("--backend nccl needs --device cuda")

    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if args.device == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            print("mgpu_tp_worker: --device cuda but no CUDA device is visible", file=sys.stderr)
            return 2
        if args.backend == "nccl" and local_rank >= n:
            print(f"mgpu_tp_worker: NCCL needs one GPU per rank: local rank {local_rank}, {n} GPU(s)",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda", local_rank % n)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    dist.init_process_group(backend=args.backend, timeout=datetime.timedelta(seconds=120))
    comm = Ranks(args.backend, device)
    failures: List[str] = []
    try:
        for name, lay in make_layers().items():
            worst_col, worst_row = run_layer(name, lay, comm, device, failures, args.corrupt)
            if comm.rank == 0:
                print(f"{name}: world {comm.world} on {device} ({args.backend}): worst rel err "
                      f"column {worst_col:.2e}, row {worst_row:.2e}", flush=True)
    except BaseException:
        # The other ranks may be waiting in a collective this rank will never join: exit
        # at once; torch.distributed.run then stops them and reports the failure.
        print(f"FAIL [rank {comm.rank}] exception:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        os._exit(1)
    for msg in failures:
        print("FAIL " + msg, file=sys.stderr, flush=True)
    total = comm.count_failures(len(failures))
    if comm.rank == 0 and total == 0:
        print(f"TP OK: world {comm.world}, backend {args.backend}, device {args.device}, exl2 {exl2.__version__}",
              flush=True)
    dist.destroy_process_group()
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
