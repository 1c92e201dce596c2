"""Experience making for PPO: sample responses, then read every model once on the finished sequences.

One rollout, for a batch of left-padded queries:

1. **generate** with pure temperature sampling (``tether.generation``); cut each response after its
   first stop token (kept), pad after it; the mask comes from lengths, never from ``token == pad``;
2. **one no-grad pass per model** over ``query + response`` in chunks of ``forward_batch_size``:
   the policy (old log-probs, recomputed by the very function the update uses, same dtype and T, so
   the first minibatch has ratio ≡ 1), the reference (log-probs at the same T), the value model
   (values) and the reward model (score at the last real token = the stop token);
3. the per-token KL estimate, the score normalisation and the missing-stop penalty.

The result is one :class:`Rollout`: the batch the update reads. The learner adds the token rewards,
advantages and returns to it before the PPO epochs; :class:`RolloutSettings` holds every option of
experience making, :class:`~tether.ppo.models.RolloutModels` the networks it reads, and
:class:`PromptSampler` the training prompts and the order they are drawn in.

Layout of every forward: ``[query (P, left-padded) | response (R, right-padded)]`` with position ids
that count real tokens only, so the padding of a batch never changes a log-prob or a score. The
logits and values of response token ``t`` are read at position ``P − 1 + t``; the language-model head
runs on those positions only (``logits_to_keep``), not on the prompt.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from tether.config import ConfigError
from tether.data.errors import DataError
from tether.data.records import PromptRecord
from tether.data.templates import prompt_ids as render_prompt_ids
from tether.generation import GeneratedBatch, SamplingSettings, generate_batch
from tether.memory import run_fitting_memory
from tether.models.packing import model_attention_mask
from tether.models.scoring import normalise, position_ids_from_mask, token_scores
from tether.models.wrappers import adapters_disabled, unsharded
from tether.ppo.config import PPOConfig, PPOState
from tether.ppo.grouping import GroupedRows, generate_groups, group_rows
from tether.ppo.losses import apply_missing_stop_penalty, kl_estimator_name, kl_penalty, logprobs_from_logits
from tether.ppo.models import RolloutModels, response_logits
from tether.ppo.rewards import ProgrammableRewards, RewardFunctionError


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


def stop_token_scores(model: nn.Module, inputs: dict, lengths: torch.Tensor, rows: GroupedRows | None) -> torch.Tensor:
    """Score of each response at its stop token, ``[B]`` (float32), from plain or grouped ``inputs``
    (the keyword arguments of ``PolicyAndValue.forward``)."""
    if rows is None:
        args = (inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], inputs["prompt_width"])
        return last_token_scores(model, *args, lengths)
    mask = model_attention_mask(model, rows.allowed)
    scores = token_scores(model, rows.input_ids, mask, rows.position_ids)
    return scores.gather(1, rows.stop_columns(lengths).to(scores.device)).flatten().float()


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
    values: torch.Tensor | None  # old values (None: critic-free, no value model)
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
    #: k when the models read the k responses of a prompt in one row [prompt | response 1 | … | response k]
    #: (--num_generations k with --share_prompt, checked against plain rows); 1: plain rows
    group_size: int = 1
    # set by the learner before the update (``PPOTrainer.estimate_advantages``); ``logprobs`` and
    # ``values`` above are the old log-probs and old values the update's ratios and clips start from
    rewards: torch.Tensor | None = None  # per-token rewards r_t
    advantages: torch.Tensor | None = None  # whitened advantages Â_t (critic-free: the estimator's)
    returns: torch.Tensor | None = None  # value targets (advantages before whitening + values); critic-free: None
    #: False where the combined reward is missing (every --reward_funcs returned None and no reward model):
    #: such a response enters no baseline and gets advantage 0; None: all valid
    valid: torch.Tensor | None = None

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

    def sequences(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, position_ids)`` of ``[query | response]`` for ``rows``."""
        return self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows]

    def forward_inputs(self, rows: torch.Tensor) -> dict:
        """The keyword arguments of ``PolicyAndValue.forward`` for ``rows``: plain ``[query | response]``
        rows, or grouped rows when ``group_size`` > 1 (``rows`` then holds whole groups, in order)."""
        if self.group_size > 1:
            k = self.group_size
            args = (self.query_ids[rows], self.query_mask[rows], self.responses[rows], self.response_mask[rows])
            return group_rows(*args, k).forward_inputs()
        input_ids, attention_mask, position_ids = self.sequences(rows)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "prompt_width": self.prompt_width,
        }

    def all_finite(self) -> bool:
        """Scores, rewards, log-probs and values are finite on every real token (this process only)."""
        mask = self.response_mask
        return bool(
            torch.isfinite(self.scores).all()
            and torch.isfinite(self.rewards[mask]).all()
            and torch.isfinite(self.logprobs[mask]).all()
            and torch.isfinite(self.ref_logprobs[mask]).all()
            and (self.values is None or torch.isfinite(self.values[mask]).all())
        )

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


# ---------------------------------------------------------------------------------------------
# settings and prompts
# ---------------------------------------------------------------------------------------------
@dataclass
class RolloutSettings:
    """Every option of experience making. ``generation_batch_size`` / ``forward_batch_size`` (None:
    the whole batch at once) are halved after an out-of-memory error; the trainer keeps the sizes
    that fitted for the next rollout."""

    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    kl_estimator: str = "k1"  # --kl_penalty
    missing_stop_penalty: float | None = None  # --missing_eos_penalty
    logprobs_from_sampling: bool = False  # --rollout_logprobs generation
    generation_batch_size: int | None = None
    forward_batch_size: int | None = None
    #: k (--num_generations) when the k responses of a prompt may share it (--share_prompt); 1: plain rows
    group_size: int = 1
    #: whether grouped rows reproduce plain rows on this model: None until checked on the first batch
    shared_rows: bool | None = None
    #: seconds the check took (once per run)
    shared_rows_check_seconds: float = 0.0

    @classmethod
    def from_config(cls, cfg, tokenizer, per_process_batch: int, say: Callable[[str], None] = print) -> RolloutSettings:
        """The settings of a ``PPOConfig``; ``say`` warns about options that bias the PPO ratio."""
        extra = []
        if cfg.stop_token not in (None, "", "eos"):
            extra.append(stop_token_id(tokenizer, cfg.stop_token))
        if cfg.top_k or cfg.top_p < 1.0:  # PPOConfig refuses these without --allow_biased_rollout
            say(
                "top_k/top_p change the sampling distribution away from softmax(logits/T): the PPO ratio "
                "and the KL are biased (--allow_biased_rollout)"
            )
        fixed = cfg.response_length is not None
        sampling = SamplingSettings(
            max_new_tokens=cfg.response_length if fixed else cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            extra_stop_token_ids=extra,
            fixed_length=fixed,
            cache_implementation=cfg.generation_cache if cfg.generation_cache == "static" else None,
        )
        return cls(
            sampling=sampling,
            kl_estimator=cfg.kl_penalty,
            missing_stop_penalty=cfg.missing_eos_penalty,
            logprobs_from_sampling=cfg.rollout_logprobs == "generation",
            generation_batch_size=cfg.generation_batch_size or per_process_batch,
            forward_batch_size=cfg.forward_batch_size or per_process_batch,
            group_size=cfg.num_generations if cfg.share_prompt else 1,
        )


def stop_token_id(tokenizer, token: str) -> int:
    """The id of ``--stop_token`` (a token string, or an id); a ConfigError unless it is one token."""
    tok = tokenizer
    if token.isdigit() and int(token) < len(tok):
        return int(token)
    tid = tok.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid != tok.unk_token_id:
        return tid
    ids = tok(token, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and (ids[0] != tok.unk_token_id or token == tok.unk_token):
        return ids[0]
    raise ConfigError(f"--stop_token {token!r} is not a single token of this tokenizer (it encodes to {ids})")


class PromptSampler:
    """The training prompts, rendered to token ids once, and the order the iterations draw them in:
    a fresh seeded permutation per pass over the data, the same on every process."""

    def __init__(self, cfg: PPOConfig, tokenizer, prompts: Sequence | None = None):
        self.config = cfg
        if prompts is None:
            if cfg.dataset is None or str(cfg.dataset).strip() == "":
                raise ConfigError(
                    "--dataset is required for `tether ppo` (a .jsonl/.json/.parquet/.csv file of prompts, a folder "
                    "of them, or a Hugging Face dataset name), or pass the prompts from Python "
                    "(PPOTrainer(config, prompts) / run_ppo(config, prompts))"
                )
            from tether.data.loading import load_prompts

            prompts = load_prompts(cfg.dataset, cfg.dataset_split, cfg.dataset_config)
        elif not isinstance(prompts, (list, tuple)):  # a datasets.Dataset: rows checked like a file's
            from tether.data.loading import load_prompts

            prompts = load_prompts(prompts, cfg.dataset_split)
        records = [
            p if isinstance(p, PromptRecord) else PromptRecord(p, origin=f"prompts[{i}]") for i, p in enumerate(prompts)
        ]
        if not records:
            raise DataError([f"{cfg.dataset or 'prompts'}: no prompts"])
        ids, problems = [], []
        for r in records:
            tokens = render_prompt_ids(tokenizer, r.prompt, cfg.max_prompt_length)
            if not tokens:
                problems.append(f"{r.origin}: the prompt renders to no tokens")
            ids.append(tokens)
        if problems:
            raise DataError(problems)
        self.prompts, self.prompt_token_ids = [r.prompt for r in records], ids
        self.columns = [r.columns for r in records]
        #: every other column of the prompt rows (a row without one passes None for it)
        self.column_names = sorted({name for c in self.columns for name in c})
        self._order: tuple[int, torch.Tensor] | None = None  # (data epoch, prompt order)

    def __len__(self) -> int:
        return len(self.prompts)

    def next_batch(self, state: PPOState, rank: int, per_process: int) -> tuple[list, list[list[int]], dict]:
        """Process ``rank``'s share of the next global batch: ``(prompts, token ids, columns)``, one entry
        per response; advances ``state.data_epoch/data_position``.

        With ``--num_generations k`` the global batch of ``batch_size`` responses holds ``batch_size / k``
        prompts; each process takes its whole prompts and repeats each k times contiguously (the group
        layout of the critic-free estimators). ``columns`` maps each other column of the prompt rows to
        its values, for the reward functions.
        """
        cfg, st = self.config, state
        k = cfg.num_generations
        n, wanted = len(self.prompts), cfg.batch_size // k
        chosen = []
        while len(chosen) < wanted:
            if st.data_position >= n:
                st.data_epoch, st.data_position = st.data_epoch + 1, 0
            if self._order is None or self._order[0] != st.data_epoch:
                seed = cfg.seed + 7919 * st.data_epoch
                self._order = (st.data_epoch, torch.randperm(n, generator=torch.Generator().manual_seed(seed)))
            order = self._order[1]
            take = min(wanted - len(chosen), n - st.data_position)
            chosen += order[st.data_position : st.data_position + take].tolist()
            st.data_position += take
        share = per_process // k
        mine = [i for i in chosen[rank * share : (rank + 1) * share] for _ in range(k)]
        columns = {name: [self.columns[i].get(name) for i in mine] for name in self.column_names}
        return [self.prompts[i] for i in mine], [self.prompt_token_ids[i] for i in mine], columns


# ---------------------------------------------------------------------------------------------
# the rollout
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def score_responses(
    models: RolloutModels,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    generated: GeneratedBatch,
    settings: RolloutSettings,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    prompts: list | None = None,
    group_size: int = 1,
) -> Rollout:
    """Everything PPO needs about sampled responses, from one no-grad pass of each model.

    ``group_size`` k > 1: each model reads the k responses of a prompt in one grouped row
    (:mod:`tether.ppo.grouping`; the queries repeat k times contiguously) and the rollout records it,
    so that the update reads them the same way.

    ``models.reference`` None means "the policy with its LoRA adapters disabled",
    ``models.reward_model`` None "the (LoRA) value model with its adapters disabled". When
    ``generated`` carries the log-probs computed while sampling, they are used as the old log-probs
    and the policy's own pass is skipped (the value model still runs); they equal the training
    forward to ~1e-6 in fp32 rather than bitwise, so the first minibatch's ratio is 1 only to that
    precision. The passes run on ``settings.forward_batch_size`` rows at a time (None: all), halved
    after an out-of-memory error (:func:`tether.memory.run_fitting_memory`);
    ``Rollout.forward_batch_size`` records the size that fitted.
    """
    policy_and_value, reference, reward_model = models.policy_and_value, models.reference, models.reward_model
    temperature, kl_estimator = settings.sampling.temperature, settings.kl_estimator
    width = int(generated.lengths.max())  # nothing beyond the longest response is ever real
    responses = generated.responses[:, :width]
    response_mask = generated.mask[:, :width]
    input_ids, attention_mask, position_ids = build_sequences(query_ids, query_mask, responses, response_mask)
    prompt_width = query_ids.shape[1]
    n = input_ids.shape[0]
    full = kl_estimator_name(kl_estimator) == "full"
    reuse = generated.logprobs is not None and not full and policy_and_value.value_head is None
    sampled_logprobs = generated.logprobs[:, :width] if reuse else None

    def score_in_chunks(size: int) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("logprobs", "ref_logprobs", "values", "kl", "pen", "score", "ensemble")
        }
        # The policy stays in its training mode: the old log-probs come from exactly the computation the
        # update will repeat (dropout is off in every model, so the mode changes nothing else).
        for rows in _chunks(n, max(group_size, size // group_size * group_size)):  # whole groups per chunk
            if group_size > 1:
                args = (query_ids[rows], query_mask[rows], responses[rows], response_mask[rows])
                grouped = group_rows(*args, group_size)
                inputs = grouped.forward_inputs()
            else:
                grouped = None
                inputs = {
                    "input_ids": input_ids[rows],
                    "attention_mask": attention_mask[rows],
                    "position_ids": position_ids[rows],
                    "prompt_width": prompt_width,
                }
            mask = response_mask[rows]
            tokens = responses[rows]
            lengths = generated.lengths[rows]
            with autocast():
                logits, values = policy_and_value(**inputs, with_logits=not reuse)
                if reference is None:
                    with adapters_disabled(policy_and_value.policy):
                        ref_logits = response_logits(policy_and_value.policy, **inputs)
                else:
                    ref_logits = response_logits(reference, **inputs)
                if models.without_reward_model:  # only --reward_funcs score (added by the trainer)
                    score = torch.zeros(len(tokens), device=tokens.device)
                elif reward_model is None:
                    with adapters_disabled(policy_and_value.value_model):
                        score = stop_token_scores(policy_and_value.value_model, inputs, lengths, grouped)
                else:
                    score = stop_token_scores(reward_model, inputs, lengths, grouped)
            logp = sampled_logprobs[rows] if reuse else logprobs_from_logits(logits, tokens, temperature)
            ref_logp = logprobs_from_logits(ref_logits, tokens, temperature)
            pen = kl_penalty(logp, ref_logp, kl_estimator, logits, ref_logits, temperature)
            reported = pen if full else logp - ref_logp
            zeros = torch.zeros_like(logp)
            out["logprobs"].append(torch.where(mask, logp, zeros))
            out["ref_logprobs"].append(torch.where(mask, ref_logp, zeros))
            if values is not None:  # None: critic-free, no value model
                out["values"].append(torch.where(mask, values, zeros))
            out["kl"].append(torch.where(mask, reported, zeros))
            out["pen"].append(torch.where(mask, pen, zeros))
            out["score"].append(score)
            if models.ensemble:  # the other reward models of an ensemble, read at the same stop token
                with autocast():
                    out["ensemble"].append([stop_token_scores(m, inputs, lengths, grouped) for m, _ in models.ensemble])
            del logits, ref_logits
        return out

    out, size = run_fitting_memory(
        score_in_chunks, settings.forward_batch_size or n, "the rollout's scoring pass (--forward_batch_size)"
    )
    raw_scores = torch.cat(out["score"])
    scores = normalise(raw_scores, models.reward_stats) if models.reward_stats is not None else raw_scores
    scores = apply_missing_stop_penalty(scores, generated.stopped, settings.missing_stop_penalty)
    extras = {}
    if models.ensemble:  # each member normalised with its own statistics, then the same missing-stop penalty
        members = [torch.cat([chunk[i] for chunk in out["ensemble"]]) for i in range(len(models.ensemble))]
        extras["ensemble_scores"] = [
            apply_missing_stop_penalty(
                normalise(s, stats) if stats is not None else s, generated.stopped, settings.missing_stop_penalty
            )
            for s, (_, stats) in zip(members, models.ensemble)
        ]
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
        values=torch.cat(out["values"]) if out["values"] else None,
        kl=torch.cat(out["kl"]),
        kl_penalty=torch.cat(out["pen"]),
        raw_scores=raw_scores,
        scores=scores,
        prompts=prompts,
        forward_batch_size=size,
        extras=extras,
        group_size=group_size,
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device (CUDA) to finish, so that wall-clock times measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def shared_rows_match(
    models: RolloutModels,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    generated: GeneratedBatch,
    settings: RolloutSettings,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[bool, str]:
    """Whether grouped rows give the plain rows' log-probs, reference log-probs, values and scores on the
    first group of a rollout (within 1e-3 in fp32, 5e-2 in 16-bit), and if not, why."""
    k = settings.group_size
    m = min(len(generated.lengths), k)
    sample = generated.rows(slice(0, m))
    args = (models, query_ids[:m], query_mask[:m], sample, settings)
    try:
        grouped = score_responses(*args, autocast=autocast, group_size=k)
    except (NotImplementedError, RuntimeError, ValueError, TypeError) as exc:
        return False, f"the model does not run grouped rows ({exc})"
    plain = score_responses(*args, autocast=autocast)
    dtype = next(models.policy_and_value.parameters()).dtype
    tol = 1e-3 if dtype == torch.float32 and not _autocasting(autocast) else 5e-2
    for name in ("logprobs", "ref_logprobs", "values", "raw_scores"):
        a, b = getattr(grouped, name), getattr(plain, name)
        if a is None:
            continue
        worst = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
        if not worst <= tol:  # also catches NaN
            return False, f"grouped rows differ from plain rows in {name} by {worst:.3g} (tolerance {tol:g})"
    return True, ""


def _autocasting(autocast: Callable[[], contextlib.AbstractContextManager]) -> bool:
    with autocast():
        return torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu")


def sample_responses(
    models: RolloutModels,
    tokenizer,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    settings: RolloutSettings,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> GeneratedBatch:
    """One response per query from the policy, in the precision the update computes it in; with
    ``settings.group_size`` k > 1 each run of repeated queries is prefilled once
    (:func:`~tether.ppo.grouping.generate_groups`, which also serves distinct queries)."""
    policy = models.policy_and_value.policy
    # under FSDP the policy is gathered whole for the block: each process decodes as long as its responses need
    with autocast(), unsharded(policy):
        sampling = (tokenizer, query_ids, query_mask, settings.sampling)
        if settings.group_size > 1 and query_ids.shape[1] > 1 and settings.sampling.cache_implementation is None:
            return generate_groups(
                policy,
                *sampling,
                settings.group_size,
                settings.generation_batch_size,
                return_logprobs=settings.logprobs_from_sampling,
            )
        return generate_batch(
            policy, *sampling, settings.generation_batch_size, return_logprobs=settings.logprobs_from_sampling
        )


def make_rollout(
    models: RolloutModels,
    tokenizer,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    settings: RolloutSettings,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    prompts: list | None = None,
    agree: Callable[[bool], bool] = bool,
    say: Callable[[str], None] = print,
) -> Rollout:
    """Sample one response per query with the policy (:func:`sample_responses`), then
    :func:`score_responses`; times both phases
    (on CUDA after a synchronisation, so the times are the device's).

    ``settings.logprobs_from_sampling``: take the old log-probs from the sampler's logits instead of a
    separate policy pass (saves one forward; exact only to ~1e-6, see :func:`score_responses`).

    ``settings.group_size`` k > 1 (the queries repeat k times contiguously): each prompt is prefilled
    once for its k samples (:func:`~tether.ppo.grouping.generate_groups`), and the models read the k
    responses in one grouped row once :func:`shared_rows_match` has confirmed, on the first rollout,
    that this reproduces plain rows (``agree`` makes every process take the same decision; ``say``
    gives the reason for falling back to plain rows).
    """
    k = settings.group_size
    start = time.perf_counter()
    generated = sample_responses(models, tokenizer, query_ids, query_mask, settings, autocast=autocast)
    synchronize(query_ids.device)
    generated_at = time.perf_counter()
    if k > 1 and settings.shared_rows is None:
        ok, reason = shared_rows_match(models, query_ids, query_mask, generated, settings, autocast)
        settings.shared_rows = agree(ok)
        settings.shared_rows_check_seconds = time.perf_counter() - generated_at
        if not settings.shared_rows:
            say(f"scoring and training the {k} responses of a prompt as separate rows: {reason or 'another process'}")
    rollout = score_responses(
        models,
        query_ids,
        query_mask,
        generated,
        settings,
        autocast=autocast,
        prompts=prompts,
        group_size=k if k > 1 and settings.shared_rows else 1,
    )
    synchronize(query_ids.device)
    rollout.generation_batch_size = generated.batch_size
    rollout.time_generate = generated_at - start
    rollout.time_score = time.perf_counter() - generated_at
    return rollout


@torch.no_grad()
def reward_model_scores(
    models: RolloutModels,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    generated: GeneratedBatch,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Raw reward-model scores ``[B]`` (float32) of responses, read at their last token as
    :func:`score_responses` reads them, without its policy, reference and value passes (for the
    statistics of the reward, which need nothing else)."""
    width = int(generated.lengths.max())
    input_ids, attention_mask, position_ids = build_sequences(
        query_ids, query_mask, generated.responses[:, :width], generated.mask[:, :width]
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "prompt_width": query_ids.shape[1],
    }
    with autocast():
        if models.reward_model is None:  # the LoRA value model with its adapters disabled
            with adapters_disabled(models.policy_and_value.value_model):
                return stop_token_scores(models.policy_and_value.value_model, inputs, generated.lengths, None)
        return stop_token_scores(models.reward_model, inputs, generated.lengths, None)


@torch.no_grad()
def reward_model_scores_of_sequences(
    models: RolloutModels,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    pad_id: int,
    batch_size: int,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Raw reward-model scores ``[B]`` (float32) of whole ``prompt + response`` token sequences, read at
    their last token as :func:`reward_model_scores` reads a rollout's. The responses of one prompt (in
    consecutive rows) are read as one segment, the prompt once and each response seeing it and not the
    others (``tether.models.scoring.score_sequences``, checked against plain rows once per model), so
    scoring several responses of each prompt costs P + Σ|r| tokens instead of N·P + Σ|r| and no
    padding. Not for sharded models: the check's extra passes would differ between processes."""
    from tether.models.scoring import score_sequences

    with autocast():
        if models.reward_model is None:  # the LoRA value model with its adapters disabled
            with adapters_disabled(models.policy_and_value.value_model):
                model = models.policy_and_value.value_model
                return score_sequences(model, sequences, pad_id, batch_size, prompt_lengths).float()
        return score_sequences(models.reward_model, sequences, pad_id, batch_size, prompt_lengths).float()


def first_error_message(message: str) -> str:
    """The first non-empty ``message`` over the processes (in rank order), when some process failed;
    a collective, so every process must call it (the single-process case returns ``message``)."""
    from accelerate.state import PartialState

    if PartialState().num_processes == 1:
        return message
    from accelerate.utils import gather_object

    failed = [(rank, m) for rank, m in enumerate(gather_object([message])) if m]
    return f"{failed[0][1]} (on process {failed[0][0]})" if failed else "a reward function failed on a process"


def add_programmable_rewards(
    batch: Rollout,
    rewards: ProgrammableRewards,
    tokenizer,
    columns: dict[str, list],
    all_ok: Callable[[bool], bool],
) -> None:
    """Replace ``batch.scores`` by the combination of the reward model's score and ``--reward_funcs``
    (the prompt rows' other ``columns`` reach the functions); set ``batch.valid`` and the component
    sums the metrics reduce. ``all_ok`` (True on every process) makes every process stop together
    when a function fails on one of them, so that none waits in a collective."""
    error, scored = None, None
    try:
        model_scores = [batch.scores, *batch.extras.get("ensemble_scores", [])]
        scored = rewards.score(model_scores, batch.prompts, batch.response_texts(tokenizer), columns)
    except RewardFunctionError as exc:
        error = exc
    if not all_ok(error is None):
        # every process stops with the first failing process's message (the function and its example)
        raise RewardFunctionError(first_error_message(str(error) if error else ""))
    batch.scores, batch.valid = scored.scores, scored.valid
    batch.extras["reward_components"] = (rewards.names, scored.component_sums)
