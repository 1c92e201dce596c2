"""From records to the exact token sequences every stage trains and scores on.

One rule everywhere (SFT, RM, PPO scoring, DPO, serving), so the reward model scores PPO's
responses on the same token boundaries it was trained on (PPO checklist item 14):

    tokens = prompt_ids(prompt) + response_ids(response)     response ends with the stop token

* a prompt given as chat messages goes through the tokenizer's own chat template with the
  generation prompt added; a plain-text prompt is sent as one user turn when the tokenizer has a
  chat template and used raw otherwise;
* a response is its text tokenised on its own (no special tokens) followed by the stop token
  (``tokenizer.eos_token_id``; for SmolLM2-Instruct that is ``<|im_end|>``, the end of the turn).

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
    truncated = False
    if max_length is not None and len(p) + len(r) > max_length:
        truncated = True
        if len(p) >= max_length:  # keep at least one response token
            p = p[-(max_length - 1) :]
        r = r[: max_length - len(p)]
    return p + r, len(p), truncated


def messages_from_dicts(items: list[dict]) -> tuple[Message, ...]:
    return tuple(Message(role=str(m["role"]), content=str(m["content"])) for m in items)
