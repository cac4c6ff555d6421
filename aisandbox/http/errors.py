"""Map errors to HTTP status codes and OpenAI's error envelope, in one place."""

from __future__ import annotations

import logging
from typing import Any

import falcon
from pydantic import ValidationError

from aisandbox.errors import (
    AisandboxError,
    EngineDead,
    EngineError,
    EngineNotReady,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    StoreUnavailable,
)
from aisandbox.http.schemas import error_body

__all__ = [
    "InvalidJson",
    "RequestTooLarge",
    "Unauthorized",
    "error_response",
    "from_validation_error",
    "register_error_handlers",
]

log = logging.getLogger(__name__)

# error class -> (HTTP status, OpenAI error type); the first match in this order wins.
_MAP: tuple[tuple[type[AisandboxError], int, str], ...] = (
    (ModelNotFound, 404, "invalid_request_error"),
    (NotFound, 404, "invalid_request_error"),
    (StoreUnavailable, 503, "server_error"),
    (InvalidRequest, 400, "invalid_request_error"),
    (Overloaded, 429, "rate_limit_error"),
    (EngineNotReady, 503, "server_error"),
    (EngineDead, 503, "server_error"),
    (EngineError, 500, "server_error"),
)


class Unauthorized(AisandboxError):
    """A missing or wrong API key."""

    def __init__(self) -> None:
        super().__init__(
            "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.", code="invalid_api_key"
        )


class RequestTooLarge(AisandboxError):
    """The request body is larger than the configured limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The request body is larger than this server accepts ({limit} bytes).", code="request_too_large"
        )


class InvalidJson(InvalidRequest):
    """The body is not JSON, not UTF-8, or nested deeper than the parser allows."""

    _HINT = (
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
        "HTTP library correctly. The OpenAI API expects a JSON payload.)"
    )

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(f"{self._HINT} {detail}" if detail else self._HINT, code="invalid_json")


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _is_union_tag(part: str) -> bool:
    """Whether a loc part names a union member (pydantic's 'list[str]', 'constrained-int') rather than a field."""
    return part in _UNION_TAGS or "[" in part or part.startswith(("function-", "constrained-", "json-or-python"))


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_tag(str(part)):
            out += f".{part}" if out else str(part)
    return out or None


def from_validation_error(exc: ValidationError) -> InvalidRequest:
    """Turn pydantic's first complaint into an OpenAI-shaped invalid request."""
    errors = exc.errors(include_url=False)
    # For a union (str | list[str]) pydantic lists one complaint per member; the value complaint says more.
    err = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    loc = tuple(err.get("loc", ()))
    param = _loc_to_param(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else "?"
        return InvalidRequest(f"Unrecognized request argument supplied: {name}", param=param, code="unknown_parameter")
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    if param:
        message = f"Invalid value for '{param}': {message}"
    return InvalidRequest(message, param=param, code=code)


def error_response(exc: BaseException, request_id: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, body and extra headers for any exception; an unexpected one becomes a 500, logged here, once."""
    if isinstance(exc, ValidationError):
        exc = from_validation_error(exc)
    if isinstance(exc, Unauthorized):
        return 401, error_body(exc.message, "invalid_request_error", None, exc.code), {}
    if isinstance(exc, RequestTooLarge):
        return 413, error_body(exc.message, "invalid_request_error", None, exc.code), {"Connection": "close"}
    for cls, status, type_ in _MAP:
        if isinstance(exc, cls):
            headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else {}
            return status, error_body(exc.message, type_, exc.param, exc.code), headers
    log.error("request %s failed with an unexpected error", request_id or "?", exc_info=exc)
    return 500, error_body("The server had an error while processing your request.", "server_error"), {}


def register_error_handlers(app: falcon.asgi.App) -> None:
    """Send every error, Falcon's own included, in OpenAI's envelope; each is mapped exactly once."""

    async def handle(req: falcon.asgi.Request, resp: falcon.asgi.Response, exc: BaseException, params: Any) -> None:
        req.context.error = exc  # /metrics counts refusals by reason (aisandbox.http.policy.refusal_reason)
        status, body, headers = error_response(exc, getattr(req.context, "request_id", None))
        resp.status = status
        resp.media = body
        resp.set_headers(headers)

    async def handle_falcon(
        req: falcon.asgi.Request, resp: falcon.asgi.Response, exc: falcon.HTTPError, params: Any
    ) -> None:
        if isinstance(exc, falcon.MediaMalformedError | falcon.MediaNotFoundError):
            resp.status = 400
            resp.media = error_body(InvalidJson._HINT, "invalid_request_error", None, "invalid_json")
            return
        status = exc.status_code
        type_ = "invalid_request_error" if status < 500 else "server_error"
        message = exc.description or exc.title or "error"
        if status == 404:
            message = f"Invalid URL ({req.method} {req.path})"
        elif status == 405:
            message = f"Method {req.method} is not allowed for {req.path}"
        resp.status = status
        resp.set_headers(exc.headers or {})
        resp.media = error_body(message, type_, None, None)

    app.add_error_handler(Exception, handle)
    app.add_error_handler(falcon.HTTPError, handle_falcon)
