"""Two builds of the C kernels (csrc/cpu_step.c) side by side, in one process, interleaved.

Compiles each source with the flags the engine uses and times, on SmolLM2-135M's shapes, one layer's
`rope_store_attend` (rotary, KV store, decode attention; 9 query heads on 3 KV heads of 64) at 1 and 16
rows, and the q4_1 / q8_0 block multiplies of a decoder layer (qkv, o, gate_up, down) at 1, 4, 8 and 16
rows. Prints the median of each, the ratio, and the largest difference between the two builds' outputs.

Run: `.venv/bin/python -m aisandbox.bench.micro.kernel_ab OLD.c [NEW.c]` (NEW defaults to this tree's source;
OLD e.g. from `git show <rev>:aisandbox/runtime/torch/csrc/cpu_step.c > /tmp/old.c`).
"""

from __future__ import annotations

import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from aisandbox.runtime.torch import cpu_kernels
from aisandbox.runtime.torch.cpu_kernels import CpuKernels

HQ, HK, D = 9, 3, 64
LAYER = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def build(source: Path, out_dir: Path) -> CpuKernels:
    out = out_dir / f"{source.stem}-{abs(hash(str(source)))}.so"
    cc = cpu_kernels._compiler() or "cc"
    subprocess.run([cc, *cpu_kernels.FLAGS, "-o", str(out), str(source), "-lm"], check=True)
    return CpuKernels(ctypes.CDLL(str(out)), out)


def timed(
    fns: dict[str, Callable[[], torch.Tensor]], reps: int = 25, inner: int = 20
) -> dict[str, tuple[float, torch.Tensor]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                outs[name] = fn()
            times[name].append(1e3 * (time.perf_counter() - t0) / inner)
    return {name: (statistics.median(times[name]), outs[name]) for name in fns}


def attention(lib: CpuKernels, rows: int, cols: int) -> Callable[[], torch.Tensor]:
    cap = 512
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(rows, 1, (HQ + 2 * HK) * D, generator=g)
    cos, sin = torch.randn(rows, 1, D, generator=g), torch.randn(rows, 1, D, generator=g)
    kb, vb = torch.randn(rows, HK, cap, D, generator=g), torch.randn(rows, HK, cap, D, generator=g)
    start, qout = torch.zeros(rows, dtype=torch.long), torch.empty(rows, 1, HQ, D)

    def run() -> torch.Tensor:
        out = torch.empty(rows, 1, HQ * D)
        lib.rope_store_attend(
            qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), kb.data_ptr(), vb.data_ptr(), cap, 0, cols - 1,
            start.data_ptr(), None, rows, 1, HQ, HK, D, qout.data_ptr(), out.data_ptr(), ctypes.c_float(D**-0.5), 0,
        )  # fmt: skip
        return out

    return run


def matmuls(lib: CpuKernels, fmt: str, rows: int) -> Callable[[], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    calls = []
    for n, k in LAYER.values():
        x = torch.randn(rows, k, generator=g)
        d = torch.rand(n, k // 32, generator=g) * 0.01
        if fmt == "q4_1":
            qs = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
            m = -torch.rand(n, k // 32, generator=g) * 0.05
            calls.append((lib.q4_1_matmul, (qs, d, m), x, n, k))
        else:
            qs = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
            calls.append((lib.q8_0_matmul, (qs, d), x, n, k))

    def run() -> torch.Tensor:
        outs = []
        for fn, weights, x, n, k in calls:
            y = torch.empty(rows, n)
            fn(*(w.data_ptr() for w in weights), x.data_ptr(), y.data_ptr(), rows, n, k)
            outs.append(y.flatten())
        return torch.cat(outs)

    return run


def main() -> None:
    if not 2 <= len(sys.argv) <= 3:
        sys.exit(__doc__)
    old_src = Path(sys.argv[1])
    new_src = Path(sys.argv[2]) if len(sys.argv) == 3 else cpu_kernels.SOURCE
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"old": build(old_src, Path(tmp)), "new": build(new_src, Path(tmp))}
        cases: dict[str, Callable[[CpuKernels], Callable[[], torch.Tensor]]] = {
            "attention 1 row x 161 columns": lambda lib: attention(lib, 1, 161),
            "attention 16 rows x 161 columns": lambda lib: attention(lib, 16, 161),
            "attention 16 rows x 400 columns": lambda lib: attention(lib, 16, 400),
        }
        for fmt in ("q4_1", "q8_0"):
            for rows in (1, 4, 8, 16):
                cases[f"{fmt} layer multiplies, {rows} rows"] = lambda lib, f=fmt, r=rows: matmuls(lib, f, r)
        print(f"threads {torch.get_num_threads()}; old {old_src}; new {new_src}\n")
        print("| case | old ms | new ms | old/new | max diff |")
        print("|---|--:|--:|--:|--:|")
        for label, make in cases.items():
            res = timed({name: make(lib) for name, lib in libs.items()})
            (o, yo), (n, yn) = res["old"], res["new"]
            scale = yo.abs().max().item() or 1.0
            print(
                f"| {label} | {o:.3f} | {n:.3f} | {o / n:.2f}x | {(yo - yn).abs().max().item() / scale:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
