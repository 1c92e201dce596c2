"""Run by tests/test_scale_out.py: the same tiny reward-model and DPO runs on 1 process (in the test's
own interpreter) or on 2 CPU processes (gloo) under ``accelerate launch`` / ``torch.distributed.run``.

Each stage runs through its command function (``run_reward``, ``run_dpo``: data from jsonl files,
``transformers.Trainer`` with DDP when launched on several processes). The training micro-batches
each process sees are recorded (a wrapper around the stage trainer's ``training_step`` that calls
the original) and written to ``OUT/STAGE/batches.rankR.json``, so the test can check that the global
batch of every step is the same set of pairs in both layouts.

The reward model also saves a checkpoint every 2 steps (the atomic save with every process's files).

usage: accelerate launch --config_file configs/accelerate/multi_cpu.yaml stage_multiprocess_worker.py \
           OUT MODEL DATA_DIR PER_DEVICE_BATCH
"""

from __future__ import annotations

import collections
import contextlib
import json
import sys
from pathlib import Path

import torch

GLOBAL_BATCH = 8
#: what a launch layout needs on top of common_flags (sharded_multiprocess_worker: DeepSpeed's backend)
LAUNCH_FLAGS: dict = {}


def _example_tokens(feature) -> list[int]:
    """One training example's token ids, whatever rows the collator lays it out in: a preference pair's
    prompt, chosen and rejected tokens (−1 between them; pairs that share a prompt share rows), else
    the example's ``input_ids``."""
    if hasattr(feature, "chosen"):
        return [*feature.prompt, -1, *feature.chosen, -1, *feature.rejected]
    return list(feature["input_ids"])


@contextlib.contextmanager
def recorded_batches(trainer_class, log: list):
    """Append each training micro-batch's examples (``_example_tokens``) to ``log``, in step order. The
    collator's batches are queued because accelerate's loader fetches one batch ahead of the step."""
    get_loader, step = trainer_class.get_train_dataloader, trainer_class.training_step

    def get_train_dataloader(self):
        collate, self._recorded = self.data_collator, collections.deque()

        def recording(features):
            self._recorded.append([_example_tokens(f) for f in features])
            return collate(features)

        self.data_collator = recording
        try:
            return get_loader(self)
        finally:
            self.data_collator = collate

    def training_step(self, model, inputs, num_items_in_batch=None):
        log.append({"step": self.state.global_step + 1, "rows": self._recorded.popleft()})
        return step(self, model, inputs, num_items_in_batch)

    trainer_class.get_train_dataloader, trainer_class.training_step = get_train_dataloader, training_step
    try:
        yield log
    finally:
        trainer_class.get_train_dataloader, trainer_class.training_step = get_loader, step


def common_flags(out: Path, model: str, per_device: int) -> dict:
    return (
        dict(
            output_dir=str(out),
            model_name_or_path=model,
            per_device_train_batch_size=per_device,
            per_device_eval_batch_size=4,
            num_train_epochs=1,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=0,
            disable_tqdm=True,
            use_cpu=True,
            dataloader_drop_last=False,
        )
        | LAUNCH_FLAGS
    )


def run_rm(out: Path, model: str, data: Path, per_device: int) -> None:
    from tether.stages.reward import RewardConfig, RewardTrainer, run_reward

    config = RewardConfig(
        dataset=str(data / "pairs.jsonl"),
        eval_dataset=str(data / "held_out_rm.jsonl"),
        learning_rate=3e-3,
        reward_stats_max_pairs=16,
        max_length=64,
        keep_checkpoints=True,  # the test inspects the last checkpoint
        **common_flags(out, model, per_device) | dict(save_strategy="steps", save_steps=2, save_total_limit=1),
    )
    with recorded_batches(RewardTrainer, []) as log:
        run_reward(config)
    _write_batches(out, log)


def run_dpo(out: Path, model: str, data: Path, per_device: int) -> None:
    from tether.stages.dpo import DPOConfig, _DPOTrainer
    from tether.stages.dpo import run_dpo as run

    config = DPOConfig(
        dataset=str(data / "pairs.jsonl"),
        eval_dataset=str(data / "held_out_dpo.jsonl"),
        learning_rate=5e-3,
        beta=0.1,
        max_length=64,
        **common_flags(out, model, per_device),
    )
    with recorded_batches(_DPOTrainer, []) as log:
        run(config)
    _write_batches(out, log)


def _write_batches(out: Path, log: list) -> None:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    (out / f"batches.rank{rank}.json").write_text(json.dumps(log))


def main(out: str, model: str, data: str, per_device: str) -> None:
    torch.set_num_threads(1)
    out_dir, per = Path(out), int(per_device)
    run_rm(out_dir / "rm", model, Path(data), per)
    run_dpo(out_dir / "dpo", model, Path(data), per)


if __name__ == "__main__":
    main(*sys.argv[1:5])
