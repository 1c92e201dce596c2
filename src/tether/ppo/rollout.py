"""Experience making for PPO: sample responses, then read every model once on the finished sequences.

One rollout, for a batch of left-padded queries:

1. **generate** with pure temperature sampling (``tether.generation``); cut each response after its
   first stop token (kept), pad after it; the mask comes from lengths, never from ``token == pad``;
2. **one no-grad pass per model** over ``query + response`` in chunks of ``forward_batch_size``:
   the policy (old log-probs, recomputed by the very function the update uses, same dtype and T, so
   the first minibatch has ratio ≡ 1), the reference (log-probs at the same T), the value model
   (values) and the reward model (score at the last real token = the stop token);
3. the per-token KL estimate, the score normalisation and the missing-stop penalty.

Layout of every forward: ``[query (P, left-padded) | response (R, right-padded)]`` with position ids
that count real tokens only, so the padding of a batch never changes a log-prob or a score. The
logits and values of response token ``t`` are read at position ``P − 1 + t``; the language-model head
runs on those positions only (``logits_to_keep``), not on the prompt.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from tether.generation import GeneratedBatch, SamplingSettings, generate_batch
from tether.memory import run_fitting_memory
from tether.models.scoring import RewardStats, normalise, position_ids_from_mask, token_scores
from tether.models.wrappers import strip_peft, unwrap_distributed
from tether.ppo.losses import apply_missing_stop_penalty, kl_penalty, logprobs_from_logits


# ---------------------------------------------------------------------------------------------
# sequences and forwards
# ---------------------------------------------------------------------------------------------
def build_sequences(
    query_ids: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` for ``[query | response]``; positions count real tokens."""
    input_ids = torch.cat([query_ids, responses], dim=1)
    attention_mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    return input_ids, attention_mask, position_ids_from_mask(attention_mask)


@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def response_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_width: int,
) -> torch.Tensor:
    """Logits that predict each response token, ``[B, R, V]`` (position ``P − 1 + t`` predicts token ``t``)."""
    n_response = input_ids.shape[1] - prompt_width
    kwargs: dict[str, Any] = {}
    if _accepts_logits_to_keep(type(strip_peft(model))):
        kwargs["logits_to_keep"] = n_response + 1  # skip the LM head on the prompt
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    )
    logits = out.logits
    return logits[:, -(n_response + 1) : -1]


def response_values(
    value_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_width: int,
) -> torch.Tensor:
    """Scalar head output at the positions that predict each response token, ``[B, R]`` (float32)."""
    scores = token_scores(value_model, input_ids, attention_mask, position_ids)
    return scores[:, prompt_width - 1 : -1].float()


def last_token_scores(
    reward_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_width: int,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Reward-model score at the last real token of each response (its stop token), ``[B]`` (float32)."""
    scores = token_scores(reward_model, input_ids, attention_mask, position_ids)
    index = (prompt_width + lengths - 1).to(scores.device).unsqueeze(1)
    return scores.gather(1, index).squeeze(1).float()


class PolicyAndValue(nn.Module):
    """The two trained networks as one module (one optimiser, one DDP wrapper).

    The critic is either a separate scalar model (by default a copy of the whole reward model,
    backbone and head: Stiennon et al., InstructGPT; with LoRA, adapters and a trainable head copy
    on the frozen reward model itself) or a zero-initialised linear head on the policy's last hidden
    state (``value_head``, Ziegler et al.; saves one network).
    ``forward`` returns the response logits and values for a ``[query | response]`` batch; the
    rollout and the update both call it, so old and new log-probs come from the same computation.
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None, value_head: nn.Module | None = None):
        super().__init__()
        if (value_model is None) == (value_head is None):
            raise ValueError("give exactly one of value_model and value_head")
        self.policy = policy
        self.value_model = value_model
        self.value_head = value_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        prompt_width: int,
        with_values: bool = True,
        detach_trunk_for_values: bool = False,
        with_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.value_head is None:
            logits = (
                response_logits(self.policy, input_ids, attention_mask, position_ids, prompt_width)
                if with_logits
                else None
            )
            values = (
                response_values(self.value_model, input_ids, attention_mask, position_ids, prompt_width)
                if with_values
                else None
            )
            return logits, values
        captured: list[torch.Tensor] = []

        def keep_hidden(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = strip_peft(self.policy).get_decoder().register_forward_hook(keep_hidden)
        try:
            logits = response_logits(self.policy, input_ids, attention_mask, position_ids, prompt_width)
        finally:
            handle.remove()
        hidden = captured[-1][:, prompt_width - 1 : -1]
        if detach_trunk_for_values:  # critic warm-up: the value loss must not move the policy's trunk
            hidden = hidden.detach()
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float() if with_values else None
        return logits, values


def make_value_head(policy: nn.Module) -> nn.Linear:
    """A linear value head on the policy trunk, initialised to zero (OpenAI lm-human-preferences)."""
    config = strip_peft(policy).config
    hidden = config.get_text_config().hidden_size
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    param = next(policy.parameters())
    return head.to(device=param.device, dtype=param.dtype)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The network under a LoRA model's adapters: the reference of a LoRA policy, the reward model
    under a LoRA critic started from it."""
    with unwrap_distributed(model).disable_adapter():
        yield


# ---------------------------------------------------------------------------------------------
# the rollout
# ---------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One batch of experience (tensors ``[B, ...]`` on the training device).

    Per-token tensors are ``[B, R]`` and hold neutral values past each response's end (log-probs 0,
    values 0, KL 0); ``response_mask`` marks the real tokens, the stop token included.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    logprobs: torch.Tensor  # old policy log-probs at T
    ref_logprobs: torch.Tensor  # reference log-probs at T
    values: torch.Tensor  # old values
    kl: torch.Tensor  # per-token KL reported and controlled (k1, or exact with --kl_penalty full)
    kl_penalty: torch.Tensor  # per-token estimate that enters the rewards (--kl_penalty)
    raw_scores: torch.Tensor  # reward model output at the stop token
    scores: torch.Tensor  # after normalisation and the missing-stop penalty
    prompts: list | None = None  # the prompts as given (for hooks and logs), when known
    time_generate: float = 0.0
    time_score: float = 0.0
    #: chunk sizes that fitted in memory (the next rollout starts from them)
    generation_batch_size: int | None = None
    forward_batch_size: int | None = None
    extras: dict = field(default_factory=dict)

    @property
    def prompt_width(self) -> int:
        return self.query_ids.shape[1]

    def __len__(self) -> int:
        return self.responses.shape[0]

    def response_token_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.responses.cpu(), self.lengths.cpu().tolist())]

    def response_texts(self, tokenizer) -> list[str]:
        stop = self.stopped.cpu().tolist()
        return [
            tokenizer.decode(ids[:-1] if s else ids, skip_special_tokens=True)
            for ids, s in zip(self.response_token_lists(), stop)
        ]

    def prompt_token_lists(self) -> list[list[int]]:
        return [row[m.bool()].tolist() for row, m in zip(self.query_ids.cpu(), self.query_mask.cpu())]

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows ``index`` (tensors only; prompts follow when present)."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v[index] if isinstance(v, torch.Tensor) else v
        if self.prompts is not None:
            values["prompts"] = [self.prompts[i] for i in index.tolist()]
        return Rollout(**values)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def score_responses(
    *,
    models: PolicyAndValue,
    reference: nn.Module | None,
    reward_model: nn.Module | None,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    generated: GeneratedBatch,
    temperature: float,
    kl_estimator: str = "k1",
    forward_batch_size: int | None = None,
    reward_stats: RewardStats | None = None,
    missing_stop_penalty: float | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    prompts: list | None = None,
) -> Rollout:
    """Everything PPO needs about sampled responses, from one no-grad pass of each model.

    ``reference`` None means "the policy with its LoRA adapters disabled", ``reward_model`` None
    "the (LoRA) value model with its adapters disabled". When ``generated`` carries
    the log-probs computed while sampling, they are used as the old log-probs and the policy's own
    pass is skipped (the value model still runs); they equal the training forward to ~1e-6 in fp32
    rather than bitwise, so the first minibatch's ratio is 1 only to that precision.
    The passes run on ``forward_batch_size`` rows at a time (default: all), halved after an
    out-of-memory error (:func:`tether.memory.run_fitting_memory`); ``Rollout.forward_batch_size``
    records the size that fitted.
    """
    width = int(generated.lengths.max())  # nothing beyond the longest response is ever real
    responses = generated.responses[:, :width]
    response_mask = generated.mask[:, :width]
    input_ids, attention_mask, position_ids = build_sequences(query_ids, query_mask, responses, response_mask)
    prompt_width = query_ids.shape[1]
    n = input_ids.shape[0]
    full = {"kl": "k1", "mse": "k2"}.get(kl_estimator, kl_estimator) == "full"
    reuse = generated.logprobs is not None and not full and models.value_head is None
    sampled_logprobs = generated.logprobs[:, :width] if reuse else None

    def score_in_chunks(size: int) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("logprobs", "ref_logprobs", "values", "kl", "pen", "score")
        }
        # The policy stays in its training mode: the old log-probs come from exactly the computation the
        # update will repeat (dropout is off in every model, so the mode changes nothing else).
        for rows in _chunks(n, size):
            args = (input_ids[rows], attention_mask[rows], position_ids[rows])
            mask = response_mask[rows]
            tokens = responses[rows]
            with autocast():
                logits, values = models(*args, prompt_width=prompt_width, with_logits=not reuse)
                if reference is None:
                    with adapters_disabled(models.policy):
                        ref_logits = response_logits(models.policy, *args, prompt_width)
                else:
                    ref_logits = response_logits(reference, *args, prompt_width)
                if reward_model is None:
                    with adapters_disabled(models.value_model):
                        score = last_token_scores(models.value_model, *args, prompt_width, generated.lengths[rows])
                else:
                    score = last_token_scores(reward_model, *args, prompt_width, generated.lengths[rows])
            logp = sampled_logprobs[rows] if reuse else logprobs_from_logits(logits, tokens, temperature)
            ref_logp = logprobs_from_logits(ref_logits, tokens, temperature)
            pen = kl_penalty(logp, ref_logp, kl_estimator, logits, ref_logits, temperature)
            reported = pen if full else logp - ref_logp
            zeros = torch.zeros_like(logp)
            out["logprobs"].append(torch.where(mask, logp, zeros))
            out["ref_logprobs"].append(torch.where(mask, ref_logp, zeros))
            out["values"].append(torch.where(mask, values, zeros))
            out["kl"].append(torch.where(mask, reported, zeros))
            out["pen"].append(torch.where(mask, pen, zeros))
            out["score"].append(score)
            del logits, ref_logits
        return out

    out, size = run_fitting_memory(
        score_in_chunks, forward_batch_size or n, "the rollout's scoring pass (--forward_batch_size)"
    )
    raw_scores = torch.cat(out["score"])
    scores = normalise(raw_scores, reward_stats) if reward_stats is not None else raw_scores
    scores = apply_missing_stop_penalty(scores, generated.stopped, missing_stop_penalty)
    return Rollout(
        query_ids=query_ids,
        query_mask=query_mask,
        responses=responses,
        response_mask=response_mask,
        lengths=generated.lengths,
        stopped=generated.stopped,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logprobs=torch.cat(out["logprobs"]),
        ref_logprobs=torch.cat(out["ref_logprobs"]),
        values=torch.cat(out["values"]),
        kl=torch.cat(out["kl"]),
        kl_penalty=torch.cat(out["pen"]),
        raw_scores=raw_scores,
        scores=scores,
        prompts=prompts,
        forward_batch_size=size,
    )


def make_rollout(
    *,
    models: PolicyAndValue,
    reference: nn.Module | None,
    reward_model: nn.Module | None,
    tokenizer,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    settings: SamplingSettings,
    kl_estimator: str = "k1",
    generation_batch_size: int | None = None,
    forward_batch_size: int | None = None,
    reward_stats: RewardStats | None = None,
    missing_stop_penalty: float | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    prompts: list | None = None,
    synchronize: Callable[[], None] = lambda: None,
    logprobs_from_sampling: bool = False,
) -> Rollout:
    """Sample one response per query with the policy, then :func:`score_responses`; times both phases.

    ``logprobs_from_sampling``: take the old log-probs from the sampler's logits instead of a
    separate policy pass (saves one forward; exact only to ~1e-6, see :func:`score_responses`).
    """
    start = time.perf_counter()
    with autocast():  # sample in the precision the update computes the policy in
        generated = generate_batch(
            models.policy,
            tokenizer,
            query_ids,
            query_mask,
            settings,
            generation_batch_size,
            return_logprobs=logprobs_from_sampling,
        )
    synchronize()
    generated_at = time.perf_counter()
    rollout = score_responses(
        models=models,
        reference=reference,
        reward_model=reward_model,
        query_ids=query_ids,
        query_mask=query_mask,
        generated=generated,
        temperature=settings.temperature,
        kl_estimator=kl_estimator,
        forward_batch_size=forward_batch_size,
        reward_stats=reward_stats,
        missing_stop_penalty=missing_stop_penalty,
        autocast=autocast,
        prompts=prompts,
    )
    synchronize()
    rollout.generation_batch_size = generated.batch_size
    rollout.time_generate = generated_at - start
    rollout.time_score = time.perf_counter() - generated_at
    return rollout
