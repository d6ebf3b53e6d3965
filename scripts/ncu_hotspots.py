"""Where a kernel's warps stall, per SASS instruction: a summary of Nsight Compute's source page.

    scripts/ncu_source.sh tc_wgmma_kernel 8192 28672 64 > wg64.csv   # on the GPU machine
    python scripts/ncu_hotspots.py wg64.csv --top 40                  # anywhere

The input is ``ncu --import REPORT --page source --csv --print-source sass`` of a report taken with
``--section SourceCounters``: a "Kernel Name" line, a header line, then one line per SASS
instruction with its address, text, warp-stall samples (all, and per reason in the ``stall_*``
columns) and how often it executed. The report prints:

- the share of all samples per stall reason;
- the share of samples and of executed instructions per opcode (``IMAD``, ``LDGSTS``, ...);
- the ``--top`` instructions by samples, in program order, each with its three largest reasons;
- with ``--range FIRST LAST``, every instruction of that index range and its execution count
  (to read a hot loop whole);
- with ``--per N``, the instructions grouped by how often each ran (the code of one loop level
  runs equally often: a loop body, an iteration's bookkeeping, a prologue), each class with its
  instructions executed per unit of work (N units, e.g. chunks x warps) and its share of the
  samples. Session 17 read the wgmma kernel's 138 instructions per chunk and warp this way, 72
  of them the chunk's own (docs/kernels.md, "Where a 64-row block's time goes").

A hot spot's share of samples is where the time goes; an opcode's share of executed instructions
is what the kernel spends its issue slots on. Session 14 found this way that a third of the wgmma
kernel's instructions at m = 64 were its activation copies (docs/kernels.md, "Lean activation
copies").
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

_ALL = "Warp Stall Sampling (All Samples)"
_EXECUTED = "Instructions Executed"


@dataclass
class Instruction:
    """One SASS instruction of the source page."""

    index: int
    address: str
    text: str
    samples: float
    executed: float
    stalls: Dict[str, float] = field(default_factory=dict)

    @property
    def opcode(self) -> str:
        """The opcode without its modifiers or predicate (``@!P4 BRA`` -> ``BRA``)."""
        words = [w for w in self.text.split() if not w.startswith("@")]
        return words[0].split(".")[0] if words else "?"


def _number(text: str) -> float:
    text = text.replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return 0.0


def load(path: Path) -> Tuple[str, List[Instruction]]:
    """The kernel's name and its instructions from a ``--page source --csv`` export."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    if len(lines) < 2 or not lines[0] or lines[0][0] != "Kernel Name":
        raise ValueError(f"{path}: expected ncu's source page as CSV (a 'Kernel Name' line first)")
    kernel = lines[0][1] if len(lines[0]) > 1 else ""
    header = lines[1]
    col = {name: i for i, name in enumerate(header)}
    for needed in ("Address", "Source", _ALL, _EXECUTED):
        if needed not in col:
            raise ValueError(f"{path}: no column {needed!r} (take the report with --section SourceCounters)")
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    out = []
    for i, line in enumerate(lines[2:]):
        if len(line) < len(header):
            continue
        out.append(Instruction(i, line[col["Address"]], line[col["Source"]].strip(), _number(line[col[_ALL]]),
                               _number(line[col[_EXECUTED]]),
                               {r[len("stall_"):]: _number(line[col[r]]) for r in reasons}))
    return kernel, out


def stall_shares(rows: Sequence[Instruction]) -> Dict[str, float]:
    """Each stall reason's share of all samples, largest first."""
    total = sum(r.samples for r in rows) or 1.0
    sums: Counter = Counter()
    for r in rows:
        sums.update(r.stalls)
    return {k: v / total for k, v in sums.most_common()}


def opcode_shares(rows: Sequence[Instruction]) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Per opcode: (share of samples, share of executed instructions), each largest first."""
    samples: Counter = Counter()
    executed: Counter = Counter()
    for r in rows:
        samples[r.opcode] += r.samples
        executed[r.opcode] += r.executed
    ts = sum(samples.values()) or 1.0
    te = sum(executed.values()) or 1.0
    return ({k: v / ts for k, v in samples.most_common()}, {k: v / te for k, v in executed.most_common()})


def hotspots(rows: Sequence[Instruction], top: int) -> List[Instruction]:
    """The ``top`` instructions by samples, in program order."""
    chosen = sorted(rows, key=lambda r: -r.samples)[:top]
    return sorted(chosen, key=lambda r: r.index)


@dataclass
class ExecutionClass:
    """The instructions that ran equally often."""

    executions: float  # how often each of them ran
    instructions: int
    executed: float  # their executions together
    samples: float


# Execution classes that report() lists (the rest are the small per-launch pieces of a kernel).
_CLASSES_SHOWN = 12


def execution_classes(rows: Sequence[Instruction]) -> List[ExecutionClass]:
    """The instructions grouped by execution count, most executed (in total) first; instructions
    that never ran are left out."""
    classes: Dict[float, ExecutionClass] = {}
    for r in rows:
        if r.executed <= 0:
            continue
        c = classes.setdefault(r.executed, ExecutionClass(r.executed, 0, 0.0, 0.0))
        c.instructions += 1
        c.executed += r.executed
        c.samples += r.samples
    return sorted(classes.values(), key=lambda c: -c.executed)


def _shares(d: Dict[str, float], least: float = 0.01, most: int = 20) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in list(d.items())[:most] if v >= least)


def report(kernel: str, rows: Sequence[Instruction], top: int, span: Optional[Tuple[int, int]] = None,
           per: Optional[float] = None) -> str:
    """The text main() prints (``per``: units of work for the execution classes, None: no classes)."""
    total = sum(r.samples for r in rows) or 1.0
    executed = sum(r.executed for r in rows)
    by_samples, by_executed = opcode_shares(rows)
    lines = [f"kernel: {kernel}",
             f"{len(rows)} instructions, {total:.0f} samples, {executed:.0f} executed",
             "stall reasons: " + _shares(stall_shares(rows)),
             "samples by opcode: " + _shares(by_samples),
             "executed by opcode: " + _shares(by_executed)]
    if top > 0:
        lines.append(f"top {top} by samples (index, share, executions, instruction, largest reasons):")
        for r in hotspots(rows, top):
            reasons = sorted(r.stalls.items(), key=lambda kv: -kv[1])[:3]
            why = " ".join(f"{k} {v / max(r.samples, 1.0):.2f}" for k, v in reasons if v > 0)
            lines.append(f"{r.index:6d} {r.samples / total:6.2%} {r.executed:10.0f}  {r.text[:72]:72s} {why}")
    if per is not None:
        classes = execution_classes(rows)[:_CLASSES_SHOWN]
        lines.append(f"by execution count, the {_CLASSES_SHOWN} largest classes (executions, instructions, per unit "
                     f"of {per:g}, share of samples):")
        lines += [f"{c.executions:12.0f} {c.instructions:6d} {c.executed / per:8.1f} {c.samples / total:7.1%}"
                  for c in classes]
        lines.append(f"{'all':>12s} {len(rows):6d} {executed / per:8.1f}"
                     f" (the classes above: {sum(c.executed for c in classes) / per:.1f})")
    if span is not None:
        first, last = span
        lines.append(f"instructions {first}..{last}:")
        lines += [f"{r.index:6d} {r.executed:10.0f}  {r.text}" for r in rows if first <= r.index <= last]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=40, help="hot instructions to list (0: none)")
    parser.add_argument("--range", nargs=2, type=int, metavar=("FIRST", "LAST"),
                        help="also list the instructions of this index range")
    parser.add_argument("--per", type=float, metavar="N",
                        help="also group the instructions by execution count, per N units of work")
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error(f"--top: expected 0 or more, got {args.top}")
    if args.per is not None and not args.per > 0:
        parser.error(f"--per: expected a positive number of units, got {args.per}")
    kernel, rows = load(args.csv)
    print(report(kernel, rows, args.top, tuple(args.range) if args.range else None, args.per))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
