"""``tether pipeline``: SFT -> reward model -> PPO, then DPO and best-of-N, evaluation and a report.

One output folder holds everything::

    OUTPUT_DIR/
      data/           the records each stage saw (demo task files, labelled preference pairs per round)
      sft/            stage 1: the fine-tuned policy
      rm/             stage 2: the reward model (rm_round2/, ... with --rounds > 1)
      ppo/            stage 3: policy/, value_model/, metrics.jsonl (ppo_round2/, ...)
      dpo/            the DPO policy
      eval/           eval.json, samples.jsonl, bon_curve.json
      report.md, report.html, plots/
      pipeline_state.json   which stages finished, and where their artifacts are

A stage whose artifact is recorded in ``pipeline_state.json`` (and still exists) is not redone when
the pipeline runs again on the same folder; ``--skip`` leaves stages out and ``--sft_model``,
``--reward_model_path``, ``--ppo_model``, ``--dpo_model`` point a stage at an existing artifact.

With no data arguments the pipeline runs the embedded demo task: its prompts and demonstrations
(``embedded:demo``, ``tether.data.embedded``), and preference pairs sampled from the SFT policy and
labelled by the simulated annotator (``tether.demo.annotator``). With ``--preferences`` it trains on
the user's pairs; iterated RLHF (``--rounds K``) then needs ``--label_command`` to have new pairs
labelled (see ``label_with_command``).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.config import EMBEDDED_MODEL, ConfigError, canonical_options
from tether.data.embedded import DEMO
from tether.data.records import PreferencePair, PromptRecord
from tether.data.writing import prompt_json, write_preferences
from tether.durable import write_json_atomic, write_jsonl_atomic
from tether.ppo import PPOConfig, PPOResult

logger = logging.getLogger(__name__)

STAGES = ("sft", "preferences", "rm", "ppo", "dpo", "eval", "report")
STATE_FILE = "pipeline_state.json"
SFT_SAMPLES_FILE = "sft_samples_round1.jsonl"
#: --rl: the PPOConfig options of each RL method the pipeline can train after the reward model (ppo:
#: today's PPO with GAE and a value model; the others critic-free, 4 responses per prompt, the same
#: number of responses per iteration). Each trains in OUTPUT_DIR/<name>/ and is evaluated as <name>.
RL_METHODS: dict[str, dict[str, Any]] = {
    "ppo": {},
    "rloo": {"advantage_estimator": "rloo", "num_generations": 4},
    "grpo": {"advantage_estimator": "grpo", "num_generations": 4, "kl_in_loss": True},
    "reinforce_pp": {"advantage_estimator": "reinforce_pp", "num_generations": 4},
}


@dataclass
class PipelineConfig:
    output_dir: str = field(
        default="outputs/pipeline", metadata={"help": "Folder for every stage's output and the report."}
    )
    model_name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": "Starting model (hub id, folder, or the embedded SmolLM2-135M-Instruct)."},
    )
    demonstrations: str | None = field(
        default=None, metadata={"help": "SFT demonstrations (file, folder or hub name). Default: the demo task's."}
    )
    preferences: str | None = field(
        default=None,
        metadata={
            "help": "Preference pairs for the reward model and DPO. Default (demo): pairs sampled from the SFT "
            "policy and labelled by the simulated annotator."
        },
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "PPO training prompts. Default: the demo task's training prompts, or the prompts of "
            "--preferences when given."
        },
    )
    eval_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Held-out prompts for evaluation (embedded:demo: the demo task's held-out prompts). Default: "
            "the demo task's held-out prompts."
        },
    )
    rounds: int = field(
        default=1,
        metadata={
            "help": "Iterated RLHF: after each PPO round sample new pairs from the policy, label them, retrain "
            "the reward model on old + new pairs and continue PPO."
        },
    )
    label_command: str | None = field(
        default=None,
        metadata={
            "help": "Labels new pairs in rounds > 1 with real data: a shell command with {input} and {output} "
            "placeholders; {input} is JSON lines {prompt, response_a, response_b}, {output} must "
            "become a preference file in any accepted format. Demo: the simulated annotator."
        },
    )
    prompts_per_round: int = field(
        default=80,
        metadata={"help": "Demo and --rounds: prompts sampled for new responses in each round (0: all PPO prompts)."},
    )
    responses_per_prompt: int = field(
        default=4,
        metadata={
            "help": "Demo and --rounds: responses sampled per prompt; every pair of them is labelled, C(k, 2) "
            "pairs per prompt, which the reward model and DPO score with the prompt and each response once."
        },
    )
    skip: str = field(
        default="", metadata={"help": "Comma-separated stages to leave out: sft, ppo, dpo, bon, eval, report."}
    )
    rl: str = field(
        default="ppo",
        metadata={
            "help": "RL methods trained after the reward model, comma-separated: ppo (GAE with a value model), "
            "rloo, grpo, reinforce_pp (critic-free, 4 responses per prompt). Each gets its folder and a column "
            "in the report; the `ppo:` section applies to all."
        },
    )
    sft_model: str | None = field(default=None, metadata={"help": "Use this SFT model instead of training one."})
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--reward_model", "--reward_model_name_or_path"],
            "help": "Use this reward model instead of training one.",
        },
    )
    gold_reward_model: str | None = field(
        default=None,
        metadata={
            "help": "A second reward model, trained on pairs disjoint from --preferences, as the gold judge of "
            "PPO's rollouts and of the evaluation (Gao et al.'s over-optimisation setup for data without a human "
            "judge); the demo's gold judge is the simulated annotator."
        },
    )
    ppo_model: str | None = field(default=None, metadata={"help": "Use this PPO policy instead of training one."})
    dpo_model: str | None = field(default=None, metadata={"help": "Use this DPO policy instead of training one."})
    annotator_tau: float = field(
        default=0.1,
        metadata={"help": "Demo: noise temperature of the simulated annotator, P(a>b) = sigmoid((g(a)-g(b))/tau)."},
    )
    preference_max_new_tokens: int = field(default=40, metadata={"help": "Demo: response length when sampling pairs."})
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature of the policy (PPO, pairs, evaluation)."}
    )
    bon_n: str = field(
        default="1,2,4",
        metadata={
            "help": "N values of the best-of-N curve in the report; up to the evaluation's samples_per_prompt (4) "
            "the curve comes from the SFT policy's evaluation samples, a larger N samples --bon_curve_prompts again."
        },
    )
    best_of_n: int = field(
        default=4,
        metadata={
            "help": "N of the best-of-N policy (from SFT, ranked by the reward model) in the comparison table; "
            "0 leaves it out. The curve above covers the other N on fewer prompts."
        },
    )
    eval_max_prompts: int = field(default=32, metadata={"help": "Held-out prompts used by the evaluation (0: all)."})
    bon_curve_prompts: int = field(
        default=6, metadata={"help": "Held-out prompts for the best-of-N curve (max N samples each; 0: all)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for every stage."})
    # Per-stage options: YAML sections only (e.g. `ppo: {learning_rate: 1e-5}`); the names are those of
    # `tether sft/rm/ppo/dpo/eval --help`.
    sft: dict = field(default_factory=dict, metadata={"help": "YAML only: options for the SFT stage."})
    rm: dict = field(default_factory=dict, metadata={"help": "YAML only: options for the reward-model stage."})
    ppo: dict = field(default_factory=dict, metadata={"help": "YAML only: options for the PPO stage."})
    dpo: dict = field(default_factory=dict, metadata={"help": "YAML only: options for the DPO stage."})
    eval: dict = field(default_factory=dict, metadata={"help": "YAML only: options for the evaluation."})

    def __post_init__(self):
        known = {"sft", "ppo", "dpo", "bon", "eval", "report"}
        skipped = self.skipped()
        if skipped - known:
            raise ConfigError(
                f"--skip {self.skip}: unknown stage(s) {', '.join(sorted(skipped - known))}; "
                f"use {', '.join(sorted(known))}"
            )
        if self.gold_reward_model and not (Path(self.gold_reward_model) / "config.json").is_file():
            raise ConfigError(
                f"--gold_reward_model {self.gold_reward_model}: not a saved reward model (a folder with config.json, "
                "as `tether rm` writes)"
            )
        methods = self.rl_methods()
        unknown = [m for m in methods if m not in RL_METHODS]
        if unknown or not methods or len(set(methods)) != len(methods):
            raise ConfigError(
                f"--rl {self.rl}: expected distinct methods from {', '.join(RL_METHODS)} (comma-separated)"
            )
        if methods != ["ppo"] and self.rounds > 1:
            raise ConfigError(f"--rl {self.rl} trains several methods side by side: it needs --rounds 1")
        if self.best_of_n < 0:
            raise ConfigError(f"--best_of_n must be >= 0, got {self.best_of_n}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if self.responses_per_prompt < 2:
            raise ConfigError(f"--responses_per_prompt must be >= 2 (a pair), got {self.responses_per_prompt}")
        if self.rounds > 1 and self.preferences and not self.label_command:
            raise ConfigError("--rounds > 1 with your own --preferences needs --label_command to label the new pairs")
        try:
            self.bon_ns()
        except ValueError:
            raise ConfigError(f"--bon_n {self.bon_n}: expected comma-separated positive integers") from None

    def rl_methods(self) -> list[str]:
        return [m.strip() for m in self.rl.split(",") if m.strip()]

    def skipped(self) -> set[str]:
        return {s.strip() for s in self.skip.split(",") if s.strip()}

    def bon_ns(self) -> list[int]:
        ns = [int(x) for x in self.bon_n.split(",") if x.strip()]
        if not ns or min(ns) < 1:
            raise ValueError(self.bon_n)
        return ns

    @property
    def is_demo(self) -> bool:
        return self.preferences is None


# Defaults that make the embedded demo finish in ~15 minutes on 2 CPU cores; each can be overridden
# in the YAML section of its stage. They are the demo's, not general advice (see README).
DEMO_STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {
        "num_train_epochs": 1,
        "learning_rate": 2e-5,
        "per_device_train_batch_size": 8,
        "max_length": 256,
        "eval_split_ratio": 0.0,
        "logging_steps": 1,
        # one epoch of a few steps: the Trainer's end-of-training checkpoint (weights + AdamW state, ~1.5 GB)
        # would be written only to be deleted once the final model is saved; a crashed stage simply reruns
        "save_strategy": "no",
    },
    "rm": {
        "num_train_epochs": 1,
        "learning_rate": 3e-5,
        "per_device_train_batch_size": 24,
        # held-out pairs and the closing pass for reward_stats.json in batches of whole prompts: a
        # prompt's responses are read once for its several pairs (the batches are in prompt order)
        "per_device_eval_batch_size": 24,
        "max_length": 256,
        "eval_split_ratio": 0.15,
        # reward_stats.json from 128 training pairs (256 responses): the demo's PPO and evaluation use the
        # normalisation measured on the SFT policy's own samples, so the file only serves later commands
        "reward_stats_max_pairs": 128,
        "logging_steps": 2,
        "save_strategy": "no",
    },
    # value head on the policy trunk: one network to run forward and backward instead of two. One
    # epoch of two minibatches makes the same two optimizer steps per iteration as two epochs of
    # one, for half the backward passes (the update is GEMM-bound on CPU).
    "ppo": {
        "batch_size": 16,
        "mini_batch_size": 8,
        "ppo_epochs": 1,
        "num_iterations": 6,
        "max_new_tokens": 40,
        "learning_rate": 5e-5,
        "init_kl_coef": 0.05,
        "value_head_on_policy": True,
        "save_steps": 3,
        "logging_steps": 1,
    },
    "dpo": {
        "num_train_epochs": 1,
        "learning_rate": 1e-5,
        "per_device_train_batch_size": 24,
        "per_device_eval_batch_size": 24,
        "max_length": 256,
        "eval_split_ratio": 0.15,
        "precompute_ref_log_probs": True,
        "logging_steps": 2,
        "save_strategy": "no",
    },
    "eval": {"max_new_tokens": 40, "probe_max_new_tokens": 16, "batch_size": 64},
}
# Prompts per generate() call when sampling preference pairs (two responses each). On CPU a decoding
# step over many rows costs little more per row than over a few (measured, SmolLM2-135M, 2 cores, 48
# tokens: 0.9 responses/s at 8 rows, 2.4 at 32, 2.95 at 64), so pairs are sampled in wide batches.
SAMPLING_BATCH_PROMPTS = 40


# ---------------------------------------------------------------------------------------------
# state: which stages finished
# ---------------------------------------------------------------------------------------------
class PipelineState:
    """``pipeline_state.json``: stage name -> {"artifact": path, "seconds": ..., extra}."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / STATE_FILE
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self.stages = json.loads(self.path.read_text(encoding="utf-8")).get("stages", {})

    def done(self, name: str) -> dict[str, Any] | None:
        entry = self.stages.get(name)
        if entry is None:
            return None
        artifact = entry.get("artifact")
        if artifact is not None and not Path(artifact).exists():
            return None  # deleted by hand: redo
        return entry

    def stage_seconds(self) -> dict[str, float]:
        """Seconds each finished stage took when it ran (possibly in an earlier invocation)."""
        return {name: float(entry["seconds"]) for name, entry in self.stages.items() if "seconds" in entry}

    def record(self, name: str, artifact: str | Path | None, seconds: float, **extra) -> None:
        self.stages[name] = {
            "artifact": str(artifact) if artifact is not None else None,
            "seconds": round(seconds, 1),
            **extra,
        }
        write_json_atomic(self.path, {"stages": self.stages}, default=str)


def run_stage(state: PipelineState, name: str, fn: Callable[[], StageResult]) -> dict[str, Any]:
    """Run ``fn`` unless ``name`` already finished; returns the stage's ``pipeline_state.json`` entry."""
    entry = state.done(name)
    if entry is not None:
        logger.info("pipeline: %s already done (%s), skipping", name, entry.get("artifact"))
        return entry
    logger.info("pipeline: running %s", name)
    start = time.time()
    result = fn()
    state.record(name, result.artifact, time.time() - start, **result.details)
    return state.stages[name]


def stage_config(
    config_class: type, pipeline: PipelineConfig, stage: str, fixed: dict[str, Any] | None = None, **values
) -> Any:
    """A stage's config from the demo defaults, the pipeline's values and the YAML section (that wins),
    then ``fixed``: what defines the stage's method, which a shared section cannot change."""
    options: dict[str, Any] = {}
    if pipeline.is_demo:
        options.update(DEMO_STAGE_DEFAULTS.get(stage, {}))
    options.update(values)
    options.update(canonical_options(getattr(pipeline, stage), config_class, f"pipeline section `{stage}`"))
    options.update(fixed or {})
    return config_class(**options)


def check_section(stage: str, section: dict, known: set[str], owner: str) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"pipeline section `{stage}`: unknown option(s) {', '.join(unknown)} for {owner}")


# Data options of the stage commands that the pipeline's own inputs replace: a section may not set them.
_DATA_SET_BY_PIPELINE = {"dataset", "dataset_config", "dataset_split", "dataset_test_split"}

# Options of `evaluate_policies` that the pipeline sets itself; the `eval:` section may set the rest.
_EVAL_SET_BY_PIPELINE = {
    "policies",
    "reference",
    "reward_model",
    "tokenizer",
    "prompts",
    "temperature",
    "gold",
    "best_of_n",
    "bon_curve",
    "bon_curve_prompts",
    "seed",
}


def check_sections(pipeline: PipelineConfig) -> None:
    """Every YAML stage section's option names, checked before the first stage runs (not when its
    stage starts, possibly an hour later)."""
    import inspect

    from tether.evaluation.evaluate import evaluate_policies
    from tether.stages.dpo import DPOConfig
    from tether.stages.reward import RewardConfig
    from tether.stages.sft import SFTConfig

    for stage, cls in (("sft", SFTConfig), ("rm", RewardConfig), ("ppo", PPOConfig), ("dpo", DPOConfig)):
        options = canonical_options(getattr(pipeline, stage), cls, f"pipeline section `{stage}`")
        given = sorted(set(options) & _DATA_SET_BY_PIPELINE)
        if given:
            raise ConfigError(
                f"pipeline section `{stage}`: {', '.join(given)} is set by the pipeline, which trains every stage "
                "on its own data (`demonstrations:`, `preferences:`, `prompts:`); remove it from the section "
                "(`eval_dataset:` may name a stage's held-out data)"
            )
    check_section(
        "eval",
        pipeline.eval,
        set(inspect.signature(evaluate_policies).parameters) - _EVAL_SET_BY_PIPELINE,
        "evaluate_policies",
    )


# ---------------------------------------------------------------------------------------------
# labelling new pairs (iterated RLHF)
# ---------------------------------------------------------------------------------------------
def label_with_command(
    command: str, prompts: list, responses_a: list[str], responses_b: list[str], folder: Path
) -> list[PreferencePair]:
    """Have a user's labelling command turn unlabelled response pairs into preference pairs.

    ``{input}`` gets a JSON-lines file of ``{"prompt", "response_a", "response_b"}``; the command
    must write a preference file (any accepted format) to ``{output}``. Its records are validated
    like any other input (``FILE:LINE`` errors).
    """
    from tether.data.loading import load_preferences

    folder.mkdir(parents=True, exist_ok=True)
    inp = folder / "to_label.jsonl"
    out = folder / "labelled.jsonl"
    write_jsonl_atomic(
        inp,
        (
            {"prompt": prompt_json(p), "response_a": a, "response_b": b}
            for p, a, b in zip(prompts, responses_a, responses_b)
        ),
    )
    cmd = command.replace("{input}", shlex.quote(str(inp))).replace("{output}", shlex.quote(str(out)))
    result = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"--label_command exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
    if not out.is_file():
        raise ConfigError(f"--label_command did not write {out}")
    return load_preferences(str(out))


# ---------------------------------------------------------------------------------------------
# the pipeline: one run object, a short list of stages
# ---------------------------------------------------------------------------------------------
@dataclass
class StageResult:
    """What one stage produced: its artifact (a folder or file) and the details recorded beside it
    in ``pipeline_state.json`` (pair counts, the reward model's eval results, PPO's final metrics)."""

    artifact: str | Path | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineRun:
    """What the stages share: the config, the inputs (read and checked before anything is
    written), the state file, and the artifacts so far (``None`` until their stage has run)."""

    config: PipelineConfig
    out: Path
    state: PipelineState
    started: float
    model_path: str
    tokenizer: Any
    demonstrations: list
    user_pairs: list[PreferencePair] | None
    train_prompts: list[PromptRecord]
    eval_prompts: list[PromptRecord]
    sft_path: str | None = None
    pairs: list[PreferencePair] = field(default_factory=list)
    rm_path: str | None = None
    policy_path: str | None = None
    dpo_path: str | None = None
    ppo_dirs: list[str] = field(default_factory=list)
    #: policies of the --rl methods other than the first (name -> policy folder), evaluated beside it
    rl_policies: dict[str, str] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    report_paths: Any = None

    @property
    def skipped(self) -> set[str]:
        return self.config.skipped()

    def stage_config(self, config_class: type, stage: str, fixed: dict[str, Any] | None = None, **values) -> Any:
        """``stage_config`` with the values every trained stage gets: the seed, a fresh output folder."""
        return stage_config(
            config_class, self.config, stage, fixed, seed=self.config.seed, overwrite_output_dir=True, **values
        )


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """``tether pipeline``: each stage reads what it needs from ``run`` and records its artifact there
    (and, when it trains, in ``pipeline_state.json`` through ``run_stage``, so a re-run skips it)."""
    run = start_run(config)
    for stage in (sft_stage, preference_stage, rlhf_rounds, other_rl_methods, dpo_stage, eval_stage, report_stage):
        stage(run)
    return finish_run(run)


def start_run(config: PipelineConfig) -> PipelineRun:
    """Read and validate every input (nothing is written before), then create the output folder."""
    import torch

    from tether.data.loading import load_demonstrations, load_preferences, load_prompts
    from tether.models.loading import load_tokenizer, resolve_model_path

    out = Path(config.output_dir)
    check_sections(config)
    demonstrations = load_demonstrations(config.demonstrations or DEMO)
    user_pairs = load_preferences(config.preferences) if config.preferences else None
    if config.prompts:
        train_prompts = load_prompts(config.prompts)
    elif user_pairs is not None:
        train_prompts = load_prompts(config.preferences)
    else:
        train_prompts = load_prompts(DEMO, "train")
    if config.eval_prompts:  # embedded:demo as evaluation prompts: its held-out ones
        eval_prompts = load_prompts(config.eval_prompts, "test" if config.eval_prompts == DEMO else "train")
    elif config.is_demo:
        eval_prompts = load_prompts(DEMO, "test")
    else:
        raise ConfigError(
            "--eval_prompts is required with your own --preferences (held-out prompts the policies never trained on)"
        )
    if config.eval_max_prompts:
        eval_prompts = eval_prompts[: config.eval_max_prompts]

    out.mkdir(parents=True, exist_ok=True)
    state = PipelineState(out)
    started = time.time()
    torch.manual_seed(config.seed)
    model_path = resolve_model_path(config.model_name_or_path)
    return PipelineRun(
        config=config,
        out=out,
        state=state,
        started=started,
        model_path=model_path,
        tokenizer=load_tokenizer(model_path),
        demonstrations=demonstrations,
        user_pairs=user_pairs,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
    )


# ---- stage 1: SFT ---------------------------------------------------------------------------
def sft_stage(run: PipelineRun) -> None:
    from tether.models.loading import resolve_model_path

    if run.config.sft_model:
        run.sft_path = resolve_model_path(run.config.sft_model)
    elif "sft" in run.skipped:
        run.sft_path = run.model_path
    else:
        run.sft_path = run_stage(run.state, "sft", lambda: train_sft_model(run))["artifact"]


def train_sft_model(run: PipelineRun) -> StageResult:
    from tether.stages.sft import SFTConfig, train_sft

    cfg = run.stage_config(SFTConfig, "sft", model_name_or_path=run.model_path, output_dir=str(run.out / "sft"))
    train, held = training_and_held_out(run, cfg, run.demonstrations)
    return StageResult(train_sft(cfg, train, held or None), {"demonstrations": len(run.demonstrations)})


def training_and_held_out(run: PipelineRun, cfg: Any, records: list) -> tuple[list, Any]:
    """A stage's training records and its held-out data: the section's ``eval_dataset`` when it names
    one (a file, folder or hub name, read as the stage's own command reads ``--eval_dataset``), else a
    seeded ``eval_split_ratio`` share of the pipeline's ``records`` (none at 0)."""
    from tether.data.loading import split_train_eval

    if cfg.eval_dataset:
        return records, cfg.eval_dataset
    if cfg.eval_split_ratio:
        return split_train_eval(records, cfg.eval_split_ratio, run.config.seed)
    return records, []


# ---- preference data --------------------------------------------------------------------------
def preference_stage(run: PipelineRun) -> None:
    from tether.data.loading import load_preferences

    run.pairs = load_preferences(run_stage(run.state, "preferences", lambda: first_pairs(run))["artifact"])


def first_pairs(run: PipelineRun) -> StageResult:
    """The user's pairs, or (demo) pairs sampled from the SFT policy and labelled by the simulated annotator."""
    config = run.config
    details: dict[str, Any] = {}
    if run.user_pairs is not None:
        pairs = run.user_pairs
    else:
        from tether.demo.annotator import sample_and_label_pairs
        from tether.generation import SamplingSettings
        from tether.models.loading import load_causal_lm, load_tokenizer

        prompts = _prompts_for_round(config, run.train_prompts, 1)
        pairs, groups = sample_and_label_pairs(
            load_causal_lm(run.sft_path),
            load_tokenizer(run.sft_path),
            prompts,
            SamplingSettings(max_new_tokens=config.preference_max_new_tokens, temperature=config.temperature),
            tau=config.annotator_tau,
            seed=config.seed,
            batch_size=SAMPLING_BATCH_PROMPTS,
            responses_per_prompt=config.responses_per_prompt,
        )
        # The SFT policy's own responses at T, with their stop flags: PPO measures its reward
        # normalisation on them instead of sampling again (`train_ppo_policy`).
        samples = run.out / "data" / SFT_SAMPLES_FILE
        write_jsonl_atomic(
            samples,
            (
                {"prompt": prompt_json(p.prompt), "response": s.text, "stopped": s.stopped}
                for p, g in zip(prompts, groups)
                for s in g
            ),
        )
        details = {
            "sft_samples": str(samples),
            "max_new_tokens": config.preference_max_new_tokens,
            "temperature": config.temperature,
        }
    path = write_preferences(pairs, run.out / "data" / "preferences_round1.jsonl")
    return StageResult(path, {"pairs": len(pairs), **details})


# ---- stages 2 and 3, for each round: reward model, then PPO -----------------------------------
def rlhf_rounds(run: PipelineRun) -> None:
    from tether.data.loading import load_preferences
    from tether.models.loading import resolve_model_path

    config = run.config
    run.policy_path = run.sft_path
    run.rm_path = resolve_model_path(config.reward_model_path) if config.reward_model_path else None
    for k in range(1, config.rounds + 1):
        suffix = "" if k == 1 else f"_round{k}"
        if k > 1:
            entry = run_stage(run.state, f"preferences{suffix}", lambda: new_round_pairs(run, k))
            run.pairs = run.pairs + load_preferences(entry["artifact"])
        if not (config.reward_model_path and k == 1):
            run.rm_path = run_stage(run.state, f"rm{suffix}", lambda: train_reward_model(run, suffix))["artifact"]
        if "ppo" in run.skipped or (config.ppo_model and k == 1 and config.rounds == 1):
            if config.ppo_model:
                run.policy_path = resolve_model_path(config.ppo_model)
            break
        first = config.rl_methods()[0]
        name = f"ppo{suffix}" if first == "ppo" else first
        ppo_entry = run_stage(run.state, name, lambda: train_ppo_policy(run, suffix, first))
        run.policy_path = ppo_entry["artifact"]
        run.ppo_dirs.append(str(Path(run.policy_path).parent))
        run.rounds.append(
            {
                "round": k,
                "rm": run.rm_path,
                "policy": run.policy_path,
                **{
                    key: ppo_entry.get("final_metrics", {}).get(key)
                    for key in ("reward/score", "reward/gold", "kl/ref")
                },
            }
        )


def other_rl_methods(run: PipelineRun) -> None:
    """--rl with several methods: each one after the first trains from the SFT policy on the same reward
    model and prompts, in its own folder (``OUTPUT_DIR/<method>/``)."""
    if "ppo" in run.skipped or run.rm_path is None:
        return
    start = run.sft_path
    for method in run.config.rl_methods()[1:]:
        entry = run_stage(run.state, method, lambda: train_ppo_policy(run, "", method, start))
        run.rl_policies[method] = entry["artifact"]


def train_reward_model(run: PipelineRun, suffix: str) -> StageResult:
    from tether.stages.reward import RewardConfig, train_reward

    cfg = run.stage_config(RewardConfig, "rm", model_name_or_path=run.sft_path, output_dir=str(run.out / f"rm{suffix}"))
    train, held = training_and_held_out(run, cfg, run.pairs)
    path = train_reward(cfg, train, held)
    return StageResult(path, {"pairs": len(run.pairs), "eval": _read_json(Path(path) / "eval_results.json")})


def train_ppo_policy(run: PipelineRun, suffix: str, method: str = "ppo", start: str | None = None) -> StageResult:
    """RL from ``start`` (default: the current policy) on the current reward model; ``method`` one of
    ``RL_METHODS`` (its options come before the `ppo:` section's, which wins)."""
    from tether.demo.annotator import gold_metrics_hook
    from tether.ppo import run_ppo

    config = run.config
    values = dict(
        model_name_or_path=start or run.policy_path,
        reward_model_path=run.rm_path,
        output_dir=str(run.out / (f"ppo{suffix}" if method == "ppo" else method)),
        temperature=config.temperature,
    )
    fixed = None
    if method != "ppo":
        values.update(RL_METHODS[method])  # k and the KL's place: the `ppo:` section may change them
        # what makes it this method, whatever the shared `ppo:` section says (the demo's value head
        # included): its estimator, and no value model of any kind
        fixed = {"advantage_estimator": method, "value_head_on_policy": False, "value_model_path": None}
    cfg = run.stage_config(PPOConfig, "ppo", fixed, **values)
    # The labelled pairs' responses are samples of the policy PPO starts from, at its temperature and
    # token budget: its reward normalisation is measured on them (no second sampling pass).
    sampled = run.state.done("preferences") or {}
    if (
        not suffix
        and cfg.reward_norm_responses is None
        and str(start or run.policy_path) == str(run.sft_path)
        and sampled.get("sft_samples")
        and Path(sampled["sft_samples"]).is_file()
        and sampled.get("max_new_tokens") == cfg.max_new_tokens
        and sampled.get("temperature") == cfg.temperature
    ):
        cfg.reward_norm_responses = sampled["sft_samples"]
    judge = gold_judge(config, cfg.max_prompt_length)
    hook = gold_metrics_hook(run.tokenizer, annotator=judge) if judge is not None else None
    result = run_ppo(cfg, run.train_prompts, extra_metrics=hook)
    if result.policy_dir is None:
        raise ConfigError(
            f"PPO stopped early ({result.stopped_reason}) after {result.iterations} iterations; the last good "
            f"checkpoint is {result.last_good_checkpoint}. Raise `init_kl_coef` or lower `learning_rate` in "
            f"the `ppo:` section and run the pipeline again (finished stages are kept)."
        )
    return StageResult(
        result.policy_dir,
        {
            "stopped_reason": result.stopped_reason,
            "iterations": result.iterations,
            "final_metrics": result.final_metrics,
            "reward_normalisation": (_read_json(Path(result.output_dir) / "ppo_summary.json") or {}).get(
                "reward_normalisation"
            ),
        },
    )


# ---- DPO from the same preference data --------------------------------------------------------
def dpo_stage(run: PipelineRun) -> None:
    from tether.models.loading import resolve_model_path

    run.dpo_path = resolve_model_path(run.config.dpo_model) if run.config.dpo_model else None
    if run.dpo_path is None and "dpo" not in run.skipped:
        run.dpo_path = run_stage(run.state, "dpo", lambda: train_dpo_policy(run))["artifact"]


def train_dpo_policy(run: PipelineRun) -> StageResult:
    from tether.stages.dpo import DPOConfig, train_dpo

    cfg = run.stage_config(DPOConfig, "dpo", model_name_or_path=run.sft_path, output_dir=str(run.out / "dpo"))
    train, held = training_and_held_out(run, cfg, run.pairs)
    train_dpo(cfg, train, held)  # its metrics are in dpo/ (the state records the folder only)
    return StageResult(run.out / "dpo")


# ---- evaluation: SFT, PPO, DPO and best-of-N on held-out prompts ------------------------------
def eval_stage(run: PipelineRun) -> None:
    if "eval" not in run.skipped:
        run_stage(run.state, "eval", lambda: evaluate_run(run))


def evaluate_run(run: PipelineRun) -> StageResult:
    from tether.evaluation.evaluate import bon_curve, evaluate_policies

    config, skipped, eval_dir = run.config, run.skipped, run.out / "eval"
    policies = {"sft": run.sft_path}
    if run.policy_path != run.sft_path:
        policies[config.rl_methods()[0]] = run.policy_path
    policies.update(run.rl_policies)
    if run.dpo_path:
        policies["dpo"] = run.dpo_path
    # 4 samples per prompt: best-of-N up to 4 and its curve pick among them (nothing sampled twice), and
    # paired gains average out 4 draws per prompt
    opts = {
        "max_new_tokens": 48,
        "samples_per_prompt": 4,
        **(DEMO_STAGE_DEFAULTS["eval"] if config.is_demo else {}),
        **config.eval,
    }
    bon = (
        {}
        if "bon" in skipped or run.rm_path is None or not config.best_of_n
        else {f"bon{config.best_of_n}": ("sft", config.best_of_n)}
    )
    stats = _ppo_reward_stats(run)
    results = evaluate_policies(
        policies,
        run.sft_path,
        run.rm_path,
        run.tokenizer,
        run.eval_prompts,
        reward_stats=stats,
        temperature=config.temperature,
        gold=gold_judge(config, opts.get("max_prompt_length"), opts.get("batch_size", 8)) or False,
        best_of_n=bon,
        # the curve comes from the best-of-N entry's samples (its prompts get max(N) samples, nothing twice)
        bon_curve=config.bon_ns() if bon else (),
        bon_curve_prompts=config.bon_curve_prompts or None,
        seed=config.seed,
        **opts,
    )
    eval_dir.mkdir(parents=True, exist_ok=True)

    write_jsonl_atomic(eval_dir / "samples.jsonl", results.samples)
    write_json_atomic(
        eval_dir / "eval.json",
        {
            **results.to_json(),
            "length_reward_points": results.length_reward_points(),
            "side_by_side": results.side_by_side(),
        },
        default=str,
    )
    if results.bon_curve is not None:
        write_json_atomic(eval_dir / "bon_curve.json", results.bon_curve, default=str)
    elif "bon" not in skipped and run.rm_path is not None:  # no best-of-N entry: the curve samples on its own
        prompts = run.eval_prompts
        curve = bon_curve(
            run.sft_path,
            run.tokenizer,
            run.rm_path,
            prompts[: config.bon_curve_prompts] if config.bon_curve_prompts else prompts,
            ns=config.bon_ns(),
            reward_stats=stats,
            gold=gold_judge(config, opts.get("max_prompt_length"), opts.get("batch_size", 8)) or False,
            temperature=config.temperature,
            max_new_tokens=opts["max_new_tokens"],
            seed=config.seed,
            batch_size=opts.get("batch_size", 8),
        )
        write_json_atomic(eval_dir / "bon_curve.json", curve, default=str)
    return StageResult(eval_dir / "eval.json")


def gold_judge(config: PipelineConfig, max_prompt_length: int | None = None, batch_size: int = 8):
    """The gold judge: a ``RewardModelJudge`` of ``--gold_reward_model``, the simulated annotator on the demo
    task, else None (no gold score). The judge reads each prompt cut to ``max_prompt_length`` tokens, as
    the policy it judges read it (PPO's or the evaluation's option) and as the proxy reward model scores
    it; the model is loaded once for every stage."""
    if config.gold_reward_model:
        judge = copy.copy(_cached_judge(config.gold_reward_model))
        judge.max_prompt_length, judge.batch_size = max_prompt_length, batch_size
        return judge
    if config.is_demo:
        from tether.demo.annotator import default_annotator

        return default_annotator()
    return None


@functools.lru_cache(maxsize=1)
def _cached_judge(path: str):
    from tether.evaluation.evaluate import RewardModelJudge

    return RewardModelJudge(path)


def _ppo_reward_stats(run: PipelineRun):
    """The normalisation the last PPO round trained with (measured on its starting policy's samples), so
    the evaluation's proxy scores are in PPO's units; None (the reward model's own file) without PPO."""
    from tether.models.scoring import RewardStats

    suffix = "" if len(run.ppo_dirs) <= 1 else f"_round{len(run.ppo_dirs)}"
    record = (run.state.done(f"ppo{suffix}") or {}).get("reward_normalisation") or {}
    if record.get("mean") is None:
        return None
    return RewardStats(record["mean"], record["std"], record["count"], record["source"])


# ---- report and summary ----------------------------------------------------------------------
def report_stage(run: PipelineRun) -> None:
    eval_dir = run.out / "eval"
    if "report" not in run.skipped and (eval_dir / "eval.json").is_file():
        run.report_paths = _write_pipeline_report(
            run.config,
            run.out,
            eval_dir,
            run.ppo_dirs,
            run.rounds,
            run.config.temperature,
            time.time() - run.started,
            run.state.stage_seconds(),
        )


def finish_run(run: PipelineRun) -> dict[str, Any]:
    """Write and print ``pipeline_summary.json``: where every artifact is, and the time each stage took."""
    summary = {
        "output_dir": str(run.out),
        "sft": run.sft_path,
        "reward_model": run.rm_path,
        "ppo": run.policy_path,
        "dpo": run.dpo_path,
        "rounds": run.rounds,
        "report": str(run.report_paths.html) if run.report_paths else None,
        "seconds": round(time.time() - run.started, 1),
        "stage_seconds": run.state.stage_seconds(),
    }
    write_json_atomic(run.out / "pipeline_summary.json", summary, default=str)
    print(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------
# `tether ppo`
# ---------------------------------------------------------------------------------------------
def run_ppo_command(config: PPOConfig) -> PPOResult:
    """``tether ppo``: ``run_ppo``, logging the simulated annotator's gold score as ``reward/gold`` every
    iteration when the prompts are the embedded demo task's (``--dataset embedded:demo``)."""
    from tether.ppo import run_ppo

    hook = None
    if config.dataset == DEMO:
        from tether.demo.annotator import gold_metrics_hook
        from tether.models.loading import load_tokenizer

        hook = gold_metrics_hook(load_tokenizer(config.model_name_or_path))
    return run_ppo(config, extra_metrics=hook)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _prompts_for_round(config: PipelineConfig, prompts: list[PromptRecord], k: int) -> list[PromptRecord]:
    """All prompts, or a seeded sample of ``--prompts_per_round`` of them (a different one each round)."""
    import random

    chosen = list(prompts)
    if config.prompts_per_round and config.prompts_per_round < len(chosen):
        chosen = random.Random(config.seed + k).sample(chosen, config.prompts_per_round)
    return chosen


def new_round_pairs(run: PipelineRun, k: int) -> StageResult:
    """Round ``k`` > 1: sample ``--responses_per_prompt`` responses per prompt from the current policy
    (seeded with ``--seed`` + k: the same responses on any number of processes) and have every pair of
    them labelled."""
    from tether.demo.annotator import pairs_of_samples
    from tether.generation import SamplingSettings, sample_seeded
    from tether.models.loading import load_causal_lm, load_tokenizer

    config, out = run.config, run.out
    prompts = [p.prompt for p in _prompts_for_round(config, run.train_prompts, k)]
    policy, tok = load_causal_lm(run.policy_path), load_tokenizer(run.policy_path)
    settings = SamplingSettings(max_new_tokens=config.preference_max_new_tokens, temperature=config.temperature)
    groups = sample_seeded(
        policy,
        tok,
        prompts,
        settings,
        num_return_sequences=config.responses_per_prompt,
        batch_size=SAMPLING_BATCH_PROMPTS,
        seed=config.seed + k,
    )
    raw, a, b = pairs_of_samples(prompts, groups)
    if config.label_command:
        pairs = label_with_command(
            config.label_command, raw, [x.text for x in a], [x.text for x in b], out / "data" / f"round{k}"
        )
    else:
        from tether.demo.annotator import label_pairs

        pairs = label_pairs(
            raw,
            [x.text for x in a],
            [x.text for x in b],
            tau=config.annotator_tau,
            seed=config.seed + k,
            stopped_a=[x.stopped for x in a],
            stopped_b=[x.stopped for x in b],
        )
    path = write_preferences(pairs, out / "data" / f"preferences_round{k}.jsonl")
    return StageResult(path, {"pairs": len(pairs)})


def _write_pipeline_report(
    config: PipelineConfig,
    out: Path,
    eval_dir: Path,
    ppo_dirs: list[str],
    rounds: list[dict[str, Any]],
    temperature: float,
    seconds: float,
    stage_seconds: dict[str, float],
):
    from tether.evaluation.report import write_report
    from tether.tracking import read_jsonl

    eval_doc = _read_json(eval_dir / "eval.json")
    ppo_rows: list[dict[str, Any]] = []
    for d in ppo_dirs:
        metrics = Path(d) / "metrics.jsonl"
        if metrics.is_file():
            offset = ppo_rows[-1]["step"] if ppo_rows else 0
            ppo_rows += [{**r, "step": r.get("step", 0) + offset} for r in read_jsonl(metrics)]
    # Over-optimisation curve: every PPO iteration is a checkpoint of the policy, measured on its own
    # rollout batch (proxy = RM score, gold = annotator, KL = summed per-token KL to the reference);
    # windows of iterations are averaged so one noisy batch cannot make a "peak".
    from tether.evaluation.evaluate import points_from_metrics

    points = points_from_metrics(ppo_rows, window=max(1, min(5, len(ppo_rows) // 6)))
    curve = _read_json(eval_dir / "bon_curve.json")
    length_points = eval_doc.get("length_reward_points") if isinstance(eval_doc, dict) else None
    stages = ", ".join(f"{name} {t:.0f} s" for name, t in stage_seconds.items())
    notes = [
        f"Stage times: {stages}; {sum(stage_seconds.values()) / 60:.1f} minutes in all (stages finished by "
        f"earlier runs on this folder count with the time they took then; this run: {seconds / 60:.1f} "
        f"minutes).",
        f"Sampling temperature T = {temperature}: KL figures and bands hold at this T.",
    ]
    return write_report(
        out,
        eval_results=eval_doc,
        ppo_metrics=ppo_rows,
        overopt_points=points,
        bon_curve=curve,
        length_reward_points=length_points,
        rounds=rounds if config.rounds > 1 else None,
        temperature=temperature,
        side_by_side=eval_doc.get("side_by_side") if isinstance(eval_doc, dict) else None,
        notes=notes,
    )
