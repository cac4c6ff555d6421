"""Errors of `aisandbox build-engine`: what the operator must fix, said plainly."""

from __future__ import annotations

__all__ = ["BuildEngineError", "CheckpointError", "PlanError", "ProfileError"]


class BuildEngineError(ValueError):
    """Base of every build-engine error; the CLI prints its message and exits with status 2."""


class ProfileError(BuildEngineError):
    """A GPU profile is unknown, malformed, or asks for something the GPU cannot run."""


class CheckpointError(BuildEngineError):
    """The Hugging Face checkpoint folder is missing files or describes an unsupported model."""


class PlanError(BuildEngineError):
    """The model does not fit the GPU with the requested precision and limits."""
