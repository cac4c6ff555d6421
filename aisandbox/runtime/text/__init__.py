"""Shared by every backend: tokenizers, chat templates, incremental detokenization, stop strings, the text step."""
