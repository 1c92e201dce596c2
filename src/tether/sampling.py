"""Best-of-N sampling: N responses per prompt from a policy, scored by a reward model, ranked.

The sampler below the stages: ``tether bon`` (``tether.stages.best_of_n``) writes its results as
JSONL, and evaluation (``tether.evaluation.evaluate``) scores a best-of-N policy with it. Its
distance from the sampling policy is bounded analytically by :func:`bon_kl_bound`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tether.data.records import Prompt
from tether.generation import Sample, SamplingSettings, sample_responses, sample_seeded


def bon_kl_bound(n: int) -> float:
    """Upper bound on ``KL(π_bon ‖ π)``: ``log N − (N − 1)/N`` (Beirami et al. 2024).

    Exact only when the N samples are distinct; 0 for N = 1. N = 4 → 0.6363, N = 16 → 1.8351.
    """
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


@dataclass
class ScoredSample:
    text: str
    score: float
    stopped: bool  # ended with the stop token (False: cut at max_new_tokens)
    num_tokens: int  # generated tokens, the stop token included
    index: int  # order in which it was sampled

    @property
    def usable(self) -> bool:
        """Non-empty text: something a demonstration loader (and a user) can take."""
        return bool(self.text.strip())


@dataclass
class BestOfNResult:
    prompt: Prompt
    ranked: list[ScoredSample]  # best first

    @property
    def best(self) -> ScoredSample | None:
        """The highest-scoring sample with non-empty text (None if every sample is empty)."""
        return next((s for s in self.ranked if s.usable), None)


def rank(samples: list[ScoredSample]) -> list[ScoredSample]:
    """Highest score first; ties keep sampling order."""
    return sorted(samples, key=lambda s: (-s.score, s.index))


def score_samples(
    reward_model,
    rm_tokenizer,
    prompts: Sequence[Prompt],
    groups: Sequence[Sequence[Sample]],
    batch_size: int = 16,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    missing_stop_score: float | None = None,
) -> list[list[ScoredSample]]:
    """Reward-model scores for groups of samples (one group per prompt), each group ranked best first.

    A sample cut at the token budget (``stopped`` False) is scored without a stop token, as PPO's rollout
    and the reward model's training pairs hold it; ``missing_stop_score`` replaces its score when given."""
    from tether.models.scoring import score_texts

    flat_prompts = [p for p, g in zip(prompts, groups) for _ in g]
    flat_texts = [s.text for g in groups for s in g]
    flat_stopped = [s.stopped for g in groups for s in g]
    scores = (
        score_texts(
            reward_model,
            rm_tokenizer,
            flat_prompts,
            flat_texts,
            batch_size=batch_size,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            stopped=flat_stopped,
        ).tolist()
        if flat_texts
        else []
    )
    out, k = [], 0
    for group in groups:
        scored = []
        for i, s in enumerate(group):
            score = float(scores[k])
            if missing_stop_score is not None and not s.stopped:
                score = float(missing_stop_score)
            scored.append(ScoredSample(s.text, score, s.stopped, len(s.response_ids), i))
            k += 1
        out.append(rank(scored))
    return out


def best_of_n(
    policy,
    reward_model,
    tokenizer,
    prompts: Sequence[Prompt],
    n: int,
    settings: SamplingSettings,
    batch_size: int = 8,
    rm_tokenizer=None,
    reward_batch_size: int = 16,
    max_prompt_length: int | None = None,
    max_length: int | None = None,
    missing_stop_score: float | None = None,
    seed: int | None = None,
) -> list[BestOfNResult]:
    """Sample ``n`` responses per prompt from ``policy``, score them with ``reward_model``, rank them.

    ``rm_tokenizer`` defaults to ``tokenizer``; a reward model with its own tokenizer re-tokenises
    the response texts with the shared template rule. With ``seed`` the sampling is
    :func:`tether.generation.sample_seeded` (the same samples on any number of processes, shared out
    over them); without, it continues the global torch RNG. Returns one ``BestOfNResult`` per prompt.
    """
    if seed is None:
        groups = sample_responses(
            policy,
            tokenizer,
            list(prompts),
            settings,
            num_return_sequences=n,
            batch_size=batch_size,
            max_prompt_length=max_prompt_length,
        )
    else:
        groups = sample_seeded(
            policy,
            tokenizer,
            list(prompts),
            settings,
            num_return_sequences=n,
            batch_size=batch_size,
            seed=seed,
            max_prompt_length=max_prompt_length,
        )
    ranked = score_samples(
        reward_model,
        rm_tokenizer if rm_tokenizer is not None else tokenizer,
        prompts,
        groups,
        reward_batch_size,
        max_length,
        max_prompt_length,
        missing_stop_score,
    )
    return [BestOfNResult(p, r) for p, r in zip(prompts, ranked)]
