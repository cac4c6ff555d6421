"""The C kernels of csrc/cpu_step.c, built for this machine at load and called through ctypes.

PyTorch has no fused op for what sits between a decoder layer's matrix multiplies (norms, rotary, the KV
store, decode attention with grouped KV heads, SiLU-and-multiply), and at decode sizes its ~35 small ops per
layer cost more in dispatch than in arithmetic, and `scaled_dot_product_attention` on CPU is slow for one query
per row over a masked cache (figures in docs/benchmarks.md). So these loops are ours, with the block-format
matrix multiplies of `cpu_weights`; the other formats' multiplies stay PyTorch's.

The library is compiled once per source, compiler and CPU with `cc -O3 -march=native -fopenmp` (a second
or two) and cached under ~/.cache/aisandbox/kernels. Without a C compiler, or with AISANDBOX_CPU_KERNELS=0,
`load()` returns None and the forward keeps its PyTorch ops. AISANDBOX_CPU_KERNELS=always also uses them
in the exact float32 mode, where they are otherwise off (their float32 sums round differently).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

__all__ = ["BLOCK_KINDS", "CpuKernels", "Layer", "Linear", "load", "mode"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_step.c"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffinite-math-only", "-fopenmp", "-shared", "-fPIC", "-std=c11")

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class Linear(ctypes.Structure):
    """csrc/cpu_step.c's Linear: one layer in one of our block formats."""

    _fields_ = [("kind", _i64), ("n", _i64), ("k", _i64), ("qs", _ptr), ("d", _ptr), ("m", _ptr)]


class Layer(ctypes.Structure):
    """csrc/cpu_step.c's Layer: a decoder layer's norms and linears, for forward_layers."""

    _fields_ = [("ln_in", _ptr), ("ln_post", _ptr), ("qkv", Linear), ("o", Linear), ("gate_up", Linear),
                ("down", Linear)]  # fmt: skip


BLOCK_KINDS = {"q4_1": 0, "q8_1": 1, "q8_0": 2, "q4_1p": 3, "q4_1v": 4}
"""The block formats forward_layers runs, by the kind number its Linear takes."""
_SIGNATURES = {
    "rms_norm": [_ptr, _ptr, _ptr, _i64, _i64, _f32],
    "add_rms_norm": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32],
    "silu_mul": [_ptr, _ptr, _i64, _i64],
    "rope_store_attend": [
        _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _f32,
        _i64,
    ],
    "q4_1_matmul": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64],
    "q4_1p_matmul": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64],
    "q4_1v_matmul": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64],
    "forward_layers": [
        _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64,
        _i64, _i64, _i64, _i64, _i64, _f32, _f32, _i64,
    ],
    "q8_0_matmul": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64],
    "q8_0v_matmul": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64],
    "q8_1_matmul": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64],
}  # fmt: skip


class CpuKernels:
    """The loaded library: each function takes raw pointers (`tensor.data_ptr()`) and sizes."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = None
        self.rms_norm = lib.rms_norm
        self.add_rms_norm = lib.add_rms_norm
        self.silu_mul = lib.silu_mul
        self.rope_store_attend = lib.rope_store_attend
        self.q4_1_matmul = lib.q4_1_matmul
        self.q4_1p_matmul = lib.q4_1p_matmul
        self.q4_1v_matmul = lib.q4_1v_matmul
        self.forward_layers = lib.forward_layers
        self.q8_0_matmul = lib.q8_0_matmul
        self.q8_0v_matmul = lib.q8_0v_matmul
        self.q8_1_matmul = lib.q8_1_matmul
        half = getattr(lib, "kv_half_supported", None)  # absent from a build of an older source
        if half is not None:
            half.restype = ctypes.c_int
        self.kv_half = bool(half and half())
        """Whether this build reads and writes a float16 KV cache (F16C); the caller allocates it then."""


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def mode() -> str:
    """AISANDBOX_CPU_KERNELS: `0` (never), `1` (the default: quantized formats), or `always`."""
    return os.environ.get("AISANDBOX_CPU_KERNELS", "1")


@cache
def load(cache_dir: Path | None = None) -> CpuKernels | None:
    """Build (once) and load the kernels; None where they cannot be built here or are switched off."""
    if mode() == "0":
        log.info("CPU kernels switched off (AISANDBOX_CPU_KERNELS=0)")
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: the CPU forward keeps PyTorch's small ops (slower at decode)")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        source = SOURCE.read_bytes()
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot use the C compiler %s: %s", cc, exc)
        return None
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_identity().encode()]))
    directory = cache_dir or Path.home() / ".cache" / "aisandbox" / "kernels"
    path = directory / f"cpu_step-{key.hexdigest()[:16]}.so"
    if not path.is_file():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                out = Path(tmp) / path.name
                proc = subprocess.run(
                    [cc, *FLAGS, "-o", str(out), str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300
                )
                if proc.returncode != 0:
                    log.warning("building the CPU kernels failed, keeping PyTorch's ops:\n%s", proc.stderr[-2000:])
                    return None
                out.replace(path)  # atomic: a concurrent start sees the whole file or none
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("building the CPU kernels failed (%s), keeping PyTorch's ops", exc)
            return None
        log.info("built the CPU kernels for this machine: %s", path)
    import torch  # noqa: F401  (its libgomp must be loaded first, so that ours resolves to the same one)

    try:
        return CpuKernels(ctypes.CDLL(str(path)), path)
    except OSError as exc:
        log.warning("loading the CPU kernels failed (%s), keeping PyTorch's ops", exc)
        return None
