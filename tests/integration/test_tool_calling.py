"""Function calling end to end below HTTP: prompt with tools -> grammar-masked greedy decoding of a real model
-> the per-sequence tool text state -> OpenAI response bodies.

The decoding loop here is a stand-in for the engine's guided decoding (issue 9): plain transformers forward
passes with xgrammar's token bitmask applied to the logits. It shows that the pieces of issue 10 compose: the
tiny random-weight Mistral (mistral-common v3 tokenizer) is forced into a valid call, and so is the default
SmolLM2-135M-Instruct (slow).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from aisandbox.http.schemas import ChatCompletionRequest, chat_chunk, chat_deltas, chat_response, usage
from aisandbox.runtime.structured.grammar import grammar_compiler
from aisandbox.runtime.structured.tools.parsers import ToolEvent
from aisandbox.runtime.structured.tools.plan import ToolTextEnd, plan_tools
from aisandbox.runtime.text.detokenizer import IncrementalDetokenizer
from aisandbox.runtime.text.tokenizer import HFTokenizer, MistralCommonTokenizer, Tokenizer, load_tokenizer
from aisandbox.runtime.types import FinishReason

xgr = pytest.importorskip("xgrammar")
torch = pytest.importorskip("torch")

Validate = Callable[[Any, str], None]

UNITS = {
    "type": "function",
    "function": {
        "name": "set_units",
        "description": "Choose the units",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "metric": {"type": "boolean"}},
            "required": ["unit", "metric"],
            "additionalProperties": False,
        },
    },
}
LIGHTS = {
    "type": "function",
    "function": {
        "name": "lights",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}},
            "required": ["on"],
            "additionalProperties": False,
        },
    },
}


def body(tool_choice: Any, parallel: bool = False) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Switch to Fahrenheit, please."}],
            "tools": [UNITS, LIGHTS],
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel,
        }
    )


def tokenizer_info(tok: Tokenizer) -> Any:
    if isinstance(tok, MistralCommonTokenizer):
        model = tok._inner._model
        vocab = [model.id_to_piece(i) for i in range(tok.vocab_size)]
        return xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_FALLBACK, stop_token_ids=list(tok.eos_token_ids))
    assert isinstance(tok, HFTokenizer)
    return xgr.TokenizerInfo.from_huggingface(tok._tok, stop_token_ids=list(tok.eos_token_ids))


def generate(
    model: Any, tok: Tokenizer, request: ChatCompletionRequest, max_new: int = 120
) -> tuple[list[ToolEvent], str, ToolTextEnd, dict[str, float]]:
    """Greedy decoding under the plan's grammar, through the tool text state, as the engine would run it."""
    tools = request.tool_request()
    prompt = tok.encode_chat(request.conversation(with_tools=True), tools)
    plan = plan_tools(tok, tools)
    assert plan is not None and plan.grammar is not None
    prompt = [*prompt, *plan.prompt_suffix]  # a forced Mistral call: [TOOL_CALLS] ends the prompt
    timings: dict[str, float] = {}
    width = max(int(model.config.vocab_size), tok.vocab_size)
    t0 = time.perf_counter()
    compiled = grammar_compiler(tok, width, tok.eos_token_ids).compile(plan.grammar)  # as the engine compiles it
    timings["compile_s"] = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled.compiled)
    bitmask = xgr.allocate_token_bitmask(1, width)
    text_state = plan.new_text(IncrementalDetokenizer(tok, prompt), guided=True)
    events: list[ToolEvent] = []
    content = ""
    ids, past = torch.tensor([prompt]), None
    mask_s = 0.0
    steps = 0
    reason = FinishReason.LENGTH
    with torch.no_grad():
        for steps in range(1, max_new + 1):  # noqa: B007 - steps is read after the loop
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            t1 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            mask_s += time.perf_counter() - t1
            token = int(logits.argmax(-1))
            assert matcher.accept_token(token)
            if token in tok.eos_token_ids:
                reason = FinishReason.STOP
                break
            text, calls = text_state.add([token])
            content += text
            events += calls
            ids = torch.tensor([[token]])
    end = text_state.finish(reason)
    timings["mask_s_per_token"] = mask_s / steps
    return [*events, *end.events], content + end.text, end, timings


def check_responses(openapi_validate: Validate, events: list[ToolEvent], end: ToolTextEnd) -> None:
    response = chat_response("chatcmpl-1", 1, "m", [(end.content, end.finish_reason.value)], usage(1, 1), [end.calls])
    openapi_validate(response, "CreateChatCompletionResponse")
    for delta in chat_deltas(events):
        openapi_validate(chat_chunk("chatcmpl-1", 1, "m", 0, delta, None), "CreateChatCompletionStreamResponse")


@pytest.fixture(scope="module")
def tiny_mistral(tiny_mistral_dir: Path) -> tuple[Any, Tokenizer]:
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(tiny_mistral_dir).eval(), load_tokenizer(tiny_mistral_dir)


def test_tiny_mistral_prompt_holds_the_tool_tokens(tiny_mistral: tuple[Any, Tokenizer]) -> None:
    _, tok = tiny_mistral
    request = body("auto")
    prompt = tok.encode_chat(request.conversation(with_tools=True), request.tool_request())
    assert tok.tool_prompt == "mistral-common"
    assert 6 in prompt and 7 in prompt  # [AVAILABLE_TOOLS] [/AVAILABLE_TOOLS]


@pytest.mark.parametrize(
    ("choice", "names"),
    [("required", {"set_units", "lights"}), ({"type": "function", "function": {"name": "lights"}}, {"lights"})],
)
def test_tiny_mistral_forced_call_parses(
    tiny_mistral: tuple[Any, Tokenizer], openapi_validate: Validate, choice: Any, names: set[str]
) -> None:
    model, tok = tiny_mistral
    events, content, end, _ = generate(model, tok, body(choice))
    assert end.finish_reason is FinishReason.TOOL_CALLS and not end.malformed
    assert len(end.calls) == 1 and end.calls[0].name in names and end.calls[0].id.startswith("call_")
    schema = (UNITS if end.calls[0].name == "set_units" else LIGHTS)["function"]["parameters"]
    jsonschema.validate(json.loads(end.calls[0].arguments_json), schema)
    assert content == "" and end.content is None
    check_responses(openapi_validate, events, end)


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_units"}}])
def test_default_model_forced_call_parses(openapi_validate: Validate, choice: Any) -> None:
    """SmolLM2-135M-Instruct (fallback prompt, Hermes wrapper) makes a valid call under the grammar."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from tests.conftest import REPO

    done = subprocess.run(
        [sys.executable, "-m", "aisandbox", "prepare-model"], cwd=REPO, capture_output=True, text=True, check=True
    )
    path = Path(done.stdout.strip().splitlines()[-1])
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    events, content, end, timings = generate(model, tok, body(choice))
    print(f"grammar compile {timings['compile_s'] * 1000:.1f} ms; mask {timings['mask_s_per_token'] * 1000:.2f} ms")
    assert end.finish_reason is FinishReason.TOOL_CALLS and not end.malformed, end
    assert len(end.calls) == 1
    jsonschema.validate(json.loads(end.calls[0].arguments_json), UNITS["function"]["parameters"])
    assert content == "" and end.content is None  # a forced call ends at the call
    check_responses(openapi_validate, events, end)
