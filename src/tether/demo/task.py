"""The embedded demo task: instructions, a train/held-out split and written demonstrations.

A fresh machine has no preference data and may download nothing, so tether ships a small task of
its own (``tether/demo/data``):

* ``prompts.jsonl``: 371 hand-written instructions in 12 kinds (explanations, technology,
  how-tos, short creative requests, factual questions, advice, comparisons, rewriting,
  definitions, brainstorming, small reasoning questions, history), one ``{"prompt", "category"}``
  per line;
* ``demonstrations.jsonl``: 52 written ``{"prompt", "completion"}`` pairs (good, concise answers)
  for SFT.

The split is deterministic and independent of file order: a prompt is held out when the first 8
hex digits of the SHA-256 of its text, read as an integer, fall in the lowest ``HELDOUT_PERCENT``
percent, except that a prompt with a written demonstration always stays in train (so SFT never
sees a held-out prompt). Preferences are not shipped: the simulated annotator
(:mod:`tether.demo.annotator`) labels pairs sampled from the SFT policy, as human labellers would.

``write_demo_files(folder)`` writes the three sets as JSONL in the formats every stage accepts
(``{"prompt"}``, ``{"prompt", "completion"}``), so the stage commands can be pointed at files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tether.data.records import Demonstration, PreferencePair, Prompt, PromptRecord
from tether.durable import write_jsonl_atomic

PROMPTS_FILE = "prompts.jsonl"
DEMONSTRATIONS_FILE = "demonstrations.jsonl"
#: share of the prompts (in percent of the hash range) kept out of training
HELDOUT_PERCENT = 20


def _data_file(name: str) -> Path:
    return Path(str(resources.files("tether.demo") / "data" / name))


def _read_rows(name: str) -> list[tuple[int, dict]]:
    path = _data_file(name)
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                rows.append((line_no, json.loads(line)))
    return rows


def is_heldout_text(text: str, percent: int = HELDOUT_PERCENT) -> bool:
    """``int(sha256(text)[:8], 16) < percent/100 · 16⁸``: a fixed, order-free coin per prompt."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) < percent * (16**8) // 100


@lru_cache(maxsize=1)
def _catalogue() -> tuple[tuple[str, str, str], ...]:
    """``(prompt, category, origin)`` for every shipped prompt, in file order."""
    return tuple(
        (row["prompt"], row.get("category", ""), f"tether/demo/data/{PROMPTS_FILE}:{line}")
        for line, row in _read_rows(PROMPTS_FILE)
    )


@lru_cache(maxsize=1)
def _demonstration_rows() -> tuple[tuple[str, str, str], ...]:
    return tuple(
        (row["prompt"], row["completion"], f"tether/demo/data/{DEMONSTRATIONS_FILE}:{line}")
        for line, row in _read_rows(DEMONSTRATIONS_FILE)
    )


def prompt_categories() -> dict[str, str]:
    """Prompt text -> its kind (``explanation``, ``howto``, ``creative``, ``factual``, ...)."""
    return {p: c for p, c, _ in _catalogue()}


def _is_heldout(prompt: str) -> bool:
    demonstrated = {p for p, _, _ in _demonstration_rows()}
    return prompt not in demonstrated and is_heldout_text(prompt)


def train_prompts() -> list[PromptRecord]:
    """Prompts for the reward model's pairs and for PPO (every prompt not held out)."""
    return [PromptRecord(prompt=p, origin=o) for p, _, o in _catalogue() if not _is_heldout(p)]


def heldout_prompts() -> list[PromptRecord]:
    """Prompts no stage trains on; evaluation and the report use these."""
    return [PromptRecord(prompt=p, origin=o) for p, _, o in _catalogue() if _is_heldout(p)]


def demonstrations() -> list[Demonstration]:
    """Written demonstrations for SFT (all on train prompts)."""
    return [Demonstration(prompt=p, completion=c, origin=o) for p, c, o in _demonstration_rows()]


def is_demo_prompt(prompt: Prompt) -> bool:
    """True when ``prompt`` is one of the shipped instructions (used to switch the gold score on)."""
    return isinstance(prompt, str) and prompt in prompt_categories()


# ---------------------------------------------------------------------------------------------
# writing records as JSONL in the accepted formats
# ---------------------------------------------------------------------------------------------
def _prompt_json(prompt: Prompt):
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.role, "content": m.content} for m in prompt]


def write_prompts(records: Iterable[PromptRecord], path: str | Path) -> Path:
    """``{"prompt": ...}`` per line (a chat prompt is written as a list of role/content messages)."""
    return write_jsonl_atomic(path, ({"prompt": _prompt_json(r.prompt)} for r in records))


def write_demonstrations(records: Iterable[Demonstration], path: str | Path) -> Path:
    """``{"prompt": ..., "completion": ...}`` per line."""
    return write_jsonl_atomic(path, ({"prompt": _prompt_json(r.prompt), "completion": r.completion} for r in records))


def write_preferences(pairs: Iterable[PreferencePair], path: str | Path) -> Path:
    """``{"prompt", "chosen", "rejected"}`` per line (plus ``margin`` when a pair has one)."""

    def row(p: PreferencePair) -> dict:
        out = {"prompt": _prompt_json(p.prompt), "chosen": p.chosen, "rejected": p.rejected}
        if p.margin is not None:
            out["margin"] = p.margin
        return out

    return write_jsonl_atomic(path, (row(p) for p in pairs))


@dataclass(frozen=True)
class DemoFiles:
    train_prompts: Path
    heldout_prompts: Path
    demonstrations: Path


def write_demo_files(folder: str | Path) -> DemoFiles:
    """Write ``prompts_train.jsonl``, ``prompts_heldout.jsonl`` and ``demonstrations.jsonl`` into ``folder``."""
    folder = Path(folder)
    return DemoFiles(
        train_prompts=write_prompts(train_prompts(), folder / "prompts_train.jsonl"),
        heldout_prompts=write_prompts(heldout_prompts(), folder / "prompts_heldout.jsonl"),
        demonstrations=write_demonstrations(demonstrations(), folder / "demonstrations.jsonl"),
    )
