"""Fixtures shared by every test tier: a tiny random-weight Mistral, OpenAI's spec, free ports."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC_PATH = REPO.parent / "shared" / "openai-openapi" / "openapi.yaml"


class SharedFileMissing(UserWarning):
    """A file from ../shared is absent (a user's clone): the check that needs it did not run."""


def shared_file(path: Path, what: str) -> Path | None:
    """`path` (a file under ../shared) if it exists.

    Otherwise the calling test goes on with its other assertions and says what it could not check (a warning in
    pytest's summary); under CI=true a missing shared file fails the test instead.
    """
    if path.is_file():
        return path
    message = f"{path} is missing, so {what} was not checked"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true requires ../shared beside the checkout")
    warnings.warn(SharedFileMissing(message), stacklevel=2)
    return None


def mistral_v3_tokenizer_file() -> Path:
    """The v3 tokenizer of Mistral-7B-Instruct-v0.3, as mistral-common ships it."""
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "mistral_instruct_tokenizer_240323.model.v3"


def build_tiny_llama(
    heads: int = 4, hidden_size: int = 64, max_position_embeddings: int = 128, head_dim: int = 16
) -> Any:
    """A tiny random-weight Llama (2 layers, two grouped KV heads of `head_dim`), built in memory, seed 0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def build_tiny_mistral(target: Path, max_position_embeddings: int = 512) -> Path:
    """Save a tiny random-weight MistralForCausalLM with Mistral's v3 tokenizer into `target`."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=32768,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_position_embeddings,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = MistralForCausalLM(config)
    model.save_pretrained(target)
    shutil.copy(mistral_v3_tokenizer_file(), target / "tokenizer.model.v3")
    return target


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Mistral folder (real architecture and tokenizer, seconds to build)."""
    return build_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nullable_to_anyof(node: Any) -> Any:
    """OpenAI's spec says 3.1 but still uses 3.0's `nullable`; turn it into JSON Schema."""
    if isinstance(node, dict):
        node = {k: _nullable_to_anyof(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable_to_anyof(v) for v in node]
    return node


@pytest.fixture(scope="session")
def openapi_validate() -> Callable[[Any, str], None]:
    """validate(body, "CreateChatCompletionResponse") against OpenAI's spec.

    Without the spec (a clone without ../shared) the test still runs every other assertion and warns that the
    bodies were not validated; under CI=true it fails.
    """
    if shared_file(SPEC_PATH, "response bodies against OpenAI's spec") is None:

        def unchecked(body: Any, schema_name: str) -> None:
            assert isinstance(body, dict), body  # the one thing we can still check

        return unchecked
    import jsonschema
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    spec = yaml.load(SPEC_PATH.read_text(), Loader=loader)
    components = _nullable_to_anyof(spec["components"])
    validators: dict[str, Any] = {}

    def validate(body: Any, schema_name: str) -> None:
        if schema_name not in validators:
            root = {"$ref": f"#/components/schemas/{schema_name}", "components": components}
            validators[schema_name] = jsonschema.Draft202012Validator(root)
        validators[schema_name].validate(body)

    return validate
