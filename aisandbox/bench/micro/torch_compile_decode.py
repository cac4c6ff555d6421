"""torch.compile (inductor, C++ wrapper) of transformers' forward for SmolLM2 on CPU with a static KV cache:
compile time and ms per generated token (greedy, 64 tokens, one 37-token chat prompt) against the same model
uncompiled, and whether the tokens are the same.

The issue's second item (compile the decode step, keep compile time visible and cached) measured: see
docs/benchmarks.md, "CPU decode speed, third pass". Run (minutes: it compiles):
`.venv/bin/python -m aisandbox.bench.micro.torch_compile_decode`
"""

import time

import torch
import torch._inductor.config as ic
from transformers import AutoModelForCausalLM, AutoTokenizer

from aisandbox.runtime.torch.default_model import prepare_default_model
from aisandbox.settings import ServerSettings


def main() -> None:
    ic.cpp_wrapper = True
    d = prepare_default_model(ServerSettings().cache_dir)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Write a short story about the sea (#0)."}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    kw = dict(max_new_tokens=64, do_sample=False, cache_implementation="static", min_new_tokens=64)

    def gen(m):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = m.generate(ids, **kw)
        return time.perf_counter() - t, out

    with torch.inference_mode():
        gen(model)
        eager = min(gen(model)[0] for _ in range(2))
        print(f"eager: {eager * 1e3 / 64:.1f} ms/token (64 tokens incl. prefill)", flush=True)
        model.forward = torch.compile(model.forward, dynamic=False, fullgraph=False)
        first, out_c = gen(model)
        print(f"first compiled generate (compiles): {first:.1f} s", flush=True)
        comp = min(gen(model)[0] for _ in range(3))
        print(
            f"compiled: {comp * 1e3 / 64:.1f} ms/token; same tokens as eager: {torch.equal(out_c, gen(model)[1])}",
            flush=True,
        )


if __name__ == "__main__":
    main()
