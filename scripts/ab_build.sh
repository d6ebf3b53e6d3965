#!/usr/bin/env bash
# A/B builds on one GPU machine, so that two versions of the kernels are timed in one session:
# this tree is installed into the environment (pip, sm_90a only), and every variant
# ab/variants/NAME/ (a src/ tree laid over a copy of this one) into /tmp/pkg_NAME, all at once.
# Time a variant with PYTHONPATH=/tmp/pkg_NAME (check exl2.__file__).
#
#   mkdir -p ab/variants/base && git archive HEAD src | tar -x -C ab/variants/base
#   scripts/ab_build.sh && python -m exl2 bench ... && PYTHONPATH=/tmp/pkg_base python -m exl2 bench ...
#
# scripts/ab_time.py times the same layers under each build, in alternating rounds, and says
# whether their outputs have the same bits.
#
# ab/ is git-ignored: pass it to the device tool with carry ["ab"]. A variant whose files did not
# change since its last build on a warm machine is not rebuilt. Logs: $OUT/build_*.log.
set -u
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp/ab}
mkdir -p "$LOG"
export EXL2_CUDA=ON EXL2_CUDA_ARCHITECTURES=90a-real CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-6}
t0=$(date +%s)
for v in ab/variants/*/; do
  [[ -d "$v" ]] || continue
  name=$(basename "$v")
  h=$(find "$v" -type f | sort | xargs cat | md5sum | cut -c1-12)
  if [[ -f /tmp/pkg_$name/.hash && "$(cat /tmp/pkg_$name/.hash)" == "$h" ]]; then echo "$name: cached"; continue; fi
  rm -rf "/tmp/src_$name" "/tmp/pkg_$name"
  mkdir -p "/tmp/src_$name"
  cp -a pyproject.toml CMakeLists.txt cmake src python README.md "/tmp/src_$name/"
  cp -a "$v/." "/tmp/src_$name/"
  (python -m pip install --no-build-isolation --no-deps -q --target "/tmp/pkg_$name" "/tmp/src_$name" \
     > "$LOG/build_$name.log" 2>&1
   rc=$?
   echo "$name: rc $rc"
   if [[ $rc == 0 ]]; then echo "$h" > "/tmp/pkg_$name/.hash"; fi) &
done
(python -m pip install --no-build-isolation --no-deps -q . > "$LOG/build_this.log" 2>&1; echo "this tree: rc $?") &
wait
echo "builds: $(( $(date +%s) - t0 )) s"
