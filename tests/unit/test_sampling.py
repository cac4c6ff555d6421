"""The batched sampler: every setting on its own, mixed rows in one batch, and the penalty arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from aisandbox.runtime.request import SamplingParams
from aisandbox.runtime.torch.sampling import Sampler, SamplerRow, prompt_logprobs

V = 50
EOS = 2


def sampler() -> Sampler:
    return Sampler(V, (EOS,))


def logits_for(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, V), generator=g) * 3


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=16, temperature=0.0, **kw)  # type: ignore[arg-type]


def test_greedy_is_argmax() -> None:
    s = sampler()
    logits = logits_for(3)
    rows = [s.new_row(greedy()) for _ in range(3)]
    assert s.sample(rows, logits.clone()).tokens == logits.argmax(-1).tolist()


def test_logit_bias_minus_100_changes_the_argmax_and_plus_100_forces_a_token() -> None:
    s = sampler()
    logits = logits_for(1)
    top = int(logits.argmax())
    banned = s.sample([s.new_row(greedy(logit_bias=((top, -100.0),)))], logits.clone()).tokens[0]
    assert banned != top and banned == int(logits[0].topk(2).indices[1])
    forced = s.sample([s.new_row(greedy(logit_bias=((7, 100.0),)))], logits.clone()).tokens[0]
    assert forced == 7


def test_frequency_and_presence_penalties_match_a_hand_computation() -> None:
    s = sampler()
    row = s.new_row(greedy(frequency_penalty=0.5, presence_penalty=0.25))
    # Generate tokens 3, 3, 5 by forcing them with logits.
    for token in (3, 3, 5):
        forced = torch.full((1, V), -10.0)
        forced[0, token] = 10.0
        s.sample([row], forced)
    assert s.counts(row)[[3, 5, 7]].tolist() == [2, 1, 0]
    base = torch.zeros((1, V))
    base[0, 3], base[0, 5], base[0, 7] = 2.0, 1.6, 1.4
    work = base.clone()
    s._penalize(work, [row], [0])
    # 3: 2.0 - 0.5*2 - 0.25 = 0.75; 5: 1.6 - 0.5 - 0.25 = 0.85; 7: unseen, 1.4.
    assert work[0, [3, 5, 7]].tolist() == pytest.approx([0.75, 0.85, 1.4])
    assert s.sample([row], base.clone()).tokens[0] == 7


def test_negative_penalties_favour_repeats() -> None:
    s = sampler()
    row = s.new_row(greedy(frequency_penalty=-2.0))
    forced = torch.full((1, V), -10.0)
    forced[0, 9] = 10.0
    s.sample([row], forced)
    flat = torch.zeros((1, V))
    flat[0, 4] = 1.0  # would win without the penalty
    assert s.sample([row], flat).tokens[0] == 9


def test_repetition_penalty_covers_the_prompt_and_the_output() -> None:
    s = sampler()
    row = s.new_row(greedy(repetition_penalty=2.0), prompt_token_ids=(4,))
    logits = torch.zeros((1, V))
    logits[0, 4], logits[0, 6], logits[0, 8] = 3.0, 1.8, -1.0
    work = logits.clone()
    s._penalize(work, [row], [0])
    assert work[0, [4, 6, 8]].tolist() == pytest.approx([1.5, 1.8, -1.0])
    assert s.sample([row], logits.clone()).tokens[0] == 6
    work = logits.clone()
    s._penalize(work, [row], [0])  # 6 is now generated too
    assert work[0, 6].item() == pytest.approx(0.9)


def test_min_tokens_bans_eos_and_stop_ids_then_lifts_the_ban() -> None:
    s = sampler()
    row = s.new_row(greedy(min_tokens=2, stop_token_ids=(11,)))
    logits = torch.zeros((1, V))
    logits[0, EOS], logits[0, 11], logits[0, 20] = 5.0, 4.0, 1.0
    assert s.sample([row], logits.clone()).tokens[0] == 20
    assert s.sample([row], logits.clone()).tokens[0] == 20
    assert s.sample([row], logits.clone()).tokens[0] == EOS


def test_ignore_eos_does_not_ban_eos() -> None:
    """As in vLLM, ignore_eos only means EOS does not end the sequence (the engine's call)."""
    s = sampler()
    logits = torch.zeros((1, V))
    logits[0, EOS] = 5.0
    assert s.sample([s.new_row(greedy(ignore_eos=True))], logits.clone()).tokens[0] == EOS
    # With min_tokens, ignore_eos keeps EOS allowed; only the stop ids are banned early.
    row = s.new_row(greedy(ignore_eos=True, min_tokens=3, stop_token_ids=(11,)))
    assert row.banned_early == [11]


def test_top_k_1_top_p_and_min_p_restrict_the_draw() -> None:
    s = sampler()
    logits = torch.full((1, V), -5.0)
    logits[0, 10], logits[0, 11], logits[0, 12] = 3.0, 2.9, 2.8
    for _ in range(20):
        topk = s.new_row(SamplingParams(max_tokens=4, top_k=2, seed=None))
        assert s.sample([topk], logits.clone()).tokens[0] in (10, 11)
        topp = s.new_row(SamplingParams(max_tokens=4, top_p=0.3))
        assert s.sample([topp], logits.clone()).tokens[0] == 10
        minp = s.new_row(SamplingParams(max_tokens=4, min_p=0.5))
        assert s.sample([minp], logits.clone()).tokens[0] in (10, 11, 12)


def test_temperature_spreads_the_draw() -> None:
    s = sampler()
    logits = torch.zeros((1, V))
    logits[0, 0] = 2.0
    cold = [s.sample([s.new_row(SamplingParams(max_tokens=1, temperature=0.05))], logits.clone()).tokens[0]
            for _ in range(30)]  # fmt: skip
    hot = [s.sample([s.new_row(SamplingParams(max_tokens=1, temperature=2.0))], logits.clone()).tokens[0]
           for _ in range(30)]  # fmt: skip
    assert set(cold) == {0}
    assert len(set(hot)) > 5


def test_seeded_rows_reproduce_whatever_shares_the_batch() -> None:
    s = sampler()
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    logits = logits_for(4, seed=3)

    def run(batch: list[SamplerRow], row_index: int) -> list[int]:
        out = []
        for _ in range(8):
            out.append(s.sample(batch, logits.clone()[: len(batch)]).tokens[row_index])
        return out

    alone = run([s.new_row(sp)], 0)
    mixed = run([s.new_row(greedy()), s.new_row(SamplingParams(max_tokens=8, seed=9)), s.new_row(sp)], 2)
    # Row 2 sees logits_for(...)[2], not [0]: compare against a lone run on that row's logits.
    lone = [s.sample([r], logits.clone()[2:3]).tokens[0] for r in [s.new_row(sp)] for _ in range(8)]
    assert mixed == lone
    assert alone == run([s.new_row(sp)], 0)  # same seed, same draws


def test_mixed_rows_in_one_batch_each_get_their_own_setting() -> None:
    s = sampler()
    logits = torch.zeros((4, V))
    logits[:, 10] = 3.0
    logits[:, 20] = 2.5
    rows = [
        s.new_row(greedy()),
        s.new_row(greedy(logit_bias=((10, -100.0),))),
        s.new_row(greedy(presence_penalty=2.0)),
        s.new_row(SamplingParams(max_tokens=4, top_k=1)),
    ]
    assert s.sample(rows, logits.clone()).tokens == [10, 20, 10, 10]
    # Row 2 has now generated 10 once: the presence penalty (2.0) moves it below 20.
    assert s.sample(rows, logits.clone()).tokens == [10, 20, 20, 10]


def test_logprobs_come_from_the_raw_distribution() -> None:
    s = sampler()
    logits = logits_for(3)
    raw = torch.log_softmax(logits, -1)
    rows = [
        s.new_row(greedy(logprobs=True, top_logprobs=5, logit_bias=((0, 100.0),))),
        s.new_row(greedy()),
        s.new_row(greedy(logprobs=True)),
    ]
    step = s.sample(rows, logits.clone())
    first, none, third = step.logprobs
    assert none is None and third is not None and third.top == ()
    assert first is not None and first.token_id == 0  # forced by the bias ...
    assert first.logprob == pytest.approx(float(raw[0, 0]))  # ... but reported with the model's logprob
    best = raw[0].topk(5)
    assert [t for t, _ in first.top] == best.indices.tolist()
    assert [lp for _, lp in first.top] == pytest.approx(best.values.tolist())
    assert math.isclose(third.logprob, float(raw[2].max()), rel_tol=1e-6)


def test_count_slots_are_reused() -> None:
    s = sampler()
    a = s.new_row(greedy(frequency_penalty=1.0))
    forced = torch.full((1, V), -10.0)
    forced[0, 5] = 10.0
    s.sample([a], forced)
    s.release(a)
    b = s.new_row(greedy(presence_penalty=1.0))
    assert s.counts(b).sum() == 0  # a fresh slot, cleared


def test_prompt_logprobs() -> None:
    logits = logits_for(4)
    prompt = [1, 7, 9, 3]
    out = prompt_logprobs(logits, prompt, 2)
    raw = torch.log_softmax(logits, -1)
    assert out[0] is None and len(out) == 4
    assert out[1] is not None and out[1].token_id == 7 and out[1].logprob == pytest.approx(float(raw[0, 7]))
    assert out[3] is not None and out[3].logprob == pytest.approx(float(raw[2, 3])) and len(out[3].top) == 2


def test_merged_deltas_keep_every_logprob_and_the_prompt_logprobs() -> None:
    from aisandbox.runtime.types import FinishReason, TokenDelta, TokenLogprob

    a = TokenDelta((5,), logprobs=(TokenLogprob(5, -1.0),), prompt_logprobs=(None, TokenLogprob(3, -2.0)))
    b = TokenDelta((2,), FinishReason.STOP, 2, logprobs=(TokenLogprob(2, -0.5),))
    merged = a.merge(b)
    assert merged.token_ids == (5, 2) and merged.finish_reason is FinishReason.STOP and merged.stop_token_id == 2
    assert [e.token_id for e in merged.logprobs or ()] == [5, 2]
    assert merged.prompt_logprobs == a.prompt_logprobs
    assert TokenDelta((1,)).merge(TokenDelta((2,))).logprobs is None


def test_prompt_logprobs_in_slices_match_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """The log_softmax runs in slices of positions (never a second [prompt x vocab] copy); same answer."""
    from aisandbox.runtime.torch import sampling

    torch.manual_seed(0)
    logits = torch.randn(11, 50)
    prompt = [int(t) for t in torch.randint(0, 50, (11,))]
    whole = sampling.prompt_logprobs(logits, prompt, 3)
    monkeypatch.setattr(sampling, "PROMPT_LOGPROBS_SLICE", 3)
    sliced = sampling.prompt_logprobs(logits, prompt, 3)
    assert sliced == whole and len(sliced) == 11 and sliced[0] is None
    assert sampling.prompt_logprobs(logits, prompt, 0)[5].top == ()  # type: ignore[union-attr]
