#!/usr/bin/env bash
# Warp-stall breakdown and instruction counts of one kernel (Nsight Compute), e.g.
#   scripts/ncu_stalls.sh tc_gemm_kernel 8192 28672 4
# Arguments: kernel-name regex, then K N M [gptq|exl2] for scripts/profile_tc.py.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
m=smsp__inst_executed.sum,smsp__cycles_active.avg,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
for s in barrier long_scoreboard short_scoreboard wait math_pipe_throttle mio_throttle lg_throttle not_selected selected dispatch_stall tex_throttle no_instruction branch_resolving; do
  m="${m},smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio"
done
ncu --kernel-name "regex:${name}" --launch-skip 2 --launch-count 1 --metrics "${m}" python scripts/profile_tc.py "$@"
