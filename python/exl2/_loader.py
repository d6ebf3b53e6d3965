"""Import the compiled extension ``exl2._ext`` and explain loudly when that fails.

``import exl2`` never compiles anything: the extension is built when the package is
installed (``pip install .`` or a wheel). When it is missing or was built for another
Python, the error says which file was looked for and what to do.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType


def load_extension() -> ModuleType:
    """Return the native module ``exl2._ext`` or raise ImportError with a diagnosis."""
    try:
        return importlib.import_module("exl2._ext")
    except ImportError as exc:
        here = Path(__file__).resolve().parent
        found = sorted(p.name for p in here.glob("_ext*"))
        abi = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
        if not found:
            what = (
                f"no compiled extension (_ext*.so / _ext*.pyd) is present in {here}. "
                "This usually means exl2 is imported from a source checkout instead of an "
                "installed copy: run `pip install .` (or install a wheel) and import it from "
                "outside the source tree."
            )
        else:
            what = (
                f"found {', '.join(found)} in {here} but it could not be loaded by Python "
                f"{sys.version.split()[0]} ({abi}): {exc}. Reinstall exl2 for this interpreter "
                "(`pip install --force-reinstall exl2`, or rebuild from source)."
            )
        raise ImportError(f"exl2: cannot load its native extension: {what}") from exc
