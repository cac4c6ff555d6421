"""Function calling as plain runtime data: tool specs, calls, the tool choice, and the prompt fallback.

The HTTP schemas convert a request's `tools`, `tool_choice`, `parallel_tool_calls` and its messages into these
types once; the tokenizer renders them into the prompt (`Tokenizer.encode_chat(messages, tools)`), the parsers
in `aisandbox.runtime.structured.tools.parsers` turn model output back into `ToolCall`s, and
`aisandbox.runtime.structured.tools.grammar` describes what guided decoding must allow.

Conversation messages stay mappings (see `aisandbox.runtime.text.tokenizer.ChatMessage`), with these keys:

- `{"role": "system" | "user", "content": str}`
- `{"role": "assistant", "content": str | None, "tool_calls": tuple[ToolCall, ...]}` (`tool_calls` optional)
- `{"role": "tool", "content": str, "tool_call_id": str, "name": str | None}` (`name`: the called function)

Tool-call ids: OpenAI clients send and expect their own ids (`call_...`). Mistral's tokenizers only accept
9-character alphanumeric ids, so `MistralIdMap` maps every client id to one deterministically (a hash) and
keeps the way back.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aisandbox.runtime.types import ToolCall

__all__ = [
    "FALLBACK_CALL_CLOSE",
    "FALLBACK_CALL_OPEN",
    "MistralIdMap",
    "ToolCall",
    "ToolChoice",
    "ToolFormat",
    "ToolRequest",
    "ToolSpec",
    "fallback_messages",
    "fallback_system_prompt",
    "is_mistral_id",
    "new_call_id",
    "render_call",
]

ToolFormat = Literal["mistral", "hermes"]
"""How a model writes its calls: `mistral` is the `[TOOL_CALLS]` control token followed by a JSON list;
`hermes` is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in plain text (Hermes, Qwen, and this
server's fallback prompt)."""

FALLBACK_CALL_OPEN = "<tool_call>"
FALLBACK_CALL_CLOSE = "</tool_call>"

_ALNUM = string.ascii_letters + string.digits
_MISTRAL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function the model may call."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    """JSON Schema of the arguments object (already checked against its meta-schema)."""
    strict: bool = False
    """The client asked for the schema to be enforced (guided decoding always enforces it when it runs)."""

    def to_openai(self) -> dict[str, Any]:
        """The `{"type": "function", "function": {...}}` form that chat templates and mistral-common take."""
        function: dict[str, Any] = {"name": self.name, "description": self.description}
        function["parameters"] = dict(self.parameters)
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """`tool_choice`: none, auto, required, or one named function."""

    mode: Literal["none", "auto", "required", "named"] = "auto"
    name: str | None = None
    """The function, for mode `named`."""


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """Everything function calling needs to know about one chat request."""

    tools: tuple[ToolSpec, ...]
    choice: ToolChoice = ToolChoice()
    parallel: bool = True
    """`parallel_tool_calls`: whether one answer may hold more than one call."""

    @property
    def active(self) -> bool:
        """Whether the model may call a tool at all (tools given and the choice is not `none`)."""
        return bool(self.tools) and self.choice.mode != "none"

    @property
    def single_call(self) -> bool:
        """Whether the answer holds at most one call: `parallel_tool_calls` false, or a named function (which
        forces one call to it, as vLLM's named tool choice does)."""
        return not self.parallel or self.choice.mode == "named"

    @property
    def forced(self) -> bool:
        """Whether the client demands a call (`required` or a named function)."""
        return self.active and self.choice.mode in ("required", "named")

    @property
    def callable_tools(self) -> tuple[ToolSpec, ...]:
        """The tools a call may name: the named one, or all of them."""
        if not self.active:
            return ()
        if self.choice.mode == "named":
            return tuple(t for t in self.tools if t.name == self.choice.name)
        return self.tools

    @property
    def prompt_tools(self) -> tuple[ToolSpec, ...]:
        """The tools to show the model in the prompt: all of them unless the choice is `none`.

        With `none` the tools are left out of the prompt, as vLLM does by default, so that the model is not
        invited to write a call that nothing would parse.
        """
        return self.tools if self.active else ()

    def spec(self, name: str) -> ToolSpec | None:
        """The tool of that name, if the request has it."""
        return next((t for t in self.tools if t.name == name), None)


def new_call_id() -> str:
    """A fresh id for a call the model made, shaped like OpenAI's: `call_` and 24 letters and digits."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def is_mistral_id(value: str) -> bool:
    """Whether a string is a valid Mistral tool-call id (9 letters and digits)."""
    return bool(_MISTRAL_ID.match(value))


def _hash_id(value: str, salt: int) -> str:
    digest = int.from_bytes(hashlib.sha256(f"{salt}:{value}".encode()).digest()[:16], "big")
    out = []
    for _ in range(9):
        digest, rem = divmod(digest, len(_ALNUM))
        out.append(_ALNUM[rem])
    return "".join(out)


class MistralIdMap:
    """Maps client tool-call ids to Mistral's 9-character ids, deterministically, and back.

    An id that already is a valid Mistral id is kept; any other is hashed (SHA-256, base 62). The same client
    id always gets the same Mistral id, in every request, so a prompt prefix cache keeps matching across
    turns. Within one map two different client ids never share a Mistral id (a clash, about one in 10^16,
    is resolved by rehashing with a salt).
    """

    def __init__(self) -> None:
        self._to_mistral: dict[str, str] = {}
        self._to_client: dict[str, str] = {}

    def to_mistral(self, client_id: str) -> str:
        """The Mistral id for a client id (added to the map on first use)."""
        known = self._to_mistral.get(client_id)
        if known is not None:
            return known
        salt = 0
        candidate = client_id if is_mistral_id(client_id) else _hash_id(client_id, salt)
        while candidate in self._to_client:
            salt += 1
            candidate = _hash_id(client_id, salt)
        self._to_mistral[client_id] = candidate
        self._to_client[candidate] = client_id
        return candidate

    def to_client(self, mistral_id: str) -> str | None:
        """The client id a Mistral id stands for, or None if this map never issued it."""
        return self._to_client.get(mistral_id)


# ---- fallback for chat templates that know nothing of tools ----

_FALLBACK_INSTRUCTIONS = """\
You can call functions. These are the functions you may call, as JSON Schema:
<tools>
{tools}
</tools>
{rule}
To call a function, answer with one block per call, exactly in this form and with nothing else:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>
The result of a call comes back in a <tool_response> block."""

_FALLBACK_RULES = {
    "auto": "Call a function only when it helps to answer; otherwise answer in plain text.",
    "required": "You must call at least one of these functions now.",
    "named": "You must call the function {name} now.",
}


def fallback_system_prompt(request: ToolRequest) -> str:
    """The system-prompt text that lists the tools and says how to call them (Hermes-style wrapper)."""
    tools = "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in request.prompt_tools)
    rule = _FALLBACK_RULES.get(request.choice.mode, _FALLBACK_RULES["auto"]).format(name=request.choice.name)
    if not request.parallel:
        rule += " Make at most one call."
    return _FALLBACK_INSTRUCTIONS.format(tools=tools, rule=rule)


def render_call(call: ToolCall) -> str:
    """One earlier call, in the fallback wrapper (Qwen's layout, as the grammar writes it)."""
    arguments = call.arguments()
    body = json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False)
    return f"{FALLBACK_CALL_OPEN}\n{body}\n{FALLBACK_CALL_CLOSE}"


def fallback_messages(messages: Sequence[Mapping[str, Any]], request: ToolRequest | None) -> list[dict[str, Any]]:
    """Rewrite a conversation with tools for a chat template that knows only system/user/assistant text.

    The tool list and calling instructions join the system prompt (a system message is added when there is
    none); an assistant's earlier calls become `<tool_call>...</tool_call>` lines after its text; tool results
    become a user message of `<tool_response>...</tool_response>` blocks (consecutive results merge into one,
    so templates that insist on alternating roles accept it).
    """
    out: list[dict[str, Any]] = []
    prompt_tools = request.prompt_tools if request is not None else ()
    if prompt_tools:
        assert request is not None
        instructions = fallback_system_prompt(request)
        if messages and messages[0].get("role") == "system":
            first = messages[0]
            content = str(first.get("content") or "")
            out.append({"role": "system", "content": f"{content}\n\n{instructions}" if content else instructions})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": instructions})
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            lines = [str(message["content"])] if message.get("content") else []
            lines.extend(render_call(call) for call in message["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(lines)})
        elif role == "tool":
            result = {"name": message.get("name"), "content": str(message.get("content") or "")}
            block = f"<tool_response>{json.dumps(result, ensure_ascii=False)}</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({"role": str(role), "content": str(message.get("content") or "")})
    for item in out:
        item.pop("_tool_results", None)
    return out
