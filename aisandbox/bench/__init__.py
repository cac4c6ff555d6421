"""Latency benchmark of any OpenAI-compatible endpoint (`aisandbox bench`).

Talks HTTP only and imports nothing from `aisandbox.runtime`; the in-process engine baseline lives in
`aisandbox.bench.local_engine`, loaded only for `--engine local`.
"""
