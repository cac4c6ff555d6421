#!/usr/bin/env bash
# The request path's numbers (issue "One request path"), one after another on an idle machine:
#   1. the HTTP tier alone: `aisandbox bench --null-engine` (server on one core, raw-socket client on another);
#   2. /health latency and a stream's inter-token latency while a 30 MB chat body is in flight
#      (bench/stall.py), against this checkout and, with BEFORE_DIR=<an older checkout>, against that one;
#   3. output tokens/s at 1 and 16 streams over HTTP, the workload of bench/run_report.sh.
# Prints Markdown; installs nothing.   BEFORE_DIR=/path/to/old/checkout bench/request_path.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-$root/.venv/bin/python}
port=${PORT:-8000}
body_mb=${BODY_MB:-30}

wait_ready() {
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    sleep 1
  done
  echo "server on :$port not ready" >&2
  return 1
}

serve() {  # serve DIR ARGS...: this or another checkout's server, in the background
  local dir=$1
  shift
  (cd "$dir" && exec "$python" -m aisandbox serve --host 127.0.0.1 --port "$port" "$@") >/tmp/request-path-serve.log 2>&1 &
  server_pid=$!
  wait_ready
}
stop() { kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }

echo "## HTTP tier alone (null engine)"
"$python" -m aisandbox bench --null-engine --concurrency 1,16,64,256

if [ -n "${BEFORE_DIR:-}" ]; then
  echo "## A ${body_mb} MB body in flight: before ($(git -C "$BEFORE_DIR" rev-parse --short HEAD))"
  serve "$BEFORE_DIR"
  "$python" bench/stall.py --base-url "http://127.0.0.1:$port" --body-mb "$body_mb"
  stop
fi
echo "## A ${body_mb} MB body in flight: this checkout ($(git rev-parse --short HEAD)), body limit raised to admit it"
serve "$root" --max-body-bytes 64000000
"$python" bench/stall.py --base-url "http://127.0.0.1:$port" --body-mb "$body_mb"
echo "## The same with the default body limit (4 MiB: 413 at once)"
stop
serve "$root"
"$python" bench/stall.py --base-url "http://127.0.0.1:$port" --body-mb "$body_mb" --seconds 4

echo "## Output tokens/s at 1 and 16 streams over HTTP (32 prompts of 128 tokens, 64 out, greedy)"
model_dir=$("$python" -c "
from aisandbox.runtime.torch.default_model import prepare_default_model
from aisandbox.settings import ServerSettings
print(prepare_default_model(ServerSettings().cache_dir))")
"$python" -m aisandbox bench --base-url "http://127.0.0.1:$port/v1" --concurrency 1,16 --num-prompts 32 \
  --input-len 128 --output-len 64 --tokenizer "$model_dir" --temperature 0 --seed 0 --no-progress --no-plots \
  --label request-path-http --output bench/results/request-path-http.json
stop
