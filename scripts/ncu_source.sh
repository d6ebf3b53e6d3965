#!/usr/bin/env bash
# Nsight Compute's per-instruction (SASS) warp-stall samples of one kernel launch, as CSV on
# stdout, for scripts/ncu_hotspots.py, e.g.
#   scripts/ncu_source.sh tc_wgmma_kernel 8192 28672 64 > wg64.csv
#   python scripts/ncu_hotspots.py wg64.csv --top 40
# Arguments: kernel-name regex, then K N M [gptq|exl2] for scripts/profile_tc.py (the third
# matching launch is profiled). Needs ncu and a CUDA build of exl2 on the Python path.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
report=$(mktemp -d)/source
ncu --kernel-name "regex:${name}" --launch-skip 2 --launch-count 1 --section SourceCounters \
  --import-source no -o "${report}" -f python scripts/profile_tc.py "$@" >&2
ncu --import "${report}.ncu-rep" --page source --csv --print-source sass
rm -rf "$(dirname "${report}")"
