"""Engine TTFT at one stream, prompts sharing the chat template's prefix, with the prefix cache's hits.

Sends 12 chat prompts of 8 words one after another to the torch backend (default model, `auto` weights) and
prints each one's time to first token and the cached prompt tokens. Run it from two trees to compare (e.g.
`git archive <commit> | tar -x -C /tmp/old`):

    .venv/bin/python -m aisandbox.bench.micro.prefix_ttft
    PYTHONPATH=/tmp/old .venv/bin/python -m aisandbox.bench.micro.prefix_ttft
"""

import asyncio
import threading
import time

from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.text.tokenizer import load_tokenizer
from aisandbox.runtime.torch.backend import TorchBackend, TorchEngineConfig, _PrefixCache

WORDS = "alpha beta gamma delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa"
words = WORDS.split(" ")


class Host:
    def __init__(s):
        s.ready = threading.Event()
        s.first = {}
        s.done = {}

    def loaded(s, *a):
        s.ready.set()

    def failed(s, r):
        print("failed", r)

    def emit(s, deltas):
        now = time.perf_counter()
        for rid, d in deltas:
            s.first.setdefault(rid, now)
            if d.finish_reason is not None:
                s.done[rid] = now


async def main():
    from aisandbox.runtime.torch.default_model import prepare_default_model
    from aisandbox.settings import ServerSettings

    d = prepare_default_model(ServerSettings().cache_dir)
    tok = load_tokenizer(d, "auto")
    b = TorchBackend(TorchEngineConfig(model_path=d, dtype="float32"))
    h = Host()
    b.start(h)
    await asyncio.to_thread(h.ready.wait, 300)
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    ttfts = []
    for i in range(12):
        ids = tok.encode_chat([{"role": "user", "content": " ".join(words[(i + j) % 16] for j in range(8))}])
        rid = f"r{i}"
        t0 = time.perf_counter()
        b.add(GenerationRequest(rid, tuple(ids), sp))
        while rid not in h.done:
            await asyncio.sleep(0.001)
        ttfts.append(1e3 * (h.first[rid] - t0))
    print("BLOCK", _PrefixCache.BLOCK, "prompt", len(ids), "hits", b._prefix.hits, "ttft ms", [round(x) for x in ttfts])
    await b.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
