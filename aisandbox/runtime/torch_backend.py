"""The torch backend: any Hugging Face causal LM, batched in flight, on CPU or GPU.

Why not transformers' own continuous batching (`model.generate_batch` / `ContinuousBatchingManager`)? In
transformers 5.24 a request may override temperature, top-k and top-p, but not its seed, min-p, repetition
penalty, min_tokens or ignore_eos, and it measured about half our throughput on the default model here
(`bench/engine_vs_transformers_cb.py`: 5.8 vs 14.8 tok/s at one sequence, 42.0 vs 83.3 at 16). So this module
schedules itself, with transformers still running the model's forward:

* One thread owns the model. Requests arrive through a thread-safe inbox; each engine step's deltas cross
  into asyncio with a single `loop.call_soon_threadsafe`.
* KV lives in per-layer buffers `[rows, kv_heads, cols, head_dim]`, one row per running sequence, with every
  row's next token written at the same column. A new group of requests is prefilled straight into free rows,
  left-padded so that its last prompt token sits just before that shared column; a finished row is refilled
  by moving the last row into it. Nothing is concatenated per step, and attention only spans the columns
  that some running row still uses.
* The attention mask is built here, 4-D, and passed to the model as is; position ids are per row.
* Prompt prefixes are cached in blocks of 16 tokens (chat templates share their system prompt), so a new
  request copies their KV into its row and prefills only the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import queue
import random
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from aisandbox.errors import EngineDead, EngineNotReady, InvalidRequest, Overloaded
from aisandbox.runtime.collector import RequestHandle
from aisandbox.runtime.cpu_forward import CpuForward, build_cpu_forward, load_q4_file, release_decoder_layers
from aisandbox.runtime.tokenizer import Tokenizer, load_tokenizer
from aisandbox.runtime.types import (
    EngineState,
    EngineStats,
    FinishReason,
    GenerationRequest,
    Health,
    ModelInfo,
    SamplingParams,
    TokenDelta,
)

__all__ = ["TorchEngine", "TorchEngineConfig", "pick_dtype"]

log = logging.getLogger(__name__)

_INITIAL_COLS = 256


@dataclass(frozen=True, slots=True)
class TorchEngineConfig:
    """What the torch engine needs to load and schedule."""

    model_path: Path | None
    """A Hugging Face folder; None converts (once) and serves the default model."""
    cache_dir: Path | None = None
    """Where the default model is converted to."""
    device: str = "auto"
    dtype: str = "auto"
    tokenizer_mode: str = "auto"
    max_batch_size: int = 32
    max_prefill_tokens: int = 512
    max_model_len: int | None = None
    max_queue: int = 256
    threads: int | None = None
    prefix_cache_mb: int = 256
    weights_dtype: str = "auto"
    """CPU float32 models: linear-layer weight format, `auto` (measured per row count at load), fp32 (exact),
    bf16, int8 or int4 (see `cpu_weights`)."""


def pick_dtype(device: str, requested: str) -> torch.dtype:
    """Resolve `auto`: bfloat16 on CUDA and on CPUs with native bf16 (AMX or AVX512-BF16), else float32."""
    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if device.startswith("cuda"):
        return torch.bfloat16
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text().split()
        if "amx_bf16" in flags or "avx512_bf16" in flags:
            return torch.bfloat16
    return torch.float32


@dataclass(eq=False, slots=True)
class _Seq:
    """One running or waiting sequence, owned by the engine thread."""

    request: GenerationRequest
    handle: RequestHandle
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    start_col: int = 0  # first KV column of this row
    arrived: float = field(default_factory=time.monotonic)

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling


class _PrefixCache:
    """KV of prompt prefixes, in blocks of BLOCK tokens, least recently used first out of a byte budget.

    A block is keyed by a chained hash of every token up to its end, as in vLLM's automatic prefix caching,
    so chat prompts that share a system prompt or a conversation's earlier turns skip that part of prefill.
    """

    BLOCK = 16

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.hits = self.queries = 0
        self._blocks: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _keys(self, tokens: tuple[int, ...], upto: int) -> list[int]:
        keys, h = [], 0
        for end in range(self.BLOCK, upto + 1, self.BLOCK):
            h = hash((h, tokens[end - self.BLOCK : end]))
            keys.append(h)
        return keys

    def lookup(self, tokens: tuple[int, ...]) -> tuple[int, list[torch.Tensor]]:
        """The longest cached prefix that leaves at least one token to run: (its length, its blocks)."""
        if not self.budget:
            return 0, []
        found: list[torch.Tensor] = []
        for key in self._keys(tokens, len(tokens) - 1):
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
        self.queries += len(tokens)
        self.hits += len(found) * self.BLOCK
        return len(found) * self.BLOCK, found

    def store(self, tokens: tuple[int, ...], cached: int, read: Any) -> None:
        """Keep the prompt's full blocks after the first `cached` tokens; read(lo, hi) returns their KV."""
        if not self.budget:
            return
        for i, key in enumerate(self._keys(tokens, len(tokens))):
            lo = i * self.BLOCK
            if lo < cached or key in self._blocks:
                continue
            block = read(lo, lo + self.BLOCK)
            self._blocks[key] = block
            self.used += block.numel() * block.element_size()
            while self.used > self.budget and self._blocks:
                _, old = self._blocks.popitem(last=False)
                self.used -= old.numel() * old.element_size()


class _SlotKV:
    """Per-layer KV buffers shared by all running rows; duck-types transformers' `Cache.update`.

    Before each forward the scheduler sets which rows run (`rows`), the buffer column of the first query
    token (`write_col`) and the span of columns attention reads (`lo`..`hi`).
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.max_rows = 1
        self.shape = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.rows_cap, self.cols_cap = 0, 0
        self.k: list[torch.Tensor] = [torch.empty(0) for _ in range(layers)]
        self.v: list[torch.Tensor] = [torch.empty(0) for _ in range(layers)]
        self.rows = slice(0, 0)
        self.write_col = self.lo = self.hi = 0
        self.write_mask: torch.Tensor | None = None  # [rows, q] which query positions to store

    def ensure(self, rows: int, cols: int) -> None:
        """Grow the buffers (doubling) to hold at least rows x cols, keeping their contents."""
        if rows <= self.rows_cap and cols <= self.cols_cap:
            return
        new_rows = max(rows, min(2 * self.rows_cap, self.max_rows)) if rows > self.rows_cap else self.rows_cap
        new_cols = max(cols, 2 * self.cols_cap, _INITIAL_COLS) if cols > self.cols_cap else self.cols_cap
        heads, dim = self.shape
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                new = torch.zeros((new_rows, heads, new_cols, dim), dtype=self.dtype, device=self.device)
                if old.numel():
                    new[: self.rows_cap, :, : self.cols_cap] = old
                bufs[i] = new
        self.rows_cap, self.cols_cap = new_rows, new_cols

    def move_row(self, src: int, dst: int, lo: int, hi: int) -> None:
        """Copy one row's columns lo..hi to another row."""
        for bufs in (self.k, self.v):
            for buf in bufs:
                buf[dst, :, lo:hi] = buf[src, :, lo:hi]

    def shift_cols(self, rows: int, src_lo: int, src_hi: int, dst_lo: int) -> None:
        """Move columns src_lo..src_hi of the first `rows` rows to start at dst_lo."""
        width = src_hi - src_lo
        for bufs in (self.k, self.v):
            for buf in bufs:
                buf[:rows, :, dst_lo : dst_lo + width] = buf[:rows, :, src_lo:src_hi].clone()

    def read_block(self, row: int, lo: int, hi: int) -> torch.Tensor:
        """Columns lo..hi of one row, all layers: [layers, 2, kv_heads, hi - lo, head_dim] (a copy)."""
        return torch.stack([torch.stack((k[row, :, lo:hi], v[row, :, lo:hi])) for k, v in zip(self.k, self.v)])

    def write_block(self, row: int, lo: int, block: torch.Tensor) -> None:
        """Write a `read_block` result into one row from column lo."""
        hi = lo + block.shape[3]
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            k[row, :, lo:hi] = block[i, 0]
            v[row, :, lo:hi] = block[i, 1]

    def memory_bytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # The only method the model calls.
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = key_states.shape[-2]
        end = self.write_col + q
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        if self.write_mask is None:
            kb[self.rows, :, self.write_col : end] = key_states
            vb[self.rows, :, self.write_col : end] = value_states
        else:
            keep = self.write_mask[:, None, :, None]
            for buf, new in ((kb, key_states), (vb, value_states)):
                dst = buf[self.rows, :, self.write_col : end]
                dst.copy_(torch.where(keep, new.to(dst.dtype), dst))
        return kb[self.rows, :, self.lo : self.hi], vb[self.rows, :, self.lo : self.hi]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.hi - self.lo


class TorchEngine:
    """In-flight batching engine over a transformers model, driven by one thread."""

    def __init__(self, config: TorchEngineConfig) -> None:
        self.config = config
        self._state = EngineState.LOADING
        self._reason: str | None = "loading the model"
        self._tokenizer: Tokenizer | None = None
        self._info: ModelInfo | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._n_running = 0
        self._n_waiting = 0
        self._kv_usage = 0.0
        self._steps = 0
        self._handles: dict[str, RequestHandle] = {}
        self._prefix = _PrefixCache(0)

    # ---- Engine protocol (event-loop side) ----

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name="aisandbox-torch-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self, timeout_s: float | None = None) -> Health:
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait, timeout_s)
        return self.health()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        if self._state is EngineState.READY:
            self._state, self._reason = EngineState.DRAINING, "shutting down"
        self._inbox.put(("stop", None))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)
        self._thread = None

    def health(self) -> Health:
        return Health(self._state, self._reason)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self._n_running,
            waiting=self._n_waiting,
            kv_cache_usage=self._kv_usage,
            extra={
                "steps": float(self._steps),
                "prefix_cache_hit_ratio": self._prefix.hits / max(1, self._prefix.queries) if self._info else 0.0,
            },
        )

    @property
    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise EngineNotReady(self._reason or "The engine is not ready.")
        return self._info

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise EngineNotReady(self._reason or "The engine is not ready.")
        return self._tokenizer

    def submit(self, request: GenerationRequest) -> RequestHandle:
        if self._state is EngineState.DEAD:
            raise EngineDead(self._reason or "The engine has failed.")
        if self._state is not EngineState.READY:
            raise EngineNotReady(f"The engine is not ready: {self._reason}.")
        info = self.model_info
        if not request.prompt_token_ids:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        if len(request.prompt_token_ids) + request.sampling.max_tokens > info.max_model_len:
            raise InvalidRequest("prompt + max_tokens exceed the context window", code="context_length_exceeded")
        if self._n_waiting >= self.config.max_queue:
            raise Overloaded(f"{self._n_waiting} requests are waiting; retry later.")
        if request.request_id in self._handles:
            raise InvalidRequest(f"duplicate request id {request.request_id}")
        handle = RequestHandle(request.request_id, self.abort)
        self._handles[request.request_id] = handle
        self._n_waiting += 1  # counted here so a burst sees its own queue at once
        self._inbox.put(("add", (request, handle)))
        return handle

    def abort(self, request_id: str) -> None:
        if request_id in self._handles:
            self._inbox.put(("abort", request_id))

    def _deliver(self, batch: list[tuple[RequestHandle, TokenDelta]]) -> None:
        """Runs on the event loop: hand each delta to its request's collector."""
        for handle, delta in batch:
            handle.collector.put(delta)
            if delta.finish_reason is not None:
                self._handles.pop(handle.request_id, None)

    # ---- engine thread ----

    def _thread_main(self) -> None:
        try:
            self._load()
        except Exception as exc:  # report any load failure through health, not a crash of the worker
            log.exception("engine failed to load")
            self._state, self._reason = EngineState.DEAD, f"failed to load the model: {exc}"
            self._ready.set()
            return
        self._state, self._reason = EngineState.READY, None
        self._ready.set()
        try:
            with torch.inference_mode():
                self._serve()
        except Exception as exc:
            log.exception("engine loop failed")
            self._state, self._reason = EngineState.DEAD, f"engine loop failed: {exc}"
            self._fail_all(str(exc))

    def _load(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = self.config
        if cfg.model_path is None:
            from aisandbox.runtime.default_model import prepare_default_model

            cfg = replace(cfg, model_path=prepare_default_model(cfg.cache_dir or Path.home() / ".cache" / "aisandbox"))
        model_path: Path = cfg.model_path  # type: ignore[assignment]
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = pick_dtype(device, cfg.dtype)
        t0 = time.monotonic()
        self._tokenizer = load_tokenizer(model_path, cfg.tokenizer_mode)  # type: ignore[arg-type]
        hf_config = AutoConfig.from_pretrained(str(model_path))
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, attn_implementation="sdpa")
        model.to(device).eval()
        self._fast: CpuForward | None = None
        if device == "cpu" and dtype == torch.float32:
            with torch.inference_mode():
                q4 = load_q4_file(model_path) if cfg.weights_dtype in ("auto", "int4") else {}
                self._fast, choice = build_cpu_forward(model, cfg.weights_dtype, q4)
            if self._fast is not None:
                release_decoder_layers(model)
            log.info("%s", choice)
        self._model = model
        self._device = torch.device(device)
        text_cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        max_len = int(getattr(text_cfg, "max_position_embeddings", 0) or 4096)
        window = getattr(text_cfg, "sliding_window", None)
        if window and getattr(text_cfg, "use_sliding_window", True) and window < max_len:
            # Our mask is full attention; within one window, full and sliding attention agree.
            max_len = int(window)
        if cfg.max_model_len:
            max_len = min(max_len, cfg.max_model_len)
        eos = set(self._tokenizer.eos_token_ids)
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        vocab = int(text_cfg.vocab_size)
        self._info = ModelInfo(max_model_len=max_len, eos_token_ids=tuple(sorted(eos)), vocab_size=vocab)
        self._eos = torch.tensor(sorted(eos), dtype=torch.long, device=self._device)
        heads = int(text_cfg.num_attention_heads)
        kv_heads = int(getattr(text_cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads)
        self._kv = _SlotKV(int(text_cfg.num_hidden_layers), kv_heads, head_dim, dtype, self._device)
        self._kv.max_rows = cfg.max_batch_size
        self._prefix = _PrefixCache(cfg.prefix_cache_mb * 2**20)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._dtype = dtype
        log.info(
            "loaded %s in %.1fs: %s on %s, context %d, %d threads",
            model_path.name,
            time.monotonic() - t0,
            dtype,
            device,
            max_len,
            torch.get_num_threads(),
        )

    def _serve(self) -> None:
        waiting: deque[_Seq] = deque()
        running: list[_Seq] = []
        self._col = 0  # next KV column to write, shared by all running rows
        while True:
            block = not running and not waiting
            while True:
                try:
                    kind, payload = self._inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if kind == "stop":
                    self._fail_all("the server is shutting down", waiting, running)
                    return
                if kind == "add":
                    request, handle = payload
                    waiting.append(_Seq(request, handle, _make_generator(request.sampling, self._device)))
                elif kind == "abort":
                    self._abort(payload, waiting, running)
            out: list[tuple[RequestHandle, TokenDelta]] = []
            admitted = self._admit(waiting, running)
            if admitted:
                self._prefill(admitted, running, out)
            if running:
                self._decode(running, out)
            self._n_running, self._n_waiting = len(running), len(waiting) + self._inbox.qsize()
            self._steps += 1
            if out:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._deliver, out)

    def _abort(self, request_id: str, waiting: deque[_Seq], running: list[_Seq]) -> None:
        for seq in waiting:
            if seq.request.request_id == request_id:
                waiting.remove(seq)
                self._finish_async(seq, FinishReason.ABORT)
                return
        for row, seq in enumerate(running):
            if seq.request.request_id == request_id:
                self._remove_row(running, row)
                self._finish_async(seq, FinishReason.ABORT)
                return

    def _finish_async(self, seq: _Seq, reason: FinishReason, error: str | None = None) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, [(seq.handle, TokenDelta((), reason, error=error))])

    def _fail_all(self, error: str, *groups: Any) -> None:
        for group in groups:
            for seq in list(group):
                self._finish_async(seq, FinishReason.ABORT, error)
            group.clear()
        # Requests still in the inbox.
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._finish_async(_Seq(payload[0], payload[1]), FinishReason.ABORT, error)
        self._n_running = self._n_waiting = 0

    def _admit(self, waiting: deque[_Seq], running: list[_Seq]) -> list[_Seq]:
        """Take waiting sequences, oldest first, within the batch and prefill-token budgets."""
        group: list[_Seq] = []
        longest = 0
        while waiting and len(running) + len(group) < self.config.max_batch_size:
            n = len(waiting[0].request.prompt_token_ids)
            if group and (len(group) + 1) * max(longest, n) > self.config.max_prefill_tokens:
                break
            longest = max(longest, n)
            group.append(waiting.popleft())
        return group

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Run the model on the rows and columns set in self._kv; return last-position logits [rows, vocab].

        mask: bool [rows, 1, q, cols], True where a query may attend; None when every column is visible.
        """
        if self._fast is not None:
            return self._fast(input_ids, positions, mask, self._kv)
        if mask is None:
            mask = torch.ones(
                (input_ids.shape[0], 1, 1, self._kv.hi - self._kv.lo), dtype=torch.bool, device=self._device
            )
        out = self._model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: self._kv},
        )
        return out.logits[:, -1, :].float()

    def _prefill(self, group: list[_Seq], running: list[_Seq], out: list[tuple[RequestHandle, TokenDelta]]) -> None:
        kv, dev = self._kv, self._device
        prompts = [s.request.prompt_token_ids for s in group]
        lengths = [len(p) for p in prompts]
        hits = [self._prefix.lookup(p) for p in prompts]  # (cached tokens, their KV blocks) per row
        cached = [h[0] for h in hits]
        width = max(n - c for n, c in zip(lengths, cached, strict=True))  # query tokens to run
        span = max(lengths)  # columns the group occupies
        if not running:
            self._col = span
        elif self._col + 1 > kv.cols_cap:
            self._compact(running)
        if running and self._col < span:
            # Make room on the left: move the running rows' columns right.
            lo = min(s.start_col for s in running)
            shift = span - self._col
            kv.ensure(len(running), self._col + shift + 1)
            kv.shift_cols(len(running), lo, self._col, lo + shift)
            for s in running:
                s.start_col += shift
            self._col = span
        first_row, q_col, lo = len(running), self._col - width, self._col - span
        kv.ensure(first_row + len(group), self._col + 1)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        pos = torch.zeros((len(group), width), dtype=torch.long)
        valid = torch.zeros((len(group), width), dtype=torch.bool)
        starts = torch.tensor([self._col - n for n in lengths])
        for i, (seq, n, (c, blocks)) in enumerate(zip(group, lengths, hits, strict=True)):
            seq.start_col = self._col - n
            ids[i, width - (n - c) :] = torch.tensor(prompts[i][c:])
            pos[i, width - (n - c) :] = torch.arange(c, n)
            valid[i, width - (n - c) :] = True
            if c:
                kv.write_block(first_row + i, seq.start_col, torch.cat(blocks, dim=3))
        # mask[row, 0, q, k]: k is a token of this row and not after q; a padding query sees itself only.
        q_abs = torch.arange(q_col, self._col)
        k_abs = torch.arange(lo, self._col)
        causal = k_abs[None, :] <= q_abs[:, None]
        own = k_abs[None, :] >= starts[:, None]
        mask = (causal[None] & own[:, None, :]) | (k_abs[None, :] == q_abs[:, None])[None]
        kv.rows = slice(first_row, first_row + len(group))
        kv.write_col, kv.lo, kv.hi = q_col, lo, self._col
        # Rows with fewer query tokens than the widest must not overwrite their cached prefix.
        kv.write_mask = valid.to(dev) if any(cached) else None
        try:
            logits = self._forward(ids.to(dev), pos.to(dev), mask[:, None].to(dev))
        finally:
            kv.write_mask = None
        for i, (seq, n, c) in enumerate(zip(group, lengths, cached, strict=True)):
            self._prefix.store(prompts[i], c, lambda a, b, row=first_row + i, start=seq.start_col: kv.read_block(
                row, start + a, start + b
            ))
        running.extend(group)
        self._sample_and_emit(group, logits, running, out, first_row)

    def _decode(self, running: list[_Seq], out: list[tuple[RequestHandle, TokenDelta]]) -> None:
        kv, dev = self._kv, self._device
        if self._col + 1 > kv.cols_cap:
            self._compact(running)
        kv.ensure(len(running), self._col + 1)
        lo = min(s.start_col for s in running)
        starts = torch.tensor([s.start_col for s in running])
        ids = torch.tensor([[s.output[-1]] for s in running])
        pos = torch.tensor([[self._col - s.start_col] for s in running])
        cols = torch.arange(lo, self._col + 1)
        # One row sees all of lo..col (lo is its own start): no mask, sdpa's unmasked path.
        mask = None if len(running) == 1 else (cols[None, :] >= starts[:, None])[:, None, None, :].to(dev)
        kv.rows = slice(0, len(running))
        kv.write_col, kv.lo, kv.hi = self._col, lo, self._col + 1
        logits = self._forward(ids.to(dev), pos.to(dev), mask)
        self._col += 1
        self._sample_and_emit(list(running), logits, running, out, 0)
        total = sum(self._col - s.start_col for s in running)
        self._kv_usage = total / max(1, kv.rows_cap * kv.cols_cap)

    def _compact(self, running: list[_Seq]) -> None:
        """Reclaim the columns left of every running row, or grow the buffers when there are none."""
        lo = min(s.start_col for s in running)
        if lo == 0:
            self._kv.ensure(len(running), self._col + 1)
            return
        self._kv.shift_cols(len(running), lo, self._col, 0)
        for s in running:
            s.start_col -= lo
        self._col -= lo

    def _remove_row(self, running: list[_Seq], row: int) -> None:
        last = len(running) - 1
        if row != last:
            moved = running[last]
            self._kv.move_row(last, row, moved.start_col, self._col)
            running[row] = moved
        running.pop()

    def _sample_and_emit(
        self,
        seqs: list[_Seq],
        logits: torch.Tensor,
        running: list[_Seq],
        out: list[tuple[RequestHandle, TokenDelta]],
        first_row: int,
    ) -> None:
        tokens = self._sample(seqs, logits)
        finished: list[_Seq] = []
        info = self.model_info
        for seq, token in zip(seqs, tokens, strict=True):
            seq.output.append(token)
            sp = seq.sampling
            n = len(seq.output)
            reason: FinishReason | None = None
            stop_token: int | None = None
            if n >= sp.min_tokens and (
                (not sp.ignore_eos and token in info.eos_token_ids) or token in sp.stop_token_ids
            ):
                reason, stop_token = FinishReason.STOP, token
            elif n >= sp.max_tokens or len(seq.request.prompt_token_ids) + n >= info.max_model_len:
                reason = FinishReason.LENGTH
            out.append((seq.handle, TokenDelta((token,), reason, stop_token)))
            if reason is not None:
                finished.append(seq)
        for seq in finished:
            self._remove_row(running, running.index(seq))

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        """Pick one token per row, honouring each request's own sampling settings."""
        info = self.model_info
        for i, seq in enumerate(seqs):
            sp = seq.sampling
            if len(seq.output) < sp.min_tokens:
                banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(info.eos_token_ids))
                if banned:
                    logits[i, banned] = -float("inf")
            elif sp.ignore_eos:
                logits[i, self._eos] = -float("inf")
            if sp.repetition_penalty != 1.0:
                seen = torch.tensor(list(seq.request.prompt_token_ids) + seq.output, device=logits.device).unique()
                scores = logits[i, seen]
                logits[i, seen] = torch.where(
                    scores > 0, scores / sp.repetition_penalty, scores * sp.repetition_penalty
                )
        picked = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            if not seq.sampling.greedy:
                picked[i] = _sample_row(logits[i], seq.sampling, seq.generator)
        return [int(t) for t in picked]


def _make_generator(sp: SamplingParams, device: torch.device) -> torch.Generator | None:
    if sp.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(sp.seed if sp.seed is not None else random.randrange(2**63))
    return gen


def _sample_row(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator | None) -> int:
    """Temperature, top-k, top-p and min-p, then one multinomial draw from the row's own generator."""
    logits = logits / sp.temperature
    if sp.top_k > 0 and sp.top_k < logits.numel():
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(0)
        drop = cumulative - sorted_probs > sp.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if sp.min_p > 0.0:
        probs = probs.masked_fill(probs < sp.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def default_threads() -> int:
    """Intra-op threads for CPU inference: one per core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
