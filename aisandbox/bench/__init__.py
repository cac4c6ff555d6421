"""Latency benchmark of any OpenAI-compatible endpoint (`aisandbox bench`).

Talks HTTP only and imports nothing from `aisandbox.runtime`; the in-process engine baseline lives in
`aisandbox.local_engine_client`, loaded only for `--engine local`.
"""
