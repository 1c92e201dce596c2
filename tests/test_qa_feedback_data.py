"""The committed qa-feedback preference set (data/qa_feedback/): it loads through tether's own loader,
its counts are the README's, no question is on both sides of the split, and the converter rebuilds it
from the vendored raw file."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tether.data import Message, load_preferences

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "qa_feedback"
RAW = DATA / "raw" / "dev_feedback.json.gz"
#: Git blob id of tasks/qa_feedback/data/dev_feedback.json at allenai/FineGrainedRLHF a1469d4e.
UPSTREAM_BLOB = "6b6efddd2daf0d17c917f7773435b357b172d5c9"
# (questions in the raw split, questions with at least one strict preference, pairs), as in the README table.
COUNTS = {"train": (400, 389, 2098), "test": (100, 99, 518)}


def read_split(name: str) -> list[dict]:
    with gzip.open(DATA / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def raw_examples() -> list[dict]:
    with gzip.open(RAW, "rt", encoding="utf-8") as f:
        return json.load(f)


def question_of(prompt_text: str) -> str:
    last = prompt_text.rsplit("\n\n", 1)[1]
    assert last.startswith("Question: ")
    return last[len("Question: ") :]


def test_raw_file_is_the_upstream_file():
    content = gzip.decompress(RAW.read_bytes())
    blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
    assert blob == UPSTREAM_BLOB


@pytest.mark.parametrize("split", ["train", "test"])
def test_split_loads_through_tether_with_readme_counts(split):
    pairs = load_preferences(DATA, split=split)  # the folder: raw/dev_feedback.json.gz must not be read as a split
    records = read_split(split)
    _, questions_with_pairs, n_pairs = COUNTS[split]
    assert len(pairs) == len(records) == n_pairs
    assert len({r["question_id"] for r in records}) == questions_with_pairs
    assert pairs[0].origin == f"{DATA / (split + '.jsonl.gz')}:1"
    for pair, record in zip(pairs, records):
        assert pair.prompt == (Message("user", record["prompt"][0]["content"]),)
        assert (pair.chosen, pair.rejected) == (record["chosen"], record["rejected"])
        assert pair.chosen != pair.rejected
    row = "| {} | {} | {} | {} |".format(split, *COUNTS[split])
    assert row in (DATA / "README.md").read_text(encoding="utf-8")


def test_no_question_on_both_sides():
    train, test = read_split("train"), read_split("test")
    assert not {r["question_id"] for r in train} & {r["question_id"] for r in test}
    assert not {question_of(r["prompt"][0]["content"]) for r in train} & {
        question_of(r["prompt"][0]["content"]) for r in test
    }
    # Every raw question is assigned to exactly one side: 400 + 100 = 500.
    assert COUNTS["train"][0] + COUNTS["test"][0] == len(raw_examples())


def test_converter_reproduces_committed_files(tmp_path):
    script = ROOT / "scripts" / "convert_qa_feedback.py"
    subprocess.run([sys.executable, str(script), str(RAW), str(tmp_path)], check=True, capture_output=True)
    for name in ("train.jsonl.gz", "test.jsonl.gz"):
        # The JSON Lines text must match byte for byte; the gzip bytes also match with the same zlib
        # (mtime 0, no file name), but another zlib build may compress the same text differently.
        rebuilt = gzip.decompress((tmp_path / name).read_bytes())
        assert rebuilt == gzip.decompress((DATA / name).read_bytes()), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl.gz", "train.jsonl.gz"]


def test_hand_checked_question():
    """dev-005 "When does the new bunk'd come out?" has preferences [1, 1, 2, 0, 2, 2] over
    1v2, 1v3, 1v4, 2v3, 2v4, 3v4: answer 1 beats 2 and 3, answer 4 beats 1, 2 and 3, 2v3 is a tie."""
    raw = raw_examples()[5]
    assert raw["question"] == "When does the new bunk'd come out?"
    assert raw["preference"] == [1, 1, 2, 0, 2, 2]
    records = [r for r in read_split("train") if r["question_id"] == "dev-005"]
    order = [(r["chosen_prediction"], r["rejected_prediction"]) for r in records]
    assert order == [(1, 2), (1, 3), (4, 1), (4, 2), (4, 3)]
    four_over_one = records[2]
    assert four_over_one["chosen"] == raw["prediction 4"]
    assert four_over_one["chosen"].startswith("The new album \"Why Don't We\" by American pop band Why Don't We came")
    assert four_over_one["rejected"] == raw["prediction 1"]
    assert four_over_one["rejected"].startswith("The new album Why Don't We was released on September 27, 2016.")
    prompt = four_over_one["prompt"][0]["content"]
    assert prompt.startswith("Passage 1 (Why Don't We): ")
    assert "\n\nPassage 2 (The New Year (band)): " in prompt
    assert "\n\nPassage 3 (Law &amp; Order: Special Victims Unit (season 18)): " in prompt
    end = "\n\nAnswer the question using the passages above.\n\nQuestion: When does the new bunk'd come out?"
    assert prompt.endswith(end)


def test_recipe_files(tmp_path):
    """scripts/qa_feedback_recipe_data.py (docs/recipe.md): the 389 train questions split in two by
    SHA-256 of the question id, round(389 / 2) = 194 (half to even) gold and 195 proxy, as the recipe
    says, with 1,041 and 1,057 pairs; no question on both sides, every pair of a question kept; each
    side's demonstration is its most-preferred answer (dev-005 above: answer 4 wins all three of its
    comparisons); the held-out prompts are the first test questions'."""
    script = ROOT / "scripts" / "qa_feedback_recipe_data.py"
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--heldout", "3"], check=True, capture_output=True, text=True
    )
    files = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in tmp_path.glob("*.jsonl")}
    assert sorted(files) == ["gold", "gold_sft", "heldout", "prompts", "proxy", "sft"]
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert json.loads(run.stdout) == counts
    assert counts == {
        "proxy_questions": 195,
        "proxy_pairs": 1057,
        "gold_questions": 194,
        "gold_pairs": 1041,
        "heldout_questions": 3,
    }
    train = read_split("train")
    order = sorted({r["question_id"] for r in train}, key=lambda q: hashlib.sha256(q.encode()).hexdigest())
    expected = {"gold": set(order[:194]), "proxy": set(order[194:])}
    key = lambda row: json.dumps(row["prompt"])  # noqa: E731
    for side, demos in (("proxy", "sft"), ("gold", "gold_sft")):
        assert sorted(map(key, files[side])) == sorted(key(r) for r in train if r["question_id"] in expected[side])
        assert [key(d) for d in files[demos]] == list(dict.fromkeys(map(key, files[side])))
    assert [key(r) for r in files["prompts"]] == [key(d) for d in files["sft"]]
    side = "gold_sft" if "dev-005" in expected["gold"] else "sft"
    (demo,) = [d for d in files[side] if "bunk'd" in d["prompt"][0]["content"]]
    assert demo["completion"] == raw_examples()[5]["prediction 4"]
    assert [key(r) for r in files["heldout"]] == list(dict.fromkeys(map(key, read_split("test"))))[:3]
