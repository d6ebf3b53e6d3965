"""Import the compiled extension ``exl2._ext`` and explain loudly when that fails.

``import exl2`` never compiles anything: the extension is built when the package is
installed (``pip install .``, or prebuilt in a wheel, which needs no compiler and no CUDA
toolkit, only the NVIDIA driver for GPU use). When the extension is missing or was built
for another Python, platform or CUDA setup, the error names the file(s) looked at, this
interpreter, and what to do.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import platform
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import List

_FIX_REINSTALL = (
    "Reinstall exl2 for this interpreter: `pip install --force-reinstall --no-cache-dir exl2` "
    "(a prebuilt wheel), or rebuild from source with `pip install --force-reinstall .` in a checkout."
)


def _interpreter() -> str:
    tag = getattr(sys.implementation, "cache_tag", None) or sys.implementation.name
    return (
        f"Python {platform.python_version()} ({platform.python_implementation()}, {tag}, "
        f"{sysconfig.get_platform()}) at {sys.executable}"
    )


def _cuda_context() -> str:
    """What is known about CUDA without importing anything new (torch is imported by then)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return "torch not imported"
    cuda = getattr(getattr(torch, "version", None), "cuda", None)
    return f"torch {getattr(torch, '__version__', '?')} (CUDA {cuda or 'none: CPU build'})"


def _hints(message: str, found: List[Path]) -> List[str]:
    """Specific advice for the usual causes, from the loader's error text and the files."""
    hints: List[str] = []
    accepted = importlib.machinery.EXTENSION_SUFFIXES
    loadable = {"_ext" + suffix for suffix in accepted}
    foreign = [p.name for p in found if p.name not in loadable]
    if foreign:
        hints.append(
            f"{', '.join(foreign)} was built for another Python or platform: this interpreter only "
            f"loads extension files ending in {', '.join(accepted)}."
        )
    if any(".abi3." in p.name for p in found) and sys.version_info < (3, 12):
        hints.append("the stable-ABI (abi3) build of exl2 needs Python >= 3.12; use the cp310/cp311 wheel instead.")
    if "libcuda.so" in message:
        hints.append(
            "the NVIDIA driver library libcuda.so.1 was not found. exl2 links the CUDA runtime "
            "statically and needs only the driver: install the NVIDIA driver, or use exl2 on the CPU "
            "from a build without CUDA (EXL2_CUDA=OFF pip install .)."
        )
    elif "libcudart" in message or "libcublas" in message:
        hints.append(
            "this build of exl2 links a shared CUDA library that is not on the library path; the "
            "official wheels link the CUDA runtime statically. Rebuild, or add the toolkit's lib64 "
            "directory to LD_LIBRARY_PATH."
        )
    if "GLIBC" in message or "GLIBCXX" in message or "CXXABI" in message:
        hints.append(
            "the extension was built on a newer Linux (C/C++ runtime) than this one: install the "
            "manylinux wheel from PyPI, or build from source on this machine."
        )
    if "undefined symbol" in message and not hints:
        hints.append("the extension was built against another Python (or a mismatched exl2 build).")
    if not hints:
        hints.append("the file exists but the dynamic loader rejected it (incomplete or corrupted installation?).")
    return hints


def load_extension() -> ModuleType:
    """Return the native module ``exl2._ext`` or raise ImportError with a diagnosis."""
    try:
        return importlib.import_module("exl2._ext")
    except ImportError as exc:
        raise ImportError(_diagnose(exc)) from exc


def _diagnose(exc: BaseException) -> str:
    here = Path(__file__).resolve().parent
    found = sorted(p for p in here.glob("_ext*") if p.suffix in (".so", ".pyd", ".dylib"))
    lines = [f"exl2: cannot load its native extension exl2._ext ({type(exc).__name__}: {exc})"]
    lines.append(f"  looked in:   {here}")
    lines.append("  found:       " + (", ".join(p.name for p in found) if found else "no _ext*.so / _ext*.pyd file"))
    lines.append(f"  interpreter: {_interpreter()}")
    lines.append(f"  CUDA:        {_cuda_context()}")
    if not found:
        lines.append(
            "  why:         exl2 is probably imported from a source checkout (python/exl2) instead of an "
            "installed copy, or the installation is incomplete."
        )
        lines.append(
            "  what to do:  `pip install exl2` (prebuilt wheel: no compiler, no CUDA toolkit needed) or "
            "`pip install .` in the checkout, then import exl2 from outside the source tree. "
            "`import exl2` never compiles anything."
        )
    else:
        for hint in _hints(str(exc), found):
            lines.append(f"  why:         {hint}")
        lines.append(f"  what to do:  {_FIX_REINSTALL}")
    return "\n".join(lines)
