"""Print the headline ratios of docs/benchmarks.md from the result files of bench/run_report.sh.

python bench/headline.py bench/results
"""

from __future__ import annotations

import sys
from pathlib import Path

from aisandbox.bench.metrics import Aggregates
from aisandbox.bench.report import BenchResult, load_result

# Targets of the issue that introduced the benchmark.
MAX_HTTP_THROUGHPUT_COST = 0.03
"""The HTTP tier may cost at most 3% of engine-alone output tokens/s at 16 streams."""
MAX_HTTP_TTFT_COST_MS = 2.0
"""...and at most 2 ms of median TTFT."""
MIN_SPEEDUP_VS_PEER = 3.0
"""At 16 streams, at least 3x the output tokens/s of transformers serve --continuous-batching."""
MIN_SPEEDUP_VS_LLAMACPP_C1 = 1.5
"""...measured side by side: at least 1.5x llama.cpp's `llama-server`'s output tokens/s at one stream."""
MIN_SPEEDUP_VS_VLLM = 2.0
"""...at 16 streams, at least 2x vLLM-CPU's output tokens/s."""
MAX_C1_TTFT_MS = 30.0
"""...and median TTFT at one stream at most 30 ms (37-token chat prompts)."""
MAX_RESTART_SPREAD = 0.10
"""The 16-stream output tokens/s varies by less than 10% across the server's restarts ((max - min) / min)."""


def _at(result: BenchResult, label: str) -> Aggregates:
    for point in result.points:
        if point.label == label:
            return point.aggregates
    raise SystemExit(f"{result.label} has no point {label}")


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(folder: Path) -> None:
    """Print the ratios as Markdown bullets (peers whose result file is absent are left out)."""
    http = load_result(folder / "aisandbox-http.json")
    engine = load_result(folder / "aisandbox-engine.json")
    h16, e16 = _at(http, "C=16"), _at(engine, "C=16")
    h1 = _at(http, "C=1")

    http_ratio = h16.output_throughput / e16.output_throughput
    ttft_cost = (h16.ttft_ms.median or 0.0) - (e16.ttft_ms.median or 0.0)
    ttft_cost_c1 = (h1.ttft_ms.median or 0.0) - (_at(engine, "C=1").ttft_ms.median or 0.0)
    http_ok = 1.0 - http_ratio <= MAX_HTTP_THROUGHPUT_COST and ttft_cost <= MAX_HTTP_TTFT_COST_MS
    print()
    print("Headline ratios:")
    print()
    print(
        f"- HTTP vs engine alone at C=16: {http_ratio:.3f}x output tokens/s "
        f"({h16.output_throughput:.1f} vs {e16.output_throughput:.1f}); median TTFT {ttft_cost:+.1f} ms "
        f"({ttft_cost_c1:+.1f} ms at C=1). Target <= {MAX_HTTP_THROUGHPUT_COST:.0%} and <= "
        f"{MAX_HTTP_TTFT_COST_MS:g} ms: {_verdict(http_ok)}."
    )
    restarts = [http] + [load_result(f) for f in sorted(folder.glob("aisandbox-http-*.json"))]
    if len(restarts) > 1:
        figures = [_at(r, "C=16").output_throughput for r in restarts]
        spread = (max(figures) - min(figures)) / min(figures)
        print(
            f"- C=16 across {len(figures)} server starts: "
            + " / ".join(f"{f:.1f}" for f in figures)
            + f" output tokens/s, spread {spread:.1%}. Target < {MAX_RESTART_SPREAD:.0%}: "
            f"{_verdict(spread < MAX_RESTART_SPREAD)}."
        )
        starts = [folder / "probe.txt"] + sorted(folder.glob("probe-*.txt"))  # in the order of the starts
        probes = [p.read_text().strip().removeprefix("probe: ") for p in starts if p.is_file()]
        if probes:
            print("  The machine's own speed before each start: " + "; ".join(probes) + ".")
    longs = [folder / "long-aisandbox-http.json"] + sorted(folder.glob("long-aisandbox-http-*.json"))
    longs = [f for f in longs if f.is_file()]
    if longs:
        points = [_at(load_result(f), "C=16") for f in longs]
        figures = [p.output_throughput for p in points]
        spread = (max(figures) - min(figures)) / min(figures)
        print(
            f"- C=16 over {points[0].completed} prompts (about {points[0].duration_s:.0f} s a point) on the same "
            f"{len(figures)} starts: " + " / ".join(f"{f:.1f}" for f in figures) + f" output tokens/s, spread "
            f"{spread:.1%} (< {MAX_RESTART_SPREAD:.0%}: {_verdict(spread < MAX_RESTART_SPREAD)})."
        )
        vllm_long = folder / "long-vllm-cpu.json"
        if vllm_long.is_file():
            theirs = _at(load_result(vllm_long), "C=16").output_throughput
            print(
                f"  Against vLLM-CPU's point of the same length: {figures[0] / theirs:.2f}x "
                f"({figures[0]:.1f} vs {theirs:.1f}; >= {MIN_SPEEDUP_VS_VLLM:g}x: "
                f"{_verdict(figures[0] / theirs >= MIN_SPEEDUP_VS_VLLM)})."
            )
    peer_file = folder / "transformers-serve.json"
    if peer_file.is_file():
        peer = load_result(peer_file)
        p16, p1 = _at(peer, "C=16"), _at(peer, "C=1")
        speedup16 = h16.output_throughput / p16.output_throughput
        speedup1 = h1.output_throughput / p1.output_throughput
        print(
            f"- aisandbox vs transformers serve at C=1: {speedup1:.2f}x output tokens/s "
            f"({h1.output_throughput:.1f} vs {p1.output_throughput:.1f}); median TTFT "
            f"{h1.ttft_ms.median or 0:.0f} vs {p1.ttft_ms.median or 0:.0f} ms."
        )
        print(
            f"- aisandbox vs transformers serve at C=16: {speedup16:.2f}x output tokens/s "
            f"({h16.output_throughput:.1f} vs {p16.output_throughput:.1f}). Target >= {MIN_SPEEDUP_VS_PEER:g}x: "
            f"{_verdict(speedup16 >= MIN_SPEEDUP_VS_PEER)}."
        )
    ttft1 = h1.ttft_ms.median or 0.0
    print(
        f"- aisandbox at C=1: {h1.output_throughput:.1f} output tokens/s; median TTFT {ttft1:.1f} ms "
        f"(target <= {MAX_C1_TTFT_MS:g}: {_verdict(ttft1 <= MAX_C1_TTFT_MS)})."
    )
    llamacpp_file = folder / "llamacpp.json"
    if llamacpp_file.is_file():
        llamacpp = load_result(llamacpp_file)
        for label in ("C=1", "C=16"):
            ours, theirs = _at(http, label), _at(llamacpp, label)
            ratio = ours.output_throughput / theirs.output_throughput
            target = (
                f" Target >= {MIN_SPEEDUP_VS_LLAMACPP_C1:g}x: {_verdict(ratio >= MIN_SPEEDUP_VS_LLAMACPP_C1)}."
                if label == "C=1"
                else ""
            )
            print(
                f"- aisandbox vs llama.cpp's server at {label}: {ratio:.2f}x "
                f"output tokens/s ({ours.output_throughput:.1f} vs {theirs.output_throughput:.1f}); median TTFT "
                f"{ours.ttft_ms.median or 0:.0f} vs {theirs.ttft_ms.median or 0:.0f} ms.{target}"
            )
    vllm_file = folder / "vllm-cpu.json"
    if not vllm_file.is_file():
        print("- vLLM-CPU: not run (not installed); no ratio.")
        return
    vllm = load_result(vllm_file)
    for label in ("C=1", "C=4", "C=16"):
        ours, theirs = _at(http, label), _at(vllm, label)
        ratio = ours.output_throughput / theirs.output_throughput
        target = (
            f" Target >= {MIN_SPEEDUP_VS_VLLM:g}x: {_verdict(ratio >= MIN_SPEEDUP_VS_VLLM)}." if label == "C=16" else ""
        )
        print(
            f"- aisandbox vs vLLM-CPU at {label}: {ratio:.2f}x output tokens/s "
            f"({ours.output_throughput:.1f} vs {theirs.output_throughput:.1f}).{target}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results"))
