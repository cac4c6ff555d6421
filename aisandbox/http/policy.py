"""The admission policy of the HTTP server, in one module: who may call which route, and how much one request
may ask for, checked before any per-request work (tokenization, grammar compilation, queueing).

* Authentication is decided by the route Falcon matched (after it normalised the path, so `//v1/models` is
  `/v1/models`), deny by default: only the routes listed in `PUBLIC_ROUTES` answer without the key, and
  `/metrics` only while `metrics_require_key` is off. Keys are compared in constant time.
* Caps (each a setting, see `Limits`): sequences per request (prompts x n), prompt tokens per request, stop
  strings, stop token ids, logit_bias entries, grammar size; token ids (stop_token_ids, logit_bias) must lie
  inside the vocabulary. A request over a cap gets a 400 that names the field, at once.
* Every refusal (auth, caps, overload, draining, ...) is counted in `aisandbox_requests_refused_total{reason}`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import falcon
import falcon.asgi

from aisandbox.errors import (
    ContextLengthExceeded,
    EngineDead,
    EngineNotReady,
    InvalidRequest,
    Overloaded,
    ServerShuttingDown,
)
from aisandbox.http.errors import RequestTooLarge, Unauthorized
from aisandbox.settings import ServerSettings

__all__ = [
    "PUBLIC_ROUTES",
    "AuthPolicy",
    "LimitExceeded",
    "Limits",
    "OutOfVocabulary",
    "check_json",
    "check_prompt_tokens",
    "check_request",
    "refusal_reason",
]

PUBLIC_ROUTES = frozenset({"/health"})
"""Route templates that never need the API key (liveness and readiness probes)."""

METRICS_ROUTE = "/metrics"


class LimitExceeded(InvalidRequest):
    """A request asks for more than a cap of this server allows (a 400 naming the field)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param=param, code="limit_exceeded")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may ask for; from the settings of the same names."""

    max_sequences: int = 256
    """Prompts x n."""
    max_prompt_tokens: int = 262_144
    """Prompt tokens of all the request's prompts together."""
    max_stop: int = 4
    """Stop strings."""
    max_stop_token_ids: int = 64
    """Stop token ids."""
    max_logit_bias: int = 300
    """logit_bias entries."""
    max_grammar_bytes: int = 100_000
    """UTF-8 bytes of a regex, grammar or JSON schema."""

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Limits:
        """The limits the settings ask for."""
        return cls(
            max_sequences=settings.max_sequences_per_request,
            max_prompt_tokens=settings.max_request_prompt_tokens,
            max_stop=settings.max_stop_strings,
            max_stop_token_ids=settings.max_stop_token_ids,
            max_logit_bias=settings.max_logit_bias,
            max_grammar_bytes=settings.max_grammar_bytes,
        )


def check_json(body: Any, limits: Limits) -> None:
    """Refuse, on the parsed JSON before the schema validates it, a request whose prompt list or token-id
    prompts are over a cap: validating 300,000 prompts would cost more than refusing them.

    Only counts sizes; the schema checks types afterwards.
    """
    if not isinstance(body, dict):
        return
    n = body.get("n", 1)
    n = n if isinstance(n, int) and n >= 1 else 1
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        nested = isinstance(prompt[0], list | str)
        count = len(prompt) if nested else 1
        _check_sequences(count, n, limits, "prompt")
        tokens = sum(len(p) for p in prompt if isinstance(p, list)) if nested else len(prompt)
        check_prompt_tokens(tokens, limits, "prompt")


def _check_sequences(prompts: int, n: int, limits: Limits, param: str) -> None:
    if prompts * n > limits.max_sequences:
        raise LimitExceeded(
            f"This request asks for {prompts * n} sequences ({prompts} prompts x n={n}); this server generates "
            f"at most {limits.max_sequences} per request.",
            param=param if prompts > 1 else "n",
        )


def check_prompt_tokens(tokens: int, limits: Limits, param: str) -> None:
    """Refuse more prompt tokens in one request than the cap allows."""
    if tokens > limits.max_prompt_tokens:
        raise LimitExceeded(
            f"This request's prompts have {tokens} tokens in all; this server accepts at most "
            f"{limits.max_prompt_tokens} prompt tokens per request.",
            param=param,
        )


class OutOfVocabulary(InvalidRequest):
    """Token ids outside the model's vocabulary (a 400 naming the field)."""

    def __init__(self, param: str, bad: Sequence[int], vocab_size: int) -> None:
        message = f"{param} has token ids outside the vocabulary (0..{vocab_size - 1}): {list(bad[:5])}"
        super().__init__(message, param=param, code="invalid_value")


def _check_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = sorted({t for t in ids if not 0 <= t < vocab_size})
    if bad:
        raise OutOfVocabulary(param, bad, vocab_size)


def check_request(body: Any, limits: Limits, vocab_size: int) -> None:
    """Refuse a validated request over any cap, before any per-request work.

    Works on any request schema: fields a request type lacks are skipped.

    Raises:
        LimitExceeded: A cap (400 naming the field).
        InvalidRequest: A token id outside the vocabulary (400 naming the field).
    """
    n = getattr(body, "n", 1) or 1
    prompts_of: Callable[[], list[Any]] | None = getattr(body, "prompts", None)
    prompts = prompts_of() if prompts_of is not None else None
    if prompts is not None:
        _check_sequences(len(prompts), n, limits, "prompt")
        check_prompt_tokens(sum(len(p) for p in prompts if isinstance(p, list)), limits, "prompt")
    else:
        _check_sequences(1, n, limits, "n")
    stop = getattr(body, "stop", None)
    if isinstance(stop, list) and len(stop) > limits.max_stop:
        raise LimitExceeded(f"'stop' has {len(stop)} strings; at most {limits.max_stop} are accepted.", "stop")
    stop_ids = getattr(body, "stop_token_ids", None) or ()
    if len(stop_ids) > limits.max_stop_token_ids:
        raise LimitExceeded(
            f"'stop_token_ids' has {len(stop_ids)} ids; at most {limits.max_stop_token_ids} are accepted.",
            "stop_token_ids",
        )
    _check_ids(stop_ids, vocab_size, "stop_token_ids")
    bias = getattr(body, "logit_bias", None) or {}
    if len(bias) > limits.max_logit_bias:
        raise LimitExceeded(
            f"'logit_bias' has {len(bias)} entries; at most {limits.max_logit_bias} are accepted.", "logit_bias"
        )
    _check_ids([int(k) for k in bias], vocab_size, "logit_bias")
    for param in ("guided_regex", "guided_grammar"):
        source = getattr(body, param, None)
        if source is not None:
            _check_grammar(source, limits, param)
    fmt = getattr(body, "response_format", None)
    schema = getattr(getattr(fmt, "json_schema", None), "schema_", None)
    if schema is not None:
        spec = getattr(body, "grammar_spec", None)
        source = spec().source if spec is not None else None
        if source:
            _check_grammar(source, limits, "response_format.json_schema.schema")


def _check_grammar(source: str, limits: Limits, param: str) -> None:
    size = len(source.encode("utf-8", errors="replace"))
    if size > limits.max_grammar_bytes:
        raise LimitExceeded(
            f"'{param}' is {size} bytes long; this server accepts at most {limits.max_grammar_bytes}.", param
        )


def refusal_reason(exc: BaseException) -> str | None:
    """The `reason` label under which an error counts as a refusal, or None when it is not one."""
    if isinstance(exc, Unauthorized):
        return "unauthorized"
    if isinstance(exc, RequestTooLarge):
        return "body_too_large"
    if isinstance(exc, LimitExceeded):
        return f"limit_{exc.param}".replace(".", "_")
    if isinstance(exc, ContextLengthExceeded):
        return "context_length"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, ServerShuttingDown):
        return "draining"
    if isinstance(exc, EngineDead):
        return "engine_dead"
    if isinstance(exc, EngineNotReady):
        return "not_ready"
    if isinstance(exc, OutOfVocabulary):
        return f"vocab_{exc.param}"
    return None


class AuthPolicy:
    """Falcon middleware: authentication by the matched route, deny by default; draining refuses new work.

    It runs in `process_resource`, after Falcon has routed the normalised path, so what decides is the route
    that will answer, never a prefix of the raw path.
    """

    def __init__(self, settings: ServerSettings, draining: Callable[[], bool]) -> None:
        key = settings.api_key
        self._expected = f"Bearer {key}".encode() if key else None
        self._metrics_public = not settings.metrics_require_key
        self._draining = draining

    def _public(self, route: str | None) -> bool:
        if route in PUBLIC_ROUTES:
            return True
        return route == METRICS_ROUTE and self._metrics_public

    async def process_resource(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object, params: dict[str, Any]
    ) -> None:
        route = req.uri_template
        self._authenticate(req, route)
        if route not in PUBLIC_ROUTES and route != METRICS_ROUTE and self._draining():
            raise ServerShuttingDown()

    async def unrouted(self, req: falcon.asgi.Request, resp: falcon.asgi.Response | None, **kwargs: Any) -> None:
        """The sink of every path no route matched (Falcon runs no `process_resource` for those): 401 first."""
        self._authenticate(req, None)
        raise falcon.HTTPNotFound()

    def _authenticate(self, req: falcon.asgi.Request, route: str | None) -> None:
        if self._expected is not None and not self._public(route):
            token = (req.get_header("Authorization") or "").encode()
            if not hmac.compare_digest(token, self._expected):
                raise Unauthorized()
