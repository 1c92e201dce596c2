"""Files for the real-data recipe (docs/recipe.md) from the committed qa-feedback pairs (data/qa_feedback).

Gao et al.'s over-optimisation setup needs a gold judge that the policy never trains against: the
train split's questions are divided in two, by question, so no question is on both sides:

* ``proxy.jsonl``: the pairs of the *proxy* questions, for the reward model PPO optimises and for DPO;
* ``gold.jsonl``: the pairs of the other questions, for the gold reward model that only judges;
* ``sft.jsonl``: one demonstration per proxy question, ``{"prompt", "completion"}`` with its most
  preferred answer (the answer that wins most of its human comparisons; ties go to the answer that
  loses fewest, then to the lower prediction number), so SFT starts the policy on the data's own answers;
* ``gold_sft.jsonl``: the same for the gold questions: the gold judge's own SFT start, which shares
  nothing with the policy's;
* ``prompts.jsonl``: the proxy questions' prompts (PPO's training prompts);
* ``heldout.jsonl``: the prompts of the first ``--heldout`` test-split questions (never trained on).

The split is seeded by SHA-256 of ``question_id`` (not by position), so it does not depend on file
order. ``--questions N`` keeps the first N questions of each side in that order (a smaller run: the
pairs of a question stay together). usage: python scripts/qa_feedback_recipe_data.py OUT_DIR
[--gold_share 0.5] [--heldout 32] [--questions N]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "qa_feedback"


def read(split: str) -> list[dict]:
    with gzip.open(DATA / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def by_question(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        out[row["question_id"]].append(row)
    return dict(out)


def preferred_answer(pairs: list[dict]) -> str:
    """The answer with the most wins among a question's pairs (then fewest losses, then lowest prediction)."""
    wins, losses, text = collections.Counter(), collections.Counter(), {}
    for p in pairs:
        wins[p["chosen_prediction"]] += 1
        losses[p["rejected_prediction"]] += 1
        text[p["chosen_prediction"]], text[p["rejected_prediction"]] = p["chosen"], p["rejected"]
    best = min(text, key=lambda k: (-wins[k], losses[k], k))
    return text[best]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--gold_share", type=float, default=0.5, help="share of train questions for the gold RM")
    parser.add_argument("--heldout", type=int, default=32, help="held-out questions (test split) to evaluate on")
    parser.add_argument("--questions", type=int, default=None, help="at most N questions on each side")
    args = parser.parse_args()
    if not 0 < args.gold_share < 1:
        parser.error("--gold_share must be in (0, 1)")
    if args.questions is not None and args.questions < 1:
        parser.error("--questions must be at least 1")
    questions = by_question(read("train"))
    order = sorted(questions, key=lambda q: hashlib.sha256(q.encode()).hexdigest())
    n_gold = round(len(order) * args.gold_share)
    gold_ids, proxy_ids = order[:n_gold][: args.questions], order[n_gold:][: args.questions]
    proxy_ids = [q for q in questions if q in set(proxy_ids)]  # file order within each side
    gold_ids = [q for q in questions if q in set(gold_ids)]
    keep = ("prompt", "chosen", "rejected")
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "proxy.jsonl", [{k: r[k] for k in keep} for q in proxy_ids for r in questions[q]])
    write_jsonl(args.out / "gold.jsonl", [{k: r[k] for k in keep} for q in gold_ids for r in questions[q]])
    for name, ids in (("sft.jsonl", proxy_ids), ("gold_sft.jsonl", gold_ids)):
        write_jsonl(
            args.out / name,
            [{"prompt": questions[q][0]["prompt"], "completion": preferred_answer(questions[q])} for q in ids],
        )
    write_jsonl(args.out / "prompts.jsonl", [{"prompt": questions[q][0]["prompt"]} for q in proxy_ids])
    test = by_question(read("test"))
    write_jsonl(
        args.out / "heldout.jsonl", [{"prompt": rows[0]["prompt"]} for rows in list(test.values())[: args.heldout]]
    )
    counts = {
        "proxy_questions": len(proxy_ids),
        "proxy_pairs": sum(len(questions[q]) for q in proxy_ids),
        "gold_questions": len(gold_ids),
        "gold_pairs": sum(len(questions[q]) for q in gold_ids),
        "heldout_questions": min(args.heldout, len(test)),
    }
    (args.out / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
