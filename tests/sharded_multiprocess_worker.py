"""Run by tests/test_fsdp.py: the reward-model and DPO runs of ``stage_multiprocess_worker`` plus SFT,
LoRA DPO and an interrupted-and-resumed reward model, on 1 process (in the test's interpreter) or on
2 CPU processes with sharded weights:

* ``fsdp``: ``accelerate launch --config_file <copy of configs/accelerate/fsdp.yaml>`` (FSDP2, full
  sharding, ``fsdp_cpu_ram_efficient_loading: true``, SHARDED_STATE_DICT checkpoints); ``fsdp_on_cpu``
  lets accelerate's FSDP code run on CPU processes (see there);
* ``zero2``, ``zero3``: a copy of ``configs/accelerate/deepspeed_zero{2,3}.yaml``; accelerate runs DeepSpeed
  on CPU processes when the process group's backend is named (``--ddp_backend gloo``), with
  ``use_cpu: false``.

usage: accelerate launch --config_file CONFIG.yaml sharded_multiprocess_worker.py OUT MODEL DATA_DIR PER_DEVICE_BATCH \
           [fsdp|zero2|zero3]
"""

from __future__ import annotations

import sys
from pathlib import Path

import stage_multiprocess_worker
import torch
from stage_multiprocess_worker import _write_batches, common_flags, recorded_batches, run_dpo, run_rm


def run_sft(out: Path, model: str, data: Path, per_device: int) -> None:
    from tether.stages.sft import SFTConfig, SFTTrainer, run_sft

    config = SFTConfig(
        dataset=str(data / "demos.jsonl"),
        eval_split_ratio=0.0,  # all 32 demonstrations train: 4 whole global batches
        learning_rate=3e-3,
        max_length=64,
        **common_flags(out, model, per_device),
    )
    with recorded_batches(SFTTrainer, []) as log:
        run_sft(config)
    _write_batches(out, log)


def run_dpo_lora(out: Path, model: str, data: Path, per_device: int) -> None:
    """LoRA: the reference is the policy with its adapters disabled; the adapters are merged on saving."""
    from transformers import set_seed

    from tether.stages.dpo import DPOConfig, run_dpo

    set_seed(0)  # the LoRA A matrices are random: the same draw in both layouts, whatever ran before
    config = DPOConfig(
        dataset=str(data / "pairs.jsonl"),
        eval_dataset=str(data / "held_out_dpo.jsonl"),
        learning_rate=2e-2,
        beta=0.1,
        max_length=64,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        merge_lora=True,
        **common_flags(out, model, per_device),
    )
    run_dpo(config)


def run_dpo_precomputed(out: Path, model: str, data: Path, per_device: int) -> None:
    """Full fine-tuning with the reference log-probs computed once before training (on the main process)."""
    from tether.stages.dpo import DPOConfig, run_dpo

    config = DPOConfig(
        dataset=str(data / "pairs.jsonl"),
        eval_dataset=str(data / "held_out_dpo.jsonl"),
        learning_rate=5e-3,
        beta=0.1,
        max_length=64,
        precompute_ref_log_probs=True,
        **common_flags(out, model, per_device),
    )
    run_dpo(config)


def run_rm_resumed(out: Path, model: str, data: Path, per_device: int) -> None:
    """``straight``: 4 steps with a checkpoint every 2 kept; ``resumed``: steps 3-4 again from checkpoint-2."""
    from tether.stages.reward import RewardConfig, run_reward

    def config(folder: Path, **extra) -> RewardConfig:
        flags = common_flags(folder, model, per_device) | dict(save_strategy="steps", save_steps=2)
        return RewardConfig(
            dataset=str(data / "pairs.jsonl"),
            eval_dataset=str(data / "held_out_rm.jsonl"),  # all 32 pairs train: 4 whole global batches
            learning_rate=3e-3,
            reward_stats_max_pairs=8,
            max_length=64,
            keep_checkpoints=True,
            **flags,
            **extra,
        )

    run_reward(config(out / "straight"))
    run_reward(config(out / "resumed", resume_from_checkpoint=str(out / "straight" / "checkpoint-2")))


def main(out: str, model: str, data: str, per_device: str, sharding: str = "none") -> None:
    torch.set_num_threads(1)
    if sharding == "fsdp":
        import fsdp_on_cpu  # noqa: F401  (before any Accelerator exists)
    elif sharding in ("zero2", "zero3"):  # DeepSpeed's own process group over gloo; use_cpu turns DeepSpeed off
        stage_multiprocess_worker.LAUNCH_FLAGS.update(use_cpu=False, ddp_backend="gloo")
    out_dir, per, data_dir = Path(out), int(per_device), Path(data)
    run_sft(out_dir / "sft", model, data_dir, per)
    run_rm(out_dir / "rm", model, data_dir, per)
    if sharding != "zero3":
        run_dpo(out_dir / "dpo", model, data_dir, per)
    else:  # a live reference model under ZeRO-3 is refused, before anything is loaded or written
        from tether.config import ConfigError

        try:
            run_dpo(out_dir / "dpo", model, data_dir, per)
        except ConfigError as exc:
            (out_dir / "dpo.refused.txt").write_text(str(exc))
    run_dpo_precomputed(out_dir / "dpo-precomputed", model, data_dir, per)
    run_dpo_lora(out_dir / "dpo-lora", model, data_dir, per)
    run_rm_resumed(out_dir / "rm-resume", model, data_dir, per)


if __name__ == "__main__":
    main(*sys.argv[1:6])
