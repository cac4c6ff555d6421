"""Structured output: grammars (xgrammar), logprobs, function calling (specs, prompts, grammars, parsers)."""
