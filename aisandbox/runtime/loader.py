"""Create the engine that the settings ask for."""

from __future__ import annotations

from pathlib import Path

from aisandbox.runtime.engine import Engine
from aisandbox.settings import ServerSettings

__all__ = ["create_engine", "resolve_model_path"]


def resolve_model_path(settings: ServerSettings) -> Path:
    """The torch backend's model folder: --model, or the converted default model (converting it if needed)."""
    from aisandbox.runtime.default_model import prepare_default_model

    return settings.model if settings.model is not None else prepare_default_model(settings.cache_dir)


def create_engine(settings: ServerSettings) -> Engine:
    """Build (not start) the engine for these settings; cheap, loads nothing."""
    if settings.backend == "trtllm":
        from aisandbox.runtime.trtllm_backend import create_trtllm_engine

        return create_trtllm_engine(settings)
    from aisandbox.runtime.torch_backend import TorchEngine, TorchEngineConfig

    return TorchEngine(
        TorchEngineConfig(
            model_path=settings.model,
            cache_dir=settings.cache_dir,
            device=settings.device,
            dtype=settings.dtype,
            tokenizer_mode=settings.tokenizer_mode,
            max_batch_size=settings.max_batch_size,
            max_prefill_tokens=settings.max_prefill_tokens,
            max_model_len=settings.max_model_len,
            max_queue=settings.max_queue,
            threads=settings.threads,
            prefix_cache_mb=settings.prefix_cache_mb,
            weights_dtype=settings.weights_dtype,
        )
    )
