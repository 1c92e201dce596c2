"""The data layer: every accepted input format -> typed records, with FILE:LINE errors.

``load_preferences``, ``load_demonstrations`` and ``load_prompts`` read a file, a folder or a
Hugging Face dataset (``tether.data.loading``); ``tether.data.formats`` documents each record shape;
``tether.data.templates`` turns records into token ids.
"""

from tether.data.errors import MAX_REPORTED_PROBLEMS, DataError
from tether.data.formats import (
    RecordProblems,
    parse_demonstration,
    parse_preference,
    parse_prompt,
    split_shared_prefix,
)
from tether.data.loading import (
    load_demonstrations,
    load_preferences,
    load_prompts,
    load_records,
    split_train_eval,
)
from tether.data.records import Demonstration, Message, PreferencePair, Prompt, PromptRecord

__all__ = [
    "DataError",
    "MAX_REPORTED_PROBLEMS",
    "RecordProblems",
    "Message",
    "Prompt",
    "PreferencePair",
    "Demonstration",
    "PromptRecord",
    "parse_preference",
    "parse_demonstration",
    "parse_prompt",
    "split_shared_prefix",
    "load_records",
    "load_preferences",
    "load_demonstrations",
    "load_prompts",
    "split_train_eval",
]
