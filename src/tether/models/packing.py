"""Padding-free rows: several sequences in one row, kept apart by a block-diagonal attention mask.

A **segment** is one sequence, or one prompt with several continuations (the responses of the
preference pairs that share it, ``group_pairs_by_prompt``) that each see the prompt but not each
other. Segments are placed one after another in a row (``pack_by_length``), and

* the attention mask (``block_attention``) lets a token see only earlier tokens of its own segment,
  and of those only the trunk (the prompt) and its own branch;
* position ids (``segment_positions``) restart at 0 in every segment, and every branch continues from
  the end of the trunk, as if it followed the prompt alone.

Each token then sees exactly what it would see in its own unpadded sequence, so scores and
log-probabilities equal those of plain rows up to rounding; the rows hold fewer padding tokens.
The stages check that equality on their first batch and fall back to plain rows for models where
it does not hold (``first_exact_layout``): FlashAttention ignores 4-D masks, and some models rebuild
the mask themselves.

Used by ``tether rm`` and ``tether dpo`` (``--share_prompt``, ``--padding_free``) and by
``tether sft --packing`` (which packs with ``pack_by_length``; transformers builds the same
block-diagonal mask from the restarting position ids).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tether.models.wrappers import strip_peft

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# which rows hold which segments
# ---------------------------------------------------------------------------------------------
def pack_by_length(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: indices of segments grouped into rows of ≤ ``capacity`` tokens.

    Segments are placed longest first, each into the fullest row it still fits in; rows keep their
    segments in original order. Deterministic for the same lengths.
    """
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(
            f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than the row capacity {capacity}"
        )
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[index]
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            rows.append([index])
            bisect.insort(free, (capacity - n, len(rows) - 1))
        else:
            room, row = free.pop(pos)
            rows[row].append(index)
            bisect.insort(free, (room - n, row))
    return [sorted(r) for r in rows]


# ---------------------------------------------------------------------------------------------
# one segment
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """``trunk`` tokens every branch sees (a prompt; the whole sequence when there are no branches),
    then ``branches``: continuations laid out one after another, each seeing the trunk but not the others."""

    trunk: int
    branches: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return self.trunk + sum(self.branches)

    def branch_start(self, k: int) -> int:
        """Offset of branch ``k`` (0-based) from the segment's first token."""
        return self.trunk + sum(self.branches[:k])


def segment_positions(segment: Segment) -> list[int]:
    """Position ids of a segment: ``0..P−1`` for the trunk, ``P, P+1, ...`` again for every branch
    (the positions it has in ``trunk + branch`` alone)."""
    out = list(range(segment.trunk))
    for n in segment.branches:
        out += range(segment.trunk, segment.trunk + n)
    return out


def segment_branch_ids(segment: Segment) -> list[int]:
    """0 for trunk tokens, ``k + 1`` for tokens of branch ``k``."""
    out = [0] * segment.trunk
    for k, n in enumerate(segment.branches):
        out += [k + 1] * n
    return out


@dataclass
class PromptGroups:
    """The pairs of a batch as one segment per distinct prompt: ``[prompt | r_1 | … | r_m]``, its distinct
    responses as branches. Response ``j`` of the batch (numbered segment by segment, branch by branch) is
    branch ``branch_of[j]`` of segment ``segment_of[j]``; pair i compares responses ``chosen[i]`` and
    ``rejected[i]``."""

    segments: list[Segment]
    tokens: list[list[int]]
    segment_of: list[int]
    branch_of: list[int]
    responses: list[tuple[int, ...]]
    chosen: list[int]
    rejected: list[int]


def group_pairs_by_prompt(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]) -> PromptGroups:
    """``(prompt, chosen, rejected)`` token lists → :class:`PromptGroups`.

    Pairs with the same prompt tokens share one segment, and a response that occurs in several of
    them is laid out (and scored) once: a prompt with k ranked responses has C(k, 2) pairs but
    ``P + Σ|r|`` tokens instead of ``C(k, 2)·(P + 2|r|)`` (InstructGPT's "all comparisons of a prompt
    as one batch element"). A batch of pairs with distinct prompts gives one segment per pair with
    branches (chosen, rejected). Segments keep the order of first appearance.
    """
    segment_index: dict[tuple[int, ...], int] = {}
    branch_index: list[dict[tuple[int, ...], int]] = []
    prompts: list[tuple[int, ...]] = []
    branches: list[list[tuple[int, ...]]] = []
    pair_refs: list[tuple[int, int, int]] = []
    for prompt, chosen, rejected in pairs:
        key = tuple(prompt)
        s = segment_index.setdefault(key, len(prompts))
        if s == len(prompts):
            prompts.append(key)
            branches.append([])
            branch_index.append({})
        refs = []
        for response in (tuple(chosen), tuple(rejected)):
            b = branch_index[s].setdefault(response, len(branches[s]))
            if b == len(branches[s]):
                branches[s].append(response)
            refs.append(b)
        pair_refs.append((s, refs[0], refs[1]))
    first = [0]
    for bs in branches:
        first.append(first[-1] + len(bs))
    return PromptGroups(
        segments=[Segment(len(p), tuple(len(r) for r in bs)) for p, bs in zip(prompts, branches)],
        tokens=[list(p) + [t for r in bs for t in r] for p, bs in zip(prompts, branches)],
        segment_of=[s for s, bs in enumerate(branches) for _ in bs],
        branch_of=[b for bs in branches for b in range(len(bs))],
        responses=[r for bs in branches for r in bs],
        chosen=[first[s] + c for s, c, _ in pair_refs],
        rejected=[first[s] + r for s, _, r in pair_refs],
    )


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
@dataclass
class PackedRows:
    """Right-padded rows ``[R, W]`` of segments; ``row[i]`` and ``offset[i]`` say where segment i starts."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor  # −1 on padding
    branch_ids: torch.Tensor
    row: list[int]
    offset: list[int]

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())

    @property
    def padding_fraction(self) -> float:
        """Share of the ``R × W`` token slots that hold padding."""
        return 1.0 - self.real_tokens / max(1, self.input_ids.numel())

    def attention(self) -> torch.Tensor:
        return block_attention(self.segment_ids, self.branch_ids)


def lay_out_rows(
    tokens: Sequence[Sequence[int]], segments: Sequence[Segment], pad_token_id: int, pack: bool
) -> PackedRows:
    """Segment i (its ``tokens[i]``: trunk then branches) in rows: one per row, or with ``pack`` as few
    rows as ``pack_by_length`` fits into the longest segment's length (so the row width stays that of
    plain rows and only the number of rows shrinks)."""
    lengths = [s.length for s in segments]
    for i, (t, n) in enumerate(zip(tokens, lengths)):
        if len(t) != n:
            raise ValueError(f"segment {i}: {len(t)} tokens, but its layout has {n}")
    groups = pack_by_length(lengths, max(lengths)) if pack else [[i] for i in range(len(segments))]
    width = max(sum(lengths[i] for i in g) for g in groups)
    shape = (len(groups), width)
    input_ids = torch.full(shape, int(pad_token_id), dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    row, offset = [0] * len(segments), [0] * len(segments)
    for r, group in enumerate(groups):
        start = 0
        for i in group:
            seg, end = segments[i], start + lengths[i]
            input_ids[r, start:end] = torch.as_tensor(list(tokens[i]), dtype=torch.long)
            position_ids[r, start:end] = torch.tensor(segment_positions(seg), dtype=torch.long)
            segment_ids[r, start:end] = i
            branch_ids[r, start:end] = torch.tensor(segment_branch_ids(seg), dtype=torch.long)
            row[i], offset[i] = r, start
            start = end
    return PackedRows(input_ids, position_ids, segment_ids, branch_ids, row, offset)


def block_attention(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[R, 1, W, W]`` (True = may attend) for rows of segments:

        allowed[r, i, j] = (j ≤ i ∧ s_i = s_j ≥ 0 ∧ (b_j = 0 ∨ b_j = b_i))  ∨  i = j

    with s the segment and b the branch of each position (0 = trunk). Padding (s = −1) attends to
    itself only, so no row of the softmax is fully masked.
    """
    width = segment_ids.shape[-1]
    pos = torch.arange(width, device=segment_ids.device)
    causal = pos.unsqueeze(1) >= pos.unsqueeze(0)  # [query, key]
    s_q, s_k = segment_ids.unsqueeze(2), segment_ids.unsqueeze(1)
    b_q, b_k = branch_ids.unsqueeze(2), branch_ids.unsqueeze(1)
    allowed = causal & (s_q == s_k) & (s_q >= 0) & ((b_k == 0) | (b_k == b_q))
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=segment_ids.device)
    return allowed.unsqueeze(1)


def branch_positions(segment_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]`` of rows ``prompt | branch 1 | … | branch k`` that may hold padding anywhere
    (``segment_ids``: 0 for the prompt, 1..k for the branches): the real prompt tokens count ``0..p−1``
    and each branch restarts at p.

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


def model_attention_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean 4-D mask in the form the model's attention takes: as is for SDPA, additive (0 or the
    dtype's minimum) for eager attention, which adds the mask to the scores. 2-D masks pass unchanged."""
    if allowed.dim() != 4:
        return allowed
    impl = getattr(getattr(strip_peft(model), "config", None), "_attn_implementation", None) or "sdpa"
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    raise NotImplementedError(f"4-D attention masks need sdpa or eager attention, not {impl}")


# ---------------------------------------------------------------------------------------------
# choosing a layout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How a batch of preference pairs goes through the model.

    ``share_prompt``: one segment per pair, the prompt once with chosen and rejected as branches
    (otherwise two segments, prompt + chosen and prompt + rejected). ``padding_free``: segments
    packed into as few rows as fit the longest (otherwise one per row).
    """

    share_prompt: bool
    padding_free: bool

    def describe(self) -> str:
        parts = [
            "shared-prompt" if self.share_prompt else "separate",
            "padding-free" if self.padding_free else "padded",
        ]
        return " ".join(parts) + " rows"


PLAIN = Layout(share_prompt=False, padding_free=False)


def candidate_layouts(share_prompt: bool, padding_free: bool) -> list[Layout]:
    """The layouts the options allow, fastest first, ending with plain rows (always allowed)."""
    out = [Layout(s, p) for s in (True, False) for p in (True, False) if (share_prompt or not s)]
    out = [x for x in out if padding_free or not x.padding_free]
    return out


def first_exact_layout(
    candidates: Sequence[Layout],
    outputs: Callable[[Layout], torch.Tensor],
    rtol: float,
    atol: float,
    what: str,
) -> Layout:
    """The first of ``candidates`` whose ``outputs`` equal those of plain rows within tolerance.

    ``outputs(layout)`` runs the model on the probe batch in that layout. A layout that raises or
    differs is logged with the reason and the next one is tried; plain rows are the last resort.
    """
    reference = outputs(PLAIN)
    for layout in candidates:
        if layout == PLAIN:
            break
        try:
            got = outputs(layout)
        except (NotImplementedError, RuntimeError, ValueError, TypeError) as exc:
            logger.warning(
                "%s: %s not supported by this model (%s); trying the next layout", what, layout.describe(), exc
            )
            continue
        if torch.allclose(got.float(), reference.float(), rtol=rtol, atol=atol):
            if layout != candidates[0]:
                logger.warning("%s: using %s", what, layout.describe())
            return layout
        worst = (got.float() - reference.float()).abs().max().item()
        logger.warning(
            "%s: %s differ from plain rows by %.3g on the first batch; trying the next layout",
            what,
            layout.describe(),
            worst,
        )
    if candidates and candidates[0] != PLAIN:
        logger.warning("%s: using %s", what, PLAIN.describe())
    return PLAIN


def probe_units(sizes: Sequence[int]) -> list[int]:
    """Indices, in order, of the units of a batch (a prompt with its responses, ...) that a layout check runs
    on: the longest unit and the two shortest of the others.

    The longest shows what only long sequences meet (a sliding window, a long-range mask); the shortest
    add padding, and two of them share a padding-free row exactly when any two units of the batch do
    (their sum is the smallest). Checking three units instead of a whole batch makes the plain-row
    reference pass, the check's cost, a few rows long.
    """
    if not sizes:
        return []
    longest = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
    rest = sorted((i for i in range(len(sizes)) if i != longest), key=lambda i: (sizes[i], i))
    return sorted([longest, *rest[:2]])


def probe_rows(prompts: Sequence[Sequence[int]], response_lengths: Sequence[int]) -> list[int]:
    """Positions, in order, of the rows of a batch of whole prompts that a shared-prompt layout check reads:
    the rows of the prompts whose segments (the prompt once, then every response) are :func:`probe_units`.

    ``prompts[i]`` are row i's prompt tokens and ``response_lengths[i]`` its response's tokens.
    """
    members: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        members.setdefault(tuple(prompt), []).append(i)
    groups = list(members.items())
    sizes = [len(prompt) + sum(response_lengths[i] for i in rows) for prompt, rows in groups]
    return sorted(i for g in probe_units(sizes) for i in groups[g][1])
