"""Command line: ``python -m exl2 {info,demo,bench}``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import cli


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exl2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, backends built, CUDA architectures, devices seen")
    demo = sub.add_parser("demo", help="run an embedded demo layer and check it against exl2.reference")
    demo.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    demo.add_argument("--rows", type=int, default=8, help="rows m of the activation (default 8)")
    demo.add_argument("--format", dest="fmt", choices=["all", "exl2", "gptq", "awq"], default="all",
                      help="which demo layers to run (default: all)")
    demo.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=4, help="GPTQ code width, with --format gptq (default 4)")
    bench = sub.add_parser("bench", help="time matmul vs dense fp16 and the bandwidth floor (CUDA graphs)")
    bench.add_argument("--json", default=None, help="write the results to this JSON file")
    bench.add_argument("--m", type=int, nargs="*", default=None, help="row counts (default 1 8 16 32 64 512 2048)")
    bench.add_argument("--quick", action="store_true", help="only the 4096x4096 layers")
    bench.add_argument("--format", dest="fmt", choices=["exl2", "gptq", "awq"], default=None,
                       help="only layers of this format (default: the GPTQ-4 and EXL2 table)")
    bench.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=4, help="GPTQ code width, with --format gptq (default 4)")
    bench.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                       help="activation/output dtype of matmul and of the dense baseline (default float16)")
    args = parser.parse_args(argv)
    if args.command in ("demo", "bench") and args.bits != 4 and args.fmt != "gptq":
        parser.error(f"{args.command}: --bits {args.bits} needs --format gptq (EXL2 and AWQ have their own widths)")
    if args.command == "info":
        return cli.info()
    if args.command == "bench":
        from . import bench as bench_mod

        bench_mod.run(args.m, args.json, args.quick, fmt=args.fmt, bits=args.bits, dtype=args.dtype)
        return 0
    return cli.demo(device=args.device, rows=args.rows, fmt=args.fmt, bits=args.bits)


if __name__ == "__main__":
    sys.exit(main())
