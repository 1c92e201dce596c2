"""Every accepted record shape -> typed records, or a list of problems naming the field.

One decoded row (a ``dict`` from a JSON line, a JSON list element, a CSV or parquet row, or a hub
dataset row) becomes records of the kind the caller asked for. Nothing here knows about files:
``tether.data.loading`` reads files and turns the problems into ``FILE:LINE: ...`` lines.

Preference pairs (``parse_preference``; one row may give several pairs):

* explicit:        ``{"prompt": "...", "chosen": "...", "rejected": "...", "margin": 1.0}`` (margin optional;
  so are ``"chosen_truncated"``/``"rejected_truncated": true`` for a response cut at a token budget
  when it was sampled, which then does not end with the stop token)
* implicit prompt: ``{"chosen": FULL_TEXT, "rejected": FULL_TEXT}``: the prompt is the shared prefix,
  cut back so neither response starts mid-word; whitespace where the texts part goes to the
  responses (``"Q? A: 4"`` / ``"Q? A: 5"`` -> prompt ``"Q? A:"``, responses ``" 4"`` / ``" 5"``), as
  BPE tokenizers attach a space to the word after it;
* conversational:  ``prompt`` a list of messages and ``chosen``/``rejected`` a string, one assistant
  message, or a list of messages ending with the assistant turn (earlier messages, minus a repeat
  of the prompt, continue the prompt and must be the same on both sides);
* implicit conversational: ``chosen``/``rejected`` full conversations sharing all but the last
  (assistant) message;
* ranked: ``{"prompt": "...", "responses": [{"text": "...", "label": "preferred"|"disliked"}, ...]}``:
  exactly one preferred response; one pair per disliked response, in file order.

Demonstrations (``parse_demonstration``): ``{"prompt", "completion"}`` (completion as for ``chosen``)
or ``{"messages": [...]}`` whose last message is the assistant turn; every assistant turn of a
``messages`` record is a demonstration, of a ``prompt``/``completion`` record only the completion.
Extra fields (best-of-N output carries scores) are ignored.

Prompts (``parse_prompt``): ``{"prompt"}``, ``{"messages"}`` (a final assistant turn is dropped), or
any preference/demonstration row (its prompt).

Rules shared by all: messages are ``{"role", "content"}`` with role ``system``, ``user`` or
``assistant`` (``tool`` turns are refused: records carry text turns only, and a tool turn without
its call would train on half a conversation); content is a string. Texts must not be empty or
whitespace only, except that an empty *system* message is dropped (common in converted chat
data, and it carries nothing). Texts may hold any character except NUL (U+0000), which in text
data means a binary or UTF-16 file read as UTF-8, and unpaired surrogates (``"\\ud800"`` escapes,
not Unicode); other control characters and huge strings are valid text. Texts are kept
verbatim (no stripping): whitespace changes tokens. A JSON ``null`` is treated as a missing field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from tether.data.records import Demonstration, Message, PreferencePair, Prompt, PromptRecord

ROLES = ("system", "user", "assistant")
LABELS = ("preferred", "disliked")
KINDS = ("preferences", "demonstrations", "prompts")


class RecordProblems(ValueError):
    """One row cannot be used; ``problems`` holds one ``what is wrong (field X)`` string each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def json_kind(value: Any) -> str:
    """The JSON name of a value's type, for messages a user can act on."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Row:
    """Reads fields of one row, collecting every problem instead of stopping at the first."""

    def __init__(self, row: Any):
        self.problems: list[str] = []
        if not isinstance(row, Mapping):
            raise RecordProblems([f"expected a JSON object (a record), got {json_kind(row)}"])
        self.row = row

    def has(self, key: str) -> bool:
        return self.row.get(key) is not None

    def require(self, key: str) -> Any:
        value = self.row.get(key)
        if value is None:
            self.problems.append(f"field '{key}' is null" if key in self.row else f"missing field '{key}'")
        return value

    def text(self, value: Any, field: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.problems.append(f"expected a string, got {json_kind(value)} (field {field})")
            return None
        if not value.strip():
            self.problems.append(f"empty text (field {field})")
            return None
        if "\x00" in value:
            self.problems.append(f"text contains a NUL character (field {field})")
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800" from a JSON escape
            self.problems.append(
                f"text contains an unpaired surrogate U+{ord(value[exc.start]):04X}, which is not "
                f"valid Unicode (field {field})"
            )
            return None
        return value

    def message(self, value: Any, field: str) -> Message | None:
        """One ``{"role", "content"}`` message; ``None`` (and a problem) if unusable."""
        if not isinstance(value, Mapping):
            self.problems.append(
                f"expected a message object with role and content, got {json_kind(value)} (field {field})"
            )
            return None
        role = value.get("role")
        if role is None:
            self.problems.append(f"missing field '{field}.role'")
        elif role not in ROLES:
            self.problems.append(f"role must be one of {', '.join(ROLES)}, got {_short(role)} (field {field}.role)")
            role = None
        content = value.get("content")
        if content is None:
            self.problems.append(f"missing field '{field}.content'")
            return None
        if role == "system" and isinstance(content, str) and not content.strip():
            return _EMPTY_SYSTEM
        content = self.text(content, f"{field}.content")
        if role is None or content is None:
            return None
        return Message(role=role, content=content)

    def messages(self, value: Any, field: str) -> tuple[Message, ...] | None:
        if not isinstance(value, (list, tuple)):
            self.problems.append(f"expected a list of messages, got {json_kind(value)} (field {field})")
            return None
        before = len(self.problems)
        parsed = [self.message(item, f"{field}[{i}]") for i, item in enumerate(value)]
        if len(self.problems) > before:
            return None
        kept = tuple(m for m in parsed if m is not _EMPTY_SYSTEM)
        if not kept:
            self.problems.append(f"no messages (field {field})")
            return None
        return kept

    def prompt(self, value: Any, field: str = "prompt") -> Prompt | None:
        """A prompt: a string, or messages that end with a turn the model should answer."""
        if isinstance(value, str) or value is None:
            return self.text(value, field)
        if not isinstance(value, (list, tuple)):
            self.problems.append(f"expected a string or a list of messages, got {json_kind(value)} (field {field})")
            return None
        messages = self.messages(value, field)
        if messages is not None and not self.prompt_ok(messages, field):
            return None
        return messages

    def prompt_ok(self, messages: tuple[Message, ...], field: str) -> bool:
        if messages[-1].role == "assistant":
            self.problems.append(f"the prompt ends with an assistant turn: nothing is left to answer (field {field})")
            return False
        return True

    def response(self, value: Any, field: str) -> tuple[tuple[Message, ...], str] | None:
        """A response: a string, one assistant message, or messages ending with the assistant turn.

        Returns ``(context, text)``: the messages before the final assistant turn (empty for a
        string) and the assistant text.
        """
        if value is None:
            return None
        if isinstance(value, str):
            text = self.text(value, field)
            return None if text is None else ((), text)
        if isinstance(value, Mapping):
            message = self.message(value, field)
            if message is None:
                return None
            if message is _EMPTY_SYSTEM or message.role != "assistant":
                self.problems.append(
                    f"the response must be an assistant message, got role {value.get('role')!r} (field {field}.role)"
                )
                return None
            return (), message.content
        if isinstance(value, (list, tuple)):
            messages = self.messages(value, field)
            if messages is None:
                return None
            if messages[-1].role != "assistant":
                self.problems.append(
                    f"the last message must be the assistant's response, got role "
                    f"{messages[-1].role!r} (field {field}[{len(value) - 1}].role)"
                )
                return None
            return messages[:-1], messages[-1].content
        self.problems.append(
            f"expected a string, an assistant message or a list of messages, got {json_kind(value)} (field {field})"
        )
        return None

    def truncated(self, side: str) -> bool:
        """``chosen_truncated`` / ``rejected_truncated``: a boolean, false when absent."""
        key = f"{side}_truncated"
        value = self.row.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            self.problems.append(f"expected true or false, got {json_kind(value)} (field {key})")
            return False
        return value

    def margin(self) -> float | None:
        value = self.row.get("margin")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problems.append(f"expected a number, got {json_kind(value)} (field margin)")
            return None
        try:
            margin = float(value)
        except OverflowError:  # an integer too large for a float
            margin = math.inf
        if not math.isfinite(margin):
            self.problems.append(f"margin must be a finite number, got {_short(value)} (field margin)")
            return None
        return margin

    def done(self) -> None:
        if self.problems:
            raise RecordProblems(self.problems)


_EMPTY_SYSTEM = Message(role="system", content="")  # sentinel: an empty system message, dropped


def _with_context(prompt: Prompt, context: tuple[Message, ...]) -> Prompt:
    """The prompt continued by the messages a response list carries before its final turn."""
    if not context:
        return prompt
    base = (Message("user", prompt),) if isinstance(prompt, str) else prompt
    return base + context


def _strip_repeated_prompt(prompt: Prompt, context: tuple[Message, ...]) -> tuple[Message, ...]:
    """Response lists often repeat the whole conversation; drop the part that is the prompt."""
    head = (Message("user", prompt),) if isinstance(prompt, str) else prompt
    if context[: len(head)] == head:
        return context[len(head) :]
    return context


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_'\u2019"


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` from two full texts sharing a prompt.

    The prompt is the longest shared prefix, cut back (1) so that both responses are non-empty,
    (2) so that neither response starts in the middle of a word, and (3) so that whitespace where
    the texts part goes to the responses. Raises ``ValueError`` if nothing is left for the prompt.
    """
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical, so no prompt can be told apart from the responses")
    cut = 0
    limit = min(len(chosen), len(rejected))
    while cut < limit and chosen[cut] == rejected[cut]:
        cut += 1
    cut = min(cut, limit - 1)  # one text may be a prefix of the other: leave it a response

    def mid_word(text: str, at: int) -> bool:
        return 0 < at < len(text) and _is_word_char(text[at - 1]) and _is_word_char(text[at])

    while cut > 0 and (mid_word(chosen, cut) or mid_word(rejected, cut)):
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    prompt = chosen[:cut]
    if not prompt.strip():
        raise ValueError("chosen and rejected share no prompt prefix; give the prompt in a 'prompt' field")
    return prompt, chosen[cut:], rejected[cut:]


def parse_preference(row: Any) -> list[PreferencePair]:
    """Preference pairs from one row (see the module docstring for the accepted shapes)."""
    r = _Row(row)
    has_pair = r.has("chosen") or r.has("rejected")
    if r.has("responses"):
        if has_pair:
            raise RecordProblems(
                ["a record has either 'responses' (ranked) or 'chosen'/'rejected', not both (field responses)"]
            )
        return _parse_ranked(r)
    if not has_pair and not r.has("prompt") and r.has("messages"):
        raise RecordProblems(
            [
                "missing field 'chosen' and 'rejected' (a 'messages' record is a demonstration or a "
                "prompt, not a preference pair)"
            ]
        )
    chosen_raw, rejected_raw = r.require("chosen"), r.require("rejected")
    margin = r.margin()
    cut = {"chosen_truncated": r.truncated("chosen"), "rejected_truncated": r.truncated("rejected")}
    if r.has("prompt"):
        prompt = r.prompt(r.row["prompt"])
        chosen = r.response(chosen_raw, "chosen")
        rejected = r.response(rejected_raw, "rejected")
        r.done()
        chosen_context = _strip_repeated_prompt(prompt, chosen[0])
        rejected_context = _strip_repeated_prompt(prompt, rejected[0])
        if chosen_context != rejected_context:
            raise RecordProblems(
                [
                    "chosen and rejected continue different conversations: the messages before "
                    "the final assistant turn must be the same (field rejected)"
                ]
            )
        full_prompt = _with_context(prompt, chosen_context)
        if not isinstance(full_prompt, str) and not r.prompt_ok(full_prompt, "chosen"):
            r.done()
        return [PreferencePair(prompt=full_prompt, chosen=chosen[1], rejected=rejected[1], margin=margin, **cut)]
    if "prompt" in r.row:
        r.require("prompt")  # an explicit null: say so rather than guess an implicit prompt
        r.done()
    # Implicit prompt: both fields are full texts or full conversations.
    if isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        chosen_text, rejected_text = r.text(chosen_raw, "chosen"), r.text(rejected_raw, "rejected")
        r.done()
        try:
            prompt, chosen_resp, rejected_resp = split_shared_prefix(chosen_text, rejected_text)
        except ValueError as exc:
            raise RecordProblems([f"{exc} (field prompt)"]) from None
        return [PreferencePair(prompt=prompt, chosen=chosen_resp, rejected=rejected_resp, margin=margin, **cut)]
    if isinstance(chosen_raw, (list, tuple)) and isinstance(rejected_raw, (list, tuple)):
        chosen = r.response(chosen_raw, "chosen")
        rejected = r.response(rejected_raw, "rejected")
        r.done()
        if chosen[0] != rejected[0]:
            raise RecordProblems(
                ["chosen and rejected must share every message but the last (assistant) one (field rejected)"]
            )
        if not chosen[0]:
            raise RecordProblems(
                [
                    "no prompt: the conversations hold only the assistant turn; add a 'prompt' field "
                    "or the user turn (field prompt)"
                ]
            )
        r.prompt_ok(chosen[0], "chosen")
        r.done()
        return [PreferencePair(prompt=chosen[0], chosen=chosen[1], rejected=rejected[1], margin=margin, **cut)]
    # Missing fields were reported by require(); otherwise the two have different shapes.
    for value, field in ((chosen_raw, "chosen"), (rejected_raw, "rejected")):
        if value is not None and not isinstance(value, (str, list, tuple)):
            r.response(value, field)
    if not r.problems:
        r.problems.append(
            "without a 'prompt' field, chosen and rejected must both be full texts or both full "
            "conversations (field prompt)"
        )
    r.done()
    raise AssertionError("unreachable")  # pragma: no cover


def _parse_ranked(r: _Row) -> list[PreferencePair]:
    prompt = r.prompt(r.require("prompt"))
    margin = r.margin()
    responses = r.row["responses"]
    if not isinstance(responses, (list, tuple)):
        r.problems.append(f"expected a list of {{text, label}} objects, got {json_kind(responses)} (field responses)")
        r.done()
    preferred: list[str] = []
    disliked: list[str] = []
    for i, item in enumerate(responses):
        field = f"responses[{i}]"
        if not isinstance(item, Mapping):
            r.problems.append(f"expected an object with text and label, got {json_kind(item)} (field {field})")
            continue
        text = None
        text_value = item.get("text")
        if text_value is None:
            r.problems.append(f"missing field '{field}.text'")
        else:
            text = r.text(text_value, f"{field}.text")
        label = item.get("label")
        if label is None:
            r.problems.append(f"missing field '{field}.label'")
        elif label not in LABELS:
            r.problems.append(f"label must be 'preferred' or 'disliked', got {_short(label)} (field {field}.label)")
        elif text is not None:
            (preferred if label == "preferred" else disliked).append(text)
    r.done()
    if len(preferred) != 1:
        raise RecordProblems(
            [f"a ranked record needs exactly one 'preferred' response, found {len(preferred)} (field responses)"]
        )
    if not disliked:
        raise RecordProblems(["a ranked record needs at least one 'disliked' response (field responses)"])
    return [PreferencePair(prompt=prompt, chosen=preferred[0], rejected=text, margin=margin) for text in disliked]


def _parse_messages_demonstration(r: _Row, value: Any) -> tuple[Prompt, str] | None:
    if not isinstance(value, (list, tuple)):
        r.problems.append(f"expected a list of messages, got {json_kind(value)} (field messages)")
        return None
    response = r.response(value, "messages")
    if response is None:
        return None
    context, text = response
    if not context:
        r.problems.append(
            "the conversation holds only the assistant turn: at least one message must come before it (field messages)"
        )
        return None
    if not r.prompt_ok(context, "messages"):
        return None
    return context, text


def parse_demonstration(row: Any) -> Demonstration:
    """A demonstration from ``{"prompt", "completion"}`` or ``{"messages"}`` (extra fields ignored)."""
    r = _Row(row)
    if r.has("completion") or (r.has("prompt") and not r.has("messages")):
        prompt = r.prompt(r.require("prompt"))
        completion = r.response(r.require("completion"), "completion")
        r.done()
        context = _strip_repeated_prompt(prompt, completion[0])
        full_prompt = _with_context(prompt, context)
        if not isinstance(full_prompt, str):
            r.prompt_ok(full_prompt, "completion")
            r.done()
        return Demonstration(prompt=full_prompt, completion=completion[1])
    if r.has("messages"):
        parsed = _parse_messages_demonstration(r, r.row["messages"])
        r.done()
        return Demonstration(prompt=parsed[0], completion=parsed[1], prompt_turns_are_demonstrations=True)
    if r.has("chosen") or r.has("responses"):
        raise RecordProblems(["a preference record is not a demonstration: missing field 'completion' (or 'messages')"])
    r.problems.append("missing field 'prompt' and 'completion' (or 'messages')")
    r.done()
    raise AssertionError("unreachable")  # pragma: no cover


def _other_columns(row: Mapping, prompt_field: str) -> dict[str, Any]:
    """The fields of a prompt row besides the prompt (a reference answer, say), for reward functions."""
    return {k: v for k, v in row.items() if k != prompt_field}


def parse_prompt(row: Any) -> PromptRecord:
    """A prompt from ``{"prompt"}``, ``{"messages"}`` or any preference/demonstration row."""
    r = _Row(row)
    if r.has("prompt"):
        prompt = r.prompt(r.row["prompt"])
        r.done()
        return PromptRecord(prompt=prompt, columns=_other_columns(r.row, "prompt"))
    if r.has("messages"):
        value = r.row["messages"]
        messages = r.messages(value, "messages")
        r.done()
        if messages[-1].role == "assistant":
            messages = messages[:-1]
        if not messages:
            r.problems.append("the conversation holds only the assistant turn: no prompt (field messages)")
        else:
            r.prompt_ok(messages, "messages")
        r.done()
        return PromptRecord(prompt=messages, columns=_other_columns(r.row, "messages"))
    if r.has("chosen") or r.has("rejected"):
        return PromptRecord(prompt=parse_preference(row)[0].prompt)
    r.problems.append("field 'prompt' is null" if "prompt" in r.row else "missing field 'prompt' (or 'messages')")
    r.done()
    raise AssertionError("unreachable")  # pragma: no cover


#: kind -> function turning one row into a list of records of that kind.
PARSERS: dict[str, Callable[[Any], list]] = {
    "preferences": parse_preference,
    "demonstrations": lambda row: [parse_demonstration(row)],
    "prompts": lambda row: [parse_prompt(row)],
}
