"""The admission policy and the drain through the ASGI app in process (tiny Mistral; the null engine where a
stream must outlast the drain)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from falcon.testing import ASGIConductor

from aisandbox.http.app import create_app
from aisandbox.runtime.loader import create_engine
from aisandbox.settings import ServerSettings
from tests.integration.test_app import MODEL, Validate, chat, metric_value, post, sse_events

KEY = {"Authorization": "Bearer s3cret"}


async def _ready(conductor: ASGIConductor) -> None:
    for _ in range(1200):
        if (await conductor.simulate_get("/health")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("engine not ready")


@pytest.fixture
async def keyed(tiny_mistral_dir: Path) -> AsyncIterator[ASGIConductor]:
    settings = ServerSettings(model=tiny_mistral_dir, served_model_name=MODEL, dtype="float32", api_key="s3cret")
    async with ASGIConductor(create_app(settings, create_engine(settings))) as conductor:
        await _ready(conductor)
        yield conductor


@pytest.mark.parametrize("path", ["//v1/models", "/v1//models", "/v1/models/", "///v1/models", "/nope", "//metrics/"])
async def test_auth_by_route_deny_by_default(keyed: ASGIConductor, path: str) -> None:
    resp = await keyed.simulate_get(path)
    expected = 200 if path == "//metrics/" else 401  # /metrics is public unless metrics_require_key
    assert resp.status_code == expected, (path, resp.text)


async def test_doubled_slash_post_needs_the_key(keyed: ASGIConductor, openapi_validate: Validate) -> None:
    resp = await post(keyed, "//v1/chat/completions", json=chat())
    assert resp.status_code == 401 and resp.json is not None and resp.json["error"]["code"] == "invalid_api_key"
    openapi_validate(resp.json, "ErrorResponse")
    ok = await post(keyed, "//v1/chat/completions", json=chat(), headers=KEY)
    assert ok.status_code == 200
    assert (await keyed.simulate_get("/health")).status_code == 200
    text = (await keyed.simulate_get("/metrics")).text
    assert metric_value(text, "aisandbox_requests_refused_total", reason="unauthorized") >= 1


async def test_metrics_behind_the_key_when_asked(tiny_mistral_dir: Path) -> None:
    settings = ServerSettings(model=tiny_mistral_dir, api_key="s3cret", metrics_require_key=True)
    async with ASGIConductor(create_app(settings, create_engine(settings))) as conductor:
        assert (await conductor.simulate_get("/metrics")).status_code == 401
        assert (await conductor.simulate_get("/metrics", headers=KEY)).status_code == 200
        assert (await conductor.simulate_get("/health")).status_code in (200, 503)


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"prompt": [[1, 2]] * 300}, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"], "n": 4}, "prompt"),
        ("/v1/chat/completions", {"stop_token_ids": [1_000_000_000]}, "stop_token_ids"),
        ("/v1/chat/completions", {"logit_bias": {"99999": 1}}, "logit_bias"),
        ("/v1/chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/chat/completions", {"guided_regex": "a" * 200}, "guided_regex"),
    ],
)
async def test_caps_are_400_naming_the_field(
    tiny_mistral_dir: Path, path: str, extra: dict[str, Any], param: str
) -> None:
    settings = ServerSettings(
        model=tiny_mistral_dir, served_model_name=MODEL, dtype="float32", max_n=4, max_sequences_per_request=4,
        max_grammar_bytes=100,
    )  # fmt: skip
    async with ASGIConductor(create_app(settings, create_engine(settings))) as conductor:
        await _ready(conductor)
        body = {"model": MODEL, "max_tokens": 2, **extra}
        if path.endswith("/chat/completions"):
            body["messages"] = [{"role": "user", "content": "hi"}]
        resp = await post(conductor, path, json=body)
        assert resp.status_code == 400 and resp.json is not None, resp.text
        assert resp.json["error"]["param"] == param
        text = (await conductor.simulate_get("/metrics")).text
        reasons = [line for line in text.splitlines() if line.startswith("aisandbox_requests_refused_total{")]
        assert len(reasons) == 1 and param.split(".")[0] in reasons[0] and reasons[0].endswith(" 1.0")


async def test_tiny_temperature_is_greedy(tiny_mistral_dir: Path) -> None:
    settings = ServerSettings(model=tiny_mistral_dir, served_model_name=MODEL, dtype="float32")
    async with ASGIConductor(create_app(settings, create_engine(settings))) as conductor:
        await _ready(conductor)
        replies = [
            await post(conductor, "/v1/chat/completions", json=chat(temperature=t, max_tokens=12, ignore_eos=True))
            for t in (1e-40, 0.0)
        ]
        assert all(r.status_code == 200 and r.json is not None for r in replies)
        texts = [r.json["choices"][0]["message"]["content"] for r in replies if r.json is not None]
        assert texts[0] == texts[1]


async def test_drain_ends_long_streams_with_an_error_event(tiny_mistral_dir: Path, openapi_validate: Validate) -> None:
    settings = ServerSettings(
        model=tiny_mistral_dir, served_model_name=MODEL, null_engine=True, null_engine_step_ms=20,
        drain_timeout_s=0.5,
    )  # fmt: skip
    app = create_app(settings, create_engine(settings))
    async with ASGIConductor(app) as conductor:
        await _ready(conductor)
        long = chat(stream=True, max_tokens=5000)
        streams = [asyncio.create_task(post(conductor, "/v1/chat/completions", json=long)) for _ in range(2)]
        plain = asyncio.create_task(post(conductor, "/v1/chat/completions", json=chat(max_tokens=5000)))
        short = asyncio.create_task(post(conductor, "/v1/chat/completions", json=chat(stream=True, max_tokens=5)))
        await asyncio.sleep(0.3)
        drained = asyncio.create_task(app.lifecycle.drain())
        await asyncio.sleep(0.05)
        health = await conductor.simulate_get("/health")
        assert health.status_code == 503 and health.json["status"] == "draining"
        refused = await post(conductor, "/v1/chat/completions", json=chat())
        assert refused.status_code == 503 and refused.json is not None
        assert refused.json["error"]["code"] == "server_shutting_down"
        await asyncio.wait_for(drained, 10)
        for reply in await asyncio.gather(*streams):
            events = sse_events(reply.text)
            assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutting_down"
            openapi_validate(events[-2], "ErrorResponse")
        assert (await short).text.rstrip().endswith("data: [DONE]")
        assert "error" not in (await short).text  # finished inside the drain time
        cut = await plain
        assert cut.status_code == 503 and cut.json is not None and cut.json["error"]["code"] == "server_shutting_down"
        text = (await conductor.simulate_get("/metrics")).text
        assert metric_value(text, "aisandbox_requests_refused_total", reason="draining") == 4
