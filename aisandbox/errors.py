"""Root error types of aisandbox.

They know nothing of HTTP: `aisandbox.http.errors` maps each one to a status code and the OpenAI error
envelope, in one place.
"""

from __future__ import annotations

__all__ = [
    "AisandboxError",
    "ContextLengthExceeded",
    "EngineDead",
    "EngineError",
    "EngineNotReady",
    "InvalidRequest",
    "ModelNotFound",
    "NotFound",
    "StoreUnavailable",
    "Overloaded",
    "ServerShuttingDown",
    "UnsupportedParameter",
]


class AisandboxError(Exception):
    """Base of every error the server reports to a client."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(AisandboxError):
    """The request is malformed, mistyped or out of range."""


class UnsupportedParameter(InvalidRequest):
    """A known OpenAI field that this server cannot honour."""

    def __init__(self, param: str, message: str | None = None) -> None:
        super().__init__(
            message or f"Unsupported parameter: '{param}' is not supported by this server.",
            param=param,
            code="unsupported_parameter",
        )


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus the requested completion does not fit the context window."""

    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class ModelNotFound(AisandboxError):
    """The request names a model this server does not serve."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


class NotFound(AisandboxError):
    """A stored object (a response) that does not exist or was deleted."""

    def __init__(self, what: str, param: str | None = None) -> None:
        super().__init__(what, param=param, code="not_found")


class StoreUnavailable(AisandboxError):
    """The response store cannot be read or written."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="store_unavailable")


class Overloaded(AisandboxError):
    """The engine's queue is full; the client should retry later."""

    def __init__(self, message: str = "The server is overloaded; retry later.", retry_after_s: int = 1) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after_s = retry_after_s


class EngineNotReady(AisandboxError):
    """The engine is still loading, or is draining for shutdown."""

    def __init__(self, message: str = "The engine is not ready.") -> None:
        super().__init__(message, code="engine_unavailable")


class ServerShuttingDown(EngineNotReady):
    """The server is draining for shutdown: it takes no new work, and ends what is left at the drain deadline."""

    def __init__(self, message: str = "The server is shutting down; retry on another replica.") -> None:
        super().__init__(message)
        self.code = "server_shutting_down"


class EngineDead(AisandboxError):
    """The engine failed and cannot serve requests."""

    def __init__(self, message: str = "The engine has failed.") -> None:
        super().__init__(message, code="engine_unavailable")


class EngineError(AisandboxError):
    """The engine failed one request unexpectedly (a bug or a resource failure), not the whole engine."""
