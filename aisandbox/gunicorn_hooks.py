"""gunicorn server hooks (`-c python:aisandbox.gunicorn_hooks`): one GPU per worker.

With `--workers N` on an N-GPU host every worker would otherwise load its engine onto GPU 0. The master
gives each worker the lowest free slot (a restarted worker takes its predecessor's), and the worker narrows
CUDA_VISIBLE_DEVICES to that one device before its engine starts in the ASGI lifespan. Slots are NVML indices,
which match CUDA's because `aisandbox serve` sets CUDA_DEVICE_ORDER=PCI_BUS_ID.

This mode is for single-GPU engines only: a tensor-parallel engine is served by one worker that sees all of its
GPUs, and `aisandbox serve` refuses `--workers` > 1 with one (`aisandbox.serve.check_gpu_mode`).
"""

from __future__ import annotations

import os
from typing import Any

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
