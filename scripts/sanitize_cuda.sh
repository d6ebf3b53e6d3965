#!/usr/bin/env bash
# compute-sanitizer over exl2's CUDA code (run on a GPU machine, e.g. the H100).
#
# For each requested tool (memcheck, racecheck, synccheck; initcheck on request) this runs
#   1. a driver (written below) that calls every CUDA entry point on edge-case shapes:
#      EXL2 and GPTQ-4 built on the device and from host memory, GPTQ 2/3/8-bit and AWQ
#      (built through the host), float16 and bfloat16 activations, every bit width incl.
#      codes straddling words, short last groups,
#      act-order, bias / no bias, N not a multiple of the tile widths, m in every kernel
#      bucket (GEMV m <= 8, 64x64 and 128x128 MMA tiles; tensor-core kernel: m = 1 gathering
#      in the kernel, over two activation segments too, m <= 8 transposed, 16/32/64-row tiles,
#      wgmma, its 64-row tiles' deep ring), x / out at odd (2-byte aligned)
#      addresses, host- and device-resident construction inputs, NaN-checked scales,
#      dequantize, side streams, a close() while a GEMM is still queued; results are
#      checked against the numpy reference; it runs twice, the second time with the
#      canonical layout and its kernels (EXL2_CUDA_TC=0; the first run has the default
#      tensor-core layout on compute capability 9.0+);
#   2. the CUDA test suite: tests/test_cuda.py plus the cuda-marked tests of
#      tests/test_reliability.py (minus timing and 10,000-cycle leak tests, which only
#      measure speed / host memory and take too long under instrumentation).
# The driver runs with PYTORCH_NO_CUDA_MEMORY_CACHING=1: every torch tensor gets its own
# cudaMalloc, so an overrun of x or out by an exl2 kernel is out of bounds for memcheck (with
# torch's caching allocator it would land in a neighbouring cached block and go unnoticed).
# The pytest suite keeps the caching allocator (CUDA graph capture needs it).
# racecheck / synccheck / initcheck check only exl2's kernels (--kernel-name kns=exl2)
# unless EXL2_SANITIZE_ALL_KERNELS=1; memcheck checks all kernels and API calls.
#
# Usage: scripts/sanitize_cuda.sh [TOOL ...]      (default: memcheck racecheck synccheck)
#        e.g. scripts/sanitize_cuda.sh memcheck    (one tool per call keeps each run short)
# Environment:
#   PYTHON                 interpreter with exl2 (built with CUDA) and torch (default: python)
#   EXL2_SANITIZE_SUITE    driver | pytest | all (default: all)
#   EXL2_SANITIZE_LOGDIR   where the compute-sanitizer logs go (default: $OUT or a temp dir)
#   COMPUTE_SANITIZER      path of compute-sanitizer (default: from PATH or $CUDA_HOME/bin)
#   EXL2_SANITIZE_PYTEST_K pytest -k expression for the suite (default: see PYTEST_K below)
# Exit status: 0 only when every run reports "ERROR SUMMARY: 0 errors" and its program passed.
#
# Build the extension with CUDA first, e.g.:
#   EXL2_CUDA=ON EXL2_CUDA_ARCHITECTURES=host pip install --no-build-isolation --no-deps .
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
SUITE="${EXL2_SANITIZE_SUITE:-all}"
TOOLS=("$@")
if [[ ${#TOOLS[@]} -eq 0 ]]; then TOOLS=(memcheck racecheck synccheck); fi
LOGDIR="${EXL2_SANITIZE_LOGDIR:-${OUT:-$(mktemp -d)}}"
mkdir -p "${LOGDIR}"

CS="${COMPUTE_SANITIZER:-}"
if [[ -z "${CS}" ]]; then
  CS="$(command -v compute-sanitizer || true)"
fi
for d in "${CUDA_HOME:-}" /usr/local/cuda /opt/cuda; do
  if [[ -z "${CS}" && -n "${d}" && -x "${d}/bin/compute-sanitizer" ]]; then CS="${d}/bin/compute-sanitizer"; fi
done
if [[ -z "${CS}" ]]; then
  CS="$(ls -1 /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)"
fi
if [[ -z "${CS}" ]]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
  exit 2
fi
echo "== compute-sanitizer: ${CS} ($("${CS}" --version 2>/dev/null | tail -n 1))"
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null || true

"${PYTHON}" - <<'EOF' || { echo "exl2 with CUDA is not importable by ${PYTHON}" >&2; exit 2; }
import exl2, torch
assert exl2.built_with_cuda(), "exl2 was built without CUDA"
assert torch.cuda.is_available(), "torch sees no GPU"
print("exl2", exl2.__version__, "archs", exl2.cuda_architectures(), "torch", torch.__version__, torch.version.cuda)
EOF

DRIVER="${LOGDIR}/exl2_sanitize_driver.py"
cat >"${DRIVER}" <<'EOF'
"""Every exl2 CUDA entry point on edge-case shapes, results checked (for compute-sanitizer)."""
import numpy as np
import torch

import exl2
from exl2 import reference as R

rng = np.random.default_rng(0)
dev = torch.device("cuda", 0)
checked = 0


def odd(t):
    """A copy of t at an address that is 2-byte but not 16-byte aligned, in an exact-size buffer."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=dev)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    return v


def check(q, weight, bias, ms, dtypes=(torch.float16,)):
    """dequantize bit-exact (fp16) / within rounding (bf16); matmul against float64 in each dtype."""
    global checked
    K, N = weight.shape
    W = weight.astype(np.float64)
    dq = q.dequantize().cpu().numpy()
    assert np.array_equal(dq.view(np.uint16), weight.view(np.uint16)), "dequantize differs"
    if torch.bfloat16 in dtypes:
        dqb = q.dequantize(torch.bfloat16).float().cpu().numpy()
        assert np.abs(dqb - W).max() <= np.abs(W).max() / 128 + 1e-30, "bfloat16 dequantize differs"
    for dtype in dtypes:
        tol = 3e-3 if dtype == torch.float16 else 3e-2
        for m in ms:
            x = (rng.standard_normal((m, K))).astype(np.float16)
            xt = torch.from_numpy(x).to(dev).to(dtype)
            xr = xt.double().cpu().numpy()
            ref = xr @ W + (0 if bias is None else bias.astype(np.float64))
            for variant in range(2 if m in (1, 5, 9, 65) else 1):
                if variant == 0:
                    y = q.matmul(xt)
                else:  # odd addresses for x and out
                    out = odd(torch.zeros((m, N), dtype=dtype, device=dev))
                    y = q.matmul(odd(xt), out=out)
                assert y.dtype == dtype
                err = np.abs(y.double().cpu().numpy() - ref).max() / max(np.abs(ref).max(), 1e-6)
                assert err < tol, (m, dtype, variant, err)
                checked += 1


def build(layer, fmt, on_device, bias):
    conv = (lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)) if on_device else \
        (lambda a: torch.from_numpy(np.ascontiguousarray(a)))
    b = conv(layer["bias"]) if bias else None
    if fmt == "exl2":
        return exl2.QMatrix.from_exl2(conv(layer["q_weight"]), conv(layer["q_invperm"]), conv(layer["q_scale"]),
                                      conv(layer["q_scale_max"]), conv(layer["q_groups"]),
                                      q_perm=conv(layer["q_perm"]), bias=b, device="cuda")
    if fmt == "awq":
        return exl2.QMatrix.from_awq(conv(layer["qweight"]), conv(layer["qzeros"]), conv(layer["scales"]), bias=b,
                                     device="cuda")
    return exl2.QMatrix.from_gptq(conv(layer["qweight"]), conv(layer["qzeros"]), conv(layer["scales"]),
                                  g_idx=None if layer.get("g_idx") is None else conv(layer["g_idx"]), bias=b,
                                  zero_format=str(layer.get("zero_format", "v1")), bits=int(layer.get("bits", 4)),
                                  device="cuda")


MS_SMALL = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64, 65, 129]
cases = [
    ("exl2", R.random_exl2(rng, 40, 8, bits=[(4, 24), (3, 16)], bias=True)),                      # tiny, short last group
    ("exl2", R.random_exl2(rng, 1000, 264, bits=[(8, 36), (6, 96), (5, 160), (4, 320), (3, 288), (2, 100)],
                           bias=True)),                                                           # every width
    ("exl2", R.random_exl2(rng, 333, 72, bits=[(6, 176), (5, 64), (3, 93)], bias=True)),           # straddling codes
    ("gptq", R.random_gptq(rng, 256, 24, group_size=32, act_order=True, bias=True)),
    ("gptq", R.random_gptq(rng, 1024, 200, group_size=128, act_order=False, with_g_idx=True, bias=True)),
    ("gptq", dict(R.random_gptq(rng, 512, 136, group_size=None, zero_format="v2", bias=True), zero_format="v2")),
]
for i, (fmt, layer) in enumerate(cases):
    for on_device in (True, False):
        bias = bool(i % 2) or on_device
        q = build(layer, fmt, on_device, bias)
        check(q, layer["weight"], layer["bias"] if bias else None, MS_SMALL if on_device else [1, 17])
        q.close()

# Built through the host (GPTQ 2/3/8-bit, groups that do not fill words, AWQ), in float16
# and bfloat16 (the GEMV, the wmma kernel and the dequantize kernel in both types).
host_built = [
    ("gptq", dict(R.random_gptq(rng, 384, 96, group_size=32, act_order=True, bits=3, bias=True), bits=3)),
    ("gptq", dict(R.random_gptq(rng, 96, 64, group_size=8, bits=3, zero_format="v2", bias=True), bits=3,
                  zero_format="v2")),
    ("gptq", dict(R.random_gptq(rng, 256, 48, group_size=64, bits=2, bias=True), bits=2)),
    ("gptq", dict(R.random_gptq(rng, 192, 56, group_size=32, act_order=True, bits=8, bias=True), bits=8)),
    ("awq", R.random_awq(rng, 256, 64, group_size=64, bias=True)),
]
for fmt, layer in host_built:
    q = build(layer, fmt, True, True)
    check(q, layer["weight"], layer["bias"], [1, 5, 9, 17, 33, 65], dtypes=(torch.float16, torch.bfloat16))
    q.close()
# bfloat16 through the formats built on the device
for fmt, layer in (cases[1], cases[3]):
    q = build(layer, fmt, True, True)
    check(q, layer["weight"], layer["bias"], [1, 9, 17, 65], dtypes=(torch.bfloat16,))
    q.close()

# one block per tile (EXL2_CUDA_MAX_SPLIT=1, read at construction): at m = 1 a block's 71 chunks
# span two of the tensor-core kernel's 64-chunk activation segments (kGather)
import os
os.environ["EXL2_CUDA_MAX_SPLIT"] = "1"
seg = R.random_exl2(rng, 2272, 72, bits=[(6, 96), (4, 1280), (3, 544), (5, 352)], bias=True)
q = build(seg, "exl2", True, True)
del os.environ["EXL2_CUDA_MAX_SPLIT"]
check(q, seg["weight"], seg["bias"], [1, 2, 5], dtypes=(torch.float16, torch.bfloat16))
q.close()

# the wgmma kernel's deep ring for its 64-row tiles (EXL2_CUDA_WGMMA_DEEP=1 at construction; by
# default only 8-bit layers of many column tiles take it): every width, and 8-bit codes, at
# m = 33 / 40 / 64 (partial and full row tiles, split-K clusters), both dtypes
os.environ["EXL2_CUDA_WGMMA_DEEP"] = "1"
for fmt, layer in (cases[1], host_built[3]):
    q = build(layer, fmt, True, True)
    check(q, layer["weight"], layer["bias"], [33, 40, 64], dtypes=(torch.float16, torch.bfloat16))
    q.close()
del os.environ["EXL2_CUDA_WGMMA_DEEP"]

# iterations of 4 chunks inside one group (tc::one_group_flag: groups of 128 rows and more,
# read at construction): 2-, 3-bit and mixed layers, at the in-kernel gather, the transposed
# tiles, the 32-row tiles and the wgmma kernel, split-K and one block per tile, both dtypes
one_group = [
    ("gptq", dict(R.random_gptq(rng, 512, 64, group_size=128, act_order=True, bits=2, bias=True), bits=2)),
    ("gptq", dict(R.random_gptq(rng, 512, 96, group_size=256, bits=3, bias=True), bits=3)),
    ("exl2", R.random_exl2(rng, 616, 72, bits=[(4, 256), (3, 360)], bias=True)),
]
for split in ("1", None):
    if split:
        os.environ["EXL2_CUDA_MAX_SPLIT"] = split
    for fmt, layer in one_group:
        q = build(layer, fmt, True, True)
        check(q, layer["weight"], layer["bias"], [1, 2, 8, 17, 32, 33, 64], dtypes=(torch.float16, torch.bfloat16))
        q.close()
    os.environ.pop("EXL2_CUDA_MAX_SPLIT", None)

# the 128x128 MMA tiles: m >= 256 and ceil(m/128) * ceil(N/128) >= 256
big = R.random_gptq(rng, 256, 8192, group_size=64, act_order=True)
q = build(big, "gptq", True, False)
check(q, big["weight"], None, [300, 512])
q.close()

# construction rejects non-finite device scales (device reduction kernel)
bad = dict(cases[3][1])
bad["scales"] = bad["scales"].copy()
bad["scales"][1, 3] = np.float16("nan")
try:
    build(bad, "gptq", True, False)
    raise AssertionError("NaN scales accepted")
except ValueError:
    pass

# side streams and close() while a GEMM is queued behind a spin kernel
layer = cases[1][1]
x = torch.from_numpy(rng.standard_normal((96, 1000)).astype(np.float16)).to(dev)
q = build(layer, "exl2", True, True)
ref = q.matmul(x).clone()
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    torch.cuda._sleep(20_000_000)
    y = q.matmul(x)
    q.close()
    q2 = build(cases[2][1], "exl2", True, True)
torch.cuda.synchronize()
assert torch.equal(y, ref), "GEMM queued before close() read freed memory"
q2.close()
torch.cuda.synchronize()
print(f"driver OK: {checked} GEMM checks")
EOF

status=0
summary=()
run_tool() {
  local tool="$1" label="$2"
  shift 2
  local log="${LOGDIR}/sanitize_${tool}_${label}.log"
  local args=(--tool "${tool}" --error-exitcode 86 --print-limit 200 --target-processes all --log-file "${log}")
  if [[ "${tool}" != "memcheck" && "${EXL2_SANITIZE_ALL_KERNELS:-0}" != "1" ]]; then
    if "${CS}" --help 2>/dev/null | grep -q -- "--kernel-name"; then args+=(--kernel-name kns=exl2); fi
  fi
  if [[ "${tool}" == "racecheck" ]]; then args+=(--racecheck-report all); fi
  if [[ "${tool}" == "memcheck" ]]; then args+=(--check-device-heap yes); fi
  echo "== ${tool} / ${label}: $*"
  local t0 rc
  t0=$(date +%s)
  "${CS}" "${args[@]}" "$@"
  rc=$?
  local errs
  errs="$(grep -h "ERROR SUMMARY" "${log}" | tail -n 1)"
  local hazards
  hazards="$(grep -h "RACECHECK SUMMARY" "${log}" | tail -n 1)"
  echo "   rc=${rc} $(($(date +%s) - t0)) s | ${errs:-no ERROR SUMMARY line} ${hazards}"
  summary+=("${tool}/${label}: rc=${rc} ${errs:-no summary} ${hazards}")
  # racecheck reports "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)" and,
  # in compute-sanitizer 2025.x, no ERROR SUMMARY line: judge it by that line instead.
  if [[ "${tool}" == "racecheck" && -z "${errs}" ]]; then errs="${hazards}"; fi
  if [[ ${rc} -ne 0 || -z "${errs}" || "${errs}" != *"(0 errors"* && "${errs}" != *" 0 errors"* ]]; then
    status=1
    echo "   --- first lines of ${log}:"
    grep -v "^========= *$" "${log}" | head -n 60
  fi
}

# Deselected under instrumentation: timing assertions, the 8192-row m test and the
# 10,000-cycle leak / GIL-timing tests (they measure speed or host memory, not kernels).
PYTEST_K="${EXL2_SANITIZE_PYTEST_K:-not under_a_second and not large_m and not do_not_leak and not gil}"

cd "${ROOT}"
for tool in "${TOOLS[@]}"; do
  if [[ "${SUITE}" == "driver" || "${SUITE}" == "all" ]]; then
    run_tool "${tool}" driver env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${PYTHON}" "${DRIVER}"
    # the same driver with the canonical layout's kernels (GEMV, mma_kernel, dequant_kernel)
    run_tool "${tool}" driver_canonical env EXL2_CUDA_TC=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${PYTHON}" "${DRIVER}"
  fi
  if [[ "${SUITE}" == "pytest" || "${SUITE}" == "all" ]]; then
    run_tool "${tool}" pytest env EXL2_TEST_REPEATS=3 "${PYTHON}" -m pytest -q -p no:cacheprovider \
      tests/test_cuda.py tests/test_reliability.py -m cuda -k "${PYTEST_K}"
  fi
done

echo "== summary (logs in ${LOGDIR})"
for line in "${summary[@]}"; do echo "   ${line}"; done
exit ${status}
