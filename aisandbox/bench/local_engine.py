"""The benchmark's engine-alone baseline: `aisandbox bench --engine local`.

Implements the bench package's `RequestClient` on the runtime's `Engine` in this process, doing the work the
server does for a request minus HTTP: chat template and tokenization, context check, submit, incremental
detokenization and stop strings (`stream_text`). Running the same workload over HTTP and here measures the
cost of the HTTP tier as a ratio.

This module joins `aisandbox.bench` (which must not import the runtime) and `aisandbox.runtime`; the bench
CLI imports it lazily, only for `--engine local`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from importlib import metadata
from typing import Any

from aisandbox.bench.client import GenerationOptions, Prompt, RequestError, StreamEvent, Usage
from aisandbox.errors import AisandboxError
from aisandbox.runtime.engine import Engine, stream_text
from aisandbox.runtime.loader import create_engine
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.torch.default_model import resolve_model_path
from aisandbox.settings import ServerSettings

__all__ = ["LocalEngineClient", "parse_settings"]


def parse_settings(items: Sequence[str]) -> ServerSettings:
    """Build server settings from `KEY=VALUE` items (over `AISANDBOX_*` variables, as `aisandbox serve` does).

    Raises:
        ValueError: An item without `=`, or a value the settings reject.
    """
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        values[key.strip().replace("-", "_")] = value
    return ServerSettings(**values)  # type: ignore[arg-type]  # pydantic converts the strings


class LocalEngineClient:
    """Streams requests through an in-process engine, stamping each text delta as it is produced."""

    def __init__(self, engine: Engine, settings: ServerSettings, options: GenerationOptions) -> None:
        self._engine = engine
        self.settings = settings
        self.options = options

    @classmethod
    async def start(cls, settings: ServerSettings, options: GenerationOptions) -> LocalEngineClient:
        """Create the engine the settings ask for, start it and wait until it is ready.

        Raises:
            RuntimeError: The engine did not become ready.
        """
        engine = create_engine(settings)
        await engine.start()
        health = await engine.wait_ready()
        if not health.ready:
            await engine.shutdown()
            raise RuntimeError(f"the local engine is {health.state.value}: {health.reason}")
        model = options.model or settings.model_name
        return cls(engine, settings, replace(options, model=model))

    async def _request(self, prompt: Prompt) -> GenerationRequest:
        engine = self._engine
        if self.options.endpoint == "chat":
            ids, param = await engine.encode_chat(list(prompt.messages)), "messages"
        else:
            ids, param = await engine.encode(prompt.text), "prompt"
        max_tokens = engine.check_context(len(ids), prompt.output_len, param)
        fixed = self.options.fixed_length
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=self.options.temperature,
            ignore_eos=fixed,
            min_tokens=max_tokens if fixed else 0,
        )
        return GenerationRequest(f"bench-{uuid.uuid4().hex}", tuple(ids), sampling)

    async def stream(self, prompt: Prompt) -> AsyncGenerator[StreamEvent, None]:
        """Run one request in the engine; yield each text delta, then the usage."""
        try:
            request = await self._request(prompt)
            generated = 0
            async for delta in stream_text(self._engine, request):
                generated = delta.completion_tokens
                yield StreamEvent(t=time.perf_counter(), text=delta.text, completion_tokens=generated)
            usage = Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=generated)
            yield StreamEvent(t=time.perf_counter(), usage=usage)
        except AisandboxError as exc:
            yield StreamEvent(t=time.perf_counter(), error=RequestError(type(exc).__name__, exc.message))

    async def describe(self) -> dict[str, Any]:
        """The engine's settings and the versions of what runs it."""
        return {
            "kind": "local",
            "endpoint": self.options.endpoint,
            "settings": self.settings.model_dump(mode="json", exclude={"api_key"}, exclude_none=True),
            "model_path": str(
                self.settings.engine_dir or resolve_model_path(self.settings.model, self.settings.cache_dir)
            ),
            "max_model_len": self._engine.model_info.max_model_len,
            "versions": {p: _version(p) for p in ("aisandbox", "torch", "transformers")},
        }

    async def aclose(self) -> None:
        """Shut the engine down."""
        await self._engine.shutdown()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
