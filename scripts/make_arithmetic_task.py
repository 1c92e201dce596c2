"""Write the arithmetic word-problem task (examples/arithmetic/{train,test}.jsonl): a small verifiable-reward
task for ``tether ppo --reward_funcs examples/arithmetic_reward.py:exact_answer``.

Each row is ``{"prompt": ..., "answer": "<integer>"}``: one addition or subtraction of small numbers told
as a one-sentence story, asking for the number only. Seeded, so a re-run writes the same files;
``TRAIN`` + ``TEST`` distinct prompts, the held-out ones never in train.
usage (from the repository root): python scripts/make_arithmetic_task.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 0
TRAIN, TEST = 200, 50
OUTPUT = Path(__file__).resolve().parents[1] / "examples" / "arithmetic"
NAMES = ["Sam", "Mia", "Leo", "Ana", "Tom", "Zoe", "Ben", "Eva", "Max", "Ida"]
THINGS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles"]
GAIN = "{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?"
LOSS = "{name} has {a} {things} and gives away {b}. How many {things} does {name} have left?"
ASK = " Answer with the number only."


def problem(rng: random.Random) -> dict:
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(1, 9)
    if rng.random() < 0.5:
        return {"prompt": GAIN.format(name=name, a=a, b=b, things=things) + ASK, "answer": str(a + b)}
    a = max(a, b + 1)  # never negative
    return {"prompt": LOSS.format(name=name, a=a, b=b, things=things) + ASK, "answer": str(a - b)}


def main() -> None:
    rng = random.Random(SEED)
    rows: dict[str, dict] = {}
    while len(rows) < TRAIN + TEST:
        row = problem(rng)
        rows.setdefault(row["prompt"], row)
    ordered = list(rows.values())
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", ordered[:TRAIN]), ("test", ordered[TRAIN:])):
        path = OUTPUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        print(f"wrote {len(part)} problems to {path}")


if __name__ == "__main__":
    main()
