"""PPO's reward normalisation, measured on the distribution PPO starts from.

The reward model's score is put in units where the starting policy's responses score N(0, 1)
(Ziegler et al. 2019, lm-human-preferences: gain and bias fitted on ~256 samples of the initial
policy at the PPO temperature). That scale is what gives β, the missing-stop score, the value clip
and the KL target their meaning. Before the first iteration PPO samples ``--reward_norm_samples``
responses from the starting policy on the training prompts at ``--temperature`` (or reads a
seeded sample of as many of ``--reward_norm_responses``, responses the caller already sampled from
that policy at that temperature), scores them as a rollout does (the raw score, read at the
response's last token; for the file, the reward model's pass alone, a prompt's consecutive responses
read as one shared-prompt segment by ``tether.ppo.rollout.reward_model_scores_of_sequences``) and fits

    mean = (1/n) Σ s_i,   std = sqrt((1/n) Σ (s_i − mean)²),   s' = (s − mean) / std   (gain 1/std, bias −mean/std)

(``tether.models.scoring.reward_stats`` / ``normalise``). With ``--reward_norm_samples 0`` the
statistics ``tether rm`` saved beside the reward model (its scores on its own training pairs, a
different distribution) are used as a fallback, and the log and ``ppo_summary.json`` say so.
The result is written to ``OUTPUT_DIR/reward_normalisation.json`` and reused on resume.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tether.config import ConfigError
from tether.data.templates import pad_token_id, stop_token_id
from tether.durable import write_json_atomic
from tether.generation import GeneratedBatch, left_pad
from tether.models.scoring import RewardStats, reward_stats
from tether.ppo.models import sharded_with_fsdp
from tether.ppo.rollout import (
    PromptSampler,
    RolloutSettings,
    reward_model_scores,
    reward_model_scores_of_sequences,
    sample_responses,
)

logger = logging.getLogger(__name__)

NORMALISATION_FILE = "reward_normalisation.json"
FROM_POLICY = "starting policy samples"
FROM_FILE = "starting policy samples (--reward_norm_responses)"
FALLBACK = "reward model's training pairs (fallback: reward_stats.json from `tether rm`)"


def set_reward_normalisation(
    cfg,
    acc,
    models,
    tokenizer,
    prompts: PromptSampler,
    settings: RolloutSettings,
    resume_dir: Path | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Set ``models.reward_stats`` for the run and return its record (source, numbers) for the summary."""
    path = Path(cfg.output_dir) / NORMALISATION_FILE
    if not cfg.normalize_reward or models.without_reward_model:
        models.reward_stats = None
        return {"source": "none (raw scores)"}
    if resume_dir is not None and path.is_file():  # resumed: the statistics the run started with
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("mean") is not None:
            models.reward_stats = RewardStats(record["mean"], record["std"], record["count"], record["source"])
        return record
    if cfg.reward_norm_responses or cfg.reward_norm_samples > 0:
        scores, source = (
            _scores_of_file(cfg, acc, models, tokenizer, prompts, settings)
            if cfg.reward_norm_responses
            else _scores_of_samples(cfg, acc, models, tokenizer, prompts, settings)
        )
        stats = reward_stats(scores, source=source)
        if not stats.std > 0:
            raise ConfigError(
                f"reward normalisation: the reward model gave the same score ({stats.mean}) to all {stats.count} "
                "samples of the starting policy; it cannot rank them (check --reward_model_path)"
            )
        models.reward_stats = stats
    elif models.reward_stats is not None:
        stats = RewardStats(models.reward_stats.mean, models.reward_stats.std, models.reward_stats.count, FALLBACK)
        models.reward_stats = stats
        say(
            "reward normalisation: --reward_norm_samples 0, so the reward model's own statistics on its "
            "training pairs are used (a fallback: not the distribution PPO starts from)"
        )
    else:
        return {"source": "none (raw scores)"}
    record = {
        "source": stats.source,
        "mean": stats.mean,
        "std": stats.std,
        "count": stats.count,
        "gain": stats.gain,
        "bias": stats.bias,
        "temperature": cfg.temperature,
        "formula": "normalised = (score - mean) / std",
    }
    if acc.is_main_process:
        logger.info(
            "tether ppo: reward normalisation from %s: mean %.4f, std %.4f over %d responses",
            stats.source,
            stats.mean,
            stats.std,
            stats.count,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
    acc.wait_for_everyone()
    return record


def _gathered(acc, numbered: list[tuple[int, list[float]]]) -> torch.Tensor:
    """Every process's ``(chunk index, scores)``, from all processes, as one tensor in chunk order."""
    from accelerate.utils import gather_object

    everything = gather_object(numbered) if acc.num_processes > 1 else numbered
    ordered = sorted(everything, key=lambda chunk: chunk[0])
    return torch.tensor([x for _, scores in ordered for x in scores], dtype=torch.float64)


def _chunks_of_this_process(acc, count: int) -> list[int | None]:
    """The chunks ``k ≡ rank (mod processes)`` of ``count``; under FSDP padded with ``None`` (a repeat of
    chunk 0 whose result is dropped) to the same number on every process, because every sampling and
    forward pass of sharded networks is a collective that all processes must join."""
    mine: list[int | None] = list(range(acc.process_index, count, acc.num_processes))
    if sharded_with_fsdp(acc):
        mine += [None] * (-(-count // acc.num_processes) - len(mine))
    return mine


def _scores_of_samples(cfg, acc, models, tokenizer, prompts: PromptSampler, settings):
    """Raw scores of ``--reward_norm_samples`` fresh responses of the starting policy, one per prompt (prompts
    in a seeded order, cycled when there are fewer), read by the reward model alone.

    The prompts are cut into chunks of ``--batch_size`` (the global batch: the same on any number of
    processes); chunk k samples after ``torch.manual_seed(batch_seed(seed, k))`` inside a forked RNG, so
    training's random stream is untouched and the statistics do not depend on how many processes share
    the chunks.
    """
    from dataclasses import replace

    from tether.generation import batch_seed

    count, size = cfg.reward_norm_samples, cfg.batch_size
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed + 31337)).tolist()
    chosen = [order[i % len(order)] for i in range(count)]
    chunks = [chosen[start : start + size] for start in range(0, count, size)]
    whole = replace(  # one response per prompt: no group shares a prompt
        settings,
        group_size=1,
        generation_batch_size=cfg.generation_batch_size or size,
        forward_batch_size=cfg.forward_batch_size or size,
    )
    sharded = sharded_with_fsdp(acc)
    devices = [acc.device] if acc.device.type == "cuda" else []
    numbered: list[tuple[int, list[float]]] = []
    with torch.random.fork_rng(devices=devices):
        for k in _chunks_of_this_process(acc, len(chunks)):
            torch.manual_seed(batch_seed(cfg.seed, 0 if k is None else k))
            ids = [prompts.prompt_token_ids[i] for i in chunks[0 if k is None else k]]
            query_ids, query_mask = (t.to(acc.device) for t in left_pad(ids, pad_token_id(tokenizer)))
            generated = sample_responses(models, tokenizer, query_ids, query_mask, whole, autocast=acc.autocast)
            rows = len(ids)
            if sharded and rows < size:
                # every process must run as many forwards of the sharded reward model: a short last chunk is
                # scored filled up to the chunk's size with copies of its first row (their scores dropped)
                fill = torch.tensor(list(range(rows)) + [0] * (size - rows), device=query_ids.device)
                query_ids, query_mask = query_ids[fill], query_mask[fill]
                generated = generated.rows(fill)
            # only the reward model reads them (no policy, reference or value pass), forward_batch_size rows at a time
            step = whole.forward_batch_size
            parts = [slice(start, start + step) for start in range(0, len(generated.lengths), step)]
            scores = torch.cat(
                [
                    reward_model_scores(models, query_ids[p], query_mask[p], generated.rows(p), autocast=acc.autocast)
                    for p in parts
                ]
            )[:rows]
            if k is not None:
                numbered.append((k, scores.double().cpu().tolist()))
    return _gathered(acc, numbered), f"{FROM_POLICY} ({count} at T = {cfg.temperature})"


def _scores_of_file(cfg, acc, models, tokenizer, prompts: PromptSampler, settings):
    """Raw scores of the responses in ``--reward_norm_responses`` (JSON lines ``{"prompt", "response",
    "stopped"}``), tokenised as a rollout holds them: the response's tokens, then the stop token if it stopped."""
    from tether.data.templates import prompt_ids

    path = Path(cfg.reward_norm_responses)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--reward_norm_responses {path}: cannot read it ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, response, stopped = row["prompt"], str(row["response"]), bool(row["stopped"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path}:{number}: expected a JSON object with prompt, response and stopped ({exc!r})"
            ) from None
        if isinstance(prompt, list):
            from tether.data.records import Message

            prompt = tuple(Message(m["role"], m["content"]) for m in prompt)
        rows.append((prompt, response, stopped))
    if not rows:
        raise ConfigError(f"--reward_norm_responses {path}: no responses")
    in_file = len(rows)
    if 0 < cfg.reward_norm_samples < len(rows):  # a seeded sample of --reward_norm_samples of them
        picked = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + 31337))
        rows = [rows[i] for i in sorted(picked[: cfg.reward_norm_samples].tolist())]
    stop = stop_token_id(tokenizer)
    pad = pad_token_id(tokenizer)
    size = cfg.batch_size
    numbered: list[tuple[int, list[float]]] = []
    chunks = _chunks_of_this_process(acc, (len(rows) + size - 1) // size)
    if not sharded_with_fsdp(acc):
        # the file holds several responses of each prompt, one after another: each prompt is read once
        mine = [k for k in chunks if k is not None]
        my_rows = [row for k in mine for row in rows[k * size : (k + 1) * size]]
        prompts_ids = [prompt_ids(tokenizer, p, cfg.max_prompt_length) for p, _, _ in my_rows]
        # an empty response is read at a pad token, as a rollout's padded row reads it
        responses = [_response_ids(tokenizer, r, s, settings, stop) or [pad] for _, r, s in my_rows]
        scores = reward_model_scores_of_sequences(
            models,
            [p + r for p, r in zip(prompts_ids, responses)],
            [len(p) for p in prompts_ids],
            pad,
            size,
            autocast=acc.autocast,
        ).double()
        counts = [len(rows[k * size : (k + 1) * size]) for k in mine]
        for k, part in zip(mine, scores.split(counts)):
            numbered.append((k, part.tolist()))
        return _gathered(acc, numbered), f"{FROM_FILE}: {len(rows)} of the {in_file} responses in {path.name}"

    for k in chunks:  # sharded: every process runs the same passes, in padded rows
        chunk = rows[(k or 0) * size : ((k or 0) + 1) * size]
        query_ids, query_mask = (
            t.to(acc.device)
            for t in left_pad([prompt_ids(tokenizer, p, cfg.max_prompt_length) for p, _, _ in chunk], pad)
        )
        responses = [_response_ids(tokenizer, r, s, settings, stop) for _, r, s in chunk]
        width = max(1, max(len(r) for r in responses))
        padded = torch.tensor([r + [pad] * (width - len(r)) for r in responses], device=acc.device)
        lengths = torch.tensor([max(1, len(r)) for r in responses], device=acc.device)
        stopped = torch.tensor([s for _, _, s in chunk], device=acc.device)
        generated = GeneratedBatch(padded, lengths, stopped)
        scores = reward_model_scores(models, query_ids, query_mask, generated, autocast=acc.autocast)
        if k is not None:
            numbered.append((k, scores.double().cpu().tolist()))
    return _gathered(acc, numbered), f"{FROM_FILE}: {len(rows)} of the {in_file} responses in {path.name}"


def _response_ids(tokenizer, response: str, stopped: bool, settings, stop: int) -> list[int]:
    """A response as a rollout holds it: its tokens (within the token budget), then the stop token if it stopped."""
    budget = settings.sampling.max_new_tokens - int(stopped)
    return tokenizer(response, add_special_tokens=False)["input_ids"][:budget] + ([stop] if stopped else [])
