"""From records to the exact token sequences every stage trains and scores on.

One rule everywhere (SFT, RM, PPO scoring, DPO, serving), so the reward model scores PPO's
responses on the same token boundaries it was trained on (PPO checklist item 14):

    tokens = prompt_ids(prompt) + response_ids(response)     response ends with the stop token

* a prompt given as chat messages goes through the tokenizer's own chat template with the
  generation prompt added; a plain-text prompt is sent as one user turn when the tokenizer has a
  chat template and used raw otherwise;
* a response is its text tokenised on its own (no special tokens) followed by the stop token
  (``tokenizer.eos_token_id``; for SmolLM2-Instruct that is ``<|im_end|>``, the end of the turn).

A multi-turn demonstration (``conversation_ids``) continues the same rule turn by turn: each
earlier assistant turn is ``response_ids`` of its text, between turns come the tokens the chat
template renders (the next user turn, the generation prompt), so every assistant turn is tokenised
as the model would have generated it.

Masks are always built from lengths, never from ``token == pad``: SmolLM2 pads with its stop token.
"""

from __future__ import annotations

from tether.data.records import Message, Prompt


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


def prompt_response_ids(
    tokenizer, prompt: Prompt, response: str, max_length: int | None = None, max_prompt_length: int | None = None
) -> tuple[list[int], int, bool]:
    """``(ids, n_prompt_tokens, truncated)`` for prompt + response + stop token.

    When the pair is longer than ``max_length`` the response is cut from the right (losing its stop
    token) and ``truncated`` is True; callers count and warn. The prompt is first cut to
    ``max_prompt_length`` from the left so that at least part of the response always survives.
    """
    p = prompt_ids(tokenizer, prompt, max_prompt_length)
    r = response_ids(tokenizer, response)
    n_prompt, n_response, truncated = fit_lengths(len(p), len(r), max_length)
    return p[len(p) - n_prompt :] + r[:n_response], n_prompt, truncated


def fit_lengths(n_prompt: int, n_response: int, max_length: int | None) -> tuple[int, int, bool]:
    """``(prompt tokens kept from its end, response tokens kept from its start, truncated)`` within
    ``max_length``: the response is cut from the right, and the prompt only when it alone would fill
    ``max_length`` (at least one response token is kept)."""
    if max_length is None or n_prompt + n_response <= max_length:
        return n_prompt, n_response, False
    n_prompt = min(n_prompt, max_length - 1)
    return n_prompt, max_length - n_prompt, True


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


def conversation_ids(
    tokenizer, prompt: Prompt, response: str, max_length: int | None = None, max_prompt_length: int | None = None
) -> tuple[list[int], list[bool], int, bool]:
    """``(ids, is_target, n_prompt_tokens, truncated)``: ``prompt_response_ids`` where every assistant
    turn of the prompt (``conversation_prompt_ids``) is a target like the response; cut the same way."""
    p, p_turns = conversation_prompt_ids(tokenizer, prompt)
    if max_prompt_length is not None and len(p) > max_prompt_length:
        p, p_turns = p[-max_prompt_length:], p_turns[-max_prompt_length:]
    r = response_ids(tokenizer, response)
    n_prompt, n_response, truncated = fit_lengths(len(p), len(r), max_length)
    start = len(p) - n_prompt
    return p[start:] + r[:n_response], p_turns[start:] + [True] * n_response, n_prompt, truncated


def messages_from_dicts(items: list[dict]) -> tuple[Message, ...]:
    return tuple(Message(role=str(m["role"]), content=str(m["content"])) for m in items)
