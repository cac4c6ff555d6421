"""Fixtures of the benchmark's unit tests: fake OpenAI-compatible servers on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer

import pytest
from fake_openai_server import FakeConfig, FakeServer, start_fake_server


@pytest.fixture
def fake_server_factory() -> Iterator[Callable[[FakeConfig], FakeServer]]:
    """Start fake servers on free loopback ports; all are stopped after the test."""
    servers: list[ThreadingHTTPServer] = []

    def start(config: FakeConfig) -> FakeServer:
        server, fake = start_fake_server(config)
        servers.append(server)
        return fake

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fake_server(fake_server_factory: Callable[[FakeConfig], FakeServer]) -> FakeServer:
    """A well-behaved fake server."""
    return fake_server_factory(FakeConfig())
