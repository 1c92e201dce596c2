"""Run by tests/test_fsdp.py: PPO on 1 process (in the test's interpreter) or on 2 CPU processes under
FSDP2 (``accelerate launch --config_file <copy of configs/accelerate/fsdp.yaml>``; ``fsdp_on_cpu`` lets
accelerate's FSDP code run on CPU processes, see there), for three critics:

* ``full``: full fine-tuning, the critic a separate copy of the reward model, a separate frozen reference;
* ``lora``: LoRA policy (reference = adapters disabled), LoRA critic on the reward model (which scores
  with its adapters disabled);
* ``value_head``: full fine-tuning, a value head on the policy's trunk.

For each, into OUT/<mode>/:

* ``fixed/``: one PPO update (``PPOTrainer.learn``) from one fixed rollout batch (fixed prompts and
  responses, as tests/ppo_multiprocess_worker.py: sampling plays no part, each process takes its share
  of the 8 rows), then the final save (``RunFolder.save_final``: the full state gathered by accelerate);
  ``learn.json`` holds the metrics. The reward normalisation before it comes from 12 fresh samples
  (``lora``: from the fixed batch as a ``--reward_norm_responses`` file), so the update also shows the
  statistics equal;
* ``straight/``: the whole loop (sampling on the sharded policy, scoring, update) for 2 iterations with
  a checkpoint after each; ``resumed/``: a fresh folder holding only ``checkpoint-1`` of ``straight/``
  (what a run killed after that checkpoint leaves), resumed with ``--resume_from_checkpoint latest``.

First, a trainer asked for a batch the processes do not divide: each process writes the message it
stopped with to ``OUT/refused.rank<R>.txt``.

usage: accelerate launch --config_file CONFIG.yaml ppo_sharded_worker.py OUT POLICY RM [fsdp]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from ppo_multiprocess_worker import PROMPTS, RESPONSES

MODES = ("full", "lora", "value_head")


def config(out: Path, policy: str, rm: str, mode: str, **overrides):
    from tether.ppo import PPOConfig

    settings = dict(
        output_dir=str(out),
        model_name_or_path=policy,
        reward_model_path=rm,
        use_cpu=True,
        batch_size=8,
        mini_batch_size=4,
        per_device_train_batch_size=2,
        ppo_epochs=2,
        learning_rate=1e-2,
        max_grad_norm=0.5,
        max_new_tokens=6,
        disable_tqdm=True,
        logging_steps=1,
        report_to="none",
        # the starting-policy samples run on the sharded policy too: 12 = a chunk of 8 on one process and 4
        # on the other, which scores them as 8 in two forwards (both processes run as many)
        reward_norm_samples=12,
        forward_batch_size=4,
        target_kl=1.0,
        init_kl_coef=0.2,
        **({"use_peft": True, "lora_r": 4, "lora_alpha": 8} if mode == "lora" else {}),
        **({"value_head_on_policy": True} if mode == "value_head" else {}),
    )
    return PPOConfig(**(settings | overrides))


def fixed_update(out: Path, policy: str, rm: str, mode: str) -> None:
    """One update from the fixed batch, then the final models."""
    import dataclasses

    from tether.generation import GeneratedBatch, left_pad
    from tether.ppo import PPOTrainer
    from tether.ppo.rollout import score_responses

    # the minibatch is the whole batch: 8 rows on 1 process, 4 + 4 on 2 (each process shuffles only its own rows)
    settings = dict(num_iterations=1, save_steps=0, mini_batch_size=8)
    if mode == "lora":
        # the normalisation from a file of responses: the critic's first forward is the reward model's,
        # with its adapters disabled (PEFT's requires_grad switch then must reach FSDP2's shards)
        settings["reward_norm_responses"] = str(responses_file(out.parent))
    trainer = PPOTrainer(config(out, policy, rm, mode, **settings), PROMPTS)
    tok, acc = trainer.tokenizer, trainer.accelerator
    local = trainer.geometry.local_batch
    share = slice(trainer.rank * local, (trainer.rank + 1) * local)
    q, qm = left_pad([tok(p)["input_ids"] for p in PROMPTS[share]], tok.pad_token_id)
    responses = [tok(r)["input_ids"] for r in RESPONSES[share]]
    width = max(map(len, responses))
    generated = GeneratedBatch(
        responses=torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in responses]),
        lengths=torch.tensor([len(r) for r in responses]),
        stopped=torch.tensor([r[-1] == tok.eos_token_id for r in responses]),
    )
    settings = dataclasses.replace(trainer.rollout_settings, missing_stop_penalty=-1.0)
    rollout = score_responses(trainer.models, q, qm, generated, settings, prompts=PROMPTS[share])
    metrics = trainer.learn(rollout)
    trainer.folder.save_final(trainer.models)
    if acc.is_main_process:
        (out / "learn.json").write_text(json.dumps({"world": trainer.world, "metrics": metrics}))


def responses_file(folder: Path) -> Path:
    """The fixed batch as a ``--reward_norm_responses`` file (each process writes its own copy)."""
    from accelerate import PartialState

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"norm_responses.rank{PartialState().process_index}.jsonl"
    rows = [
        {"prompt": p, "response": r.removesuffix(" <eos>"), "stopped": r.endswith("<eos>")}
        for p, r in zip(PROMPTS, RESPONSES)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def straight_and_resumed(out: Path, policy: str, rm: str, mode: str) -> None:
    from accelerate import PartialState

    from tether.ppo import PPOTrainer

    loop = dict(num_iterations=2, save_steps=1, keep_checkpoints=True, seed=7)
    PPOTrainer(config(out / "straight", policy, rm, mode, **loop), PROMPTS).train()
    state = PartialState()
    if state.is_main_process:  # a run killed after its first checkpoint
        shutil.copytree(out / "straight" / "checkpoint-1", out / "resumed" / "checkpoint-1")
    state.wait_for_everyone()
    resumed = config(out / "resumed", policy, rm, mode, resume_from_checkpoint="latest", **loop)
    PPOTrainer(resumed, PROMPTS).train()


def refused(out: Path, policy: str, rm: str) -> None:
    """A batch the processes do not divide: every process stops with the message before any collective
    (the runs after it would hang if one had gone on)."""
    from accelerate import PartialState

    from tether.config import ConfigError
    from tether.ppo import PPOTrainer

    try:
        PPOTrainer(config(out / "refused", policy, rm, "full", batch_size=7, mini_batch_size=7), PROMPTS)
    except ConfigError as exc:
        (out / f"refused.rank{PartialState().process_index}.txt").write_text(str(exc))


def main(out: str, policy: str, rm: str) -> None:
    torch.set_num_threads(1)
    Path(out).mkdir(parents=True, exist_ok=True)
    refused(Path(out), policy, rm)
    for mode in MODES:
        fixed_update(Path(out) / mode / "fixed", policy, rm, mode)
        straight_and_resumed(Path(out) / mode, policy, rm, mode)


if __name__ == "__main__":
    if sys.argv[4:5] == ["fsdp"]:
        import fsdp_on_cpu  # noqa: F401  (before any Accelerator exists)
    main(*sys.argv[1:4])
