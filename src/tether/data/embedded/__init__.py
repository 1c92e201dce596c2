"""The embedded demo task's data, named ``embedded:demo`` wherever a dataset is expected.

A fresh machine has no data and may download nothing, so tether ships a small task of its own
(the files beside this module), read by ``load_prompts``, ``load_demonstrations`` and
``load_preferences`` (``tether.data.loading``) when the source is ``embedded:demo``, exactly as any
JSONL file is read:

* ``prompts.jsonl``: 371 hand-written instructions in 12 kinds (explanations, technology,
  how-tos, short creative requests, factual questions, advice, comparisons, rewriting,
  definitions, brainstorming, small reasoning questions, history), one ``{"prompt", "category"}``
  per line. Split ``train`` (the default) gives the training prompts, split ``test`` the held-out
  ones (``tether ppo/bon/eval --dataset embedded:demo --dataset_split test``).
* ``demonstrations.jsonl``: 52 written ``{"prompt", "completion"}`` pairs (good, concise answers)
  for SFT; all on training prompts (split ``train``).
* ``preferences.jsonl``: fixed ``{"prompt", "chosen", "rejected"}`` pairs for ``tether rm`` and
  ``tether dpo`` (split ``train``). Provenance: written once by ``scripts/make_demo_preferences.py``,
  which samples two responses (40 new tokens, T = 0.7, seed 0) from the embedded
  SmolLM2-135M-Instruct for each of 120 training prompts (a seeded sample) and has the simulated
  annotator (``tether.demo.annotator``, τ = 0.1, seed 0) label them; pairs of identical responses
  are dropped. ``tether pipeline`` does not read them: it samples its own pairs from its SFT policy
  and labels them the same way.

The split is deterministic and independent of file order: a prompt is held out when the first 8
hex digits of the SHA-256 of its text, read as an integer, fall in the lowest ``HELDOUT_PERCENT``
percent, except that a prompt with a written demonstration always stays in train (so SFT never
sees a held-out prompt).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tether.data.records import Prompt

#: The dataset name of the demo task's data (like ``embedded:SmolLM2-135M-Instruct`` for the model).
DEMO = "embedded:demo"
#: kind of record -> the file holding it
FILES = {"prompts": "prompts.jsonl", "demonstrations": "demonstrations.jsonl", "preferences": "preferences.jsonl"}
#: ``train``: training prompts, demonstrations, preference pairs; ``test``: held-out prompts only
SPLITS = ("train", "test")
#: share of the prompts (in percent of the hash range) kept out of training
HELDOUT_PERCENT = 20


def data_file(kind: str) -> Path:
    """The shipped file holding the demo task's records of ``kind``."""
    return Path(str(resources.files("tether.data.embedded") / FILES[kind]))


def _texts(kind: str) -> list[str]:
    with data_file(kind).open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def is_heldout_text(text: str, percent: int = HELDOUT_PERCENT) -> bool:
    """``int(sha256(text)[:8], 16) < percent/100 · 16⁸``: a fixed, order-free coin per prompt."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) < percent * (16**8) // 100


@lru_cache(maxsize=1)
def _demonstrated() -> frozenset[str]:
    return frozenset(_texts("demonstrations"))


def split_of(prompt: Prompt) -> str:
    """``test`` for a held-out prompt, else ``train`` (a demonstrated prompt is always ``train``)."""
    held = isinstance(prompt, str) and prompt not in _demonstrated() and is_heldout_text(prompt)
    return "test" if held else "train"


@lru_cache(maxsize=1)
def prompt_categories() -> dict[str, str]:
    """Prompt text -> its kind (``explanation``, ``howto``, ``creative``, ``factual``, ...)."""
    with data_file("prompts").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["prompt"]: row.get("category", "") for row in rows}


def is_demo_prompt(prompt: Prompt) -> bool:
    """True when ``prompt`` is one of the shipped instructions (used to switch the gold score on)."""
    return isinstance(prompt, str) and prompt in prompt_categories()


@dataclass(frozen=True)
class DemoFiles:
    train_prompts: Path
    heldout_prompts: Path
    demonstrations: Path


def write_demo_files(folder: str | Path) -> DemoFiles:
    """Write ``prompts_train.jsonl``, ``prompts_heldout.jsonl`` and ``demonstrations.jsonl`` into ``folder``."""
    from tether.data.loading import load_demonstrations, load_prompts
    from tether.data.writing import write_demonstrations, write_prompts

    folder = Path(folder)
    return DemoFiles(
        train_prompts=write_prompts(load_prompts(DEMO, "train"), folder / "prompts_train.jsonl"),
        heldout_prompts=write_prompts(load_prompts(DEMO, "test"), folder / "prompts_heldout.jsonl"),
        demonstrations=write_demonstrations(load_demonstrations(DEMO), folder / "demonstrations.jsonl"),
    )
