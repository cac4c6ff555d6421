"""A gunicorn app whose engine dies one second after it is ready (the null backend under the real admission
layer and app): `tests/e2e/test_isolation_http.py` checks that the worker exits and gunicorn starts a new one."""

from __future__ import annotations

import asyncio

from aisandbox.http.app import create_app
from aisandbox.runtime.admission import Admission
from aisandbox.runtime.null.backend import NullBackend
from aisandbox.settings import ServerSettings


class DyingEngine(Admission):
    """Admission over the null backend; the backend reports a failure a second after the model loaded."""

    async def start(self) -> None:
        await super().start()
        self._dying = asyncio.create_task(self._die())

    async def _die(self) -> None:
        await self.wait_ready(120)
        await asyncio.sleep(1.0)
        self.failed("simulated device failure")


settings = ServerSettings()
app = create_app(settings, DyingEngine(NullBackend.from_settings(settings)))
