"""Batched token sampling for the torch backend: every row its own settings, one pass over the batch.

One decode step calls `Sampler.sample(rows, logits)` with the logits of every running sequence
([rows, vocab], float32) and each sequence's `SamplerRow`. The work is tensor operations over the batch (or
over the rows that use a setting); Python only loops over rows, never over the vocabulary. In order:

1. Logprobs, for the rows that ask, from the **raw** model distribution: `log_softmax` of the unprocessed
   logits, before temperature, penalties, logit_bias, top-k/p, min-p and the grammar mask. This is vLLM's
   default (`logprobs_mode="raw_logprobs"`) and what TensorRT-LLM returns, so both backends agree; a token
   the processing made impossible still has its model logprob.
2. `logit_bias` is added (OpenAI: -100..100 per token id).
3. `repetition_penalty` (the existing semantics, as in transformers and vLLM: a token seen in the prompt or
   the output has its positive logit divided and its negative logit multiplied by the penalty).
4. OpenAI's `frequency_penalty` and `presence_penalty`, over generated tokens only:
   `logits -= frequency_penalty * count + presence_penalty * (count > 0)`. Counts live in one
   [slots, vocab] tensor, updated in place with the sampled tokens each step (a scatter-add), never rebuilt.
5. Before `min_tokens` tokens exist, the request's stop token ids and EOS are banned (EOS only without
   `ignore_eos`). `ignore_eos` itself never bans EOS: as in vLLM it only means EOS does not end the
   sequence (the engine decides that), so a greedy row with ignore_eos picks what plain greedy picks.
6. The grammar bitmask (xgrammar) of the guided rows. A grammar always leaves a token: when it is complete
   only its stop tokens remain, and those win over min_tokens.
7. Greedy rows take the argmax. Sampled rows divide by their temperature, keep their top-k, then their
   top-p nucleus, then drop tokens under min_p times the most likely one, and draw one token by inverse CDF
   from a uniform of the row's own seeded generator: a seeded request samples the same tokens whatever else
   shares its batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from aisandbox.runtime.request import SamplingParams
from aisandbox.runtime.structured.grammar import GrammarMatcher, mask_logits
from aisandbox.runtime.types import TokenLogprob

__all__ = ["MAX_TOP_LOGPROBS", "Sampler", "SamplerRow", "StepResult", "prompt_logprobs"]

MAX_TOP_LOGPROBS = 20
"""OpenAI's limit on top_logprobs."""


@dataclass(eq=False, slots=True)
class SamplerRow:
    """The sampling state of one sequence, owned by the engine thread; make it with `Sampler.new_row`."""

    params: SamplingParams
    generator: torch.Generator | None
    """CPU generator of the row's uniforms; None for greedy rows."""
    matcher: GrammarMatcher | None = None
    generated: int = 0
    """Tokens sampled so far."""
    slot: int = -1
    """Row of the sampler's count tables, or -1 when the row needs no counts."""
    bias_ids: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)
    banned_early: list[int] = field(default_factory=list)
    """Token ids banned while generated < min_tokens."""

    @property
    def uses_counts(self) -> bool:
        return self.slot >= 0


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one `Sampler.sample` call picked, by row."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None]
    """Set for rows whose request asked for logprobs."""
    grammar_done: list[bool]
    """The row's grammar accepted its stop token: the sequence is complete."""
    grammar_rejected: list[bool]
    """The row's grammar refused the sampled token (a bug: the mask allowed it)."""


class Sampler:
    """Samples one token per row for a batch of sequences with different settings."""

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.device = torch.device(device)
        self._counts = torch.zeros((0, self.vocab_size), dtype=torch.int32, device=self.device)
        """[slots, vocab] how often each token was generated, for the rows with penalties."""
        self._seen_prompt = torch.zeros((0, self.vocab_size), dtype=torch.bool, device=self.device)
        """[slots, vocab] which tokens the prompt holds, for repetition_penalty."""
        self._free: list[int] = []

    # ---- rows ----

    def new_row(
        self, params: SamplingParams, prompt_token_ids: Sequence[int] = (), generator: torch.Generator | None = None
    ) -> SamplerRow:
        """The state of a new sequence: its generator (a CPU one, seeded, unless given), grammar matcher and
        count slot. Call `release` when the sequence ends."""
        if generator is None and not params.greedy:
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else random.randrange(2**63))
        row = SamplerRow(params, generator)
        if params.grammar is not None:
            row.matcher = params.grammar.matcher()
        for token_id, bias in params.logit_bias:
            if 0 <= token_id < self.vocab_size and bias != 0.0:
                row.bias_ids.append(int(token_id))
                row.bias_values.append(float(bias))
        if params.min_tokens > 0:
            early = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
            row.banned_early = sorted(t for t in early if 0 <= t < self.vocab_size)
        if params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0:
            row.slot = self._take_slot()
            if params.repetition_penalty != 1.0 and prompt_token_ids:
                ids = torch.tensor(sorted(set(prompt_token_ids)), dtype=torch.long, device=self.device)
                self._seen_prompt[row.slot, ids[ids < self.vocab_size]] = True
        return row

    def release(self, row: SamplerRow) -> None:
        """Give a finished sequence's count slot back."""
        if row.slot >= 0:
            self._free.append(row.slot)
            row.slot = -1

    def _take_slot(self) -> int:
        if not self._free:
            old = self._counts.shape[0]
            new = max(8, 2 * old)
            counts = torch.zeros((new, self.vocab_size), dtype=torch.int32, device=self.device)
            seen = torch.zeros((new, self.vocab_size), dtype=torch.bool, device=self.device)
            counts[:old] = self._counts
            seen[:old] = self._seen_prompt
            self._counts, self._seen_prompt = counts, seen
            self._free.extend(range(new - 1, old - 1, -1))
        slot = self._free.pop()
        self._counts[slot].zero_()
        self._seen_prompt[slot].zero_()
        return slot

    def counts(self, row: SamplerRow) -> torch.Tensor:
        """The generated-token counts of a row ([vocab] int32; zeros for a row without penalties)."""
        if row.slot < 0:
            return torch.zeros(self.vocab_size, dtype=torch.int32, device=self.device)
        return self._counts[row.slot].clone()

    # ---- one step ----

    def sample(self, rows: Sequence[SamplerRow], logits: torch.Tensor) -> StepResult:
        """Pick one token per row of `logits` [len(rows), vocab] (float32, modified in place).

        Updates each row's counts, generated count and grammar state with the picked token.
        """
        n, width = logits.shape
        dev = logits.device
        if width != self.vocab_size:
            raise ValueError(f"logits have {width} columns; the sampler was built for {self.vocab_size}")

        # 1. Raw logprobs, before anything changes the logits.
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs]
        raw_lp = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None

        # 2. logit_bias.
        b_rows, b_ids, b_vals = [], [], []
        for i, r in enumerate(rows):
            if r.bias_ids:
                b_rows += [i] * len(r.bias_ids)
                b_ids += r.bias_ids
                b_vals += r.bias_values
        if b_rows:
            logits.index_put_(
                (torch.tensor(b_rows, device=dev), torch.tensor(b_ids, device=dev)),
                torch.tensor(b_vals, dtype=logits.dtype, device=dev),
                accumulate=True,
            )

        # 3-4. Penalties, from the count tables.
        p_rows = [i for i, r in enumerate(rows) if r.slot >= 0]
        if p_rows:
            self._penalize(logits, [rows[i] for i in p_rows], p_rows)

        # 5. min_tokens bans.
        ban_rows, ban_ids, banned = [], [], []
        for i, r in enumerate(rows):
            if r.banned_early and r.generated < r.params.min_tokens:
                ban_rows += [i] * len(r.banned_early)
                ban_ids += r.banned_early
                banned.append(i)
        if ban_rows:
            logits[torch.tensor(ban_rows, device=dev), torch.tensor(ban_ids, device=dev)] = -float("inf")

        # 6. Grammar masks.
        g_rows = [i for i, r in enumerate(rows) if r.matcher is not None]
        if g_rows:
            matchers = [rows[i].matcher for i in g_rows]
            mask_logits(logits, g_rows, matchers, [i for i in banned if rows[i].matcher is not None])  # type: ignore[arg-type]

        # 7. Pick.
        picked = logits.argmax(dim=-1)
        s_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if s_rows:
            picked[s_rows] = self._draw(logits[s_rows], [rows[i] for i in s_rows])
        tokens = [int(t) for t in picked.tolist()]

        logprobs: list[TokenLogprob | None] = [None] * n
        if raw_lp is not None:
            chosen = raw_lp.gather(1, picked[lp_rows].unsqueeze(1)).squeeze(1).tolist()
            k = max(min(rows[i].params.top_logprobs, MAX_TOP_LOGPROBS) for i in lp_rows)
            top_v: list[list[float]] = [[] for _ in lp_rows]
            top_i: list[list[int]] = [[] for _ in lp_rows]
            if k > 0:
                top = raw_lp.topk(k, dim=-1)
                top_v, top_i = top.values.tolist(), top.indices.tolist()
            for j, i in enumerate(lp_rows):
                want = min(rows[i].params.top_logprobs, MAX_TOP_LOGPROBS)
                pairs = tuple(zip(top_i[j][:want], top_v[j][:want], strict=True))
                logprobs[i] = TokenLogprob(tokens[i], float(chosen[j]), pairs)

        # Update the state with the picked tokens.
        if p_rows:
            slots = torch.tensor([rows[i].slot for i in p_rows], device=dev)
            self._counts.index_put_(
                (slots, picked[p_rows].to(dev)), torch.ones(len(p_rows), dtype=torch.int32, device=dev), accumulate=True
            )
        done = [False] * n
        rejected = [False] * n
        for i in g_rows:
            matcher = rows[i].matcher
            assert matcher is not None
            if not matcher.accept(tokens[i]):
                rejected[i] = True
            elif matcher.is_terminated:
                done[i] = True
        for r in rows:
            r.generated += 1
        return StepResult(tokens, logprobs, done, rejected)

    def _penalize(self, logits: torch.Tensor, rows: list[SamplerRow], idx: list[int]) -> None:
        slots = torch.tensor([r.slot for r in rows], device=logits.device)
        index = torch.tensor(idx, device=logits.device)
        counts = self._counts.index_select(0, slots)  # [p, vocab] int32
        sub = logits.index_select(0, index)
        rep = [r.params.repetition_penalty for r in rows]
        if any(p != 1.0 for p in rep):
            seen = self._seen_prompt.index_select(0, slots) | (counts > 0)
            penalty = torch.tensor(rep, dtype=sub.dtype, device=sub.device)[:, None]
            penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
            sub = torch.where(seen, penalized, sub)
        freq = [r.params.frequency_penalty for r in rows]
        pres = [r.params.presence_penalty for r in rows]
        if any(freq) or any(pres):
            f = torch.tensor(freq, dtype=sub.dtype, device=sub.device)[:, None]
            p = torch.tensor(pres, dtype=sub.dtype, device=sub.device)[:, None]
            sub = sub - (f * counts + p * (counts > 0))
        logits.index_copy_(0, index, sub)

    def _draw(self, logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        """Temperature, top-k, top-p and min-p per row, then one inverse-CDF draw per row: [rows] token ids."""
        dev = logits.device
        temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=dev)
        x = logits / temps[:, None]
        top_k = [r.params.top_k for r in rows]
        if any(0 < k < x.shape[-1] for k in top_k):
            ks = torch.tensor([k if 0 < k < x.shape[-1] else 0 for k in top_k], device=dev)
            kth = x.topk(int(ks.max()), dim=-1).values.gather(1, (ks.clamp(min=1) - 1)[:, None])
            kth = torch.where(ks[:, None] > 0, kth, torch.full_like(kth, -float("inf")))
            x = x.masked_fill(x < kth, -float("inf"))
        probs = torch.softmax(x, dim=-1)
        top_p = [r.params.top_p for r in rows]
        if any(p < 1.0 for p in top_p):
            ps = torch.tensor(top_p, dtype=probs.dtype, device=dev)[:, None]
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = ((sorted_probs.cumsum(dim=-1) - sorted_probs) > ps) & (ps < 1.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(drop, 0.0))
        min_p = [r.params.min_p for r in rows]
        if any(p > 0.0 for p in min_p):
            mp = torch.tensor(min_p, dtype=probs.dtype, device=dev)[:, None]
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        uniforms = torch.stack([torch.rand((), generator=r.generator, dtype=torch.float64) for r in rows]).to(dev)
        cdf = probs.double().cumsum(dim=-1)
        total = cdf[:, -1:]
        # u * total < total; `right=True` then lands on a token with positive probability.
        target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


PROMPT_LOGPROBS_SLICE = 256
"""Prompt positions whose log_softmax is computed at once (`prompt_logprobs`)."""


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], top: int) -> tuple[TokenLogprob | None, ...]:
    """Logprobs of each prompt token under the raw model distribution, from the prefill's logits.

    Args:
        logits: [len(prompt), vocab] the model's logits at every prompt position (position j predicts j + 1).
        prompt: The prompt's token ids.
        top: Alternatives per position (0..MAX_TOP_LOGPROBS).

    Returns:
        One entry per prompt token; the first is None (nothing predicts it), as OpenAI's echo shows it.
    """
    if len(prompt) < 2:
        return (None,) * len(prompt)
    k = min(top, MAX_TOP_LOGPROBS)
    chosen: list[float] = []
    top_v: list[list[float]] = []
    top_i: list[list[int]] = []
    targets = torch.tensor(prompt[1:], device=logits.device)
    # In slices of PROMPT_LOGPROBS_SLICE positions: the log_softmax copy is [slice, vocab], never [prompt, vocab]
    # next to the logits (a 4,000-token prompt on a 49k vocabulary: 0.8 GB a copy).
    for lo in range(0, len(prompt) - 1, PROMPT_LOGPROBS_SLICE):
        hi = min(lo + PROMPT_LOGPROBS_SLICE, len(prompt) - 1)
        lp = torch.log_softmax(logits[lo:hi].float(), dim=-1)
        chosen += lp.gather(1, targets[lo:hi, None]).squeeze(1).tolist()
        if k > 0:
            best = lp.topk(k, dim=-1)
            top_v += best.values.tolist()
            top_i += best.indices.tolist()
        else:
            top_v += [[] for _ in range(hi - lo)]
            top_i += [[] for _ in range(hi - lo)]
        del lp
    out: list[TokenLogprob | None] = [None]
    for j, token in enumerate(prompt[1:]):
        out.append(TokenLogprob(int(token), float(chosen[j]), tuple(zip(top_i[j], top_v[j], strict=True))))
    return tuple(out)
