"""The lean CPU forward against transformers' own, on a tiny random Llama (prefill then decode, slot KV)."""

from __future__ import annotations

import copy

import pytest
import torch

from aisandbox.runtime.torch.backend import _SlotKV
from aisandbox.runtime.torch.cpu_forward import CpuForward, build_cpu_forward, lean_unsupported, swap_linears
from aisandbox.runtime.torch.cpu_weights import FormatChoice
from tests.conftest import build_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama():  # type: ignore[no-untyped-def]
    return build_tiny_llama()


def _run(fwd, model, prompt: list[int], steps: int) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """Prefill `prompt` then decode `steps` greedy tokens; the logits of each step."""
    cfg = model.config
    kv = _SlotKV(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
    kv.ensure(1, 64)
    n = len(prompt)
    kv.rows, kv.write_col, kv.lo, kv.hi = slice(0, 1), 0, 0, n
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    logits = [fwd(torch.tensor([prompt]), torch.arange(n)[None], mask, kv)]
    for step in range(steps):
        col = n + step
        kv.write_col, kv.hi = col, col + 1
        token = int(logits[-1].argmax())
        logits.append(fwd(torch.tensor([[token]]), torch.tensor([[col]]), None, kv))
    return logits


def _reference(model, prompt: list[int], steps: int) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    ids = list(prompt)
    out = []
    for _ in range(steps + 1):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        out.append(logits[None])
        ids.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("fmt, tol", [("fp32", 1e-4), ("bf16", 0.05), ("int8", 0.05), ("int4", 0.15)])
def test_lean_forward_matches_transformers(tiny_llama, fmt: str, tol: float) -> None:  # type: ignore[no-untyped-def]
    assert lean_unsupported(tiny_llama) is None
    choice = FormatChoice.every(fmt)
    prompt = [1, 17, 42, 99, 7, 3, 250, 11]
    with torch.inference_mode():
        ours = _run(CpuForward(tiny_llama, choice, choice), tiny_llama, prompt, 6)
        ref = _reference(tiny_llama, prompt, 6)
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max() <= tol * b.abs().max(), fmt
    if fmt == "fp32":
        assert [int(t.argmax()) for t in ours] == [int(t.argmax()) for t in ref]


def test_other_architectures_keep_transformers_forward(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    model = copy.deepcopy(tiny_llama)
    model.config.model_type = "something-else"
    with torch.inference_mode():
        ids = torch.tensor([[1, 5, 9, 200]])
        before = model(input_ids=ids).logits
        fwd, line = build_cpu_forward(model, "fp32")
        after = model(input_ids=ids).logits
    assert fwd is None and "transformers' forward" in line
    assert torch.allclose(before, after, atol=1e-4)


def test_auto_measures_and_logs_its_choice(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        fwd, line = build_cpu_forward(copy.deepcopy(tiny_llama), "auto", budget_s=0.05)
    assert isinstance(fwd, CpuForward)
    assert "CPU flags [" in line and "rows<=1:" in line and "head rows<=1:" in line
    # No 4-bit source for the head: auto never requantizes the output layer to 4 bits.
    assert "head rows<=1: int4" not in line


def test_swap_linears_keeps_bias(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32))
    x = torch.randn(3, 64)
    with torch.inference_mode():
        ref = layer(x)
        assert swap_linears(layer, FormatChoice.every("fp32")) == 1
        assert torch.allclose(layer(x), ref, atol=1e-5)


def test_auto_dtype_is_the_tuned_float32_path_on_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16-capable CPUs used to get bfloat16 by default, which skips the lean forward and the kernels."""
    import torch

    from aisandbox.runtime.torch.backend import pick_dtype

    assert pick_dtype("cpu", "auto") is torch.float32
    assert pick_dtype("cuda", "auto") is torch.bfloat16
    assert pick_dtype("cpu", "bfloat16") is torch.bfloat16


def test_the_auto_choice_is_cached_per_machine_and_model(
    tiny_llama: torch.nn.Module, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stable choice: timed once, cached next to the kernels, reused by later starts; --retime-cpu-formats
    times it again; a choice timed while the machine is busy is used but not kept."""
    from aisandbox.runtime.torch import cpu_forward

    calls = 0
    measure = cpu_forward.measure_formats

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return measure(*args, **kwargs)

    monkeypatch.setattr(cpu_forward, "measure_formats", counting)
    monkeypatch.setattr(cpu_forward, "_busy", lambda: "; busy")
    with torch.inference_mode():
        _, line = build_cpu_forward(copy.deepcopy(tiny_llama), "auto", budget_s=0.05, cache_dir=tmp_path)
        assert "not cached" in line and not list(tmp_path.glob("formats-*.json"))
        monkeypatch.setattr(cpu_forward, "_busy", lambda: "")
        _, line = build_cpu_forward(copy.deepcopy(tiny_llama), "auto", budget_s=0.05, cache_dir=tmp_path)
        assert "measured and cached" in line and len(list(tmp_path.glob("formats-*.json"))) == 1
        timed = calls
        fwd, line = build_cpu_forward(copy.deepcopy(tiny_llama), "auto", budget_s=0.05, cache_dir=tmp_path)
        assert "choice cached" in line and calls == timed and fwd is not None  # no timing at this start
        _, line = build_cpu_forward(copy.deepcopy(tiny_llama), "auto", budget_s=0.05, cache_dir=tmp_path, retime=True)
        assert "measured and cached" in line and calls > timed


def test_the_choice_is_timed_until_two_timings_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """A noisy moment must not decide the cached choice: timings repeat until two in a row choose alike (at most
    CHOICE_TIMINGS), and the choice comes from each format's best time over them."""
    from aisandbox.runtime.torch import cpu_forward
    from aisandbox.runtime.torch.cpu_weights import BUCKETS

    def timings(fast: str) -> dict[tuple[str, int], float]:
        return {(f, r): (1.0 if f == fast else 2.0) for f in ("fp32", "q4_1") for r in BUCKETS}

    shapes, head = [(64, 64, 2)], (0, 64)
    rounds = iter([timings("q4_1"), timings("q4_1"), timings("fp32")])
    monkeypatch.setattr(cpu_forward, "measure_formats", lambda *a, **k: next(rounds))
    body, _, note = cpu_forward._timed_choice(shapes, ["fp32", "q4_1"], head, ["fp32"], 0.01)
    assert body.by_bucket == ("q4_1",) * len(BUCKETS) and "2 timings agreed" in note
    assert next(rounds) == timings("fp32")  # the third was never taken

    # A busy neighbour made fp32 look slow once: the next two timings disagree with it and with each other.
    noisy = {("fp32", r): 5.0 for r in BUCKETS} | {("q4_1", r): 2.0 for r in BUCKETS}
    rounds = iter([noisy, timings("fp32"), timings("q4_1")])
    body, _, note = cpu_forward._timed_choice(shapes, ["fp32", "q4_1"], head, ["fp32"], 0.01)
    assert "3 timings disagreed" in note
    # best times: fp32 1.0 (second timing), q4_1 1.0 (third): a tie, which fp32 (exact) wins within the margin
    assert body.by_bucket == ("fp32",) * len(BUCKETS)


def test_auto_keeps_rounding_formats_off_a_gguf_source(tiny_llama: torch.nn.Module, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With a GGUF source auto never times bf16, int8, int4 or q8_0 for the body (they round its values: bf16 in
    the output layer alone cost 19 of 32 identical prompts at 32 streams), even on a CPU with bf16 instructions."""
    from aisandbox.runtime.torch import cpu_forward
    from aisandbox.runtime.torch.cpu_weights import quantize_q4

    timed: list[list[str]] = []

    def record(shapes, allowed, *args, **kwargs):  # type: ignore[no-untyped-def]
        timed.append(list(allowed))
        return {}

    monkeypatch.setattr(cpu_forward, "measure_formats", record)
    monkeypatch.setattr(cpu_forward, "cpu_flags", lambda: ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"])
    q4 = {name: quantize_q4(p.detach()) for name, p in tiny_llama.named_parameters() if name.endswith("proj.weight")}
    with torch.inference_mode():
        build_cpu_forward(copy.deepcopy(tiny_llama), "auto", q4, budget_s=0.01)
    body, head = timed[0], timed[1]
    assert not {"bf16", "int8", "int4", "q8_0"} & set(body) and "fp32" in body
    assert "bf16" not in head and "q8_0" in head  # the GGUF's Q8_0 output layer, held exactly
    timed.clear()
    with torch.inference_mode():
        build_cpu_forward(copy.deepcopy(tiny_llama), "auto", None, budget_s=0.01)
    assert "bf16" in timed[0]  # no GGUF: bf16 is timed where the CPU has bf16 instructions
