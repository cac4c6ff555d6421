"""The engine: protocols, admission and request types here; the text layer, structured output and backends below.

Layers, lowest first (each imports only from layers below it; `tests/unit/test_import_layers.py` checks it):
`types` -> `structured/` -> `request` -> `text/` -> `collector`, `engine`, `admission` -> `torch/`, `trtllm/`,
`null/` -> `loader`.
"""
