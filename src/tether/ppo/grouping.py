"""The k responses of one prompt in one row: ``[prompt | response 1 | … | response k]``.

With ``--num_generations k > 1`` every prompt of a rollout appears k times in a row (contiguously).
Reading ``[prompt | response]`` rows computes each prompt k times in every model; on long prompts
that is most of the work. A grouped row computes it once: a 4-D attention mask lets each response
see the prompt and itself, not the other responses, and its position ids restart after the prompt
(:mod:`tether.models.packing`), so every response token gets exactly the hidden state it has
in its own ``[prompt | response]`` row. The response segments are padded to the batch's response
width R, so response j occupies columns ``P + jR .. P + jR + R − 1`` of a row of width ``P + kR``.

The logits that predict response token t of segment j sit at column ``P + jR + t − 1`` for t ≥ 1 and
at ``P − 1`` (the last prompt token) for t = 0: :func:`response_index` gives these columns relative
to ``P − 1``, and :func:`take_responses` turns a ``[G, kR + 1, ...]`` read-out into the plain
``[G·k, R, ...]`` layout every other part of the loop uses.

Sampling reuses the prompt's key/value cache across the k samples (:func:`generate_groups`, with
:func:`tether.generation.shared_prompt_cache`, which evaluation and best-of-N sampling share).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tether.generation import GeneratedBatch, SamplingSettings
from tether.models.packing import block_attention, branch_positions


@dataclass
class GroupedRows:
    """Rows ``[prompt (P, left-padded) | k response segments of width R]`` for ``G`` prompts."""

    input_ids: torch.Tensor  # [G, P + kR]
    allowed: torch.Tensor  # [G, 1, T, T] bool (True = may attend)
    position_ids: torch.Tensor  # [G, T]
    prompt_width: int  # P
    response_index: torch.Tensor  # [G, k, R] columns relative to P − 1 (see response_index)

    def forward_inputs(self) -> dict:
        """Keyword arguments of ``PolicyAndValue.forward`` / ``response_logits`` / ``response_values``."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.allowed,
            "position_ids": self.position_ids,
            "prompt_width": self.prompt_width,
            "response_index": self.response_index,
        }

    def stop_columns(self, lengths: torch.Tensor) -> torch.Tensor:
        """Column of each response's last real token (its stop token), ``[G, k]``: ``P + jR + len − 1``."""
        groups, k, width = self.response_index.shape
        j = torch.arange(k, device=lengths.device).unsqueeze(0)
        return self.prompt_width + j * width + lengths.view(groups, k) - 1


def response_index(groups: int, k: int, width: int, device=None) -> torch.Tensor:
    """``[G, k, R]`` column (relative to ``P − 1``) of the logits that predict response token t of segment j:
    ``idx(j, t) = jR + t`` for t ≥ 1 and ``0`` (the last prompt token) for t = 0."""
    j = torch.arange(k, device=device).view(k, 1)
    t = torch.arange(width, device=device).view(1, width)
    idx = torch.where(t > 0, j * width + t, torch.zeros_like(t))
    return idx.unsqueeze(0).expand(groups, k, width)


def take_responses(read_out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[G·k, R, ...]`` from a read-out ``[G, L, ...]`` whose column 0 is position ``P − 1`` of each row."""
    groups, k, width = index.shape
    rows = torch.arange(groups, device=read_out.device).view(groups, 1, 1)
    picked = read_out[rows, index.to(read_out.device)]  # [G, k, R, ...]
    return picked.reshape(groups * k, width, *read_out.shape[2:])


def group_rows(
    query_ids: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor, k: int
) -> GroupedRows:
    """The grouped rows of ``B = G·k`` plain rows whose queries repeat k times contiguously."""
    n, prompt_width = query_ids.shape
    if n % k:
        raise ValueError(f"{n} rows are not whole groups of {k}")
    groups, width = n // k, responses.shape[1]
    device = query_ids.device
    prompts = query_ids[::k]
    prompt_mask = query_mask[::k].bool()
    input_ids = torch.cat([prompts, responses.reshape(groups, k * width)], dim=1)
    real = torch.cat([prompt_mask, response_mask.reshape(groups, k * width).bool()], dim=1)
    segment = torch.arange(1, k + 1, device=device).repeat_interleave(width)
    segment_ids = torch.cat(
        [torch.zeros(groups, prompt_width, dtype=torch.long, device=device), segment.expand(groups, -1)], dim=1
    )
    return GroupedRows(
        input_ids=input_ids,
        # one segment per row (−1 on padding), the prompt its trunk and the k responses its branches
        allowed=block_attention(torch.where(real, 0, -1), segment_ids),
        position_ids=branch_positions(segment_ids, real),
        prompt_width=prompt_width,
        response_index=response_index(groups, k, width, device),
    )


@torch.no_grad()
def generate_groups(
    model,
    tokenizer,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    settings: SamplingSettings,
    k: int,
    batch_size: int | None = None,
    return_logprobs: bool = False,
) -> GeneratedBatch:
    """k responses per distinct prompt, each prompt prefilled once (``[B, P]`` queries repeating k times).

    Each group's prompt is prefilled once (:func:`tether.generation.shared_prompt_cache`) and
    ``generate`` continues from the repeated cache on the full ``[B, P]`` queries (it feeds only the
    last prompt token). Chunks hold ``batch_size`` rows rounded down to whole groups. Sampling draws
    from the same distribution as :func:`tether.generation.generate_batch`.
    """
    from tether.generation import generate_in_chunks, shared_prompt_cache

    def generate_groups_of_rows(start: int, rows: int, config):
        ids, mask = query_ids[start : start + rows], query_mask[start : start + rows]
        cache = shared_prompt_cache(model, ids, mask)
        return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, generation_config=config)

    return generate_in_chunks(
        model,
        tokenizer,
        query_ids.shape,
        settings,
        batch_size,
        return_logprobs,
        lambda size: max(k, size // k * k),  # whole groups per generate() call
        generate_groups_of_rows,
    )
