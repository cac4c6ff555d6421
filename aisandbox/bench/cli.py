"""`aisandbox bench`: measure the latency and throughput of an OpenAI-compatible endpoint.

    aisandbox bench --base-url http://127.0.0.1:8000/v1 --concurrency 1,4,16 --num-prompts 32
    aisandbox bench --engine local --concurrency 1,4,16          # the same workload, in process, no HTTP
    aisandbox bench --compare ours.json theirs.json              # two or more runs side by side

Prints a Markdown table, writes every request's timings and the aggregates to a JSON file, and plots.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from aisandbox.bench.client import (
    GenerationOptions,
    HttpClient,
    HttpClientConfig,
    Prompt,
    RequestClient,
    RequestError,
)
from aisandbox.bench.metrics import compute_aggregates, parse_slo
from aisandbox.bench.report import (
    BenchResult,
    PointResult,
    compare_markdown,
    latency_markdown,
    load_result,
    summary_markdown,
    write_result,
)
from aisandbox.bench.runner import LoadPoint, PointRun, RunLimits, run_point
from aisandbox.bench.workload import DatasetSpec, HFTextTokenizer, SyntheticSpec, load_jsonl, synthetic_prompts

__all__ = ["add_arguments", "run"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrencies must be at least 1")
    return values


def _rate_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected rates like 1,2.5,inf: {text!r}") from exc
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("request rates must be positive")
    return values


def _slo(text: str) -> dict[str, float]:
    try:
        return parse_slo(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `bench` options to its subparser."""
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL, ending in /v1")
    target.add_argument("--model", help="model id to send (default: the first of GET /models)")
    target.add_argument("--api-key", help="sent as a Bearer token")
    target.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    target.add_argument(
        "--engine", choices=("http", "local"), default="http",
        help="http: the server at --base-url; local: aisandbox's engine in this process, without HTTP",
    )  # fmt: skip
    target.add_argument(
        "--engine-setting", action="append", default=[], metavar="KEY=VALUE",
        help="a ServerSettings field for --engine local (e.g. model=/path, dtype=float32); repeatable",
    )  # fmt: skip
    target.add_argument("--wait-ready", type=float, default=60.0, metavar="S", help="wait this long for GET /models")
    target.add_argument(
        "--null-engine",
        action="store_true",
        help="measure the HTTP tier alone: start `serve --null-engine` on one core, stream from another "
        "(--concurrency sets the stream counts, default 1,16,64,256)",
    )

    load = parser.add_argument_group("load")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=_int_list, help="closed-loop concurrencies to sweep, e.g. 1,4,16")
    mode.add_argument("--request-rate", type=_rate_list, help="open-loop Poisson rates (req/s) to sweep, e.g. 1,4,inf")
    load.add_argument("--max-concurrency", type=int, help="cap on requests in flight under --request-rate")
    load.add_argument("--num-prompts", type=int, default=32, help="measured requests per load point")
    load.add_argument(
        "--warmup", type=int, metavar="N",
        help="unrecorded requests before each load point (default: as many as the point keeps in flight)",
    )  # fmt: skip
    load.add_argument("--duration", type=float, metavar="S", help="stop sending new requests after S s per point")
    load.add_argument("--request-timeout", type=float, default=300.0, metavar="S")
    load.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the Poisson arrivals")

    work = parser.add_argument_group("workload")
    work.add_argument("--dataset", type=Path, help="JSONL of prompts, messages or ShareGPT conversations")
    work.add_argument("--input-len", type=int, default=128, help="synthetic prompt length (tokens with --tokenizer)")
    work.add_argument("--output-len", type=int, default=64, help="max_tokens (for dataset lines without one too)")
    work.add_argument("--range-ratio", type=float, default=0.0, help="lengths drawn from len*(1±r)")
    work.add_argument("--tokenizer", type=Path, help="local Hugging Face tokenizer folder: exact prompt lengths")
    work.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    work.add_argument(
        "--ignore-eos", choices=("auto", "on", "off"), default="auto",
        help="send ignore_eos and min_tokens=max_tokens (auto: when the server accepts them)",
    )  # fmt: skip
    work.add_argument("--no-usage", action="store_true", help="do not ask for stream_options.include_usage")
    work.add_argument("--extra-body", type=_json_object, default={}, help="JSON merged into every request body")

    out = parser.add_argument_group("output")
    out.add_argument("--label", help="name of the run in tables, plots and file names")
    out.add_argument("--output", type=Path, help="result JSON (default: bench-results/LABEL.json)")
    out.add_argument("--slo", type=_slo, help="goodput SLOs, e.g. ttft=500ms,tpot=50ms")
    out.add_argument("--plot-dir", type=Path, help="where the PNGs go (default: beside the result JSON)")
    out.add_argument("--no-plots", action="store_true", help="write no PNGs")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--compare", nargs="+", type=Path, metavar="JSON", help="render these result files side by side")


def _notice(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def _points(args: argparse.Namespace) -> list[LoadPoint]:
    if args.request_rate:
        return [LoadPoint(request_rate=r, max_concurrency=args.max_concurrency) for r in args.request_rate]
    return [LoadPoint(concurrency=c) for c in (args.concurrency or [1])]


def _prompts(args: argparse.Namespace, count: int, seed: int, tokenizer: HFTextTokenizer | None) -> list[Prompt]:
    if args.dataset is not None:
        return load_jsonl(DatasetSpec(args.dataset, count, args.output_len, seed), tokenizer)
    spec = SyntheticSpec(count, args.input_len, args.output_len, args.range_ratio, seed)
    return synthetic_prompts(spec, tokenizer)


def _warmup_count(args: argparse.Namespace) -> int:
    """Warm-up prompts needed by the widest point."""
    if args.warmup is not None:
        return max(0, int(args.warmup))
    return max(p.concurrency or p.max_concurrency or 1 for p in _points(args))


_WARMUP_SEED_OFFSET = 1_000_003
"""Warm-up prompts come from another seed: distinct from the measured ones, same distribution."""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _environment() -> dict[str, Any]:
    """The benchmarking machine and the versions in this process."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "event_loop": "uvloop" if _loop_factory() else "asyncio",
        "versions": {p: _version(p) for p in ("aisandbox", "httpx", "numpy", "transformers", "torch")},
    }


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed, as uvicorn picks it for the server: the client then costs less CPU, and the
    engine-alone baseline runs on the same event loop as `aisandbox serve`."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages: another busy process on the machine shows here."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _config(args: argparse.Namespace, options: GenerationOptions, limits: RunLimits) -> dict[str, Any]:
    return {
        "engine": args.engine,
        "endpoint": options.endpoint,
        "model": options.model,
        "temperature": options.temperature,
        "fixed_length": options.fixed_length,
        "include_usage": options.include_usage,
        "extra_body": dict(options.extra_body),
        "dataset": str(args.dataset) if args.dataset else None,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "range_ratio": args.range_ratio,
        "tokenizer": str(args.tokenizer) if args.tokenizer else None,
        "seed": limits.seed,
        "warmup": limits.warmup if limits.warmup is not None else "one per concurrency slot",
        "duration_s": limits.duration_s,
        "request_timeout_s": limits.request_timeout_s,
    }


async def _probe_until_ready(client: HttpClient, options: GenerationOptions, deadline: float) -> RequestError | None:
    """Probe until the server stops answering 503 (still loading) or the deadline passes."""
    while True:
        error = await client.probe(options)
        if error is None or error.status not in ("503", "connection") or time.monotonic() >= deadline:
            return error
        await asyncio.sleep(0.5)


async def _http_client(args: argparse.Namespace, options: GenerationOptions, pool: int) -> HttpClient:
    """Connect, wait for the server, pick the model, and settle whether lengths can be fixed."""
    config = HttpClientConfig(args.base_url, args.api_key, pool, args.request_timeout)
    client = HttpClient(config, options)
    try:
        models = await client.wait_ready(args.wait_ready)
        if not options.model:
            if not models:
                raise RuntimeError(f"{args.base_url}/models lists no model; pass --model")
            client.options = options = replace(options, model=models[0])
        plain = replace(options, fixed_length=False)
        if args.ignore_eos == "off":
            client.options = plain
        error = await _probe_until_ready(client, client.options, time.monotonic() + args.wait_ready)
        if error is not None and args.ignore_eos == "auto" and client.options.fixed_length:
            _notice(
                f"server refused ignore_eos/min_tokens ({error.status}: {error.message[:120]}); output lengths vary"
            )
            client.options = plain
            error = await client.probe(plain)
        if error is not None:
            raise RuntimeError(f"the server refused a probe request: {error.status} {error.message}")
    except BaseException:
        await client.aclose()
        raise
    return client


async def _local_client(args: argparse.Namespace, options: GenerationOptions) -> RequestClient:
    from aisandbox.bench.local_engine import LocalEngineClient, parse_settings

    settings = parse_settings(args.engine_setting)
    _notice("loading the local engine")
    return await LocalEngineClient.start(settings, options)


@dataclass(frozen=True, slots=True)
class Workload:
    """The measured prompts and the warm-up prompts."""

    prompts: list[Prompt]
    warmup: list[Prompt]


def _point_result(run: PointRun, slo: dict[str, float] | None) -> PointResult:
    return PointResult(
        label=run.point.label,
        concurrency=run.point.concurrency,
        request_rate=run.point.request_rate,
        max_concurrency=run.point.max_concurrency,
        aggregates=compute_aggregates(run.records, run.duration_s, slo),
        requests=run.records,
    )


async def _bench(args: argparse.Namespace, workload: Workload, tokenizer: HFTextTokenizer | None) -> BenchResult:
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    options = GenerationOptions(
        model=args.model or "",
        endpoint=args.endpoint,
        temperature=args.temperature,
        fixed_length=args.ignore_eos != "off",
        include_usage=not args.no_usage,
        extra_body=args.extra_body,
    )
    environment = {**_environment(), "loadavg_start": _loadavg()}
    points = _points(args)
    limits = RunLimits(args.warmup, args.duration, args.request_timeout, args.seed, not args.no_progress)
    pool = max(p.concurrency or p.max_concurrency or args.num_prompts for p in points)
    client = await (_local_client(args, options) if args.engine == "local" else _http_client(args, options, pool))
    try:
        options = client.options
        target = await client.describe()
        runs = []
        counter = tokenizer.count if tokenizer else None
        for point in points:
            _notice(f"{point.label}: {len(workload.prompts)} requests")
            runs.append(await run_point(client, workload.prompts, point, limits, counter, workload.warmup))
    finally:
        await client.aclose()
    label = args.label or f"{options.model}-{args.engine}"
    return BenchResult(
        label=label,
        created=created,
        command=["aisandbox", *sys.argv[1:]] if sys.argv[1:2] == ["bench"] else list(sys.argv),
        config=_config(args, options, limits),
        environment={**environment, "loadavg_end": _loadavg()},
        target=target,
        points=[_point_result(r, args.slo) for r in runs],
    )


def _compare(args: argparse.Namespace) -> int:
    results = [load_result(p) for p in args.compare]
    print(compare_markdown(results))
    if not args.no_plots:
        from aisandbox.bench.plots import plot_all

        folder = args.plot_dir or (args.output.parent if args.output else Path("bench-results"))
        for path in plot_all(results, folder, _slug(args.label or "compare")):
            _notice(f"wrote {path}")
    return 0


def _null_engine(args: argparse.Namespace) -> int:
    from aisandbox.bench.tier import run_tier, tier_markdown

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server, client = ({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 else (None, None)
    _notice(f"null engine: server on CPU {sorted(server or [])}, client on CPUs {sorted(client or [])}")
    try:
        points = run_tier(args.concurrency or [1, 16, 64, 256], server_cpus=server, client_cpus=client)
    except RuntimeError as exc:
        _notice(f"error: {exc}")
        return 2
    print(tier_markdown(points))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the benchmark (or render a comparison); return the exit status."""
    if args.null_engine:
        return _null_engine(args)
    if args.compare:
        if len(args.compare) < 2:
            _notice("--compare needs at least two result files")
            return 2
        return _compare(args)
    try:
        tokenizer = HFTextTokenizer(args.tokenizer) if args.tokenizer else None
        warmup = _warmup_count(args)
        workload = Workload(
            prompts=_prompts(args, args.num_prompts, args.seed, tokenizer),
            warmup=_prompts(args, warmup, args.seed + _WARMUP_SEED_OFFSET, tokenizer) if warmup else [],
        )
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            result = runner.run(_bench(args, workload, tokenizer))
    except (RuntimeError, ValueError, OSError, httpx.HTTPError) as exc:
        _notice(f"error: {exc}")
        return 2
    output = args.output or Path("bench-results") / f"{_slug(result.label)}.json"
    write_result(result, output)
    print(f"## {result.label}\n\n{summary_markdown(result)}\n\n{latency_markdown(result)}")
    _notice(f"wrote {output}")
    if not args.no_plots:
        from aisandbox.bench.plots import plot_all

        for path in plot_all([result], args.plot_dir or output.parent, output.stem):
            _notice(f"wrote {path}")
    failed = sum(p.aggregates.failed for p in result.points)
    completed = sum(p.aggregates.completed for p in result.points)
    return 1 if completed == 0 and failed > 0 else 0
