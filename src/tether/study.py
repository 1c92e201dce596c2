"""``tether study overoptimization``: PPO at several KL coefficients, gold reward against √KL on one plot.

Gao et al. (2022) showed that optimising a proxy reward model first raises the true (gold) reward
and then lowers it, as a function of the distance d = √KL from the starting policy, and that a KL
penalty mostly slows the walk along that curve. The study trains the same SFT policy against the
same reward model with fixed KL coefficients β (the default list includes a low one, 0.001, that is
expected to over-optimise), logs the gold score of every rollout batch with the simulated annotator,
and draws each run's gold (recentred on its start) against √KL with its fitted
``R_RL(d) = d(α − β log d)``.

Points come from the PPO runs' ``metrics.jsonl`` (``kl/ref``, ``reward/score``, ``reward/gold`` per
iteration, averaged over windows of ``--window`` iterations: cheap, on training prompts); with
``--eval_checkpoints`` every saved checkpoint is also evaluated on held-out prompts
(``tether.evaluation.evaluate``), which is slower and what the plot then uses.

A finished run (``ppo_summary.json`` present) is not trained again, so the study can be re-run to
redraw or extend the list of coefficients.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tether.config import EMBEDDED_MODEL, ConfigError
from tether.evaluation.evaluate import points_from_metrics

logger = logging.getLogger(__name__)

STUDIES = ("overoptimization",)
_ALIASES = {
    "overoptimisation": "overoptimization",
    "over-optimization": "overoptimization",
    "over-optimisation": "overoptimization",
}
STUDY_FILE = "study.json"


@dataclass
class StudyConfig:
    study: str = field(
        default="overoptimization",
        metadata={"help": "Which study; given as the word after `tether study` (`tether study overoptimization`)."},
    )
    model_name_or_path: str = field(
        default=EMBEDDED_MODEL, metadata={"help": "Starting policy (normally the SFT model); also the KL reference."}
    )
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--reward_model_name_or_path", "--reward_model"],
            "help": "Reward-model folder (required).",
        },
    )
    kl_coefs: list[float] = field(
        default_factory=lambda: [0.2, 0.05, 0.01, 0.001],
        metadata={"help": "Fixed KL coefficients β, one PPO run each; keep a low one (it over-optimises)."},
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Training prompts. Default: embedded:demo (the demo task's training prompts)."}
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Held-out prompts for --eval_checkpoints. Default: the demo task's held-out prompts "
            "(embedded:demo, split test)."
        },
    )
    num_iterations: int = field(default=40, metadata={"help": "PPO iterations per run."})
    batch_size: int = field(default=16, metadata={"help": "Episodes per PPO iteration."})
    mini_batch_size: int | None = field(
        default=None, metadata={"help": "Episodes per optimizer step (default: batch)."}
    )
    ppo_epochs: int = field(default=4, metadata={"help": "PPO epochs per batch."})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (linear decay to 0)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Response token budget."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (KL is measured at it)."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    window: int = field(default=5, metadata={"help": "Iterations averaged into one point of the curve."})
    eval_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Also save a checkpoint every --save_every iterations and evaluate each on held-out prompts."
        },
    )
    save_every: int = field(default=10, metadata={"help": "Checkpoint interval (iterations) with --eval_checkpoints."})
    eval_num_prompts: int = field(default=32, metadata={"help": "Held-out prompts per checkpoint evaluation."})
    gold: str = field(default="auto", metadata={"help": "auto (on for the demo prompts), on or off."})
    ppo_config: str | None = field(
        default=None,
        metadata={
            "help": "YAML file of further `tether ppo` options applied to every run (the β and output folder are set "
            "by the study)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of every run (the runs differ only in β)."})
    output_dir: str = field(default="outputs/study-overoptimization", metadata={"help": "Where runs and the plot go."})

    def __post_init__(self):
        self.study = _ALIASES.get(self.study, self.study)
        if self.study not in STUDIES:
            raise ConfigError(f"unknown study {self.study!r}: available: {', '.join(STUDIES)}")
        if not self.kl_coefs:
            raise ConfigError("--kl_coefs: give at least one KL coefficient")
        if any(b < 0 for b in self.kl_coefs):
            raise ConfigError("--kl_coefs must be >= 0")
        if self.window < 1:
            raise ConfigError("--window must be >= 1")
        if self.gold not in ("auto", "on", "off"):
            raise ConfigError(f"--gold {self.gold!r}: use auto, on or off")


def run_label(beta: float) -> str:
    return f"β = {beta:g}"


def run_folder(output_dir: str | Path, beta: float) -> Path:
    return Path(output_dir) / f"beta-{beta:g}"


def draw_study(
    output_dir: str | Path,
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    temperature: float | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Write ``study.json``, the gold-vs-√KL plot of all runs and a report; returns paths and the sentence."""
    from tether.durable import write_text_atomic
    from tether.evaluation.metrics import fit_rl, rl_peak
    from tether.evaluation.report import write_report

    fits = {}
    for label, points in runs.items():
        pts = sorted(points, key=lambda p: max(0.0, p["kl"]))
        if len(pts) >= 3 and all(p.get("gold") is not None for p in pts):
            d = np.sqrt([max(0.0, p["kl"]) for p in pts])
            g = np.array([p["gold"] for p in pts]) - pts[0]["gold"]
            try:
                alpha, beta = fit_rl(d, g)
                fits[label] = {"alpha": alpha, "beta": beta, "peak_sqrt_kl": rl_peak(alpha, beta)}
            except (ValueError, np.linalg.LinAlgError):
                pass
    doc = {"study": "overoptimization", "temperature": temperature, "runs": dict(runs), "fits_R_RL": fits}
    out = Path(output_dir)
    write_text_atomic(out / STUDY_FILE, json.dumps(doc, indent=2, default=str) + "\n")
    paths = write_report(
        out, study_runs=runs, temperature=temperature, title="tether study: over-optimisation", notes=notes
    )
    return {"study_json": out / STUDY_FILE, "report": paths}


# ---------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------
def _ppo_config(config: StudyConfig, beta: float):
    from tether.config import read_yaml_config
    from tether.ppo import PPOConfig

    extra: dict[str, Any] = {}
    if config.ppo_config:
        extra = read_yaml_config(config.ppo_config, PPOConfig)
    extra.update(
        output_dir=str(run_folder(config.output_dir, beta)),
        model_name_or_path=config.model_name_or_path,
        reward_model_path=config.reward_model_path,
        init_kl_coef=float(beta),
        target_kl=None,  # fixed β: the study compares coefficients
        num_iterations=config.num_iterations,
        batch_size=config.batch_size,
        mini_batch_size=config.mini_batch_size,
        ppo_epochs=config.ppo_epochs,
        learning_rate=config.learning_rate,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        use_peft=config.use_peft,
        seed=config.seed,
        save_steps=config.save_every if config.eval_checkpoints else 0,
        save_total_limit=None,
        keep_checkpoints=config.eval_checkpoints,  # evaluated after the run
        stop_on_divergence=False,  # the study wants to see what happens past the healthy band
        report_to="none",
    )
    return PPOConfig(**extra)


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Train one PPO run per β (skipping finished ones), collect points, draw the plot and report."""
    from tether.data.embedded import DEMO, is_demo_prompt
    from tether.data.loading import load_prompts
    from tether.demo.annotator import gold_metrics_hook
    from tether.durable import complete_checkpoints
    from tether.models.loading import load_tokenizer
    from tether.ppo import SUMMARY_FILE, run_ppo
    from tether.tracking import METRICS_FILE, read_jsonl

    if not config.reward_model_path:
        raise ConfigError("--reward_model_path is required (train one with `tether rm`)")
    prompts = load_prompts(config.dataset or DEMO)
    gold = config.gold == "on" or (config.gold == "auto" and all(is_demo_prompt(p.prompt) for p in prompts))
    tokenizer = load_tokenizer(config.model_name_or_path)
    hook = gold_metrics_hook(tokenizer) if gold else None

    runs: dict[str, list[dict[str, Any]]] = {}
    for beta in config.kl_coefs:
        folder = run_folder(config.output_dir, beta)
        if (folder / SUMMARY_FILE).is_file():
            logger.info("study: %s already trained (%s), reusing it", run_label(beta), folder)
        else:
            logger.info("study: PPO with fixed %s -> %s", run_label(beta), folder)
            run_ppo(_ppo_config(config, beta), prompts=prompts, extra_metrics=hook)
        if config.eval_checkpoints:
            runs[run_label(beta)] = _checkpoint_points(
                config, folder, tokenizer, gold, [c / "policy" for c in complete_checkpoints(folder)]
            )
        else:
            runs[run_label(beta)] = points_from_metrics(read_jsonl(folder / METRICS_FILE), config.window)
    notes = [
        f"Starting policy: {config.model_name_or_path}; reward model: {config.reward_model_path}.",
        f"{config.num_iterations} PPO iterations of {config.batch_size} episodes per run, fixed β, "
        f"learning rate {config.learning_rate:g}.",
    ]
    if not gold:
        notes.append("No gold function for these prompts: the plot needs reward/gold and stays empty.")
    return draw_study(config.output_dir, runs, config.temperature, notes)


CHECKPOINT_POINTS_FILE = "checkpoint_points.json"


def _checkpoint_points(config: StudyConfig, folder: Path, tokenizer, gold: bool, checkpoints: list[Path]):
    """Evaluate the start, every checkpoint and the final policy on held-out prompts (cached per run folder)."""
    from tether.data.embedded import DEMO
    from tether.data.loading import load_prompts
    from tether.durable import write_text_atomic
    from tether.evaluation.evaluate import evaluate_policies, overopt_points

    policies = {"start": config.model_name_or_path}
    policies.update({c.parent.name: str(c) for c in checkpoints})
    summary = json.loads((folder / "ppo_summary.json").read_text(encoding="utf-8"))
    if f"checkpoint-{summary.get('iterations')}" not in policies:  # the final policy is not a checkpoint already
        policies["final"] = str(folder / "policy")
    settings = {
        "policies": policies,
        "eval_dataset": config.eval_dataset,
        "eval_num_prompts": config.eval_num_prompts,
        "temperature": config.temperature,
        "max_new_tokens": config.max_new_tokens,
        "gold": gold,
        "seed": config.seed,
    }
    cache = folder / CHECKPOINT_POINTS_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("settings") == settings:
            return cached["points"]
    prompts = load_prompts(config.eval_dataset) if config.eval_dataset else load_prompts(DEMO, "test")
    prompts = prompts[: config.eval_num_prompts]
    results = evaluate_policies(
        policies,
        config.model_name_or_path,
        config.reward_model_path,
        tokenizer,
        prompts,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        gold=gold,
        probes=False,
        seed=config.seed,
    )
    points = overopt_points(results, list(policies))
    write_text_atomic(cache, json.dumps({"settings": settings, "points": points}, indent=2) + "\n")
    return points
