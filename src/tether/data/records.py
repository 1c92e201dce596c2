"""Typed records: what every accepted input format becomes.

A prompt is either a tuple of chat messages or a plain string. Plain strings are sent as one user
turn when the tokenizer has a chat template and as raw text otherwise (``tether.data.templates``).
``origin`` is ``FILE:LINE`` (or ``DATASET[split]:ROW``) so later errors can point at the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Message:
    role: str
    content: str


Prompt = tuple[Message, ...] | str


@dataclass(frozen=True)
class PreferencePair:
    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None
    origin: str = field(default="", compare=False)


@dataclass(frozen=True)
class Demonstration:
    prompt: Prompt
    completion: str
    origin: str = field(default="", compare=False)
    #: True for a ``{"messages"}`` record: the assistant turns inside ``prompt`` are demonstrations too
    #: (trained under ``--assistant_turns all``). A ``{"prompt", "completion"}`` record demonstrates its
    #: completion only, as in TRL. Not compared: both formats hold the same conversation.
    prompt_turns_are_demonstrations: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class PromptRecord:
    prompt: Prompt
    origin: str = field(default="", compare=False)
