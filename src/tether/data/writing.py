"""Records back to JSONL, in the formats every loader accepts (each file written atomically)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tether.data.records import Demonstration, PreferencePair, Prompt, PromptRecord
from tether.durable import write_jsonl_atomic


def prompt_json(prompt: Prompt) -> Any:
    """A prompt as JSON: the string, or a chat prompt as a list of ``{"role", "content"}`` messages."""
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.role, "content": m.content} for m in prompt]


def write_prompts(records: Iterable[PromptRecord], path: str | Path) -> Path:
    """``{"prompt": ...}`` per line."""
    return write_jsonl_atomic(path, ({"prompt": prompt_json(r.prompt)} for r in records))


def write_demonstrations(records: Iterable[Demonstration], path: str | Path) -> Path:
    """``{"prompt": ..., "completion": ...}`` per line."""
    return write_jsonl_atomic(path, ({"prompt": prompt_json(r.prompt), "completion": r.completion} for r in records))


def write_preferences(pairs: Iterable[PreferencePair], path: str | Path) -> Path:
    """``{"prompt", "chosen", "rejected"}`` per line (plus ``margin`` when a pair has one, and
    ``chosen_truncated`` / ``rejected_truncated`` when a response was cut at the token budget)."""

    def row(p: PreferencePair) -> dict:
        out = {"prompt": prompt_json(p.prompt), "chosen": p.chosen, "rejected": p.rejected}
        if p.margin is not None:
            out["margin"] = p.margin
        for key in ("chosen_truncated", "rejected_truncated"):
            if getattr(p, key):
                out[key] = True
        return out

    return write_jsonl_atomic(path, (row(p) for p in pairs))
