"""The Responses front end (/v1/responses): converts a Responses request into the chat path.

Only the input conversion exists so far; the resource, events and store wiring are still to come.
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
