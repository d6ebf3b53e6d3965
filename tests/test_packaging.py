"""Packaging: the version's single source, the shipped typing (py.typed + the generated
exl2/_ext.pyi, mypy --strict on tests/typing_snippet.py), the loader's diagnostics,
`import exl2` never compiling or spawning anything, the cibuildwheel configuration, the
GitHub workflows (validated against the workflow JSON schema), and the wheel proof
(scripts/wheel_proof.sh: sdist, wheel, wheel from the sdist alone, auditwheel, a fresh
venv with only torch and no nvcc, info/demo/CPU tests/mypy outside the source tree).

Tests marked ``checkout`` need the source tree (pyproject.toml, CMakeLists.txt, cmake/,
scripts/); they skip where only tests/ was copied next to an installed wheel
(cibuildwheel's test step, and the wheel proof's own venv run). Tests marked ``repo`` also
need .github/ and .ci/, which the sdist leaves out. The other tests check the installed
package wherever it runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import exl2

ROOT = Path(__file__).resolve().parents[1]
IS_CHECKOUT = (ROOT / "CMakeLists.txt").is_file() and (ROOT / "pyproject.toml").is_file()
checkout = pytest.mark.skipif(not IS_CHECKOUT, reason="needs the source checkout (not only tests/)")
# .github/ and .ci/ are left out of the sdist: their tests skip in an unpacked sdist, never in a git checkout.
IS_REPO = IS_CHECKOUT and ((ROOT / ".git").exists() or (ROOT / ".github").is_dir())
repo = pytest.mark.skipif(not IS_REPO, reason="needs the repository (.github/, .ci/), not an sdist")
PKG = Path(exl2.__file__).resolve().parent
SNIPPET = Path(__file__).resolve().parent / "typing_snippet.py"

RELEASE_ARCHS = "75-real;80-real;86-real;89-real;90a-real;100-real;120-real;120-virtual"


def _toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(path, "rb") as f:
        return tomllib.load(f)


def _cmake_version() -> str:
    m = re.search(r"project\(exl2 VERSION ([0-9.]+)", (ROOT / "CMakeLists.txt").read_text())
    assert m, "project(exl2 VERSION x.y.z ...) not found in CMakeLists.txt"
    return m.group(1)


def _run(*cmd: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


# ----------------------------------------------------------------------------- version
@checkout
def test_version_lives_only_in_cmakelists() -> None:
    py = _toml(ROOT / "pyproject.toml")
    assert "version" in py["project"]["dynamic"] and "version" not in py["project"]
    meta = py["tool"]["scikit-build"]["metadata"]["version"]
    assert meta["provider"] == "scikit_build_core.metadata.regex" and meta["input"] == "CMakeLists.txt"
    version = _cmake_version()
    assert re.search(meta["regex"], (ROOT / "CMakeLists.txt").read_text()).group("value") == version
    # No second copy of the version string in the Python package.
    for f in (ROOT / "python" / "exl2").glob("*.py"):
        assert not re.search(r"""__version__\s*(:\s*str\s*)?=\s*["']""", f.read_text()), f"{f.name} hard-codes __version__"
    # The installed package, its metadata (= the wheel's name) and `python -m exl2 info` agree.
    from importlib.metadata import version as dist_version

    assert exl2.__version__ == dist_version("exl2") == version
    info = _run(sys.executable, "-m", "exl2", "info", cwd=ROOT.parent)
    assert info.returncode == 0, info.stderr
    assert info.stdout.splitlines()[0] == f"exl2 {version}"


# ----------------------------------------------------------------------------- typing
def test_wheel_ships_py_typed_and_ext_stub() -> None:
    assert (PKG / "py.typed").is_file(), f"py.typed missing from {PKG}"
    stub = PKG / "_ext.pyi"
    assert stub.is_file(), f"_ext.pyi (nanobind stubgen) missing from {PKG}"
    text = stub.read_text()
    public = [n for n in dir(exl2._ext) if not n.startswith("_")]
    assert public
    for name in public:
        assert re.search(rf"^(class|def) {name}\b", text, re.M), f"{name} is not in _ext.pyi"
    assert "def from_gptq(" in text and "def from_awq(" in text and "def gemm(" in text


@checkout
def test_source_tree_marks_package_typed() -> None:
    assert (ROOT / "python" / "exl2" / "py.typed").is_file()
    cmake = (ROOT / "src" / "python" / "CMakeLists.txt").read_text()
    assert "nanobind_add_stub(" in cmake and "_ext.pyi" in cmake


def _mypy(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mypy")
    return _run(sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--no-error-summary",
                "--cache-dir", os.devnull, str(path), cwd=cwd, timeout=900)


def test_mypy_strict_passes_on_the_typing_snippet(tmp_path: Path) -> None:
    r = _mypy(SNIPPET, tmp_path)  # cwd outside the tree: exl2 resolves to the installed package
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_sees_the_generated_stub(tmp_path: Path) -> None:
    """The stub is really used: a wrong type through exl2._ext is an error, not Any.
    (Import the module itself: the attribute exl2._ext is the package's ModuleType variable.)"""
    bad = tmp_path / "bad_snippet.py"
    bad.write_text("import exl2._ext as native\n\nn: int = native.version()\nnative.check_cuda_device('0')\n")
    r = _mypy(bad, tmp_path)
    assert r.returncode != 0
    assert 'expression has type "str", variable has type "int"' in r.stdout, r.stdout
    assert 'incompatible type "str"; expected "int"' in r.stdout, r.stdout


def test_typing_snippet_runs() -> None:
    r = _run(sys.executable, str(SNIPPET), cwd=SNIPPET.parent.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max |error|" in r.stdout


# ----------------------------------------------------------------------------- loader
def _package_without_extension(tmp_path: Path) -> Path:
    """A copy of the installed package's Python files, without the compiled extension."""
    dest = tmp_path / "site" / "exl2"
    dest.mkdir(parents=True)
    for f in PKG.iterdir():
        if f.suffix == ".py":
            shutil.copy2(f, dest / f.name)
    return dest


def _import_error(site: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    r = _run(sys.executable, "-c", "import exl2", cwd=site, env=env)
    assert r.returncode != 0, "import exl2 unexpectedly succeeded"
    assert "ImportError: exl2: cannot load its native extension" in r.stderr, r.stderr
    return r.stderr


def test_loader_reports_missing_extension(tmp_path: Path) -> None:
    pkg = _package_without_extension(tmp_path)
    err = _import_error(pkg.parent)
    assert f"looked in:   {pkg}" in err
    assert "no _ext*.so" in err
    assert f"Python {sys.version.split()[0]}" in err and sys.executable in err
    assert "CUDA:" in err
    assert "pip install" in err and "never compiles" in err


def test_loader_reports_extension_for_another_python(tmp_path: Path) -> None:
    pkg = _package_without_extension(tmp_path)
    other = f"_ext.cpython-{sys.version_info.major}{sys.version_info.minor + 1}-x86_64-linux-gnu.so"
    (pkg / other).write_bytes(b"\x7fELF not really")
    err = _import_error(pkg.parent)
    assert f"found:       {other}" in err
    assert "was built for another Python or platform" in err
    assert "pip install --force-reinstall" in err


def test_loader_reports_unloadable_extension(tmp_path: Path) -> None:
    import importlib.machinery

    pkg = _package_without_extension(tmp_path)
    name = "_ext" + importlib.machinery.EXTENSION_SUFFIXES[0]
    (pkg / name).write_bytes(b"not an ELF file")
    err = _import_error(pkg.parent)
    assert name in err and "dynamic loader rejected it" in err


def test_import_never_compiles_or_spawns(tmp_path: Path) -> None:
    """`import exl2` starts no process (no compiler, no nvcc, no cmake) and writes nothing
    into the package directory."""
    probe = textwrap.dedent(
        """
        import json, pathlib, sys, importlib.util
        events = []
        def hook(event, args):
            if event.startswith(("subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork")):
                events.append(event + " " + repr(args)[:200])
        spec = importlib.util.find_spec("exl2")
        pkg = pathlib.Path(spec.origin).parent
        before = sorted(p.name for p in pkg.iterdir() if p.name != "__pycache__")
        sys.addaudithook(hook)
        import exl2, exl2.nn, exl2.ops, exl2.loaders, exl2.compat, exl2.parallel
        after = sorted(p.name for p in pkg.iterdir() if p.name != "__pycache__")
        print(json.dumps({"events": events, "new_files": sorted(set(after) - set(before))}))
        """
    )
    r = _run(sys.executable, "-c", probe, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"events": [], "new_files": []}, out


# ----------------------------------------------------------------------------- cibuildwheel
@checkout
def test_cibuildwheel_configuration() -> None:
    py = _toml(ROOT / "pyproject.toml")
    cibw = py["tool"]["cibuildwheel"]
    assert cibw["build"] == ["cp310-*", "cp311-*", "cp312-*", "cp313-*"]
    assert py["tool"]["scikit-build"]["wheel"]["py-api"] == "cp312"  # 3.12+: one abi3 wheel
    assert cibw["manylinux-x86_64-image"] == cibw["manylinux-aarch64-image"] == "manylinux_2_28"
    linux = cibw["linux"]
    env = linux["environment"]
    assert env["EXL2_CUDA"] == "ON" and env["EXL2_CUDA_ARCHITECTURES"] == "release"
    assert "nvcc" in env["CUDACXX"]
    assert any("cuda-nvcc" in c and "cuda-cudart-devel" in c for c in linux["before-all"])
    assert any("auditwheel repair" in c and "--exclude libcuda.so.1" in c for c in linux["repair-wheel-command"])
    tests = "\n".join(cibw["test-command"])
    assert "python -m exl2 info" in tests and "python -m exl2 demo" in tests and "pytest tests" in tests
    assert "torch==2.13.0" in cibw["before-test"] and "whl/cpu" in cibw["before-test"]
    # The "release" list is what the issue asks for: cubins 7.5 ... 12.0, PTX for the newest.
    assert f'set(_exl2_release "{RELEASE_ARCHS}")' in (ROOT / "cmake" / "Exl2Cuda.cmake").read_text()
    # The CUDA runtime is linked statically, so the wheel needs only the driver.
    assert "CUDA::cudart_static" in (ROOT / "src" / "CMakeLists.txt").read_text()


@checkout
def test_cibuildwheel_accepts_the_configuration() -> None:
    """cibuildwheel's own schema and option parser accept [tool.cibuildwheel], and it
    selects exactly CPython 3.10-3.13 manylinux wheels for x86_64 and aarch64."""
    pytest.importorskip("cibuildwheel")  # needs Python >= 3.11
    import jsonschema
    from importlib.resources import files

    schema = json.loads(files("cibuildwheel").joinpath("resources/cibuildwheel.schema.json").read_text())
    jsonschema.validate(_toml(ROOT / "pyproject.toml")["tool"]["cibuildwheel"], schema)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIBW_")}
    r = _run(sys.executable, "-m", "cibuildwheel", "--platform", "linux", "--archs", "x86_64,aarch64",
             "--print-build-identifiers", str(ROOT), cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    ids = set(r.stdout.split())
    assert ids == {f"cp3{v}-manylinux_{a}" for v in (10, 11, 12, 13) for a in ("x86_64", "aarch64")}, ids


# ----------------------------------------------------------------------------- workflows
WORKFLOWS = ROOT / ".github" / "workflows"


def _yaml(path: Path) -> dict:
    from ruamel.yaml import YAML  # a dependency of check-jsonschema

    return YAML(typ="safe").load(path.read_text())


@repo
@pytest.mark.parametrize("schema", ["vendor.github-workflows", "custom.github-workflows-require-timeout"])
def test_workflows_validate_against_the_schema(schema: str) -> None:
    pytest.importorskip("check_jsonschema")
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert {Path(f).name for f in files} >= {"ci.yml", "wheels.yml"}
    r = _run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, *files, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@repo
def test_ci_workflow_runs_the_test_command_on_push_and_pr() -> None:
    ci = _yaml(WORKFLOWS / "ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    (job,) = ci["jobs"].values()
    assert job["timeout-minutes"] <= 90
    assert "download.pytorch.org/whl/cpu" in job["env"]["PIP_EXTRA_INDEX_URL"]
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    assert ".ci/run" in runs
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0" in ci_run and 'pip install ".[test]"' in ci_run and "pytest tests" in ci_run


@repo
def test_wheels_workflow_builds_sdist_wheels_and_publishes_on_tags() -> None:
    wf = _yaml(WORKFLOWS / "wheels.yml")
    assert wf["on"]["push"]["tags"] == ["v*"]
    jobs = wf["jobs"]
    assert {"sdist", "wheels", "publish"} <= set(jobs)
    uses = lambda job: [s.get("uses", "") for s in jobs[job]["steps"]]  # noqa: E731
    assert any(u.startswith("actions/upload-artifact@") for u in uses("sdist"))
    assert any(u.startswith("pypa/cibuildwheel@") for u in uses("wheels"))
    assert any(u.startswith("actions/upload-artifact@") for u in uses("wheels"))
    assert set(jobs["wheels"]["strategy"]["matrix"]["os"]) == {"ubuntu-24.04", "ubuntu-24.04-arm"}
    pub = jobs["publish"]
    assert set(pub["needs"]) == {"sdist", "wheels"}
    assert "refs/tags/v" in pub["if"]
    assert pub["permissions"] == {"id-token": "write"}
    assert pub["environment"]["name"] == "pypi"
    assert any(u.startswith("pypa/gh-action-pypi-publish@") for u in uses("publish"))
    assert all("password" not in (s.get("with") or {}) for s in pub["steps"])  # trusted publishing, no token


# ----------------------------------------------------------------------------- the wheel proof
@checkout
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="auditwheel and manylinux are Linux-only")
def test_wheel_proof(tmp_path: Path) -> None:
    """scripts/wheel_proof.sh end to end (about 5-6 minutes on 2 cores, CUDA for one
    architecture when nvcc is found, else the CPU backend only)."""
    for module in ("build", "auditwheel"):
        r = _run(sys.executable, "-c", f"import {module}")
        assert r.returncode == 0, f"the wheel proof needs `{module}` (pip install '.[test]')"
    env = dict(os.environ, PYTHON=sys.executable)
    # The proof's build dir, venv and logs live in tmp_path, outside the source tree.
    r = _run("bash", str(ROOT / "scripts" / "wheel_proof.sh"), str(tmp_path / "proof"), env=env, timeout=1800)
    tail = lambda text, n: "\n".join(text.splitlines()[-n:])  # noqa: E731
    log = f"wheel proof failed (rc {r.returncode}); stdout tail:\n{tail(r.stdout, 80)}\nstderr tail:\n{tail(r.stderr, 40)}"
    assert r.returncode == 0, log
    assert "WHEEL PROOF PASSED" in r.stdout, log
    s = json.loads((tmp_path / "proof" / "summary.json").read_text())
    version = _cmake_version()
    assert s["wheel"].startswith(f"exl2-{version}-") and s["sdist"] == f"exl2-{version}.tar.gz"
    assert s["info"][0] == f"exl2 {version}"
    assert s["auditwheel_show"] and s["auditwheel_show"].startswith("manylinux_"), s
    assert all("manylinux_" in t for t in s["repaired_tags"]), s
    abi = "abi3" if sys.version_info >= (3, 12) else f"cp3{sys.version_info.minor}"
    assert all(t.split("-")[1] == abi for t in s["wheel_tags"]), s
    # EXL2_CUDA=AUTO must find nvcc where there is one (and build without it elsewhere).
    nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDACXX"))
    assert s["cuda_built"] == (nvcc and os.environ.get("EXL2_CUDA", "AUTO").upper() != "OFF"), s
    print(json.dumps(s, indent=2))
    # Keep the logs, wheels and summary; drop the ~1 GB venv and the build trees.
    for big in ("venv", "build-tree", "build-sdist"):
        shutil.rmtree(tmp_path / "proof" / big, ignore_errors=True)
