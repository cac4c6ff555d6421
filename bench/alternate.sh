#!/usr/bin/env bash
# Ours and one peer, alternated ROUNDS times at one concurrency, each server started fresh for its turn: on a
# machine whose own speed drifts by tens of percent over minutes (a shared VM), the ratio of neighbouring turns
# says more than two figures taken ten minutes apart. Prints each round's output tok/s and TTFT p50 and the ratio.
#
#   PEER=llamacpp LLAMA_SERVER=path/to/llama-server CONCURRENCY=1 bench/alternate.sh
#   PEER=vllm VLLM_PYTHON=path/to/venv/bin/python CONCURRENCY=16 bench/alternate.sh
#
# Knobs: ROUNDS (3), NUM_PROMPTS (32), INPUT_LEN (8: 37-token chat prompts), OUTPUT_LEN (64), VLLM_DTYPE
# (bfloat16 where the CPU has avx512_bf16 or AMX, else float32), RESULTS_DIR (bench/results/alternate).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-$root/.venv/bin/python}
peer=${PEER:?PEER=llamacpp or vllm}
rounds=${ROUNDS:-3}
conc=${CONCURRENCY:-1}
results=${RESULTS_DIR:-bench/results/alternate}
mkdir -p "$results"
model_dir=$("$python" -c "
from aisandbox.runtime.torch.default_model import prepare_default_model
from aisandbox.settings import ServerSettings
print(prepare_default_model(ServerSettings().cache_dir))")
gguf=$("$python" -c "from aisandbox.runtime.torch.default_model import find_default_gguf; print(find_default_gguf())")
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then dtype=${VLLM_DTYPE:-bfloat16}; else dtype=${VLLM_DTYPE:-float32}; fi
workload=(--concurrency "$conc" --num-prompts "${NUM_PROMPTS:-32}" --input-len "${INPUT_LEN:-8}"
  --output-len "${OUTPUT_LEN:-64}" --tokenizer "$model_dir" --temperature 0 --seed 0 --wait-ready 300 --no-progress
  --no-plots)
pid=
stop() { if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; fi; }
trap stop EXIT
vllm_model=
for i in $(seq 1 "$rounds"); do
  "$python" -m aisandbox serve --host 127.0.0.1 --port 8000 >"$results/ours-$i.log" 2>&1 &
  pid=$!
  "$python" -m aisandbox bench --base-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct "${workload[@]}" \
    --label "ours-$i" --output "$results/ours-c$conc-$i.json" >/dev/null
  stop
  if [ "$peer" = llamacpp ]; then
    "${LLAMA_SERVER:?}" -m "$gguf" --alias smollm2 -t "$(nproc)" -np 16 -c 16384 --host 127.0.0.1 --port 8002 \
      >"$results/peer-$i.log" 2>&1 &
    name=smollm2
  else
    if [ -z "$vllm_model" ]; then
      vllm_model=$(mktemp -d)
      for f in "$model_dir"/*; do [ "$(basename "$f")" = q4_1.safetensors ] || ln -s "$f" "$vllm_model/"; done
    fi
    VLLM_CPU_OMP_THREADS_BIND="0-$(( $(nproc) - 1 ))" VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
      "${VLLM_PYTHON:?}" -m vllm.entrypoints.openai.api_server --model "$vllm_model" --served-model-name smollm2 \
      --dtype "$dtype" --gpu-memory-utilization 0.4 --host 127.0.0.1 --port 8002 >"$results/peer-$i.log" 2>&1 &
    name=smollm2
  fi
  pid=$!
  "$python" -m aisandbox bench --base-url http://127.0.0.1:8002/v1 --model "$name" "${workload[@]}" \
    --label "$peer-$i" --output "$results/$peer-c$conc-$i.json" >/dev/null
  stop
done
"$python" - "$results" "$peer" "$conc" "$rounds" <<'PY'
import sys
from pathlib import Path
from aisandbox.bench.report import load_result
folder, peer, conc, rounds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
print(f"| round | ours tok/s (TTFT p50 ms) | {peer} tok/s (TTFT p50 ms) | ratio |\n|--:|--:|--:|--:|")
ratios = []
for i in range(1, rounds + 1):
    a = load_result(folder / f"ours-c{conc}-{i}.json").points[0].aggregates
    b = load_result(folder / f"{peer}-c{conc}-{i}.json").points[0].aggregates
    ratios.append(a.output_throughput / b.output_throughput)
    print(f"| {i} | {a.output_throughput:.1f} ({a.ttft_ms.median:.1f}) | {b.output_throughput:.1f} "
          f"({b.ttft_ms.median:.1f}) | {ratios[-1]:.2f}x |")
print(f"\nC={conc}: ratio {min(ratios):.2f}-{max(ratios):.2f}x over {rounds} alternated rounds")
PY
