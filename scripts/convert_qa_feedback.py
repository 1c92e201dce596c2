"""Convert qa-feedback human preferences (allenai/FineGrainedRLHF) into tether preference pairs.

The raw file ``tasks/qa_feedback/data/dev_feedback.json`` holds 500 long-form questions (ASQA), each
with its grounding Wikipedia passages, four answers sampled from the authors' T5 policy
(``prediction 1`` .. ``prediction 4``) and six pairwise human preferences in the order
1v2, 1v3, 1v4, 2v3, 2v4, 3v4: 1 = the first answer is preferred, 2 = the second, 0 = no preference
(the authors' ``reward_modeling/run_pref_rm.py`` reads them the same way).

Output, one JSON line per pair, conversational:
``{"prompt": [{"role": "user", "content": ...}], "chosen": ..., "rejected": ..., "question_id": "dev-007",
"chosen_prediction": 1, "rejected_prediction": 3}``; the last three fields are ignored by tether's loader.

Rules (all deterministic, so re-running gives the same bytes):
* split by question: the ``TEST_QUESTIONS`` questions whose SHA-256 of the UTF-8 question text is smallest
  are held out (``test.jsonl.gz``), the rest are ``train.jsonl.gz``; both keep the raw file's order;
* ties (0) and pairs whose two answers are the same text are dropped;
* the prompt is one user message: every passage as ``Passage K (TITLE): TEXT``, then the instruction and
  the question last (tether cuts long prompts from the left, so they survive a cut); a passage's text
  is its sentences with whitespace runs collapsed to one space (as the authors' reward-model code
  does) after dropping the ``TITLE\\n\\n`` heading that the first sentence of many passages repeats.
  Answers and questions are kept verbatim.

    python scripts/convert_qa_feedback.py data/qa_feedback/raw/dev_feedback.json.gz data/qa_feedback

``--token_stats MODEL`` also prints prompt/response token-length percentiles with MODEL's tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
from pathlib import Path

TEST_QUESTIONS = 100
INSTRUCTION = "Answer the question using the passages above."
#: The raw ``preference`` list compares the four predictions in this order.
COMPARED = ((1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4))


def read_raw(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def question_id(index: int) -> str:
    """The question's position in the raw file, e.g. ``dev-007``."""
    return f"dev-{index:03d}"


def passage_text(passage: list[str]) -> str:
    title, *sentences = passage
    if sentences and sentences[0].startswith(title + "\n\n"):
        sentences[0] = sentences[0][len(title) + 2 :]
    return " ".join(" ".join(sentences).split())


def render_prompt(example: dict) -> str:
    parts = [f"Passage {k} ({p[0]}): {passage_text(p)}" for k, p in enumerate(example["passages"], 1)]
    parts += [INSTRUCTION, f"Question: {example['question']}"]
    return "\n\n".join(parts)


def preference_pairs(example: dict, qid: str) -> list[dict]:
    """One record per strict, non-identical human preference, in the raw comparison order."""
    preferences = example["preference"]
    if len(preferences) != len(COMPARED):
        raise ValueError(f"{qid}: expected {len(COMPARED)} preferences, got {preferences!r}")
    prompt = [{"role": "user", "content": render_prompt(example)}]
    pairs = []
    for (first, second), preferred in zip(COMPARED, preferences):
        if preferred == 0:
            continue
        if preferred not in (1, 2):
            raise ValueError(f"{qid}: preference must be 0, 1 or 2, got {preferred!r}")
        chosen, rejected = (first, second) if preferred == 1 else (second, first)
        chosen_text, rejected_text = example[f"prediction {chosen}"], example[f"prediction {rejected}"]
        if chosen_text == rejected_text:
            continue
        pairs.append(
            {
                "prompt": prompt,
                "chosen": chosen_text,
                "rejected": rejected_text,
                "question_id": qid,
                "chosen_prediction": chosen,
                "rejected_prediction": rejected,
            }
        )
    return pairs


def test_question_indices(examples: list[dict]) -> set[int]:
    """Indices of the ``TEST_QUESTIONS`` questions with the smallest SHA-256 of their text."""
    questions = [e["question"] for e in examples]
    if len(set(questions)) != len(questions):
        raise ValueError("the raw file repeats a question; the split assumes one record per question")
    digest = [hashlib.sha256(q.encode("utf-8")).hexdigest() for q in questions]
    return set(sorted(range(len(examples)), key=digest.__getitem__)[:TEST_QUESTIONS])


def convert(raw_path: Path, out_dir: Path) -> dict[str, list[dict]]:
    examples = read_raw(raw_path)
    held_out = test_question_indices(examples)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for index, example in enumerate(examples):
        splits["test" if index in held_out else "train"] += preference_pairs(example, question_id(index))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        write_jsonl_gz(out_dir / f"{name}.jsonl.gz", records)
    return splits


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    """JSON Lines, gzip level 9 with no file name and mtime 0 so the bytes depend on the records alone;
    written to a temporary name first so an interrupted run leaves no half file."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as f:
        f.write(text.encode("utf-8"))
    os.replace(partial, path)


def percentiles(values: list[int]) -> str:
    ordered = sorted(values)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return f"p50 {at(0.5)}, p90 {at(0.9)}, max {ordered[-1]} (n={len(ordered)})"


def print_token_stats(splits: dict[str, list[dict]], model: str) -> None:
    """Token lengths exactly as tether trains on them: the prompt through the chat template with the
    generation prompt, each distinct response with its stop token."""
    from tether.data.templates import messages_from_dicts, prompt_ids, response_ids
    from tether.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    for name, records in splits.items():
        prompts = {r["question_id"]: messages_from_dicts(r["prompt"]) for r in records}
        prompt_tokens = [len(prompt_ids(tokenizer, p)) for p in prompts.values()]
        responses = {r[k] for r in records for k in ("chosen", "rejected")}
        response_tokens = [len(response_ids(tokenizer, t)) for t in responses]
        print(f"{name}: {len(prompts)} questions, {len(records)} pairs")
        print(f"  prompt tokens:   {percentiles(prompt_tokens)}")
        print(f"  response tokens: {percentiles(response_tokens)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="dev_feedback.json (or .json.gz)")
    parser.add_argument("out_dir", type=Path, help="folder for train.jsonl.gz and test.jsonl.gz")
    parser.add_argument("--token_stats", metavar="MODEL", help="print token lengths with MODEL's tokenizer")
    args = parser.parse_args()
    splits = convert(args.raw, args.out_dir)
    for name, records in splits.items():
        print(f"{name}: {len({r['question_id'] for r in records})} questions, {len(records)} pairs")
    if args.token_stats:
        print_token_stats(splits, args.token_stats)


if __name__ == "__main__":
    main()
