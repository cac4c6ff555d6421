"""Linear-layer weight formats for CPU inference, and the choice among them, timed on this machine at load.

Formats backed by PyTorch's CPU kernels: `fp32` (oneDNN-reordered float32, exact), `fp16` (fbgemm's float16
weights), `bf16` (only where the CPU has bf16 dot products), `int8` and `int4` (weight-only kernels with
bfloat16 activations). Formats backed by our own C kernels (`cpu_kernels`, `csrc/cpu_step.c`): `q4_1` (a
GGUF's Q4_1 blocks as they are, activations quantized per row), `q4_1p` (the same values in panels of 16
outputs, unpacked to float32 per call, for several rows), `q4_1v` (the same values in panels laid out to widen
to int16 without shuffles, multiplied by int16 activations with vpdpwssd, AVX-512 VNNI's or AVX-VNNI's, or
vpmaddwd: q4_1's sums; AVX2 CPUs and up), `q8_1` (the Q4_1 values a byte each), `q8_0` (a GGUF's 8-bit output
layer) and `q8_0v` (the same values in q4_1v's panels, multiplied the same way). Where PyTorch's kernels fall short, and
what each format measured, is in docs/benchmarks.md.

Which format is fastest depends on the CPU and on how many rows (tokens) a step multiplies: at one decode
row the step reads the weights once and the smallest format wins; at more rows the multiply becomes compute
bound. So `choose_formats` times every allowed format on the model's own layer shapes at a few row counts and
picks one per row bucket; `BucketedLinear` then holds one copy of the layer per format in use and dispatches
on the rows of each call.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from aisandbox.runtime.torch import cpu_kernels
from aisandbox.runtime.torch.cpu_kernels import CpuKernels

__all__ = [
    "BUCKETS",
    "FORMATS",
    "FROM_Q4",
    "BucketedLinear",
    "FormatChoice",
    "Q4Weights",
    "choose_formats",
    "cpu_flags",
    "last_level_cache_bytes",
    "make_linear",
    "measure_formats",
    "q4_1_blocks",
    "quantize_q4",
]

log = logging.getLogger(__name__)

FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "q4_1", "q4_1p", "q4_1v", "q8_1", "q8_0", "q8_0v")
FROM_Q4 = ("int4", "q4_1", "q4_1p", "q4_1v", "q8_1")
"""The formats that hold a 4-bit source's values as they are (int4 with bf16 scales)."""
BUCKETS = (1, 4, 8, 16, 64)
"""Rows (tokens) per call at which formats are timed; a call with r rows uses the bucket of the smallest
measured count >= r (the last bucket beyond). 1: one decode stream; 4, 8, 16: batched decode; 64: prefill."""
GROUP = 32

_FLAGS_OF_INTEREST = (
    "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's SIMD flags that matter to these kernels (empty where /proc/cpuinfo is not readable)."""
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in _FLAGS_OF_INTEREST if f in have]
    return []


# ---- 4-bit weights ----


@dataclass(frozen=True, slots=True)
class Q4Weights:
    """A [N, K] weight as 4-bit values in groups of 32 along K: w[n, k] = scale[n, g] * q[n, k] + low[n, g].

    q: uint8 [N, K] in 0..15; scale, low: float32 [N, K // 32], g = k // 32.
    """

    q: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K]."""
        n, k = self.q.shape
        w = self.q.float().view(n, k // GROUP, GROUP) * self.scale[..., None] + self.low[..., None]
        return w.view(n, k)

    def rows(self, index: torch.Tensor) -> Q4Weights:
        """The same weight with its output rows reordered (row i of the result is row index[i])."""
        return Q4Weights(self.q[index], self.scale[index], self.low[index])


def quantize_q4(w: torch.Tensor) -> Q4Weights:
    """Asymmetric 4-bit quantization of a float weight [N, K] in groups of 32 (min and max of each group), the
    scale and minimum rounded to float16 as GGUF's Q4_1 keeps them (q4_1v stores them so)."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    low, high = g.amin(-1), g.amax(-1)
    low = low.half().float()
    scale = ((high - low) / 15).clamp(min=2**-24).half().float()  # float16 keeps down to 2**-24 (subnormal)
    q = ((g - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Q4Weights(q.reshape(n, k), scale, low)


def q4_1_blocks(raw: torch.Tensor, n: int, k: int) -> Q4Weights:
    """Read GGUF Q4_1 blocks as they are stored: raw uint8 [N, K // 32 * 20], each block 20 bytes.

    A block is d (float16), m (float16) and 16 bytes of nibbles: element j is byte j's low nibble, element
    j + 16 its high nibble; the value is d * q + m.
    """
    blocks = raw.reshape(n, k // GROUP, 20)
    dm = blocks[..., :4].contiguous().view(torch.float16).float()  # [N, K/32, 2]
    qs = blocks[..., 4:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # [N, K/32, 32]
    return Q4Weights(q.reshape(n, k).contiguous(), dm[..., 0].contiguous(), dm[..., 1].contiguous())


# ---- one layer in one format ----


class _Fp32(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight.detach().float().contiguous()
        self.packed: torch.Tensor | None = None
        if torch.backends.mkldnn.is_available() and hasattr(  # type: ignore[no-untyped-call]
            torch.ops.mkldnn, "_linear_pointwise"
        ):
            with contextlib.suppress(RuntimeError):
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight)
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return y


class _Fp16(torch.nn.Module):
    """float16 weight, float32 activations and accumulation (fbgemm widens the weight tile by tile)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        return y


class _Bf16(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight.detach().to(torch.bfloat16).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)


class _Int8(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), self.q, self.scale
        )
        return y.to(x.dtype).view(*shape[:-1], -1)


class _Int4(torch.nn.Module):
    def __init__(self, q4: Q4Weights) -> None:
        super().__init__()
        self.out_features = q4.q.shape[0]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.q.to(torch.int32).contiguous(), 1)
        # The kernel computes (q - 8) * scale + zero, per group, with scale_zero [K/32, N, 2].
        zero = q4.low + 8 * q4.scale
        self.scale_zero = torch.stack((q4.scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed, GROUP, self.scale_zero
        )
        return y.to(x.dtype).view(*shape[:-1], -1)


class _BlockLinear(torch.nn.Module):
    """A linear layer on one of our C block kernels: float32 activations in, float32 out."""

    def __init__(self, fn: Callable[..., None], n: int, k: int, *weights: torch.Tensor) -> None:
        super().__init__()
        self.n, self.k, self.fn = n, k, fn
        self.weights = weights  # kept alive: the kernel reads them through these pointers
        self.ptrs = tuple(w.data_ptr() for w in weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous()  # the lean forward's case
        x2 = x if flat else x.reshape(-1, self.k).float().contiguous()
        rows = x2.shape[0]
        y = torch.empty((rows, self.n))
        self.fn(*self.ptrs, x2.data_ptr(), y.data_ptr(), rows, self.n, self.k)
        return y if flat else y.view(*x.shape[:-1], self.n)


class _Q4_1(_BlockLinear):
    """GGUF Q4_1 blocks (w = d * q + m per 32 columns), 4 bits a value: our C kernel."""

    def __init__(self, q4: Q4Weights, kernels: CpuKernels) -> None:
        n, k = q4.q.shape
        q = q4.q.view(n, k // GROUP, GROUP)
        qs = (q[..., :16] | (q[..., 16:] << 4)).contiguous()  # GGUF's nibble order
        super().__init__(kernels.q4_1_matmul, n, k, qs, q4.scale.float().contiguous(), q4.low.float().contiguous())


class _Q4_1P(_BlockLinear):
    """Q4_1's values in panels of 16 outputs (see csrc/cpu_step.c): unpacked to float32 per call and multiplied
    in float32 with register tiles of 6 rows x 16 outputs; for several rows."""

    def __init__(self, q4: Q4Weights, kernels: CpuKernels) -> None:
        n, k = q4.q.shape
        q = q4.q.view(n // 16, 2, 8, k)
        qp = (q[:, 0] | (q[:, 1] << 4)).transpose(1, 2).contiguous()  # [N/16, K, 8]

        def panels(v: torch.Tensor) -> torch.Tensor:
            return v.float().view(n // 16, 16, k // GROUP).transpose(1, 2).contiguous()  # [N/16, K/32, 16]

        super().__init__(kernels.q4_1p_matmul, n, k, qp, panels(q4.scale), panels(q4.low))


class _Q4_1V(_BlockLinear):
    """Q4_1's values in panels of 16 outputs, four values a 16-bit lane (see csrc/cpu_step.c), multiplied by
    q4_1's int16 activations with vpdpwssd: the same integer sums as q4_1, 32 multiply-adds an instruction; for
    several rows."""

    def __init__(self, q4: Q4Weights, kernels: CpuKernels) -> None:
        n, k = q4.q.shape
        # lane 2j + e of chunk c, bits 4i..4i+3 = q[16p + j, 8c + 2i + e]
        q = q4.q.to(torch.int32).view(n // 16, 16, k // 8, 4, 2).permute(0, 2, 1, 4, 3)  # [P, C, j, e, i]
        lanes = q[..., 0] | (q[..., 1] << 4) | (q[..., 2] << 8) | (q[..., 3] << 12)
        qv = lanes.reshape(n // 16, k // 8, 32).to(torch.uint16).contiguous()

        def panels(v: torch.Tensor) -> torch.Tensor:  # [N/16, K/32, 16] float16: Q4_1's own (quantize_q4's too)
            return v.half().view(n // 16, 16, k // GROUP).transpose(1, 2).contiguous()

        super().__init__(kernels.q4_1v_matmul, n, k, qv, panels(q4.scale), panels(q4.low))


class _Q8_1(_BlockLinear):
    """Q4_1's layout one value per byte (u8, w = d * q + m per 32 columns): our C kernel. A Q4_1 source is held
    exactly (q in 0..15); any other weight gets 255 levels per block."""

    def __init__(self, weight: torch.Tensor, q4: Q4Weights | None, kernels: CpuKernels) -> None:
        n, k = weight.shape
        if q4 is not None:
            qs, d, m = q4.q, q4.scale.float(), q4.low.float()
        else:
            g = weight.detach().float().reshape(n, k // GROUP, GROUP)
            m, high = g.amin(-1), g.amax(-1)
            d = ((high - m) / 255).clamp(min=1e-12)
            qs = ((g - m[..., None]) / d[..., None]).round().clamp(0, 255).to(torch.uint8).reshape(n, k)
        super().__init__(kernels.q8_1_matmul, n, k, qs.contiguous(), d.contiguous(), m.contiguous())


class _Q8_0(_BlockLinear):
    """int8 values with a scale per 32 columns (GGUF Q8_0): our C kernel."""

    def __init__(self, weight: torch.Tensor, kernels: CpuKernels) -> None:
        n, k = weight.shape
        g = weight.detach().float().reshape(n, k // GROUP, GROUP)
        # The scale in float16, as GGUF's Q8_0 keeps it (so a GGUF's layer is held exactly; q8_0v stores it so).
        d = (g.abs().amax(-1) / 127).clamp(min=2**-24).half().float()
        qs = (g / d[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
        super().__init__(kernels.q8_0_matmul, n, k, qs.contiguous(), d.contiguous())


class _Q8_0V(_BlockLinear):
    """q8_0's values and scales in q4_1v's panels of 16 outputs (see csrc/cpu_step.c): the same integer sums as
    q8_0, 32 multiply-adds an instruction with vpdpwssd; for several rows (the output layer of a batch)."""

    def __init__(self, weight: torch.Tensor, kernels: CpuKernels) -> None:
        q8 = _Q8_0(weight, kernels)
        qs, d = q8.weights
        n, k = q8.n, q8.k
        qp = qs.view(n // 16, 16, k // 2, 2).transpose(1, 2).contiguous()  # [N/16, K/2, 16 outputs, 2 columns]
        dp = d.half().view(n // 16, 16, k // GROUP).transpose(1, 2).contiguous()  # [N/16, K/32, 16] float16
        super().__init__(kernels.q8_0v_matmul, n, k, qp, dp)


def make_linear(fmt: str, weight: torch.Tensor, q4: Q4Weights | None = None) -> torch.nn.Module:
    """One [N, K] bias-free linear layer in format `fmt`; int4 and q4_1 use `q4` when given, else quantize
    `weight`."""
    if fmt == "fp32":
        return _Fp32(weight)
    if fmt == "fp16":
        return _Fp16(weight)
    if fmt == "bf16":
        return _Bf16(weight)
    if fmt == "int8":
        return _Int8(weight)
    if fmt == "int4":
        return _Int4(q4 if q4 is not None else quantize_q4(weight))
    if fmt in ("q4_1", "q4_1p", "q4_1v", "q8_1", "q8_0", "q8_0v"):
        kernels = cpu_kernels.load()
        if kernels is None:
            raise ValueError(f"weight format {fmt} needs the C kernels, which cannot be built here")
        if fmt in ("q4_1", "q4_1p", "q4_1v"):
            cls = {"q4_1": _Q4_1, "q4_1p": _Q4_1P, "q4_1v": _Q4_1V}[fmt]
            return cls(q4 if q4 is not None else quantize_q4(weight), kernels)
        if fmt == "q8_0v":
            return _Q8_0V(weight, kernels)
        return _Q8_1(weight, q4, kernels) if fmt == "q8_1" else _Q8_0(weight, kernels)
    raise ValueError(f"unknown weight format {fmt!r}")


def supports(fmt: str, n: int, k: int) -> bool:
    """Whether format `fmt` can hold an [N, K] weight (the 4-bit kernel needs whole groups and N % 16 == 0)."""
    if fmt == "int4":
        return k % GROUP == 0 and n % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    if fmt == "int8":
        return hasattr(torch.ops.aten, "_weight_int8pack_mm")
    if fmt == "fp16":
        return (
            hasattr(torch.ops.quantized, "linear_prepack_fp16")
            and "fbgemm" in torch.backends.quantized.supported_engines
        )
    if fmt in ("q4_1v", "q8_0v") and not {"avx2", "fma"} <= set(cpu_flags()):
        return False  # vector paths for AVX-512 and AVX2 (with AVX-VNNI where present); else a plain loop (tests)
    if fmt in ("q4_1", "q4_1p", "q4_1v", "q8_1", "q8_0", "q8_0v"):
        return (
            k % GROUP == 0
            and n % (4 if fmt in ("q4_1", "q8_1", "q8_0") else 16) == 0
            and cpu_kernels.load() is not None
        )
    return True


# ---- the choice ----


@dataclass(frozen=True, slots=True)
class FormatChoice:
    """Which format serves each row bucket, and the timings it was chosen from."""

    by_bucket: tuple[str, ...]
    """by_bucket[i] serves calls of up to BUCKETS[i] rows (the last one beyond)."""
    timings_ms: dict[tuple[str, int], float] = field(default_factory=dict)
    """(format, rows) -> measured ms for all of the model's linear layers once."""

    @classmethod
    def every(cls, fmt: str) -> FormatChoice:
        """`fmt` at every row count."""
        return cls((fmt,) * len(BUCKETS))

    def fmt_for_rows(self, rows: int) -> str:
        return self.by_bucket[min(bisect.bisect_left(BUCKETS, rows), len(BUCKETS) - 1)]

    def formats(self) -> list[str]:
        return sorted(set(self.by_bucket), key=FORMATS.index)

    def describe(self) -> str:
        parts = []
        for i, rows in enumerate(BUCKETS):
            times = ", ".join(f"{f} {self.timings_ms[(f, rows)]:.1f}" for f in FORMATS if (f, rows) in self.timings_ms)
            parts.append(f"rows<={rows}: {self.by_bucket[i]}" + (f" ({times} ms)" if times else ""))
        return "; ".join(parts)


def choose_formats(
    timings_ms: dict[tuple[str, int], float], allowed: Sequence[str], margin: float = 0.05
) -> FormatChoice:
    """Pick the fastest allowed format per bucket; fp32 (exact) wins unless another is `margin` faster."""
    chosen = []
    for rows in BUCKETS:
        best = "fp32" if "fp32" in allowed and ("fp32", rows) in timings_ms else None
        for fmt in allowed:
            t = timings_ms.get((fmt, rows))
            if t is None:
                continue
            if best is None:
                best = fmt
                continue
            bar = timings_ms[(best, rows)] * (1 - margin if best == "fp32" else 1.0)
            if t < bar:
                best = fmt
        chosen.append(best if best is not None else allowed[0])
    return FormatChoice(tuple(chosen), dict(timings_ms))


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """The largest CPU cache, from sysfs (`default` where it cannot be read)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip().upper()
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=default)


BITS_PER_WEIGHT = {
    "fp32": 32.0, "fp16": 16.0, "bf16": 16.0, "int8": 8.0, "int4": 5.0, "q4_1": 6.0, "q4_1p": 6.0, "q4_1v": 5.0,
    "q8_1": 10.0,
    "q8_0": 9.0,
    "q8_0v": 8.5,
}  # fmt: skip
"""Bytes read per weight x 8, scales included (int4: bf16 scale and zero per 32; q4_1v, q8_0v: float16 per 32; the
other q*: float32 per 32)."""


def measure_formats(
    shapes: Iterable[tuple[int, int, int]],
    allowed: Sequence[str],
    budget_s: float = 1.0,
    weights: dict[tuple[int, int], torch.Tensor] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[tuple[str, int], float]:
    """Time each allowed format on the model's layer shapes at each bucket's row count.

    shapes: (N, K, count) per distinct shape. Each (format, rows) is the sum over shapes of count x the mean
    time of one call on a layer of that shape, in ms, timed as a forward runs them: one call per layer, back to
    back, over enough distinct copies of the layers that their weights are twice the last-level cache (a forward
    reads each layer's weights from memory; timing one layer's repeated calls would hand the larger formats a
    cache the real step never gives them, and timing single calls after evicting the cache charges every call a
    cold start the real step does not pay). Formats are interleaved, and the rounds repeat while time is left in
    the budget (at least two), so that a busy neighbour disturbs them all alike; each keeps its best round.
    """
    shapes = list(shapes)
    most = max(c for _, _, c in shapes)
    cache_bits = 2 * last_level_cache_bytes() * 8
    chains: dict[str, list[list[torch.nn.Module]]] = {}
    for fmt in allowed:
        fits = [(n, k) for n, k, _ in shapes if supports(fmt, n, k)]
        if len(fits) < len(shapes):
            continue
        copies = min(most, max(1, math.ceil(cache_bits / (BITS_PER_WEIGHT[fmt] * sum(n * k for n, k in fits)))))
        chain = []
        for n, k in fits:
            w = weights[(n, k)] if weights and (n, k) in weights else torch.randn(n, k) * 0.02
            chain.append([make_linear(fmt, w if i == 0 else w.clone()) for i in range(copies)])
        chains[fmt] = chain
    best: dict[tuple[str, int], float] = {}
    start = clock()
    rounds = 0
    with torch.inference_mode():
        inputs = {(rows, k): torch.randn(rows, k) for rows in BUCKETS for _, k, _ in shapes}
        for chain in chains.values():  # first calls allocate; keep them out of the timings
            for (_, k, _), layers in zip(shapes, chain, strict=True):
                layers[0](inputs[(1, k)])
        # Each call as the forward makes it: our block formats from C (forward_layers calls their function
        # directly, so they pay no Python per call), the others through their forward(), as BucketedLinear does.
        calls: dict[tuple[str, int], list[list[Callable[[], object]]]] = {}
        for fmt, chain in chains.items():
            for rows in BUCKETS:
                calls[(fmt, rows)] = [
                    [_direct(layer, inputs[(rows, k)]) for layer in layers]
                    for (_, k, _), layers in zip(shapes, chain, strict=True)
                ]
        while rounds < 2 or (clock() - start < budget_s and rounds < 20):
            rounds += 1
            for rows in BUCKETS:
                for fmt, chain in chains.items():
                    spent = [0.0] * len(shapes)
                    fns = calls[(fmt, rows)]
                    for i in range(len(chain[0])):
                        for j in range(len(shapes)):
                            fn = fns[j][i]
                            t0 = clock()
                            fn()
                            spent[j] += clock() - t0
                    total = 1e3 * sum(t / len(chain[0]) * c for t, (_, _, c) in zip(spent, shapes, strict=True))
                    best[(fmt, rows)] = min(best.get((fmt, rows), float("inf")), total)
    return best


def _direct(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """A call of `layer` on `x` with as little Python as the served path has: a block format's C function with
    its pointers bound (an output buffer made once), any other layer's forward()."""
    if isinstance(layer, _BlockLinear):
        y = torch.empty((x.shape[0], layer.n))
        call = functools.partial(layer.fn, *layer.ptrs, x.data_ptr(), y.data_ptr(), x.shape[0], layer.n, layer.k)
        call.keep = (x, y)  # type: ignore[attr-defined]  # the buffers outlive the pointers
        return call
    return functools.partial(layer.forward, x)


class BucketedLinear(torch.nn.Module):
    """A bias-free linear layer held in one or more formats; each call uses its row count's format."""

    def __init__(
        self, weight: torch.Tensor, choice: FormatChoice, q4: Q4Weights | None = None, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        n, k = weight.shape
        self.in_features, self.out_features = k, n
        self.bias = None if bias is None else bias.detach().float()
        impls: dict[str, torch.nn.Module] = {}
        by_bucket: list[torch.nn.Module] = []
        for fmt in choice.by_bucket:
            use = fmt if supports(fmt, n, k) else "fp32"
            if use not in impls:
                impls[use] = make_linear(use, weight, q4 if use in FROM_Q4 else None)
            by_bucket.append(impls[use])
        self.impls = torch.nn.ModuleDict(impls)
        self._by_bucket = by_bucket
        self._single = by_bucket[0] if len(impls) == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self._single
        if impl is None:
            rows = x.numel() // x.shape[-1]
            impl = self._by_bucket[min(bisect.bisect_left(BUCKETS, rows), len(BUCKETS) - 1)]
        y: torch.Tensor = impl.forward(x)  # not impl(x): nn.Module's call costs as much as a decode-size multiply
        return y if self.bias is None else y + self.bias
