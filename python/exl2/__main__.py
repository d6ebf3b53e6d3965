"""Command line: ``python -m exl2 {info,demo,bench}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from . import bench, cli


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _shape(text: str) -> Tuple[int, int]:
    """argparse type: ``KxN`` (exl2.bench.parse_shape)."""
    try:
        return bench.parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bench_device(text: str) -> str:
    """argparse type: a usable device, ``cpu``, ``cuda`` or ``cuda:N`` (exl2.bench.check_device)."""
    try:
        bench.check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _output_file(suffix: Optional[str] = None) -> Callable[[str], str]:
    """argparse type: a file to write, in an existing directory (with ``suffix``, if given),
    checked before the benchmark runs."""

    def check(text: str) -> str:
        path = Path(text)
        if suffix and path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"expected a {suffix} file name, got {text!r}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a directory")
        if not path.resolve().parent.is_dir():
            raise argparse.ArgumentTypeError(f"the directory of {text!r} does not exist")
        return text

    return check


def _bench_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``bench`` subcommand's arguments."""
    p = sub.add_parser("bench", help="time matmul vs dense torch.matmul and the bandwidth floor (CUDA or CPU)")
    p.add_argument("--device", type=_bench_device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--m", type=_positive_int, nargs="+", default=None, metavar="M",
                   help="row counts (default " + " ".join(map(str, bench.DEFAULT_MS)) + ")")
    shapes = p.add_mutually_exclusive_group()
    shapes.add_argument("--quick", action="store_true", help="only the 4096x4096 layers")
    shapes.add_argument("--shapes", type=_shape, nargs="+", default=None, metavar="KxN",
                        help=f"layer shapes, K a multiple of {bench.K_MULTIPLE}, N of {bench.N_MULTIPLE} "
                             "(default: " + " ".join(f"{k}x{n}" for k, n in bench.SHAPES) +
                             "; on the CPU only 4096x4096)")
    p.add_argument("--format", dest="fmt", choices=bench.FORMATS, default=None,
                   help="only layers of this format (default: GPTQ 4-bit and EXL2 2.5/4.0/4.5/6.0 bpw)")
    p.add_argument("--bits", type=int, choices=bench.GPTQ_BITS, default=4,
                   help="GPTQ code width, with --format gptq (default 4)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                   help="activation/output dtype of matmul and of the dense baseline on CUDA (default float16; "
                        "the CPU baseline is float32)")
    p.add_argument("--json", type=_output_file(), default=None, metavar="FILE",
                   help="write the results to this JSON file")
    p.add_argument("--plot", type=_output_file(".png"), default=None, metavar="FILE.png",
                   help="plot time vs m per shape into this PNG (needs matplotlib: pip install exl2[plot])")
    return p


def _check_bench_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone: repeated values, matplotlib for --plot."""
    for name, values, show in (("--m", args.m, str), ("--shapes", args.shapes, lambda s: "%dx%d" % s)):
        repeated = [v for i, v in enumerate(values or []) if v in values[:i]]
        if repeated:
            p.error(f"argument {name}: {show(repeated[0])} is given more than once")
    if args.plot:
        try:
            bench.require_matplotlib()
        except ImportError as exc:
            p.error(str(exc))


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
    bench_p = _bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("demo", "bench") and args.bits != 4 and args.fmt != "gptq":
        parser.error(f"{args.command}: --bits {args.bits} needs --format gptq (EXL2 and AWQ have their own widths)")
    if args.command == "info":
        return cli.info()
    if args.command == "bench":
        _check_bench_args(bench_p, args)
        bench.run(args.m, args.json, args.quick, fmt=args.fmt, bits=args.bits, dtype=args.dtype,
                  device=args.device, shapes=args.shapes, plot_path=args.plot)
        return 0
    return cli.demo(device=args.device, rows=args.rows, fmt=args.fmt, bits=args.bits)


if __name__ == "__main__":
    sys.exit(main())
