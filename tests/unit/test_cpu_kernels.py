"""The C kernels (csrc/cpu_step.c): each against PyTorch, and the lean forward with them against the forward
without them, in the engine's situations (several rows, left padding, cached prefixes, long prompts)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from aisandbox.runtime.torch import cpu_forward, cpu_kernels
from aisandbox.runtime.torch.backend import _SlotKV
from aisandbox.runtime.torch.cpu_forward import CpuForward, build_cpu_forward
from aisandbox.runtime.torch.cpu_weights import FormatChoice, make_linear, quantize_q4, supports
from tests.conftest import build_tiny_llama


@pytest.fixture(scope="module")
def ck() -> cpu_kernels.CpuKernels:
    kernels = cpu_kernels.load()
    if kernels is None:
        # A machine without a C compiler serves with PyTorch's ops; CI has one, so there this is a failure.
        if os.environ.get("CI") == "true":
            pytest.fail("the CPU kernels could not be built (see the log for the compiler's output)")
        pytest.skip("no C compiler here: the CPU kernels are not built")
    return kernels


# q4_1: int16 activations per row (error about 1e-4); q4_1p: the same values unpacked to float32 in panels of 16
# outputs, float32 activations (error at float32 rounding), over every group of six rows and the rest.
@pytest.mark.parametrize(
    ("fmt", "rows", "tol"),
    [("q4_1", r, 1e-3) for r in (1, 3, 4, 5, 17)]
    + [("q4_1p", r, 1e-5) for r in (1, 5, 6, 7, 16)]
    + [("q4_1v", r, 1e-3) for r in (1, 7, 8, 9, 16, 17)],
)
def test_q4_1_formats_match_the_dequantized_weight_in_float32(ck, fmt: str, rows: int, tol: float) -> None:  # type: ignore[no-untyped-def]
    if not supports(fmt, 48, 96):
        pytest.skip(f"{fmt} is not served on this CPU (AVX-512 only); the builds test runs its plain loop")
    torch.manual_seed(rows)
    w = torch.randn(48, 96) * 0.05
    q4 = quantize_q4(w)
    x = torch.randn(rows, 96) * 3
    x[0, 5] = 40.0  # an outlier in one block: int16 activations keep the block's small values
    with torch.inference_mode():
        y = make_linear(fmt, w, q4)(x)
    ref = x @ q4.dequantize().T
    assert (y - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("rows", [1, 6])
def test_q8_1_holds_a_q4_1_weight_exactly_and_others_in_255_levels(ck, rows: int) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    w = torch.randn(48, 96) * 0.05
    q4 = quantize_q4(w)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        exact = make_linear("q8_1", w, q4)(x)
        requantized = make_linear("q8_1", w)(x)
    ref = x @ q4.dequantize().T
    assert (exact - ref).abs().max() <= 1e-3 * ref.abs().max()
    ref_w = x @ w.T
    assert (requantized - ref_w).abs().max() <= 2e-2 * ref_w.abs().max()


@pytest.mark.parametrize(("fmt", "rows"), [("q8_0", 1), ("q8_0", 6), *(("q8_0v", r) for r in (1, 7, 8, 9, 16, 17))])
def test_q8_0_matches_a_q8_0_weight(ck, fmt: str, rows: int) -> None:  # type: ignore[no-untyped-def]
    if fmt == "q8_0v" and not supports(fmt, 32, 96):
        pytest.skip("q8_0v's vector paths need AVX2 (the plain loop is compared in the build test)")
    torch.manual_seed(0)
    d = torch.rand(32, 3) * 0.01 + 1e-3
    q = torch.randint(-127, 128, (32, 3, 32)).float()
    q[:, :, 0] = 127  # every block reaches 127: requantizing gives back the same scale and values
    w = (q * d[..., None]).reshape(32, 96)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        y = make_linear(fmt, w)(x)
        same = make_linear("q8_0", w)(x)
    ref = x @ w.T
    assert (y - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert (y - same).abs().max() <= 1e-5 * ref.abs().max()  # the same integer sums: float order only


def test_the_kernels_need_whole_blocks_and_groups_of_outputs(ck) -> None:  # type: ignore[no-untyped-def]
    assert supports("q4_1", 48, 96) and supports("q8_1", 48, 96) and supports("q8_0", 48, 96)
    assert not supports("q4_1", 50, 96) and not supports("q8_0", 48, 100)
    assert supports("q4_1p", 48, 96) and not supports("q4_1p", 40, 96)  # panels of 16 outputs
    assert not supports("q4_1v", 40, 96) and not supports("q8_0v", 40, 96)


def test_switched_off_means_no_kernels(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AISANDBOX_CPU_KERNELS", "0")
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is None
    finally:
        cpu_kernels.load.cache_clear()


def test_the_norm_and_silu_kernels_match_pytorch(ck) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    x, d, w = torch.randn(5, 64), torch.randn(5, 64), torch.rand(64) + 0.5
    h = torch.empty_like(x)
    ck.rms_norm(x.data_ptr(), w.data_ptr(), h.data_ptr(), 5, 64, 1e-5)
    assert torch.allclose(h, torch.nn.functional.rms_norm(x, (64,), w, 1e-5), atol=1e-5)
    ref_x = x + d
    ck.add_rms_norm(x.data_ptr(), d.data_ptr(), w.data_ptr(), h.data_ptr(), 5, 64, 1e-5)
    assert torch.allclose(x, ref_x) and torch.allclose(
        h, torch.nn.functional.rms_norm(ref_x, (64,), w, 1e-5), atol=1e-5
    )
    gu = torch.randn(5, 2 * 64) * 6  # exp over a wide range
    out = torch.empty(5, 64)
    ck.silu_mul(gu.data_ptr(), out.data_ptr(), 5, 64)
    gate, up = gu.chunk(2, dim=-1)
    assert torch.allclose(out, torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_llama():  # type: ignore[no-untyped-def]
    return build_tiny_llama(heads=6, hidden_size=96, max_position_embeddings=256)


def _group_step(fwd: CpuForward, kv: _SlotKV, starts: list[int], col: int, width: int, fused: bool,
                valid: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One prefill of `width` query columns ending at `col` (rows left-padded to their starts), as the engine
    runs it; then the caller decodes."""
    rows = len(starts)
    torch.manual_seed(7)
    ids = torch.randint(1, 256, (rows, width))
    q_col, lo = col - width, min(starts)
    st = torch.tensor(starts)
    pos = (torch.arange(q_col, col)[None] - st[:, None]).clamp(min=0)
    q_abs, k_abs = torch.arange(q_col, col), torch.arange(lo, col)
    causal = k_abs[None, :] <= q_abs[:, None]
    own = k_abs[None, :] >= st[:, None]
    mask = (causal[None] & own[:, None, :]) | (k_abs[None, :] == q_abs[:, None])[None]
    kv.rows, kv.write_col, kv.lo, kv.hi = slice(0, rows), q_col, lo, col
    kv.write_mask = valid
    try:
        return fwd(ids, pos, mask[:, None], kv, False, st if fused else None)
    finally:
        kv.write_mask = None


def _decode(fwd: CpuForward, kv: _SlotKV, starts: list[int], col: int, tokens: torch.Tensor, fused: bool):  # type: ignore[no-untyped-def]
    st = torch.tensor(starts)
    pos = (col - st)[:, None]
    mask = (torch.arange(min(starts), col + 1)[None, :] >= st[:, None])[:, None, None, :]
    kv.rows, kv.write_col, kv.lo, kv.hi = slice(0, len(starts)), col, min(starts), col + 1
    return fwd(tokens[:, None], pos, mask, kv, False, st if fused else None)


def _kv(model, dtype: torch.dtype = torch.float32) -> _SlotKV:  # type: ignore[no-untyped-def]
    cfg = model.config
    kv = _SlotKV(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype, torch.device("cpu"))
    kv.max_rows = 4
    kv.ensure(4, 256)
    return kv


@pytest.fixture(scope="module")
def wide_heads():  # type: ignore[no-untyped-def]
    """Heads of 64 and 32 values (the vector paths of our attention; 16 takes the plain loops), 3 and 4 query
    heads a KV head (SmolLM2's and Mistral's groupings)."""
    return {
        (6, 64): build_tiny_llama(heads=6, hidden_size=96, max_position_embeddings=256, head_dim=64),
        (8, 32): build_tiny_llama(heads=8, hidden_size=96, max_position_embeddings=256, head_dim=32),
    }


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("long_prompt", "heads"), [(False, None), (True, None), (False, (6, 64)), (False, (8, 32))])
def test_fused_forward_matches_pytorch_ops_with_padding_and_decode(
    ck, tiny_llama, wide_heads, monkeypatch, long_prompt: bool, heads: tuple[int, int] | None, kv_dtype: torch.dtype
) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    """Our kernels against PyTorch's ops over the same cache: float32, or float16 (kv_cache_dtype's default on
    this path: our kernels convert as they read, PyTorch's attention gets it converted)."""
    if kv_dtype == torch.float16 and not ck.kv_half:
        pytest.skip("this build has no F16C: the cache stays float32")
    if long_prompt:  # the prefill takes PyTorch's flash attention between our kernels
        monkeypatch.setattr(cpu_forward, "ATTEND_LIMIT", 16)
    if heads is not None:
        tiny_llama = wide_heads[heads]
    choice = FormatChoice.every("fp32")
    fwd = CpuForward(tiny_llama, choice, choice, None, ck)
    starts, col, width = [2, 0, 5], 12, 12  # three prompts of 10, 12 and 7 tokens, left-padded
    out = {}
    with torch.inference_mode():
        for fused in (False, True):
            kv = _kv(tiny_llama, kv_dtype)
            logits = [_group_step(fwd, kv, starts, col, width, fused)]
            for step in range(4):
                logits.append(_decode(fwd, kv, starts, col + step, logits[-1].argmax(-1), fused))
            out[fused] = torch.stack(logits)
    assert torch.allclose(out[True], out[False], atol=1e-4, rtol=1e-4)
    assert torch.equal(out[True].argmax(-1), out[False].argmax(-1))


def test_fused_forward_keeps_a_cached_prefix(ck, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """Positions whose KV came from the prefix cache (write_mask false) are neither stored nor attended from."""
    choice = FormatChoice.every("fp32")
    fwd = CpuForward(tiny_llama, choice, choice, None, ck)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, :3] = False  # row 0's first three query columns are cached already
    out = {}
    with torch.inference_mode():
        for fused in (False, True):
            kv = _kv(tiny_llama)
            for buf in kv.k + kv.v:
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(3)))
            out[fused] = (_group_step(fwd, kv, [0, 0], 8, 8, fused, valid), kv.k[1][:2, :, :8].clone())
    assert torch.allclose(out[True][0], out[False][0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-5)


def test_quantized_auto_turns_the_kernels_on_and_fp32_keeps_them_off(ck, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    import copy

    with torch.inference_mode():
        fwd, line = build_cpu_forward(copy.deepcopy(tiny_llama), "q4_1")
        assert fwd is not None and fwd.kernels is not None and "C kernels on" in line
        fwd, line = build_cpu_forward(copy.deepcopy(tiny_llama), "fp32")
        assert fwd is not None and fwd.kernels is None and "C kernels off (exact fp32)" in line


# The builds a CPU can get from the one source: plain C (no AVX2/FMA), AVX2 (no AVX-512) and, natively here,
# AVX-512 where the CPU has it. Each is built here with the flags that a CPU without the rest would get.
_BUILDS = {
    "plain": ["-mno-avx2", "-mno-fma"],
    "avx2": ["-mno-avx512f"],  # with AVX-VNNI where this CPU has it
    "avx2-no-vnni": ["-mno-avx512f", "-mno-avxvnni"],
    "avx512-no-vnni": ["-mno-avx512vnni"],  # AVX-512 without VNNI (Skylake-X): vpmaddwd + vpaddd
    "avx2-no-f16c": ["-mno-avx512f", "-mno-f16c"],  # q4_1v's float16 scales converted in software; float32 KV
}


@pytest.mark.parametrize("build", sorted(_BUILDS))
def test_every_build_matches_the_native_one(ck, tmp_path, build: str) -> None:  # type: ignore[no-untyped-def]
    """A CPU without AVX-512 gets the AVX2 loops, one without AVX2 and FMA the plain ones: build them here and
    compare them with this CPU's own build (with AVX-512 where it has it, so the two vector paths meet too)."""
    import ctypes
    import subprocess

    from aisandbox.runtime.torch.cpu_weights import cpu_flags

    if build.startswith(("avx2", "avx512")) and not {"avx512f", "avx512bw"} <= set(cpu_flags()):
        pytest.skip("this CPU has no AVX-512: its native build is the AVX2 one")
    cc = cpu_kernels._compiler()
    assert cc is not None
    out = tmp_path / f"{build}.so"
    flags = [*cpu_kernels.FLAGS, *_BUILDS[build]]
    subprocess.run([cc, *flags, "-o", str(out), str(cpu_kernels.SOURCE), "-lm"], check=True, timeout=120)
    plain = cpu_kernels.CpuKernels(ctypes.CDLL(str(out)), out)
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.05
    q4 = quantize_q4(w)
    with torch.inference_mode():
        for fmt in ("q4_1", "q4_1p", "q4_1v", "q8_1", "q8_0", "q8_0v"):
            native = make_linear(fmt, w, q4 if not fmt.startswith("q8_0") else None)
            slow = copy.copy(native)
            slow.fn = getattr(plain, native.fn.__name__)
            for rows in (1, 4, 5, 12, 17, 30):
                x = torch.randn(rows, 96)
                a, b = native(x), slow(x)
                assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (fmt, rows)
    # Decode attention over heads of 64 (the vector path natively), three query heads a KV head.
    hq, hk, d, rows, cols, cap = 6, 2, 64, 3, 37, 64
    qkv, cos, sin = torch.randn(rows, 1, (hq + 2 * hk) * d), torch.randn(rows, 1, d), torch.randn(rows, 1, d)
    start = torch.tensor([0, 4, 9])
    # Every build with F16C also reads and writes a float16 cache.
    assert plain.kv_half == (build not in ("plain", "avx2-no-f16c")) and ck.kv_half
    for dtype in (torch.float32, torch.float16) if plain.kv_half else (torch.float32,):
        outs = []
        for lib in (ck, plain):
            kb, vb = torch.ones(rows, hk, cap, d, dtype=dtype), torch.ones(rows, hk, cap, d, dtype=dtype)
            g = torch.Generator().manual_seed(1)
            kb[:, :, : cols - 1] = torch.randn(rows, hk, cols - 1, d, generator=g).to(dtype)
            vb[:, :, : cols - 1] = torch.randn(rows, hk, cols - 1, d, generator=g).to(dtype)
            qout, out = torch.empty(rows, 1, hq, d), torch.empty(rows, 1, hq * d)
            lib.rope_store_attend(
                qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), kb.data_ptr(), vb.data_ptr(), cap, 0, cols - 1,
                start.data_ptr(), None, rows, 1, hq, hk, d, qout.data_ptr(), out.data_ptr(), d**-0.5,
                int(dtype == torch.float16),
            )  # fmt: skip
            outs.append((out, kb[:, :, cols - 1].clone(), vb[:, :, cols - 1].clone()))
        assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-4), dtype
        assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2]), dtype  # the stored column


@pytest.mark.parametrize(("fmt", "kv_dtype"), [("q4_1", torch.float32), ("q8_0", torch.float32),
                                               ("q4_1v", torch.float32), ("q4_1v", torch.float16)])  # fmt: skip
def test_the_whole_stack_in_one_call_matches_the_layer_loop(ck, wide_heads, fmt: str, kv_dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """forward_layers (one C call for every layer, when each runs one of our block formats) against the Python
    loop over the same kernels: left padding, a cached prefix that must not be stored, then decode steps."""
    if kv_dtype == torch.float16 and not ck.kv_half:
        pytest.skip("this build has no F16C: the cache stays float32")
    model = copy.deepcopy(wide_heads[(6, 64)])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # norms of ones would hide a swapped norm
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
    choice = FormatChoice.every(fmt)
    fwd = CpuForward(model, choice, choice, None, ck)
    if not supports(fmt, 96, 96):
        pytest.skip(f"{fmt} is not served on this CPU")
    assert fmt in fwd._plans  # every layer of this model runs in the format: the one-call path is taken
    plans = fwd._plans
    starts, col, width = [2, 0, 5], 12, 12
    valid = torch.ones(3, width, dtype=torch.bool)
    valid[1, :4] = False  # row 1's first four columns came from the prefix cache
    out = {}
    with torch.inference_mode():
        for one_call in (False, True):
            fwd._plans = plans if one_call else {}
            kv = _kv(model, kv_dtype)
            for buf in kv.k + kv.v:
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(5)))
            logits = [_group_step(fwd, kv, starts, col, width, True, valid)]
            for step in range(3):
                logits.append(_decode(fwd, kv, starts, col + step, logits[-1].argmax(-1), True))
            out[one_call] = (torch.stack(logits), kv.k[-1][:3, :, : col + 3].clone())
    assert torch.equal(out[True][0], out[False][0])  # the same kernels in the same order: the same bits
    assert torch.equal(out[True][1], out[False][1])
