"""CPU weight formats: each kernel against its dequantized reference, Q4_1 blocks against gguf's own reading,
and the per-bucket choice on injected timings. Tiny shapes only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aisandbox.runtime.torch.cpu_weights import (
    BUCKETS,
    FORMATS,
    BucketedLinear,
    FormatChoice,
    choose_formats,
    cpu_flags,
    make_linear,
    measure_formats,
    q4_1_blocks,
    quantize_q4,
)

N, K = 48, 64


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@pytest.fixture
def weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(N, K) * 0.05


@pytest.mark.parametrize("rows", [1, 5, 17])
def test_fp32_is_exact_to_rounding(weight: torch.Tensor, rows: int) -> None:
    x = torch.randn(rows, K)
    with torch.inference_mode():
        y = make_linear("fp32", weight)(x)
    assert torch.allclose(y, x @ weight.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 17])
def test_int8_matches_its_dequantized_weight(weight: torch.Tensor, rows: int) -> None:
    layer = make_linear("int8", weight)
    x = torch.randn(rows, K)
    deq = layer.q.float() * layer.scale.float()[:, None]
    with torch.inference_mode():
        y = layer(x)
    ref = _bf16(x) @ deq.T
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert (deq - weight).abs().max() <= weight.abs().amax(1).max() / 127  # half a step, and bf16 scales


@pytest.mark.parametrize("rows", [1, 5, 17])
def test_int4_matches_its_dequantized_weight(weight: torch.Tensor, rows: int) -> None:
    q4 = quantize_q4(weight)
    layer = make_linear("int4", weight, q4)
    x = torch.randn(rows, K)
    sz = layer.scale_zero.float()  # [K/32, N, 2] as the kernel reads them
    scale = sz[..., 0].t().repeat_interleave(32, dim=1)
    zero = sz[..., 1].t().repeat_interleave(32, dim=1)
    deq = (q4.q.float() - 8) * scale + zero
    with torch.inference_mode():
        y = layer(x)
    ref = _bf16(x) @ deq.T
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()
    # Quantization error: half a step of each group, plus the scale's rounding to bf16.
    assert (q4.dequantize() - weight).abs().max() <= q4.scale.max() / 2 + 1e-6
    assert (deq - q4.dequantize()).abs().max() <= 16 * q4.scale.max() * 2**-8 + 2e-3


def test_q4_1_blocks_read_as_gguf_does() -> None:
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    raw = quantize(w, gguf.GGMLQuantizationType.Q4_1)  # [N, K / 32 * 20] uint8
    theirs = torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType.Q4_1))
    q4 = q4_1_blocks(torch.from_numpy(raw), N, K)
    assert float((q4.dequantize() - theirs).abs().max()) <= 1e-6
    # And the int4 kernel multiplies by those values (up to the scales' rounding to bf16).
    layer = make_linear("int4", theirs, q4)
    x = torch.randn(3, K)
    with torch.inference_mode():
        y = layer(x)
    ref = _bf16(x) @ theirs.T
    assert (y - ref).abs().max() <= 3e-2 * ref.abs().max()


def test_requantizing_a_gguf_layer_gives_back_its_values() -> None:
    """quantize_q4 and q8_0 keep their scales (and Q4_1's minimum) in float16, as GGUF does: a layer that was Q4_1 or
    Q8_0 comes back exactly, and q4_1v and q8_0v, which store them in float16, hold it exactly too."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    from aisandbox.runtime.torch import cpu_kernels

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    w[0, :32] = 0.0  # a block of zeros
    w[1, :32] *= 1e-5  # a block whose scale is a float16 subnormal
    x = torch.randn(5, K)
    for kind, fmts in ((gguf.GGMLQuantizationType.Q4_1, ("q4_1v",)), (gguf.GGMLQuantizationType.Q8_0, ("q8_0v",))):
        theirs = torch.from_numpy(dequantize(quantize(w, kind), kind))
        if kind == gguf.GGMLQuantizationType.Q4_1:
            assert torch.equal(quantize_q4(theirs).dequantize(), theirs)
        if cpu_kernels.load() is None:
            continue
        q8 = make_linear("q8_0", theirs)
        if kind == gguf.GGMLQuantizationType.Q8_0:
            qs, d = q8.weights
            assert torch.equal((qs.float().view(N, -1, 32) * d[..., None]).view(N, K), theirs)
        for fmt in fmts:
            with torch.inference_mode():
                y = make_linear(fmt, theirs)(x)
            ref = x @ theirs.T
            assert torch.isfinite(y).all() and (y - ref).abs().max() <= 1e-3 * ref.abs().max(), fmt


def test_choice_per_bucket_from_injected_timings() -> None:
    t = {
        ("fp32", 1): 40.0, ("bf16", 1): 19.0, ("int8", 1): 17.0, ("int4", 1): 12.0,
        ("fp32", 4): 50.0, ("bf16", 4): 60.0, ("int8", 4): 30.0, ("int4", 4): 25.0,
        ("fp32", 8): 60.0, ("bf16", 8): 120.0, ("int8", 8): 40.0, ("int4", 8): 45.0,
        ("fp32", 16): 82.0, ("bf16", 16): 254.0, ("int8", 16): 77.0, ("int4", 16): 94.0,
        ("fp32", 64): 150.0, ("bf16", 64): 900.0, ("int8", 64): 300.0, ("int4", 64): 280.0,
    }  # fmt: skip
    choice = choose_formats(t, FORMATS)
    # int8 at 16 rows is 6% faster than fp32: past the 5% margin that exact fp32 keeps.
    assert choice.by_bucket == ("int4", "int4", "int8", "int8", "fp32")
    assert choice.fmt_for_rows(1) == "int4" and choice.fmt_for_rows(5) == "int8" and choice.fmt_for_rows(500) == "fp32"
    assert choose_formats(t, ["fp32", "bf16"]).by_bucket == ("bf16", "fp32", "fp32", "fp32", "fp32")
    t[("int8", 16)] = 79.0  # within the margin: fp32 stays
    assert choose_formats(t, FORMATS).by_bucket[3] == "fp32"
    assert "rows<=1: int4" in choice.describe()


def test_measure_covers_every_format_and_bucket() -> None:
    t = measure_formats([(32, 64, 2), (64, 32, 1)], FORMATS, budget_s=0.05)
    assert set(t) == {(f, r) for f in FORMATS for r in BUCKETS}
    assert all(v > 0 for v in t.values())


def test_bucketed_linear_dispatches_on_rows(weight: torch.Tensor) -> None:
    layer = BucketedLinear(weight, FormatChoice(("int4", "int4", "int4", "fp32", "fp32")), bias=torch.ones(N))
    assert set(layer.impls) == {"int4", "fp32"}
    x = torch.randn(1, 20, K)  # 20 rows: the fp32 bucket, exact
    with torch.inference_mode():
        assert torch.allclose(layer(x), x @ weight.T + 1, atol=1e-5)
        y1 = layer(x[:, :1])
    assert not torch.equal(y1, x[:, :1] @ weight.T + 1)  # 1 row: the 4-bit copy
    assert torch.allclose(y1, x[:, :1] @ weight.T + 1, atol=0.1)
    # A shape the 4-bit kernel cannot hold falls back to fp32.
    odd = BucketedLinear(torch.randn(10, K), FormatChoice.every("int4"))
    assert set(odd.impls) == {"fp32"}


def test_cpu_flags_reads_the_flags_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n")
    assert cpu_flags(f) == ["avx", "avx2", "fma"]
    assert cpu_flags(tmp_path / "missing") == []
