"""``tether bon``: best-of-N sampling. For each prompt, sample N responses from the policy, score
them with the reward model, keep the best.

Best-of-N needs no training and is the baseline every RLHF method is compared with (Gao et al.
2022; Stiennon et al. 2020). Its distance from the sampling policy is bounded analytically:

    KL(π_bon ‖ π) ≤ log N − (N − 1)/N          (Beirami et al. 2024: an upper bound, exact only
                                                 when the N samples are all distinct)

reported as ``kl/bon_bound`` next to the reward gain over plain sampling (the mean best score
minus the mean score of all samples, i.e. minus the N = 1 expectation), so best-of-N and PPO can
be placed on one KL axis.

The output, ``best_of_n.jsonl``, has one line per prompt with ``prompt`` (a string or a list of
messages, as given), ``completion`` (the best response), ``score`` and ``n`` (plus ``ranked``, every
sample with its score, best first, with ``--return_all``), so ``tether sft --dataset
OUT/best_of_n.jsonl`` fine-tunes on it directly (rejection-sampling fine-tuning).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.config import EMBEDDED_MODEL, ConfigError, ModelLoadingArguments
from tether.data.records import Prompt
from tether.data.templates import Truncation
from tether.generation import SamplingSettings
from tether.sampling import BestOfNResult, best_of_n, bon_kl_bound

logger = logging.getLogger(__name__)

OUTPUT_FILE = "best_of_n.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class BestOfNConfig(ModelLoadingArguments):
    model_name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={
            "help": "The policy to sample from: hub id, local folder "
            "(full model or PEFT adapter) or the embedded default."
        },
    )
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--reward_model_name_or_path", "--reward_model"],
            "help": "The reward model that ranks the samples (a `tether "
            "rm` output folder or any sequence-classification "
            "model with one label). Required.",
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "aliases": ["--prompts", "--dataset_name"],
            "help": "Prompts: a .jsonl/.json/.parquet/.csv file or folder whose records have a prompt or messages "
            "(preference and demonstration files work too), a Hugging Face dataset name, or embedded:demo (the "
            "demo task's prompts; --dataset_split test for the held-out ones). Required.",
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration (subset) of a Hugging Face or local dataset --dataset."}
    )
    dataset_split: str = field(
        default="train",
        metadata={
            "aliases": ["--dataset_train_split"],
            "help": "Split of a hub dataset, a folder of split files or embedded:demo.",
        },
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    n: int = field(default=4, metadata={"help": "Samples per prompt (N of best-of-N)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (pure sampling: top-k 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0 = off, the policy as is)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens per sampled response."})
    max_prompt_length: int = field(default=256, metadata={"help": "Maximum prompt tokens (cut from the left)."})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum prompt + response tokens when scoring (default: no limit). The prompt is cut from the "
            "left to fit, never the response: it must leave room for --max_new_tokens, the stop token and "
            "min(--max_prompt_length, 64) prompt tokens."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation call (each gives N sequences)."})
    reward_batch_size: int = field(default=16, metadata={"help": "Sequences per reward-model forward pass."})
    missing_stop_score: float | None = field(
        default=None,
        metadata={
            "help": "Score given to a response that hit --max_new_tokens without its stop token, replacing the reward "
            "model's (raw units). Default: score it as it is."
        },
    )
    return_all: bool = field(
        default=False, metadata={"help": "Also write every sample with its score, best first, under 'ranked'."}
    )
    dtype: str = field(
        default="float32", metadata={"help": "Weights dtype of both models: float32, bfloat16 or float16."}
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Random seed of the sampling: each --batch_size batch of prompts samples with a seed derived from "
            "it and the batch's index, so the responses are the same on any number of processes."
        },
    )
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even when a GPU is available."})
    output_dir: str | None = field(
        default=None, metadata={"help": f"Folder for {OUTPUT_FILE} and {SUMMARY_FILE} (default outputs/bon)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = "outputs/bon"
        if self.n < 1:
            raise ConfigError(f"--n {self.n}: need at least one sample per prompt")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top_p {self.top_p}: must lie in (0, 1]")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens {self.max_new_tokens}: must be >= 1")
        if self.batch_size < 1 or self.reward_batch_size < 1:
            raise ConfigError("--batch_size and --reward_batch_size must be >= 1")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"--max_prompts {self.max_prompts}: must be >= 1")
        room = self.max_new_tokens + 1 + min(self.max_prompt_length, Truncation.min_prompt_length)
        if self.max_length is not None and self.max_length < room:
            raise ConfigError(
                f"--max_length {self.max_length}: a response of --max_new_tokens {self.max_new_tokens} tokens, its "
                f"stop token and the end of its prompt need {room}; responses are scored whole, never cut"
            )


# --------------------------------------------------------------------------------------------
# The equation (the KL bound is tether.sampling.bon_kl_bound)
# --------------------------------------------------------------------------------------------


def reward_gain(best_scores: Sequence[float], all_scores: Sequence[float]) -> float:
    """Gain of best-of-N over plain sampling: ``mean(best) − mean(all samples)`` (the N = 1 expectation)."""
    return sum(best_scores) / len(best_scores) - sum(all_scores) / len(all_scores)


# --------------------------------------------------------------------------------------------
# Output rows and the summary (sampling and ranking: tether.sampling)
# --------------------------------------------------------------------------------------------


def _prompt_json(prompt: Prompt) -> Any:
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.role, "content": m.content} for m in prompt]


def result_row(result: BestOfNResult, n: int, return_all: bool) -> dict[str, Any] | None:
    """One JSON line: prompt, completion (the best usable sample), score, n (and ranked)."""
    best = result.best
    if best is None:
        return None
    row: dict[str, Any] = {
        "prompt": _prompt_json(result.prompt),
        "completion": best.text,
        "score": best.score,
        "n": n,
        "stopped": best.stopped,
    }
    if return_all:
        row["ranked"] = [
            {"completion": s.text, "score": s.score, "stopped": s.stopped, "num_tokens": s.num_tokens}
            for s in result.ranked
        ]
    return row


def summarise(results: Sequence[BestOfNResult], n: int, reward_stats=None) -> dict[str, Any]:
    """Reward gain over plain sampling next to the analytic KL bound, plus response statistics."""
    usable = [r for r in results if r.best is not None]
    all_scores = [s.score for r in results for s in r.ranked]
    best_scores = [r.best.score for r in usable]
    samples = [s for r in results for s in r.ranked]
    summary: dict[str, Any] = {
        "n": n,
        "prompts": len(results),
        "prompts_written": len(usable),
        "prompts_without_usable_sample": len(results) - len(usable),
        "samples": len(samples),
        "reward/best_mean": sum(best_scores) / len(best_scores) if best_scores else None,
        "reward/sample_mean": sum(all_scores) / len(all_scores) if all_scores else None,
        "reward/gain": reward_gain(best_scores, all_scores) if best_scores else None,
        "kl/bon_bound": bon_kl_bound(n),
        "kl/bon_bound_note": "upper bound log N - (N-1)/N on KL(best-of-N || policy), Beirami et al. 2024",
        "response/length": sum(s.num_tokens for s in samples) / max(1, len(samples)),
        "response/stopped": sum(s.stopped for s in samples) / max(1, len(samples)),
    }
    if reward_stats is not None and summary["reward/gain"] is not None:
        summary["reward/gain_normalised"] = summary["reward/gain"] / reward_stats.std
        summary["reward/best_mean_normalised"] = (summary["reward/best_mean"] - reward_stats.mean) / reward_stats.std
    return summary


# --------------------------------------------------------------------------------------------
# Running the command
# --------------------------------------------------------------------------------------------


def _device(config: BestOfNConfig) -> torch.device:
    """This process's device: under ``accelerate launch`` each process samples on its own."""
    from accelerate import PartialState

    return PartialState(cpu=config.use_cpu).device


def run_best_of_n(config: BestOfNConfig) -> dict[str, Any]:
    """``tether bon``: load prompts (checked before anything is written), sample, score, write JSONL + summary."""
    from tether.data.loading import load_prompts
    from tether.durable import staged_output, write_json_atomic
    from tether.models.loading import from_pretrained_kwargs, load_causal_lm, load_scalar_model, load_tokenizer
    from tether.stages.common import check_output_dir, require_dataset
    from tether.tracking import append_jsonl

    output_dir = Path(config.output_dir)
    check_output_dir(output_dir, config.overwrite_output_dir, resuming=False)
    if not config.reward_model_path:
        raise ConfigError(
            "--reward_model_path is required: best-of-N ranks samples with a reward model (train one with `tether rm`)"
        )
    dataset = require_dataset(config.dataset, "bon")
    records = load_prompts(dataset, split=config.dataset_split, dataset_config=config.dataset_config)
    if config.max_prompts is not None:
        records = records[: config.max_prompts]
    if not records:
        raise ConfigError(f"--dataset {dataset}: no prompts found")
    prompts = [r.prompt for r in records]

    device = _device(config)
    trust, kwargs = config.trust_remote_code, from_pretrained_kwargs(config)
    tokenizer = load_tokenizer(config.model_name_or_path, padding_side="left", trust_remote_code=trust)
    policy = load_causal_lm(config.model_name_or_path, dtype=config.dtype, **kwargs).to(device).eval()
    rm_tokenizer = load_tokenizer(config.reward_model_path, trust_remote_code=trust)
    reward_model = load_scalar_model(config.reward_model_path, dtype=config.dtype, **kwargs).to(device).eval()
    reward_stats = _maybe_reward_stats(config.reward_model_path)

    settings = SamplingSettings(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p
    )
    started = time.perf_counter()
    results = best_of_n(
        policy,
        reward_model,
        tokenizer,
        prompts,
        config.n,
        settings,
        batch_size=config.batch_size,
        rm_tokenizer=rm_tokenizer,
        reward_batch_size=config.reward_batch_size,
        max_prompt_length=config.max_prompt_length,
        max_length=config.max_length,
        missing_stop_score=config.missing_stop_score,
        seed=config.seed,  # the prompts are shared out over the processes; every process gets all results back
    )
    summary = summarise(results, config.n, reward_stats)
    summary.update(
        {
            "seconds": time.perf_counter() - started,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens,
            "policy": config.model_name_or_path,
            "reward_model": config.reward_model_path,
            "dataset": dataset,
        }
    )
    if summary["prompts_without_usable_sample"]:
        logger.warning(
            "tether bon: %d prompt(s) got only empty responses and are left out of %s",
            summary["prompts_without_usable_sample"],
            OUTPUT_FILE,
        )

    from accelerate import PartialState

    state = PartialState()
    if not state.is_main_process:  # the main process writes the files, once
        state.wait_for_everyone()
        return summary
    with staged_output(output_dir) as staged:
        for result in results:
            row = result_row(result, config.n, config.return_all)
            if row is not None:
                append_jsonl(staged / OUTPUT_FILE, row)
        if not (staged / OUTPUT_FILE).exists():
            (staged / OUTPUT_FILE).touch()
        write_json_atomic(staged / SUMMARY_FILE, summary)
    logger.info(
        "tether bon: best of %d over %d prompts: reward gain %.4f at KL <= %.4f nats -> %s",
        config.n,
        len(results),
        summary["reward/gain"] or float("nan"),
        summary["kl/bon_bound"],
        output_dir,
    )
    state.wait_for_everyone()
    return summary


def _maybe_reward_stats(path: str):
    from tether.models.scoring import load_reward_stats

    try:
        return load_reward_stats(path)
    except (FileNotFoundError, ValueError, OSError):
        return None
