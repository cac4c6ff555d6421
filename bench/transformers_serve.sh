#!/usr/bin/env bash
# Start `transformers serve --continuous-batching` on the converted default model, as the peer that
# docs/benchmarks.md compares against. Installs nothing: it needs the project's `bench` extra
# (pip install -e '.[bench]'), which brings FastAPI for `transformers serve`.
#
#   bench/transformers_serve.sh [PORT] [MODEL_DIR]
#
# PORT defaults to 8001; MODEL_DIR to the folder `aisandbox prepare-model` converts the default
# SmolLM2-135M-Instruct into. The model id clients must send is MODEL_DIR itself (the server is pinned to it).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../.venv/bin/python}
[ -x "$python" ] || python=python3
port=${1:-8001}
model=${2:-$("$python" - <<'PY'
from aisandbox.runtime.torch.default_model import prepare_default_model
from aisandbox.settings import ServerSettings

print(prepare_default_model(ServerSettings().cache_dir))
PY
)}

if ! "$python" -c "from transformers.utils.import_utils import is_serve_available as ok; raise SystemExit(not ok())"; then
  echo "transformers serve needs FastAPI: pip install -e '.[bench]'" >&2
  exit 1
fi

echo "transformers serve: model $model on 127.0.0.1:$port" >&2
# exec: SIGTERM to this script reaches the server itself.
exec "$python" -m transformers.cli.transformers serve "$model" \
  --continuous-batching --device cpu --dtype float32 \
  --host 127.0.0.1 --port "$port" --log-level warning
