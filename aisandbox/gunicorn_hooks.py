"""gunicorn server hooks (`-c python:aisandbox.gunicorn_hooks`): one GPU per worker; and the worker class
(`aisandbox.gunicorn_hooks.Worker`) that drains on SIGTERM and exits when its engine dies.

With `--workers N` on an N-GPU host every worker would otherwise load its engine onto GPU 0. The master
gives each worker the lowest free slot (a restarted worker takes its predecessor's), and the worker narrows
CUDA_VISIBLE_DEVICES to that one device before its engine starts in the ASGI lifespan. Slots are NVML indices,
which match CUDA's because `aisandbox serve` sets CUDA_DEVICE_ORDER=PCI_BUS_ID.

This mode is for single-GPU engines only: a tensor-parallel engine is served by one worker that sees all of its
GPUs, and `aisandbox serve` refuses `--workers` > 1 with one (`aisandbox.serve.check_gpu_mode`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn.config import Config
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

PIN_ENV = "AISANDBOX_PIN_GPUS"


def pre_fork(server: Any, worker: Any) -> None:
    """In the master: give the new worker the lowest slot no live worker holds."""
    taken = {getattr(w, "aisandbox_slot", None) for w in server.WORKERS.values()}
    worker.aisandbox_slot = next(i for i in range(len(taken) + 1) if i not in taken)


def post_fork(server: Any, worker: Any) -> None:
    """In the worker: see only the slot's GPU (an index into any CUDA_VISIBLE_DEVICES already set)."""
    if os.environ.get(PIN_ENV) != "1":
        return
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    slot = int(getattr(worker, "aisandbox_slot", 0))
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[slot % len(visible)] if visible else str(slot)
    server.log.info("worker %s pinned to GPU %s", worker.pid, os.environ["CUDA_VISIBLE_DEVICES"])


class Worker(UvicornWorker):  # type: ignore[misc]  # uvicorn_worker ships no types
    """uvicorn's gunicorn worker, with the app's drain on SIGTERM and an exit when the engine dies.

    uvicorn alone, on SIGTERM, stops accepting and waits for every connection to close before the ASGI lifespan
    shutdown runs, so a stream longer than gunicorn's graceful timeout was killed with no final event. Here the
    first SIGTERM runs the app's drain (`aisandbox.http.lifecycle`) first, which ends every stream
    properly by `drain_timeout_s`; uvicorn's own shutdown follows. A worker whose engine died exits with
    status 1 (not gunicorn's boot-error 3, which would stop the master), so the master starts a fresh one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.timeout_graceful_shutdown = 10  # after the drain, idle keep-alive connections

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        lifecycle = getattr(self.wsgi, "lifecycle", None)
        server = _DrainingServer(self.config, lifecycle)
        if lifecycle is not None:
            lifecycle.on_fatal = lambda: setattr(server, "should_exit", True)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        if lifecycle is not None and lifecycle.engine_failed:
            sys.exit(1)


class _DrainingServer(Server):
    """A uvicorn server whose first exit signal drains the app before the server stops."""

    def __init__(self, config: Config, lifecycle: Any) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._draining: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # SIGTERM drains; SIGINT and SIGQUIT are gunicorn's quick shutdown, and a second signal stops at once.
        if sig != signal.SIGTERM or self._lifecycle is None or self._draining is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        self._draining = loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._lifecycle.drain()
        except Exception:
            logging.getLogger(__name__).exception("drain failed")
        self.should_exit = True
