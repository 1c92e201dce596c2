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
``--reward_model``, ``--ppo_model``, ``--dpo_model`` point a stage at an existing artifact.

With no data arguments the pipeline runs the embedded demo task (``tether.demo``): its prompts and
demonstrations, and preference pairs sampled from the SFT policy and labelled by the simulated
annotator. With ``--preferences`` it trains on the user's pairs; iterated RLHF (``--rounds K``) then
needs ``--label_command`` to have new pairs labelled (see ``label_with_command``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.config import EMBEDDED_MODEL, ConfigError
from tether.data.records import PreferencePair, PromptRecord
from tether.durable import write_json_atomic, write_jsonl_atomic

logger = logging.getLogger(__name__)

STAGES = ("sft", "preferences", "rm", "ppo", "dpo", "eval", "report")
STATE_FILE = "pipeline_state.json"


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
        default=None, metadata={"help": "Held-out prompts for evaluation. Default: the demo task's held-out prompts."}
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
    pairs_per_round: int = field(
        default=80,
        metadata={
            "help": "Demo and --rounds: prompts sampled for new response pairs in each round (0: all PPO prompts)."
        },
    )
    skip: str = field(
        default="", metadata={"help": "Comma-separated stages to leave out: sft, ppo, dpo, bon, eval, report."}
    )
    sft_model: str | None = field(default=None, metadata={"help": "Use this SFT model instead of training one."})
    reward_model: str | None = field(default=None, metadata={"help": "Use this reward model instead of training one."})
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
    bon_n: str = field(default="1,2,4,8,16", metadata={"help": "N values of the best-of-N curve in the report."})
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
        if self.best_of_n < 0:
            raise ConfigError(f"--best_of_n must be >= 0, got {self.best_of_n}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if self.rounds > 1 and self.preferences and not self.label_command:
            raise ConfigError("--rounds > 1 with your own --preferences needs --label_command to label the new pairs")
        try:
            self.bon_ns()
        except ValueError:
            raise ConfigError(f"--bon_n {self.bon_n}: expected comma-separated positive integers") from None

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
    },
    "rm": {
        "num_train_epochs": 1,
        "learning_rate": 3e-5,
        "per_device_train_batch_size": 8,
        "max_length": 256,
        "eval_split_ratio": 0.15,
        "logging_steps": 2,
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
        "per_device_train_batch_size": 8,
        "max_length": 256,
        "eval_split_ratio": 0.15,
        "precompute_ref_log_probs": True,
        "logging_steps": 2,
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


def run_stage(state: PipelineState, name: str, fn: Callable[[], tuple[Any, dict]]) -> dict[str, Any]:
    """Run ``fn`` unless ``name`` already finished; ``fn`` returns ``(artifact, extra)``."""
    entry = state.done(name)
    if entry is not None:
        logger.info("pipeline: %s already done (%s), skipping", name, entry.get("artifact"))
        return entry
    logger.info("pipeline: running %s", name)
    start = time.time()
    artifact, extra = fn()
    state.record(name, artifact, time.time() - start, **extra)
    return state.stages[name]


def stage_config(config_class: type, pipeline: PipelineConfig, stage: str, **values) -> Any:
    """A stage's config from the demo defaults, the pipeline's values and the YAML section (that wins)."""
    options: dict[str, Any] = {}
    if pipeline.is_demo:
        options.update(DEMO_STAGE_DEFAULTS.get(stage, {}))
    options.update(values)
    section = getattr(pipeline, stage)
    check_section(stage, section, {f.name for f in dataclasses.fields(config_class)}, config_class.__name__)
    options.update(section)
    return config_class(**options)


def check_section(stage: str, section: dict, known: set[str], owner: str) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"pipeline section `{stage}`: unknown option(s) {', '.join(unknown)} for {owner}")


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
    "seed",
}


def check_sections(pipeline: PipelineConfig) -> None:
    """Every YAML stage section's option names, checked before the first stage runs (not when its
    stage starts, possibly an hour later)."""
    import inspect

    from tether.evaluation.evaluate import evaluate_policies
    from tether.ppo import PPOConfig
    from tether.stages.dpo import DPOConfig
    from tether.stages.reward import RewardConfig
    from tether.stages.sft import SFTConfig

    for stage, cls in (("sft", SFTConfig), ("rm", RewardConfig), ("ppo", PPOConfig), ("dpo", DPOConfig)):
        check_section(stage, getattr(pipeline, stage), {f.name for f in dataclasses.fields(cls)}, cls.__name__)
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
    from tether.demo.task import _prompt_json

    folder.mkdir(parents=True, exist_ok=True)
    inp = folder / "to_label.jsonl"
    out = folder / "labelled.jsonl"
    write_jsonl_atomic(
        inp,
        (
            {"prompt": _prompt_json(p), "response_a": a, "response_b": b}
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
# the pipeline
# ---------------------------------------------------------------------------------------------
def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    import torch

    from tether.data.loading import load_demonstrations, load_preferences, load_prompts
    from tether.demo import task as demo
    from tether.demo.task import write_preferences
    from tether.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

    out = Path(config.output_dir)
    skipped = config.skipped()
    # Read and validate every user input before anything is written.
    check_sections(config)
    demonstrations = load_demonstrations(config.demonstrations) if config.demonstrations else demo.demonstrations()
    user_pairs = load_preferences(config.preferences) if config.preferences else None
    if config.prompts:
        train_prompts = load_prompts(config.prompts)
    elif user_pairs is not None:
        train_prompts = load_prompts(config.preferences)
    else:
        train_prompts = demo.train_prompts()
    if config.eval_prompts:
        eval_prompts = load_prompts(config.eval_prompts)
    elif config.is_demo:
        eval_prompts = demo.heldout_prompts()
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
    tokenizer = load_tokenizer(model_path)
    temperature = config.temperature

    # ---- stage 1: SFT -------------------------------------------------------------------------
    def sft_stage():
        from tether.stages.sft import SFTConfig, train_sft

        cfg = stage_config(
            SFTConfig,
            config,
            "sft",
            model_name_or_path=model_path,
            output_dir=str(out / "sft"),
            seed=config.seed,
            overwrite_output_dir=True,
        )
        return train_sft(cfg, demonstrations), {"demonstrations": len(demonstrations)}

    if config.sft_model:
        sft_path = resolve_model_path(config.sft_model)
    elif "sft" in skipped:
        sft_path = model_path
    else:
        sft_path = run_stage(state, "sft", sft_stage)["artifact"]

    # ---- preference data ----------------------------------------------------------------------
    def preference_stage():
        if user_pairs is not None:
            pairs = user_pairs
        else:
            from tether.demo.annotator import build_preference_dataset
            from tether.generation import SamplingSettings

            policy = load_causal_lm(sft_path)
            pairs = build_preference_dataset(
                policy,
                load_tokenizer(sft_path),
                _prompts_for_round(config, train_prompts, 1),
                SamplingSettings(max_new_tokens=config.preference_max_new_tokens, temperature=temperature),
                tau=config.annotator_tau,
                seed=config.seed,
                batch_size=SAMPLING_BATCH_PROMPTS,
            )
        path = write_preferences(pairs, out / "data" / "preferences_round1.jsonl")
        return path, {"pairs": len(pairs)}

    pref_path = run_stage(state, "preferences", preference_stage)["artifact"]
    all_pairs = load_preferences(pref_path)

    # ---- stage 2 and 3, for each round: reward model, then PPO ---------------------------------
    from tether.demo.annotator import gold_metrics_hook

    policy_path = sft_path
    rm_path = resolve_model_path(config.reward_model) if config.reward_model else None
    rounds_summary: list[dict[str, Any]] = []
    ppo_dirs: list[str] = []
    for k in range(1, config.rounds + 1):
        suffix = "" if k == 1 else f"_round{k}"
        if k > 1:
            pairs_path = run_stage(
                state,
                f"preferences{suffix}",
                lambda: _new_round_pairs(config, out, k, policy_path, train_prompts, temperature),
            )
            all_pairs = all_pairs + load_preferences(pairs_path["artifact"])
        if not (config.reward_model and k == 1):

            def rm_stage(pairs=all_pairs, suffix=suffix):
                from tether.stages.reward import RewardConfig, train_reward

                cfg = stage_config(
                    RewardConfig,
                    config,
                    "rm",
                    model_name_or_path=sft_path,
                    output_dir=str(out / f"rm{suffix}"),
                    seed=config.seed,
                    overwrite_output_dir=True,
                )
                from tether.data.loading import split_train_eval

                train, held = (
                    split_train_eval(pairs, cfg.eval_split_ratio, config.seed) if cfg.eval_split_ratio else (pairs, [])
                )
                path = train_reward(cfg, train, held)
                results = _read_json(Path(path) / "eval_results.json")
                return path, {"pairs": len(pairs), "eval": results}

            rm_entry = run_stage(state, f"rm{suffix}", rm_stage)
            rm_path = rm_entry["artifact"]
        if "ppo" in skipped or (config.ppo_model and k == 1 and config.rounds == 1):
            if config.ppo_model:
                policy_path = resolve_model_path(config.ppo_model)
            break

        def ppo_stage(start=policy_path, rm=rm_path, suffix=suffix):
            from tether.ppo import PPOConfig, run_ppo

            cfg = stage_config(
                PPOConfig,
                config,
                "ppo",
                model_name_or_path=start,
                reward_model_path=rm,
                output_dir=str(out / f"ppo{suffix}"),
                seed=config.seed,
                temperature=temperature,
                overwrite_output_dir=True,
            )
            hook = gold_metrics_hook(tokenizer) if config.is_demo else None
            result = run_ppo(cfg, train_prompts, extra_metrics=hook)
            if result.policy_dir is None:
                raise ConfigError(
                    f"PPO stopped early ({result.stopped_reason}) after {result.iterations} iterations; the last good "
                    f"checkpoint is {result.last_good_checkpoint}. Raise `init_kl_coef` or lower `learning_rate` in "
                    f"the `ppo:` section and run the pipeline again (finished stages are kept)."
                )
            return result.policy_dir, {
                "stopped_reason": result.stopped_reason,
                "iterations": result.iterations,
                "final_metrics": result.final_metrics,
            }

        ppo_entry = run_stage(state, f"ppo{suffix}", ppo_stage)
        policy_path = ppo_entry["artifact"]
        ppo_dirs.append(str(Path(policy_path).parent))
        rounds_summary.append(
            {
                "round": k,
                "rm": rm_path,
                "policy": policy_path,
                **{
                    key: ppo_entry.get("final_metrics", {}).get(key)
                    for key in ("reward/score", "reward/gold", "kl/ref")
                },
            }
        )

    # ---- DPO from the same preference data ---------------------------------------------------
    dpo_path = resolve_model_path(config.dpo_model) if config.dpo_model else None
    if dpo_path is None and "dpo" not in skipped:

        def dpo_stage():
            from tether.data.loading import split_train_eval
            from tether.stages.dpo import DPOConfig, train_dpo

            cfg = stage_config(
                DPOConfig,
                config,
                "dpo",
                model_name_or_path=sft_path,
                output_dir=str(out / "dpo"),
                seed=config.seed,
                overwrite_output_dir=True,
            )
            train, held = (
                split_train_eval(all_pairs, cfg.eval_split_ratio, config.seed)
                if cfg.eval_split_ratio
                else (all_pairs, [])
            )
            result = train_dpo(cfg, train, held)
            return _artifact_of(result, out / "dpo"), {}

        dpo_path = run_stage(state, "dpo", dpo_stage)["artifact"]

    # ---- evaluation: SFT, PPO, DPO and best-of-N on held-out prompts --------------------------
    eval_dir = out / "eval"
    if "eval" not in skipped:

        def eval_stage():
            from tether.evaluation.evaluate import bon_curve, evaluate_policies

            policies = {"sft": sft_path}
            if policy_path != sft_path:
                policies["ppo"] = policy_path
            if dpo_path:
                policies["dpo"] = dpo_path
            opts = {"max_new_tokens": 48, **(DEMO_STAGE_DEFAULTS["eval"] if config.is_demo else {}), **config.eval}
            bon = (
                {}
                if "bon" in skipped or rm_path is None or not config.best_of_n
                else {f"bon{config.best_of_n}": ("sft", config.best_of_n)}
            )
            results = evaluate_policies(
                policies,
                sft_path,
                rm_path,
                tokenizer,
                eval_prompts,
                temperature=temperature,
                gold=config.is_demo,
                best_of_n=bon,
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
            curve = None
            if "bon" not in skipped and rm_path is not None:
                curve_prompts = eval_prompts[: config.bon_curve_prompts] if config.bon_curve_prompts else eval_prompts
                curve = bon_curve(
                    sft_path,
                    tokenizer,
                    rm_path,
                    curve_prompts,
                    ns=config.bon_ns(),
                    gold=config.is_demo,
                    temperature=temperature,
                    max_new_tokens=opts["max_new_tokens"],
                    seed=config.seed,
                    batch_size=opts.get("batch_size", 8),
                )
                write_json_atomic(eval_dir / "bon_curve.json", curve, default=str)
            return eval_dir / "eval.json", {}

        run_stage(state, "eval", eval_stage)

    # ---- report ------------------------------------------------------------------------------
    report_paths = None
    if "report" not in skipped and (eval_dir / "eval.json").is_file():
        report_paths = _write_pipeline_report(
            config, out, eval_dir, ppo_dirs, rounds_summary, temperature, time.time() - started, state.stage_seconds()
        )
    summary = {
        "output_dir": str(out),
        "sft": sft_path,
        "reward_model": rm_path,
        "ppo": policy_path,
        "dpo": dpo_path,
        "rounds": rounds_summary,
        "report": str(report_paths.html) if report_paths else None,
        "seconds": round(time.time() - started, 1),
        "stage_seconds": state.stage_seconds(),
    }
    write_json_atomic(out / "pipeline_summary.json", summary, default=str)
    print(json.dumps(summary, indent=2))
    return summary


def _artifact_of(result: Any, default: Path) -> str:
    if isinstance(result, (str, Path)):
        return str(result)
    if isinstance(result, dict):
        for key in ("output_dir", "model_dir", "path"):
            if key in result:
                return str(result[key])
    return str(default)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _prompts_for_round(config: PipelineConfig, prompts: list[PromptRecord], k: int) -> list[PromptRecord]:
    """All prompts, or a seeded sample of ``--pairs_per_round`` of them (a different one each round)."""
    import random

    chosen = list(prompts)
    if config.pairs_per_round and config.pairs_per_round < len(chosen):
        chosen = random.Random(config.seed + k).sample(chosen, config.pairs_per_round)
    return chosen


def _new_round_pairs(
    config: PipelineConfig, out: Path, k: int, policy_path: str, prompts: list[PromptRecord], temperature: float
):
    """Sample two responses per prompt from the current policy and have them labelled."""
    from tether.demo.task import write_preferences
    from tether.generation import SamplingSettings, sample_responses
    from tether.models.loading import load_causal_lm, load_tokenizer

    raw = [p.prompt for p in _prompts_for_round(config, prompts, k)]
    policy, tok = load_causal_lm(policy_path), load_tokenizer(policy_path)
    settings = SamplingSettings(max_new_tokens=config.preference_max_new_tokens, temperature=temperature)
    groups = sample_responses(policy, tok, raw, settings, num_return_sequences=2, batch_size=SAMPLING_BATCH_PROMPTS)
    a, b = [g[0].text for g in groups], [g[1].text for g in groups]
    if config.label_command:
        pairs = label_with_command(config.label_command, raw, a, b, out / "data" / f"round{k}")
    else:
        from tether.demo.annotator import label_pairs

        pairs = label_pairs(
            raw,
            a,
            b,
            tau=config.annotator_tau,
            seed=config.seed + k,
            stopped_a=[g[0].stopped for g in groups],
            stopped_b=[g[1].stopped for g in groups],
        )
    path = write_preferences(pairs, out / "data" / f"preferences_round{k}.jsonl")
    return path, {"pairs": len(pairs)}


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
    from tether.evaluation.study import points_from_metrics

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
