"""The documentation in docs/: built with warnings as errors, and every snippet in it run.

Fenced code blocks in the Markdown pages are handled by their language:

- ``python``: executed, in page order, in one namespace per page (like a notebook), in a fresh
  temporary directory, on the CPU unless the snippet itself picks CUDA. The migration page's
  "before" code imports ``exllamav2_kernels``; it runs with that name bound to ``exl2.compat``.
- ``bash``: every command is checked: ``python -m exl2 ...`` runs in-process (``bench`` only
  parses its arguments: it takes minutes; ``--plot`` is accepted without matplotlib), ``pip install`` extras, requirement files
  and environment variables must exist, ``cmake`` ``-D`` options must be options of
  CMakeLists.txt, paths must exist; an unknown program fails the test.
- ``cmake``: the ``EXL2_*`` variables and ``exl2::`` targets it names must exist.
- ``text``: output and diagrams, not run.
- C++ appears only through ``{literalinclude}`` of examples/cpp (built and run by test_cpp.py);
  an inline C++ block fails the test.

The HTML build needs the packages of docs/requirements.txt (Sphinx and myst-parser); without
them that one test is skipped, everything else still runs.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
pytestmark = pytest.mark.skipif(not (DOCS / "conf.py").exists(), reason="needs a source checkout (docs/)")

PAGES = sorted(p for p in DOCS.glob("*.md") if p.name != "README.md")
CPP_EXAMPLE = ROOT / "examples" / "cpp" / "main.cpp"

# The README's two set-up commands; they must stay exactly as they are.
SETUP_COMMANDS = (
    "pip install torch==2.13.0 && pip install . && python -m exl2 demo",
    'pip install torch==2.13.0 && pip install ".[test]" && python -m pytest tests',
)


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    directive: str = ""  # "literalinclude", "toctree", ... for ```{name} fences
    argument: str = ""  # what follows ```{name} (a file for literalinclude)

    def __str__(self) -> str:
        return f"{self.page.name}:{self.line} ({self.lang or self.directive})"


_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")


def _closes(line: str, fence: str) -> bool:
    s = line.strip()
    return len(s) >= len(fence) and set(s) == {fence[0]}


def blocks(page: Path) -> List[Block]:
    """The fenced blocks of a MyST page (``` or ~~~ fences; ::: fences hold prose)."""
    out: List[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        directive, argument, lang = "", "", info.split()[0] if info else ""
        d = re.match(r"^\{([\w-]+)\}\s*(.*)$", info)
        if d:
            directive, argument = d.group(1), d.group(2).strip()
            lang = argument.split()[0] if argument and directive == "code-block" else ""
        start = j = i + 1
        while j < len(lines) and not _closes(lines[j], fence):
            j += 1
        out.append(Block(page, start + 1, lang, "\n".join(lines[start:j]) + "\n", directive, argument))
        i = j + 1
    return out


ALL_BLOCKS = [b for p in PAGES for b in blocks(p)]
KNOWN_DIRECTIVES = {"toctree", "literalinclude", "figure", "image", "note", "warning", "eval-rst", "code-block"}


def test_pages_exist() -> None:
    names = {p.stem for p in PAGES}
    for required in ("index", "installation", "quickstart", "formats", "migration", "pytorch", "cpp",
                     "performance"):
        assert required in names
    assert (DOCS / "api.rst").exists()


def test_every_block_is_classified() -> None:
    for b in ALL_BLOCKS:
        if b.directive and b.directive != "code-block":
            assert b.directive in KNOWN_DIRECTIVES, f"{b}: unknown directive {b.directive}"
            continue
        assert b.lang in ("python", "bash", "cmake", "text"), (
            f"{b}: fence language {b.lang!r}; use python (run), bash (checked), cmake (checked) or text, "
            "and C++ only through {literalinclude} of examples/cpp"
        )


# ------------------------------------------------------------------ python snippets
PY_PAGES = [p for p in PAGES if any(b.lang == "python" for b in blocks(p))]


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.mark.parametrize("page", PY_PAGES, ids=[p.stem for p in PY_PAGES])
def test_python_snippets(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import exl2

    monkeypatch.setitem(sys.modules, "exllamav2_kernels", exl2.compat)
    namespace: Dict[str, object] = {"__name__": f"docs_{page.stem}"}
    with _chdir(tmp_path):
        for b in blocks(page):
            if b.lang != "python":
                continue
            # Pad with newlines so that tracebacks give the line numbers of the page.
            code = compile("\n" * (b.line - 1) + b.code, str(page), "exec")
            try:
                exec(code, namespace)  # noqa: S102
            except Exception as exc:  # pragma: no cover - the message is the point
                raise AssertionError(f"snippet at {b} failed: {type(exc).__name__}: {exc}") from exc
    # Drop the page's objects (layers, compiled models) now. Not namespace.clear(): dynamo keeps
    # entries of its own in the globals of compiled code and removes them when they die.
    torch._dynamo.reset()
    del namespace
    gc.collect()


# -------------------------------------------------------------------- shell blocks
def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _cmake_options() -> set:
    text = (ROOT / "CMakeLists.txt").read_text()
    names = set(re.findall(r"^\s*option\((EXL2_\w+)", text, re.M))
    names |= set(re.findall(r"^\s*set\((EXL2_\w+)\s+\S+\s+CACHE", text, re.M))
    return names


_ENV_VALUES = {
    "EXL2_CUDA": re.compile(r"^(AUTO|ON|OFF)$"),
    "EXL2_CUDA_ARCHITECTURES": re.compile(r"^(auto|release|host|\d+a?(-real|-virtual)?(;\d+a?(-real|-virtual)?)*)$"),
    "CMAKE_BUILD_PARALLEL_LEVEL": re.compile(r"^\d+$"),
    "EXL2_CUDA_TC": re.compile(r"^[01]$"),  # read by src/cuda/tc_gemm.cu at construction (0: canonical layout)
}


def _commands(code: str) -> List[List[str]]:
    text = re.sub(r"\\\n", " ", code)
    cmds: List[List[str]] = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            cmds.append(shlex.split(part))
    return cmds


def _run_exl2_cli(args: List[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import exl2.__main__ as cli
    import exl2.bench

    calls: List[tuple] = []
    monkeypatch.setattr(exl2.bench, "run", lambda *a, **k: calls.append(a) or {})
    # Only the arguments are checked: --plot's optional matplotlib need not be installed.
    monkeypatch.setattr(exl2.bench, "require_matplotlib", lambda: None)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(args)
    assert rc == 0, f"python -m exl2 {' '.join(args)} -> {rc}\n{out.getvalue()}"
    if args[0] == "bench":
        assert calls, "bench did not run"
    if args[0] == "demo":
        assert "demo passed" in out.getvalue()


def _check_command(cmd: List[str], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    while cmd and re.match(r"^[A-Z_][A-Z0-9_]*=", cmd[0]):
        name, _, value = cmd.pop(0).partition("=")
        assert name in _ENV_VALUES, f"{where}: unknown environment variable {name}"
        assert _ENV_VALUES[name].match(value), f"{where}: {name}={value} is not a valid value"
    assert cmd, f"{where}: empty command"
    prog, args = cmd[0], cmd[1:]
    if prog == "pip":
        assert args[0] == "install", f"{where}: pip {args[0]}"
        extras = _pyproject()["project"]["optional-dependencies"]
        it = iter(args[1:])
        for a in it:
            if a == "-r":
                req = next(it)
                assert (ROOT / req).is_file(), f"{where}: no requirements file {req}"
            elif a.startswith(".["):
                for extra in a[2:-1].split(","):
                    assert extra in extras, f"{where}: pyproject.toml has no extra {extra!r}"
            elif a in (".", "exl2") or re.match(r"^torch==[\d.]+$", a) or re.match(r"^\./exl2-[\w.-]+\.whl$", a):
                pass
            else:
                raise AssertionError(f"{where}: unexpected pip argument {a!r}")
    elif prog == "python":
        if args[:2] == ["-m", "exl2"]:
            _run_exl2_cli(args[2:], monkeypatch)
        elif args[:2] == ["-m", "pytest"]:
            assert all((ROOT / a).exists() for a in args[2:] if not a.startswith("-")), where
        elif args[:2] == ["-m", "sphinx"]:
            assert "-W" in args and "docs" in args, f"{where}: the docs are built with -W from docs/"
        elif args and args[0] == "docs/perf_plot.py":
            sys.path.insert(0, str(DOCS))
            try:
                import perf_plot
            finally:
                sys.path.remove(str(DOCS))
            perf_plot.build_parser().parse_args(args[1:])
        else:
            raise AssertionError(f"{where}: unexpected python command {args}")
    elif prog == "cmake":
        options = _cmake_options()
        for i, a in enumerate(args):
            if a.startswith("-D"):
                name = a[2:].split("=", 1)[0].split(":", 1)[0]
                assert name in options or name.startswith("CMAKE_"), f"{where}: {name} is not a CMake option"
                if name in _ENV_VALUES:
                    assert _ENV_VALUES[name].match(a.split("=", 1)[1]), f"{where}: bad value in {a}"
            if a == "-S":
                assert (ROOT / args[i + 1]).is_dir(), f"{where}: no source directory {args[i + 1]}"
    elif prog in ("ctest", "cd", "mkdir"):
        pass
    elif prog.startswith("./") or prog.startswith("build"):
        assert prog.endswith("exl2_example"), f"{where}: unexpected program {prog}"
    else:
        raise AssertionError(f"{where}: unknown program {prog!r} (teach tests/test_docs.py how to check it)")


SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "bash"]


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[str(b) for b in SHELL_BLOCKS])
def test_shell_commands(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    cmds = _commands(block.code)
    assert cmds, f"{block}: no command"
    for cmd in cmds:
        _check_command(list(cmd), str(block), monkeypatch)


def test_cmake_blocks() -> None:
    options = _cmake_options()
    for b in (b for b in ALL_BLOCKS if b.lang == "cmake"):
        for name in re.findall(r"\b(EXL2_[A-Z_]+)\b", b.code):
            assert name in options, f"{b}: {name} is not a CMake option"
        for target in re.findall(r"\bexl2::\w+", b.code):
            assert target == "exl2::exl2", f"{b}: unknown target {target}"


def test_setup_commands_unchanged() -> None:
    readme = (ROOT / "README.md").read_text()
    install = (DOCS / "installation.md").read_text()
    for cmd in SETUP_COMMANDS:
        assert f"```bash\n{cmd}\n```" in readme, f"README.md lost the set-up command {cmd!r}"
        assert f"```bash\n{cmd}\n```" in install, f"installation.md lost the set-up command {cmd!r}"
    assert "docs/" in readme  # the README links to the documentation


# ----------------------------------------------------------------------------- C++
def test_cpp_comes_from_the_example() -> None:
    """The C++ page shows examples/cpp/main.cpp and its CMakeLists.txt by inclusion (so it is
    the file test_cpp.py builds and runs), never a copy."""
    included = {(b.page / ".." / b.argument).resolve() for b in ALL_BLOCKS if b.directive == "literalinclude"}
    assert CPP_EXAMPLE.resolve() in included
    assert (ROOT / "examples" / "cpp" / "CMakeLists.txt").resolve() in included
    for path in included:
        assert path.is_file(), f"literalinclude of a missing file: {path}"


# --------------------------------------------------------------------- performance
def _perf_plot():
    sys.path.insert(0, str(DOCS))
    try:
        import perf_plot
    finally:
        sys.path.remove(str(DOCS))
    return perf_plot


def test_performance_tables_match_the_json() -> None:
    pp = _perf_plot()
    data = pp.load()
    assert pp.page_tables() == pp.markdown_tables(data), (
        "docs/performance.md's tables differ from docs/perf/h100_bench.json: "
        "run python docs/perf_plot.py --update-page"
    )
    assert (DOCS / "perf" / "h100_bench.png").is_file()


def test_performance_dense_threshold_is_current() -> None:
    """The page and the plot say where matmul on CUDA switches to dequantize + cuBLAS: m >= 65 for
    the tensor-core layout, m >= 129 on layers of at least 2^25 weights with the wgmma kernel, m >=
    513 where the warp-specialised wgmma kernel's blocks fill the GPU, m >= 13 for the canonical
    layout (float16)."""
    import torch

    from exl2 import qmatrix

    pp = _perf_plot()
    assert qmatrix._DENSE_MIN_ROWS[torch.float16] == pp.DENSE_MIN_ROWS == 13
    assert qmatrix._TC_MAX_ROWS + 1 == pp.TC_DENSE_MIN_ROWS == 65
    assert qmatrix._WGMMA_MAX_ROWS + 1 == pp.WGMMA_DENSE_MIN_ROWS == 129
    assert qmatrix._WS_MAX_ROWS + 1 == pp.WS_DENSE_MIN_ROWS == 513
    assert qmatrix._WGMMA_MIN_WEIGHTS == pp.WGMMA_MIN_WEIGHTS
    page = (DOCS / "performance.md").read_text()
    for text in ("m ≥ 13", "m ≥ 65", "m ≥ 129", "m ≥ 513", "2^25 weights"):
        assert text in page, text
    assert pp.dense_min_rows({"command": "python -m exl2 bench"}, "8192x28672") == 513
    assert pp.dense_min_rows({"command": "python -m exl2 bench"}, "4096x14336") == 513
    assert pp.dense_min_rows({"command": "python -m exl2 bench"}, "14336x4096") == 129
    assert pp.dense_min_rows({"command": "python -m exl2 bench"}, "4096x4096") == 65
    assert pp.dense_min_rows({"command": "EXL2_CUDA_TC=0 python -m exl2 bench"}, "8192x28672") == 13


def test_performance_plot_renders(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (only needed to regenerate the plot)")
    pp = _perf_plot()
    png = tmp_path / "bench.png"
    pp.plot(pp.load(), png)
    assert png.stat().st_size > 10_000


# --------------------------------------------------------------------------- build
def test_sphinx_build_warnings_are_errors(tmp_path: Path) -> None:
    missing = [m for m in ("sphinx", "myst_parser") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the docs build needs {', '.join(missing)} (pip install -r docs/requirements.txt)")
    r = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", "-d", str(tmp_path / "doctrees"),
         str(DOCS), str(tmp_path / "html")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, f"sphinx-build failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    html = (tmp_path / "html" / "api.html").read_text()
    for name in ("QMatrix", "from_gptq", "make_q_matrix", "QuantLinear", "split_columns", "load_gptq",
                 "dequantize_exl2"):
        assert name in html, f"api.html does not document {name}"
    assert (tmp_path / "html" / "_images" / "h100_bench.png").exists() or \
        list((tmp_path / "html").rglob("h100_bench.png")), "the performance plot is not in the build"
