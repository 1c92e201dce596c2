"""From records to the exact token sequences every stage trains and scores on.

One rule everywhere (SFT, RM, PPO scoring, DPO, serving), so the reward model scores PPO's
responses on the same token boundaries it was trained on (PPO checklist item 14):

    tokens = prompt_ids(prompt) + response_ids(response)     response ends with the stop token

* a prompt given as chat messages goes through the tokenizer's own chat template with the
  generation prompt added; a plain-text prompt is sent as one user turn when the tokenizer has a
  chat template and used raw otherwise;
* a response is its text tokenised on its own (no special tokens) followed by the stop token
  (``tokenizer.eos_token_id``; for SmolLM2-Instruct that is ``<|im_end|>``, the end of the turn).

A multi-turn demonstration (``conversation_prompt_ids``) continues the same rule turn by turn: each
earlier assistant turn is ``response_ids`` of its text, between turns come the tokens the chat
template renders (the next user turn, the generation prompt), so every assistant turn is tokenised
as the model would have generated it.

Long pairs are fitted by one rule too (``Truncation``): the prompt is cut from the left or the pair
is dropped, never the response, so every sequence trained or scored ends with the stop token. The
one exception is a response that was already cut when it was sampled (a preference pair's
``chosen_truncated``/``rejected_truncated``, PPO's responses that hit ``max_new_tokens``): it ends
where it was cut, and is scored there, as PPO's rollout scores it.

Masks are always built from lengths, never from ``token == pad``: SmolLM2 pads with its stop token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from tether.config import TRUNCATION_MODES
from tether.data.records import Message, Prompt

T = TypeVar("T")


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m.role, "content": m.content} for m in prompt]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer, prompt: Prompt) -> str:
    """The prompt as the model sees it, ending where the response starts."""
    if isinstance(prompt, str) and not has_chat_template(tokenizer):
        return prompt
    if not has_chat_template(tokenizer):
        # Messages for a model without a template: a plain transcript.
        return "".join(f"{m.role}: {m.content}\n" for m in prompt) + "assistant: "
    return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, prompt: Prompt, max_prompt_length: int | None = None) -> list[int]:
    """Token ids of the rendered prompt; cut from the left so the end (the question) is kept."""
    ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = ids[-max_prompt_length:]
    return ids


def stop_token_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path} has no eos token to end responses with")
    return int(tokenizer.eos_token_id)


def pad_token_id(tokenizer) -> int:
    """The padding id: the tokenizer's own, else the stop token. Masks never come from ``token == pad``
    (SmolLM2 pads with its stop token), so the choice only fills positions that every mask leaves out."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else stop_token_id(tokenizer)


def response_ids(tokenizer, response: str, add_stop: bool = True) -> list[int]:
    """Token ids of a response, ending with the stop token so the model learns (and is scored) at a stop."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [stop_token_id(tokenizer)] if add_stop else ids


@dataclass(frozen=True)
class Truncation:
    """How a prompt and its response(s) are fitted into ``max_length`` tokens. Never by cutting a
    response: its last token is the stop token, where the SFT loss ends, the reward model reads its
    score and DPO's log-probability sums end.

    * ``prompt`` (the default): the prompt is cut from the left (its end, the question and the
      generation prompt, is kept) to ``max_prompt_length``, then further until prompt + response fit,
      but never below ``min_prompt_length`` tokens; a pair whose response does not fit beside that
      much prompt is dropped.
    * ``drop`` (TRL's reward trainer): nothing is cut; a prompt over ``max_prompt_length`` or a
      prompt + response over ``max_length`` drops the pair.

    ``None`` limits are no limit. Several responses sharing one prompt (a preference pair) are fitted
    together by the longest, so they keep the same prompt tokens.
    """

    mode: str = "prompt"
    max_length: int | None = None
    max_prompt_length: int | None = None
    min_prompt_length: int = 64

    def __post_init__(self):
        if self.mode not in TRUNCATION_MODES:
            raise ValueError(f"--truncation {self.mode!r}: use one of {', '.join(TRUNCATION_MODES)}")
        if self.min_prompt_length < 1:
            raise ValueError(f"--min_prompt_length {self.min_prompt_length}: must be at least 1")

    def prompt_tokens_kept(self, n_prompt: int, n_response: int) -> int | None:
        """Tokens kept from the end of an ``n_prompt``-token prompt beside an ``n_response``-token
        response (stop token included), or None when the pair is dropped. With ``L`` = max_length,
        ``P`` = max_prompt_length, ``m`` = min_prompt_length (missing limits = ∞):

            prompt:  k = min(n_prompt, P, L − n_response),  dropped if k < min(n_prompt, P, m)
            drop:    k = n_prompt,                          dropped if n_prompt > P or n_prompt + n_response > L
        """
        inf = float("inf")
        cap_length = inf if self.max_length is None else self.max_length
        cap_prompt = inf if self.max_prompt_length is None else self.max_prompt_length
        if self.mode == "drop":
            fits = n_prompt <= cap_prompt and n_prompt + n_response <= cap_length
            return n_prompt if fits else None
        kept = min(n_prompt, cap_prompt, cap_length - n_response)
        return int(kept) if kept >= min(n_prompt, cap_prompt, self.min_prompt_length) else None

    def fit_prompt(self, prompt: Sequence[T], *responses: Sequence) -> list[T] | None:
        """The end of ``prompt`` that fits beside every one of ``responses`` (:meth:`prompt_tokens_kept`
        for the longest), or None when the pair is dropped. ``prompt`` may be any per-token list."""
        kept = self.prompt_tokens_kept(len(prompt), max(len(r) for r in responses))
        return None if kept is None else list(prompt[len(prompt) - kept :])

    def describe(self) -> str:
        """The options a user changes to keep more of the data, for messages."""
        return f"--max_length {self.max_length}, --max_prompt_length {self.max_prompt_length}, --truncation {self.mode}"


class PairDoesNotFit(ValueError):
    """A prompt + response that cannot be fitted into ``max_length`` without cutting the response."""


def prompt_response_ids(
    tokenizer, prompt: Prompt, response: str, truncation: Truncation | None = None, stopped: bool = True
) -> tuple[list[int], int]:
    """``(ids, n_prompt_tokens)`` for prompt + response + stop token, the prompt cut by ``truncation``
    (none: nothing is cut). The last id is the stop token, unless ``stopped`` is False (a response cut at
    the token budget when sampled, which ends where it was cut); a pair that cannot fit raises
    ``PairDoesNotFit``."""
    p = prompt_ids(tokenizer, prompt)
    r = response_ids(tokenizer, response, add_stop=stopped)
    if truncation is not None:
        fitted = truncation.fit_prompt(p, r)
        if fitted is None:
            raise PairDoesNotFit(
                f"a {len(p)}-token prompt and a {len(r)}-token response do not fit "
                f"{truncation.describe()} without cutting the response's stop token"
            )
        p = fitted
    return p + r, len(p)


class TemplateError(ValueError):
    """A chat template that does not render earlier assistant turns the way they are trained."""


def assistant_turn_indices(prompt: Prompt) -> list[int]:
    """Positions of the assistant messages in a prompt that have a message before them."""
    if isinstance(prompt, str):
        return []
    return [i for i, m in enumerate(prompt) if m.role == "assistant" and i > 0]


def conversation_prompt_ids(tokenizer, prompt: Prompt) -> tuple[list[int], list[bool]]:
    """Token ids of a prompt holding earlier assistant turns, and per token whether it is one of them.

    For assistant turns at positions ``a_1 < ... < a_k`` of the messages ``m``:

        ids = T(text(m[:a_1])) + R(m[a_1]) + T(text(m[:a_2]) − text(m[:a_1]) − m[a_1] − stop) + R(m[a_2]) + ...
              + T(text(m) − ...)

    with ``text`` = ``prompt_text`` (chat template plus generation prompt), ``T`` = tokenise, ``R`` =
    ``response_ids`` (the turn's text and its stop token, the targets). Each rendering must begin
    with the previous one followed by the turn's text and the stop token; a template that rewrites
    earlier turns (trims them, drops reasoning, has no stop token there) raises ``TemplateError``.
    A prompt without such turns gives ``prompt_ids`` unchanged, all False.
    """
    turns = assistant_turn_indices(prompt)
    if not turns:
        ids = prompt_ids(tokenizer, prompt)
        return ids, [False] * len(ids)
    stop = tokenizer.convert_ids_to_tokens(stop_token_id(tokenizer))
    ids: list[int] = []
    is_turn: list[bool] = []
    done = ""  # the rendered text the ids cover so far
    for previous, end in zip([None, *turns], [*turns, len(prompt)]):
        text = prompt_text(tokenizer, prompt[:end])
        if not text.startswith(done):
            raise TemplateError(
                f"the chat template of {tokenizer.name_or_path} does not render the assistant turn "
                f"{prompt[previous].content[:40]!r} as its text followed by the stop token {stop!r}, "
                "so earlier assistant turns cannot be trained as they would be generated"
            )
        between = tokenizer(text[len(done) :], add_special_tokens=False)["input_ids"]
        ids += between
        is_turn += [False] * len(between)
        if end < len(prompt):
            turn = response_ids(tokenizer, prompt[end].content)
            ids += turn
            is_turn += [True] * len(turn)
            done = text + prompt[end].content + stop
    return ids, is_turn


def messages_from_dicts(items: list[dict]) -> tuple[Message, ...]:
    return tuple(Message(role=str(m["role"]), content=str(m["content"])) for m in items)
