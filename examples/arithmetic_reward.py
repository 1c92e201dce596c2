"""Reward function of the arithmetic task (examples/arithmetic/*.jsonl, scripts/make_arithmetic_task.py):

    tether ppo --dataset examples/arithmetic/train.jsonl --advantage_estimator grpo --num_generations 4 \
        --reward_funcs examples/arithmetic_reward.py:exact_answer ...

Called as TRL calls reward functions; ``answer`` is the dataset's column of that name.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def final_number(text: str) -> str | None:
    """The last integer written in ``text`` (None when there is none): "3 + 2 = 5" answers 5."""
    found = NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def exact_answer(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the completion's last integer is the reference answer, else 0.0 (None: no reference)."""
    out = []
    for completion, expected in zip(completions, answer):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        out.append(None if expected is None else float(final_number(text) == str(expected).strip()))
    return out
