"""Typed records: what every accepted input format becomes.

A prompt is either a tuple of chat messages or a plain string. Plain strings are sent as one user
turn when the tokenizer has a chat template and as raw text otherwise (``tether.data.templates``).
``origin`` is ``FILE:LINE`` (or ``DATASET[split]:ROW``) so later errors can point at the input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
    #: the response was cut at a token budget when it was sampled, so it does not end with the stop
    #: token: the reward model reads its score, and DPO ends its log-probability sum, at its last token
    #: (where PPO's rollout reads the score of a response it cut), instead of at an appended stop token
    chosen_truncated: bool = False
    rejected_truncated: bool = False


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
    #: the row's other fields (a reference answer, say): ``tether ppo --reward_funcs`` passes them to the
    #: reward functions as keyword lists, as TRL passes a dataset's columns
    columns: Mapping[str, Any] = field(default_factory=dict, compare=False)
