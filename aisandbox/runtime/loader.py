"""Create the engine that the settings ask for: the admission layer over one backend, built the same way."""

from __future__ import annotations

from aisandbox.runtime.admission import Admission, AdmissionLimits
from aisandbox.runtime.engine import Backend
from aisandbox.settings import ServerSettings

__all__ = ["create_backend", "create_engine"]


def create_backend(settings: ServerSettings) -> Backend:
    """The backend for these settings: each backend class builds itself from the settings."""
    if settings.null_engine:
        from aisandbox.runtime.null.backend import NullBackend

        return NullBackend.from_settings(settings)
    if settings.backend == "trtllm":
        from aisandbox.runtime.trtllm.backend import TrtllmBackend

        return TrtllmBackend.from_settings(settings)
    from aisandbox.runtime.torch.backend import TorchBackend

    return TorchBackend.from_settings(settings)


def create_engine(settings: ServerSettings) -> Admission:
    """Build (not start) the engine for these settings; cheap, loads nothing."""
    return Admission(
        create_backend(settings),
        AdmissionLimits(
            max_queue=settings.max_queue,
            text_workers=settings.text_workers,
            grammar_compile_timeout_s=settings.grammar_compile_timeout_s,
            grammar_workers=settings.grammar_workers,
        ),
    )
