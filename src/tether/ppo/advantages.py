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


# ---- critic-free estimators (RLOO, GRPO, REINFORCE++) ----------------------------------------------
#
# Layout: ``rewards`` is ``[batch]``, one sequence reward per response, with the k = ``group_size``
# responses of one prompt contiguous: ``[p0r0, p0r1, …, p0r(k−1), p1r0, …]`` (``batch`` a multiple of
# k; in a multi-process run every process holds whole groups). ``valid`` is ``[batch]`` bool, False
# where the reward is missing (a reward function returned ``None``): such a response enters no
# baseline, mean or standard deviation and gets advantage 0. ``valid=None`` means all valid.

SCALE_REWARDS = ("group", "batch", "none")


def _groups(
    rewards: torch.Tensor, valid: torch.Tensor | None, group_size: int, estimator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch]`` rewards and validity as ``[prompts, k]``; missing rewards set to 0 (they may hold NaN)."""
    if group_size < 2:
        from tether.config import ConfigError

        raise ConfigError(
            f"{estimator} compares each response with the other responses to its prompt: "
            f"set --num_generations to 2 or more (got {group_size})"
        )
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{estimator}: {tuple(rewards.shape)} rewards are not a whole number of groups of "
            f"--num_generations {group_size} responses (one reward per response, a prompt's responses contiguous)"
        )
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    return rewards.view(-1, group_size), valid.view(-1, group_size)


def rloo_advantages(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each response's baseline is the mean reward of
    the other responses to the same prompt,

        A_i = R_i − (1/(k−1)) Σ_{j≠i} R_j        (= k/(k−1)·(R_i − mean_g R))

    over the k responses of each group (layout above). With missing rewards, k is the group's count of
    valid rewards and the sum runs over valid j; a group with fewer than 2 valid rewards has no
    baseline and gets 0 everywhere. Returns ``[batch]``.
    """
    r, v = _groups(rewards, valid, group_size, "rloo")
    count = v.sum(1, keepdim=True).to(r.dtype)
    baseline = (r.sum(1, keepdim=True) - r) / (count - 1).clamp(min=1)
    advantages = torch.where(v & (count >= 2), r - baseline, torch.zeros_like(r))
    return advantages.view(-1)


def masked_std(x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduceSum | None = None) -> torch.Tensor:
    """**Unbiased** standard deviation of ``x`` where ``mask`` is 1 (global over processes with ``all_reduce``):

        s = sqrt(σ² · n / (n − 1))        σ² the biased variance of :func:`masked_moments`, n = Σ m

    0 when n < 2.
    """
    _, var = masked_moments(x, mask, all_reduce)
    n = mask.sum().to(x.dtype)
    if all_reduce is not None:
        n = all_reduce(n)
    return torch.sqrt(var * n / (n - 1).clamp(min=1))


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    valid: torch.Tensor | None = None,
    all_reduce: AllReduceSum | None = None,
) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024), over the k responses of each group:

        A_i = (R_i − mean_g R) / (std_g R + ε)      scale_rewards="group"
        A_i = (R_i − mean_g R) / (std_B R + ε)      scale_rewards="batch" (std over the whole batch,
                                                     every process's rewards with ``all_reduce``)
        A_i =  R_i − mean_g R                       scale_rewards="none"  (Dr. GRPO, Liu et al. 2025)

    The standard deviations are **unbiased** (divide by n − 1), as ``torch.std`` in TRL's
    GRPOTrainer, so that a TRL user's ``scale_rewards`` and ε = 1e-4 give the same advantages here
    (the whitening of GAE advantages stays biased, as TF ``moments`` in the reference PPO). Missing
    rewards are left out of every mean and std; a group with one valid reward gets 0 (its deviation
    from its own mean), a missing reward gets 0. Returns ``[batch]``.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"--scale_rewards {scale_rewards!r}: use one of {', '.join(SCALE_REWARDS)}")
    r, v = _groups(rewards, valid, group_size, "grpo")
    m = v.to(r.dtype)
    count = m.sum(1, keepdim=True)
    mean = r.sum(1, keepdim=True) / count.clamp(min=1)
    centred = (r - mean) * m
    if scale_rewards == "group":
        std = torch.sqrt((centred * centred).sum(1, keepdim=True) / (count - 1).clamp(min=1))
        centred = centred / (std + eps)
    elif scale_rewards == "batch":
        centred = centred / (masked_std(r, v, all_reduce) + eps)
    return torch.where(v, centred, torch.zeros_like(centred)).view(-1)


def reinforce_pp_advantages(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    valid: torch.Tensor | None = None,
    eps: float = 1e-8,
    all_reduce: AllReduceSum | None = None,
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): undiscounted return-to-go over each response's real tokens, whitened over
    the real tokens of the **global** batch,

        G_t = Σ_{s≥t} r_s        (γ = 1, s over the response's real tokens)
        A_t = whiten(G)_t        (:func:`whiten`: (G − μ)/sqrt(σ² + ε), biased σ², ``all_reduce`` for
                                  every process's tokens)

    ``token_rewards`` ``[batch, response_tokens]`` are ``r_t = −β·KL_t`` plus the score at the stop
    token (:func:`tether.ppo.losses.token_rewards`). A response whose reward is missing
    (``valid[i]`` False) is left out of the statistics and gets 0 on every token; padding gets 0.
    """
    real = mask.bool()
    if valid is not None:
        real = real & valid.bool().unsqueeze(1)
    rewards = torch.where(real, token_rewards, torch.zeros_like(token_rewards))
    returns = rewards.flip(1).cumsum(1).flip(1)
    return whiten(returns, real, eps=eps, all_reduce=all_reduce)


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage on every real token of its response, 0 on padding:

    A_{i,t} = A_i · m_{i,t}        ``[batch]`` → ``[batch, response_tokens]``
    """
    return torch.where(mask.bool(), advantages.unsqueeze(1), torch.zeros((), dtype=advantages.dtype))


def critic_free_advantages(
    estimator: str,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    valid: torch.Tensor | None = None,
    scale_rewards: str = "group",
    all_reduce: AllReduceSum | None = None,
) -> torch.Tensor:
    """Per-token advantages ``[batch, response_tokens]`` without a value model, from the token rewards
    ``r_t = −β·KL_t + [t = L − 1]·score`` (β = 0 with ``--kl_in_loss``):

        rloo, grpo:    R_i = Σ_t r_{i,t} = score_i − β·Σ_t KL_{i,t}   (the KL in the sequence reward, as
                       TRL's RLOO), A_i from :func:`rloo_advantages` / :func:`grpo_advantages`, then
                       A_{i,t} = A_i on every real token (:func:`token_advantages`)
        reinforce_pp:  :func:`reinforce_pp_advantages` (return-to-go, whitened over the global batch)
    """
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(token_rewards, mask, valid, all_reduce=all_reduce)
    real = mask.bool()
    sequence = torch.where(real, token_rewards, torch.zeros_like(token_rewards)).sum(1)
    if estimator == "rloo":
        advantages = rloo_advantages(sequence, group_size, valid)
    elif estimator == "grpo":
        advantages = grpo_advantages(sequence, group_size, scale_rewards, valid=valid, all_reduce=all_reduce)
    else:
        raise ValueError(f"no critic-free estimator {estimator!r}")
    return token_advantages(advantages, mask)
