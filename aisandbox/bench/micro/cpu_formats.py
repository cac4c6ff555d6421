"""CPU weight formats side by side, in one process, on the default model (SmolLM2-135M from its GGUF).

Three measurements, each printed as a Markdown table:

* `steps`: ms per model forward at decode batch 1 and 16 (KV of 160 columns) and for a 37-token prefill,
  for transformers' forward with oneDNN-prepacked float32 Linears (the engine before `cpu_weights`), and for
  the lean forward in every weight format, with our C kernels between the multiplies and (for some formats)
  with PyTorch's ops there instead, and the `auto` choice. The variants are interleaved and repeated; the
  table gives the median and the ratio to the old path.
* `q4`: the largest difference between the 4-bit weights the engine runs (`q4_1.safetensors`, read by
  `cpu_weights.q4_1_blocks`) and gguf's own dequantization of the same GGUF tensors; also after the scales'
  rounding to bfloat16 that the int4 kernel needs.
* `agree`: greedy agreement with fp32 on 32 short chat prompts, 64 tokens each (all 32 decoded together
  through the real engine; `auto@1` one at a time; `auto/kv32` with a float32 KV cache), per format
  (`formats=int4,auto@1` to pick some):
  prompts whose 64 tokens are identical, and the mean count of tokens before the first difference.
* `profile`: where a decode step's time goes, by kind of op (torch.profiler), at batch 1 and 16, with PyTorch's
  ops between the multiplies (the first pass's view; for the C kernels' share, sample the engine with py-spy).

Run: `.venv/bin/python -m aisandbox.bench.micro.cpu_formats [steps] [q4] [agree] [profile] [threads=N]` (the
first three by default; threads=1 avoids OpenMP barriers, whose waits dominate on a busy 2-core machine).
The machine may be shared: read the ratios, which are measured interleaved, before the absolute numbers.
"""

from __future__ import annotations

import asyncio
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.torch import cpu_kernels
from aisandbox.runtime.torch.backend import TorchBackend, TorchEngineConfig, _SlotKV
from aisandbox.runtime.torch.cpu_forward import CpuForward, build_cpu_forward, load_q4_file, swap_linears
from aisandbox.runtime.torch.cpu_weights import FormatChoice, cpu_flags
from aisandbox.runtime.torch.default_model import find_default_gguf, prepare_default_model
from aisandbox.settings import ServerSettings

TOPICS = ["the sea", "a cat", "Paris", "rain", "a robot", "winter", "coffee", "the moon"]
FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "q4_1", "q8_1", "q8_0")


def chat_prompts(tokenizer, n: int = 32) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [
        tokenizer.encode_chat([{"role": "user", "content": f"Write a short story about {TOPICS[i % 8]} (#{i})."}])
        for i in range(n)
    ]


def steps(model_dir: Path, reps: int) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    cfg = model.config
    q4 = load_q4_file(model_dir)
    old = copy.deepcopy(model)
    swap_linears(old, FormatChoice.every("fp32"))
    variants: dict[str, object] = {"old (transformers fwd, fp32)": old}
    kernels = cpu_kernels.load()
    fused: set[str] = set()
    with torch.inference_mode():
        for fmt in FORMATS:
            body = FormatChoice.every(fmt)
            # The Q8_0 output layer stays Q8_0 under our 4/8-bit body formats, as `--weights-dtype` does.
            head = FormatChoice.every("q8_0") if fmt in ("q4_1", "q8_1") else body
            fwd = CpuForward(model, body, head, q4, kernels)
            if fmt in ("fp32", "fp16", "int4", "q4_1"):
                variants[f"lean {fmt}, PyTorch ops"] = fwd
            variants[f"lean {fmt}, C kernels"] = fwd
            fused.add(f"lean {fmt}, C kernels")
        auto, line = build_cpu_forward(model, "auto", q4)
        print(line)
        variants["lean auto"] = auto
        fused.add("lean auto")
    kv = _SlotKV(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
    kv.max_rows = 16
    kv.ensure(16, 256)
    for buf in kv.k + kv.v:
        buf.normal_()
    cache_kw = "past_key_values"

    def run(name: str, fwd: object, rows: int, q: int) -> float:
        ids = torch.randint(100, 1000, (rows, q))
        if q == 1:
            kv.rows, kv.write_col, kv.lo, kv.hi = slice(0, rows), 160, 0, 161
            pos = torch.full((rows, 1), 160)
            mask = None if rows == 1 else torch.ones((rows, 1, 1, 161), dtype=torch.bool)
        else:
            kv.rows, kv.write_col, kv.lo, kv.hi = slice(0, rows), 0, 0, q
            pos = torch.arange(q)[None].expand(rows, q)
            mask = torch.ones(q, q, dtype=torch.bool).tril()[None, None].expand(rows, 1, q, q)
        t0 = time.perf_counter()
        if isinstance(fwd, CpuForward):
            fwd(ids, pos, mask, kv, False, torch.zeros(rows, dtype=torch.long) if name in fused else None)
        else:
            if mask is None:
                mask = torch.ones((rows, 1, 1, 161), dtype=torch.bool)
            fwd(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **{cache_kw: kv}
            )  # type: ignore[operator]
        return 1e3 * (time.perf_counter() - t0)

    shapes = {"decode b=1": (1, 1), "decode b=16": (16, 1), "prefill 37 tok": (1, 37)}
    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(reps):
            for label, (rows, q) in shapes.items():
                for name, fwd in variants.items():
                    run(name, fwd, rows, q)  # warm
                    times.setdefault((name, label), []).append(run(name, fwd, rows, q))
    print(f"\nCPU flags: {' '.join(cpu_flags())}; {torch.get_num_threads()} threads; {reps} interleaved rounds\n")
    print("| forward | " + " | ".join(f"{s} ms | ratio" for s in shapes) + " |")
    print("|---|" + "--:|--:|" * len(shapes))
    base = {s: statistics.median(times[(next(iter(variants)), s)]) for s in shapes}
    for name in variants:
        cells = []
        for s in shapes:
            m = statistics.median(times[(name, s)])
            cells.append(f"{m:.1f} | {base[s] / m:.2f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")


_GROUPS = {
    "linears": ("_linear_pointwise", "_weight_int4pack_mm", "_weight_int8pack_mm", "aten::linear", "aten::mm",
                "aten::addmm"),
    "attention": ("scaled_dot_product_attention", "_scaled_dot_product", "flash_attention"),
    "KV writes/reads": ("aten::copy_", "aten::index", "aten::slice", "aten::select", "aten::where"),
    "dtype casts": ("aten::to", "aten::_to_copy"),
}  # fmt: skip


def profile(model_dir: Path) -> None:
    """Where one decode step's time goes (torch.profiler, self CPU time by kind of op; rest = Python)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    cfg = model.config
    q4 = load_q4_file(model_dir)
    kv = _SlotKV(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
    kv.max_rows = 16
    kv.ensure(16, 256)
    print("\n| decode step | wall ms | " + " | ".join(_GROUPS) + " | other ops | Python (wall - ops) |")
    print("|---|--:|" + "--:|" * (len(_GROUPS) + 2))
    with torch.inference_mode():
        for fmt, rows in (("int4", 1), ("fp32", 1), ("fp32", 16), ("int4", 16)):
            choice = FormatChoice.every(fmt)
            fwd = CpuForward(model, choice, choice, q4)
            ids = torch.randint(100, 1000, (rows, 1))
            pos = torch.full((rows, 1), 160)
            mask = None if rows == 1 else torch.ones((rows, 1, 1, 161), dtype=torch.bool)
            kv.rows, kv.write_col, kv.lo, kv.hi = slice(0, rows), 160, 0, 161
            for _ in range(3):
                fwd(ids, pos, mask, kv)
            n = 5
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(n):
                    fwd(ids, pos, mask, kv)
                wall = 1e3 * (time.perf_counter() - t0) / n
            sums = dict.fromkeys(_GROUPS, 0.0)
            other = 0.0
            for ev in prof.key_averages():
                ms = ev.self_cpu_time_total / 1e3 / n
                kind = next((g for g, keys in _GROUPS.items() if any(k in ev.key for k in keys)), None)
                if kind is None:
                    other += ms
                else:
                    sums[kind] += ms
            ops = sum(sums.values()) + other
            cells = " | ".join(f"{v:.1f}" for v in sums.values())
            print(f"| {fmt} b={rows} | {wall:.1f} | {cells} | {other:.1f} | {max(0.0, wall - ops):.1f} |", flush=True)


def q4_diff(model_dir: Path) -> None:
    import gguf
    from gguf.quants import dequantize

    from aisandbox.runtime.torch.default_model import _GGUF_TO_HF

    q4 = load_q4_file(model_dir)
    reader = gguf.GGUFReader(str(find_default_gguf()))
    cfg = __import__("json").loads((model_dir / "config.json").read_text())
    worst = worst_bf16 = 0.0
    count = 0
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1 or parts[0] != "blk":
            continue
        name = f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.weight"
        theirs = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        n = theirs.shape[0]
        if parts[2] in ("attn_q", "attn_k"):
            groups = cfg["num_attention_heads"] if parts[2] == "attn_q" else cfg["num_key_value_heads"]
            theirs = theirs[torch.arange(n).reshape(groups, n // groups // 2, 2).transpose(1, 2).reshape(n)]
        w = q4[name]
        worst = max(worst, float((w.dequantize() - theirs).abs().max()))
        # What the int4 kernel multiplies by: (q - 8) * bf16(scale) + bf16(low + 8 scale).
        s = w.scale.to(torch.bfloat16).float()
        z = (w.low + 8 * w.scale).to(torch.bfloat16).float()
        eff = (w.q.float() - 8).view(n, -1, 32) * s[..., None] + z[..., None]
        worst_bf16 = max(worst_bf16, float((eff.view(n, -1) - theirs).abs().max()))
        count += 1
    print(
        f"\nQ4_1 tensors: {count}; max abs diff vs gguf's dequantize: stored blocks {worst:.3g}, "
        f"as the int4 kernel reads them (bf16 scales) {worst_bf16:.3g}"
    )


def _greedy(model_dir: Path, fmt: str, prompts: list[list[int]], batch: int = 32, kv: str = "auto") -> list[list[int]]:
    """Greedy token ids from the torch backend itself (a host that records each request's tokens)."""
    import threading

    class Host:
        def __init__(self) -> None:
            self.ready, self.done = threading.Event(), threading.Event()
            self.out: dict[str, list[int]] = {}
            self.left = len(prompts)

        def loaded(self, info: object, tokenizer: object) -> None:
            self.ready.set()

        def failed(self, reason: str) -> None:
            raise SystemExit(f"engine failed: {reason}")

        def emit(self, deltas: list[tuple[str, object]]) -> None:
            for rid, delta in deltas:
                self.out.setdefault(rid, []).extend(delta.token_ids)  # type: ignore[attr-defined]
                if delta.finish_reason is not None:  # type: ignore[attr-defined]
                    self.left -= 1
                    if not self.left:
                        self.done.set()

    async def run() -> list[list[int]]:
        config = TorchEngineConfig(
            model_path=model_dir, dtype="float32", weights_dtype=fmt, max_batch_size=batch, kv_cache_dtype=kv
        )
        backend, host = TorchBackend(config), Host()
        backend.start(host)  # type: ignore[arg-type]
        await asyncio.to_thread(host.ready.wait, 600)
        sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        for i, ids in enumerate(prompts):
            backend.add(GenerationRequest(f"{fmt}-{i}", tuple(ids), sp))
        await asyncio.to_thread(host.done.wait, 1800)
        await backend.shutdown()
        return [host.out[f"{fmt}-{i}"] for i in range(len(prompts))]

    return asyncio.run(run())


def agree(model_dir: Path) -> None:
    from aisandbox.runtime.text.tokenizer import load_tokenizer

    prompts = chat_prompts(load_tokenizer(model_dir, "auto"))
    ref = _greedy(model_dir, "fp32", prompts)
    print("\n| weights | identical of 32 | mean tokens before first difference (of 64) |\n|---|--:|--:|")
    only = [f for f in sys.argv[1:] if f.startswith("formats=")]
    fmts = only[0].split("=", 1)[1].split(",") if only else ["fp16", "q4_1", "q8_1", "q8_0", "int4", "auto", "auto@1"]
    for fmt in fmts:
        # auto@1: one prompt at a time (max_batch_size 1), so auto's small-batch formats decode every token;
        # auto/kv32: a float32 KV cache (kv_cache_dtype; the default on the kernels' path is float16).
        spec, _, kv = fmt.partition("/kv")
        name, _, batch = spec.partition("@")
        got = _greedy(model_dir, name, prompts, int(batch or 32), {"": "auto", "32": "float32", "16": "float16"}[kv])
        same = sum(a == b for a, b in zip(ref, got, strict=True))
        prefix = [
            next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), 64)
            for a, b in zip(ref, got, strict=True)
        ]
        print(f"| {fmt} | {same} | {statistics.mean(prefix):.1f} |", flush=True)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith(("threads=", "formats="))]
    for a in sys.argv[1:]:
        if a.startswith("threads="):  # e.g. threads=1: no OpenMP barriers, steadier on a shared machine
            torch.set_num_threads(int(a.split("=", 1)[1]))
    what = set(args) or {"steps", "q4", "agree"}
    model_dir = prepare_default_model(ServerSettings().cache_dir)
    if "steps" in what:
        steps(model_dir, reps=7)
    if "q4" in what:
        q4_diff(model_dir)
    if "agree" in what:
        agree(model_dir)
    if "profile" in what:
        profile(model_dir)


if __name__ == "__main__":
    main()
