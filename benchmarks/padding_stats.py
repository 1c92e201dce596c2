"""Token slots a batch of preference pairs fills in each layout (no model: tokenisation only).

    python benchmarks/padding_stats.py [--data data/qa_feedback/train.jsonl.gz] [--batch_size 8]

For batches of ``--batch_size`` pairs (seeded shuffle, as a training epoch draws them), the rows × width
of the tensors that go through the model, and the share of them that is padding:

* two padded sequences per pair (TRL's ``RewardTrainer``/``DPOTrainer`` and tether's plain rows):
  ``2B × max(prompt + response)``;
* tether's shared-prompt rows: ``B × max(prompt + chosen + rejected)``;
* tether's shared-prompt padding-free rows: ``R × max(...)``, R the rows the packer needs.

Compute in the transformer blocks grows with these slots (attention a little faster), so their ratio
is the work ratio when nothing else differs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    from tether.data.loading import load_preferences
    from tether.data.templates import Truncation
    from tether.models.loading import load_tokenizer, resolve_model_path
    from tether.models.packing import pack_by_length
    from tether.stages.reward import tokenize_preferences

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "qa_feedback" / "train.jsonl.gz"))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=1536)
    parser.add_argument("--max_prompt_length", type=int, default=1280)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = load_tokenizer(resolve_model_path("embedded:SmolLM2-135M-Instruct"))
    pairs = tokenize_preferences(
        tokenizer, load_preferences(args.data), Truncation("prompt", args.max_length, args.max_prompt_length)
    ).pairs
    order = list(range(len(pairs)))
    random.Random(args.seed).shuffle(order)
    slots = {"two_sequences_per_pair": 0, "shared_prompt": 0, "shared_prompt_padding_free": 0}
    real = {"two_sequences_per_pair": 0, "shared_prompt": 0, "shared_prompt_padding_free": 0}
    rows_packed = 0
    for start in range(0, len(order), args.batch_size):
        batch = [pairs[i] for i in order[start : start + args.batch_size]]
        two = [len(p.prompt) + len(r) for p in batch for r in (p.chosen, p.rejected)]
        shared = [len(p.prompt) + len(p.chosen) + len(p.rejected) for p in batch]
        rows = pack_by_length(shared, max(shared))
        rows_packed += len(rows)
        slots["two_sequences_per_pair"] += len(two) * max(two)
        slots["shared_prompt"] += len(shared) * max(shared)
        slots["shared_prompt_padding_free"] += len(rows) * max(shared)
        real["two_sequences_per_pair"] += sum(two)
        real["shared_prompt"] += sum(shared)
        real["shared_prompt_padding_free"] += sum(shared)
    report = {
        "data": args.data,
        "pairs": len(pairs),
        "batch_size": args.batch_size,
        "batches": -(-len(pairs) // args.batch_size),
        "rows_padding_free": rows_packed,
        "token_slots": slots,
        "padding_fraction": {k: round(1 - real[k] / slots[k], 4) for k in slots},
        "slots_relative_to_two_sequences": {k: round(v / slots["two_sequences_per_pair"], 4) for k, v in slots.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
