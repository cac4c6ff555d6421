"""Typed server settings, loaded once and passed down.

`aisandbox serve` turns its flags into `AISANDBOX_*` environment variables before it starts gunicorn, so each
forked worker loads the very same settings in `aisandbox.http.asgi`. Nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_MODEL_NAME", "ServerSettings"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "aisandbox"


class ServerSettings(BaseSettings):
    """Everything `aisandbox serve` can be told."""

    model_config = SettingsConfigDict(env_prefix="AISANDBOX_", extra="ignore", frozen=True)

    host: str = "0.0.0.0"
    """Address to bind."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port to bind (0 picks a free one, for tests)."""
    workers: int = Field(default=1, ge=1, le=64)
    """gunicorn workers: one per GPU; each loads its own engine."""
    model: Path | None = None
    """A local Hugging Face causal-LM folder for the torch backend; None serves the default SmolLM2."""
    engine_dir: Path | None = None
    """A TensorRT-LLM engine folder built by `aisandbox build-engine`; selects the trtllm backend."""
    served_model_name: str | None = None
    """The model id clients send and see; defaults to the model folder's name."""
    tokenizer_mode: Literal["auto", "hf", "mistral"] = "auto"
    """`auto` uses mistral-common where the folder has a Mistral tokenizer file."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """torch backend device; auto picks CUDA when available."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """torch backend weights and KV dtype; auto is bfloat16 on CUDA and float32 on every CPU (the tuned path)."""
    weights_dtype: Literal["auto", "fp32", "fp16", "bf16", "int8", "int4", "q4_1", "q4_1p", "q4_1v", "q8_1", "q8_0"] = (
        "auto"
    )
    """torch backend on CPU with float32: the linear layers' weight format. `auto` times each format on the
    model's own layer shapes at load and picks the fastest per batch size (the 4-bit one from the GGUF's own
    Q4_1 blocks for the default model); `fp32` keeps greedy output identical to transformers."""
    kv_cache_dtype: Literal["auto", "float16", "float32"] = "auto"
    """torch backend: what the KV cache holds. `auto`: float16 on the CPU tuned path (the C kernels read it; half
    the memory and the bytes each decode step reads, as llama.cpp's default f16 cache), the model's dtype
    elsewhere; `float32` keeps the CPU path's cache in float32. Anything but the tuned CPU path keeps the model's
    dtype."""
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    """Most sequences decoded together (torch backend)."""
    max_prefill_tokens: int = Field(default=512, ge=16)
    """Most prompt tokens prefilled in one engine step, so running streams keep flowing."""
    max_model_len: int | None = Field(default=None, ge=16)
    """Cap on the context window; default the model's own."""
    prefix_cache_mb: int = Field(default=256, ge=0)
    """torch backend: memory for the KV of prompt prefixes reused across requests (0 disables)."""
    kv_cache_mb: int | None = Field(default=None, ge=1)
    """Torch backend: memory for the running sequences' KV cache, MiB. Default: `kv_cache_fraction` of the memory
    free at load. A request that could never fit is refused (context_length_exceeded); one that does not fit
    now waits for running sequences to end."""
    kv_cache_fraction: float = Field(default=0.5, gt=0, le=0.95)
    """Torch backend: share of free memory (host, or GPU) for the KV cache when kv_cache_mb is not set."""
    retime_cpu_formats: bool = False
    """Torch backend on CPU: time the weight formats again at this start (and cache the new choice) instead of
    reusing the choice cached for this CPU, model and kernel build."""
    max_queue: int = Field(default=256, ge=1)
    """Waiting requests beyond which new ones get 429."""
    max_n: int = Field(default=16, ge=1, le=128)
    """Largest `n` a request may ask for."""
    text_workers: int = Field(default=2, ge=1, le=64)
    """Threads that apply chat templates and tokenize prompts, so the event loop never does."""
    grammar_compile_timeout_s: float = Field(default=5.0, gt=0, le=600)
    """Deadline for compiling one client grammar (response_format json_schema, guided_regex, guided_grammar, tool
    schemas) in a grammar worker process; past it the request gets a 400 `grammar_too_complex` and the worker is
    killed. Waiting for a free worker (no CPU) does not count; a client that leaves ends its wait or compile."""
    grammar_workers: int = Field(default=1, ge=0, le=64)
    """Worker processes that compile client grammars (one compile each at a time); 0 compiles on a thread in the
    server process, with no deadline."""
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024)
    """Largest request body accepted; a larger one gets 413 before more than this is read. The default, 4 MiB,
    holds any prompt that fits a 128k-token context as text."""
    max_json_depth: int = Field(default=64, ge=4, le=512)
    """Deepest nesting of arrays and objects accepted in a request body (400 invalid_json beyond)."""
    null_engine: bool = False
    """Serve the null backend (the tokenizer of the model, canned tokens at no cost): benchmarks the HTTP tier."""
    null_engine_step_ms: float = Field(default=0.0, ge=0.0)
    """Null backend: pause between steps; 0 emits as fast as the process allows."""
    api_key: str | None = None
    """When set, every route but /health (and /metrics, unless `metrics_require_key`) needs
    `Authorization: Bearer <api_key>`."""
    metrics_require_key: bool = False
    """With an API key set, /metrics needs the key too."""
    max_sequences_per_request: int = Field(default=256, ge=1)
    """Most sequences one request may ask for (prompts x n); more is a 400 naming `prompt` or `n`."""
    max_request_prompt_tokens: int = Field(default=262_144, ge=16)
    """Most prompt tokens of one request, all its prompts together (token-id prompts are counted before any
    other work); more is a 400 naming the prompt."""
    max_stop_strings: int = Field(default=4, ge=0)
    """Most `stop` strings one request may give (OpenAI's limit is 4)."""
    max_stop_token_ids: int = Field(default=64, ge=0)
    """Most `stop_token_ids` one request may give."""
    max_logit_bias: int = Field(default=300, ge=0)
    """Most `logit_bias` entries one request may give (OpenAI's limit is 300)."""
    max_grammar_bytes: int = Field(default=100_000, ge=1, le=100_000)
    """Largest regex, grammar or JSON schema (UTF-8 bytes) one request may give."""
    drain_timeout_s: float = Field(default=30.0, ge=0.0, le=3600.0)
    """On SIGTERM: how long running requests may go on finishing; past it, streams end with an error event
    (`server_shutting_down`) and `data: [DONE]`, other requests with a 503."""
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Where the converted default model is kept."""
    threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads on CPU; default all cores."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the server and the engine."""
    graceful_timeout_s: int | None = Field(default=None, ge=1)
    """Seconds gunicorn waits for a worker on SIGTERM before it kills it; never less than
    `drain_timeout_s` + 15 (the drain, then the engine's shutdown), which is also the default."""
    data_dir: Path = Field(default_factory=lambda: _default_cache_dir() / "data")
    """Where the default SQLite response store (`responses.db`) lives."""
    response_store_url: str | None = None
    """Database for stored responses: `postgresql://...` for PostgreSQL; default SQLite in `data_dir`."""
    response_retention_days: int = Field(default=30, ge=0, le=3650)
    """Stored responses older than this are deleted (0 keeps them forever)."""

    @model_validator(mode="after")
    def _one_model_source(self) -> ServerSettings:
        if self.model is not None and self.engine_dir is not None:
            raise ValueError("give either --model (torch backend) or --engine (trtllm backend), not both")
        return self

    @property
    def gunicorn_graceful_timeout_s(self) -> int:
        """gunicorn's graceful timeout: above the drain, with time for the engine to shut down."""
        floor = int(self.drain_timeout_s + 0.999) + 15
        return max(self.graceful_timeout_s or floor, floor)

    @property
    def backend(self) -> Literal["torch", "trtllm"]:
        """Which backend serves: trtllm for an engine folder, else torch."""
        return "trtllm" if self.engine_dir is not None else "torch"

    @property
    def model_name(self) -> str:
        """The id clients use for the served model."""
        if self.served_model_name:
            return self.served_model_name
        source = self.engine_dir or self.model
        return source.resolve().name if source is not None else DEFAULT_MODEL_NAME
