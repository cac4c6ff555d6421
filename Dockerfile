# aisandbox on NVIDIA's TensorRT-LLM 1.2.1 release image: CUDA 13.0, TensorRT 10.13.3.9, torch 2.9, Python 3.12,
# tensorrt_llm 1.2.1 (the last release line with the TensorRT engine backend; 1.3 removed it).
# The image brings tensorrt_llm, torch and transformers; this file only adds aisandbox and its small
# pure-Python dependencies, pinned against what the image ships so nothing of NVIDIA's stack is replaced.
#
#   docker build -t aisandbox:trtllm-1.2.1 .          (or: docker compose build, see docs/deploy.md)
FROM nvcr.io/nvidia/tensorrt-llm/release:1.2.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /opt/aisandbox

# Everything the image already has, as name==version constraints: a dependency below that would need another
# version of torch, transformers, numpy, pydantic ... fails the build here instead of breaking tensorrt_llm.
RUN python3 -m pip list --format=freeze > /opt/image-constraints.txt

# xgrammar: the version TensorRT-LLM 1.2.1 pins (requirements.txt) and its C++ executor runs, the same one
# pyproject pins, so every grammar the CPU tests compile is compiled here by the same code (tests check they agree).
# The constraints file makes the build fail if the image ever shipped another one.
ARG XGRAMMAR_VERSION=0.1.25
RUN python3 -m pip install -c /opt/image-constraints.txt \
        "falcon>=4.0,<5" "gunicorn>=23" "uvicorn>=0.30" "uvicorn-worker>=0.2" "pydantic-settings>=2.3" \
        "prometheus-client>=0.20" "mistral-common>=1.5" "gguf>=0.10" "httpx>=0.27" "pyyaml>=6" "nvidia-ml-py>=12" \
        "jsonschema>=4.20" "xgrammar==${XGRAMMAR_VERSION}" "psycopg[binary]>=3.1"

COPY pyproject.toml README.md ./
COPY configs ./configs
COPY aisandbox ./aisandbox
# --no-deps: pyproject's dependencies name the CPU/dev stack (transformers 5, ...); here the image's own
# torch/transformers serve. Editable, so the GPU profiles in ./configs/gpu are found next to the package.
RUN python3 -m pip install --no-deps -e . \
 && python3 -c "import aisandbox.build_engine.cli, aisandbox.runtime.trtllm.backend, aisandbox.http.asgi" \
 && python3 -c "import importlib.metadata as m; print('tensorrt_llm', m.version('tensorrt_llm'))"

# Single-GPU engine: one gunicorn worker per visible GPU, each loading its own engine. Tensor-parallel engine (built
# with --tp N): one worker over all N GPUs, TensorRT-LLM starts the ranks. AISANDBOX_WORKERS overrides either.
# CUDA_DEVICE_ORDER: number GPUs in PCI order, as NVML and nvidia-smi do (the GPU checks and pinning rely on it).
ENV AISANDBOX_ENGINE=/engines/mistral-7b-instruct-v0.3 \
    AISANDBOX_MODEL_NAME=Mistral-7B-Instruct-v0.3 \
    CUDA_DEVICE_ORDER=PCI_BUS_ID
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=5)"
CMD ["sh", "-c", "TP=$(python3 -c 'import sys; from aisandbox.artifacts import read_manifest; print(read_manifest(sys.argv[1]).tp_size)' \"$AISANDBOX_ENGINE\" 2>/dev/null || echo 1); if [ \"$TP\" -gt 1 ]; then GPUS_WORKERS=1; else GPUS_WORKERS=$(nvidia-smi -L | wc -l); fi; exec aisandbox serve --engine \"$AISANDBOX_ENGINE\" --served-model-name \"$AISANDBOX_MODEL_NAME\" --host 0.0.0.0 --port 8000 --workers \"${AISANDBOX_WORKERS:-$GPUS_WORKERS}\""]
