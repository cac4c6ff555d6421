"""The torch backend: any Hugging Face causal LM, batched in flight, on CPU or GPU.

Why not transformers' own continuous batching (`model.generate_batch` / `ContinuousBatchingManager`)? There
a request may override temperature, top-k and top-p, but not its seed, min-p, repetition penalty, min_tokens
or ignore_eos, and it measured slower on the default model (docs/benchmarks.md). So this module schedules
itself, with transformers still running the model's forward:

* One thread owns the model. Requests arrive through a thread-safe inbox; each engine step's deltas cross
  into asyncio with a single `loop.call_soon_threadsafe`.
* KV lives in per-layer buffers `[rows, kv_heads, cols, head_dim]`, one row per running sequence, with every
  row's next token written at the same column. A new group of requests is prefilled straight into free rows,
  left-padded so that its last prompt token sits just before that shared column; a finished row is refilled
  by moving the last row into it. Nothing is concatenated per step, and attention only spans the columns
  that some running row still uses.
* The attention mask is built here, 4-D, and passed to the model as is; position ids are per row.
* Prompt prefixes are cached in blocks of 8 tokens (chat templates share their system prompt), so a new
  request copies their KV into its row and prefills only the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import queue
import random
import secrets
import threading
import time
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from aisandbox.errors import InvalidRequest
from aisandbox.runtime.engine import BackendHost
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.structured.grammar import compile_grammar
from aisandbox.runtime.text.tokenizer import Tokenizer, load_tokenizer
from aisandbox.runtime.torch.cpu_forward import CpuForward, build_cpu_forward, load_q4_file, release_decoder_layers
from aisandbox.runtime.torch.cpu_weights import FROM_Q4
from aisandbox.runtime.torch.sampling import Sampler, SamplerRow, StepResult, prompt_logprobs
from aisandbox.runtime.types import EngineStats, FinishReason, ModelInfo, TokenDelta, TokenLogprob
from aisandbox.settings import ServerSettings

__all__ = ["TorchBackend", "TorchEngineConfig", "pick_dtype"]

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
    """Most prompt tokens run in one engine step: a longer prompt is prefilled in chunks of this size, one chunk
    between two decode steps of the running sequences (chunked prefill)."""
    max_model_len: int | None = None
    threads: int | None = None
    prefix_cache_mb: int = 256
    kv_cache_mb: float | None = None
    """Memory for the running sequences' KV buffers, MiB; None: `kv_cache_fraction` of the memory free at load."""
    kv_cache_fraction: float = 0.5
    retime_cpu_formats: bool = False
    """Time the CPU weight formats again instead of using the choice cached for this machine and model."""
    kv_cache_dtype: str = "auto"
    """`auto`: float16 on the CPU tuned path where the C kernels read it, else the model's dtype; `float32`: the
    model's dtype there too."""
    weights_dtype: str = "auto"
    """CPU float32 models: linear-layer weight format, `auto` (measured per row count at load), fp32 (exact),
    bf16, int8 or int4 (see `cpu_weights`)."""


def pick_dtype(device: str, requested: str) -> torch.dtype:
    """Resolve `auto`: bfloat16 on CUDA; float32 on every CPU.

    On CPU the tuned path (the lean forward, our C kernels and the per-batch-size weight-format choice, which
    times bfloat16 weights too where the CPU has bf16 instructions) runs in float32 only. Picking bfloat16 because
    the CPU has AVX512-BF16 or AMX turned it off: 26-31 tok/s at one stream against 124-142 with float32 on a
    2-core AMD EPYC with AVX512-BF16 (issue 19). `--dtype bfloat16` still computes in bfloat16 (transformers'
    forward).
    """
    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.float32


@dataclass(eq=False, slots=True)
class _Seq:
    """One running or waiting sequence, owned by the engine thread."""

    request: GenerationRequest
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    start_col: int = 0  # first KV column of this row
    row: SamplerRow | None = None
    """Sampling state (counts slot, grammar matcher, generator); made at the first sample."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """Computed at prefill for echo requests; sent with the first delta."""
    failed: str | None = None
    """Why the sequence cannot run (its grammar did not compile); it ends at its first token."""
    staged: int = 0
    """Prompt tokens already prefilled in chunks (chunked prefill), their KV in `staged_kv`."""
    staged_kv: torch.Tensor | None = None
    """[layers, 2, kv_heads, staged, head_dim]: the staged tokens' KV, written into the row at admission."""
    staged_hit: int = 0
    """Of the staged tokens, those the prefix cache held when staging began; the rest go into it at prefill."""

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling


class _PrefixCache:
    """KV of prompt prefixes, in blocks of BLOCK tokens, least recently used first out of a byte budget.

    A block is keyed by a chained hash of every token up to its end, as in vLLM's automatic prefix caching,
    so chat prompts that share a system prompt or a conversation's earlier turns skip that part of prefill.
    The hash is BLAKE2b keyed with a per-process random key (so no client can craft a collision offline, the
    class of vLLM's CVE-2025-25183), and a hit is confirmed by comparing the block's own tokens: with the chain,
    every token of the prefix is compared before its KV is reused.
    """

    BLOCK = 8
    """Tokens a block. 16 (vLLM's) cached only 16 of the 24 tokens SmolLM2's chat template puts before every
    user message; 8 caches all 24 (docs/benchmarks.md)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.hits = self.queries = 0
        self._key = secrets.token_bytes(32)
        self._blocks: OrderedDict[bytes, tuple[tuple[int, ...], torch.Tensor]] = OrderedDict()

    def _keys(self, tokens: tuple[int, ...], upto: int) -> list[bytes]:
        keys, h = [], b""
        for end in range(self.BLOCK, upto + 1, self.BLOCK):
            block = tokens[end - self.BLOCK : end]
            h = hashlib.blake2b(h + array("q", block).tobytes(), key=self._key, digest_size=16).digest()
            keys.append(h)
        return keys

    def lookup(self, tokens: tuple[int, ...]) -> tuple[int, list[torch.Tensor]]:
        """The longest cached prefix that leaves at least one token to run: (its length, its blocks)."""
        if not self.budget:
            return 0, []
        found: list[torch.Tensor] = []
        for i, key in enumerate(self._keys(tokens, len(tokens) - 1)):
            entry = self._blocks.get(key)
            if entry is None or entry[0] != tokens[i * self.BLOCK : (i + 1) * self.BLOCK]:
                break
            self._blocks.move_to_end(key)
            found.append(entry[1])
        self.queries += len(tokens)
        self.hits += len(found) * self.BLOCK
        return len(found) * self.BLOCK, found

    def peek(self, tokens: tuple[int, ...]) -> int:
        """What `lookup` would find, in tokens, without touching the LRU order or the hit counts."""
        if not self.budget:
            return 0
        n = 0
        for i, key in enumerate(self._keys(tokens, len(tokens) - 1)):
            entry = self._blocks.get(key)
            if entry is None or entry[0] != tokens[i * self.BLOCK : (i + 1) * self.BLOCK]:
                break
            n += self.BLOCK
        return n

    def store(self, tokens: tuple[int, ...], cached: int, read: Any) -> None:
        """Keep the prompt's full blocks after the first `cached` tokens; read(lo, hi) returns their KV."""
        if not self.budget:
            return
        for i, key in enumerate(self._keys(tokens, len(tokens))):
            lo = i * self.BLOCK
            if lo < cached or key in self._blocks:
                continue
            block = read(lo, lo + self.BLOCK)
            self._blocks[key] = (tuple(tokens[lo : lo + self.BLOCK]), block)
            self.used += block.numel() * block.element_size()
            while self.used > self.budget and self._blocks:
                _, (_, old) = self._blocks.popitem(last=False)
                self.used -= old.numel() * old.element_size()


class _SlotKV:
    """Per-layer KV buffers shared by all running rows; duck-types transformers' `Cache.update`.

    Before each forward the scheduler sets which rows run (`rows`), the buffer column of the first query
    token (`write_col`) and the span of columns attention reads (`lo`..`hi`).
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.max_rows = 1
        self.max_cells = 0
        """rows x cols the buffers may reach (the memory budget); 0: no cap."""
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
        if self.max_cells and new_rows * new_cols > self.max_cells:  # grow no further than the budget allows
            new_cols = max(cols, self.cols_cap, self.max_cells // max(1, new_rows))
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
        pairs = zip(self.k, self.v, strict=True)
        return torch.stack([torch.stack((k[row, :, lo:hi], v[row, :, lo:hi])) for k, v in pairs])

    def write_block(self, row: int, lo: int, block: torch.Tensor) -> None:
        """Write a `read_block` result into one row from column lo."""
        hi = lo + block.shape[3]
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            k[row, :, lo:hi] = block[i, 0]
            v[row, :, lo:hi] = block[i, 1]

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


class TorchBackend:
    """In-flight batching over a transformers model, driven by one thread (a `Backend`)."""

    def __init__(self, config: TorchEngineConfig) -> None:
        self.config = config
        self._host: BackendHost | None = None
        self._tokenizer: Tokenizer | None = None
        self._info: ModelInfo | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Written by the engine thread only; read for stats.
        self._n_running = 0
        self._kv_usage = 0.0
        self._steps = 0
        self._prefix = _PrefixCache(0)
        self._kv_cells = 0
        self._staging: _Seq | None = None
        """The long prompt being prefilled in chunks (at most one at a time); owned by the engine thread."""
        self._stage_kv: _SlotKV | None = None

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> TorchBackend:
        """The backend for `aisandbox serve` without --engine."""
        return cls(
            TorchEngineConfig(
                model_path=settings.model,
                cache_dir=settings.cache_dir,
                device=settings.device,
                dtype=settings.dtype,
                tokenizer_mode=settings.tokenizer_mode,
                max_batch_size=settings.max_batch_size,
                max_prefill_tokens=settings.max_prefill_tokens,
                max_model_len=settings.max_model_len,
                threads=settings.threads,
                prefix_cache_mb=settings.prefix_cache_mb,
                kv_cache_mb=settings.kv_cache_mb,
                kv_cache_fraction=settings.kv_cache_fraction,
                retime_cpu_formats=settings.retime_cpu_formats,
                weights_dtype=settings.weights_dtype,
                kv_cache_dtype=settings.kv_cache_dtype,
            )
        )

    def _kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype (`kv_cache_dtype`): float16 where the CPU forward's C kernels read and write it."""
        kernels = self._fast.kernels if self._fast is not None else None
        if kernels is None or not kernels.kv_half or self.config.kv_cache_dtype == "float32":
            if self.config.kv_cache_dtype == "float16" and model_dtype != torch.float16:
                log.warning(
                    "--kv-cache-dtype float16 needs the CPU tuned path and its C kernels: keeping %s", model_dtype
                )
            return model_dtype
        return torch.float16

    # ---- Backend protocol (event-loop side) ----

    def start(self, host: BackendHost) -> None:
        self._host = host
        self._thread = threading.Thread(target=self._thread_main, name="aisandbox-torch-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._inbox.put(("stop", None))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)
        self._thread = None

    def stats(self) -> EngineStats:
        prefix = self._prefix
        return EngineStats(
            running=self._n_running,
            waiting=0,
            kv_cache_usage=self._kv_usage,
            extra={
                "steps": float(self._steps),
                "prefix_cache_hit_ratio": prefix.hits / max(1, prefix.queries),
            },
        )

    def add(self, request: GenerationRequest) -> None:
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    # ---- engine thread ----

    def _thread_main(self) -> None:
        assert self._host is not None
        try:
            self._load()
        except Exception as exc:  # report any load failure through health, not a crash of the worker
            log.exception("engine failed to load")
            self._host.failed(f"failed to load the model: {exc}")
            return
        assert self._info is not None and self._tokenizer is not None
        self._host.loaded(self._info, self._tokenizer)
        try:
            with torch.inference_mode():
                self._serve()
        except Exception as exc:
            log.exception("engine loop failed")
            self._n_running = 0
            self._host.failed(f"engine loop failed: {exc}")

    def _load(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = self.config
        if cfg.model_path is None:
            from aisandbox.runtime.torch.default_model import resolve_model_path

            cache_dir = cfg.cache_dir or Path.home() / ".cache" / "aisandbox"
            cfg = replace(cfg, model_path=resolve_model_path(None, cache_dir))
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
                q4 = load_q4_file(model_path) if cfg.weights_dtype in ("auto", *FROM_Q4) else {}
                kernels_dir = (cfg.cache_dir or Path.home() / ".cache" / "aisandbox") / "kernels"
                self._fast, choice = build_cpu_forward(
                    model, cfg.weights_dtype, q4, cache_dir=kernels_dir, retime=cfg.retime_cpu_formats
                )
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
        heads = int(text_cfg.num_attention_heads)
        kv_heads = int(getattr(text_cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads)
        layers = int(text_cfg.num_hidden_layers)
        kv_dtype = self._kv_dtype(dtype)
        cell_bytes = layers * 2 * kv_heads * head_dim * torch.empty(0, dtype=kv_dtype).element_size()
        budget = (
            cfg.kv_cache_mb * 2**20 if cfg.kv_cache_mb is not None else cfg.kv_cache_fraction * _free_memory(device)
        )
        self._kv_cells = int(budget // cell_bytes)
        """KV columns x rows the budget holds: one column of one row is one token of one sequence."""
        if self._kv_cells < max_len:
            # A sequence longer than the whole budget could never run: the context is what fits (a longer request
            # is refused at admission with context_length_exceeded).
            log.info(
                "KV budget %.0f MB holds %d tokens: context capped from %d", budget / 2**20, self._kv_cells, max_len
            )
            max_len = max(16, self._kv_cells)
        eos = set(self._tokenizer.eos_token_ids)
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        vocab = int(text_cfg.vocab_size)
        self._info = ModelInfo(
            max_model_len=max_len, eos_token_ids=tuple(sorted(eos)), vocab_size=vocab, max_running=cfg.max_batch_size
        )
        self._sampler = Sampler(vocab, sorted(eos), self._device)
        self._kv = _SlotKV(layers, kv_heads, head_dim, kv_dtype, self._device)
        self._kv.max_rows = cfg.max_batch_size
        self._kv.max_cells = self._kv_cells
        self._prefix = _PrefixCache(cfg.prefix_cache_mb * 2**20)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._dtype = dtype
        log.info(
            "loaded %s in %.1fs: %s on %s, KV cache %s, context %d, %d threads",
            model_path.name,
            time.monotonic() - t0,
            dtype,
            device,
            str(kv_dtype).removeprefix("torch."),
            max_len,
            torch.get_num_threads(),
        )

    def _serve(self) -> None:
        assert self._host is not None
        emit = self._host.emit
        waiting: deque[_Seq] = deque()
        running: list[_Seq] = []
        self._col = 0  # next KV column to write, shared by all running rows
        while True:
            block = not running and not waiting and self._staging is None
            while True:
                try:
                    kind, payload = self._inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if kind == "stop":
                    return
                if kind == "add":
                    waiting.append(_Seq(payload, _make_generator(payload.sampling, self._device)))
                elif kind == "abort":
                    self._abort(payload, waiting, running)
            out: list[tuple[str, TokenDelta]] = []
            staged = self._staging is not None
            if staged:
                self._stage_chunk(waiting, out)
            # After a chunk, the running rows decode before anything else prefills: one chunk's time per gap.
            admitted = self._admit(waiting, running) if not (staged and running) else []
            if admitted:
                self._prefill(admitted, running, out)
                if out:  # the first tokens go out now, not after the decode step below (a step less of TTFT)
                    emit(out)
                    out = []
            if running:
                self._decode(running, out)
            self._n_running = len(running)
            self._steps += 1
            if out:
                emit(out)

    def _abort(self, request_id: str, waiting: deque[_Seq], running: list[_Seq]) -> None:
        if self._staging is not None and self._staging.request.request_id == request_id:
            self._staging = self._stage_kv = None
            return
        for seq in waiting:
            if seq.request.request_id == request_id:
                waiting.remove(seq)
                return
        for row, seq in enumerate(running):
            if seq.request.request_id == request_id:
                self._remove_row(running, row)
                return

    def _admit(self, waiting: deque[_Seq], running: list[_Seq]) -> list[_Seq]:
        """Take waiting sequences, oldest first, within the batch and prefill-token budgets."""
        group: list[_Seq] = []
        held: list[_Seq] = []
        longest = 0
        budget = self.config.max_prefill_tokens
        while waiting and len(running) + len(group) < self.config.max_batch_size:
            seq = waiting[0]
            prompt = seq.request.prompt_token_ids
            # Tokens this prefill runs: the budget counts what is computed, so a prefix the cache holds is free
            # (as vLLM's scheduler counts it); a prompt that asks for prompt logprobs runs whole.
            if seq.staged_kv is not None:
                cached = seq.staged
            else:
                cached = 0 if seq.sampling.prompt_logprobs is not None else self._prefix.peek(prompt)
            n = len(prompt) - cached
            if n > budget and seq.sampling.prompt_logprobs is None:
                # Too long for one step: prefill it in chunks between decode steps (one prompt at a time); the
                # prompts behind it go on being admitted.
                waiting.popleft()
                if self._staging is None:
                    self._staging = seq
                else:
                    held.append(seq)
                continue
            if group and (len(group) + 1) * max(longest, n) > budget:
                break
            if (running or group) and not self._fits([*running, *group, seq]):
                break  # the KV budget is taken: it waits for a running sequence to end
            longest = max(longest, n)
            group.append(waiting.popleft())
        waiting.extendleft(reversed(held))
        return group

    def _fits(self, seqs: list[_Seq]) -> bool:
        """Whether these sequences can all run to their max_tokens within the KV budget (conservatively: every
        row as wide as the widest span they could reach, since running rows share their columns)."""
        if not self._kv_cells:
            return True
        running_span = self._col - min((s.start_col for s in seqs if s.output), default=self._col)
        span = max([running_span, *(len(s.request.prompt_token_ids) for s in seqs)])
        limit = self._info.max_model_len if self._info is not None else 0
        remaining = max(
            min(s.sampling.max_tokens, limit - len(s.request.prompt_token_ids)) - len(s.output) for s in seqs
        )
        return len(seqs) * (span + remaining) <= self._kv_cells

    def _stage_chunk(self, waiting: deque[_Seq], out: list[tuple[str, TokenDelta]]) -> None:
        """Prefill the next chunk of the staged prompt into its own KV buffer; when at most one chunk is left,
        hand it back to the front of the queue, where `_prefill` copies the staged KV into its row."""
        seq = self._staging
        assert seq is not None and self._info is not None
        prompt = seq.request.prompt_token_ids
        budget = self.config.max_prefill_tokens
        try:
            if self._stage_kv is None:
                layers, (heads, dim) = len(self._kv.k), self._kv.shape
                self._stage_kv = _SlotKV(layers, heads, dim, self._kv.dtype, self._kv.device)
                cached, blocks = self._prefix.lookup(prompt)
                if cached:
                    self._stage_kv.ensure(1, cached)
                    self._stage_kv.write_block(0, 0, torch.cat(blocks, dim=3))
                seq.staged = seq.staged_hit = cached
            kv, dev = self._stage_kv, self._device
            a = seq.staged
            b = min(a + budget, len(prompt) - 1)  # the last token runs in the real prefill: it gives the logits
            kv.ensure(1, b)
            ids = torch.tensor([prompt[a:b]])
            pos = torch.arange(a, b)[None]
            mask = (torch.arange(0, b)[None, :] <= torch.arange(a, b)[:, None])[None, None]
            kv.rows, kv.write_col, kv.lo, kv.hi = slice(0, 1), a, 0, b
            self._forward(ids.to(dev), pos.to(dev), mask.to(dev), starts=torch.tensor([0]), kv=kv)
            seq.staged = b
            if len(prompt) - b <= budget:
                seq.staged_kv = kv.read_block(0, 0, b)
                self._staging = self._stage_kv = None
                waiting.appendleft(seq)
        except Exception as exc:  # only this sequence's forward failed: end it, keep the others running
            log.exception("chunked prefill of request %s failed", seq.request.request_id)
            self._staging = self._stage_kv = None
            seq.staged_kv = None
            error = f"the engine failed this request's prefill: {exc}"
            out.append((seq.request.request_id, TokenDelta((), FinishReason.ABORT, error=error)))

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        all_positions: bool = False,
        starts: torch.Tensor | None = None,
        kv: _SlotKV | None = None,
    ) -> torch.Tensor:
        """Run the model on the rows and columns set in self._kv.

        mask: bool [rows, 1, q, cols], True where a query may attend; None when every column is visible.
        Returns the last position's logits [rows, vocab], or with `all_positions` every query position's
        [rows, q, vocab] (for prompt logprobs; only asked for groups that hold such a request).
        starts: each row's first KV column (the same as the mask; the lean CPU forward's kernels use it).
        kv: the KV buffers to run on (a staged prompt's own); default the running rows'.
        """
        kv = kv or self._kv
        if self._fast is not None:
            return self._fast(input_ids, positions, mask, kv, all_positions, starts)
        if mask is None:
            mask = torch.ones((input_ids.shape[0], 1, 1, kv.hi - kv.lo), dtype=torch.bool, device=self._device)
        out = self._model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if all_positions else 1,
            **{self._cache_kw: kv},
        )
        logits: torch.Tensor = out.logits
        return logits.float() if all_positions else logits[:, -1, :].float()

    def _prefill(self, group: list[_Seq], running: list[_Seq], out: list[tuple[str, TokenDelta]]) -> None:
        kv, dev = self._kv, self._device
        prompts = [s.request.prompt_token_ids for s in group]
        lengths = [len(p) for p in prompts]
        # (cached tokens, their KV blocks) per row; prompt logprobs need every prompt position run.
        echo = [s.sampling.prompt_logprobs is not None for s in group]
        hits = [
            (s.staged, [s.staged_kv]) if s.staged_kv is not None else (0, []) if e else self._prefix.lookup(p)
            for s, p, e in zip(group, prompts, echo, strict=True)
        ]
        # What the prefix cache already holds of each prompt: a chunk-prefilled prompt's staged tokens it did not
        # hold at staging go into it below like any other prefill's.
        known = [s.staged_hit if s.staged_kv is not None else h[0] for s, h in zip(group, hits, strict=True)]
        for s in group:
            s.staged_kv = None
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
            logits = self._forward(ids.to(dev), pos.to(dev), mask[:, None].to(dev), any(echo), starts)
        finally:
            kv.write_mask = None
        if any(echo):
            for i, seq in enumerate(group):
                if echo[i]:
                    n = lengths[i]
                    top = seq.sampling.prompt_logprobs or 0
                    try:
                        seq.prompt_logprobs = prompt_logprobs(logits[i, width - n :], prompts[i], top)
                    except Exception as exc:  # this sequence's prompt logprobs only
                        seq.failed = f"the engine could not compute this request's prompt logprobs: {exc}"
            logits = logits[:, -1, :]
        for i, (seq, c) in enumerate(zip(group, known, strict=True)):
            self._prefix.store(
                prompts[i],
                c,
                lambda a, b, row=first_row + i, start=seq.start_col: kv.read_block(row, start + a, start + b),
            )
        running.extend(group)
        self._sample_and_emit(group, logits, running, out, first_row)

    def _decode(self, running: list[_Seq], out: list[tuple[str, TokenDelta]]) -> None:
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
        logits = self._forward(ids.to(dev), pos.to(dev), mask, starts=starts)
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
        if running[row].row is not None:
            self._sampler.release(running[row].row)  # type: ignore[arg-type]
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
        out: list[tuple[str, TokenDelta]],
        first_row: int,
    ) -> None:
        step = self._sample(seqs, logits)
        finished: list[_Seq] = []
        info = self._info
        assert info is not None
        for i, (seq, token) in enumerate(zip(seqs, step.tokens, strict=True)):
            seq.output.append(token)
            sp = seq.sampling
            n = len(seq.output)
            reason: FinishReason | None = None
            stop_token: int | None = None
            error: str | None = None
            if seq.failed is not None:
                reason, error = FinishReason.ABORT, seq.failed
            elif step.grammar_rejected[i]:
                reason, error = FinishReason.ABORT, f"the grammar refused the sampled token {token}"
            elif step.grammar_done[i]:
                # The grammar is complete and accepted its stop token (EOS): the end even with ignore_eos.
                reason, stop_token = FinishReason.STOP, token
            elif n >= sp.min_tokens and (
                (not sp.ignore_eos and token in info.eos_token_ids) or token in sp.stop_token_ids
            ):
                reason, stop_token = FinishReason.STOP, token
            elif n >= sp.max_tokens or len(seq.request.prompt_token_ids) + n >= info.max_model_len:
                reason = FinishReason.LENGTH
            lp = step.logprobs[i]
            delta = TokenDelta(
                (token,),
                reason,
                stop_token,
                error=error,
                logprobs=None if lp is None else (lp,),
                prompt_logprobs=seq.prompt_logprobs,
            )
            seq.prompt_logprobs = None
            out.append((seq.request.request_id, delta))
            if reason is not None:
                finished.append(seq)
        for seq in finished:
            self._remove_row(running, running.index(seq))

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> StepResult:
        """Pick one token per row, each with its request's own settings, in one batched pass."""
        rows = []
        for seq in seqs:
            if seq.row is None:
                sp = seq.sampling
                if sp.guided is not None and sp.grammar is None:
                    sp = self._compile_late(seq)
                try:
                    seq.row = self._sampler.new_row(sp, seq.request.prompt_token_ids, seq.generator)
                except Exception as exc:  # this sequence's settings: it ends at its first token, alone
                    log.warning("request %s: sampler state failed: %s", seq.request.request_id, exc)
                    seq.failed = f"the engine could not sample this request: {exc}"
                    seq.row = self._sampler.new_row(SamplingParams(max_tokens=1, temperature=0.0))
            rows.append(seq.row)
        try:
            return self._sampler.sample(rows, logits)
        except Exception:
            pass
        # One row's state (its grammar matcher, say) failed the batched pass: sample row by row, so only the
        # rows that fail again end, with the error; the others keep their tokens. (A device fault would fail the
        # next forward too, which is shared and ends the engine.)
        log.warning("a batched sampling step failed; sampling %d rows one by one", len(rows))
        parts: list[StepResult] = []
        for i, (seq, row) in enumerate(zip(seqs, rows, strict=True)):
            try:
                parts.append(self._sampler.sample([row], logits[i : i + 1]))
            except Exception as exc:
                seq.failed = f"the engine could not sample this request: {exc}"
                parts.append(StepResult([int(logits[i].argmax())], [None], [False], [False]))
        return StepResult(
            [p.tokens[0] for p in parts],
            [p.logprobs[0] for p in parts],
            [p.grammar_done[0] for p in parts],
            [p.grammar_rejected[0] for p in parts],
        )

    def _compile_late(self, seq: _Seq) -> SamplingParams:
        """Compile a grammar the request path left uncompiled, rather than ignore it (this stalls the batch)."""
        sp = seq.sampling
        assert sp.guided is not None
        log.warning("request %s reached the engine with an uncompiled grammar", seq.request.request_id)
        try:
            return replace(sp, grammar=compile_grammar(sp.guided, self._tokenizer, self._info))
        except InvalidRequest as exc:
            seq.failed = exc.message
            return sp


def _free_memory(device: str) -> float:
    """Bytes free for the KV buffers: CUDA's free memory, or the host's available memory (/proc/meminfo)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return float(free)
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return float(line.split()[1]) * 1024
    return 4.0 * 2**30  # unknown: assume 4 GiB free


def _make_generator(sp: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The sequence's own random stream (on the CPU whatever the device: it draws one uniform per token)."""
    if sp.greedy:
        return None
    gen = torch.Generator()
    gen.manual_seed(sp.seed if sp.seed is not None else random.randrange(2**63))
    return gen
