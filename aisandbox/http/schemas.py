"""OpenAI wire models: every request and response body the server speaks, in one module.

Requests are pydantic v2 models that forbid unknown fields (OpenAI's `unknown_parameter`), refuse known
OpenAI fields that this server cannot honour (`unsupported_parameter`, never silently ignored), and convert
themselves into the runtime's own `SamplingParams` in one method. Responses are built as plain dicts by the
small functions at the end, since they sit on the per-token hot path; their shapes follow OpenAI's spec
and the tests validate them against it.

Function calling: `tools`, `tool_choice` and `parallel_tool_calls` are validated here and converted by
`ChatCompletionRequest.tool_request()` (plus `conversation(with_tools=True)` for the messages) into the
runtime's `aisandbox.runtime.structured.tools.specs` types. The legacy `functions` / `function_call` fields stay refused
(`unsupported_parameter`): they would need the legacy `message.function_call` response shape too, and every
current client sends `tools`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from aisandbox.errors import InvalidRequest, UnsupportedParameter
from aisandbox.runtime.request import GREEDY_BELOW_TEMPERATURE, SamplingParams
from aisandbox.runtime.structured.logprobs import ShownLogprob
from aisandbox.runtime.structured.tools.parsers import ContentEvent, ToolCallArguments, ToolCallStart, ToolEvent
from aisandbox.runtime.structured.tools.specs import ToolCall, ToolChoice, ToolRequest, ToolSpec
from aisandbox.runtime.types import GrammarSpec

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "ResponseFormat",
    "chat_chunk",
    "chat_deltas",
    "chat_logprobs",
    "chat_message",
    "chat_response",
    "check_logit_bias",
    "completion_chunk",
    "completion_logprobs",
    "completion_response",
    "error_body",
    "model_card",
    "tool_calls_json",
    "usage",
]

Number = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FunctionDefinition(_Strict):
    """`tools[].function`."""

    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    """a-z, A-Z, 0-9, underscores and dashes, at most 64 characters (OpenAI's rule)."""
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """JSON Schema of the arguments object; checked against its meta-schema. Omitted means no parameters."""
    strict: StrictBool | None = None


class ToolDefinition(_Strict):
    """One entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    """`tool_choice.function`."""

    name: str


class NamedToolChoice(_Strict):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: FunctionName


class FunctionCallIn(BaseModel):
    """`messages[].tool_calls[].function`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    arguments: str | dict[str, Any] = "{}"
    """A JSON string, as OpenAI sends it (an object is accepted and serialized)."""


class ToolCallIn(BaseModel):
    """A call an earlier assistant message made, sent back by the client."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: Annotated[str, Field(min_length=1)]
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def to_runtime(self) -> ToolCall:
        """As the runtime's `ToolCall`."""
        arguments = self.function.arguments
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return ToolCall(self.id, self.function.name, text)


class StreamOptions(_Strict):
    """`stream_options`."""

    include_usage: StrictBool = False
    """Send a last chunk with empty choices and the usage of the whole request."""
    include_obfuscation: StrictBool | None = None
    """Accepted; no obfuscation padding is ever sent."""
    continuous_usage_stats: StrictBool = False
    """vLLM's extension: usage on every chunk (accepted, not sent)."""


class ChatMessageIn(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="allow", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self, index: int) -> str:
        """The content as one string; non-text parts are refused."""
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise InvalidRequest(f"messages[{index}].content is required", param=f"messages[{index}].content")
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for j, part in enumerate(self.content):
            kind = part.get("type")
            if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind == "refusal":
                pieces.append(str(part.get("refusal", "")))
            else:
                raise UnsupportedParameter(
                    f"messages[{index}].content[{j}]",
                    f"Content parts of type '{kind}' are not supported by this text-only model.",
                )
        return "\n".join(pieces)


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    """The JSON Schema the output must follow (OpenAI's subset: $defs/$ref, enum, anyOf, nested objects and
    arrays, additionalProperties: false, ...). Absent: any JSON object."""
    strict: StrictBool | None = None
    """True: properties the schema does not list are refused even where it does not say
    additionalProperties: false. False or absent (OpenAI's default): JSON Schema's own rules."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ResponseFormat(_Strict):
    """`response_format`: `text`, `json_object` (any JSON object) or `json_schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"response_format of type '{self.type}' takes no 'json_schema'")
        return self


MAX_GRAMMAR_CHARS = 100_000
"""Longest schema, regex or grammar accepted."""


class _SamplingFields(_Strict):
    """Fields common to chat and legacy completions."""

    model: str
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    """Up to `max_stop_strings` (a setting, 4 by default) strings; checked by `aisandbox.http.policy`."""
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None  # int64, as OpenAI documents it
    user: str | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, Annotated[Number, Field(ge=-100.0, le=100.0)]] | None = None
    """Token id (as a string) -> bias added to its logit, -100..100 (-100 bans it, 100 all but forces it)."""
    response_format: ResponseFormat | None = None
    """Structured output: `json_object` or `json_schema` (OpenAI's); also accepted on completions, as vLLM."""
    # Structured-output extensions, under vLLM's names (the OpenAI SDK sends them through extra_body).
    guided_regex: Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)] | None = None
    """The output must match this regular expression (whole output)."""
    guided_grammar: Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)] | None = None
    """The output must follow this EBNF grammar (xgrammar's GBNF dialect, as llama.cpp writes it; the start
    rule is `root`)."""
    # Self-hosted extensions, as vLLM accepts them.
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    """-1 or 0 disables top-k."""
    min_p: Annotated[Number, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None

    @model_validator(mode="after")
    def _check_common(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("The 'stream_options' parameter is only allowed when 'stream' is enabled.")
        for key in self.logit_bias or {}:
            if not key.isdigit():
                raise InvalidRequest(
                    f"logit_bias keys must be token ids (non-negative integers as strings), not {key!r}.",
                    param="logit_bias",
                    code="invalid_value",
                )
        guides = [
            name
            for name, set_ in (
                ("response_format", self.response_format is not None and self.response_format.type != "text"),
                ("guided_regex", self.guided_regex is not None),
                ("guided_grammar", self.guided_grammar is not None),
            )
            if set_
        ]
        if len(guides) > 1:
            raise InvalidRequest(
                f"Only one of {', '.join(guides)} may constrain the output.", param=guides[1], code="invalid_value"
            )
        return self

    def grammar_spec(self) -> GrammarSpec | None:
        """The output constraint the request asks for, if any (compiled later, off the event loop)."""
        if self.guided_regex is not None:
            return GrammarSpec("regex", self.guided_regex)
        if self.guided_grammar is not None:
            return GrammarSpec("ebnf", self.guided_grammar)
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object" or fmt.json_schema is None or fmt.json_schema.schema_ is None:
            return GrammarSpec("json_object")
        source = json.dumps(fmt.json_schema.schema_, separators=(",", ":"), ensure_ascii=False)
        if len(source) > MAX_GRAMMAR_CHARS:
            raise InvalidRequest(
                f"The JSON schema is longer than {MAX_GRAMMAR_CHARS} characters.",
                param="response_format.json_schema.schema",
                code="invalid_value",
            )
        return GrammarSpec("json_schema", source, strict=bool(fmt.json_schema.strict))

    def logprob_settings(self) -> tuple[bool, int, int | None]:
        """(logprobs, top_logprobs, prompt_logprobs) for SamplingParams."""
        return False, 0, None

    @property
    def stop_list(self) -> tuple[str, ...]:
        """`stop` as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        """The completion limit the client asked for, if any."""
        return self.max_tokens

    def to_sampling_params(self, max_tokens: int, choice_index: int = 0) -> SamplingParams:
        """Convert to the runtime's SamplingParams for one choice.

        Args:
            max_tokens: Resolved against the context window by the caller.
            choice_index: With a seed and n > 1, each choice samples with seed + index so that choices differ
                and the response stays reproducible.
        """
        temperature = 1.0 if self.temperature is None else self.temperature
        if temperature < GREEDY_BELOW_TEMPERATURE:
            temperature = 0.0  # dividing logits by 1e-40 overflows them; vLLM treats it as greedy too
        if self.min_tokens > max_tokens:
            raise InvalidRequest(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens}).",
                param="min_tokens",
                code="invalid_value",
            )
        logprobs, top_logprobs, prompt_lp = self.logprob_settings()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            seed=None if self.seed is None else self.seed + choice_index,
            stop=self.stop_list,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_lp,
            guided=self.grammar_spec(),
        )


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    # Accepted: they do not change what is generated.
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    """Whether one answer may hold several calls (default true)."""
    tools: Annotated[list[ToolDefinition], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    moderation: Any = None
    modalities: list[Literal["text"]] | None = None
    logprobs: StrictBool | None = None
    """Return the logprob of each output token (from the raw model distribution)."""
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    """With logprobs: this many most likely tokens at each position."""
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(
                "'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs", code="invalid_value"
            )
        if self.functions:
            raise UnsupportedParameter("functions", "The legacy 'functions' parameter is not supported; use 'tools'.")
        if self.function_call not in (None, "none", "auto"):
            raise UnsupportedParameter(
                "function_call", "The legacy 'function_call' is not supported; use 'tool_choice'."
            )
        self._check_tools()
        self._check_tool_messages()
        for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, name) is not None:
                raise UnsupportedParameter(name)
        return self

    def _check_tools(self) -> None:
        """Duplicate names, invalid parameter schemas, and a tool_choice that names no given tool."""
        tools = self.tools or []
        seen: set[str] = set()
        for i, tool in enumerate(tools):
            name = tool.function.name
            if name in seen:
                raise InvalidRequest(
                    f"Duplicate tool name '{name}' in 'tools'; tool names must be unique.",
                    param=f"tools[{i}].function.name",
                    code="invalid_value",
                )
            seen.add(name)
            if tool.function.parameters is not None:
                _check_parameters_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in seen:
                raise InvalidRequest(
                    f"Invalid value for 'tool_choice': no function named '{choice.function.name}' in 'tools'.",
                    param="tool_choice",
                    code="invalid_value",
                )
        elif choice == "required" and not tools:
            raise InvalidRequest(
                "Invalid value for 'tool_choice': 'required' needs 'tools'.", param="tool_choice", code="invalid_value"
            )

    def _check_tool_messages(self) -> None:
        """Every tool message answers a call that an earlier assistant message made."""
        calls: set[str] = set()
        for i, message in enumerate(self.messages):
            if message.role == "assistant" and message.tool_calls:
                calls.update(call.id for call in message.tool_calls)
            elif message.tool_calls:
                raise InvalidRequest(
                    f"Only assistant messages may carry 'tool_calls' (messages[{i}] is '{message.role}').",
                    param=f"messages[{i}].tool_calls",
                    code="invalid_value",
                )
            if message.role != "tool":
                continue
            if not message.tool_call_id:
                raise InvalidRequest(
                    f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                    param=f"messages[{i}].tool_call_id",
                    code="missing_required_parameter",
                )
            if message.tool_call_id not in calls:
                raise InvalidRequest(
                    f"Invalid parameter: messages[{i}] with role 'tool' answers tool_call_id "
                    f"'{message.tool_call_id}', which no earlier assistant message's 'tool_calls' has.",
                    param=f"messages[{i}].tool_call_id",
                    code="invalid_value",
                )

    def logprob_settings(self) -> tuple[bool, int, int | None]:
        return bool(self.logprobs), (self.top_logprobs or 0) if self.logprobs else 0, None

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` wins over the older `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_request(self) -> ToolRequest | None:
        """`tools`, `tool_choice` and `parallel_tool_calls` as the runtime's ToolRequest; None without tools.

        A ToolRequest whose choice is `none` is returned too (`active` is False then): the tools stay out of
        the prompt and no parser is needed.
        """
        if not self.tools:
            return None
        specs = tuple(
            ToolSpec(
                name=t.function.name,
                description=t.function.description or "",
                parameters=t.function.parameters or {"type": "object", "properties": {}},
                strict=bool(t.function.strict),
            )
            for t in self.tools
        )
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            runtime_choice = ToolChoice("named", choice.function.name)
        else:
            runtime_choice = ToolChoice(choice or "auto")
        parallel = True if self.parallel_tool_calls is None else self.parallel_tool_calls
        return ToolRequest(specs, runtime_choice, parallel)

    def conversation(self, *, with_tools: bool = False) -> list[dict[str, Any]]:
        """Messages as the tokenizer takes them: text content, `developer` as `system`, calls as `ToolCall`s.

        Assistant messages keep their `tool_calls` (a tuple of `ToolCall`, content None when they had none);
        tool messages keep `tool_call_id` and get `name`, the function of the call they answer.

        Args:
            with_tools: Whether the caller handles tools (passes `tool_request()` to `encode_chat` and parses
                the output for calls). Without it, a request whose tools would be active is refused with
                `unsupported_parameter`, so that tools are never silently ignored.
        """
        request = self.tool_request()
        if not with_tools and request is not None and request.active:
            raise UnsupportedParameter("tools", "'tools' (tool calling) is not supported on this request path yet.")
        names: dict[str, str] = {}
        out: list[dict[str, Any]] = []
        for i, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role
            if role == "assistant" and message.tool_calls:
                calls = tuple(call.to_runtime() for call in message.tool_calls)
                names.update((call.id, call.name) for call in calls)
                text = message.text(i)
                out.append({"role": role, "content": text or None, "tool_calls": calls})
                continue
            item: dict[str, Any] = {"role": role, "content": message.text(i)}
            if role == "tool":
                item["tool_call_id"] = message.tool_call_id
                item["name"] = names.get(str(message.tool_call_id), message.name)
            out.append(item)
        return out


def _check_parameters_schema(schema: dict[str, Any], param: str) -> None:
    """A function's `parameters` must be a valid JSON Schema (checked against its meta-schema) for an object."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise InvalidRequest(
            f"Invalid schema for function parameters{f' at {where}' if where else ''}: {exc.message}",
            param=param,
            code="invalid_value",
        ) from exc
    if schema.get("type", "object") != "object":
        raise InvalidRequest(
            f"Invalid schema for function parameters: it must describe an object (type 'object'), "
            f"not type {schema.get('type')!r}.",
            param=param,
            code="invalid_value",
        )


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions` (legacy)."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[StrictInt], Field(min_length=1)]
        | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1)]
    )
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    echo: StrictBool = False
    """Return the prompt before the completion (with its logprobs when `logprobs` is set)."""
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    """Logprobs of each token and this many most likely alternatives (0..5)."""
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if value == "" or value == []:
            raise ValueError("prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedParameter("best_of", "'best_of' other than n is not supported.")
        if self.suffix:
            raise UnsupportedParameter("suffix")
        return self

    def logprob_settings(self) -> tuple[bool, int, int | None]:
        if self.logprobs is None:
            return False, 0, None
        return True, self.logprobs, self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list of texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


def check_logit_bias(sampling: SamplingParams, vocab_size: int) -> None:
    """Refuse logit_bias token ids outside the model's vocabulary (needs the loaded model's vocab_size).

    Raises:
        InvalidRequest: 400 naming `logit_bias`.
    """
    bad = sorted(t for t, _ in sampling.logit_bias if not 0 <= t < vocab_size)
    if bad:
        raise InvalidRequest(
            f"logit_bias has token ids outside the vocabulary (0..{vocab_size - 1}): {bad[:5]}",
            param="logit_bias",
            code="invalid_value",
        )


# ---- responses (plain dicts: they are built per token) ----


def new_id(prefix: str) -> str:
    """A response id such as chatcmpl-3f2a...."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds, for `created`."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def tool_calls_json(calls: Iterable[ToolCall]) -> list[dict[str, Any]]:
    """`message.tool_calls`: id, type function, function {name, arguments as a JSON string}."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}} for c in calls
    ]


def chat_message(content: str | None, calls: Sequence[ToolCall] = ()) -> dict[str, Any]:
    """`choices[].message`: content is null when the answer is calls only."""
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    message["refusal"] = None
    if calls:
        message["tool_calls"] = tool_calls_json(calls)
    return message


def chat_response(
    rid: str,
    created: int,
    model: str,
    choices: Sequence[tuple[str | None, str]],
    use: dict[str, int],
    tool_calls: Sequence[Sequence[ToolCall]] | None = None,
    logprobs: Sequence[dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """A whole chat completion; choices are (text, finish_reason) by index, with each choice's calls if any and
    its logprobs (`chat_logprobs`) when asked for.

    With tools, pass `ToolParseResult.content` as the text, `result.finish_reason(engine_reason)` as the
    reason and `result.tool_calls` in `tool_calls[index]`.
    """
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": chat_message(text, tool_calls[i] if tool_calls else ()),
                "logprobs": logprobs[i] if logprobs else None,
                "finish_reason": reason,
            }
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": use,
    }


def chat_deltas(events: Iterable[ToolEvent]) -> list[dict[str, Any]]:
    """Streamed `delta` objects for a parser's events, in order, shaped as OpenAI streams calls.

    A call's first delta carries index, id, type, function.name and arguments ""; later deltas carry only the
    index and a piece of the arguments. Consecutive pieces of one call, and consecutive content, are merged
    into one delta. Wrap each delta with `chat_chunk`.
    """
    out: list[dict[str, Any]] = []
    last: tuple[str, int] | None = None  # what the previous delta holds: ("content", -1) or ("args", index)
    for event in events:
        if isinstance(event, ContentEvent):
            if not event.text:
                continue
            if last == ("content", -1):
                out[-1]["content"] += event.text
            else:
                out.append({"content": event.text})
                last = ("content", -1)
        elif isinstance(event, ToolCallStart):
            function = {"name": event.name, "arguments": ""}
            call = {"index": event.index, "id": event.id, "type": "function", "function": function}
            out.append({"tool_calls": [call]})
            last = ("start", event.index)
        elif isinstance(event, ToolCallArguments):
            if last == ("args", event.index):
                out[-1]["tool_calls"][0]["function"]["arguments"] += event.fragment
            else:
                out.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]})
                last = ("args", event.index)
    return out


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed chat chunk for one choice; logprobs (`chat_logprobs`) of the tokens it carries."""
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(rid: str, created: int, model: str, obj: str, use: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with include_usage: no choices, the whole request's usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def completion_response(
    rid: str,
    created: int,
    model: str,
    choices: list[tuple[str, str]],
    use: dict[str, int],
    logprobs: Sequence[dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """A whole legacy completion; choices are (text, finish_reason) by index, logprobs
    (`completion_logprobs`) too."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": logprobs[i] if logprobs else None, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": use,
    }


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed legacy-completion chunk for one choice; logprobs (`completion_logprobs`) of its tokens."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def chat_logprobs(steps: Sequence[ShownLogprob]) -> dict[str, Any]:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}.

    Build it from `LogprobFormatter.format_all(delta.logprobs)`, per chunk when streaming (the entries of the
    tokens that chunk's text came from) or for the whole message.
    """
    return {
        "content": [
            {
                "token": step.chosen.token,
                "logprob": step.chosen.logprob,
                "bytes": step.chosen.bytes,
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in step.top],
            }
            for step in steps
        ],
        "refusal": None,
    }


def completion_logprobs(steps: Sequence[ShownLogprob], text_offset: int = 0) -> dict[str, Any]:
    """A legacy completion choice's `logprobs`: {tokens, token_logprobs, top_logprobs, text_offset}.

    Args:
        steps: One per token, in order: with `echo`, the prompt's (`LogprobFormatter.format_prompt`: the
            first has no logprob, and it shows as null, as OpenAI's legacy API and vLLM send it, though the
            spec's schema says number) and then the completion's.
        text_offset: Characters of the choice's text before the first of these tokens (when streaming, the
            text already sent). Offsets then advance by each token's text; a special token, or one that is
            part of a UTF-8 character, advances by nothing.
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    pos = text_offset
    for step in steps:
        chosen = step.chosen
        offsets.append(pos)
        tokens.append(chosen.token)
        token_logprobs.append(chosen.logprob)
        if chosen.logprob is None:
            top.append(None)
        else:
            # OpenAI's dict holds the chosen token too: at most logprobs + 1 entries.
            alternatives = {t.token: t.logprob for t in step.top if t.logprob is not None}
            alternatives.setdefault(chosen.token, chosen.logprob)
            top.append(alternatives)
        if not chosen.special and not chosen.token.startswith("bytes:"):
            pos += len(chosen.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def model_card(model_id: str, created: int, max_model_len: int | None = None) -> dict[str, Any]:
    """One entry of /v1/models."""
    card: dict[str, Any] = {"id": model_id, "object": "model", "created": created, "owned_by": "aisandbox"}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
