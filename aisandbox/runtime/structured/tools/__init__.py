"""Function calling: tool specs and prompts, call grammars, output parsers, and the per-request plan."""
