"""Tokenizers and chat templates shared by every backend.

Two implementations behind one protocol: Hugging Face tokenizers with their own Jinja chat template, and
Mistral's `mistral-common` tokenizer (the reference chat encoding of Mistral-7B-Instruct-v0.3), picked by the
files a model folder holds, as vLLM's `tokenizer_mode=auto|mistral|hf` does.

Function calling, by tokenizer kind (`Tokenizer.tool_prompt`):

- `mistral-common`: mistral-common's own encoding (`[AVAILABLE_TOOLS]`, `[TOOL_CALLS]`, `[TOOL_RESULTS]`), with
  client tool-call ids mapped to Mistral's 9-character ids. Calls come back as `[TOOL_CALLS]` + JSON list.
- `template`: a Hugging Face chat template that takes `tools` gets them; calls come back in the format the
  template teaches (`[TOOL_CALLS]` for Mistral's own templates, `<tool_call>` for Hermes/Qwen ones).
- `fallback`: any other chat template: the tool list and a calling instruction join the system prompt, and
  calls use the `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` wrapper
  (`aisandbox.runtime.structured.tools.specs.fallback_messages`).
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from aisandbox.errors import InvalidRequest, UnsupportedParameter
from aisandbox.runtime.structured.tools.specs import (
    FALLBACK_CALL_OPEN,
    MistralIdMap,
    ToolCall,
    ToolFormat,
    ToolRequest,
    fallback_messages,
)
from aisandbox.runtime.types import TokenVocab

__all__ = [
    "ByteTable",
    "ChatMessage",
    "HFTokenizer",
    "MistralCommonTokenizer",
    "TokenVocab",
    "Tokenizer",
    "TokenizerMode",
    "load_tokenizer",
]

log = logging.getLogger(__name__)

TokenizerMode = Literal["auto", "hf", "mistral"]

ChatMessage = Mapping[str, Any]
"""One chat message: {"role": str, "content": str, ...}, content already flattened to text; assistant messages
may carry `tool_calls` (a sequence of `ToolCall`), tool messages `tool_call_id` and `name`
(see `aisandbox.runtime.structured.tools.specs`)."""

ToolPrompt = Literal["mistral-common", "template", "fallback"]
"""How a tokenizer puts tools into the prompt (see the module docstring)."""

_TOOL_CALLS_TOKEN = "[TOOL_CALLS]"

# Files that mark a Mistral-format tokenizer, most specific first.
_MISTRAL_FILES = ("tekken.json", "tokenizer.model.v7m1", "tokenizer.model.v7", "tokenizer.model.v3")


class Tokenizer(Protocol):
    """Text <-> token ids, plus the model's chat encoding."""

    eos_token_ids: tuple[int, ...]
    vocab_size: int
    tool_prompt: ToolPrompt
    """How tools reach the prompt."""
    tool_format: ToolFormat
    """How the model writes its calls, so which parser reads them."""
    tool_call_token_id: int | None
    """The `[TOOL_CALLS]` control token id, for the `mistral` format (detected by id, never by text)."""

    def encode(self, text: str) -> list[int]:
        """Encode a completion prompt, with the model's BOS where it uses one."""

    def encode_fragment(self, text: str) -> list[int]:
        """Encode text to append to a prompt: no BOS, no EOS."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """Decode ids to text, skipping special tokens."""

    def encode_chat(self, messages: Sequence[ChatMessage], tools: ToolRequest | None = None) -> list[int]:
        """Encode a conversation ending with the assistant's turn to generate.

        Args:
            messages: The conversation; earlier tool calls and tool results included.
            tools: The request's tools and tool choice; None (or choice `none`) puts no tools in the prompt.
        """

    def byte_table(self) -> ByteTable | None:
        """Each token id's bytes, for fast incremental detokenization; None when this tokenizer's kind is unknown."""

    def vocab_for_grammar(self) -> TokenVocab:
        """Every token id's bytes and the special ids (computed once, then cached)."""


@dataclass(frozen=True, slots=True)
class ByteTable:
    """The bytes each token id decodes to, checked against the tokenizer's own `decode` at load.

    Incremental detokenization then costs a list lookup and an incremental UTF-8 decode per token, instead of
    decoding a window of tokens twice (the Python tokenizer calls that dominated the per-token cost).
    """

    pieces: tuple[bytes, ...]
    """pieces[id]: the token's bytes; b"" for special tokens, which `decode` skips."""
    strip_first_space: bool = False
    """SentencePiece drops the leading space of the first piece of a text (its dummy prefix)."""

    @property
    def max_token_bytes(self) -> int:
        """The most bytes any one token stands for: a text of B bytes needs at least B / this many tokens."""
        return max((len(p) for p in self.pieces), default=1) or 1

    def text(self, token_ids: Sequence[int]) -> str:
        """Decode ids as the tokenizer would (used to check the table)."""
        data = b"".join(self.pieces[i] if 0 <= i < len(self.pieces) else b"" for i in token_ids)
        out = data.decode("utf-8", errors="replace")
        return out[1:] if self.strip_first_space and out.startswith(" ") else out


# Texts that exercise multi-byte characters, spaces and newlines: the table must decode them as `decode` does.
_CHECK_TEXTS = (
    "Hello world, how are you? 1234",
    "Emoji: 😀👍🏽 and a family 👨‍👩‍👧 here.",
    "中文测试：你好，世界！日本語もね。한국어도",
    '  leading spaces and\nnew lines\n\n\tindented {"json": [1, 2]}',
    "Mixed ünïcödé — dashes… and “quotes” 🚀",
)


def _checked(tokenizer: Tokenizer, table: ByteTable) -> ByteTable | None:
    """The table if it decodes the check texts exactly as the tokenizer does, else None (logged)."""
    for text in _CHECK_TEXTS:
        ids = tokenizer.encode(text)
        if table.text(ids) != tokenizer.decode(ids):
            log.warning("token byte table disagrees with decode on %r; using window detokenization", text)
            return None
        # Mid-sequence, SentencePiece keeps every space: compare what follows the first real token.
        body = [i for i in ids if table.pieces[i]]
        if len(body) > 1:
            head, full = tokenizer.decode(body[:1]), tokenizer.decode(body)
            plain = b"".join(table.pieces[i] for i in body[1:]).decode("utf-8", errors="replace")
            if full.startswith(head) and full[len(head) :] != plain:
                log.warning("token byte table disagrees mid-text on %r; using window detokenization", text)
                return None
    return table


class HFTokenizer:
    """A Hugging Face tokenizer and its Jinja chat template."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path))
        eos: set[int] = set()
        if self._tok.eos_token_id is not None:
            eos.add(int(self._tok.eos_token_id))
        gen_cfg = Path(path) / "generation_config.json"
        if gen_cfg.is_file():
            import json

            value = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos.update(value if isinstance(value, list) else [value] if value is not None else [])
        self.eos_token_ids = tuple(sorted(eos))
        self.vocab_size = len(self._tok)
        self._bos = self._tok.bos_token if self._tok.bos_token and self._adds_bos() else None
        self.tool_prompt, self.tool_format, self.tool_call_token_id = self._tool_support()

    def _tool_support(self) -> tuple[ToolPrompt, ToolFormat, int | None]:
        """Read the chat template: does it take `tools`, and which call format does it teach?"""
        template = self._tok.chat_template
        source = template if isinstance(template, str) else "\n".join(map(str, dict(template or {}).values()))
        if "tools" not in source:
            return "fallback", "hermes", None
        if _TOOL_CALLS_TOKEN in source:
            token_id = self._tok.convert_tokens_to_ids(_TOOL_CALLS_TOKEN)
            if isinstance(token_id, int) and token_id != self._tok.unk_token_id:
                return "template", "mistral", token_id
        if FALLBACK_CALL_OPEN in source:
            if FALLBACK_CALL_OPEN in (self._tok.all_special_tokens or ()):
                # decode() skips special tokens, so the text parser would never see the wrapper (known limit:
                # Qwen and Hermes ship it as a normal added token).
                log.warning("%s is a special token: tool calls will not be recognised", FALLBACK_CALL_OPEN)
            return "template", "hermes", None
        # A template that takes tools but teaches a call format no parser here reads (Llama 3.1's bare JSON,
        # for one): use the documented fallback instead, so the calls it asks for can be parsed.
        return "fallback", "hermes", None

    def vocab_for_grammar(self) -> TokenVocab:
        vocab: TokenVocab | None = getattr(self, "_vocab", None)
        if vocab is None:
            vocab = self._vocab = _hf_vocab(self._tok)
        return vocab

    def _adds_bos(self) -> bool:
        ids = self._tok.encode("a", add_special_tokens=True)
        return bool(ids) and ids[0] == self._tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def encode_fragment(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))

    def _template_messages(self, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        """Messages for a template that takes tools: calls as dicts, Mistral ids where the format needs them."""
        ids = MistralIdMap() if self.tool_format == "mistral" else None
        out = []
        for m in messages:
            item = {k: v for k, v in m.items() if k != "tool_calls"}
            if m.get("tool_calls"):
                item["tool_calls"] = [
                    {
                        "id": ids.to_mistral(c.id) if ids is not None else c.id,
                        "type": "function",
                        # Templates index into the arguments, so they get a dict where the JSON is one.
                        "function": {"name": c.name, "arguments": c.arguments()},
                    }
                    for c in m["tool_calls"]
                ]
            if m.get("role") == "tool" and ids is not None and m.get("tool_call_id") is not None:
                item["tool_call_id"] = ids.to_mistral(str(m["tool_call_id"]))
            out.append(item)
        return out

    def encode_chat(self, messages: Sequence[ChatMessage], tools: ToolRequest | None = None) -> list[int]:
        if not self._tok.chat_template:
            raise InvalidRequest(
                "This model has no chat template; use /v1/completions.", param="messages", code="invalid_value"
            )
        kwargs: dict[str, Any] = {}
        if self.tool_prompt == "template":
            chat = self._template_messages(messages)
            prompt_tools = tools.prompt_tools if tools is not None else ()
            if prompt_tools:
                kwargs["tools"] = [t.to_openai() for t in prompt_tools]
        else:
            chat = fallback_messages(messages, tools)
        text = self._render(chat, kwargs)
        special = self._special_pattern()
        if special is not None and any(special.search(t) for t in _strings((chat, kwargs))):
            return self._encode_user_text(chat, kwargs, special)
        # The template already holds the special tokens (BOS included), as vLLM encodes it.
        return list(self._tok.encode(text, add_special_tokens=False))

    def _render(self, chat: list[dict[str, Any]], kwargs: dict[str, Any]) -> str:
        try:
            text = self._tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception as exc:  # Jinja templates raise their own errors for unsupported conversations.
            raise InvalidRequest(f"The chat template rejected the messages: {exc}", param="messages") from exc
        return str(text)

    def _special_pattern(self) -> re.Pattern[str] | None:
        """A regex of every special token's text, longest first; None when the tokenizer has none."""
        if not hasattr(self, "_special_re"):
            texts = {
                str(added.content)
                for added in getattr(self._tok, "added_tokens_decoder", {}).values()
                if getattr(added, "special", False) and str(added.content)
            }
            texts.update(str(t) for t in (self._tok.all_special_tokens or ()) if t)
            ordered = sorted(texts, key=len, reverse=True)
            self._special_re = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        return self._special_re

    def _encode_user_text(
        self, chat: list[dict[str, Any]], kwargs: dict[str, Any], special: re.Pattern[str]
    ) -> list[int]:
        """Encode a conversation whose client text holds special-token strings: those stay text.

        Every special-token string in the client's data (message content, tool calls, tool definitions) is
        swapped for a random ASCII marker before the template renders, so every special token left in the
        rendering is the template's own. The markers then go back to their text as spans that are tokenized
        with special-token matching off; everything else is tokenized as the tokenizer always does (it splits at
        special tokens anyway), so a text that holds none is encoded as before.

        Raises:
            InvalidRequest: The template changed a marker (it transforms the text it renders), so the text
                could not be kept as text.
        """
        nonce = secrets.token_hex(8)
        hidden: list[str] = []

        def hide(match: re.Match[str]) -> str:
            hidden.append(match.group())
            return f"[[{nonce}:{len(hidden) - 1}]]"

        rendered = self._render(_replace_strings(chat, special, hide), _replace_strings(kwargs, special, hide))
        parts = re.split(rf"\[\[{nonce}:(\d+)\]\]", rendered)
        if len(parts) // 2 != len(hidden) or nonce in "".join(parts[::2]):
            raise InvalidRequest(
                "This model's chat template transforms message text, so special-token text in the messages "
                "cannot be kept as plain text; remove it.",
                param="messages",
            )
        full, spans = "", []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                full += part
            else:
                start = len(full)
                full += hidden[int(part)]
                spans.append((start, len(full)))
        ids: list[int] = []
        at = 0
        for match in special.finditer(full):
            start, end = match.span()
            if any(s < end and start < e for s, e in spans):
                continue  # the client's text: stays text
            ids += self._tok.encode(full[at:start], add_special_tokens=False, split_special_tokens=True)
            ids.append(int(self._tok.convert_tokens_to_ids(match.group())))  # type: ignore[arg-type]  # one token: one id
            at = end
        ids += self._tok.encode(full[at:], add_special_tokens=False, split_special_tokens=True)
        return ids

    def byte_table(self) -> ByteTable | None:
        if not hasattr(self, "_byte_table"):
            self._byte_table = self._build_byte_table()
        return self._byte_table

    def _build_byte_table(self) -> ByteTable | None:
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is None:
            return None
        import json

        spec = json.loads(backend.to_str())
        decoder = spec.get("decoder") or {}
        steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        kinds = {step.get("type") for step in steps}
        size = max(len(self._tok), backend.get_vocab_size(with_added_tokens=True))
        pieces: list[bytes] = [b""] * size
        if kinds == {"ByteLevel"}:
            byte_of = _byte_level_decoder()

            def piece_bytes(piece: str) -> bytes:
                return bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece) else piece.encode()

            strip = False
        elif kinds <= {"Replace", "ByteFallback", "Fuse", "Strip"} and "Replace" in kinds:
            piece_bytes = _sentencepiece_bytes
            strip = any(step.get("type") == "Strip" and step.get("start") for step in steps)
        else:
            return None
        for piece, token_id in backend.get_vocab(with_added_tokens=False).items():
            pieces[token_id] = piece_bytes(piece)
        for added in spec.get("added_tokens", []):
            pieces[added["id"]] = b"" if added.get("special") else added["content"].encode()
        return _checked(self, ByteTable(tuple(pieces), strip))


class MistralCommonTokenizer:
    """Mistral's tokenizer and chat encoding from `mistral-common`."""

    def __init__(self, tokenizer_file: str | Path) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self._mt = MistralTokenizer.from_file(str(tokenizer_file))
        self._inner = self._mt.instruct_tokenizer.tokenizer
        self.eos_token_ids: tuple[int, ...] = (int(self._inner.eos_id),)
        self.vocab_size = int(self._inner.n_words)
        self.tool_prompt: ToolPrompt = "mistral-common"
        self.tool_format: ToolFormat = "mistral"
        self.tool_call_token_id: int | None = self._special_id(_TOOL_CALLS_TOKEN)
        validator = getattr(self._mt, "_chat_completion_request_validator", None)
        # v3 refuses an assistant message with both text and calls; v7 and later (validator V5+) accept it.
        self._calls_with_content = bool(getattr(validator, "_allow_tool_call_and_content", False))

    def _special_id(self, piece: str) -> int | None:
        try:
            return int(self._inner.get_special_token(piece))
        except Exception:  # tokenizers before v2 have no tool tokens
            return None

    def encode(self, text: str) -> list[int]:
        return list(self._inner.encode(text, bos=True, eos=False))

    def encode_fragment(self, text: str) -> list[int]:
        return list(self._inner.encode(text, bos=False, eos=False))

    def vocab_for_grammar(self) -> TokenVocab:
        vocab: TokenVocab | None = getattr(self, "_vocab", None)
        if vocab is None:
            vocab = self._vocab = _mistral_vocab(self._inner)
        return vocab

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._inner.decode(list(token_ids)))

    def _mistral_messages(self, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        """Messages in mistral-common's shape, with every tool-call id mapped to a 9-character one."""
        ids = MistralIdMap()
        out = []
        for m in messages:
            item = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id", "name")}
            calls: Sequence[ToolCall] = m.get("tool_calls") or ()
            if calls:
                item["tool_calls"] = [
                    {
                        "id": ids.to_mistral(c.id),
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments_json},
                    }
                    for c in calls
                ]
                if not self._calls_with_content:
                    # The v3 format has no place for text next to calls (the model writes one or the other).
                    item["content"] = None
            if m.get("role") == "tool":
                if m.get("tool_call_id") is not None:
                    item["tool_call_id"] = ids.to_mistral(str(m["tool_call_id"]))
                if m.get("name"):
                    item["name"] = m["name"]
            out.append(item)
        return out

    def encode_chat(self, messages: Sequence[ChatMessage], tools: ToolRequest | None = None) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        prompt_tools = tools.prompt_tools if tools is not None else ()
        if prompt_tools and self.tool_call_token_id is None:
            raise UnsupportedParameter("tools", "This model's tokenizer has no function-calling tokens.")
        body: dict[str, Any] = {"messages": self._mistral_messages(messages)}
        if prompt_tools:
            body["tools"] = [t.to_openai() for t in prompt_tools]
        try:
            request: Any = ChatCompletionRequest.model_validate(body)  # generic in its message types
            return list(self._mt.encode_chat_completion(request).tokens)
        except MistralCommonException as exc:
            raise InvalidRequest(f"Invalid conversation: {exc}", param="messages") from exc
        except ValueError as exc:  # pydantic validation of the messages
            raise InvalidRequest(f"Invalid conversation: {exc}", param="messages") from exc

    def byte_table(self) -> ByteTable | None:
        if not hasattr(self, "_byte_table"):
            self._byte_table = self._build_byte_table()
        return self._byte_table

    def _build_byte_table(self) -> ByteTable | None:
        inner: Any = self._inner
        pieces: list[bytes] = []
        if hasattr(inner, "id_to_byte_piece"):  # tekken
            pieces = [bytes(inner.id_to_byte_piece(i)) for i in range(self.vocab_size)]
            return _checked(self, ByteTable(tuple(pieces)))
        sp = getattr(inner, "_model", None)
        if sp is None or not hasattr(sp, "is_control"):
            return None
        for i in range(self.vocab_size):
            if sp.is_control(i):
                pieces.append(b"")
            elif sp.is_unknown(i):
                pieces.append(" \u2047 ".encode())
            else:
                pieces.append(_sentencepiece_bytes(sp.id_to_piece(i)))
        return _checked(self, ByteTable(tuple(pieces), strip_first_space=True))


def _strings(value: Any) -> Iterator[str]:
    """Every string inside nested dicts, lists and tuples."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _replace_strings(value: Any, pattern: re.Pattern[str], repl: Callable[[re.Match[str]], str]) -> Any:
    """`value` with `pattern` replaced in every string inside nested dicts, lists and tuples."""
    if isinstance(value, str):
        return pattern.sub(repl, value)
    if isinstance(value, dict):
        return {k: _replace_strings(v, pattern, repl) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replace_strings(v, pattern, repl) for v in value]
    return value


def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode map (byte-level BPE writes byte b as this character)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


def _sentencepiece_bytes(piece: str) -> bytes:
    """A SentencePiece piece as bytes: <0xNN> is one byte, "\u2581" is a space."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode("utf-8")


def _hf_vocab(tok: Any) -> TokenVocab:
    """Decode a Hugging Face vocabulary: byte-level BPE, SentencePiece byte-fallback or raw strings."""
    vocab: dict[str, int] = tok.get_vocab()
    size = max(len(vocab), max(vocab.values()) + 1)
    names = [""] * size
    for name, idx in vocab.items():
        names[idx] = name
    special = set(int(i) for i in tok.all_special_ids)
    for idx, added in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(idx))
    byte_level = _byte_level_decoder()
    if "<0x0A>" in vocab:
        kind = "sentencepiece"
    elif all(ch in byte_level for ch in "".join(n for i, n in enumerate(names) if i not in special)):
        kind = "byte_level"
    else:
        kind = "raw"

    def decode(name: str) -> bytes:
        if kind == "sentencepiece":
            return _sentencepiece_bytes(name)
        if kind == "byte_level":
            return bytes(byte_level[ch] for ch in name)
        return name.encode("utf-8")

    pieces = tuple(name.encode("utf-8") if i in special else decode(name) for i, name in enumerate(names))
    return TokenVocab(pieces, frozenset(special))


def _mistral_vocab(inner: Any) -> TokenVocab:
    """Decode a mistral-common vocabulary: Tekken (tiktoken bytes) or SentencePiece (byte fallback)."""
    special = frozenset(int(i) for i in inner.special_ids)
    n = int(inner.n_words)
    if hasattr(inner, "id_to_byte_piece"):  # Tekken
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        pieces = tuple(bytes(inner.id_to_byte_piece(i, SpecialTokenPolicy.KEEP)) for i in range(n))
        return TokenVocab(pieces, special)
    names = inner.vocab()
    unk = int(inner.unk_id) if getattr(inner, "unk_id", -1) is not None else -1
    special = special | ({unk} if unk >= 0 else set())
    pieces = tuple(names[i].encode("utf-8") if i in special else _sentencepiece_bytes(names[i]) for i in range(n))
    return TokenVocab(pieces, special)


def find_mistral_tokenizer_file(path: str | Path) -> Path | None:
    """Return the Mistral-format tokenizer file in a model folder, if it has one."""
    for name in _MISTRAL_FILES:
        candidate = Path(path) / name
        if candidate.is_file():
            return candidate
    return None


def load_tokenizer(path: str | Path, mode: TokenizerMode = "auto") -> Tokenizer:
    """Load the tokenizer of a model folder.

    Args:
        path: A Hugging Face model folder, or a TensorRT-LLM engine folder with the tokenizer copied in.
        mode: `mistral` forces mistral-common, `hf` forces Hugging Face, `auto` prefers mistral-common where
            the folder holds a Mistral tokenizer file (tekken.json or tokenizer.model.v*).
    """
    mistral_file = find_mistral_tokenizer_file(path)
    if mode == "mistral" or (mode == "auto" and mistral_file is not None):
        if mistral_file is None:
            raise FileNotFoundError(f"no Mistral tokenizer file ({', '.join(_MISTRAL_FILES)}) in {path}")
        log.info("tokenizer: mistral-common from %s", mistral_file)
        return MistralCommonTokenizer(mistral_file)
    log.info("tokenizer: Hugging Face from %s", path)
    return HFTokenizer(path)
