"""Reading a scalar model (reward or value model) at the last real token, and reward normalisation.

The score of a sequence is the linear head's output on the hidden state of its **last real token**,
found from the attention mask (or from lengths), never from ``token == pad``: SmolLM2 pads with its
stop token, and every scored text ends with that stop token, so "last token that is not pad" would
land one token early. The same positions work for right and left padding.

Position ids always follow the real tokens (``cumsum(mask) - 1``), so a left-padded sequence gets
exactly the positions it would get unpadded.

PPO imports :func:`score_texts`, :func:`score_at_last_token`, :class:`RewardStats`,
:func:`load_reward_stats` and :func:`normalise`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tether.data.templates import pad_token_id
from tether.models.wrappers import strip_peft

logger = logging.getLogger(__name__)

REWARD_STATS_FILE = "reward_stats.json"


# ---------------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------------
def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row: ``max{t : mask[b, t] = 1}``.

    Works for right padding (``length - 1``) and left padding (``T - 1``). A row with no real
    token gets index 0.
    """
    mask = attention_mask.to(torch.long)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask).argmax(dim=-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``p[b, t] = (Σ_{s≤t} mask[b, s]) − 1``, clamped at 0: positions count real tokens only."""
    mask = attention_mask.to(torch.long)
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def padded_batch(
    sequences: Sequence[Sequence[int]], pad_token_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for token lists of different lengths; the mask comes from lengths."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max((len(s) for s in sequences), default=0)
    input_ids = torch.full((len(sequences), width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------
# per-token head outputs
# ---------------------------------------------------------------------------------------------
def head_module(model) -> torch.nn.Module:
    """The scalar read-out (``score`` for most architectures, ``classifier`` for some), possibly PEFT-wrapped."""
    inner = strip_peft(model)
    for name in ("score", "classifier"):
        head = getattr(inner, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TypeError(f"{type(inner).__name__} has no `score`/`classifier` head: is it a sequence-classification model?")


@contextlib.contextmanager
def capture_token_scores(model) -> Iterator[list[torch.Tensor]]:
    """Collect the head's output on every position during a forward pass of ``model``.

    Sequence-classification models apply the head to all positions and then pool with
    ``input_ids != pad_token_id``, which is wrong when pad == stop token. Reading the head's
    per-token output lets tether pick positions itself while the forward still runs through the
    model's own ``forward`` (so DDP, PEFT and gradient checkpointing behave as usual).
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output)

    handle = head_module(model).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _accepts(model, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(strip_peft(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def token_scores(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Head output at every position, shape ``[B, T]`` (``attention_mask`` may be 2-D or a 4-D custom mask)."""
    kwargs = {"use_cache": False} if _accepts(model, "use_cache") else {}  # no KV cache to build and throw away
    with capture_token_scores(model) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    if not captured:
        raise RuntimeError("the model's forward pass did not call its score head")
    out = captured[-1]
    if out.shape[-1] != 1:
        raise ValueError(f"expected a scalar head (num_labels=1), got {out.shape[-1]} outputs")
    return out.squeeze(-1)


def score_at_last_token(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score of each row, read at its last real token; shape ``[B]``. Right or left padding."""
    position_ids = position_ids_from_mask(attention_mask)
    scores = token_scores(model, input_ids, attention_mask, position_ids)
    index = last_token_indices(attention_mask).to(scores.device)
    return scores.gather(1, index.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def score_sequences(
    model,
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 16,
    prompt_lengths: Sequence[int] | None = None,
) -> torch.Tensor:
    """Scores of token sequences, returned in input order, ``batch_size`` sequences per forward pass.

    Without ``prompt_lengths`` the sequences are batched by similar length (less padding). With them
    (how many leading tokens of each sequence are its prompt), sequences whose prompts are the same
    tokens, as the N responses of best-of-N or an evaluation's samples are, go through the model as one
    segment: the prompt once, each response as a branch that sees the prompt and not the other
    responses (:func:`score_shared_prompts`). A prompt of P tokens with N responses then costs
    P + Σ|r| tokens instead of N·P + Σ|r|. Whether the model gives plain rows' scores that way is
    checked once per model on three prompts of the first batch, its longest and its two shortest
    (plain rows are used from then on if not).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    scores = torch.empty(len(sequences), dtype=torch.float32)
    if prompt_lengths is not None and len(prompt_lengths) != len(sequences):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(sequences)} sequences")
    groups = _by_prompt(sequences, prompt_lengths) if prompt_lengths is not None else {}
    if any(sum(prompt_lengths[i] < len(sequences[i]) for i in idx) > 1 for idx in groups.values()):
        # at least two responses share a prompt: batches of whole prompts, prompts ordered by length
        order = [i for _, idx in sorted(groups.items(), key=lambda item: len(item[0])) for i in idx]
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        if model not in _SHARED_PROMPT_EXACT:  # once per model, on three prompts of the first batch
            from tether.models.packing import probe_rows

            first = [(sequences[i], min(prompt_lengths[i], len(sequences[i]))) for i in batches[0]]
            probe = [batches[0][j] for j in probe_rows([s[:n] for s, n in first], [len(s) - n for s, n in first])]
            seqs, lengths = [sequences[i] for i in probe], [prompt_lengths[i] for i in probe]
            _SHARED_PROMPT_EXACT[model], out = _shared_prompt_check(model, seqs, lengths, pad_token_id)
            if len(probe) == len(batches[0]):  # the probe was the whole batch
                scores[torch.tensor(batches.pop(0))] = out.float().cpu()
        shared = _SHARED_PROMPT_EXACT[model]
        for chunk in batches:
            seqs = [sequences[i] for i in chunk]
            if shared:
                out = score_shared_prompts(model, seqs, [prompt_lengths[i] for i in chunk], pad_token_id)
            else:
                out = _plain_scores(model, seqs, pad_token_id)
            scores[torch.tensor(chunk)] = out.float().cpu()
        return scores
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        scores[torch.tensor(chunk)] = _plain_scores(model, [sequences[i] for i in chunk], pad_token_id).float().cpu()
    return scores


def _plain_scores(model, sequences: Sequence[Sequence[int]], pad_token_id: int) -> torch.Tensor:
    device = next(model.parameters()).device
    input_ids, attention_mask = padded_batch(sequences, pad_token_id)
    return score_at_last_token(model, input_ids.to(device), attention_mask.to(device))


def score_shared_prompts(
    model, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], pad_token_id: int = 0
) -> torch.Tensor:
    """Scores of ``sequences`` (in order) in one forward pass, those with the same prompt tokens sharing
    one segment (``tether.models.packing``): ``[prompt | r_1 | … | r_N]`` with a block mask under which
    each response sees the prompt and itself only, and position ids that restart every response at the
    prompt's end, so each response is read exactly as in ``prompt + r_k`` alone; the score is the head's
    output at each response's last token. A sequence with an empty response is its own segment, read at
    its last token."""
    from tether.models.packing import Segment, lay_out_rows, model_attention_mask

    groups: dict[tuple[int, ...], list[int]] = {}
    alone: list[int] = []
    for prompt, idx in _by_prompt(sequences, prompt_lengths).items():
        for i in idx:
            (alone if prompt_lengths[i] >= len(sequences[i]) else groups.setdefault(prompt, [])).append(i)
    segments, tokens, members = [], [], []
    for prompt, idx in groups.items():
        responses = [list(sequences[i][len(prompt) :]) for i in idx]
        segments.append(Segment(len(prompt), tuple(len(r) for r in responses)))
        tokens.append(list(prompt) + [t for r in responses for t in r])
        members.append(idx)
    for i in alone:
        segments.append(Segment(len(sequences[i])))
        tokens.append(list(sequences[i]))
        members.append([i])
    rows = lay_out_rows(tokens, segments, pad_token_id, pack=False)
    device = next(model.parameters()).device
    mask = model_attention_mask(model, rows.attention()).to(device)
    per_token = token_scores(model, rows.input_ids.to(device), mask, rows.position_ids.to(device))
    out = torch.empty(len(sequences), dtype=per_token.dtype, device=per_token.device)
    for s, (segment, idx) in enumerate(zip(segments, members)):
        for k, i in enumerate(idx):
            end = segment.branch_start(k) + segment.branches[k] if segment.branches else segment.length
            out[i] = per_token[rows.row[s], rows.offset[s] + end - 1]
    return out


#: per model: whether shared-prompt segments gave plain rows' scores on its first batch (weakly held)
_SHARED_PROMPT_EXACT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shared_prompt_check(model, sequences, prompt_lengths, pad: int) -> tuple[bool, torch.Tensor]:
    """``(shared segments usable, the scores in the layout kept)``: shared-prompt segments vs plain rows
    on these sequences (``tether.models.packing.first_exact_layout``: equal up to 1e-3, 5e-2 for 16-bit
    weights, or the reason they are not used is logged). FlashAttention ignores 4-D masks, and some
    models rebuild the mask themselves."""
    from tether.models.packing import PLAIN, Layout, first_exact_layout

    computed: dict[Layout, torch.Tensor] = {}

    def scores(layout: Layout) -> torch.Tensor:
        computed[layout] = (
            score_shared_prompts(model, sequences, prompt_lengths, pad)
            if layout.share_prompt
            else _plain_scores(model, sequences, pad)
        )
        return computed[layout]

    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    layout = first_exact_layout([Layout(True, False), PLAIN], scores, 0.0, tol, "scoring")
    return layout.share_prompt, computed[layout]


def _by_prompt(sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int]) -> dict[tuple[int, ...], list[int]]:
    """Indices of the sequences by their prompt tokens, prompts in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, n) in enumerate(zip(sequences, prompt_lengths)):
        groups.setdefault(tuple(seq[: min(n, len(seq))]), []).append(i)
    return groups


def score_texts(
    model,
    tokenizer,
    prompts: Sequence,
    responses: Sequence[str],
    batch_size: int = 16,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    stopped: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Reward of each (prompt, response) pair, tokenised by the one rule of ``tether.data.templates``.

    ``tokens = prompt_ids(prompt) + response_ids(response)`` (the response ends with the stop
    token), exactly as the reward model was trained on; the score is read at the last token, which is
    that stop token: a long pair is fitted by cutting its prompt from the left
    (``Truncation("prompt", max_length, max_prompt_length)``), and a response that does not fit
    ``max_length`` even so raises ``PairDoesNotFit`` rather than being scored at a token it does not end on.
    A response whose ``stopped`` flag is False was cut at the sampling budget: it is scored at its own
    last token, as PPO's rollout scores it and the reward model saw such responses in training.
    """
    from tether.data.templates import PairDoesNotFit, Truncation, prompt_response_ids

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rule = Truncation("prompt", max_length, max_prompt_length)
    sequences, prompt_lengths = [], []
    if stopped is not None and len(stopped) != len(responses):
        raise ValueError(f"{len(stopped)} stopped flags for {len(responses)} responses")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        try:
            ids, n_prompt = prompt_response_ids(tokenizer, p, r, rule, True if stopped is None else stopped[i])
        except PairDoesNotFit as exc:
            raise PairDoesNotFit(f"response {i} cannot be scored: {exc}; raise --max_length") from None
        sequences.append(ids)
        prompt_lengths.append(n_prompt)
    pad = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        return score_sequences(model, sequences, pad, batch_size, prompt_lengths)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardStats:
    """Mean and standard deviation of the reward model's raw scores on a reference sample.

    ``source`` says what the sample was (e.g. "training pairs: chosen and rejected responses")
    and ``count`` how many scores it held.
    """

    mean: float
    std: float
    count: int = 0
    source: str = ""

    @property
    def gain(self) -> float:
        return 1.0 / self.std

    @property
    def bias(self) -> float:
        return -self.mean / self.std


def reward_stats(scores: torch.Tensor, source: str = "") -> RewardStats:
    """``mean = (1/n) Σ s_i``, ``std = sqrt((1/n) Σ (s_i − mean)²)`` (biased, as TF ``moments``)."""
    values = scores.detach().double().flatten()
    if values.numel() == 0:
        raise ValueError("reward statistics need at least one score")
    mean = values.mean().item()
    std = values.var(unbiased=False).sqrt().item()
    return RewardStats(mean=mean, std=std, count=int(values.numel()), source=source)


def normalise(scores: torch.Tensor, stats: RewardStats, eps: float = 1e-8) -> torch.Tensor:
    """Gain and bias that make the reference sample N(0, 1) (Ziegler et al. 2019):

    s' = g·s + b   with   g = 1 / (std + eps),   b = −mean · g      i.e.   s' = (s − mean) / (std + eps)
    """
    gain = 1.0 / (stats.std + eps)
    return (scores - stats.mean) * gain


def save_reward_stats(stats: RewardStats, folder: str | Path) -> Path:
    path = Path(folder) / REWARD_STATS_FILE
    row = asdict(stats)
    row["formula"] = "normalised = (score - mean) / std"
    path.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return path


def load_reward_stats(path: str | Path) -> RewardStats:
    """Read ``reward_stats.json`` from a reward-model folder (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / REWARD_STATS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no reward statistics (train the reward model with `tether rm`, "
            "which saves them beside the weights)"
        ) from None
    try:
        mean, std = float(data["mean"]), float(data["std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: expected numeric fields 'mean' and 'std' ({exc})") from None
    if not (math.isfinite(mean) and math.isfinite(std)) or std <= 0:
        raise ValueError(f"{path}: unusable statistics mean={mean} std={std} (std must be > 0)")
    return RewardStats(mean=mean, std=std, count=int(data.get("count", 0)), source=str(data.get("source", "")))
