"""Run by tests/test_ppo_grouping.py under ``torch.distributed.run`` (2 CPU processes, gloo): a GRPO run
whose reward function fails on one prompt, which only one rank draws, in the second iteration.

Each rank writes ``rank<N>.json`` with the error it stopped with (or "finished"), then exits 1 on error.

usage: python -m torch.distributed.run --nproc_per_node 2 ppo_reward_failure_worker.py OUT POLICY RM PROMPTS_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def fails_on_yes(prompts, completions, **kwargs):
    """A reward function with a bug: it has no rule for prompts with "yes"."""
    if any("yes" in p for p in prompts):
        raise KeyError("no rule for yes")
    return [float(len(c)) for c in completions]


def main(out: str, policy: str, rm: str, prompts_json: str) -> None:
    torch.set_num_threads(1)
    from tether.errors import RewardFunctionFailed
    from tether.ppo import PPOConfig, PPOTrainer

    config = PPOConfig(
        output_dir=str(Path(out) / "run"),
        model_name_or_path=policy,
        reward_model_path=rm,
        use_cpu=True,
        advantage_estimator="grpo",
        num_generations=2,
        batch_size=4,
        mini_batch_size=4,
        ppo_epochs=1,
        num_iterations=2,
        max_new_tokens=4,
        save_steps=1,
        disable_tqdm=True,
        logging_steps=1000,
        report_to="none",
        reward_funcs=[f"{Path(__file__).resolve()}:fails_on_yes"],
    )
    trainer = PPOTrainer(config, json.loads(prompts_json))
    try:
        trainer.train()
        outcome = {"error": None}
    except RewardFunctionFailed as exc:
        outcome = {"error": str(exc)}
    (Path(out) / f"rank{trainer.rank}.json").write_text(json.dumps(outcome))
    if outcome["error"]:
        sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:5])
