"""What the Trainer-based stages (SFT, reward model, DPO) share: data loading with a clear error when
nothing was given, the output-folder rules, and the atomic publication of the final model.

Output folder contract
----------------------
* Data are loaded and validated before anything is written: a bad data file leaves no folder.
* During training the Trainer's checkpoints (``checkpoint-N/``) and ``metrics.jsonl`` live in
  ``output_dir`` as usual, so ``--resume_from_checkpoint`` works after a crash. Each checkpoint
  is written into ``.tmp-checkpoint-N/`` and renamed when complete (``TetherTrainerMixin``).
* The final model is written into a temporary folder beside ``output_dir``; the run's other files
  are moved into it and the folder is then renamed into place. A crash while saving therefore
  never leaves a half-written model that ``from_pretrained`` would load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tether.config import ConfigError
from tether.data.embedded import DEMO
from tether.data.templates import Truncation
from tether.durable import (
    CHECKPOINT_PREFIX,
    LATEST,
    TRAINER_STATE_FILE,
    latest_checkpoint,
    remove_stale_staging,
    replace_folder,
    rotate_checkpoints,
    truncate_metrics,
)
from tether.errors import NonFiniteError
from tether.models.wrappers import gathered_weights

logger = logging.getLogger(__name__)

#: Used when --output_dir is not given (``outputs/`` is git-ignored).
DEFAULT_OUTPUT_ROOT = Path("outputs")


def require_dataset(dataset: str | None, stage: str) -> str:
    """``--dataset``, or a ConfigError saying what it may be (library stages never pick data themselves)."""
    if dataset is None or str(dataset).strip() == "":
        raise ConfigError(
            f"--dataset is required for `tether {stage}`: a .jsonl/.json/.parquet/.csv file, a folder of them, "
            f"a Hugging Face dataset name, or {DEMO} for the embedded demo task's data"
        )
    return str(dataset)


def load_train_eval(
    loader: Callable[..., list],
    dataset: Any,
    split: str,
    eval_dataset: Any,
    eval_split_ratio: float,
    seed: int,
    dataset_config: str | None = None,
    test_split: str | None = None,
) -> tuple[list, list]:
    """Training and held-out records: ``eval_dataset`` (its ``test_split``, default ``split``), else
    the ``test_split`` of ``dataset``, else a seeded ``eval_split_ratio`` share of ``dataset``.

    ``dataset`` and ``eval_dataset`` are whatever ``loader`` reads: paths, hub names, ``datasets.Dataset``
    objects or lists of records."""
    from tether.data.loading import split_train_eval

    records = loader(dataset, split=split, dataset_config=dataset_config)
    if not records:
        raise ConfigError(f"--dataset {dataset}: no records found")
    if eval_dataset is not None and not (isinstance(eval_dataset, str) and eval_dataset == ""):
        eval_records = loader(eval_dataset, split=test_split or split, dataset_config=dataset_config)
        return list(records), list(eval_records)
    if test_split:
        return list(records), list(loader(dataset, split=test_split, dataset_config=dataset_config))
    if not 0.0 <= eval_split_ratio < 1.0:
        raise ConfigError(f"--eval_split_ratio must be in [0, 1), got {eval_split_ratio}")
    if eval_split_ratio == 0.0:
        return list(records), []
    train, held_out = split_train_eval(records, eval_split_ratio, seed)
    if not train:
        raise ConfigError(f"--eval_split_ratio {eval_split_ratio} leaves no training records out of {len(records)}")
    return list(train), list(held_out)


def stage_data(
    loader: Callable[..., list], config: Any, stage: str, train_dataset: Any = None, eval_dataset: Any = None
) -> tuple[list, list]:
    """The records a ``train_*`` function trains and evaluates on.

    Without ``train_dataset``: ``--dataset``, ``--eval_dataset`` / ``--dataset_test_split`` /
    ``--eval_split_ratio``, as the command reads them. Otherwise ``train_dataset`` and ``eval_dataset``
    (None: no held-out data), each a list of records, a ``datasets.Dataset`` (parsed and checked like
    a file, rows ``NAME[split]:ROW``) or a path or hub name (read with ``--dataset_split`` /
    ``--dataset_test_split`` and ``--dataset_config``)."""
    if train_dataset is None:
        return load_train_eval(
            loader,
            require_dataset(config.dataset, stage),
            config.dataset_split,
            config.eval_dataset,
            config.eval_split_ratio,
            config.seed,
            config.dataset_config,
            config.dataset_test_split,
        )
    train = loader(train_dataset, split=config.dataset_split, dataset_config=config.dataset_config)
    if eval_dataset is None:
        return list(train), []
    split = config.dataset_test_split or config.dataset_split
    return list(train), list(loader(eval_dataset, split=split, dataset_config=config.dataset_config))


def resolve_resume(resume_from_checkpoint: str | None) -> str | bool | None:
    """``--resume_from_checkpoint true`` (or ``last``, ``latest``) means the newest complete checkpoint in
    output_dir, or a fresh start when there is none (resolved by ``TetherTrainerMixin.train``)."""
    if resume_from_checkpoint is None or resume_from_checkpoint == "":
        return None
    if str(resume_from_checkpoint).lower() in ("true", "last", "latest"):
        return True
    return str(resume_from_checkpoint)


def check_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to train into a non-empty folder unless asked to (the old model would be replaced)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output_dir {output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (overwrite or resuming):
        raise ConfigError(
            f"--output_dir {output_dir}: exists and is not empty; pass --overwrite_output_dir true "
            "to replace it or --resume_from_checkpoint to continue a run"
        )


def count_message(n_bad: int, n_total: int, what: str) -> str:
    share = 100.0 * n_bad / max(1, n_total)
    return f"{n_bad} of {n_total} {what} ({share:.1f}%)"


def truncation_rule(config) -> Truncation:
    """The stage's ``--truncation`` / ``--max_length`` / ``--max_prompt_length`` / ``--min_prompt_length``."""
    return Truncation(config.truncation, config.max_length, config.max_prompt_length, config.min_prompt_length)


def report_truncation(
    stage: str, rule: Truncation, n_total: int, n_dropped: int, n_prompt_cut: int, unit: str, required: bool = True
) -> None:
    """Log how many examples lost prompt tokens or were dropped by ``rule``; when it dropped all of
    them (and ``required``: the training data), stop with an error naming the options to change."""
    if n_total and n_dropped == n_total and required:
        raise ConfigError(
            f"tether {stage}: all {n_total} {unit} are longer than {rule.describe()} allows without cutting a "
            "response; raise --max_length (or --max_prompt_length, or lower --min_prompt_length)"
        )
    if n_prompt_cut:
        logger.warning(
            "tether %s: %s had their prompt cut from the left (the end of the prompt is kept) to fit %s",
            stage,
            count_message(n_prompt_cut, n_total, unit),
            rule.describe(),
        )
    if n_dropped:
        logger.warning(
            "tether %s: %s were dropped: they do not fit %s without cutting a response (and its stop token)",
            stage,
            count_message(n_dropped, n_total, unit),
            rule.describe(),
        )


def summarise_lengths(lengths: Sequence[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)
    return {
        "count": len(ordered),
        "min": ordered[0],
        "median": ordered[len(ordered) // 2],
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


# ---------------------------------------------------------------------------------------------
# the Trainer behaviour every Trainer-based stage shares (sft, rm, dpo)
# ---------------------------------------------------------------------------------------------
KEEP_CHECKPOINTS_HELP = (
    "Keep the checkpoint-N/ folders when the run finishes; by default they are deleted once the final model is saved."
)
PADDING_FREE_HELP = (
    "Pack the pairs of each batch into as few rows as fit the longest one, kept apart by a block-diagonal "
    "attention mask with per-pair position ids (TRL's name). The batch keeps its pairs, so the loss is the same; "
    "checked against plain rows on the first batch, with a fallback."
)
BAD_BATCHES_FILE = "bad_batches.jsonl"
DEFAULT_MAX_BAD_STEPS = 5
MAX_BAD_STEPS_HELP = (
    "Skip (and log to bad_batches.jsonl) every optimizer step whose loss or gradients are not "
    "finite; stop the run after this many such steps in a row (the last good checkpoint stays)."
)


def _finite_or_text(value: Any) -> Any:
    """JSON has no NaN or infinity: such floats are written as the strings "nan", "inf", "-inf"."""
    if isinstance(value, list):
        return [_finite_or_text(v) for v in value]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    return value


def _jsonable_batch(inputs: dict[str, Any], tokenizer) -> dict[str, Any]:
    """The loggable part of a collated batch: tensors of at most two dimensions as lists (4-D
    attention masks are left out), and the rows decoded as text when a tokenizer is at hand."""
    import torch

    row: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() <= 2:
            row[key] = _finite_or_text(value.detach().cpu().tolist())
    ids = inputs.get("input_ids")
    decodable = tokenizer is not None and hasattr(tokenizer, "batch_decode")
    if decodable and isinstance(ids, torch.Tensor) and ids.dim() == 2:
        row["texts"] = tokenizer.batch_decode(ids.detach().cpu(), skip_special_tokens=False)
    return row


def require_joint_processes(processes_seen: int) -> None:
    """Refuse a multi-process launch whose processes do not form one run.

    ``torch.distributed.run`` / ``accelerate launch`` on a machine without GPUs: unless the run is
    told to use the CPU (``--use_cpu true``, gloo), accelerate leaves every process on its own, and
    each would silently train alone on all the data and write the same folder.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and processes_seen == 1:
        raise ConfigError(
            f"{launched} processes were launched but they do not train together: on a machine "
            "without GPUs pass --use_cpu true (data parallel over gloo)"
        )


# ---------------------------------------------------------------------------------------------
# sharded training (FSDP; DeepSpeed ZeRO-3)
# ---------------------------------------------------------------------------------------------
def fsdp_requested() -> bool:
    """``accelerate launch`` was given an FSDP config (it sets ACCELERATE_USE_FSDP in every process).

    With ``fsdp_cpu_ram_efficient_loading: true`` transformers' ``from_pretrained`` then leaves the
    weights of every process but the main one on the meta device; accelerate's ``prepare`` sends
    the main process's weights to the others. Until then no model may be moved with ``.to()`` or run
    on processes > 0 (see :func:`on_main_process`).
    """
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def on_main_process(fn: Callable[[], Any], *models) -> Any:
    """``fn()`` run by the main process only, its (picklable) result sent to every process.

    For what a stage computes with ``models`` before the Trainer prepares them (which fast paths give
    the plain forward's numbers, the reference log-probs): under FSDP only the main process holds
    weights then, under ZeRO-3 each process a partition (gathered here, see :func:`gathered_weights`),
    and every process must make the same choice. An exception on the main process is raised on every
    process (none is left waiting in the broadcast).
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    if state.num_processes == 1:
        return fn()
    box: list[Any] = [None]
    with gathered_weights(*models):
        if state.is_main_process:
            try:
                box = [("ok", fn())]
            except Exception as exc:  # re-raised below, after every process has it
                box = [("error", f"{type(exc).__name__}: {exc}")]
    broadcast_object_list(box)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"on the main process: {value}")
    return value


def weights_are_sharded(trainer) -> bool:
    """Each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        return trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def complete_model(trainer):
    """The trained model with all its weights, on the main process; ``None`` on the others.

    EVERY process must call this (not only the main one): with sharded weights the full state dict
    is gathered with accelerate's ``get_state_dict`` (FSDP2: ``get_model_state_dict(full_state_dict=True,
    cpu_offload=True)``; ZeRO-3: the consolidated 16-bit state dict), a collective. The main process
    then loads it into an unsharded copy of the model built on the meta device (PEFT adapters
    included, so ``merge_and_unload`` and ``save_pretrained`` work as on one process).
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not weights_are_sharded(trainer):
        return model if trainer.is_world_process_zero() else None
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return None
    return unsharded_copy(model, state_dict)


def _plain_class(module) -> type:
    """The module's own class (FSDP2 swaps a sharded module's class for an ``FSDP<Name>`` subclass)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2: nothing was swapped
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


@contextlib.contextmanager
def _plain_construction():
    """Models built inside are ordinary ones: under ZeRO-3 transformers otherwise builds every model
    inside ``deepspeed.zero.Init``, which partitions it with collectives the other processes never join."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    held = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if held is not None:
            hf_deepspeed.set_hf_deepspeed_config(held)


def unsharded_copy(model, state_dict: dict):
    """A plain copy of ``model`` (a transformers model, possibly inside PEFT) holding ``state_dict``."""
    import copy

    import torch

    from tether.models.wrappers import strip_peft

    base = strip_peft(model)
    with _plain_construction(), torch.device("meta"):
        plain = _plain_class(base)(copy.deepcopy(base.config))
        if hasattr(model, "peft_config"):
            from peft import get_peft_model

            plain = get_peft_model(plain, copy.deepcopy(model.peft_config[model.active_adapter]))
    plain.load_state_dict(state_dict, assign=True, strict=True)
    # buffers outside the state dict (rotary inverse frequencies) are whole on every process
    plain_buffers = dict(plain.named_buffers())
    for name, buffer in model.named_buffers():
        if name not in state_dict and name in plain_buffers:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, buffer.detach().to("cpu").clone(), persistent=False)
    plain_base = strip_peft(plain)
    plain_base.tie_weights()
    if getattr(base, "generation_config", None) is not None:
        plain_base.generation_config = copy.deepcopy(base.generation_config)
    return plain.eval()


class PromptGroupedSampler(torch.utils.data.Sampler):
    """A random order of preference pairs in which the pairs of one prompt follow each other.

    The prompts are shuffled, then each prompt's pairs (shuffled among themselves); a new order every
    epoch (``set_epoch``, which accelerate calls), the same on every process. A batch then holds a
    prompt's comparisons together, so the shared-prompt layout runs the prompt and each of its responses
    once for all of them, and the comparisons of one prompt enter one update rather than being seen
    over several (InstructGPT's reason for this batching).
    """

    def __init__(self, keys: Sequence[Any], seed: int):
        by_key: dict[Any, list[int]] = {}
        for i, k in enumerate(keys):
            by_key.setdefault(k, []).append(i)
        self.groups = list(by_key.values())
        self.seed, self.epoch, self.size = seed, 0, len(keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        rng = torch.Generator().manual_seed(self.seed + self.epoch)
        for g in torch.randperm(len(self.groups), generator=rng).tolist():
            group = self.groups[g]
            yield from (group[i] for i in torch.randperm(len(group), generator=rng).tolist())


class PromptGroupedOrder:
    """Put before ``transformers.Trainer`` in the reward-model and DPO trainers: when some prompt has
    more than one pair, the default random order becomes ``PromptGroupedSampler``'s (seeded with
    ``--data_seed``, else ``--seed``); data with one pair per prompt keep the Trainer's own order."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "random" or dataset is None:
            return super()._get_train_sampler(train_dataset)
        keys = [tuple(item.prompt) for item in dataset]
        if len(set(keys)) == len(keys):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return PromptGroupedSampler(keys, seed)


class TetherTrainerMixin:
    """Put before ``transformers.Trainer`` in a stage's trainer class (``class X(TetherTrainerMixin, Trainer)``).

    Atomic checkpoints
        Trainer writes ``checkpoint-N`` file by file. Here it writes into ``.tmp-checkpoint-N/``
        and the finished folder is renamed ``checkpoint-N`` (all processes' files are in it
        first), so a crash at any moment leaves either a complete checkpoint or none. Only the
        newest ``--save_total_limit`` complete checkpoints are kept.
    Resume
        ``train(resume_from_checkpoint=True)`` (``--resume_from_checkpoint latest``) continues
        from the newest *complete* checkpoint, or starts from the beginning when there is none;
        ``metrics.jsonl`` rows written after that checkpoint by the crashed run are dropped.
    Non-finite steps
        An optimizer step whose loss (any micro-batch, any process) or gradients are not finite
        is skipped: the weights and the optimizer state stay as they were (the step counter and
        the learning-rate schedule move on). The micro-batches are logged to
        ``bad_batches.jsonl`` (``bad_batches.rankR.jsonl`` on process R > 0), no checkpoint is
        saved at that step, and after ``--max_bad_steps`` skipped steps in a row the run stops
        with ``NonFiniteError``. Under DeepSpeed the optimizer steps inside ``backward``, and
        under fp16 loss scaling the scaler decides: there the steps are counted, logged and the
        run stopped, but the update is the engine's or the scaler's business.
    """

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            require_joint_processes(training_args.world_size)
        max_bad_steps = int(getattr(training_args, "max_bad_steps", DEFAULT_MAX_BAD_STEPS))
        if max_bad_steps < 1:
            raise ConfigError(f"--max_bad_steps {max_bad_steps}: must be at least 1")
        super().__init__(*args, **kwargs)
        self.max_bad_steps = max_bad_steps
        self.bad_steps_total = 0
        self.bad_steps_in_a_row = 0
        self._micro_batches: list[tuple[dict[str, Any], Any]] = []  # (loggable inputs, detached loss) of this step
        self._skipping_step = False
        self._last_step_skipped = False
        self._checkpoint_staging: Path | None = None
        self._replaced_step: Any = _NOT_SET
        self.add_callback(_NonFiniteStepCallback(self))

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if fsdp_requested() and not self.is_fsdp_enabled:
            # e.g. configs/accelerate/fsdp.yaml with use_cpu: true. transformers has already left the
            # weights of processes > 0 on the meta device (fsdp_cpu_ram_efficient_loading), and the
            # plain data-parallel run accelerate would do instead is not what was asked for.
            raise ConfigError(
                f"the accelerate config asks for FSDP (distributed_type: FSDP) but accelerate runs it as "
                f"{self.accelerator.distributed_type.value}: accelerate shards models with FSDP on GPUs only "
                "(use_cpu: true / --use_cpu true turn it into plain data parallel). On CPU processes use "
                "configs/accelerate/multi_cpu.yaml; for FSDP run on GPUs with use_cpu: false"
            )

    # ---- resume ---------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        output_dir = Path(self.args.output_dir)
        resume_from_checkpoint = resume_from_checkpoint or None  # False and "" mean a fresh start
        resuming = resume_from_checkpoint is not None
        if resume_from_checkpoint is True or (
            isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in LATEST
        ):
            found = latest_checkpoint(output_dir)
            if found is None:
                logger.info("no complete checkpoint in %s yet; starting from the beginning", output_dir)
            resume_from_checkpoint = str(found) if found is not None else None
        elif resume_from_checkpoint and not (Path(resume_from_checkpoint) / TRAINER_STATE_FILE).is_file():
            raise ConfigError(
                f"--resume_from_checkpoint {resume_from_checkpoint}: not a complete checkpoint "
                f"(no {TRAINER_STATE_FILE})"
            )
        if self.is_world_process_zero() and output_dir.is_dir():
            remove_stale_staging(output_dir)  # saves that a crash interrupted
            if resuming:  # the crashed run's rows after the checkpoint would repeat steps
                step = 0
                if resume_from_checkpoint is not None:
                    state = json.loads((Path(resume_from_checkpoint) / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
                    step = int(state.get("global_step", 0))
                truncate_metrics(output_dir, step)
        self.accelerator.wait_for_everyone()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- atomic checkpoints ------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        if self._checkpoint_staging is not None:
            return str(self._checkpoint_staging)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        staging, final = run_dir / f".tmp-{name}", run_dir / name
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)  # everything into staging/checkpoint-N
        finally:
            self._checkpoint_staging = None
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staging / name:
            self.state.best_model_checkpoint = str(final)
            if self.args.should_save:
                self.state.save_to_json(str(staging / name / TRAINER_STATE_FILE))
        self.accelerator.wait_for_everyone()  # every process's files (rng states, shards) are written
        if self.args.should_save:
            self._publish_checkpoint(staging, name, final)
        self.accelerator.wait_for_everyone()
        if not self.args.should_save and self.accelerator.is_local_main_process and (staging / name).is_dir():
            self._publish_checkpoint(staging, name, final)  # a node that does not share the main one's disk
        self.accelerator.wait_for_everyone()

    def _publish_checkpoint(self, staging: Path, name: str, final: Path) -> None:
        replace_folder(staging / name, final)  # replaces the same step saved before (a resumed run)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(final.parent, self.args.save_total_limit, self.state.best_model_checkpoint)

    # ---- non-finite losses ------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # kept until the optimizer step (token ids are small; 4-D masks are not kept)
        small = {k: v for k, v in inputs.items() if not hasattr(v, "dim") or v.dim() <= 2}
        self._micro_batches.append((small, loss.detach()))
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.bad_steps_total:
            logs["bad_steps"] = self.bad_steps_total
        super().log(logs, *args, **kwargs)

    def _check_step(self, model) -> None:
        """Before the optimizer step: decide (on all processes alike) whether this step is skipped."""
        import torch

        micro, self._micro_batches = self._micro_batches, []
        if not micro:
            return
        losses = torch.stack([loss.float().reshape(()) for _, loss in micro])
        bad_loss = ~torch.isfinite(losses)
        local_bad_grads = torch.tensor(False, device=losses.device)
        if not bad_loss.any():
            local_bad_grads = ~_gradients_finite(model)
        flag = (bad_loss.any() | local_bad_grads).float().to(self.args.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if float(flag) == 0.0:
            return
        step = self.state.global_step + 1
        rows = []
        for index, ((inputs, loss), bad) in enumerate(zip(micro, bad_loss.tolist())):
            if bad or bool(local_bad_grads):
                rows.append(
                    {
                        "step": step,
                        "micro_batch": index,
                        "reason": "non-finite loss" if bad else "non-finite gradients",
                        "loss": str(float(loss.float())),
                        **_jsonable_batch(inputs, self.processing_class),
                    }
                )
        if rows:
            from tether.tracking import append_jsonl

            index = self.accelerator.process_index
            name = BAD_BATCHES_FILE if index == 0 else BAD_BATCHES_FILE.replace(".jsonl", f".rank{index}.jsonl")
            for row in rows:
                append_jsonl(Path(self.args.output_dir) / name, row)
        self._skipping_step = True
        if self.accelerator.scaler is None and not self.is_deepspeed_enabled:
            # this one step only (see _after_optimizer_step); an instance-level step (the LR scheduler's
            # call-tracking wrapper) is put back afterwards
            self._replaced_step = vars(self.optimizer).get("step", _NOT_SET)
            self.optimizer.step = _skipped_optimizer_step

    def _after_optimizer_step(self) -> None:
        if vars(self.optimizer).get("step") is _skipped_optimizer_step:
            if self._replaced_step is _NOT_SET:
                del self.optimizer.step
            else:
                self.optimizer.step = self._replaced_step
            self._replaced_step = _NOT_SET

    def _end_step(self, control) -> None:
        skipped, self._skipping_step = self._skipping_step, False
        self._last_step_skipped = skipped
        if not skipped:
            self.bad_steps_in_a_row = 0
            return
        self.bad_steps_total += 1
        self.bad_steps_in_a_row += 1
        control.should_save = False  # never checkpoint a skipped step
        where = Path(self.args.output_dir) / BAD_BATCHES_FILE
        if self.is_world_process_zero():
            logger.warning(
                "step %d: skipped (non-finite loss or gradients); %d in a row (limit --max_bad_steps %d); "
                "the batch is logged in %s",
                self.state.global_step,
                self.bad_steps_in_a_row,
                self.max_bad_steps,
                where,
            )
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            last_good = latest_checkpoint(self.args.output_dir)
            message = (
                f"stopped at step {self.state.global_step} after {self.bad_steps_in_a_row} consecutive steps "
                f"with non-finite losses or gradients (--max_bad_steps {self.max_bad_steps}); the batches are "
                f"in {where}; last good checkpoint: {last_good if last_good else 'none'}"
            )
            logger.error(message)
            raise NonFiniteError(message)


_NOT_SET = object()


def _skipped_optimizer_step(closure=None):
    """Stands in for the optimizer's step on a skipped step: parameters and optimizer state stay."""
    return None


def _gradients_finite(model):
    """True (a 0-d bool tensor) when every gradient held by this process is finite (DTensor shards: the local part)."""
    import torch

    grads = [getattr(p.grad, "_local_tensor", p.grad) for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


class _NonFiniteStepCallback(TrainerCallback):
    """Hooks of ``TetherTrainerMixin`` into the Trainer loop (added after Trainer's own flow callback,
    so its ``should_save = False`` on a skipped step has the last word)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_step(self.trainer.model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_step(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer._last_step_skipped:
            control.should_save = False
