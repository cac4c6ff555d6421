"""Fixtures of the build-engine tests: a tiny Mistral checkpoint, GPU descriptions."""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import pytest


def make_tiny_mistral(path: Path) -> Path:
    """A real (random-weight) 2-layer Mistral checkpoint with Mistral's v3 tokenizer, in `path`."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=32768,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    MistralForCausalLM(config).save_pretrained(path)
    tokenizer = importlib.resources.files("mistral_common") / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    with importlib.resources.as_file(tokenizer) as src:
        shutil.copy(src, path / "tokenizer.model.v3")
    return path


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mistral checkpoint folder, built once per session (do not modify it; copy it)."""
    return make_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))
