#!/usr/bin/env bash
# The body's multiplies (bench/cpu_body_harness.c) for one kernel at R rows, built from this tree's
# csrc/cpu_step.c and optionally from other sources, alternated for ROUNDS (5) rounds: the best of each. On a VM
# whose speed drifts by tens of percent, only neighbouring runs compare. Extra compiler flags: CFLAGS (e.g.
# "-mno-avx512f" for the AVX2 build of this CPU).
#
#   bench/cpu_body_ab.sh ROWS KERNEL [OTHER.c ...]     e.g. bench/cpu_body_ab.sh 16 q4_1v_matmul /tmp/old.c
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rows=${1:?rows}; kernel=${2:?kernel, e.g. q4_1v_matmul}; shift 2
sources=("$root/aisandbox/runtime/torch/csrc/cpu_step.c" "$@")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cc=${CC:-cc}
for i in "${!sources[@]}"; do
  # shellcheck disable=SC2086
  "$cc" -O3 -march=native ${CFLAGS:-} -fno-math-errno -ffinite-math-only -fopenmp -std=c11 -w \
    -DSRC="\"${sources[$i]}\"" -DKERNEL="$kernel" "$root/bench/cpu_body_harness.c" -o "$tmp/h$i" -lm
done
declare -A best
for _ in $(seq "${ROUNDS:-5}"); do
  for i in "${!sources[@]}"; do
    t=$("$tmp/h$i" "$rows" | awk '{print $1}')
    if [ -z "${best[$i]:-}" ] || awk -v a="$t" -v b="${best[$i]}" 'BEGIN {exit !(a < b)}'; then best[$i]=$t; fi
  done
done
for i in "${!sources[@]}"; do echo "$kernel, $rows rows: ${best[$i]} ms  (${sources[$i]})"; done
