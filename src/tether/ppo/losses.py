"""The PPO equations for RLHF, one small pure function each.

Shapes: ``[batch, response_tokens]`` for per-token quantities, ``[batch, response_tokens, vocab]``
for logits. ``mask`` is 1 on real response tokens (stop token included) and 0 on the padding
after a response; a masked position never contributes to a loss, a statistic or a gradient,
whatever values it holds (they are replaced by neutral ones before any arithmetic).

Means are **token means**: ``Σ m·x / n`` where ``n`` defaults to ``Σ m``. Passing the token count
of the whole minibatch as ``n`` makes gradient accumulation over micro-batches sum to exactly the
minibatch loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: other names of the per-token KL estimators (TRL's ``kl`` and ``mse``)
KL_ALIASES = {"kl": "k1", "mse": "k2"}
#: every accepted ``--kl_penalty`` value: the estimators and their aliases
KL_ESTIMATORS = ("k1", "kl", "abs", "mse", "k2", "k3", "full")


def kl_estimator_name(kind: str) -> str:
    """The canonical name of a KL estimator (``kl`` → ``k1``, ``mse`` → ``k2``; others unchanged)."""
    return KL_ALIASES.get(kind, kind)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``Σ m·x`` (over ``dim`` or everything); masked entries are dropped, not multiplied (NaN-safe)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """``Σ m·x / n`` with ``n = Σ m`` unless a ``denominator`` (e.g. the minibatch's token count) is given."""
    n = mask.sum().clamp(min=1) if denominator is None else denominator
    return masked_sum(x, mask) / n


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(z / T)[token]`` computed in float32:

        log π(a | s) = z_a / T − logsumexp_v(z_v / T)

    The temperature is part of the policy: rollout, training and reference all use the same T.
    """
    z = logits.float() / temperature
    chosen = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(z / T)`` per position: ``H = logsumexp(z/T) − Σ_v p_v·z_v/T``."""
    z = logits.float() / temperature
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def full_kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact KL over the vocabulary at each position: ``Σ_v π(v)·(log π(v) − log π_ref(v))`` (both at T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    ref_logp = F.log_softmax(ref_logits.float() / temperature, dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: str = "k1",
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token KL estimate from the log-ratio ``d_t = log π(a_t|s_t) − log π_ref(a_t|s_t)``:

    k1 (alias kl):  d_t                       unbiased, can be negative per token
    abs:            |d_t|
    k2 (alias mse): ½·d_t²
    k3:             exp(−d_t) − 1 + d_t       unbiased and ≥ 0 (Schulman's estimator)
    full:           Σ_v π(v)(log π(v) − log π_ref(v))   exact, needs both logits
    """
    kind = kl_estimator_name(kind)
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(-d) + d
    if kind == "full":
        if logits is None or ref_logits is None:
            raise ValueError("kl_penalty 'full' needs the policy and reference logits")
        return full_kl_from_logits(logits, ref_logits, temperature)
    raise ValueError(f"unknown KL estimator {kind!r}: use one of {', '.join(KL_ESTIMATORS)}")


def apply_missing_stop_penalty(scores: torch.Tensor, stopped: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """A response that never produced its stop token gets the penalty **instead of** its score:

        s'_i = s_i if stopped_i else penalty

    (the reward model's read-out is undefined without the stop token; TRL subtracts instead).
    """
    if penalty is None:
        return scores
    return torch.where(stopped.bool(), scores, torch.full_like(scores, float(penalty)))


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards: a KL penalty on every response token and the score on the last one:

        r_t = −β·KL_t + [t = L − 1]·score

    where ``L`` is the response length, so ``L − 1`` is the index of the stop token itself (or of the
    last generated token when the response never stopped), not one past it. Padding gets 0.
    """
    real = mask.bool()
    rewards = torch.where(real, -beta * kl, torch.zeros_like(kl))
    last = (real.sum(1) - 1).clamp(min=0)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # Σ m·max(−Aρ, −A·clip(ρ)) / n
    clipfrac: torch.Tensor  # share of tokens where the clipped branch is the active one
    approx_kl: torch.Tensor  # ½·mean(Δlogp²) to the rollout policy
    ratio_mean: torch.Tensor
    ratio_max_abs_dev: torch.Tensor  # max |ρ − 1| over real tokens (exactly 0 on the first minibatch)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    denominator: torch.Tensor | float | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate over real tokens:

        ρ_t = exp(log π(a_t) − log π_old(a_t))
        L = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))
        clipfrac = mean_t [−A_t·clip(ρ_t) > −A_t·ρ_t]
        approx_kl = ½·mean_t (log π(a_t) − log π_old(a_t))²

    ``old_logp`` and ``advantages`` are constants (detached). Masked positions are set to a neutral
    log-ratio 0 and advantage 0 before any arithmetic, so whatever they held cannot leak into the
    loss or its gradient.
    """
    real = mask.bool()
    zeros = torch.zeros_like(logp)
    log_ratio = torch.where(real, logp - torch.where(real, old_logp.detach(), zeros), zeros)
    advantages = torch.where(real, advantages.detach(), zeros)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask, denominator)
        approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask, denominator)
        ratio_mean = masked_mean(ratio.detach(), mask)
        ratio_dev = torch.where(real, (ratio.detach() - 1).abs(), zeros).max() if real.any() else zeros.sum()
    return PolicyLossOutput(masked_mean(per_token, mask, denominator), clipfrac, approx_kl, ratio_mean, ratio_dev)


@dataclass
class ValueLossOutput:
    loss: torch.Tensor  # ½·Σ m·max((V − R)², (V_clip − R)²) / n
    clipfrac: torch.Tensor  # share of tokens where the clipped branch is the active one


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
    denominator: torch.Tensor | float | None = None,
) -> ValueLossOutput:
    """Clipped value loss around the rollout-time values:

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        L_v = ½·mean_t max((V_t − R_t)², (V_clip,t − R_t)²)

    ``ε_v`` is in reward units (meaningful once rewards are normalised).
    """
    real = mask.bool()
    zeros = torch.zeros_like(values)
    old_values = torch.where(real, old_values.detach(), zeros)
    returns = torch.where(real, returns.detach(), zeros)
    values = torch.where(real, values, zeros)
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    per_token = torch.maximum(unclipped_loss, clipped_loss)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), mask, denominator)
    return ValueLossOutput(0.5 * masked_mean(per_token, mask, denominator), clipfrac)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, all_reduce=None
) -> torch.Tensor:
    """How much of the returns' variance the value function explains, over real tokens:

        EV = 1 − Var(R − V) / Var(R)        (biased variances; 1 is perfect, ≤ 0 is no better than a constant)

    ``all_reduce`` (a sum over processes) makes the variances global.
    """
    from tether.ppo.advantages import masked_moments

    _, var_returns = masked_moments(returns, mask, all_reduce)
    _, var_residual = masked_moments(returns - values, mask, all_reduce)
    return 1.0 - var_residual / var_returns.clamp(min=1e-12)


def kl_loss_term(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kind: str = "k3",
    denominator: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """KL to the reference as a term of the loss (GRPO form, Shao et al. 2024), not a reward:

        L_KL = β · Σ m·k3_t / n,        k3_t = exp(−d_t) − 1 + d_t,   d_t = log π(a_t|s_t) − log π_ref(a_t|s_t)

    averaged exactly as :func:`policy_loss` (token mean, ``n`` = the minibatch's token count when
    ``denominator`` is given), so ``policy_loss(...).loss + kl_loss_term(...)`` is the GRPO objective
    and its micro-batch pieces sum to the minibatch value. The gradient flows through ``logp`` only
    (``ref_logp`` is detached): ∂L_KL/∂logp_t = β·(1 − exp(−d_t))/n. Masked positions get d = 0 before
    any arithmetic, so whatever they held leaks into neither the value nor the gradient. ``kind``
    picks another estimator of :func:`kl_penalty` (k3 is GRPO's).
    """
    real = mask.bool()
    zeros = torch.zeros_like(logp)
    per_token = kl_penalty(torch.where(real, logp, zeros), torch.where(real, ref_logp.detach(), zeros), kind)
    return beta * masked_mean(per_token, mask, denominator)
