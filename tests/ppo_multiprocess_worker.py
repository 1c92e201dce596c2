"""Run by tests/test_ppo_multiprocess.py under ``torch.distributed.run`` (1 or 2 CPU processes, gloo).

Every process builds the same trainer, takes its share of one fixed rollout batch (fixed prompts
and responses, so sampling plays no part), runs one PPO update with ``PPOTrainer.learn`` and, on
rank 0, writes the metrics and the trained policy weights. It also samples one response per rank
to the same prompt, to show that ranks sample with different seeds.

Then the whole loop (``train``: rollout, update, metrics, checkpoint, outputs) runs once across the processes.

usage: python -m torch.distributed.run --nproc_per_node N ppo_multiprocess_worker.py OUT POLICY RM [lora|grpo]
(``lora``: LoRA policy, reference = adapters off, critic = LoRA on the reward model; ``grpo``: no critic,
groups of 2 responses, batch-scaled advantages, the KL in the loss and a reward function with a column)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PROMPTS = ["a b c", "d e", "yes no", "x y z w", "good a", "m n o p q", "k", "s t u"]
# three responses never stop (they get the missing-stop penalty); the others end with the stop token
RESPONSES = ["a good <eos>", "b c d e f", "good good <eos>", "x <eos>", "no yes no yes", "m <eos>", "good", "t u <eos>"]
BONUS = [0.5, 0.0, 1.0, 2.0, 0.0, 1.5, None, 3.0]  # a dataset column (None: the function does not apply)


def length_bonus(prompts, completions, bonus, **kwargs):
    """A --reward_funcs function for the grpo mode: a column value plus the completion's length / 4."""
    return [None if b is None else b + len(c) / 4 for c, b in zip(completions, bonus)]


def main(out: str, policy: str, rm: str, mode: str = "full") -> None:
    torch.set_num_threads(1)
    import dataclasses

    from tether.generation import GeneratedBatch, generate_batch, left_pad
    from tether.ppo import PPOConfig, PPOTrainer
    from tether.ppo.rollout import score_responses

    config = PPOConfig(
        output_dir=str(Path(out) / "run"),
        model_name_or_path=policy,
        reward_model_path=rm,
        use_cpu=True,
        batch_size=8,
        mini_batch_size=8,
        per_device_train_batch_size=2,
        ppo_epochs=2,
        learning_rate=1e-2,
        num_iterations=1,
        max_new_tokens=6,
        save_steps=0,
        disable_tqdm=True,
        logging_steps=1000,
        report_to="none",
        keep_checkpoints=True,
        reward_norm_samples=16,  # chunks of --batch_size: the same statistics on 1 and 2 processes
        target_kl=1.0,
        init_kl_coef=0.2,
        **({"use_peft": True, "lora_r": 4, "lora_alpha": 8} if mode == "lora" else {}),
        **(
            {
                "advantage_estimator": "grpo",
                "num_generations": 2,
                "scale_rewards": "batch",
                "kl_in_loss": True,
                "reward_funcs": [f"{Path(__file__).resolve()}:length_bonus"],
            }
            if mode == "grpo"
            else {}
        ),
    )
    from tether.data.records import PromptRecord

    records = [PromptRecord(p, columns={"bonus": b}) for p, b in zip(PROMPTS, BONUS)]  # the rows' other column
    trainer = PPOTrainer(config, records if mode == "grpo" else PROMPTS)
    tok, acc = trainer.tokenizer, trainer.accelerator
    local_batch = trainer.geometry.local_batch
    share = slice(trainer.rank * local_batch, (trainer.rank + 1) * local_batch)
    q, qm = left_pad([tok(p)["input_ids"] for p in PROMPTS[share]], tok.pad_token_id)
    responses = [tok(r)["input_ids"] for r in RESPONSES[share]]
    width = max(map(len, responses))
    generated = GeneratedBatch(
        responses=torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in responses]),
        lengths=torch.tensor([len(r) for r in responses]),
        stopped=torch.tensor([r[-1] == tok.eos_token_id for r in responses]),
    )
    settings = dataclasses.replace(trainer.rollout_settings, missing_stop_penalty=-1.0)
    assert settings.sampling.temperature == config.temperature
    rollout = score_responses(trainer.models, q, qm, generated, settings, prompts=PROMPTS[share])
    if mode == "grpo":
        from tether.ppo.rollout import add_programmable_rewards

        columns = {"bonus": BONUS[share]}
        add_programmable_rewards(rollout, trainer.rewards, tok, columns, trainer.processes.all_true)
    metrics = trainer.learn(rollout)
    if acc.is_main_process:
        state = trainer.models.policy_and_value.policy.state_dict()
        torch.save({k: v.detach().clone() for k, v in state.items()}, Path(out) / "policy.pt")

    # one sample per rank for the same prompt: the trainer seeded each rank differently
    same_q, same_m = left_pad([tok("a b")["input_ids"]] * 4, tok.pad_token_id)
    policy = trainer.models.policy_and_value.policy
    sample = generate_batch(policy, tok, same_q, same_m, trainer.rollout_settings.sampling)
    padded = torch.nn.functional.pad(sample.responses, (0, 6 - sample.responses.shape[1]), value=-1)
    samples = acc.gather(padded)
    # and the whole loop runs across processes: rollout, update, metrics, an atomic checkpoint, outputs
    trainer.save_checkpoint()
    trainer.train()
    if acc.is_main_process:
        (Path(out) / "result.json").write_text(
            json.dumps({"world": trainer.world, "metrics": metrics, "samples": samples.tolist()})
        )


if __name__ == "__main__":
    main(*sys.argv[1:5])
