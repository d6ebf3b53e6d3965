"""Command line: ``python -m exl2 {info,demo}``."""

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
    args = parser.parse_args(argv)
    if args.command == "info":
        return cli.info()
    return cli.demo(device=args.device, rows=args.rows)


if __name__ == "__main__":
    sys.exit(main())
