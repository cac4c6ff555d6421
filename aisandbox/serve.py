"""`aisandbox serve` and `aisandbox prepare-model`.

`serve` resolves the settings, makes sure the model is there (converting the default model once, or checking
a TensorRT-LLM engine folder against this machine), exports the settings as AISANDBOX_* variables and then
replaces itself with gunicorn, so that SIGTERM reaches gunicorn's master directly and drains the workers.

GPUs: with `--workers N` and the trtllm backend, each gunicorn worker is pinned to one GPU
(`aisandbox.gunicorn_hooks`) and loads its own single-GPU engine. A tensor-parallel engine instead needs one
worker that sees all of its GPUs: TensorRT-LLM's LLM API spawns one MPI worker process per rank itself. The two
modes exclude each other, and `serve` refuses the mix before starting anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from aisandbox.settings import ServerSettings

__all__ = [
    "add_arguments",
    "add_prepare_arguments",
    "check_gpu_mode",
    "gunicorn_argv",
    "run",
    "run_prepare",
    "settings_env",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `aisandbox serve`; each overrides the AISANDBOX_* variable of the same name."""
    p.add_argument("--host", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--model", type=Path, help="a local Hugging Face causal-LM folder (torch backend)")
    p.add_argument("--engine", dest="engine_dir", type=Path, help="a TensorRT-LLM engine folder (trtllm backend)")
    p.add_argument("--served-model-name", help="the model id clients use (default: the folder's name)")
    p.add_argument(
        "--workers",
        type=int,
        help="gunicorn workers, one per GPU (default 1); must be 1 for a tensor-parallel engine",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--weights-dtype",
        choices=["auto", "fp32", "fp16", "bf16", "int8", "int4", "q4_1", "q4_1p", "q4_1v", "q8_1", "q8_0"],
        help="torch backend on CPU: linear weight format; auto measures (default), fp32 is exact",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "float16", "float32"],
        help="torch backend: KV cache dtype; auto is float16 on the CPU tuned path, the model's dtype elsewhere",
    )
    p.add_argument(
        "--retime-cpu-formats",
        action="store_const",
        const=True,
        help="CPU: time the weight formats again instead of reusing this machine's cached choice",
    )
    p.add_argument("--tokenizer-mode", choices=["auto", "hf", "mistral"])
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-queue", type=int, help="waiting requests beyond which new ones get 429")
    p.add_argument("--prefix-cache-mb", type=int, help="torch backend: KV memory for shared prompt prefixes")
    p.add_argument(
        "--kv-cache-mb", type=int, help="torch backend: KV memory for running sequences (default: half free)"
    )
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health (and /metrics)")
    p.add_argument("--drain-timeout-s", type=float, help="on SIGTERM, how long streams may finish (default 30)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--text-workers", type=int, help="threads for chat templates and tokenization (default 2)")
    p.add_argument(
        "--grammar-compile-timeout-s", type=float, help="deadline for compiling a client's grammar (default 5)"
    )
    p.add_argument("--grammar-workers", type=int, help="processes that compile client grammars (default 1)")
    p.add_argument(
        "--max-prefill-tokens", type=int, help="torch backend: prompt tokens per engine step (chunked prefill)"
    )
    p.add_argument("--max-body-bytes", type=int, help="largest request body; larger ones get 413 (default 4 MiB)")
    p.add_argument(
        "--null-engine",
        action="store_const",
        const=True,
        help="serve canned tokens at no cost with the model's tokenizer (benchmarks the HTTP tier)",
    )
    p.add_argument("--null-engine-step-ms", type=float, help="null engine: pause between steps (default 0)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--cache-dir", type=Path, help="where the converted default model is kept")


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `aisandbox prepare-model`."""
    p.add_argument("--cache-dir", type=Path, help="where to keep the converted model")


def _settings(args: argparse.Namespace) -> ServerSettings:
    given = {k: v for k, v in vars(args).items() if v is not None and k != "command"}
    return ServerSettings(**given)


def settings_env(settings: ServerSettings) -> dict[str, str]:
    """The settings as AISANDBOX_* variables, for the gunicorn workers to load again."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"AISANDBOX_{name.upper()}"] = str(value)
    return env


def _has_control_socket() -> bool:
    from gunicorn.config import KNOWN_SETTINGS

    return any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)


def gunicorn_argv(settings: ServerSettings) -> list[str]:
    """gunicorn's command line: uvicorn workers, no preload (engines start after the fork)."""
    # gunicorn >= 25 opens a control socket at one fixed path per user; two servers would fight over it.
    extra = ["--no-control-socket"] if _has_control_socket() else []
    return [
        sys.executable, "-m", "gunicorn", "aisandbox.http.asgi:app",
        "--worker-class", "aisandbox.gunicorn_hooks.Worker",
        "--workers", str(settings.workers),
        "--bind", f"{settings.host}:{settings.port}",
        "--graceful-timeout", str(settings.gunicorn_graceful_timeout_s),
        "--timeout", "120",
        "--keep-alive", "75",
        "--log-level", settings.log_level,
        "--config", "python:aisandbox.gunicorn_hooks",
        *extra,
    ]  # fmt: skip


def check_gpu_mode(workers: int, tp_size: int) -> str | None:
    """Why these workers cannot serve an engine of `tp_size` ranks, or None.

    One-GPU-per-worker pinning gives each worker one GPU; a TP engine needs tp_size GPUs in one process.
    """
    if tp_size > 1 and workers > 1:
        return (
            f"the engine is tensor parallel over {tp_size} GPUs, so it runs as ONE gunicorn worker whose TensorRT-LLM "
            f"executor starts {tp_size} rank processes; --workers {workers} would pin each worker to a single GPU. "
            "Serve it with --workers 1 (AISANDBOX_WORKERS=1), or build a single-GPU engine (--tp 1) and run one "
            "worker per GPU"
        )
    return None


def run(args: argparse.Namespace) -> int:
    """Prepare the model, then exec gunicorn."""
    try:
        settings = _settings(args)
    except ValidationError as exc:
        print(f"aisandbox serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    extra: dict[str, Any] = {}
    if settings.backend == "trtllm":
        from aisandbox.runtime.trtllm.backend import check_engine_dir

        # NVML (our GPU checks, gunicorn's pinning) numbers GPUs in PCI order; make CUDA agree.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        try:
            manifest = check_engine_dir(settings.engine_dir)  # type: ignore[arg-type]
        except Exception as exc:  # any reason the engine cannot load here is the operator's to read
            print(f"aisandbox serve: cannot serve {settings.engine_dir}: {exc}", file=sys.stderr)
            return 2
        problem = check_gpu_mode(settings.workers, manifest.tp_size)
        if problem is not None:
            print(f"aisandbox serve: cannot serve {settings.engine_dir}: {problem}", file=sys.stderr)
            return 2
    elif settings.model is None:
        from aisandbox.runtime.torch.default_model import resolve_model_path

        try:
            extra["model"] = resolve_model_path(None, settings.cache_dir)
        except FileNotFoundError as exc:
            print(f"aisandbox serve: {exc}", file=sys.stderr)
            return 2
        extra["served_model_name"] = settings.model_name
    elif not (settings.model / "config.json").is_file():
        print(f"aisandbox serve: {settings.model} is not a Hugging Face model folder (no config.json)", file=sys.stderr)
        return 2
    if extra:
        settings = settings.model_copy(update=extra)
    env = {**os.environ, **settings_env(settings)}
    if settings.workers > 1 and (settings.backend == "trtllm" or settings.device == "cuda"):
        env["AISANDBOX_PIN_GPUS"] = "1"  # one GPU per worker (aisandbox.gunicorn_hooks)
    print(
        f"aisandbox: serving {settings.model_name} ({settings.backend}) on http://{settings.host}:{settings.port}/v1",
        flush=True,
    )
    argv = gunicorn_argv(settings)
    os.execve(argv[0], argv, env)
    return 0  # not reached


def run_prepare(args: argparse.Namespace) -> int:
    """Convert the default model into the cache and print its folder."""
    from aisandbox.runtime.torch.default_model import prepare_default_model

    settings = ServerSettings(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    print(prepare_default_model(settings.cache_dir))
    return 0
