"""Stage 1, ``tether sft``: supervised fine-tuning on demonstrations.

The loop is ``transformers.Trainer`` (checkpoints, logging, schedulers, mixed precision,
multi-process); tether supplies the tokenisation, the labels and the collation:

* ``tokens = prompt_ids(prompt) + response_ids(completion)`` (``tether.data.templates``); the
  response ends with the stop token, which is a target like any response token; a long example is
  fitted by ``--truncation`` (prompt cut from the left, or the example dropped), never by cutting it;
* labels are the token ids on response positions and -100 on prompt and padding positions, built
  from lengths (SmolLM2's pad id is its stop token, so ``ids == pad`` would hide the stop token);
* a ``{"messages"}`` conversation trains every assistant turn, each with its stop token
  (``--assistant_turns all``, TRL's ``assistant_only_loss``; ``templates.conversation_prompt_ids``), or
  only the last one (``--assistant_turns last``); system and user turns and the template's own
  tokens are never targets;
* ``--packing`` puts several examples into one row of at most ``--max_length`` tokens
  (``tether.models.packing.pack_by_length``, shared with the reward model and DPO), with
  position ids restarting at 0 for every example. Without an attention mask, transformers turns
  those position ids into a block-diagonal causal mask (sdpa, eager) or variable-length kernels
  (flash attention), so no token attends across an example boundary. The first packed row's loss
  is checked against its examples' own before training (``packing_difference``); a model that
  cannot keep packed examples apart (no position ids: ALiBi) is refused with a clear error.

The loss is the model's own causal-LM cross-entropy with ``num_items_in_batch``:

    L = (1/N) Σ_{b,t : y[b,t] ≠ −100} −log softmax(z[b, t−1])[y[b,t]]

with N the number of response tokens in the whole (gradient-accumulated) batch, so packed and
unpacked batches give the same loss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from tether.config import (
    ConfigError,
    DataArguments,
    ModelArguments,
    TruncationArguments,
    check_quantised_training,
    peft_config_from,
)
from tether.data.records import Demonstration
from tether.data.templates import Truncation, pad_token_id
from tether.durable import remove_checkpoints, staged_output, write_json_atomic
from tether.models.packing import Segment, pack_by_length, segment_positions
from tether.stages.common import (
    DEFAULT_MAX_BAD_STEPS,
    DEFAULT_OUTPUT_ROOT,
    KEEP_CHECKPOINTS_HELP,
    MAX_BAD_STEPS_HELP,
    TetherTrainerMixin,
    check_output_dir,
    complete_model,
    on_main_process,
    report_truncation,
    resolve_resume,
    stage_data,
    summarise_lengths,
    truncation_rule,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SUMMARY_FILE = "training_summary.json"
ASSISTANT_TURNS = ("all", "last")


@dataclass
class SFTConfig(ModelArguments, TruncationArguments, DataArguments, TrainingArguments):
    output_dir: str | None = field(
        default=None, metadata={"help": f"Where the fine-tuned model is written (default {DEFAULT_OUTPUT_ROOT}/sft)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a non-empty --output_dir (the old model stays until the new one is saved)."},
    )
    assistant_turns: str = field(
        default="all",
        metadata={
            "help": 'Which assistant turns of a {"messages"} conversation are trained: all (each turn and its stop '
            "token, like TRL's assistant_only_loss) or last. A prompt/completion record trains its completion only."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several examples into each row of up to --max_length tokens (position ids restart per "
            "example, so attention never crosses examples). A row then counts as one sample of "
            "--per_device_train_batch_size."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "With --use_peft: merge the LoRA adapters into the weights and save a full model "
            "(default: save the PEFT adapter folder)."
        },
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW peak learning rate (decayed linearly to 0)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training demonstrations."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N optimizer steps."})
    eval_strategy: str = field(
        default="epoch",
        metadata={
            "help": "When to compute the held-out loss: no, steps or epoch (off when there is no held-out data)."
        },
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Unused: tether collates its own batches."})
    max_bad_steps: int = field(default=DEFAULT_MAX_BAD_STEPS, metadata={"help": MAX_BAD_STEPS_HELP})
    keep_checkpoints: bool = field(default=False, metadata={"help": KEEP_CHECKPOINTS_HELP})

    def __post_init__(self):
        if self.assistant_turns not in ASSISTANT_TURNS:
            raise ConfigError(f"--assistant_turns {self.assistant_turns!r}: use {' or '.join(ASSISTANT_TURNS)}")
        check_quantised_training(self)
        if self.output_dir is None:
            self.output_dir = str(DEFAULT_OUTPUT_ROOT / "sft")
        super().__post_init__()


# ---------------------------------------------------------------------------------------------
# tokenisation and labels
# ---------------------------------------------------------------------------------------------
def response_labels(input_ids: Sequence[int], n_prompt: int) -> list[int]:
    """Targets of one example: ``y[t] = ids[t]`` for response positions ``t ≥ n_prompt`` (the stop
    token included) and ``y[t] = −100`` for prompt positions.

    The first position is always −100: nothing in the example precedes it, and in a packed row it
    must not become the target of the previous example's last token. The causal-LM loss then is
    ``L = (1/N) Σ_{y[t] ≠ −100} −log p(ids[t] | ids[<t])`` over the N response tokens of the batch.
    """
    return target_labels(input_ids, [t >= n_prompt for t in range(len(input_ids))])


def target_labels(input_ids: Sequence[int], is_target: Sequence[bool]) -> list[int]:
    """``y[t] = ids[t]`` where ``is_target[t]`` (assistant turns and their stop tokens), else −100;
    ``y[0] = −100`` always (see ``response_labels``)."""
    labels = [int(i) if target else IGNORE_INDEX for i, target in zip(input_ids, is_target, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


@dataclass
class TokenizedDemonstrations:
    examples: list[dict[str, list[int]]]
    prompts_cut: int = 0
    dropped: int = 0

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]


def tokenize_demonstrations(
    tokenizer, demonstrations: Sequence[Demonstration], truncation: Truncation, assistant_turns: str = "all"
) -> TokenizedDemonstrations:
    """Token ids and labels of every demonstration, fitted by ``truncation`` (counting prompts cut
    and demonstrations dropped): a completion is never cut, so every example ends with the stop
    token it teaches.

    With ``assistant_turns="all"`` the earlier assistant turns of a ``{"messages"}`` conversation are
    targets too (``templates.conversation_prompt_ids``); a demonstration without them is tokenised
    exactly as with ``"last"``.
    """
    from tether.data.templates import (
        TemplateError,
        assistant_turn_indices,
        conversation_prompt_ids,
        prompt_ids,
        response_ids,
    )

    out = TokenizedDemonstrations(examples=[])
    for i, demo in enumerate(demonstrations):
        all_turns = (
            assistant_turns == "all"
            and demo.prompt_turns_are_demonstrations
            and bool(assistant_turn_indices(demo.prompt))
        )
        if all_turns:
            try:
                prompt, prompt_targets = conversation_prompt_ids(tokenizer, demo.prompt)
            except TemplateError as exc:
                raise ConfigError(f"{demo.origin or f'demonstration {i}'}: {exc}; use --assistant_turns last") from None
        else:
            prompt = prompt_ids(tokenizer, demo.prompt)
            prompt_targets = [False] * len(prompt)
        completion = response_ids(tokenizer, demo.completion)
        kept = truncation.prompt_tokens_kept(len(prompt), len(completion))
        if kept is None:
            out.dropped += 1
            continue
        out.prompts_cut += int(kept < len(prompt))
        start = len(prompt) - kept
        ids = prompt[start:] + completion
        labels = target_labels(ids, prompt_targets[start:] + [True] * len(completion))
        out.examples.append({"input_ids": ids, "labels": labels})
    return out


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------
def packed_rows(examples: Sequence[dict[str, list[int]]], capacity: int) -> list[dict[str, list[int]]]:
    """Concatenate the examples of each packed row; ``position_ids`` restart at 0 for every example."""
    rows = []
    for group in pack_by_length([len(e["input_ids"]) for e in examples], capacity):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in group:
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX] + list(ex["labels"][1:])
            positions += segment_positions(Segment(len(ex["input_ids"])))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return rows


@torch.no_grad()
def packing_difference(model, examples: Sequence[dict[str, list[int]]], capacity: int, pad: int) -> float:
    """|loss of the first packed row that holds several examples − loss of those examples unpadded in
    their own rows| (both the mean over the same target tokens): 0 up to rounding when the model keeps
    packed examples apart, far from it when they attend to each other."""
    group = next((g for g in pack_by_length([len(e["input_ids"]) for e in examples], capacity) if len(g) > 1), None)
    if group is None:
        return 0.0
    members = [examples[i] for i in group]
    collate = SFTCollator(pad)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        losses = [
            model(**{k: v.to(device) for k, v in collate(batch).items()}, use_cache=False).loss.float().item()
            for batch in (packed_rows(members, capacity), members)
        ]
    finally:
        model.train(was_training)
    return abs(losses[0] - losses[1])


@dataclass
class SFTCollator:
    """Right-pads a batch. Unpacked rows get an attention mask from their lengths; packed rows get
    no mask, and their padding is a block of its own (position ids 0, 1, ...) with labels −100, so
    transformers' packed-sequence detection keeps it out of every real example's attention."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        input_ids = torch.full((n, width), int(self.pad_token_id), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        packed = "position_ids" in features[0]
        if packed:
            position_ids = torch.zeros((n, width), dtype=torch.long)
        else:
            attention_mask = torch.zeros((n, width), dtype=torch.long)
        for row, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[row, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[row, :k] = torch.tensor(f["labels"], dtype=torch.long)
            if packed:
                position_ids[row, :k] = torch.tensor(f["position_ids"], dtype=torch.long)
                position_ids[row, k:] = torch.arange(width - k)
            else:
                attention_mask[row, :k] = 1
        batch = {"input_ids": input_ids, "labels": labels}
        if packed:
            batch["position_ids"] = position_ids
        else:
            batch["attention_mask"] = attention_mask
        return batch


class SFTTrainer(TetherTrainerMixin, Trainer):
    """``transformers.Trainer`` with tether's atomic checkpoints, resume from the newest complete
    checkpoint and skipping of non-finite steps (``TetherTrainerMixin``)."""


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def load_policy_for_training(config: SFTConfig, model=None):
    """The causal LM to fine-tune (``model`` if given, else loaded from ``--model_name_or_path``): merged
    first if the starting point is itself an adapter, then wrapped with fresh LoRA adapters under
    ``--use_peft``; dropout off (N+ detail 7)."""
    from tether.models.loading import (
        disable_dropout,
        from_pretrained_kwargs,
        load_causal_lm,
        prepare_quantised_for_lora,
    )

    if model is None:
        model = load_causal_lm(config.model_name_or_path, dtype=config.dtype, **from_pretrained_kwargs(config))
    if hasattr(model, "merge_and_unload"):  # an SFT adapter folder as the starting point
        model = model.merge_and_unload()
    disable_dropout(model)
    # No KV cache while training: besides wasting memory, a cache makes transformers ignore the
    # packed-sequence position ids and let packed examples attend to each other.
    model.config.use_cache = False
    if config.use_peft:
        from peft import get_peft_model

        model = prepare_quantised_for_lora(model, config.activation_checkpointing)
        model = get_peft_model(model, peft_config_from(config, task_type="CAUSAL_LM"))
        if config.activation_checkpointing:
            # transformers#42489: the Trainer does not do this for PEFT models
            model.enable_input_require_grads()
    return model


def _name_of(model, config) -> str:
    """What the run started from: ``--model_name_or_path``, or the folder/hub id a passed model was loaded from."""
    return config.model_name_or_path if model is None else (getattr(model, "name_or_path", "") or "(in-memory model)")


def final_evaluation(trainer: Trainer) -> dict[str, float]:
    """Held-out metrics at the last step: the Trainer's own if it just evaluated, else a new evaluation."""
    step = trainer.state.global_step
    for row in reversed(trainer.state.log_history):
        if row.get("step") == step and any(k.startswith("eval_") for k in row):
            return {k: v for k, v in row.items() if k.startswith("eval_")}
    return trainer.evaluate()


def save_policy(model, tokenizer, folder: Path, merge_lora: bool) -> None:
    """Write the model so ``AutoModelForCausalLM.from_pretrained(folder)`` loads it."""
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge_lora:
        model = model.merge_and_unload()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# running the stage
# ---------------------------------------------------------------------------------------------
def run_sft(config: SFTConfig) -> Path:
    """``tether sft``: load and check the demonstrations, fine-tune, write the model; returns its folder."""
    from tether.data.loading import load_demonstrations

    output_dir = Path(config.output_dir)
    resume = resolve_resume(config.resume_from_checkpoint)
    check_output_dir(output_dir, config.overwrite_output_dir, resume is not None)
    train, held_out = stage_data(load_demonstrations, config, "sft")
    return train_sft(config, train, held_out)


def train_sft(
    config: SFTConfig, train_dataset: Any = None, eval_dataset: Any = None, *, model=None, tokenizer=None
) -> Path:
    """Fine-tune and write the model; returns the output folder.

    ``train_dataset`` / ``eval_dataset``: ``Demonstration`` records, a ``datasets.Dataset`` (checked
    like a file) or a path; without them, ``--dataset`` and its held-out share as ``tether sft`` reads
    them (``stage_data``). ``model`` / ``tokenizer``: already-loaded objects used instead of
    ``--model_name_or_path`` (the model is trained in place; ``--use_peft`` wraps it with adapters).
    """
    from tether.data.loading import load_demonstrations
    from tether.models.loading import load_tokenizer
    from tether.tracking import JsonlMetricsCallback

    train, held_out = stage_data(load_demonstrations, config, "sft", train_dataset, eval_dataset)
    started_from = _name_of(model, config)

    output_dir = Path(config.output_dir)
    resume = resolve_resume(config.resume_from_checkpoint)
    check_output_dir(output_dir, config.overwrite_output_dir, resume is not None)
    if not train:
        raise ConfigError("no training demonstrations")
    if config.max_length is not None and config.max_length < 2:
        raise ConfigError("--max_length must be at least 2 (one prompt and one response token)")

    if tokenizer is None:
        tokenizer = load_tokenizer(started_from, trust_remote_code=config.trust_remote_code)
    rule = truncation_rule(config)
    tokens = tokenize_demonstrations(tokenizer, train, rule, config.assistant_turns)
    eval_tokens = tokenize_demonstrations(tokenizer, held_out, rule, config.assistant_turns)
    report_truncation("sft", rule, len(train), tokens.dropped, tokens.prompts_cut, "demonstrations")
    report_truncation(
        "sft (held-out)", rule, len(held_out), eval_tokens.dropped, eval_tokens.prompts_cut, "demonstrations", False
    )
    if config.packing:
        capacity = config.max_length if config.max_length else max(tokens.lengths)
        train_items = packed_rows(tokens.examples, capacity)
        eval_items = packed_rows(eval_tokens.examples, capacity) if eval_tokens.examples else []
        logger.info(
            "tether sft: packed %d examples into %d rows of <= %d tokens",
            len(tokens.examples),
            len(train_items),
            capacity,
        )
    else:
        train_items, eval_items = tokens.examples, eval_tokens.examples
    if not eval_items:
        config.eval_strategy = IntervalStrategy.NO

    model = load_policy_for_training(config, model)
    pad = pad_token_id(tokenizer)
    trainer = SFTTrainer(
        model=model,
        args=config,
        data_collator=SFTCollator(pad_token_id=pad),
        train_dataset=ListDataset(train_items),
        eval_dataset=ListDataset(eval_items) if eval_items else None,
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(output_dir)],
    )
    if config.packing:  # one answer for every process (under FSDP only the main one has the weights now)
        difference = on_main_process(
            lambda: packing_difference(trainer.model, tokens.examples, capacity, pad), trainer.model
        )
        tolerance = 1e-4 if next(trainer.model.parameters()).dtype == torch.float32 else 1e-2
        if difference > tolerance:
            raise ConfigError(
                f"--packing true: on this model a packed row's loss differs from its examples' own by "
                f"{difference:.3g} (its attention does not keep packed examples apart); use --packing false"
            )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - started
    eval_metrics = final_evaluation(trainer) if eval_items else {}

    summary = {
        "stage": "sft",
        "model_name_or_path": started_from,
        "train_examples": len(tokens.examples),
        "eval_examples": len(eval_tokens.examples),
        "assistant_turns": config.assistant_turns,
        "packed_rows": len(train_items) if config.packing else None,
        "truncation": config.truncation,
        "prompts_cut": tokens.prompts_cut,
        "examples_dropped": tokens.dropped,
        "eval_examples_dropped": eval_tokens.dropped,
        "token_lengths": summarise_lengths(tokens.lengths),
        "train_seconds": train_seconds,
        "train_loss": result.training_loss,
        "global_steps": trainer.state.global_step,
        "eval": eval_metrics,
        "activation_checkpointing": bool(
            getattr(trainer.accelerator.unwrap_model(trainer.model), "is_activation_checkpointing", False)
        ),
        "use_peft": config.use_peft,
        "merged_lora": bool(config.use_peft and config.merge_lora),
    }
    model = complete_model(trainer)  # every process: under FSDP / ZeRO-3 the weights are gathered
    if trainer.is_world_process_zero():
        with staged_output(output_dir) as staged:
            save_policy(model, tokenizer, staged, config.merge_lora)
            write_json_atomic(staged / SUMMARY_FILE, summary)
        if not config.keep_checkpoints:  # the final model is in place: the run needs them no more
            remove_checkpoints(output_dir)
        logger.info("tether sft: wrote %s (%d examples, %.1f s)", output_dir, len(train), train_seconds)
    trainer.accelerator.wait_for_everyone()
    return output_dir
