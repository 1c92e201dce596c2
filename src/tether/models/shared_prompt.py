"""One row per prompt: ``[prompt | segment 1 | … | segment k]`` with a 4-D attention mask.

Several continuations of one prompt (a preference pair's chosen and rejected response, the k
responses PPO samples per prompt) can be read in one forward pass that computes the prompt once:
each segment sees the prompt and itself, never another segment, and its position ids restart after
the prompt, so every token gets exactly the hidden state it has in ``prompt + its own segment``.
The reward model and DPO use it for pairs, the PPO loop for groups of ``--num_generations``.

A row is described by two ``[B, T]`` tensors: ``segment_ids`` (0 for the prompt, 1..k for the
segments; a padding position carries the id of the segment it trails) and ``real`` (True on real
tokens). Attention implementations that ignore custom 4-D masks (FlashAttention) cannot run such
rows; the callers check the layout against plain rows once and fall back to them.
"""

from __future__ import annotations

import torch

from tether.models.wrappers import strip_peft


def segment_attention(segment_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[B, 1, T, T]`` (True = may attend) of rows ``prompt | segment 1 | … | segment k``.

    Query i may attend key j iff ``j ≤ i``, both are real tokens, and key j is in the prompt or in
    query i's own segment: ``causal(i, j) ∧ real_i ∧ real_j ∧ (seg_j = 0 ∨ seg_j = seg_i)``.
    Every position may attend itself, so padding rows never have an all-masked softmax.
    """
    width = segment_ids.shape[1]
    device = segment_ids.device
    pos = torch.arange(width, device=device)
    real = real.to(device=device, dtype=torch.bool)
    causal = pos.unsqueeze(1) >= pos.unsqueeze(0)  # [T(query), T(key)]
    same = (segment_ids.unsqueeze(1) == 0) | (segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1))  # [B, Tq, Tk]
    allowed = causal.unsqueeze(0) & real.unsqueeze(1) & real.unsqueeze(2) & same
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=device).unsqueeze(0)
    return allowed.unsqueeze(1)


def segment_positions(segment_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]``: the real prompt tokens count ``0..p−1`` and each segment restarts at p.

    ``pos_i = #{j ≤ i : seg_j = 0, real_j} + #{j ≤ i : seg_j = seg_i > 0} − 1`` (clamped at 0), i.e. the
    position token i has in ``prompt + its own segment``; a padding position continues its segment's count.
    """
    real = real.to(device=segment_ids.device, dtype=torch.bool)
    prompt_tokens = ((segment_ids == 0) & real).long().cumsum(dim=1)
    k = int(segment_ids.max().item()) if segment_ids.numel() else 0
    own = torch.zeros_like(segment_ids)
    for s in range(1, k + 1):  # k is small (2 for pairs, --num_generations for PPO groups)
        in_s = segment_ids == s
        own = torch.where(in_s, in_s.long().cumsum(dim=1), own)
    return (prompt_tokens + own - 1).clamp(min=0)


def attention_mask_for(model, allowed: torch.Tensor) -> torch.Tensor:
    """A custom boolean mask in the form the model's attention implementation takes: as is for SDPA,
    additive (0 / dtype min) for eager; NotImplementedError for kernels that ignore 4-D masks."""
    impl = getattr(getattr(strip_peft(model), "config", None), "_attn_implementation", None) or "sdpa"
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    if impl == "sdpa":
        return allowed
    raise NotImplementedError(f"shared-prompt rows need sdpa or eager attention, not {impl}")
