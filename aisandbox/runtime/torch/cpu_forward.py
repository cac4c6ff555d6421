"""A lean CPU forward for Llama-family decoders (Llama, Mistral), over the torch engine's slot KV.

transformers' forward costs about as much Python per layer as this model's small matrix multiplies cost on
two cores (masks, cache objects, attention-interface dispatch, hooks). This forward is the same math with
fewer calls: q, k and v are one multiply, gate and up are one multiply, attention is one
`scaled_dot_product_attention` with grouped KV heads, and every linear layer is a `BucketedLinear` in the
format that `cpu_weights` measured fastest for the call's row count. Any other architecture keeps
transformers' forward, with its Linear layers swapped for `BucketedLinear`s.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from aisandbox.runtime.torch import cpu_kernels
from aisandbox.runtime.torch.cpu_kernels import CpuKernels
from aisandbox.runtime.torch.cpu_weights import (
    FORMATS,
    FROM_Q4,
    BucketedLinear,
    FormatChoice,
    Q4Weights,
    _BlockLinear,
    choose_formats,
    cpu_flags,
    measure_formats,
    q4_1_blocks,
)

REQUANTIZING = ("int8", "int4", "q8_0", "q8_0v", "bf16")
"""Formats that would put a GGUF's 4-bit weights onto another grid or round activations to bf16; `auto` leaves
them out when the model has a GGUF source (they can still be pinned with --weights-dtype). bf16 among them since
2026-12-04: on an AVX512-BF16 CPU the load-time timing gave the output layer bf16 from 17 rows, and 32 prompts
decoded together kept 13 of 32 identical to fp32 (31 of 32 one at a time)."""

HEAD_SAMPLE_ROWS = 8192
"""Output-layer rows timed at load (the rest is scaled)."""

ATTEND_LIMIT = 64 * 1024
"""Queries x columns up to which a prefill uses our attention loop rather than PyTorch's flash attention."""

__all__ = [
    "CpuForward",
    "Q4_FILE",
    "build_cpu_forward",
    "lean_unsupported",
    "load_q4_file",
    "release_decoder_layers",
    "swap_linears",
]

log = logging.getLogger(__name__)

Q4_FILE = "q4_1.safetensors"
"""Next to a converted GGUF model: each Q4_1 weight's raw blocks, rows in the Hugging Face order."""


def load_q4_file(model_dir: Path) -> dict[str, Q4Weights]:
    """The 4-bit weights stored next to a converted GGUF model, by Hugging Face parameter name ({} if none)."""
    path = Path(model_dir) / Q4_FILE
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    out: dict[str, Q4Weights] = {}
    tensors = load_file(str(path))
    for name, raw in tensors.items():
        if not name.endswith(".q4_1"):
            continue
        n, k = (int(v) for v in tensors[name[: -len(".q4_1")] + ".shape"].tolist())
        out[name[: -len(".q4_1")]] = q4_1_blocks(raw, n, k)
    return out


def lean_unsupported(model: torch.nn.Module) -> str | None:
    """Why the lean forward cannot run this model, or None when it can."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in ("llama", "mistral"):
        return f"architecture {getattr(cfg, 'model_type', None)!r} is not llama or mistral"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "biased projections"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return "activation or tensor-parallel layout"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "unexpected module layout"
    return None


@dataclass(frozen=True, slots=True)
class _Layer:
    ln_in: torch.Tensor
    ln_post: torch.Tensor
    qkv: BucketedLinear
    o: BucketedLinear
    gate_up: BucketedLinear
    down: BucketedLinear


def _cat_q4(parts: list[Q4Weights | None]) -> Q4Weights | None:
    if any(p is None for p in parts):
        return None
    return Q4Weights(
        torch.cat([p.q for p in parts]),  # type: ignore[union-attr]
        torch.cat([p.scale for p in parts]),  # type: ignore[union-attr]
        torch.cat([p.low for p in parts]),  # type: ignore[union-attr]
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CpuForward:
    """The decoder's forward in a few fused calls per layer; returns last-position logits [rows, vocab]."""

    def __init__(
        self,
        model: Any,
        body: FormatChoice,
        head: FormatChoice,
        q4: dict[str, Q4Weights] | None = None,
        kernels: CpuKernels | None = None,
    ) -> None:
        q4 = q4 or {}
        self.kernels = kernels
        cfg = model.config
        inner = model.model
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.eps = float(cfg.rms_norm_eps)
        self.hidden = int(cfg.hidden_size)
        self.inter = int(cfg.intermediate_size)
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight.detach()
        self.layers: list[_Layer] = []
        for i, layer in enumerate(inner.layers):
            att, mlp = layer.self_attn, layer.mlp
            p = f"model.layers.{i}."
            names = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
            qkv_w = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).detach()
            gu_w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
            self.layers.append(
                _Layer(
                    ln_in=layer.input_layernorm.weight.detach(),
                    ln_post=layer.post_attention_layernorm.weight.detach(),
                    qkv=BucketedLinear(qkv_w, body, _cat_q4([q4.get(n) for n in names])),
                    o=BucketedLinear(att.o_proj.weight, body, q4.get(p + "self_attn.o_proj.weight")),
                    gate_up=BucketedLinear(
                        gu_w, body, _cat_q4([q4.get(p + "mlp.gate_proj.weight"), q4.get(p + "mlp.up_proj.weight")])
                    ),
                    down=BucketedLinear(mlp.down_proj.weight, body, q4.get(p + "mlp.down_proj.weight")),
                )
            )
        self.head = BucketedLinear(model.lm_head.weight, head, q4.get("lm_head.weight"))
        self._body = body
        self._plans = self._layer_plans(body) if kernels is not None else {}
        self._kv_ptrs: tuple[tuple[int, ...], Any, Any] | None = None

    def _layer_plans(self, body: FormatChoice) -> dict[str, Any]:
        """For each body format in use that is one of our block formats for every layer: the ctypes array of
        csrc's Layer structs that forward_layers runs the whole stack from in one call."""
        plans: dict[str, Any] = {}
        for fmt in body.formats():
            if fmt not in cpu_kernels.BLOCK_KINDS:
                continue
            structs = []
            for layer in self.layers:
                lins = []
                for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
                    impl = lin.impls[fmt] if fmt in lin.impls else None  # noqa: SIM401 (ModuleDict has no get)
                    if not isinstance(impl, _BlockLinear) or lin.bias is not None:
                        break  # a layer fell back to another format, or has a bias: the per-layer loop runs it
                    ptrs = impl.ptrs
                    qs, d, m = (*ptrs, None) if len(ptrs) == 2 else ptrs
                    lins.append(cpu_kernels.Linear(cpu_kernels.BLOCK_KINDS[fmt], impl.n, impl.k, qs, d, m))
                else:
                    structs.append(cpu_kernels.Layer(layer.ln_in.data_ptr(), layer.ln_post.data_ptr(), *lins))
                    continue
                break
            else:
                plans[fmt] = (cpu_kernels.Layer * len(structs))(*structs)
        return plans

    def _kv_arrays(self, kv: Any) -> tuple[Any, Any]:
        """The KV buffers' pointers as ctypes arrays, rebuilt only when the buffers were reallocated."""
        key = (id(kv), kv.rows_cap, kv.cols_cap, kv.k[0].data_ptr(), kv.v[-1].data_ptr())
        if self._kv_ptrs is None or self._kv_ptrs[0] != key:
            array = ctypes.c_void_p * len(kv.k)
            self._kv_ptrs = (key, array(*(t.data_ptr() for t in kv.k)), array(*(t.data_ptr() for t in kv.v)))
        return self._kv_ptrs[1], self._kv_ptrs[2]

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden,), w, self.eps)

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        kv: Any,
        all_positions: bool = False,
        starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [rows, q]; mask: bool [rows, 1, q, cols] or None (all true); kv: `_SlotKV`.

        starts: int64 [rows], each row's first KV column (what the mask says, for the C kernels; without it the
        forward uses PyTorch's ops throughout). Returns the last position's logits [rows, vocab], or every
        position's [rows, q, vocab] (prompt logprobs).
        """
        if self.kernels is not None and starts is not None:
            return self._fused(self.kernels, input_ids, positions, mask, kv, all_positions, starts)
        rows, q = input_ids.shape
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        x = self.embed(input_ids)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, None], sin[:, None]  # [rows, 1, q, d]
        for i, layer in enumerate(self.layers):
            h = layer.qkv(self._rms(x, layer.ln_in)).view(rows, q, hq + 2 * hk, d).transpose(1, 2)
            qk = h[:, : hq + hk]  # rotary on q and k heads together: [rows, hq + hk, q, d]
            qk = qk * cos + _rotate_half(qk) * sin
            qs, ks, vs = qk[:, :hq], qk[:, hq:], h[:, hq + hk :]
            keys, values = kv.update(ks, vs, i)
            keys, values = keys.to(qs.dtype), values.to(qs.dtype)  # a float16 cache (kv_cache_dtype)
            a = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, enable_gqa=hq != hk)
            x = x + layer.o(a.transpose(1, 2).reshape(rows, q, hq * d))
            gate, up = layer.gate_up(self._rms(x, layer.ln_post)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        if all_positions:
            flat = self._rms(x.reshape(rows * q, -1), self.norm)
            every: torch.Tensor = self.head(flat)
            return every.float().view(rows, q, -1)
        last: torch.Tensor = self.head(self._rms(x[:, -1], self.norm))
        return last.float()

    def _fused(
        self,
        ck: CpuKernels,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        kv: Any,
        all_positions: bool,
        starts: torch.Tensor,
    ) -> torch.Tensor:
        """The same forward with the C kernels between the matrix multiplies (see cpu_kernels)."""
        rows, q = input_ids.shape
        n, dim, inter = rows * q, self.hidden, self.inter
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        x = self.embed(input_ids).reshape(n, dim).contiguous()
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.contiguous(), sin.contiguous()
        starts = starts.to(torch.int64).contiguous()
        valid = None if kv.write_mask is None else kv.write_mask.to(torch.uint8).contiguous()
        h = torch.empty_like(x)
        qrot = torch.empty((rows, q, hq, d))
        att = torch.empty((n, hq * d))
        # Our attention loops over every query and column; for long prompts PyTorch's flash attention wins.
        ours = q * (kv.hi - kv.lo) <= ATTEND_LIMIT
        out_ptr = att.data_ptr() if ours else None
        invalid = None
        if not ours:
            cols = torch.arange(kv.write_col, kv.write_col + q)
            keep = cols[None, :] >= starts[:, None]
            if valid is not None:
                keep &= valid.bool()
            invalid = ~keep.reshape(n)
        scale = d**-0.5
        row0, eps = kv.rows.start, self.eps
        half = int(kv.dtype == torch.float16)  # the cache holds float16 (kv_cache_dtype; the kernels convert)
        layers = self.layers
        plan = self._plans.get(self._body.fmt_for_rows(n)) if ours else None
        if plan is not None:
            ks, vs = self._kv_arrays(kv)
            ck.forward_layers(
                plan, len(layers), ks, vs, self.norm.data_ptr(), x.data_ptr(), h.data_ptr(), qrot.data_ptr(),
                out_ptr, cos.data_ptr(), sin.data_ptr(), kv.cols_cap, row0, kv.write_col, starts.data_ptr(),
                None if valid is None else valid.data_ptr(), rows, q, hq, hk, d, dim, inter, eps, scale, half,
            )  # fmt: skip
            layers = []  # the stack ran in C; h is the final norm of every position
        else:
            ck.rms_norm(x.data_ptr(), layers[0].ln_in.data_ptr(), h.data_ptr(), n, dim, eps)
        for i, layer in enumerate(layers):
            qkv = layer.qkv.forward(h)
            kb, vb = kv.k[i], kv.v[i]
            ck.rope_store_attend(
                qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), kb.data_ptr(), vb.data_ptr(), kv.cols_cap, row0,
                kv.write_col, starts.data_ptr(), None if valid is None else valid.data_ptr(), rows, q, hq, hk, d,
                qrot.data_ptr(), out_ptr, scale, half,
            )  # fmt: skip
            if not ours:
                a = F.scaled_dot_product_attention(
                    qrot.transpose(1, 2),
                    kb[kv.rows, :, kv.lo : kv.hi].float(),
                    vb[kv.rows, :, kv.lo : kv.hi].float(),
                    attn_mask=mask,
                    enable_gqa=hq != hk,
                )
                att = a.transpose(1, 2).reshape(n, hq * d)
                att[invalid] = 0.0  # padding queries: finite and small, as in our own loop
            o = layer.o.forward(att)
            ck.add_rms_norm(x.data_ptr(), o.data_ptr(), layer.ln_post.data_ptr(), h.data_ptr(), n, dim, eps)
            gu = layer.gate_up.forward(h)
            act = torch.empty((n, inter))
            ck.silu_mul(gu.data_ptr(), act.data_ptr(), n, inter)
            down = layer.down.forward(act)
            nxt = layers[i + 1].ln_in if i + 1 < len(layers) else self.norm
            ck.add_rms_norm(x.data_ptr(), down.data_ptr(), nxt.data_ptr(), h.data_ptr(), n, dim, eps)
        # h is now the final norm of every position.
        if all_positions:
            every: torch.Tensor = self.head.forward(h)
            return every.float().view(rows, q, -1)
        last: torch.Tensor = self.head.forward(h.view(rows, q, dim)[:, -1])
        return last.float()


def release_decoder_layers(model: Any) -> None:
    """Drop transformers' decoder layers once a `CpuForward` holds their weights (about 430 MB on SmolLM2).

    The embedding, rotary table, final norm and head stay (the forward uses them); the model can no longer run
    its own forward afterwards.
    """
    model.model.layers = torch.nn.ModuleList()


def _shapes(model: torch.nn.Module, lean: bool) -> tuple[list[tuple[int, int, int]], tuple[int, int]]:
    """The body's distinct linear shapes (N, K, count) as the forward will call them, and the head's."""
    head = getattr(model, "lm_head", None)
    counts: dict[tuple[int, int], int] = {}
    if lean:
        cfg: Any = model.config
        hq = int(cfg.num_attention_heads)
        hk = int(getattr(cfg, "num_key_value_heads", None) or hq)
        d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // hq)
        h, inter, n = int(cfg.hidden_size), int(cfg.intermediate_size), int(cfg.num_hidden_layers)
        for shape in ((hq * d + 2 * hk * d, h), (h, hq * d), (2 * inter, h), (h, inter)):
            counts[shape] = counts.get(shape, 0) + n
    else:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                shape = (module.out_features, module.in_features)
                counts[shape] = counts.get(shape, 0) + 1
    head_shape = (head.out_features, head.in_features) if isinstance(head, torch.nn.Linear) else (0, 0)
    return [(n, k, c) for (n, k), c in counts.items()], head_shape


def swap_linears(
    model: torch.nn.Module,
    choice: FormatChoice,
    q4: dict[str, Q4Weights] | None = None,
    head: FormatChoice | None = None,
) -> int:
    """Replace every float32 CPU Linear of `model` with a BucketedLinear; returns how many were swapped.

    `head`, when given, is the choice for the output layer (`lm_head`).
    """
    q4 = q4 or {}
    lm_head = getattr(model, "lm_head", None)
    names = {id(m): n for n, m in model.named_modules()}
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not (isinstance(child, torch.nn.Linear) and child.weight.dtype == torch.float32):
                continue
            if child.weight.device.type != "cpu":
                continue
            full = names.get(id(child), name) + ".weight"
            bias = None if child.bias is None else child.bias.detach()
            use = head if head is not None and child is lm_head else choice
            setattr(module, name, BucketedLinear(child.weight.detach(), use, q4.get(full), bias))
            swapped += 1
    return swapped


def _busy() -> str:
    """A note when the machine is busy (its timings then mislead), else ""."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        load = float(Path("/proc/loadavg").read_text().split()[0])
        if load > 0.5 * torch.get_num_threads():
            return f"; measured while the machine was busy (load {load:.1f}), pin --weights-dtype if it is off"
    return ""


CHOICE_RULES = 2
"""Part of the cached choice's key: bumped when what auto may choose or how it times changes (2: bf16 off a GGUF
source, block formats timed as forward_layers calls them), so that an older cached choice is not reused."""
CHOICE_TIMINGS = 3
"""At most this many independent timings of the formats at load; the choice stands once two in a row agree."""


def _timed_choice(
    body_shapes: list[tuple[int, int, int]],
    allowed: list[str],
    head_shape: tuple[int, int],
    head_allowed: list[str],
    budget_s: float,
) -> tuple[FormatChoice, FormatChoice, str]:
    """Time the formats until two timings in a row choose the same formats (at most CHOICE_TIMINGS), so that a
    moment of noise does not decide what every later start serves with; the choice comes from each format's best
    time over all the timings. Returns (body, head, a note for the log line)."""
    best: dict[str, dict[tuple[str, int], float]] = {"body": {}, "head": {}}
    picks: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    for _ in range(CHOICE_TIMINGS):
        body_t = measure_formats(body_shapes, allowed, budget_s * 0.7)
        head_t: dict[tuple[str, int], float] = {}
        if head_shape[0]:
            # A slice of the output layer's rows, scaled up: every format's time grows with the rows it multiplies,
            # and building each format of the whole head (49152 x 576 here) would cost seconds at load.
            rows = min(head_shape[0], HEAD_SAMPLE_ROWS)
            sample = measure_formats([(rows, head_shape[1], 1)], head_allowed, budget_s * 0.3)
            head_t = {key: ms * head_shape[0] / rows for key, ms in sample.items()}
        picks.append((choose_formats(body_t, allowed).by_bucket, choose_formats(head_t, head_allowed).by_bucket))
        for part, timings in (("body", body_t), ("head", head_t)):
            for key, ms in timings.items():
                best[part][key] = min(best[part].get(key, float("inf")), ms)
        if len(picks) >= 2 and picks[-1] == picks[-2]:
            break
    body, head = choose_formats(best["body"], allowed), choose_formats(best["head"], head_allowed)
    agreed = len(picks) >= 2 and picks[-1] == picks[-2]
    note = f"; {len(picks)} timings " + ("agreed" if agreed else "disagreed (the best time of each format chose)")
    return body, head, note


def _choice_path(cache_dir: Path, identity: dict[str, Any]) -> Path:
    """The cached format choice of one CPU identity, model shape, kernel source and torch build."""
    blob = json.dumps(identity, sort_keys=True).encode()
    return cache_dir / f"formats-{hashlib.sha256(blob).hexdigest()[:16]}.json"


def _load_choice(path: Path) -> tuple[FormatChoice, FormatChoice] | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(path.read_text())
        return FormatChoice(tuple(data["body"])), FormatChoice(tuple(data["head"]))
    return None


def _save_choice(path: Path, body: FormatChoice, head: FormatChoice, identity: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"body": body.by_bucket, "head": head.by_bucket, "identity": identity}))
        tmp.replace(path)  # atomic: a concurrent start reads the whole file or none


def build_cpu_forward(
    model: Any,
    weights_dtype: str,
    q4: dict[str, Q4Weights] | None = None,
    budget_s: float = 1.0,
    cache_dir: Path | None = None,
    retime: bool = False,
) -> tuple[CpuForward | None, str]:
    """Choose the weight formats for this machine and build the forward; returns (lean forward or None, log line).

    weights_dtype: `auto` measures every format; a format's name uses it at every row count. A model whose
    head has no 4-bit source never gets an int4 head from `auto` (requantizing the output layer to 4 bits
    changes greedy picks far more than the body does).
    cache_dir: where `auto` keeps its choice (formats-<hash>.json, keyed by the CPU's identity and flags, the
    model's shapes, the kernel source, torch's version and the thread count), so that every later start serves
    with the same formats; a choice timed while the machine was busy is used but not kept. None: no cache.
    retime: time the formats again even when a choice is cached (and keep the new one).
    """
    reason = lean_unsupported(model)
    lean = reason is None
    body_shapes, head_shape = _shapes(model, lean)
    q4 = q4 or {}
    flags = cpu_flags()
    busy = ""
    cached: tuple[FormatChoice, FormatChoice] | None = None
    path: Path | None = None
    identity: dict[str, Any] = {}
    if weights_dtype == "auto" and cache_dir is not None:
        with contextlib.suppress(OSError):
            identity = {
                "cpu": cpu_kernels._cpu_identity(),
                "flags": flags,
                "body": [list(x) for x in body_shapes],
                "head": list(head_shape),
                "q4": sorted(q4),
                "kernels": hashlib.sha256(cpu_kernels.SOURCE.read_bytes()).hexdigest(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "lean": lean,
                "rules": CHOICE_RULES,
            }
            path = _choice_path(cache_dir, identity)
            cached = None if retime else _load_choice(path)
    if cached is not None:
        body, head = cached
        busy = f"; choice cached in {path} (--retime-cpu-formats times it again)"
    elif weights_dtype == "auto":
        busy = _busy()
        # bf16 without bf16 dot-product instructions is emulated: 3x slower than fp32 at 16 rows on AVX2 (measured),
        # so it is timed only where the CPU has them.
        has_bf16 = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
        allowed = [f for f in FORMATS if f != "bf16" or has_bf16]
        head_allowed = (
            allowed if "lm_head.weight" in q4 else [f for f in allowed if f not in ("int4", "q4_1", "q4_1p", "q4_1v")]
        )
        if q4:
            # A GGUF source: never requantize its weights onto another grid (int8's per-row and q8_0's symmetric
            # steps cannot hold Q4_1's d*q + m; int4 rounds activations to bf16): those cost greedy agreement
            # (measured: 13 and 3 of 32 prompts identical) where q4_1 and q8_1 hold the body exactly. The head
            # is Q8_0 there, which q8_0 and q8_0v hold exactly.
            # q8_1 holds the same values as q4_1 in 1.67x the bytes; its load-time timing sometimes ranks it first
            # at one row, but serving one stream it measured 49.6 / 60.2 tok/s against q4_1's 64.1 / 65.1 (HTTP,
            # both pinned, alternated): the 4-bit copy leaves memory bandwidth to everything else.
            allowed = [f for f in allowed if f not in REQUANTIZING and f != "q8_1"]
            head_allowed = [f for f in head_allowed if f not in (*REQUANTIZING, "q8_1")] + ["q8_0", "q8_0v"]
        body, head, agreement = _timed_choice(body_shapes, allowed, head_shape, head_allowed, budget_s)
        if path is not None and not busy:
            _save_choice(path, body, head, identity)
            busy = f"{agreement}; choice measured and cached in {path}"
        elif path is not None:
            busy += f"{agreement} (not cached: the next start times it again)"
        else:
            busy += agreement
    else:
        body = head = FormatChoice.every(weights_dtype)
        if weights_dtype in FROM_Q4 and "lm_head.weight" not in q4:
            # The output layer has no 4-bit source (the GGUF keeps it in 8 bits): 4 bits there cost greedy
            # agreement far more than in the body (measured: 0 of 32 prompts identical vs fp32, against 6 of 8).
            # Our kernels hold the GGUF's Q8_0 output layer as Q8_0 blocks, exactly.
            head = FormatChoice.every("int8" if weights_dtype == "int4" else "q8_0")
    what = f"lean forward ({len(model.model.layers)} layers)" if lean else f"transformers' forward ({reason})"
    if lean:
        # fp32 everywhere is the exact mode (greedy output identical to transformers): PyTorch's ops only,
        # unless AISANDBOX_CPU_KERNELS=always (tests, A/B runs).
        exact = set(body.by_bucket) | set(head.by_bucket) == {"fp32"} and cpu_kernels.mode() != "always"
        kernels = None if exact else cpu_kernels.load()
        what += "; C kernels " + ("off (exact fp32)" if exact else "on" if kernels else "unavailable")
        fwd: CpuForward | None = CpuForward(model, body, head, q4, kernels)
    else:
        swap_linears(model, body, q4, head)
        fwd = None
    line = (
        f"CPU flags [{' '.join(flags) or 'unknown'}]; weights {weights_dtype}: body {body.describe()}; "
        f"head {head.describe()}; 4-bit source: {'GGUF Q4_1' if q4 else 'none'}; {what}{busy}"
    )
    return fwd, line
