"""Stage 2, ``tether rm``: a Bradley–Terry reward model on preference pairs.

Model: the backbone with a linear head read at the **last real token** (the stop token that ends
every response), from an SFT checkpoint or any causal LM (``load_scalar_model``).

Loss (``bradley_terry_loss`` and ``reward_centering_penalty``):

    L = mean_i −log σ(r(x_i, y_w,i) − r(x_i, y_l,i) − m_i)  +  c · mean_i (r(x_i, y_w,i) + r(x_i, y_l,i))²

Chosen and rejected of a batch go through the model in one forward pass. By default
(``--share_prompt``) each pair is one row ``prompt + chosen + rejected``: the rejected tokens see the
prompt but not the chosen tokens (a custom 4-D attention mask) and take the positions they would
have after the prompt alone, so both scores equal those of the two separate sequences while the
prompt is computed once. With ``--padding_free`` (default) the pairs of a batch are packed into as
few rows as fit the longest, each pair kept apart by a block-diagonal mask with its own position ids
(``tether.models.packing``): the batch still holds the same pairs, in fewer padded tokens. On the
first batch tether checks these layouts against two separately padded sequences and falls back,
logging why, if the model does not support them (flash attention, sliding windows, bidirectional
encoders).

Saved reward model: ``AutoModelForSequenceClassification.from_pretrained(path)`` and
``pipeline("text-classification", model=path, function_to_apply="none")`` give tether's scores.
Hugging Face models pool at the last token that is not ``config.pad_token_id``; when the pad token
is the stop token (SmolLM2) that lands one token early, so the reward model is saved with a pad
token distinct from the stop token (see ``choose_distinct_pad_token``).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from tether.config import (
    ConfigError,
    DataArguments,
    ModelArguments,
    TruncationArguments,
    check_quantised_training,
    peft_config_from,
)
from tether.data.records import PreferencePair
from tether.data.templates import Truncation, pad_token_id
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
from tether.models.scoring import RewardStats, padded_batch, reward_stats, save_reward_stats, token_scores
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
    on_main_process,
    report_truncation,
    require_dataset,
    resolve_resume,
    stage_data,
    summarise_lengths,
    truncation_rule,
)
from tether.stages.sft import ListDataset

logger = logging.getLogger(__name__)

EVAL_RESULTS_FILE = "eval_results.json"
SUMMARY_FILE = "training_summary.json"
#: Added only when the tokenizer has no usable special token to pad with.
NEW_PAD_TOKEN = "<|tether_pad|>"


@dataclass
class RewardConfig(ModelArguments, TruncationArguments, DataArguments, TrainingArguments):
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": f"Where the reward model is written (default {DEFAULT_OUTPUT_ROOT}/rm). With --eval_only: "
            "where eval_results.json is written (nothing is written when not given)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a non-empty --output_dir (the old model stays until the new one is saved)."},
    )
    eval_only: bool = field(
        default=False,
        metadata={
            "help": "Score the preference pairs of --dataset with the reward model --model_name_or_path and print "
            "the pairwise accuracy (no training)."
        },
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "c in the centering term c*mean((r_chosen + r_rejected)^2) that keeps rewards near 0 "
            "(Eisenstein et al. 2023 use 0.01). Off when not given."
        },
    )
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Score chosen and rejected in one row that holds the prompt once (exact; checked on the first "
            "batch, with a fallback to two padded sequences)."
        },
    )
    padding_free: bool = field(default=True, metadata={"help": PADDING_FREE_HELP})
    reward_stats_max_pairs: int = field(
        default=512,
        metadata={
            "help": "Training pairs (chosen and rejected) scored at the end for reward_stats.json, the mean and "
            "std used to normalise rewards in PPO."
        },
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW peak learning rate (decayed linearly to 0)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs (references: 1)."})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "AdamW epsilon (1e-5 as in the references)."})
    logging_steps: float = field(default=10, metadata={"help": "Log loss and training accuracy every N steps."})
    eval_strategy: str = field(
        default="epoch",
        metadata={
            "help": "When to evaluate on the held-out pairs: no, steps or epoch (a final evaluation always runs "
            "when there are held-out pairs)."
        },
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Unused: tether collates its own batches."})
    max_bad_steps: int = field(default=DEFAULT_MAX_BAD_STEPS, metadata={"help": MAX_BAD_STEPS_HELP})
    keep_checkpoints: bool = field(default=False, metadata={"help": KEEP_CHECKPOINTS_HELP})

    def __post_init__(self):
        self.output_dir_given = self.output_dir is not None
        if self.output_dir is None:
            self.output_dir = str(DEFAULT_OUTPUT_ROOT / "rm")
        if not self.eval_only:
            check_quantised_training(self)
        super().__post_init__()


# ---------------------------------------------------------------------------------------------
# the equations
# ---------------------------------------------------------------------------------------------
def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """``L = (1/n) Σ_i −log σ(r_w,i − r_l,i − m_i)`` (``m_i = 0`` without margins).

    Computed with ``logsigmoid`` so that large negative differences do not underflow.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    return -F.logsigmoid(diff).mean()


def reward_centering_penalty(chosen: torch.Tensor, rejected: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``c · (1/n) Σ_i (r_w,i + r_l,i)²``: pulls the pair's rewards to sum to 0 (Eisenstein et al. 2023)."""
    return coefficient * ((chosen + rejected) ** 2).mean()


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Held-out statistics of a reward model on n pairs:

    * ``accuracy = (1/n) Σ_i (1[r_w,i > r_l,i] + ½·1[r_w,i = r_l,i])`` (a tie is a coin flip),
    * ``margin = (1/n) Σ_i (r_w,i − r_l,i)``,
    * ``reward_mean``, ``reward_std``: mean and (biased) std of all 2n rewards,
    * ``chosen_mean``, ``rejected_mean``.
    """
    chosen, rejected = chosen.double().flatten(), rejected.double().flatten()
    both = torch.cat([chosen, rejected])
    wins = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
    return {
        "accuracy": wins.mean().item(),
        "margin": (chosen - rejected).mean().item(),
        "reward_mean": both.mean().item(),
        "reward_std": both.var(unbiased=False).sqrt().item(),
        "chosen_mean": chosen.mean().item(),
        "rejected_mean": rejected.mean().item(),
    }


# ---------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizedPair:
    """The prompt's tokens once, and each response's tokens (ending with the stop token, unless the
    pair says the response was cut at a token budget when sampled)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    margin: float | None = None

    @property
    def chosen_ids(self) -> list[int]:
        return list(self.prompt + self.chosen)

    @property
    def rejected_ids(self) -> list[int]:
        return list(self.prompt + self.rejected)


@dataclass
class TokenizedPreferences:
    pairs: list[TokenizedPair]
    prompts_cut: int = 0
    pairs_dropped: int = 0

    @property
    def has_margin(self) -> bool:
        return any(p.margin is not None for p in self.pairs)


def tokenize_preferences(tokenizer, pairs: Sequence[PreferencePair], truncation: Truncation) -> TokenizedPreferences:
    """Each pair as ``prompt_ids + response_ids`` (``tether.data.templates``), fitted by ``truncation``
    (counting prompts cut and pairs dropped).

    Chosen and rejected share the prompt token for token: it is cut once, to fit beside the longer.
    """
    from tether.data.templates import prompt_ids, response_ids

    out = TokenizedPreferences(pairs=[])
    for pair in pairs:
        prompt = prompt_ids(tokenizer, pair.prompt)
        chosen = response_ids(tokenizer, pair.chosen, add_stop=not pair.chosen_truncated)
        rejected = response_ids(tokenizer, pair.rejected, add_stop=not pair.rejected_truncated)
        kept = truncation.fit_prompt(prompt, chosen, rejected)
        if kept is None:
            out.pairs_dropped += 1
            continue
        out.prompts_cut += int(len(kept) < len(prompt))
        margin = None if pair.margin is None else float(pair.margin)
        out.pairs.append(TokenizedPair(tuple(kept), tuple(chosen), tuple(rejected), margin))
    return out


# ---------------------------------------------------------------------------------------------
# one forward pass for chosen and rejected
# ---------------------------------------------------------------------------------------------
@dataclass
class PreferenceCollator:
    """Batches of pairs for one forward pass; the batch is always the pairs given, only the rows differ.

    ``share_prompt``: one segment per distinct prompt, ``prompt | r_1 | … | r_m`` with the distinct
    responses of the pairs that share it (``group_pairs_by_prompt``: each response sees the prompt, not
    the others, and is scored once however many pairs it is in). Otherwise two segments per pair,
    ``prompt + chosen`` and ``prompt + rejected``.
    ``padding_free``: the segments are packed into as few rows as fit the longest one
    (``tether.models.packing``), with a block-diagonal 4-D mask; otherwise one segment per row.
    Either fast layout gives ``attention`` (boolean ``[R, 1, W, W]``), ``position_ids`` and the flat
    indices ``chosen_index`` / ``rejected_index`` (``row · W + column``) of each response's stop token.
    Plain rows (neither) are ``chosen_1..chosen_B, rejected_1..rejected_B`` right-padded with their
    ``lengths`` and a 2-D mask. Margins come along when the data have them.
    """

    pad_token_id: int
    share_prompt: bool = True
    padding_free: bool = False

    def __call__(self, features: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        if self.share_prompt or self.padding_free:
            n = len(features)
            if self.share_prompt:
                groups = group_pairs_by_prompt([(f.prompt, f.chosen, f.rejected) for f in features])
                segments, tokens = groups.segments, groups.tokens
            else:
                segments = [Segment(len(f.prompt) + len(f.chosen)) for f in features]
                segments += [Segment(len(f.prompt) + len(f.rejected)) for f in features]
                tokens = [f.chosen_ids for f in features] + [f.rejected_ids for f in features]
            rows = lay_out_rows(tokens, segments, self.pad_token_id, self.padding_free)
            width = rows.input_ids.shape[1]
            start = [rows.row[i] * width + rows.offset[i] for i in range(len(segments))]
            if self.share_prompt:  # the last token of each distinct response, then each pair's two
                last = [
                    start[s] + segments[s].branch_start(b) + segments[s].branches[b] - 1
                    for s, b in zip(groups.segment_of, groups.branch_of)
                ]
                chosen, rejected = [last[j] for j in groups.chosen], [last[j] for j in groups.rejected]
            else:
                chosen = [start[i] + segments[i].length - 1 for i in range(n)]
                rejected = [start[n + i] + segments[n + i].length - 1 for i in range(n)]
            # a per-pair tensor first: Trainer reads the batch size from the first entry
            batch["chosen_index"] = torch.tensor(chosen, dtype=torch.long)
            batch["rejected_index"] = torch.tensor(rejected, dtype=torch.long)
            batch["input_ids"] = rows.input_ids
            batch["attention"] = rows.attention()
            batch["position_ids"] = rows.position_ids
        else:
            rows = [f.chosen_ids for f in features] + [f.rejected_ids for f in features]
            batch["lengths"] = torch.tensor([len(r) for r in rows])
            batch["input_ids"], _ = padded_batch(rows, self.pad_token_id)
        if any(f.margin is not None for f in features):
            batch["margin"] = torch.tensor([0.0 if f.margin is None else f.margin for f in features])
        return batch


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_chosen, r_rejected)``, each ``[B]``, from one forward pass over a ``PreferenceCollator`` batch."""
    input_ids = batch["input_ids"]
    if "chosen_index" in batch:
        mask = model_attention_mask(model, batch["attention"])
        scores = token_scores(model, input_ids, mask, batch["position_ids"]).flatten()
        return scores[batch["chosen_index"].to(scores.device)], scores[batch["rejected_index"].to(scores.device)]
    width = input_ids.shape[1]
    lengths = batch["lengths"].to(input_ids.device)
    attention_mask = (torch.arange(width, device=input_ids.device).unsqueeze(0) < lengths.unsqueeze(1)).long()
    scores = token_scores(model, input_ids, attention_mask)
    picked = scores.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1).to(scores.device)).squeeze(1)
    half = picked.shape[0] // 2
    return picked[:half], picked[half:]


def _to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def choose_reward_layout(
    model, pairs: Sequence[TokenizedPair], pad_token_id: int, share_prompt: bool = True, padding_free: bool = True
) -> Layout:
    """The fastest layout the options allow whose rewards on these pairs equal those of plain rows
    (``tether.models.packing.first_exact_layout``; a refused layout is logged with its reason)."""
    if not pairs:
        return Layout(share_prompt, padding_free)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tol = 1e-3 if dtype == torch.float32 else 5e-2

    def rewards(layout: Layout) -> torch.Tensor:
        collate = PreferenceCollator(pad_token_id, layout.share_prompt, layout.padding_free)
        return torch.stack(pair_rewards(model, _to_device(collate(list(pairs)), device)))

    was_training = model.training
    model.eval()
    try:
        return first_exact_layout(candidate_layouts(share_prompt, padding_free), rewards, tol, tol, "tether rm")
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def choose_distinct_pad_token(tokenizer, model=None) -> int:
    """A pad id different from the stop token, set on the tokenizer (and model config).

    Hugging Face sequence classifiers (and ``pipeline("text-classification")``) read the score at
    the last token that is not ``pad_token_id``. Every response ends with the stop token, so the
    pad id must differ from it. Choice, in order:

    1. the tokenizer's pad token if it already differs from the stop token;
    2. an existing special token that is neither the stop token nor the start token and does not
       occur in the chat template's rendering of a conversation (SmolLM2: ``<|endoftext|>``, id 0);
    3. a new special token ``<|tether_pad|>``, placed in an unused embedding row when the
       embedding matrix has one, otherwise by growing the embeddings by one row. Its embedding is
       never read: padding sits after every real token and outside every real token's attention.
    """
    stop = tokenizer.eos_token_id
    current = tokenizer.pad_token_id
    if current is not None and current != stop:
        chosen = int(current)
    else:
        used: set[int] = set()
        if getattr(tokenizer, "chat_template", None):
            try:
                text = tokenizer.apply_chat_template(
                    [
                        {"role": "system", "content": "s"},
                        {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"},
                    ],
                    tokenize=False,
                )
                used = set(tokenizer(text, add_special_tokens=False)["input_ids"])
            except Exception:  # a template that rejects this conversation: nothing excluded beyond bos/eos
                used = set()
        excluded = used | {stop, tokenizer.bos_token_id}
        candidates = [tokenizer.unk_token_id]
        candidates += sorted(
            i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False)
        )
        found = next((int(c) for c in candidates if c is not None and c not in excluded), None)
        if found is None:
            tokenizer.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
            found = int(tokenizer.convert_tokens_to_ids(NEW_PAD_TOKEN))
            if model is not None:
                rows = model.get_input_embeddings().weight.shape[0]
                if found >= rows:
                    model.resize_token_embeddings(found + 1)
            logger.info("tether rm: no spare special token to pad with; added %s (id %d)", NEW_PAD_TOKEN, found)
        chosen = found
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(chosen)
    if model is not None:
        model.config.pad_token_id = chosen
    return chosen


def _materialise_adapter(path: str, folder: Path, dtype, trust_remote_code: bool = False) -> str:
    """A LoRA adapter folder (e.g. ``tether sft --use_peft``) merged into a full causal LM in ``folder``
    (merged at full precision: ``--load_in_4bit`` applies when the reward model is loaded from it)."""
    from tether.models.loading import load_causal_lm, load_tokenizer

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    merged = load_causal_lm(path, dtype=dtype, **kwargs).merge_and_unload()
    merged.save_pretrained(folder)
    load_tokenizer(path, trust_remote_code=trust_remote_code).save_pretrained(folder)
    return str(folder)


def load_reward_backbone(config: RewardConfig, scratch: Path, model=None, tokenizer=None):
    """The scalar model to train (fresh head on a causal LM, or an existing reward model; ``model`` /
    ``tokenizer`` when already loaded), dropout off."""
    from tether.models.loading import (
        disable_dropout,
        from_pretrained_kwargs,
        load_scalar_model,
        load_tokenizer,
        prepare_quantised_for_lora,
        resolve_model_path,
    )

    if model is None:
        path = resolve_model_path(config.model_name_or_path)
        if (Path(path) / "adapter_config.json").is_file():
            path = _materialise_adapter(path, scratch, config.dtype, config.trust_remote_code)
        model = load_scalar_model(path, dtype=config.dtype, **from_pretrained_kwargs(config))
    else:
        if getattr(model.config, "num_labels", None) != 1:
            raise ConfigError(
                f"model: a reward model is a sequence-classification model with one label, got "
                f"{type(model).__name__} (num_labels={getattr(model.config, 'num_labels', None)}); load it with "
                "AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)"
            )
        path = model.name_or_path
    if tokenizer is None:
        tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    pad = choose_distinct_pad_token(tokenizer, model)
    disable_dropout(model)
    if config.activation_checkpointing:
        model.config.use_cache = False
    if config.use_peft:
        from peft import get_peft_model

        model = prepare_quantised_for_lora(model, config.activation_checkpointing)
        model = get_peft_model(model, peft_config_from(config, task_type="SEQ_CLS"))
        if config.activation_checkpointing:
            model.enable_input_require_grads()  # transformers#42489
    return model, tokenizer, pad


# ---------------------------------------------------------------------------------------------
# the Trainer
# ---------------------------------------------------------------------------------------------
class RewardTrainer(PromptGroupedOrder, TetherTrainerMixin, Trainer):
    """``transformers.Trainer`` with the Bradley–Terry loss; evaluation returns ``[r_chosen, r_rejected]``
    per pair, which ``compute_reward_metrics`` turns into accuracy, margin and reward statistics."""

    loss_is_scaled_for_ga = False  # a per-batch mean; the Trainer divides by the accumulation steps

    def __init__(self, *args, center_rewards_coefficient: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.center_rewards_coefficient = center_rewards_coefficient
        self._train_sums = {"accuracy": 0.0, "margin": 0.0, "pairs": 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = pair_rewards(model, inputs)
        loss = bradley_terry_loss(chosen, rejected, inputs.get("margin"))
        if self.center_rewards_coefficient:
            loss = loss + reward_centering_penalty(chosen, rejected, self.center_rewards_coefficient)
        if model.training:
            with torch.no_grad():
                self._train_sums["accuracy"] += (
                    (chosen > rejected).float().sum() + 0.5 * (chosen == rejected).float().sum()
                ).item()
                self._train_sums["margin"] += (chosen - rejected).sum().item()
                self._train_sums["pairs"] += chosen.shape[0]
        return (loss, (chosen, rejected)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, (chosen, rejected) = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        rewards = torch.stack([chosen, rejected], dim=1).detach().float()
        return loss.detach(), rewards, torch.zeros(rewards.shape[0], device=rewards.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log row: add the training-pair statistics since the last one
            sums = torch.tensor(
                [self._train_sums["accuracy"], self._train_sums["margin"], self._train_sums["pairs"]],
                dtype=torch.float32,
                device=self.args.device,
            )
            if self.accelerator.num_processes > 1:  # every process logs; the statistics are over all of their pairs
                sums = self.accelerator.reduce(sums, reduction="sum")
            if sums[2] > 0:
                logs["accuracy"] = float(sums[0] / sums[2])
                logs["margin"] = float(sums[1] / sums[2])
            self._train_sums = {"accuracy": 0.0, "margin": 0.0, "pairs": 0}
        super().log(logs, start_time)


def compute_reward_metrics(eval_prediction) -> dict[str, float]:
    rewards = torch.as_tensor(eval_prediction.predictions)
    return preference_metrics(rewards[:, 0], rewards[:, 1])


class EvaluationHistory(TrainerCallback):
    """Keeps every evaluation's metrics for eval_results.json (each also goes to metrics.jsonl)."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics:
            self.rows.append({"step": state.global_step, "epoch": state.epoch, **metrics})


# ---------------------------------------------------------------------------------------------
# running the stage
# ---------------------------------------------------------------------------------------------
def run_reward(config: RewardConfig) -> Path | dict[str, float]:
    """``tether rm``: train a reward model (returns its folder) or, with ``--eval_only``, score a
    preference file with an existing one (prints and returns the metrics)."""
    from tether.data.loading import load_preferences

    if config.eval_only:
        dataset = require_dataset(config.dataset, "rm --eval_only")
        pairs = load_preferences(dataset, split=config.dataset_split, dataset_config=config.dataset_config)
        return evaluate_reward_model(config, pairs)
    output_dir = Path(config.output_dir)
    resume = resolve_resume(config.resume_from_checkpoint)
    check_output_dir(output_dir, config.overwrite_output_dir, resume is not None)
    train, held_out = stage_data(load_preferences, config, "rm")
    return train_reward(config, train, held_out)


def _tokenize_checked(tokenizer, pairs, config, what: str, required: bool = True) -> TokenizedPreferences:
    rule = truncation_rule(config)
    tokens = tokenize_preferences(tokenizer, pairs, rule)
    report_truncation(what, rule, len(pairs), tokens.pairs_dropped, tokens.prompts_cut, "pairs", required)
    return tokens


def train_reward(
    config: RewardConfig, train_dataset: Any = None, eval_dataset: Any = None, *, model=None, tokenizer=None
) -> Path:
    """Train the reward model and write it; returns the output folder.

    ``train_dataset`` / ``eval_dataset``: ``PreferencePair`` records, a ``datasets.Dataset`` (checked
    like a file) or a path; without them, ``--dataset`` and its held-out share as ``tether rm`` reads
    them (``stage_data``). ``model``: an already-loaded sequence-classification model with one label
    (e.g. ``AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)``), trained in
    place; ``tokenizer`` its tokenizer (its pad token may be changed, see ``choose_distinct_pad_token``).
    """
    from tether.data.loading import load_preferences
    from tether.tracking import JsonlMetricsCallback

    train, held_out = stage_data(load_preferences, config, "rm", train_dataset, eval_dataset)
    started_from = config.model_name_or_path if model is None else (model.name_or_path or "(in-memory model)")

    output_dir = Path(config.output_dir)
    resume = resolve_resume(config.resume_from_checkpoint)
    check_output_dir(output_dir, config.overwrite_output_dir, resume is not None)
    if not train:
        raise ConfigError("no training pairs")
    if config.max_length is not None and config.max_length < 2:
        raise ConfigError("--max_length must be at least 2 (one prompt and one response token)")

    from transformers import set_seed

    set_seed(config.seed)  # the new reward head is random: --seed makes a run reproducible, whatever ran before
    with tempfile.TemporaryDirectory(prefix="tether-rm-") as scratch:
        model, tokenizer, pad = load_reward_backbone(config, Path(scratch), model, tokenizer)
    tokens = _tokenize_checked(tokenizer, train, config, "rm")
    eval_tokens = _tokenize_checked(tokenizer, held_out, config, "rm (held-out)", required=False)
    if not eval_tokens.pairs:
        config.eval_strategy = IntervalStrategy.NO

    collator = PreferenceCollator(pad, config.share_prompt, config.padding_free)
    history = EvaluationHistory()
    trainer = RewardTrainer(
        model=model,
        args=config,
        data_collator=collator,
        train_dataset=ListDataset(tokens.pairs),
        eval_dataset=ListDataset(eval_tokens.pairs) if eval_tokens.pairs else None,
        processing_class=tokenizer,
        compute_metrics=compute_reward_metrics,
        callbacks=[JsonlMetricsCallback(output_dir), history],
        center_rewards_coefficient=config.center_rewards_coefficient,
    )
    started = time.perf_counter()
    if config.share_prompt or config.padding_free:
        probe = tokens.pairs[: max(1, min(len(tokens.pairs), config.per_device_train_batch_size))]
        # one choice for every process (under FSDP only the main one has the weights before training)
        layout = on_main_process(
            lambda: choose_reward_layout(trainer.model, probe, pad, config.share_prompt, config.padding_free),
            trainer.model,
        )
        collator.share_prompt, collator.padding_free = layout.share_prompt, layout.padding_free
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - started

    final_eval: dict[str, float] = {}
    if eval_tokens.pairs:
        if history.rows and history.rows[-1]["step"] == trainer.state.global_step:
            final_eval = {k: v for k, v in history.rows[-1].items() if k not in ("step", "epoch")}
        else:
            final_eval = trainer.evaluate()
    stats = training_reward_stats(trainer, tokens.pairs, config.reward_stats_max_pairs, config.seed)

    trained = len(tokens.pairs)
    summary = {
        "stage": "rm",
        "model_name_or_path": started_from,
        "train_pairs": trained,
        "eval_pairs": len(eval_tokens.pairs),
        "truncation": config.truncation,
        "prompts_cut": tokens.prompts_cut,
        "pairs_dropped": tokens.pairs_dropped,
        "eval_pairs_dropped": eval_tokens.pairs_dropped,
        "pair_token_lengths": summarise_lengths(
            [len(p.prompt) + len(p.chosen) + len(p.rejected) for p in tokens.pairs]
        ),
        "shared_prompt_rows": collator.share_prompt,
        "padding_free_rows": collator.padding_free,
        "pad_token_id": pad,
        "train_seconds": train_seconds,
        "train_pairs_per_second": trained * config.num_train_epochs / train_seconds if train_seconds else None,
        "train_loss": result.training_loss,
        "global_steps": trainer.state.global_step,
        "eval": final_eval,
        "reward_stats": {"mean": stats.mean, "std": stats.std, "count": stats.count},
    }
    model = complete_model(trainer)  # every process: under FSDP / ZeRO-3 the weights are gathered
    if trainer.is_world_process_zero():
        with staged_output(output_dir) as staged:
            save_reward_model(model, tokenizer, staged)
            save_reward_stats(stats, staged)
            write_json_atomic(staged / EVAL_RESULTS_FILE, {"final": final_eval, "evaluations": history.rows})
            write_json_atomic(staged / SUMMARY_FILE, summary)
        if not config.keep_checkpoints:  # the final model is in place: the run needs them no more
            remove_checkpoints(output_dir)
        if final_eval:
            logger.info(
                "tether rm: held-out accuracy %.3f on %d pairs",
                final_eval.get("eval_accuracy", float("nan")),
                len(held_out),
            )
        logger.info("tether rm: wrote %s (%d pairs, %.1f s)", output_dir, len(train), train_seconds)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def training_reward_stats(
    trainer: RewardTrainer, pairs: Sequence[TokenizedPair], max_pairs: int, seed: int
) -> RewardStats:
    """Mean and std of the trained model's rewards on (a seeded sample of) the training pairs,
    chosen and rejected responses together."""
    sample = list(pairs)
    if max_pairs and len(sample) > max_pairs:
        sample = random.Random(seed).sample(sample, max_pairs)
    # in prompt order, so that pairs sharing a prompt are scored in one segment (the statistics ignore order)
    sample.sort(key=lambda p: p.prompt)
    rewards = torch.as_tensor(trainer.predict(ListDataset(sample)).predictions)
    return reward_stats(
        rewards.flatten(), source=f"reward model on {len(sample)} training pairs (chosen and rejected responses)"
    )


def save_reward_model(model, tokenizer, folder: Path) -> None:
    """Full weights (LoRA merged) + tokenizer with the distinct pad token, loadable by
    ``AutoModelForSequenceClassification`` and ``pipeline("text-classification")``."""
    if hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# --eval_only
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def score_pairs(
    model,
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    batch_size: int = 8,
    share_prompt: bool = True,
    padding_free: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected for every pair (in order), in batches of ``batch_size`` pairs."""
    device = next(model.parameters()).device
    if share_prompt or padding_free:
        layout = choose_reward_layout(model, pairs[:batch_size], pad_token_id, share_prompt, padding_free)
        share_prompt, padding_free = layout.share_prompt, layout.padding_free
    collate = PreferenceCollator(pad_token_id, share_prompt, padding_free)
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for start in range(0, len(pairs), batch_size):
            c, r = pair_rewards(model, _to_device(collate(list(pairs[start : start + batch_size])), device))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def evaluate_reward_model(config: RewardConfig, pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """Score a preference set with an existing reward model; print accuracy; write JSON if asked."""
    from tether.models.loading import from_pretrained_kwargs, load_scalar_model, load_tokenizer, resolve_model_path

    if not pairs:
        raise ConfigError(f"--dataset {config.dataset}: no preference pairs")
    path = resolve_model_path(config.model_name_or_path)
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        architectures = json.loads(config_file.read_text()).get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            logger.warning(
                "tether rm --eval_only: %s is not a reward model (architectures %s); its head is random",
                path,
                architectures,
            )
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    model = load_scalar_model(path, dtype=config.dtype, **from_pretrained_kwargs(config)).to(config.device)
    pad = pad_token_id(tokenizer)
    tokens = _tokenize_checked(tokenizer, pairs, config, "rm --eval_only")
    started = time.perf_counter()
    chosen, rejected = score_pairs(
        model, tokens.pairs, pad, config.per_device_eval_batch_size, config.share_prompt, config.padding_free
    )
    metrics = preference_metrics(chosen, rejected)
    margins = torch.tensor([0.0 if p.margin is None else p.margin for p in tokens.pairs])
    metrics["loss"] = bradley_terry_loss(chosen, rejected, margins if tokens.has_margin else None).item()
    metrics["pairs"] = len(tokens.pairs)
    metrics["pairs_dropped"] = tokens.pairs_dropped
    metrics["seconds"] = time.perf_counter() - started
    print(
        f"accuracy {metrics['accuracy']:.4f} on {len(tokens.pairs)} pairs "
        f"(margin {metrics['margin']:.4f}, reward mean {metrics['reward_mean']:.4f} std {metrics['reward_std']:.4f}, "
        f"loss {metrics['loss']:.4f})"
    )
    if config.output_dir_given:
        results = {"model": path, "dataset": config.dataset, **metrics}
        write_json_atomic(Path(config.output_dir) / EVAL_RESULTS_FILE, results)
    return metrics
