"""``tether dpo``: Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference.

The policy is trained directly on preference pairs; the reference (the starting model) stays fixed
and enters only through its log-probabilities of the chosen and rejected responses:

    h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))
    sigmoid:  L = −log σ(β·h)            ipo: L = (h − 1/(2β))²          hinge: L = max(0, 1 − β·h)
    label smoothing ε (conservative DPO):  (1 − ε)·L(h) + ε·L(−h)

``log π(y|x)`` is the sum of the response tokens' log-probabilities, the stop token included (masks
come from lengths, never from ``token == pad``: SmolLM2 pads with its stop token).

How a batch goes through the model. Chosen and rejected responses share their prompt, so each pair
is one row ``[prompt | chosen | rejected]`` with a 4-D attention mask in which rejected tokens see
the prompt and themselves but not the chosen tokens, and position ids that restart the rejected
response right after the prompt. One forward pass gives both responses' log-probabilities,
exactly as two separate sequences would, while the prompt is computed once instead of twice. Only
the hidden states of response tokens go through the LM head (the prompt's and the padding's vocab
projections are never computed). With ``--padding_free`` (default) the pairs of a batch are packed
into as few rows as fit the longest, each kept apart by a block-diagonal mask with its own position
ids (``tether.models.packing``): the same pairs make the step, in fewer padded tokens. Before
training a check on the first batch compares these layouts against plain separate sequences and
falls back (logging why) for models or attention kernels where they do not hold (FlashAttention,
which ignores 4-D masks; heads that rescale logits).

Implicit rewards are ``β·(log π − log π_ref)``; the metrics follow TRL's names
(``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``), on the training batches and on held-out pairs (``eval_``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from tether.config import (
    ConfigError,
    DataArguments,
    ModelArguments,
    TruncationArguments,
    check_quantised_training,
    peft_config_from,
)
from tether.data.errors import DataError
from tether.data.records import PreferencePair
from tether.data.templates import Truncation, pad_token_id, prompt_ids, response_ids
from tether.durable import remove_checkpoints, staged_output, write_json_atomic
from tether.models.packing import (
    Layout,
    Segment,
    candidate_layouts,
    first_exact_layout,
    group_pairs_by_prompt,
    lay_out_rows,
    model_attention_mask,
)
from tether.models.wrappers import adapters_disabled, strip_peft
from tether.stages.common import (
    DEFAULT_MAX_BAD_STEPS,
    DEFAULT_OUTPUT_ROOT,
    KEEP_CHECKPOINTS_HELP,
    MAX_BAD_STEPS_HELP,
    PADDING_FREE_HELP,
    PromptGroupedOrder,
    TetherTrainerMixin,
    check_output_dir,
    complete_model,
    fsdp_requested,
    on_main_process,
    report_truncation,
    resolve_resume,
    stage_data,
    truncation_rule,
)
from tether.stages.sft import save_policy

logger = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOConfig(ModelArguments, TruncationArguments, DataArguments, TrainingArguments):
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": f"Where the trained model, metrics.jsonl, eval_results.json and checkpoints are written "
            f"(default {DEFAULT_OUTPUT_ROOT}/dpo)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a non-empty --output_dir (the old model stays until the new one is saved)."},
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "β: strength of the tie to the reference (higher = closer). "
            "For ipo it is the regulariser τ of the IPO paper."
        },
    )
    loss_type: str = field(default="sigmoid", metadata={"help": "DPO loss: sigmoid (the DPO paper), ipo, or hinge."})
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "ε of conservative DPO: the loss becomes (1−ε)·L(h) "
            "+ ε·L(−h), for labels flipped with probability ε. "
            "Must lie in [0, 0.5)."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probabilities of all pairs once before training, so no reference model "
            "stays in memory (with --use_peft the reference is the adapter-disabled policy either way)."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model if it is not the starting model (default: the starting model itself)."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "With --use_peft, save the LoRA weights merged into a full model instead of as an adapter."},
    )
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Compute each pair's prompt once (one row [prompt|chosen|rejected] with a 4-D attention mask). "
            "Checked against separate sequences before training; off falls back to two rows per pair."
        },
    )
    padding_free: bool = field(default=True, metadata={"help": PADDING_FREE_HELP})
    # TrainingArguments defaults that differ for DPO
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (DPO uses small ones)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs."})
    logging_steps: float = field(default=10, metadata={"help": "Log train metrics every N optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: tether collates its own batches."}
    )
    max_bad_steps: int = field(default=DEFAULT_MAX_BAD_STEPS, metadata={"help": MAX_BAD_STEPS_HELP})
    keep_checkpoints: bool = field(default=False, metadata={"help": KEEP_CHECKPOINTS_HELP})

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"--loss_type {self.loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            raise ConfigError(f"--beta {self.beta}: must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label_smoothing {self.label_smoothing}: must lie in [0, 0.5)")
        if self.max_length < 2:
            raise ConfigError(f"--max_length {self.max_length}: must be at least 2")
        check_quantised_training(self)
        if self.output_dir is None:
            self.output_dir = str(DEFAULT_OUTPUT_ROOT / "dpo")
        super().__post_init__()


# --------------------------------------------------------------------------------------------
# The equations
# --------------------------------------------------------------------------------------------


def log_ratio_difference(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """``h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))`` per pair."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def sigmoid_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): ``L(h) = −log σ(β·h)``; equals log 2 when policy == reference."""
    return -F.logsigmoid(beta * h)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): ``L(h) = (h − 1/(2β))²``, with h the summed (not length-averaged) log-ratios."""
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-style hinge: ``L(h) = max(0, 1 − β·h)``."""
    return torch.relu(1.0 - beta * h)


LOSSES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
}


def label_smoothed(
    loss_fn: Callable[[torch.Tensor, float], torch.Tensor], h: torch.Tensor, beta: float, epsilon: float
) -> torch.Tensor:
    """Conservative DPO: ``(1 − ε)·L(h) + ε·L(−h)``, the expected loss when a label is flipped with probability ε."""
    if epsilon == 0.0:
        return loss_fn(h, beta)
    return (1.0 - epsilon) * loss_fn(h, beta) + epsilon * loss_fn(-h, beta)


def dpo_losses(h: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO losses for log-ratio differences ``h`` (see ``log_ratio_difference``)."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use one of {', '.join(LOSSES)}")
    return label_smoothed(LOSSES[loss_type], h, beta, label_smoothing)


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The reward DPO implicitly fits: ``r(x, y) = β·(log π(y|x) − log π_ref(y|x))``."""
    return beta * (policy_logps - ref_logps)


# --------------------------------------------------------------------------------------------
# Tokens and batches
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizedPair:
    """One preference pair as token ids: the prompt, and each response ending with its stop token
    (unless the pair says the response was cut at a token budget when sampled)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    origin: str = ""
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None


def tokenize_pairs(
    tokenizer, pairs: list[PreferencePair], truncation: Truncation
) -> tuple[list[TokenizedPair], int, int]:
    """Tokenise with the shared rule (``templates.prompt_ids`` + ``response_ids``), fitted by
    ``truncation``; returns ``(pairs, n_prompts_cut, n_pairs_dropped)``.

    ``max_length`` bounds prompt + chosen and prompt + rejected separately, as two sequences would be;
    both keep the same prompt tokens (cut to fit beside the longer response).
    """
    out: list[TokenizedPair] = []
    problems: list[str] = []
    prompts_cut = dropped = 0
    for i, pair in enumerate(pairs):
        where = pair.origin or f"pair {i}"
        full_prompt = prompt_ids(tokenizer, pair.prompt)
        chosen = response_ids(tokenizer, pair.chosen, add_stop=not pair.chosen_truncated)
        rejected = response_ids(tokenizer, pair.rejected, add_stop=not pair.rejected_truncated)
        prompt = truncation.fit_prompt(full_prompt, chosen, rejected)
        if prompt is None:
            dropped += 1
            continue
        prompts_cut += int(len(prompt) < len(full_prompt))
        if not prompt:
            if tokenizer.bos_token_id is None:
                problems.append(
                    f"{where}: prompt: empty, and the tokenizer has no bos token to start the response from"
                )
                continue
            prompt = [int(tokenizer.bos_token_id)]
        out.append(TokenizedPair(prompt, chosen, rejected, where))
    if problems:
        raise DataError(problems)
    return out, prompts_cut, dropped


def collate_pairs(
    items: list[TokenizedPair], pad_id: int, share_prompt: bool = True, padding_free: bool = False
) -> dict[str, torch.Tensor]:
    """Lay out a batch of pairs and say where each response token is read from.

    Shared layout (``share_prompt``): one segment per distinct prompt, ``[prompt | r_1 | … | r_m]`` with
    the distinct responses of the pairs that share it (``group_pairs_by_prompt``); each response sees
    the prompt but not the others and takes the positions it would have right after the prompt, and
    is computed once however many pairs it is in. Otherwise each pair is two segments,
    prompt+chosen and prompt+rejected.
    ``padding_free`` packs the segments into as few rows as fit the longest one, kept apart by a
    block-diagonal mask (``tether.models.packing``); otherwise one segment per row. Either fast layout
    gives a boolean 4-D mask ``(R, 1, W, W)`` (True = may attend) and position ids; plain rows (neither)
    are rows ``0..B-1`` prompt+chosen, ``B..2B-1`` prompt+rejected, right-padded, with a 2-D mask.

    Every layout lists every response token (stop token included) in ``token_row``, ``token_source``
    and ``token_target``: the row, the position whose hidden state predicts it, and its id;
    ``token_sequence`` numbers the ``num_sequences`` responses laid out, and pair i's are
    ``chosen_sequence[i]`` and ``rejected_sequence[i]``.
    """
    n = len(items)
    rows, sources, targets, sequences = [], [], [], []
    if share_prompt:
        groups = group_pairs_by_prompt([(x.prompt, x.chosen, x.rejected) for x in items])
        layout = lay_out_rows(groups.tokens, groups.segments, pad_id, padding_free)
        for j, (s, b, response) in enumerate(zip(groups.segment_of, groups.branch_of, groups.responses)):
            segment, start = groups.segments[s], layout.offset[s]
            first = start + segment.branch_start(b)
            # the first response token follows the prompt, the others follow each other
            sources += [start + segment.trunk - 1] + [first + k - 1 for k in range(1, len(response))]
            rows += [layout.row[s]] * len(response)
            targets += response
            sequences += [j] * len(response)
        chosen_sequence, rejected_sequence, num_sequences = groups.chosen, groups.rejected, len(groups.responses)
    else:
        segments = [Segment(len(x.prompt) + len(x.chosen)) for x in items]
        segments += [Segment(len(x.prompt) + len(x.rejected)) for x in items]
        tokens = [x.prompt + x.chosen for x in items] + [x.prompt + x.rejected for x in items]
        layout = lay_out_rows(tokens, segments, pad_id, padding_free)
        laid_out = [(x.prompt, x.chosen) for x in items] + [(x.prompt, x.rejected) for x in items]
        for j, (prompt, response) in enumerate(laid_out):
            rows += [layout.row[j]] * len(response)
            sources += [layout.offset[j] + len(prompt) + k - 1 for k in range(len(response))]
            targets += response
            sequences += [j] * len(response)
        chosen_sequence, rejected_sequence, num_sequences = list(range(n)), list(range(n, 2 * n)), 2 * n
    if share_prompt or padding_free:
        batch = {
            "input_ids": layout.input_ids,
            "attention_mask": layout.attention(),
            "position_ids": layout.position_ids,
        }
    else:
        batch = {"input_ids": layout.input_ids, "attention_mask": (layout.segment_ids >= 0).long()}
    batch.update(
        token_row=torch.tensor(rows, dtype=torch.long),
        token_source=torch.tensor(sources, dtype=torch.long),
        token_target=torch.tensor(targets, dtype=torch.long),
        token_sequence=torch.tensor(sequences, dtype=torch.long),
        num_sequences=torch.tensor(num_sequences, dtype=torch.long),
        chosen_sequence=torch.tensor(chosen_sequence, dtype=torch.long),
        rejected_sequence=torch.tensor(rejected_sequence, dtype=torch.long),
    )
    if all(x.ref_chosen_logp is not None for x in items):
        batch["ref_chosen_logps"] = torch.tensor([x.ref_chosen_logp for x in items], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([x.ref_rejected_logp for x in items], dtype=torch.float32)
    return batch


class PairCollator:
    def __init__(self, pad_id: int, layout: Layout):
        self.pad_id = pad_id
        self.layout = layout

    def __call__(self, items: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        return collate_pairs(items, self.pad_id, self.layout.share_prompt, self.layout.padding_free)


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: list[TokenizedPair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> TokenizedPair:
        return self.pairs[i]


# --------------------------------------------------------------------------------------------
# Sequence log-probabilities
# --------------------------------------------------------------------------------------------


def response_logps(
    model, batch: dict[str, torch.Tensor], compact_head: bool = True, autocast_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log π(y_w|x), log π(y_l|x))`` per pair: sums of response-token log-probs, stop token included.

    With ``compact_head`` the model returns hidden states and only the response positions go through
    the LM head (``logits_to_keep=1`` skips the head elsewhere); otherwise the model's own logits are
    used (heads that rescale or soft-cap logits need this).

    Under ``--bf16``/``--fp16`` (``autocast_dtype``) the forward pass and the LM head both run in
    one ``torch.autocast``, whichever model this is: accelerate autocasts only the prepared model's
    ``forward``, so a head applied outside it would run in float32 for the policy and in 16 bits
    for references computed under autocast, and ``h`` would not be 0 at identical weights.
    """
    if autocast_dtype is not None:
        with torch.autocast(batch["input_ids"].device.type, dtype=autocast_dtype):
            return response_logps(model, batch, compact_head)
    kwargs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "attention_mask": model_attention_mask(model, batch["attention_mask"]),
        "use_cache": False,
    }
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    rows, sources = batch["token_row"], batch["token_source"]
    if compact_head:
        out = model(**kwargs, logits_to_keep=1, output_hidden_states=True)
        hidden = out.hidden_states[-1][rows, sources]
        logits = strip_peft(model).get_output_embeddings()(hidden)
    else:
        out = model(**kwargs)
        logits = out.logits[rows, sources]
    logits = logits.float()
    targets = batch["token_target"]
    # log softmax at the target only: gather − logsumexp, without a second (N, V) tensor
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    sums = torch.zeros(int(batch["num_sequences"]), dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, batch["token_sequence"], token_logps)
    return sums[batch["chosen_sequence"]], sums[batch["rejected_sequence"]]


@torch.no_grad()
def check_fast_paths(
    model, pairs: list[TokenizedPair], pad_id: int, share_prompt: bool = True, padding_free: bool = True
) -> tuple[Layout, bool]:
    """``(layout, compact_head_ok)``: whether the compact LM head gives the plain forward's log-probs on
    the first pair, then the fastest layout the options allow that gives plain rows' log-probs on
    ``pairs`` (the first batch; ``first_exact_layout``).

    Tolerances allow rounding (wider for 16-bit weights); a mask or head the model ignores shifts a
    sequence log-prob by nats, far beyond them.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
        rtol, atol = (1e-2, 0.1) if half else (1e-5, 1e-3)
        to = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
        one = to(collate_pairs(pairs[:1], pad_id, share_prompt=False))
        full_head = torch.stack(response_logps(model, one, compact_head=False))
        try:
            compact_ok = torch.allclose(
                torch.stack(response_logps(model, one, compact_head=True)), full_head, rtol=rtol, atol=atol
            )
        except Exception as exc:  # a model without hidden-state outputs or logits_to_keep
            logger.warning("tether dpo: compact LM head unavailable for this model (%s)", exc)
            compact_ok = False

        def logps(layout: Layout) -> torch.Tensor:
            batch = to(collate_pairs(pairs, pad_id, layout.share_prompt, layout.padding_free))
            return torch.stack(response_logps(model, batch, compact_head=compact_ok))

        layout = first_exact_layout(candidate_layouts(share_prompt, padding_free), logps, rtol, atol, "tether dpo")
    finally:
        model.train(was_training)
    return layout, compact_ok


@torch.no_grad()
def precompute_reference_logps(
    model,
    pairs: list[TokenizedPair],
    pad_id: int,
    batch_size: int,
    layout: Layout,
    compact_head: bool,
    autocast_dtype: torch.dtype | None = None,
    disable_adapter: bool = False,
) -> None:
    """Fill ``ref_chosen_logp``/``ref_rejected_logp`` of every pair with one pass of the reference.

    Pairs are batched prompt by prompt, prompts ordered by length: the pairs of one prompt fall in the
    same batch, where the shared-prompt layout computes the prompt and each distinct response once
    (a prompt's k ranked responses give C(k, 2) pairs but k responses), and batches hold prompts of
    similar length (less padding). Results do not depend on the batching, up to rounding.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(
        range(len(pairs)),
        key=lambda i: (len(pairs[i].prompt), tuple(pairs[i].prompt), len(pairs[i].chosen) + len(pairs[i].rejected)),
    )
    adapter_off = adapters_disabled(model) if disable_adapter else contextlib.nullcontext()
    try:
        with adapter_off:
            for start in range(0, len(order), batch_size):
                chunk = [pairs[i] for i in order[start : start + batch_size]]
                batch = {
                    k: v.to(device)
                    for k, v in collate_pairs(chunk, pad_id, layout.share_prompt, layout.padding_free).items()
                }
                chosen, rejected = response_logps(model, batch, compact_head, autocast_dtype)
                for x, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                    x.ref_chosen_logp, x.ref_rejected_logp = c, r
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def pair_statistics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Per-pair values of every DPO metric (averaged by the caller over all pairs)."""
    chosen_rewards = implicit_rewards(policy_chosen, ref_chosen, beta)
    rejected_rewards = implicit_rewards(policy_rejected, ref_rejected, beta)
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen,
        "logps/rejected": policy_rejected,
    }


class _DPOTrainer(PromptGroupedOrder, TetherTrainerMixin, Trainer):
    """``transformers.Trainer`` with the DPO loss; the loop, schedules, checkpoints and logging are Trainer's."""

    def __init__(
        self,
        *args,
        dpo: DPOConfig,
        ref_model=None,
        compact_head: bool = True,
        autocast_dtype: torch.dtype | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.dpo = dpo
        self.compact_head = compact_head
        self.autocast_dtype = autocast_dtype  # the policy and every reference compute log-probs in it
        self.ref_model = ref_model
        if ref_model is not None and self.is_fsdp_enabled:
            if not self.accelerator.is_fsdp2:
                raise ConfigError(
                    "a separate reference model under FSDP needs fsdp_version: 2 in the accelerate config "
                    "(or pass --precompute_ref_log_probs true)"
                )
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            # sharded like the policy; with fsdp_cpu_ram_efficient_loading the main process's weights
            # are sent to the others (prepare_model(evaluation_mode=True) would leave it unsharded)
            self.ref_model = fsdp2_prepare_model(self.accelerator, ref_model)
        elif ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        # the loss is already a mean over pairs: let Trainer divide by the accumulation steps itself
        self.model_accepts_loss_kwargs = False
        self._train_sums: dict[str, torch.Tensor] = {}
        self._train_pairs = 0

    def _reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        with torch.no_grad():
            if self.ref_model is not None:
                return response_logps(self.ref_model, inputs, self.compact_head, self.autocast_dtype)
            unwrapped = self.accelerator.unwrap_model(model)  # PEFT: the reference is the adapter-disabled policy
            with adapters_disabled(unwrapped):
                return response_logps(unwrapped, inputs, self.compact_head, self.autocast_dtype)

    def _pair_outputs(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = response_logps(model, inputs, self.compact_head, self.autocast_dtype)
        ref_chosen, ref_rejected = self._reference_logps(model, inputs)
        ref_chosen, ref_rejected = ref_chosen.to(chosen.dtype), ref_rejected.to(chosen.dtype)
        h = log_ratio_difference(chosen, rejected, ref_chosen, ref_rejected)
        losses = dpo_losses(h, self.dpo.beta, self.dpo.loss_type, self.dpo.label_smoothing)
        stats = pair_statistics(chosen.detach(), rejected.detach(), ref_chosen, ref_rejected, self.dpo.beta)
        return losses, stats

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, stats = self._pair_outputs(model, inputs)
        for key, values in stats.items():
            self._train_sums[key] = self._train_sums.get(key, 0.0) + values.sum()
        self._train_pairs += losses.shape[0]
        loss = losses.mean()
        return (loss, {"losses": losses}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_sums:
            keys = list(self._train_sums)
            totals = torch.stack(
                [torch.as_tensor(self._train_sums[k], dtype=torch.float32, device=self.args.device) for k in keys]
                + [torch.tensor(float(self._train_pairs), device=self.args.device)]
            )
            totals = self.accelerator.reduce(totals, reduction="sum")
            count = max(float(totals[-1]), 1.0)
            logs.update({k: round(float(totals[i]) / count, 6) for i, k in enumerate(keys)})
            self._train_sums, self._train_pairs = {}, 0
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Loss and metrics averaged over every held-out pair (gathered across processes)."""
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        collected: dict[str, list[torch.Tensor]] = {}
        try:
            with torch.no_grad():
                for inputs in dataloader:
                    inputs = self._prepare_inputs(inputs)
                    with self.accelerator.autocast():
                        losses, stats = self._pair_outputs(model, inputs)
                    for key, values in {"loss": losses.detach(), **stats}.items():
                        collected.setdefault(key, []).append(self.accelerator.gather_for_metrics(values.float()))
        finally:
            model.train(was_training)
        metrics = {f"{metric_key_prefix}_{k}": float(torch.cat(v).mean()) for k, v in collected.items()}
        metrics[f"{metric_key_prefix}_pairs"] = int(sum(t.numel() for t in collected.get("loss", [])))
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


# --------------------------------------------------------------------------------------------
# Running the stage
# --------------------------------------------------------------------------------------------


def load_preference_data(config: DPOConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Training and held-out pairs from ``--dataset`` / ``--eval_dataset`` / ``--eval_split_ratio``."""
    from tether.data.loading import load_preferences

    return stage_data(load_preferences, config, "dpo")


def _load_policy(config: DPOConfig, model=None):
    from tether.models.loading import disable_dropout, from_pretrained_kwargs, load_causal_lm

    if model is None:
        model = load_causal_lm(config.model_name_or_path, dtype=config.dtype, **from_pretrained_kwargs(config))
    if hasattr(model, "merge_and_unload"):  # a PEFT adapter folder: its merged weights are the starting model
        model = model.merge_and_unload()
    disable_dropout(model)
    model.config.use_cache = False
    return model


def train_dpo(
    config: DPOConfig,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    *,
    model=None,
    tokenizer=None,
    ref_model=None,
) -> dict[str, Any]:
    """Train with DPO and write the policy; returns ``{"train": ..., "eval": ...}`` metrics.

    ``train_dataset`` / ``eval_dataset``: ``PreferencePair`` records, a ``datasets.Dataset`` (checked
    like a file) or a path; without them, ``--dataset`` and its held-out share as ``tether dpo`` reads
    them (``stage_data``). ``model`` / ``tokenizer``: an already-loaded causal LM (trained in place; the
    frozen reference is a copy of it unless --ref_model_name_or_path or --use_peft) and its tokenizer.
    ``ref_model``: an already-loaded causal LM as the frozen reference (what --ref_model_name_or_path
    loads; it is put in eval mode, dropout off, and never trained).
    Everything that can fail on the data (tokenisation) happens before the output folder exists.
    """
    if ref_model is not None and config.ref_model_name_or_path:
        raise ConfigError("train_dpo: give the reference once, as ref_model= or as --ref_model_name_or_path")
    if ref_model is not None and not hasattr(ref_model, "get_output_embeddings"):
        raise ConfigError(f"train_dpo: ref_model= must be a causal language model, got {type(ref_model).__name__}")
    reference_object = ref_model
    from tether.data.loading import load_preferences
    from tether.models.loading import load_tokenizer
    from tether.tracking import JsonlMetricsCallback

    train_pairs, eval_pairs = stage_data(load_preferences, config, "dpo", train_dataset, eval_dataset)

    output_dir = Path(config.output_dir)
    resume = resolve_resume(config.resume_from_checkpoint)
    check_output_dir(output_dir, config.overwrite_output_dir, resume is not None)
    if not train_pairs:
        raise ConfigError("no training preference pairs")
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() and not (config.precompute_ref_log_probs or config.use_peft):
        # the frozen copy of the policy would hold ZeRO-3 partitions that no DeepSpeed engine gathers
        raise ConfigError(
            "DPO with a live reference model under DeepSpeed ZeRO-3: pass --precompute_ref_log_probs true "
            "(or --use_peft true: the reference is the policy without its adapters), or use FSDP"
        )
    tokenizer = (
        tokenizer
        if tokenizer is not None
        else load_tokenizer(
            config.model_name_or_path if model is None else model.name_or_path,
            trust_remote_code=config.trust_remote_code,
        )
    )
    pad_id = pad_token_id(tokenizer)
    rule = truncation_rule(config)
    train_tok, train_cut, train_dropped = tokenize_pairs(tokenizer, train_pairs, rule)
    eval_tok, eval_cut, eval_dropped = tokenize_pairs(tokenizer, eval_pairs or [], rule)
    report_truncation("dpo", rule, len(train_pairs), train_dropped, train_cut, "pairs")
    report_truncation("dpo (held-out)", rule, len(eval_pairs or []), eval_dropped, eval_cut, "pairs", required=False)

    if not eval_tok:
        config.eval_strategy = "no"

    model = _load_policy(config, model)
    if not fsdp_requested():  # under FSDP accelerate places the (sharded) model; processes > 0 may hold meta tensors
        model.to(config.device)
    probe = train_tok[: max(1, config.per_device_train_batch_size)]  # the first batch
    layout, compact_ok = on_main_process(
        lambda: check_fast_paths(model, probe, pad_id, config.share_prompt, config.padding_free), model
    )
    # FSDP2 shards the LM head in one unit with the final norm (and tied embeddings), gathered for the
    # model's own forward only: calling the head again outside it breaks the backward (a segfault on
    # gloo with torch 2.13), so the model computes the logits itself there.
    compact_ok = compact_ok and not fsdp_requested()

    ref_model = None
    if config.use_peft:
        from peft import get_peft_model

        from tether.models.loading import prepare_quantised_for_lora

        model = prepare_quantised_for_lora(model, config.gradient_checkpointing)
        model = get_peft_model(model, peft_config_from(config))
        if config.gradient_checkpointing:
            model.enable_input_require_grads()
    autocast_dtype = torch.bfloat16 if config.bf16 else (torch.float16 if config.fp16 else None)
    if config.ref_model_name_or_path or reference_object is not None:
        from tether.models.loading import disable_dropout, from_pretrained_kwargs, load_causal_lm

        ref_model = (
            reference_object
            if reference_object is not None
            else load_causal_lm(config.ref_model_name_or_path, dtype=config.dtype, **from_pretrained_kwargs(config))
        )
        disable_dropout(ref_model)
        if not fsdp_requested():
            ref_model.to(config.device)
        ref_model.eval().requires_grad_(False)
    if config.precompute_ref_log_probs:
        scorer = ref_model if ref_model is not None else model
        batch = max(config.per_device_train_batch_size, config.per_device_eval_batch_size)

        def reference_logps() -> list[list[tuple[float, float]]]:
            for pairs in (train_tok, eval_tok):
                precompute_reference_logps(
                    scorer,
                    pairs,
                    pad_id,
                    batch,
                    layout,
                    compact_ok,
                    autocast_dtype,
                    disable_adapter=ref_model is None and config.use_peft,
                )
            return [[(x.ref_chosen_logp, x.ref_rejected_logp) for x in pairs] for pairs in (train_tok, eval_tok)]

        # every process trains on the same numbers (under FSDP only the main process has the weights yet)
        for pairs, values in zip((train_tok, eval_tok), on_main_process(reference_logps, scorer)):
            for x, (chosen, rejected) in zip(pairs, values):
                x.ref_chosen_logp, x.ref_rejected_logp = chosen, rejected
        ref_model = None  # nothing of the reference stays in memory
    elif ref_model is None and not config.use_peft:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    trainer = _DPOTrainer(
        model=model,
        args=config,
        train_dataset=PairDataset(train_tok),
        eval_dataset=PairDataset(eval_tok) if eval_tok else None,
        data_collator=PairCollator(pad_id, layout),
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(output_dir)],
        dpo=config,
        ref_model=ref_model,
        compact_head=compact_ok,
        autocast_dtype=autocast_dtype,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    train_metrics = dict(result.metrics)
    train_metrics["train_pairs"] = len(train_tok)
    train_metrics["truncation"] = config.truncation
    train_metrics["prompts_cut"] = train_cut
    train_metrics["pairs_dropped"] = train_dropped
    train_metrics["eval_pairs_dropped"] = eval_dropped
    train_metrics["global_step"] = trainer.state.global_step
    train_metrics["shared_prompt_rows"] = layout.share_prompt
    train_metrics["padding_free_rows"] = layout.padding_free
    train_metrics["train_pairs_per_second"] = train_metrics.get("train_samples_per_second")
    eval_metrics = trainer.evaluate() if eval_tok else {}

    model = complete_model(trainer)  # every process: under FSDP / ZeRO-3 the weights are gathered
    if trainer.is_world_process_zero():
        with staged_output(output_dir) as staged:
            save_policy(model, tokenizer, staged, config.merge_lora)
            write_json_atomic(staged / "train_results.json", train_metrics)
            write_json_atomic(staged / "eval_results.json", eval_metrics)
        if not config.keep_checkpoints:  # the final model is in place: the run needs them no more
            remove_checkpoints(output_dir)
    trainer.accelerator.wait_for_everyone()
    return {"train": train_metrics, "eval": eval_metrics}


def run_dpo(config: DPOConfig) -> dict[str, Any]:
    """``tether dpo``: load and check the data, then train; nothing is written if the data is bad."""
    check_output_dir(
        Path(config.output_dir), config.overwrite_output_dir, resolve_resume(config.resume_from_checkpoint) is not None
    )
    train_pairs, eval_pairs = load_preference_data(config)
    return train_dpo(config, train_pairs, eval_pairs)
