"""Advantages for PPO: generalised advantage estimation over response tokens, and masked whitening.

Tensors are ``[batch, response_tokens]``; ``mask`` is 1 on real response tokens (the stop token
included) and 0 on the padding after a response ends. Padding never enters a sum, a mean or a
variance, and gets advantage 0 and return 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Sums a tensor over all processes (``accelerator.reduce(x, "sum")``); identity on one process.
AllReduceSum = Callable[[torch.Tensor], torch.Tensor]


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduceSum | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and **biased** variance of ``x`` over the positions where ``mask`` is 1:

        n = Σ m,   μ = Σ m·x / n,   σ² = Σ m·(x − μ)² / n

    ``all_reduce`` sums the partial sums over processes, so every rank gets the global moments.
    """
    m = mask.to(x.dtype)
    x = torch.where(mask.bool(), x, torch.zeros_like(x))  # padding may hold anything, even NaN
    sums = torch.stack([(x * m).sum(), m.sum()])
    if all_reduce is not None:
        sums = all_reduce(sums)
    total, count = sums[0], sums[1].clamp(min=1)
    mean = total / count
    centred = (x - mean) * m
    sq = (centred * centred).sum()
    if all_reduce is not None:
        sq = all_reduce(sq)
    return mean, sq / count


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: AllReduceSum | None = None,
) -> torch.Tensor:
    """Standardise ``x`` over real tokens only (biased variance, as TF ``moments``):

        whiten(x) = (x − μ) / sqrt(σ² + ε)            (shift_mean=True)
        whiten(x) = (x − μ) / sqrt(σ² + ε) + μ        (shift_mean=False: the mean is kept)

    with μ, σ² from :func:`masked_moments`. Masked positions come out as 0.
    """
    mean, var = masked_moments(x, mask, all_reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns ``(advantages, returns)``.

        δ_t = r_t + γ·V_{t+1} − V_t
        A_t = δ_t + γ·λ·A_{t+1}
        R_t = A_t + V_t

    with ``V_{t+1} = 0`` and ``A_{t+1} = 0`` past the last real token (the episode ends at the stop
    token, or at the last generated token when the response never stopped). ``returns`` come from
    these **un-whitened** advantages; whitening (:func:`whiten`) is applied afterwards, to the
    advantages only. Padding positions get advantage 0 and return 0.
    """
    real = mask.bool()
    zeros = torch.zeros_like(values)
    values = torch.where(real, values, zeros)
    rewards = torch.where(real, rewards, zeros)
    n = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(n)):
        # next_real is 0 past the end of each response: no bootstrapping from padding
        next_real = real[:, t + 1].to(values.dtype) if t + 1 < n else torch.zeros_like(values[:, 0])
        next_value = values[:, t + 1] * next_real if t + 1 < n else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(
            real[:, t], delta + gamma * lam * next_advantage * next_real, torch.zeros_like(delta)
        )
        advantages[:, t] = next_advantage
    returns = torch.where(real, advantages + values, zeros)
    return advantages, returns
