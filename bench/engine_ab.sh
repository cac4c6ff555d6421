#!/usr/bin/env bash
# Engine alone (`aisandbox bench --engine local`), two or more configurations alternated in one session, so
# that a busy machine disturbs them alike. Each configuration is "LABEL=TREE[:SETTING=VALUE,...]": TREE is a
# source tree of aisandbox (this checkout, or e.g. `git archive <commit> | tar -x -C /tmp/old`), run with
# this checkout's Python from that tree's root so that its own `aisandbox` is imported.
#
#   bench/engine_ab.sh "old=/tmp/old" "new=$PWD" "new-fp32=$PWD:weights_dtype=fp32"
#
# Knobs (environment): ROUNDS (2), CONCURRENCY ("1 16"), INPUT_LEN (8: with SmolLM2's chat template a
# 37-token prompt), OUTPUT_LEN (64), PROMPTS_AT_1 (8), PROMPTS_AT_N (32), RESULTS_DIR (bench-results/ab).
# Prints one line per run (tok/s, TTFT p50, TPOT p50) and leaves each run's JSON in RESULTS_DIR.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
results=${RESULTS_DIR:-$root/bench-results/ab}
rounds=${ROUNDS:-2}
mkdir -p "$results"
[ $# -ge 1 ] || { echo "usage: $0 LABEL=TREE[:KEY=VALUE,...] ..." >&2; exit 2; }
model_dir=$("$python" -c "
from aisandbox.runtime.torch.default_model import prepare_default_model
from aisandbox.settings import ServerSettings
print(prepare_default_model(ServerSettings().cache_dir))")
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"

for round in $(seq 1 "$rounds"); do
  for spec in "$@"; do
    label=${spec%%=*}
    rest=${spec#*=}
    tree=${rest%%:*}
    settings=()
    if [[ $rest == *:* ]]; then
      IFS=, read -ra kvs <<<"${rest#*:}"
      for kv in "${kvs[@]}"; do settings+=(--engine-setting "$kv"); done
    fi
    for c in ${CONCURRENCY:-1 16}; do
      n=$([ "$c" = 1 ] && echo "${PROMPTS_AT_1:-8}" || echo "${PROMPTS_AT_N:-32}")
      out="$results/$label-c$c-r$round.json"
      (cd "$tree" && "$python" -m aisandbox bench --engine local "${settings[@]}" --concurrency "$c" \
        --num-prompts "$n" --input-len "${INPUT_LEN:-8}" --output-len "${OUTPUT_LEN:-64}" --tokenizer "$model_dir" \
        --temperature 0 --seed 0 --wait-ready 600 --no-progress --no-plots --label "$label" --output "$out" \
        >"$out.log" 2>&1)
      "$python" - "$out" "$label" "$c" "$round" <<'EOF'
import json, sys
path, label, c, rnd = sys.argv[1:]
agg = json.load(open(path))["points"][0]["aggregates"]
print(f"round {rnd} {label:>10} C={c:>2}: {agg['output_throughput']:7.1f} tok/s  "
      f"TTFT p50 {agg['ttft_ms']['median']:7.1f} ms  TPOT p50 {agg['tpot_ms']['median']:6.2f} ms  "
      f"({agg['completed']} ok, {agg['failed']} failed)", flush=True)
EOF
    done
  done
done
