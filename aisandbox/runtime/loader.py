"""Create the engine that the settings ask for: the admission layer over one backend, built the same way."""

from __future__ import annotations

from pathlib import Path

from aisandbox.runtime.admission import Admission, AdmissionLimits
from aisandbox.runtime.engine import Backend
from aisandbox.settings import ServerSettings

__all__ = ["create_backend", "create_engine", "resolve_model_path"]


def resolve_model_path(model: Path | None, cache_dir: Path) -> Path:
    """The model folder to load: `model`, or the default model converted into `cache_dir` (once).

    The one place the default model is resolved: `serve` (before gunicorn starts), the backends' load threads
    (in-process engines) and the local benchmark all call it.
    """
    if model is not None:
        return model
    from aisandbox.runtime.default_model import prepare_default_model

    return prepare_default_model(cache_dir)


def create_backend(settings: ServerSettings) -> Backend:
    """The backend for these settings: each backend class builds itself from the settings."""
    if settings.null_engine:
        from aisandbox.runtime.null_backend import NullBackend

        return NullBackend.from_settings(settings)
    if settings.backend == "trtllm":
        from aisandbox.runtime.trtllm_backend import TrtllmBackend

        return TrtllmBackend.from_settings(settings)
    from aisandbox.runtime.torch_backend import TorchBackend

    return TorchBackend.from_settings(settings)


def create_engine(settings: ServerSettings) -> Admission:
    """Build (not start) the engine for these settings; cheap, loads nothing."""
    return Admission(
        create_backend(settings), AdmissionLimits(max_queue=settings.max_queue, text_workers=settings.text_workers)
    )
