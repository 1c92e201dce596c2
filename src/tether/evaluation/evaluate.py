"""``tether eval``: compare policies on held-out prompts.

For each policy (SFT, PPO, DPO, a best-of-N entry, any checkpoint) it samples responses at the
policy's temperature T and measures:

* ``reward/score``: the reward model's score (normalised with the RM's saved statistics when
  ``reward_stats.json`` sits beside it, so the units are those PPO trained on);
* ``reward/gold``: the simulated annotator's g (demo task only; ``tether.demo.annotator``);
* ``kl/ref``: KL(π‖π_ref) in nats per response at T, the k1 estimate on the policy's own samples
  (an fp32 policy's log-probs are recorded while sampling, so only the reference runs a forward pass;
  for best-of-N: ``kl/bon_bound = log N − (N−1)/N``, an upper bound, instead);
* ``response/length`` (tokens, stop token included), ``response/words``, ``response/stopped``;
* ``diversity/distinct_1``, ``diversity/distinct_2`` and ``response/repetition`` (mode collapse);
* ``bias/reward_length_pearson`` / ``_spearman`` (verbosity bias) and ``bias/gold_length_pearson``;
* the built-in probe (``tether.evaluation.probes``): ``probe/factual_accuracy``,
  ``probe/harmful_refusal_rate``, ``probe/benign_refusal_rate`` (greedy answers).

It writes ``eval.json`` (every metric and the settings), ``samples.jsonl`` (every response with its
scores), ``probes.jsonl`` and, unless ``--report false``, ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether.config import EMBEDDED_MODEL, ConfigError, ModelLoadingArguments
from tether.data.records import Prompt, PromptRecord
from tether.durable import write_text_atomic
from tether.evaluation.metrics import (
    best_of_n_expected,
    distinct_n,
    length_stats,
    mean_repetition_rate,
    pearson,
    per_sequence_kl,
    spearman,
    word_count,
)
from tether.sampling import bon_kl_bound

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"
PROBES_FILE = "probes.jsonl"


@dataclass
class EvalConfig(ModelLoadingArguments):
    policies: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Policies to compare, as NAME=PATH (a bare PATH is named after its folder; `embedded` "
            "is the embedded default model). Example: --policies sft=out/sft ppo=out/ppo."
        },
    )
    reference: str = field(
        default=EMBEDDED_MODEL,
        metadata={
            "help": "Reference policy for KL (usually the SFT model; `embedded` for the "
            "embedded default; `none` to skip KL)."
        },
    )
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--reward_model_name_or_path", "--reward_model"],
            "help": "Reward-model folder (from `tether rm`). Without it the "
            "reward-model metrics and best-of-N are skipped.",
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "aliases": ["--prompts", "--dataset_name"],
            "help": "Prompts file/folder/dataset (embedded:demo: the demo task's). Default: the demo task's "
            "held-out prompts (embedded:demo, split test). Alias: --prompts.",
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration (subset) of a Hugging Face or local dataset --dataset."}
    )
    dataset_split: str = field(
        default="train",
        metadata={
            "aliases": ["--prompts_split"],
            "help": "Split of --dataset (a hub dataset, a folder of split files, embedded:demo). Alias: "
            "--prompts_split.",
        },
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    samples_per_prompt: int = field(default=2, metadata={"help": "Responses sampled per prompt and policy."})
    max_new_tokens: int = field(default=64, metadata={"help": "Token budget of each response."})
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature T (part of the policy; KL is measured at this T)."}
    )
    gold: str = field(
        default="auto",
        metadata={"help": "Gold score from the simulated annotator: auto (on for the demo prompts), on, or off."},
    )
    gold_reward_model: str | None = field(
        default=None,
        metadata={
            "help": "A second reward model as the gold judge instead of the simulated annotator (trained on pairs "
            "disjoint from --reward_model_path's: Gao et al.'s over-optimisation setup, for data without a human "
            "judge)."
        },
    )
    probes: bool = field(default=True, metadata={"help": "Run the factual and refusal probe."})
    probe_max_new_tokens: int = field(default=64, metadata={"help": "Token budget of probe answers."})
    probe_temperature: float = field(default=0.0, metadata={"help": "Probe decoding temperature (0 = greedy)."})
    best_of_n: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Add best-of-N entries for these N (needs --reward_model_path). N <= --samples_per_prompt "
            "picks from --best_of_n_base's evaluation samples (s // N picks per prompt, one per block of N); "
            "a larger N samples the base again."
        },
    )
    best_of_n_base: str | None = field(
        default=None,
        metadata={"help": "Policy name (from --policies) that best-of-N samples from. Default: the first policy."},
    )
    bon_curve: list[int] = field(
        default_factory=list,
        metadata={
            "help": "N values of the report's best-of-N curve (e.g. 1 2 4 8 16) of --best_of_n_base: from its "
            "evaluation samples when max(N) <= --samples_per_prompt, else from max(N) new samples per prompt."
        },
    )
    side_by_side: int = field(default=4, metadata={"help": "Prompts shown with every policy's response."})
    batch_size: int = field(default=8, metadata={"help": "Batch size for sampling and scoring."})
    max_prompt_length: int = field(default=256, metadata={"help": "Prompts longer than this are cut from the left."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})
    seed: int = field(
        default=0,
        metadata={
            "help": "Sampling seed, the same for every policy; each --batch_size batch of prompts samples with a seed "
            "derived from it and the batch's index, so the responses are the same on any number of processes."
        },
    )
    output_dir: str = field(
        default="outputs/eval", metadata={"help": "Where eval.json, samples.jsonl and the report go."}
    )
    report: bool = field(default=True, metadata={"help": "Also write report.md and report.html."})


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class EvalResults:
    """What :func:`evaluate_policies` measured.

    ``metrics[name]`` maps metric names to numbers (None when not measured); ``samples`` holds one
    row per response: ``policy, prompt_index, prompt, response, stopped, length, words, reward,
    gold`` (reward/gold None when not measured); ``probe_responses[name]`` the probe answers.
    """

    metrics: dict[str, dict[str, Any]]
    samples: list[dict[str, Any]]
    probe_responses: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    #: the best-of-N curve (``evaluate_policies(bon_curve=...)``), rows as :func:`bon_curve`'s
    bon_curve: list[dict[str, Any]] | None = None
    temperature: float = 0.7
    settings: dict[str, Any] = field(default_factory=dict)

    def length_reward_points(self) -> list[dict[str, Any]]:
        """``{"policy", "length", "reward", "gold"}`` per response, for the length-vs-reward scatter."""
        return [
            {"policy": s["policy"], "length": s["length"], "reward": s["reward"], "gold": s["gold"]}
            for s in self.samples
        ]

    def side_by_side(self, n_prompts: int = 4) -> list[dict[str, Any]]:
        """The first response of every policy to the first ``n_prompts`` prompts."""
        by_prompt: dict[int, dict[str, Any]] = {}
        for s in self.samples:
            if s["prompt_index"] >= n_prompts:
                continue
            row = by_prompt.setdefault(s["prompt_index"], {"prompt": s["prompt"], "responses": {}})
            row["responses"].setdefault(
                s["policy"], {"response": s["response"], "reward": s["reward"], "gold": s["gold"]}
            )
        return [by_prompt[i] for i in sorted(by_prompt)]

    def to_json(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "settings": self.settings, "metrics": self.metrics}


def _prompt_json(prompt: Prompt):
    return prompt if isinstance(prompt, str) else [{"role": m.role, "content": m.content} for m in prompt]


def _finite_mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def text_metrics(
    texts: Sequence[str],
    lengths: Sequence[int],
    stopped: Sequence[bool],
    rewards: Sequence[float] | None,
    golds: Sequence[float] | None,
) -> dict[str, Any]:
    """Every metric that needs only the responses and their scores (no model)."""
    lens = length_stats(lengths)
    out: dict[str, Any] = {
        "samples": len(texts),
        "reward/score": _finite_mean(rewards) if rewards is not None else None,
        "reward/score_std": float(np.std(rewards)) if rewards else None,
        "reward/gold": _finite_mean(golds) if golds is not None else None,
        "reward/gold_std": float(np.std(golds)) if golds else None,
        "response/length": _nan_to_none(lens["mean"]),
        "response/length_median": _nan_to_none(lens["median"]),
        "response/words": float(np.mean([word_count(t) for t in texts])) if texts else None,
        "response/stopped": float(np.mean(stopped)) if len(stopped) else None,
        "response/repetition": mean_repetition_rate(texts, 3),
        "diversity/distinct_1": distinct_n(texts, 1),
        "diversity/distinct_2": distinct_n(texts, 2),
        "bias/reward_length_pearson": _nan_to_none(pearson(lengths, rewards)) if rewards else None,
        "bias/reward_length_spearman": _nan_to_none(spearman(lengths, rewards)) if rewards else None,
        "bias/gold_length_pearson": _nan_to_none(pearson(lengths, golds)) if golds else None,
    }
    return out


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
class _Models:
    """Loads each path once; models given as objects pass through."""

    def __init__(self, dtype: str | None, model_kwargs: Mapping[str, Any] | None = None):
        self.dtype = dtype
        self.model_kwargs = dict(model_kwargs or {})  # from_pretrained_kwargs of the eval config
        self._cache: dict[str, Any] = {}

    def causal_lm(self, model_or_path):
        if not isinstance(model_or_path, (str, os.PathLike)):
            return model_or_path
        key = EMBEDDED_MODEL if str(model_or_path) == "embedded" else str(model_or_path)
        if key not in self._cache:
            from tether.models.loading import disable_dropout, load_causal_lm

            model = load_causal_lm(key, dtype=self.dtype, **self.model_kwargs)
            disable_dropout(model)
            self._cache[key] = model.eval()
        return self._cache[key]


def load_reward(reward_model, reward_tokenizer=None, model_kwargs: Mapping[str, Any] | None = None):
    """``(model, tokenizer, stats or None)`` from a folder or ready objects."""
    from tether.models.loading import load_scalar_model, load_tokenizer
    from tether.models.scoring import REWARD_STATS_FILE, load_reward_stats

    if isinstance(reward_model, (str, os.PathLike)):
        path = Path(reward_model)
        kwargs = dict(model_kwargs or {})
        model = load_scalar_model(str(path), **kwargs).eval()
        tokenizer = reward_tokenizer or load_tokenizer(
            str(path), trust_remote_code=kwargs.get("trust_remote_code", False)
        )
        stats = load_reward_stats(path) if (path / REWARD_STATS_FILE).is_file() else None
        return model, tokenizer, stats
    return reward_model, reward_tokenizer, None


class RewardModelJudge:
    """A second reward model as the gold judge (Gao et al. 2022, *Scaling Laws for Reward Model
    Overoptimization*): trained on preference pairs disjoint from the proxy reward model's, it stands in
    for human judgement where there is none. ``scores`` has the simulated annotator's signature, so it
    serves as ``gold`` in :func:`evaluate_policies` and in ``gold_metrics_hook``. Scores are normalised
    with the judge's own ``reward_stats.json`` (its training pairs' mean and std) when the folder has one;
    a response cut at the token budget (``stopped`` False) is scored at its own last token."""

    def __init__(
        self, path, model_kwargs: Mapping[str, Any] | None = None, batch_size: int = 8, max_prompt_length=None
    ):
        self.path = str(path)
        self.model, self.tokenizer, self.stats = load_reward(self.path, None, model_kwargs)
        self.batch_size, self.max_prompt_length = batch_size, max_prompt_length

    def scores(self, prompts: Sequence, responses: Sequence[str], stopped: Sequence[bool] | None = None) -> list[float]:
        raw = [p.prompt if isinstance(p, PromptRecord) else p for p in prompts]
        return rm_scores(
            self.model, self.tokenizer, raw, responses, self.stats, self.batch_size, self.max_prompt_length, stopped
        )


def rm_scores(
    reward_model,
    reward_tokenizer,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    stats=None,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    stopped: Sequence[bool] | None = None,
) -> list[float]:
    """The reward model's score of each response, normalised with ``stats`` when given (``stopped``: as
    :func:`raw_and_normalised_rm_scores`)."""
    return raw_and_normalised_rm_scores(
        reward_model, reward_tokenizer, prompts, responses, stats, batch_size, max_prompt_length, stopped
    )[1]


def raw_and_normalised_rm_scores(
    reward_model,
    reward_tokenizer,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    stats=None,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    stopped: Sequence[bool] | None = None,
) -> tuple[list[float], list[float]]:
    """``(raw, normalised)`` reward-model scores of each response from one pass (normalised = raw without
    ``stats``). Best-of-N ranks the raw scores (``tether.sampling.rank``): normalising is monotone, but it may
    round two close raw scores to one value, and the tie rule would then pick differently. A response whose
    ``stopped`` flag is False (cut at the token budget) is scored without a stop token, as PPO's rollout
    scores it (``tether.models.scoring.score_texts``); None: every response ends with one."""
    from tether.models.scoring import normalise, score_texts

    if not responses:
        return [], []
    scores = score_texts(
        reward_model,
        reward_tokenizer,
        list(prompts),
        list(responses),
        batch_size=batch_size,
        max_prompt_length=max_prompt_length,
        stopped=None if stopped is None else list(stopped),
    )
    normalised = normalise(scores, stats) if stats is not None else scores
    return [float(s) for s in scores], [float(s) for s in normalised]


@dataclass(frozen=True)
class _Response:
    text: str
    stopped: bool
    length: int  # response tokens, the stop token included

    @classmethod
    def of(cls, sample) -> _Response:
        return cls(sample.text, bool(sample.stopped), len(sample.response_ids))


# ---------------------------------------------------------------------------------------------
# the evaluation
# ---------------------------------------------------------------------------------------------
def evaluate_policies(
    policies: Mapping[str, Any],
    reference: Any,
    reward_model: Any,
    tokenizer,
    prompts: Sequence[Prompt | PromptRecord],
    *,
    reward_tokenizer=None,
    reward_stats=None,
    temperature: float = 0.7,
    max_new_tokens: int = 64,
    samples_per_prompt: int = 1,
    gold: bool | Any = True,
    probes: bool = True,
    probe_max_new_tokens: int = 64,
    probe_temperature: float = 0.0,
    best_of_n: Mapping[str, tuple[str, int]] | None = None,
    bon_curve: Sequence[int] = (),
    bon_curve_prompts: int | None = None,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    seed: int = 0,
    dtype: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> EvalResults:
    """Sample from every policy on ``prompts`` and measure it (see the module docstring).

    ``policies`` maps names to causal LMs or their paths; ``reference`` is the KL reference (model,
    path, or None to skip KL); ``reward_model`` a scalar model or a folder (None to skip RM scores
    and best-of-N); ``gold`` True (default annotator), False, or a judge with the annotator's ``scores``
    (a ``SimulatedAnnotator``, a :class:`RewardModelJudge`);
    ``best_of_n`` maps entry names to ``(base policy name, N)``: the reward model's favourite among N
    samples of the base policy (ranked as ``tether.sampling.best_of_n`` ranks them), KL reported as the
    analytic bound. When ``N <= samples_per_prompt`` the entry reuses the base policy's own evaluation
    samples and their scores (nothing is sampled or scored again): each prompt's ``s = samples_per_prompt``
    samples are cut, in sampling order, into ``s // N`` disjoint blocks of N consecutive samples, and each
    block gives one pick (:func:`best_of_n_picks`; a remainder of ``s mod N`` samples serves no pick). So
    ``s = N`` gives one pick per prompt, ``s = k·N`` gives k. When ``N > samples_per_prompt`` the base
    policy is sampled again: ``samples_per_prompt`` picks per prompt, each from N fresh samples.

    ``bon_curve`` (N values) adds the best-of-N curve of the first best-of-N entry's base policy to
    ``EvalResults.bon_curve`` (rows as :func:`curve_rows`, which name the prompts and samples per prompt
    used; ``settings["bon_curve"]`` says where the samples came from). When ``max(N) <= samples_per_prompt``
    it is computed from the base policy's evaluation samples on every prompt (:func:`curve_from_samples`);
    otherwise the first ``bon_curve_prompts`` prompts (None: all) get ``max(N)`` extra samples (sampled as
    :func:`bon_curve` samples them), whose first N also serve a best-of-N entry that cannot reuse the
    evaluation samples. ``model_kwargs`` go to every ``from_pretrained`` of a path
    (``tether.models.loading.from_pretrained_kwargs``).
    """
    if temperature <= 0:
        raise ValueError("evaluation samples at the policy's temperature; T must be > 0")
    from tether.generation import SamplingSettings, sample_seeded

    models = _Models(dtype, model_kwargs)
    raw_prompts = [p.prompt if isinstance(p, PromptRecord) else p for p in prompts]
    if not raw_prompts:
        raise ValueError("no prompts to evaluate on")
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    ref_model = models.causal_lm(reference) if reference is not None else None
    rm = rm_tok = None
    if reward_model is not None:
        rm, rm_tok, loaded_stats = load_reward(reward_model, reward_tokenizer, model_kwargs)
        reward_stats = reward_stats if reward_stats is not None else loaded_stats
        rm_tok = rm_tok or tokenizer
    annotator = None
    if gold is True:
        from tether.demo.annotator import default_annotator

        annotator = default_annotator()
    elif gold not in (False, None):
        annotator = gold
    best_of_n = dict(best_of_n or {})
    if best_of_n and rm is None:
        raise ValueError("best-of-N entries need a reward model")
    for name, (base, n) in best_of_n.items():
        if base not in policies:
            raise ValueError(f"best-of-N entry {name!r}: base policy {base!r} is not among {list(policies)}")
        if n < 1:
            raise ValueError(f"best-of-N entry {name!r}: N must be >= 1")
    if bon_curve and (not best_of_n or min(bon_curve) < 1):
        raise ValueError("bon_curve needs a best-of-N entry (its base policy is sampled) and N values >= 1")
    curve = None

    metrics: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    probe_responses: dict[str, list[dict[str, str]]] = {}
    raw_rewards: dict[str, list[float]] = {}  # each policy's raw reward-model scores, in its rows' order

    def measure(
        name: str,
        flat_prompts,
        flat_index,
        responses: list[_Response],
        kl_values,
        kl_bound=None,
        rewards=None,
        golds=None,
    ):
        texts = [r.text for r in responses]
        stopped = [r.stopped for r in responses]
        lengths = [r.length for r in responses]
        t0 = time.perf_counter()
        if rewards is None and rm is not None:
            raw_rewards[name], rewards = raw_and_normalised_rm_scores(
                rm, rm_tok, flat_prompts, texts, reward_stats, batch_size, max_prompt_length, stopped
            )
        if golds is None and annotator is not None:
            golds = annotator.scores(flat_prompts, texts, stopped)
        m = text_metrics(texts, lengths, stopped, rewards, golds)
        m["kl/ref"] = _finite_mean(kl_values) if kl_values is not None else None
        m["kl/bon_bound"] = kl_bound
        m["time/score"] = time.perf_counter() - t0
        metrics[name] = m
        for k, (p, i, r) in enumerate(zip(flat_prompts, flat_index, responses)):
            rows.append(
                {
                    "policy": name,
                    "prompt_index": i,
                    "prompt": _prompt_json(p),
                    "response": r.text,
                    "stopped": r.stopped,
                    "length": r.length,
                    "words": word_count(r.text),
                    "reward": None if rewards is None else rewards[k],
                    "gold": None if golds is None else golds[k],
                    "kl": None if kl_values is None else kl_values[k],
                }
            )

    for name, model_or_path in policies.items():
        logger.info("eval: sampling %d x %d responses from %s", len(raw_prompts), samples_per_prompt, name)
        model = models.causal_lm(model_or_path)
        t0 = time.perf_counter()
        groups = sample_seeded(
            model,
            tokenizer,
            raw_prompts,
            settings,
            num_return_sequences=samples_per_prompt,
            batch_size=batch_size,
            seed=seed,
            max_prompt_length=max_prompt_length,
            # the policy's side of its KL, recorded while sampling: no policy forward pass. fp32 only: in
            # bf16/fp16 cached decoding and a full forward pass differ by far more than the ~1e-6 of fp32
            return_logprobs=ref_model is not None
            and model is not ref_model
            and next(model.parameters()).dtype == torch.float32,
        )
        t_generate = time.perf_counter() - t0
        flat = [s for g in groups for s in g]
        flat_prompts = [p for p, g in zip(raw_prompts, groups) for _ in g]
        flat_index = [i for i, g in enumerate(groups) for _ in g]
        kl_values = None
        if ref_model is not None:
            kl_values = (
                [0.0] * len(flat)
                if model is ref_model
                else per_sequence_kl(model, ref_model, tokenizer, flat, temperature, batch_size)
            )
        measure(name, flat_prompts, flat_index, [_Response.of(x) for x in flat], kl_values)
        metrics[name]["time/generate"] = t_generate
        if probes:
            from tether.evaluation.probes import run_probes

            result = run_probes(
                model,
                tokenizer,
                max_new_tokens=probe_max_new_tokens,
                temperature=probe_temperature,
                batch_size=batch_size,
                max_prompt_length=max_prompt_length,
            )
            metrics[name]["probe/factual_accuracy"] = result["factual_accuracy"]
            metrics[name]["probe/harmful_refusal_rate"] = result["harmful_refusal_rate"]
            metrics[name]["probe/benign_refusal_rate"] = result["benign_refusal_rate"]
            probe_responses[name] = result["responses"]

    curve_settings = None
    if bon_curve and max(bon_curve) <= samples_per_prompt:  # the curve's base policy is already sampled enough
        curve_base = next(iter(best_of_n.values()))[0]
        curve = curve_from_samples(rows, curve_base, samples_per_prompt, bon_curve)
        curve_settings = {"policy": curve_base, "samples": "evaluation"}
    for entry, (name, (base, n)) in enumerate(best_of_n.items()):
        if n <= samples_per_prompt:
            logger.info("eval: best-of-%d from %s's evaluation samples", n, base)
            base_rows = [r for r in rows if r["policy"] == base]
            picked = [
                base_rows[i]
                for i in best_of_n_picks(raw_rewards[base], [r["response"] for r in base_rows], samples_per_prompt, n)
            ]
            measure(
                name,
                [raw_prompts[r["prompt_index"]] for r in picked],
                [r["prompt_index"] for r in picked],
                [_Response(r["response"], r["stopped"], r["length"]) for r in picked],
                None,
                kl_bound=bon_kl_bound(n),
                rewards=[r["reward"] for r in picked],
                golds=None if annotator is None else [r["gold"] for r in picked],
            )
            continue
        logger.info("eval: best-of-%d from %s", n, base)
        from tether.sampling import best_of_n as sample_best_of_n

        model = models.causal_lm(policies[base])
        chosen, chosen_scores, flat_prompts, flat_index = [], [], [], []
        for repeat in range(samples_per_prompt):
            if entry == 0 and repeat == 0 and bon_curve and curve is None:
                results, curve = _best_of_n_and_curve(
                    model,
                    rm,
                    rm_tok,
                    tokenizer,
                    raw_prompts,
                    n,
                    bon_curve,
                    bon_curve_prompts,
                    settings,
                    batch_size,
                    max_prompt_length,
                    seed,
                    annotator,
                    reward_stats,
                )
            else:
                results = sample_best_of_n(
                    model,
                    rm,
                    tokenizer,
                    raw_prompts,
                    n,
                    settings,
                    batch_size=max(1, batch_size // n),
                    rm_tokenizer=rm_tok,
                    reward_batch_size=batch_size,
                    max_prompt_length=max_prompt_length,
                    seed=seed + repeat,
                )
            for i, result in enumerate(results):
                best = result.best or result.ranked[0]  # every sample empty: keep the top one anyway
                chosen.append(_Response(best.text, bool(best.stopped), int(best.num_tokens)))
                chosen_scores.append(best.score)
                flat_prompts.append(result.prompt)
                flat_index.append(i)
        if reward_stats is not None:  # best_of_n ranks raw scores; normalising is monotone
            from tether.models.scoring import normalise

            chosen_scores = [float(x) for x in normalise(torch.tensor(chosen_scores), reward_stats)]
        measure(name, flat_prompts, flat_index, chosen, None, kl_bound=bon_kl_bound(n), rewards=chosen_scores)
    if bon_curve and curve is None:  # the first entry reused its base's samples; the curve needs max(N) per prompt
        curve_base = next(iter(best_of_n.values()))[0]
        curve_prompts = raw_prompts[:bon_curve_prompts] if bon_curve_prompts else raw_prompts
        _, curve = _best_of_n_and_curve(
            models.causal_lm(policies[curve_base]),
            rm,
            rm_tok,
            tokenizer,
            curve_prompts,
            max(bon_curve),
            bon_curve,
            None,
            settings,
            batch_size,
            max_prompt_length,
            seed,
            annotator,
            reward_stats,
        )
    if bon_curve and curve_settings is None:
        curve_settings = {"policy": next(iter(best_of_n.values()))[0], "samples": "extra"}
    if curve_settings is not None:
        curve_settings |= {"prompts": curve[0]["prompts"], "samples_per_prompt": curve[0]["samples_per_prompt"]}

    add_paired_gains(metrics, rows, baseline=next(iter(policies)))
    return EvalResults(
        metrics=metrics,
        samples=rows,
        probe_responses=probe_responses,
        bon_curve=curve,
        temperature=temperature,
        settings={
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "samples_per_prompt": samples_per_prompt,
            "prompts": len(raw_prompts),
            "seed": seed,
            "reward_normalised": reward_stats is not None,
            # the gold judge: False, True (the simulated annotator) or the judging reward model's folder
            "gold": annotator.path if isinstance(annotator, RewardModelJudge) else annotator is not None,
            "probe_temperature": probe_temperature,
            "kl_estimator": "k1, nats per response at T",
            # where the best-of-N curve's samples came from: "evaluation" (the policy's evaluation samples) or
            # "extra" (max(N) samples on the first prompts), on how many prompts, how many samples each
            **({"bon_curve": curve_settings} if curve_settings is not None else {}),
        },
    )


def add_paired_gains(metrics: dict[str, dict[str, Any]], rows: Sequence[Mapping[str, Any]], baseline: str) -> None:
    """``gain/gold``, ``gain/score`` (± ``_se``) of every policy over ``baseline``, paired by prompt.

    Each policy's responses to a prompt are averaged first (several samples per prompt count once),
    then :func:`tether.evaluation.metrics.paired_difference` runs over the prompts both policies
    answered. ``gain/baseline`` names the policy compared against.
    """
    from tether.evaluation.metrics import paired_difference

    per_prompt: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for key, column in (("gold", "gold"), ("score", "reward")):
            v = r.get(column)
            if v is not None and math.isfinite(v):
                per_prompt[(r["policy"], key)][r["prompt_index"]].append(float(v))
    for name, m in metrics.items():
        if name == baseline:
            continue
        for key in ("gold", "score"):
            mine, base = per_prompt.get((name, key), {}), per_prompt.get((baseline, key), {})
            common = sorted(set(mine) & set(base))
            if len(common) < 2:
                continue
            mean, se = paired_difference(
                [float(np.mean(mine[i])) for i in common], [float(np.mean(base[i])) for i in common]
            )
            m[f"gain/{key}"], m[f"gain/{key}_se"] = mean, se
            m["gain/baseline"] = baseline


def bon_curve(
    base_model,
    tokenizer,
    reward_model,
    prompts: Sequence[Prompt | PromptRecord],
    *,
    ns: Sequence[int] = (1, 2, 4, 8, 16),
    reward_tokenizer=None,
    reward_stats=None,
    gold: bool | Any = True,
    temperature: float = 0.7,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Best-of-N proxy and gold reward for each N, against the analytic KL bound.

    Samples ``max(ns)`` responses per prompt once, scores them all, and for each N takes the
    expectation over random N-subsets (``tether.evaluation.metrics.best_of_n_expected``), averaged
    over prompts. Rows: ``{"n", "kl_bound", "proxy", "gold"}`` (gold None without an annotator).
    """
    from tether.generation import SamplingSettings, sample_seeded

    m = max(ns)
    raw = [p.prompt if isinstance(p, PromptRecord) else p for p in prompts]
    models = _Models(None, model_kwargs)
    model = models.causal_lm(base_model)
    rm, rm_tok, loaded_stats = load_reward(reward_model, reward_tokenizer, model_kwargs)
    rm_tok = rm_tok or tokenizer
    stats = reward_stats if reward_stats is not None else loaded_stats
    annotator = None
    if gold is True:
        from tether.demo.annotator import default_annotator

        annotator = default_annotator()
    elif gold not in (False, None):
        annotator = gold
    groups = sample_seeded(
        model,
        tokenizer,
        raw,
        SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature),
        num_return_sequences=m,
        batch_size=max(1, batch_size // m),
        seed=seed,
        max_prompt_length=max_prompt_length,
    )
    flat_prompts = [p for p, g in zip(raw, groups) for _ in g]
    texts = [s.text for g in groups for s in g]
    stopped = [s.stopped for g in groups for s in g]
    proxy = rm_scores(rm, rm_tok, flat_prompts, texts, stats, batch_size, max_prompt_length, stopped)
    golds = annotator.scores(flat_prompts, texts, stopped) if annotator is not None else None
    return curve_rows(proxy, golds, m, ns)


def curve_rows(proxy: Sequence[float], golds: Sequence[float] | None, m: int, ns: Sequence[int]) -> list[dict]:
    """Rows ``{"n", "kl_bound", "proxy", "gold", "prompts", "samples_per_prompt"}`` from ``m`` consecutive
    samples per prompt: for each N the expectation over random N-subsets (:func:`best_of_n_expected`), averaged
    over the prompts (``prompts`` of them, ``samples_per_prompt`` = m)."""
    prompts = len(proxy) // m
    rows = []
    for n in sorted(set(ns)):
        proxy_n, gold_n = [], []
        for i in range(prompts):
            p_i = proxy[i * m : (i + 1) * m]
            proxy_n.append(best_of_n_expected(p_i, p_i, n))
            if golds is not None:
                gold_n.append(best_of_n_expected(p_i, golds[i * m : (i + 1) * m], n))
        rows.append(
            {
                "n": n,
                "kl_bound": bon_kl_bound(n),
                "proxy": float(np.mean(proxy_n)),
                "gold": float(np.mean(gold_n)) if golds is not None else None,
                "prompts": prompts,
                "samples_per_prompt": m,
            }
        )
    return rows


def curve_from_samples(
    rows: Sequence[Mapping[str, Any]], policy: str, samples_per_prompt: int, ns: Sequence[int]
) -> list[dict[str, Any]]:
    """The best-of-N curve of ``policy`` from its evaluation rows (``EvalResults.samples``): its
    ``samples_per_prompt`` consecutive rows per prompt, as sampled, through :func:`curve_rows` with their
    (normalised) rewards as the proxy and their gold scores (None when any is missing)."""
    mine = [r for r in rows if r["policy"] == policy]
    if max(ns) > samples_per_prompt:
        raise ValueError(
            f"a best-of-{max(ns)} curve needs {max(ns)} samples per prompt, the rows have {samples_per_prompt}"
        )
    golds = [r["gold"] for r in mine]
    return curve_rows(
        [r["reward"] for r in mine], golds if all(g is not None for g in golds) else None, samples_per_prompt, ns
    )


def best_of_n_picks(raw_scores: Sequence[float], texts: Sequence[str], samples_per_prompt: int, n: int) -> list[int]:
    """Positions of the best-of-N picks among samples listed prompt by prompt, ``samples_per_prompt`` (s) each.

    Each prompt's samples are cut, in sampling order, into ``s // n`` disjoint blocks of n consecutive ones
    (a remainder of ``s mod n`` serves no pick); each block's pick is what ``tether.sampling.best_of_n`` keeps
    from n samples: the highest raw reward-model score, ties to the earlier sample
    (``tether.sampling.rank``), the best with non-empty text (``BestOfNResult.best``), the top one when
    every text in the block is empty. Returns ``s // n`` positions per prompt, in prompt order.
    """
    from tether.sampling import BestOfNResult, ScoredSample, rank

    if not 1 <= n <= samples_per_prompt:
        raise ValueError(
            f"best-of-{n} from {samples_per_prompt} samples per prompt: N must be in [1, {samples_per_prompt}]"
        )
    if len(raw_scores) != len(texts) or len(texts) % samples_per_prompt:
        raise ValueError(f"{len(raw_scores)} scores and {len(texts)} texts are not {samples_per_prompt} per prompt")
    picks = []
    for start in range(0, len(texts), samples_per_prompt):
        for first in range(start, start + samples_per_prompt - n + 1, n):
            block = [ScoredSample(texts[i], float(raw_scores[i]), False, 0, i) for i in range(first, first + n)]
            result = BestOfNResult(None, rank(block))
            picks.append((result.best or result.ranked[0]).index)
    return picks


def _best_of_n_and_curve(
    model,
    rm,
    rm_tok,
    tokenizer,
    prompts: list,
    n: int,
    ns: Sequence[int],
    curve_prompts: int | None,
    settings,
    batch_size: int,
    max_prompt_length: int | None,
    seed: int,
    annotator,
    stats,
):
    """Best-of-``n`` results for every prompt and the curve over ``ns`` on the first ``curve_prompts``, from
    one set of samples: those prompts get ``m = max(ns + [n])`` samples (sampled as :func:`bon_curve` samples
    them), the others ``n``; a prompt's best-of-n is the reward model's favourite among its first n."""
    from tether.generation import sample_seeded
    from tether.models.scoring import normalise
    from tether.sampling import BestOfNResult, rank, score_samples

    m = max([*ns, n])
    k = len(prompts) if not curve_prompts else min(curve_prompts, len(prompts))
    groups = sample_seeded(
        model,
        tokenizer,
        prompts[:k],
        settings,
        m,
        max(1, batch_size // m),
        seed=seed,
        max_prompt_length=max_prompt_length,
    )
    if k < len(prompts):
        groups += sample_seeded(
            model,
            tokenizer,
            prompts[k:],
            settings,
            n,
            max(1, batch_size // n),
            seed=seed + 1,
            max_prompt_length=max_prompt_length,
        )
    ranked = score_samples(rm, rm_tok, prompts, groups, batch_size, max_prompt_length=max_prompt_length)
    results = [BestOfNResult(p, rank([s for s in r if s.index < n])) for p, r in zip(prompts, ranked)]
    in_order = [sorted(r, key=lambda s: s.index) for r in ranked[:k]]
    proxy = [s.score for r in in_order for s in r]
    if stats is not None:
        proxy = [float(x) for x in normalise(torch.tensor(proxy, dtype=torch.float64), stats)]
    golds = None
    if annotator is not None:
        flat_prompts = [p for p, r in zip(prompts, in_order) for _ in r]
        golds = annotator.scores(
            flat_prompts, [s.text for r in in_order for s in r], [s.stopped for r in in_order for s in r]
        )
    return results, curve_rows(proxy, golds, m, ns)


def overopt_points(
    results: EvalResults | Mapping[str, Mapping[str, Any]], names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """``{"name", "kl", "gold", "proxy"}`` per evaluated policy/checkpoint, for the over-optimisation plot.

    Put the starting policy (KL 0) first in ``names``; the plot recentres on it.
    """
    metrics = results.metrics if isinstance(results, EvalResults) else results
    names = list(names) if names is not None else list(metrics)
    points = []
    for name in names:
        m = metrics[name]
        kl = m.get("kl/ref")
        if kl is None:
            continue
        points.append({"name": name, "kl": kl, "gold": m.get("reward/gold"), "proxy": m.get("reward/score")})
    return points


def points_from_metrics(rows: Sequence[Mapping[str, Any]], window: int = 5) -> list[dict[str, Any]]:
    """Average consecutive PPO iterations into over-optimisation points.

    Rows without ``kl/ref`` are skipped; each window of ``window`` rows gives one point
    ``{"name": "iter A-B", "kl", "gold", "proxy", "gold_se"}`` with the means of ``kl/ref``,
    ``reward/gold`` and ``reward/score`` (None when a key is missing from any row of the window), and
    the standard error of the gold mean from the rows' ``reward/gold_se``: the m iterations are
    independent batches, so ``se = √(Σ se_j²) / m``. The first window holds the starting policy's
    rollouts, the baseline the plot recentres on.
    """

    def num(v):
        try:
            x = float(v)
        except (TypeError, ValueError):
            return None
        return None if math.isnan(x) else x

    usable = [r for r in rows if num(r.get("kl/ref")) is not None]
    points = []
    for start in range(0, len(usable), window):
        chunk = usable[start : start + window]
        steps = [r.get("step", start + i) for i, r in enumerate(chunk)]

        def mean(key):
            vals = [num(r.get(key)) for r in chunk]
            return None if any(v is None for v in vals) else float(np.mean(vals))

        ses = [num(r.get("reward/gold_se")) for r in chunk]
        gold_se = None if any(v is None for v in ses) else math.sqrt(sum(v * v for v in ses)) / len(ses)
        points.append(
            {
                "name": f"iter {steps[0]}-{steps[-1]}",
                "kl": max(0.0, mean("kl/ref")),
                "gold": mean("reward/gold"),
                "proxy": mean("reward/score"),
                "gold_se": gold_se,
            }
        )
    return points


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_policy_specs(specs: Sequence[str]) -> dict[str, str]:
    """``["sft=out/sft", "out/ppo"] -> {"sft": "out/sft", "ppo": "out/ppo"}``; names must be unique.

    ``embedded`` (alone or as a path) is the embedded default model.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            name = "embedded" if spec.startswith("embedded") else (Path(spec.rstrip("/")).name or spec)
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ConfigError(f"--policies {spec!r}: expected NAME=PATH")
        if name in out:
            raise ConfigError(f"--policies: the name {name!r} is used twice")
        out[name] = EMBEDDED_MODEL if path == "embedded" else path
    return out


def write_eval_outputs(
    output_dir: str | Path, results: EvalResults, extra: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """``eval.json``, ``samples.jsonl`` and ``probes.jsonl`` in ``output_dir``, each written atomically."""
    out = Path(output_dir)
    doc = results.to_json()
    if extra:
        doc.update(extra)
    paths = {"eval": out / EVAL_FILE, "samples": out / SAMPLES_FILE, "probes": out / PROBES_FILE}
    write_text_atomic(paths["eval"], json.dumps(doc, indent=2, default=str) + "\n")
    write_text_atomic(paths["samples"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results.samples))
    probe_rows = [{"policy": name, **r} for name, rs in results.probe_responses.items() for r in rs]
    write_text_atomic(paths["probes"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in probe_rows))
    return paths


def run_eval(config: EvalConfig) -> EvalResults:
    """Run ``tether eval`` from its config: load everything, evaluate, write files and the report."""
    from tether.data.embedded import DEMO, is_demo_prompt
    from tether.data.loading import load_prompts
    from tether.models.loading import from_pretrained_kwargs, load_tokenizer

    policies = parse_policy_specs(config.policies)
    if not policies:
        raise ConfigError("--policies: name at least one policy (NAME=PATH)")
    if config.gold not in ("auto", "on", "off"):
        raise ConfigError(f"--gold {config.gold!r}: use auto, on or off")
    if config.samples_per_prompt < 1:
        raise ConfigError("--samples_per_prompt must be >= 1")
    if config.temperature <= 0:
        raise ConfigError("--temperature must be > 0: the temperature is part of the policy and KL is measured at it")
    if (config.best_of_n or config.bon_curve) and not config.reward_model_path:
        raise ConfigError("--best_of_n and --bon_curve need --reward_model_path")
    if any(n < 1 for n in [*config.best_of_n, *config.bon_curve]):
        raise ConfigError("--best_of_n / --bon_curve values must be >= 1")
    if config.dataset is None:  # the demo task's held-out prompts
        prompts = load_prompts(DEMO, split="test")
    else:
        prompts = load_prompts(config.dataset, split=config.dataset_split, dataset_config=config.dataset_config)
    if config.num_prompts is not None:
        prompts = prompts[: config.num_prompts]
    if config.gold_reward_model:
        if config.gold == "on":
            raise ConfigError("--gold on and --gold_reward_model: choose one gold judge")
        gold = RewardModelJudge(
            config.gold_reward_model,
            from_pretrained_kwargs(config),
            batch_size=config.batch_size,
            max_prompt_length=config.max_prompt_length,
        )
    else:
        gold = config.gold == "on" or (config.gold == "auto" and all(is_demo_prompt(p.prompt) for p in prompts))
    base = config.best_of_n_base or next(iter(policies))
    if (config.best_of_n or config.bon_curve) and base not in policies:
        raise ConfigError(f"--best_of_n_base {base!r} is not one of the --policies names {list(policies)}")
    best = {f"best-of-{n}": (base, int(n)) for n in config.best_of_n}
    # policies share the reference's vocabulary
    tokenizer = load_tokenizer(next(iter(policies.values())), trust_remote_code=config.trust_remote_code)
    model_kwargs = from_pretrained_kwargs(config)
    reference = None if config.reference in ("", "none") else config.reference
    results = evaluate_policies(
        policies,
        reference,
        config.reward_model_path,
        tokenizer,
        prompts,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        samples_per_prompt=config.samples_per_prompt,
        gold=gold,
        probes=config.probes,
        probe_max_new_tokens=config.probe_max_new_tokens,
        probe_temperature=config.probe_temperature,
        best_of_n=best,
        batch_size=config.batch_size,
        max_prompt_length=config.max_prompt_length,
        seed=config.seed,
        dtype=config.dtype,
        model_kwargs=model_kwargs,
    )
    curve = None
    if config.bon_curve and max(config.bon_curve) <= config.samples_per_prompt:
        curve = curve_from_samples(results.samples, base, config.samples_per_prompt, config.bon_curve)
    elif config.bon_curve:
        curve = bon_curve(
            policies[base],
            tokenizer,
            config.reward_model_path,
            prompts,
            ns=config.bon_curve,
            gold=gold,
            temperature=config.temperature,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            max_prompt_length=config.max_prompt_length,
            seed=config.seed,
            model_kwargs=model_kwargs,
        )
    from accelerate import PartialState

    state = PartialState()
    if not state.is_main_process:  # every process holds the same results; the main one writes them, once
        state.wait_for_everyone()
        return results
    write_eval_outputs(config.output_dir, results, {"config": asdict(config), "bon_curve": curve})
    if config.report:
        from tether.evaluation.report import write_report

        write_report(
            config.output_dir,
            eval_results=results,
            temperature=config.temperature,
            bon_curve=curve,
            length_reward_points=results.length_reward_points(),
            side_by_side=results.side_by_side(config.side_by_side),
        )
    logger.info("eval: wrote %s", Path(config.output_dir) / EVAL_FILE)
    state.wait_for_everyone()
    return results
