"""Where one decode step's time goes on the CPU path the engine serves with (`--weights-dtype auto`).

Loads the default model as the engine does (the lean forward, the C kernels, the cached or freshly timed format
choice), then runs decode steps at 1 and 16 rows over a KV cache of 160 columns with every part of the step timed
as it runs: the body's linear layers by kind (qkv, o, gate_up, down), the output layer, the C kernels between
the multiplies (rotary + KV store + attention, the norms, SiLU), and the rest (embedding, rotary tables, Python).
Each row gives the median over the steps, in ms, and the share of the step ("step": the per-layer loop whose parts
are timed; the sum of the parts is its wall time, the timers costing about a microsecond each, about 0.2 ms a step,
counted in "rest"), and, interleaved with it, the step as the engine serves it: the whole stack in one C call
(forward_layers) where every layer's format at that row count is one of ours.

Run: `.venv/bin/python -m aisandbox.bench.micro.step_profile [steps=40] [cols=161]` (cols: the KV columns each row
attends to, its own included).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from aisandbox.runtime.torch.backend import _SlotKV
from aisandbox.runtime.torch.cpu_forward import build_cpu_forward, load_q4_file
from aisandbox.runtime.torch.cpu_weights import cpu_flags
from aisandbox.runtime.torch.default_model import prepare_default_model
from aisandbox.settings import ServerSettings

spent: dict[str, float] = defaultdict(float)


class _Timed:
    """A layer (anything with .forward) or a C function, timed into spent[label]."""

    def __init__(self, label: str, inner: Any) -> None:
        self.label, self.inner = label, inner
        self.call: Callable[..., Any] = inner.forward if hasattr(inner, "forward") else inner

    def forward(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = self.call(*args)
        spent[self.label] += time.perf_counter() - t0
        return out

    __call__ = forward


class _TimedKernels:
    def __init__(self, kernels: Any) -> None:
        self.path = kernels.path
        self.kv_half = kernels.kv_half
        self.forward_layers = kernels.forward_layers  # the one-call step, timed whole
        for name in ("rms_norm", "add_rms_norm", "silu_mul", "rope_store_attend"):
            label = {"rms_norm": "norms", "add_rms_norm": "norms"}.get(name, name)
            setattr(self, name, _Timed(label, getattr(kernels, name)))


def main() -> None:
    steps = int(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("steps=")), "40"))
    cols = int(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("cols=")), "161"))
    from transformers import AutoModelForCausalLM

    settings = ServerSettings()
    model_dir = prepare_default_model(settings.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    cfg = model.config
    with torch.inference_mode():
        fwd, line = build_cpu_forward(model, "auto", load_q4_file(model_dir), cache_dir=settings.cache_dir / "kernels")
    assert fwd is not None and fwd.kernels is not None, line
    print(line)
    fwd.kernels = _TimedKernels(fwd.kernels)
    for layer in fwd.layers:
        for kind in ("qkv", "o", "gate_up", "down"):
            object.__setattr__(layer, kind, _Timed(f"linear {kind}", getattr(layer, kind)))  # a frozen dataclass
    fwd.head = _Timed("output layer", fwd.head)
    plans = fwd._plans
    kv_dtype = torch.float16 if fwd.kernels.kv_half else torch.float32  # the engine's default cache
    kv = _SlotKV(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, kv_dtype, torch.device("cpu"))
    kv.max_rows = 16
    kv.ensure(16, max(256, cols))
    for buf in kv.k + kv.v:
        buf.normal_()
    threads = torch.get_num_threads()
    print(
        f"\nCPU flags: {' '.join(cpu_flags())}; {threads} threads; {steps} steps a row count; {cols} columns;"
        f" KV {kv_dtype}\n"
    )
    for rows in (1, 16):
        per: dict[str, list[float]] = defaultdict(list)
        ids = torch.randint(100, 1000, (rows, 1))
        pos = torch.full((rows, 1), cols - 1)
        mask = torch.ones((rows, 1, 1, cols), dtype=torch.bool)
        starts = torch.zeros(rows, dtype=torch.long)
        with torch.inference_mode():
            for i in range(steps + 3):
                kv.rows, kv.write_col, kv.lo, kv.hi = slice(0, rows), cols - 1, 0, cols
                # interleaved: the stack as the engine runs it (one C call where the formats allow), then the
                # per-layer loop whose parts are timed below
                fwd._plans = plans
                t0 = time.perf_counter()
                fwd(ids, pos, mask, kv, False, starts)
                one_call = time.perf_counter() - t0
                fwd._plans = {}
                kv.rows, kv.write_col, kv.lo, kv.hi = slice(0, rows), cols - 1, 0, cols
                spent.clear()
                t0 = time.perf_counter()
                fwd(ids, pos, mask, kv, False, starts)
                wall = time.perf_counter() - t0
                if i < 3:
                    continue  # warm-up
                if plans:
                    per["step as served (layers in one C call where the formats allow)"].append(one_call * 1e3)
                per["step"].append(wall * 1e3)
                for label, s in spent.items():
                    per[label].append(s * 1e3)
                per["rest (embedding, rotary tables, Python)"].append((wall - sum(spent.values())) * 1e3)
        step = statistics.median(per["step"])
        print(f"| decode, {rows} row{'s' * (rows > 1)} | ms | share |\n|---|--:|--:|")
        for label in sorted(per, key=lambda k: -statistics.median(per[k])):
            ms = statistics.median(per[label])
            print(f"| {label} | {ms:.2f} | {ms / step:.0%} |")
        print()


if __name__ == "__main__":
    main()
