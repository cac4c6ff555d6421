"""The Responses front end (/v1/responses): a Responses request runs as a chat request on the same path.

Pure conversions, no HTTP objects: the request's input items (with a stored conversation's, for
previous_response_id) become chat messages and its fields chat fields (`to_chat_body`); a chat completion becomes
the Response object (`chat_to_response`); the chat stream's chunks become OpenAI's event sequence
(`StreamAdapter`). The resources are in http/app.py, the store in aisandbox/store/.
"""

from __future__ import annotations

from typing import Any

from aisandbox.errors import InvalidRequest, UnsupportedParameter


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of content parts", param=where)
    pieces = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequest(f"{where}[{j}]: content of type '{kind}' is not supported", param=f"{where}[{j}]")
        pieces.append(str(part.get("text", "")))
    return "".join(pieces)


def input_to_messages(instructions: str | None, items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for `instructions` + Responses input items (messages, function calls and their outputs)."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "developer", "content": instructions})
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(f"{where}.role must be user, assistant, system or developer", param=where)
            messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function"}
            call["function"] = {"name": item["name"], "arguments": item.get("arguments", "{}")}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})
        else:
            raise InvalidRequest(f"{where}: input items of type '{kind}' are not supported", param=where)
    return messages


def response_body(
    rid: str,
    created: int,
    model: str,
    text: str | None,
    calls: list[tuple[str, str, str]],
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    request: dict[str, Any],
) -> dict[str, Any]:
    """A completed (or max_output_tokens-incomplete) Response object; `calls` are (call_id, name, arguments)."""
    output: list[dict[str, Any]] = []
    if text:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        output.append(
            {"type": "message", "id": f"msg_{rid[5:]}", "status": "completed", "role": "assistant", "content": [part]}
        )
    for n, (call_id, name, arguments) in enumerate(calls):
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{rid[5:]}_{n}",
                "call_id": call_id,
                "name": name,
                "arguments": arguments,
                "status": "completed",
            }
        )
    incomplete = finish_reason == "length"
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": "incomplete" if incomplete else "completed",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "temperature": request.get("temperature", 1.0),
        "top_p": request.get("top_p", 1.0),
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools", []),
        "text": request.get("text", {"format": {"type": "text"}}),
        "truncation": "disabled",
        "store": request.get("store", True),
        "metadata": request.get("metadata") or {},
        "usage": {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


_REFUSED = ("background", "reasoning", "conversation", "prompt", "include", "context_management")
_BUILT_IN_TOOLS = ("web_search", "file_search", "computer_use", "code_interpreter", "image_generation", "mcp")


def check_refused(body: dict[str, Any]) -> None:
    """400 naming every field this server refuses: background runs, reasoning, built-in (hosted) tools."""
    names = [name for name in _REFUSED if body.get(name) not in (None, False, [], {})]
    for i, tool in enumerate(body.get("tools") or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            names.append(f"tools[{i}] (type '{kind}')")
    if names:
        raise UnsupportedParameter(
            names[0].split(" ")[0],
            f"Not supported by this server: {', '.join(names)}. Only function tools run here; "
            f"hosted tools ({', '.join(_BUILT_IN_TOOLS)}), background runs and reasoning items do not.",
        )


def text_events(final: dict[str, Any], deltas: list[str]) -> list[dict[str, Any]]:
    """The event sequence for a text-only response (sequence_number from 0), ending in completed/incomplete."""
    start = {**final, "status": "in_progress", "output": [], "incomplete_details": None}
    start.pop("usage")
    message = final["output"][0]
    item_id = message["id"]
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": start},
        {"type": "response.in_progress", "response": start},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**message, "status": "in_progress", "content": []},
        },
        {
            "type": "response.content_part.added",
            "item_id": item_id,
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        },
    ]
    for delta in deltas:
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": delta,
                "logprobs": [],
            }
        )
    text = message["content"][0]["text"]
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events.append({"type": "response.output_text.done", **where, "text": text, "logprobs": []})
    events.append({"type": "response.content_part.done", **where, "part": message["content"][0]})
    events.append({"type": "response.output_item.done", "output_index": 0, "item": message})
    done = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
    events.append({"type": done, "response": final})
    for n, event in enumerate(events):
        event["sequence_number"] = n
    return events


# ---- the front end over the chat path ----


def _tool_to_chat(tool: dict[str, Any]) -> dict[str, Any]:
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": fn}


def _tool_choice_to_chat(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _format_to_chat(text: Any) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_schema":
        inner = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": inner}
    return {"type": fmt.get("type")}


def output_to_input_items(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A stored response's output as input items for the next turn (previous_response_id)."""
    items: list[dict[str, Any]] = []
    for item in response.get("output", []):
        if item.get("type") == "message":
            text = "".join(p.get("text", "") for p in item.get("content", []))
            items.append({"type": "message", "role": "assistant", "content": text})
        elif item.get("type") == "function_call":
            items.append({k: item[k] for k in ("type", "call_id", "name", "arguments")})
    return items


def input_items(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """This request's `input` as a list of items (a string is one user message)."""
    value = raw.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise InvalidRequest("'input' must be a string or a list of items.", param="input")
    return [dict(item) if isinstance(item, dict) else {"type": "invalid"} for item in value]


def to_chat_body(raw: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat-completions body this Responses request runs as (same request path, same engine)."""
    body: dict[str, Any] = {
        "model": raw.get("model"),
        "messages": input_to_messages(raw.get("instructions"), items),
        "stream": bool(raw.get("stream")),
    }
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        if raw.get(ours) is not None:
            body[theirs] = raw[ours]
    if raw.get("user") is not None:
        body["user"] = raw["user"]
    if raw.get("tools"):
        body["tools"] = [_tool_to_chat(t) for t in raw["tools"]]
        if raw.get("tool_choice") is not None:
            body["tool_choice"] = _tool_choice_to_chat(raw["tool_choice"])
        if raw.get("parallel_tool_calls") is not None:
            body["parallel_tool_calls"] = raw["parallel_tool_calls"]
    fmt = _format_to_chat(raw.get("text"))
    if fmt is not None:
        body["response_format"] = fmt
    return body


def response_id(chat_id: str) -> str:
    """OpenAI's response id shape (resp_...) from our generated id."""
    return "resp_" + chat_id.split("-", 1)[-1]


def chat_to_response(chat: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed chat completion as the Response object."""
    choice = chat["choices"][0]
    message = choice["message"]
    calls = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
    usage = chat["usage"]
    return response_body(
        response_id(chat["id"]),
        chat["created"],
        chat["model"],
        message.get("content"),
        calls,
        choice.get("finish_reason") or "stop",
        usage["prompt_tokens"],
        usage["completion_tokens"],
        raw,
    )


class StreamAdapter:
    """Turns the chat path's stream chunks into the Responses event sequence, one chunk at a time."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.seq = 0
        self.rid = ""
        self.created = 0
        self.model = ""
        self.text = ""
        self.message_index: int | None = None
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> output item
        self.next_index = 0
        self.finish = "stop"
        self.final: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return event

    def _skeleton(self) -> dict[str, Any]:
        start = response_body(self.rid, self.created, self.model, None, [], "stop", 0, 0, self.raw)
        start["status"] = "in_progress"
        start.pop("usage")
        return start

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """Events for one chat chunk (or an error body)."""
        if "error" in chunk:
            err = chunk["error"]
            return [self._event("error", code=err.get("code"), message=err.get("message"), param=err.get("param"))]
        out: list[dict[str, Any]] = []
        if not self.rid:
            self.rid, self.created, self.model = response_id(chunk["id"]), chunk["created"], chunk["model"]
            out += [
                self._event("response.created", response=self._skeleton()),
                self._event("response.in_progress", response=self._skeleton()),
            ]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                out += self._call(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        usage = chunk.get("usage")
        if usage is not None:
            out += self._finish(usage["prompt_tokens"], usage["completion_tokens"])
        return out

    def _message_id(self) -> str:
        return f"msg_{self.rid[5:]}"

    def _text(self, text: str) -> list[dict[str, Any]]:
        out = []
        if self.message_index is None:
            self.message_index = self.next_index
            self.next_index += 1
            item = {"type": "message", "id": self._message_id(), "status": "in_progress", "role": "assistant"}
            out.append(
                self._event("response.output_item.added", output_index=self.message_index, item={**item, "content": []})
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(
                self._event(
                    "response.content_part.added",
                    item_id=self._message_id(),
                    output_index=self.message_index,
                    content_index=0,
                    part=part,
                )
            )
        self.text += text
        where = {"item_id": self._message_id(), "output_index": self.message_index, "content_index": 0}
        out.append(self._event("response.output_text.delta", **where, delta=text, logprobs=[]))
        return out

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        index = call.get("index", 0)
        item = self.calls.get(index)
        fn = call.get("function") or {}
        if item is None:
            item = {
                "type": "function_call",
                "id": f"fc_{self.rid[5:]}_{index}",
                "call_id": call.get("id"),
                "name": fn.get("name"),
                "arguments": "",
                "status": "in_progress",
                "output_index": self.next_index,
            }
            self.next_index += 1
            self.calls[index] = item
            shown = {k: v for k, v in item.items() if k != "output_index"}
            out.append(self._event("response.output_item.added", output_index=item["output_index"], item=shown))
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=item["output_index"],
                    delta=fn["arguments"],
                )
            )
        return out

    def _finish(self, prompt_tokens: int, completion_tokens: int) -> list[dict[str, Any]]:
        out = []
        calls = [(c["call_id"], c["name"], c["arguments"]) for c in self.calls.values()]
        final = response_body(
            self.rid, self.created, self.model, self.text or None, calls, self.finish, prompt_tokens,
            completion_tokens, self.raw,
        )  # fmt: skip
        by_id = {item["id"]: item for item in final["output"]}
        if self.message_index is not None:
            message = by_id[self._message_id()]
            where = {"item_id": message["id"], "output_index": self.message_index, "content_index": 0}
            out.append(self._event("response.output_text.done", **where, text=self.text, logprobs=[]))
            out.append(self._event("response.content_part.done", **where, part=message["content"][0]))
            out.append(self._event("response.output_item.done", output_index=self.message_index, item=message))
        for n, call in enumerate(self.calls.values()):
            done = by_id.get(f"fc_{self.rid[5:]}_{n}")
            item = done or {k: v for k, v in call.items() if k != "output_index"}
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=call["id"],
                    name=call["name"],
                    output_index=call["output_index"],
                    arguments=call["arguments"],
                )
            )
            out.append(self._event("response.output_item.done", output_index=call["output_index"], item=item))
        # Output items in the order they were opened.
        order = sorted(
            [(self.message_index, self._message_id())] if self.message_index is not None else [],
        ) + [(c["output_index"], c["id"]) for c in self.calls.values()]
        final["output"] = [by_id[i] for _, i in sorted(order) if i in by_id]
        self.final = final
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        out.append(self._event(kind, response=final))
        return out
