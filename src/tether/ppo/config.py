"""Options and bookkeeping of ``tether ppo``: the typed configuration shared by the CLI, YAML and
Python (:class:`PPOConfig`), the batch geometry it implies on a given number of processes, the
counters a checkpoint carries (:class:`PPOState`) and what a run returns (:class:`PPOResult`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from tether.config import ConfigError, DataArguments, ModelArguments, refuse_unused_options
from tether.ppo.advantages import SCALE_REWARDS
from tether.ppo.losses import KL_ESTIMATORS
from tether.stages.common import KEEP_CHECKPOINTS_HELP
from tether.tracking import tracker_names

#: ``--advantage_estimator``: GAE with a critic, or one of the critic-free estimators
ADVANTAGE_ESTIMATORS = ("gae", "rloo", "grpo", "reinforce_pp")
#: the reward model's name among the reward components (its metrics are reward/reward_model/...)
REWARD_MODEL_COMPONENT = "reward_model"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class PPOConfig(ModelArguments, DataArguments, TrainingArguments):
    """Options of ``tether ppo``. TrainingArguments supplies the HF-style names; the PPO loop honours
    those in ``honoured_training_arguments`` (the others are hidden from ``--help`` and refused when set).
    """

    #: shared data options PPO has no use for: it reads training prompts only, cut to --max_prompt_length
    unused_fields = frozenset({"eval_dataset", "eval_split_ratio", "dataset_test_split", "max_length"})
    #: the TrainingArguments options the PPO loop uses (tether.config.unused_options)
    honoured_training_arguments = frozenset(
        {
            "output_dir",
            "per_device_train_batch_size",  # the micro-batch
            "gradient_accumulation_steps",  # checked against the batch geometry
            "num_train_epochs",
            "learning_rate",
            "lr_scheduler_type",
            "lr_scheduler_kwargs",
            "warmup_steps",  # in iterations
            "optim",  # adamw_torch / adamw_torch_fused
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "max_grad_norm",
            "bf16",
            "fp16",
            "activation_checkpointing",
            "gradient_checkpointing",
            "logging_steps",
            "disable_tqdm",
            "report_to",  # accelerate's trackers
            "run_name",
            "project",
            "save_steps",
            "save_total_limit",
            "resume_from_checkpoint",
            "seed",
            "full_determinism",
            "use_cpu",
            "local_rank",  # set by launchers
        }
    )

    output_dir: str = field(
        default="outputs/ppo",
        metadata=_help(
            "Folder for the trained policy (policy/), the value model (value_model/), metrics.jsonl and checkpoints."
        ),
    )
    # models
    reward_model_path: list[str] | None = field(
        default=None,
        metadata={
            "aliases": ["--reward_model_name_or_path", "--reward_model"],
            **_help(
                "Reward model folder (from `tether rm`, or any sequence-classification model with one label sharing "
                "the policy's tokenizer). Required, unless --reward_funcs score the responses. Several folders form "
                "an ensemble (--reward_ensemble); the first one also starts the value model."
            ),
        },
    )
    reward_ensemble: str = field(
        default="mean",
        metadata=_help("How several reward models combine: mean (TRL's weighted sum) or min (worst case)."),
    )
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata=_help(
            "Programmable rewards: module.path:function or path/to/file.py:function, called as TRL does, "
            "fn(prompts=, completions=, **dataset_columns) -> one float (or None: does not apply) per completion."
        ),
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata=_help("One weight per reward component: the reward model first, then --reward_funcs (default 1)."),
    )
    value_model_path: str | None = field(
        default=None,
        metadata=_help("Initial value model; default: a separate copy of the whole reward model (backbone and head)."),
    )
    value_head_on_policy: bool = field(
        default=False,
        metadata=_help(
            "Use a zero-initialised value head on the policy's last hidden state instead of a separate value "
            "model (saves one network; Ziegler et al. 2019)."
        ),
    )
    # batch geometry
    batch_size: int = field(default=64, metadata=_help("Episodes (prompts) per PPO iteration, over all processes."))
    mini_batch_size: int | None = field(
        default=None,
        metadata=_help(
            "Episodes per optimizer step, over all processes; default: --batch_size (one minibatch per epoch)."
        ),
    )
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata=_help(
            "Micro-batch: episodes per forward/backward on each process (gradient accumulation fills the "
            "minibatch); default: the whole per-process minibatch at once. Halved after an out-of-memory error."
        ),
    )
    forward_batch_size: int | None = field(
        default=None,
        metadata=_help(
            "Episodes per no-grad forward in the rollout (policy, reference, value, reward); default: the whole "
            "per-process batch. Halved after an out-of-memory error."
        ),
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata=_help(
            "Prompts per generate() call on each process; default: the whole per-process batch. Halved after an "
            "out-of-memory error."
        ),
    )
    ppo_epochs: int = field(
        default=4,
        metadata={"aliases": ["--num_ppo_epochs"], **_help("Passes over each rollout batch (TRL: num_ppo_epochs).")},
    )
    num_iterations: int | None = field(default=None, metadata=_help("PPO iterations to run (overrides the others)."))
    total_episodes: int | None = field(
        default=None,
        metadata=_help(
            "Episodes to train on (iterations = total_episodes // batch_size) when --num_iterations is not given."
        ),
    )
    num_train_epochs: float = field(
        default=1.0,
        metadata=_help("Passes over the prompts when neither --num_iterations nor --total_episodes is given."),
    )
    # advantage estimator
    advantage_estimator: str = field(
        default="gae",
        metadata=_help(
            "gae (PPO with a value model), or critic-free: rloo, grpo (group baselines over --num_generations "
            "responses per prompt) or reinforce_pp (REINFORCE++: batch-whitened returns); critic-free builds no "
            "value model."
        ),
    )
    num_generations: int = field(
        default=1,
        metadata=_help(
            "Responses sampled per prompt (k, contiguous in the batch; >= 2 for rloo/grpo). --batch_size and "
            "--mini_batch_size count responses, as TRL counts completions: prompts per iteration = batch_size / k."
        ),
    )
    share_prompt: bool = field(
        default=True,
        metadata=_help(
            "With --num_generations k > 1, compute each prompt once for its k responses: one prefill reused by "
            "the k samples, and one row [prompt | response 1 | ... | response k] with a 4-D attention mask for "
            "scoring and training (checked against plain rows on the first batch; off: plain rows)."
        ),
    )
    scale_rewards: str = field(
        default="group",
        metadata=_help("grpo: divide by the group's std (group), the batch's (batch) or not at all (none: Dr. GRPO)."),
    )
    kl_in_loss: bool = field(
        default=False,
        metadata=_help(
            "Put β·k3 KL to the reference into the loss (GRPO) instead of −β·KL into the rewards; same β and "
            "controller."
        ),
    )
    # PPO
    gamma: float = field(default=1.0, metadata=_help("Discount γ of GAE."))
    lam: float = field(default=0.95, metadata=_help("GAE λ."))
    cliprange: float = field(default=0.2, metadata=_help("ε of the clipped surrogate."))
    cliprange_value: float = field(default=0.2, metadata=_help("ε_v of the clipped value loss (reward units)."))
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss in the shared loss."))
    entropy_coef: float = field(default=0.0, metadata=_help("Entropy bonus weight (0: none, as the references)."))
    whiten_rewards: bool = field(
        default=False, metadata=_help("Whiten token rewards over real tokens (off by default).")
    )
    value_warmup_steps: int = field(
        default=0,
        metadata=_help(
            "First iterations that train only the value model, at --learning_rate (the policy does not move; "
            "β and the learning-rate schedule wait for the policy's iterations)."
        ),
    )
    approx_kl_stop: float | None = field(
        default=None,
        metadata=_help(
            "Stop this batch's PPO epochs before a step whose minibatch has ½·mean(Δlogp²) to the rollout policy "
            "above this (measured by that step's forward; the step is not taken; off by default)."
        ),
    )
    # KL
    init_kl_coef: float = field(
        default=0.05,
        metadata={"aliases": ["--kl_coef"], **_help("β: initial (or fixed) KL coefficient (TRL: kl_coef).")},
    )
    target_kl: float | None = field(
        default=None, metadata=_help("Target KL (nats per response) of the adaptive controller; None keeps β fixed.")
    )
    horizon: int = field(default=10000, metadata=_help("Horizon of the adaptive KL controller, in episodes."))
    kl_penalty: str = field(
        default="k1",
        metadata={
            "aliases": ["--kl_estimator"],
            **_help(
                "Per-token KL estimate in the reward: k1 (alias kl) = log-ratio, abs, mse (alias k2) = ½·log-ratio², "
                "k3, full = exact KL over the vocabulary (TRL: kl_estimator, k1 or k3)."
            ),
        },
    )
    stop_on_divergence: bool = field(
        default=True, metadata=_help("End training when the KL reaches the divergence band (> 20 nats).")
    )
    # sampling
    temperature: float = field(
        default=0.7,
        metadata=_help("Sampling temperature; part of the policy (every log-prob, the reference's too, uses it)."),
    )
    top_k: int = field(
        default=0,
        metadata=_help(
            "Keep 0: PPO assumes pure sampling from softmax(logits/T). Anything else is refused unless "
            "--allow_biased_rollout is given."
        ),
    )
    top_p: float = field(
        default=1.0,
        metadata=_help(
            "Keep 1.0: PPO assumes pure sampling from softmax(logits/T). Anything else is refused unless "
            "--allow_biased_rollout is given."
        ),
    )
    max_new_tokens: int = field(default=64, metadata=_help("Maximum response tokens."))
    stop_token: str | None = field(
        default=None,
        metadata=_help(
            "An extra token that ends a response besides the tokenizer's eos token (token string or id; 'eos' = "
            "none). Refused unless --allow_biased_rollout is given: the reward model is then read at a token it "
            "never saw at the end of its training texts."
        ),
    )
    allow_biased_rollout: bool = field(
        default=False,
        metadata=_help(
            "Accept --stop_token and non-default --top_k/--top_p. Risks: with --stop_token the reward model "
            "scores responses at a token that never ended its training texts (its score there has no trained "
            "meaning); --top_k/--top_p sample from a truncated distribution while the PPO ratio and the KL to "
            "the reference assume softmax(logits/T), so both are biased."
        ),
    )
    response_length: int | None = field(
        default=None,
        metadata=_help(
            "Benchmarks only: generate exactly this many tokens, never stopping early (overrides --max_new_tokens). "
            "Not TRL's --response_length, which is a maximum: that is --max_new_tokens here."
        ),
    )
    missing_eos_penalty: float | None = field(
        default=-1.0,
        metadata=_help(
            "Score that REPLACES the reward of a response that never produced its stop token (normalised units); "
            "None keeps the raw score. Not TRL's --missing_eos_penalty, which is subtracted from the score."
        ),
    )
    normalize_reward: bool = field(
        default=True,
        metadata=_help(
            "Normalise the reward model's score to mean 0, std 1 over responses of the starting policy at "
            "--temperature (Ziegler et al.), measured before the first iteration (see --reward_norm_samples)."
        ),
    )
    reward_norm_samples: int = field(
        default=256,
        metadata=_help(
            "Responses sampled from the starting policy on the training prompts to measure the normalisation "
            "on; 0 falls back to reward_stats.json that `tether rm` saved (the RM's scores on its own training "
            "pairs, another distribution; the summary says so)."
        ),
    )
    reward_norm_responses: str | None = field(
        default=None,
        metadata=_help(
            "Measure the normalisation on these responses instead of sampling: JSON lines {prompt, response, "
            "stopped} that the starting policy sampled at --temperature and --max_new_tokens (the pipeline passes "
            "the SFT samples it labelled); a seeded sample of --reward_norm_samples of them when there are more."
        ),
    )
    rollout_logprobs: str = field(
        default="recompute",
        metadata=_help(
            "Old log-probs: 'recompute' (a separate pass by the training forward: the first minibatch has ratio "
            "exactly 1) or 'generation' (from the sampler's logits, as TRL: one forward less, equal to ~1e-6 in fp32, "
            "looser in bf16)."
        ),
    )
    generation_cache: str | None = field(
        default=None,
        metadata=_help(
            "KV cache for sampling: None (dynamic) or 'static' (on CUDA transformers compiles the decoding step)."
        ),
    )
    # optimiser defaults of the references (OpenAI lm-human-preferences, N+ implementation details)
    learning_rate: float = field(default=3e-6, metadata=_help("AdamW learning rate (linear decay to 0 by default)."))
    adam_epsilon: float = field(default=1e-5, metadata=_help("AdamW epsilon (1e-5 as the references)."))
    max_grad_norm: float | None = field(
        default=None,
        metadata=_help("Clip the gradient norm to this value; None (default) disables clipping, as the references."),
    )
    optim: str = field(
        default="adamw_torch_fused",
        metadata=_help("adamw_torch_fused (one fused kernel per step on CPU and CUDA) or adamw_torch (foreach)."),
    )
    max_bad_steps: int = field(
        default=5, metadata=_help("Stop after this many consecutive skipped steps with non-finite rewards or losses.")
    )
    # HF-style options with PPO units
    save_steps: float = field(default=100, metadata=_help("Save a checkpoint every N iterations (0: never)."))
    save_total_limit: int | None = field(default=2, metadata=_help("Keep the last N checkpoints."))
    logging_steps: float = field(
        default=10, metadata=_help("Print a metrics line every N iterations (metrics.jsonl gets every iteration).")
    )
    warmup_steps: float = field(default=0, metadata=_help("Learning-rate warmup, in iterations (default 0)."))
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help(
            "Start over in a non-empty --output_dir (its checkpoints, "
            "metrics and outputs from an earlier run are removed)."
        ),
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata=_help(
            "'latest' (the newest complete checkpoint in --output_dir; "
            "a fresh start if there is none) or a checkpoint folder."
        ),
    )
    keep_checkpoints: bool = field(default=False, metadata=_help(KEEP_CHECKPOINTS_HELP))

    def __post_init__(self):
        refuse_unused_options(self, "`tether ppo`")
        super().__post_init__()
        problems = []
        if self.kl_penalty not in KL_ESTIMATORS:
            problems.append(f"--kl_penalty {self.kl_penalty!r}: use one of {', '.join(KL_ESTIMATORS)}")
        if self.load_in_4bit:  # the 4-bit reference/critic paths are not built: refuse rather than ignore the flag
            problems.append("--load_in_4bit is not supported by `tether ppo` yet (sft, rm and dpo train QLoRA)")
        if self.batch_size < 1:
            problems.append("--batch_size must be >= 1")
        mini = self.mini_batch_size or self.batch_size
        if mini < 1 or self.batch_size % mini:
            problems.append(f"--mini_batch_size {mini} must divide --batch_size {self.batch_size}")
        if self.ppo_epochs < 1:
            problems.append("--ppo_epochs must be >= 1")
        if self.temperature <= 0:
            problems.append("--temperature must be > 0 (it is part of the policy)")
        problems += self._biased_rollout_problems()
        if self.target_kl is not None and self.target_kl <= 0:
            problems.append("--target_kl must be > 0 (or None for a fixed β)")
        if self.rollout_logprobs not in ("recompute", "generation"):
            problems.append("--rollout_logprobs must be 'recompute' or 'generation'")
        if self.generation_cache not in (None, "dynamic", "static"):
            problems.append("--generation_cache must be 'dynamic' or 'static'")
        if self.max_new_tokens < 1 or (self.response_length is not None and self.response_length < 1):
            problems.append("--max_new_tokens / --response_length must be >= 1")
        if getattr(self.optim, "value", self.optim) not in ("adamw_torch", "adamw_torch_fused"):
            problems.append(f"--optim {self.optim}: tether ppo uses AdamW (adamw_torch or adamw_torch_fused)")
        if isinstance(self.reward_model_path, (list, tuple)) and len(self.reward_model_path) == 1:
            self.reward_model_path = self.reward_model_path[0]  # one reward model: the plain path
        problems += self._estimator_problems()
        try:
            tracker_names(self.report_to)  # before anything loads
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))

    def _biased_rollout_problems(self) -> list[str]:
        """Options that bias the reward or the PPO ratio: refused unless --allow_biased_rollout."""
        if self.allow_biased_rollout:
            return []
        problems = []
        if self.stop_token not in (None, "", "eos"):
            problems.append(
                f"--stop_token {self.stop_token}: the reward model would score responses at a token that never "
                "ended its training texts; add --allow_biased_rollout true to accept that"
            )
        if self.top_k or self.top_p < 1.0:
            problems.append(
                f"--top_k {self.top_k} / --top_p {self.top_p}: PPO's ratio and KL assume pure sampling from "
                "softmax(logits/T) (--top_k 0, --top_p 1.0); add --allow_biased_rollout true to accept the bias"
            )
        return problems

    @property
    def reward_model_paths(self) -> list[str]:
        """Every --reward_model_path (a str from Python or YAML is one path)."""
        paths = self.reward_model_path
        return [] if not paths else [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else list(paths)

    @property
    def critic_free(self) -> bool:
        """True when the advantages need no value model (every estimator but gae)."""
        return self.advantage_estimator != "gae"

    def _estimator_problems(self) -> list[str]:
        """The critic-free and reward-function options, checked before anything loads (every rank)."""
        from tether.ppo.rewards import check_reward_ensemble, check_reward_weights, load_reward_functions

        problems = []
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            problems.append(
                f"--advantage_estimator {self.advantage_estimator!r}: use one of {', '.join(ADVANTAGE_ESTIMATORS)}"
            )
        k = self.num_generations
        if k < 1:
            problems.append("--num_generations must be >= 1")
        elif self.advantage_estimator in ("rloo", "grpo") and k < 2:
            problems.append(
                f"--advantage_estimator {self.advantage_estimator} compares the responses to one prompt: "
                "set --num_generations to 2 or more"
            )
        elif self.batch_size % k:
            problems.append(
                f"--batch_size {self.batch_size} counts responses: it must be a multiple of --num_generations {k}"
            )
        if self.scale_rewards not in SCALE_REWARDS:
            problems.append(f"--scale_rewards {self.scale_rewards!r}: use one of {', '.join(SCALE_REWARDS)}")
        if self.critic_free:
            if self.value_model_path or self.value_head_on_policy:
                problems.append(
                    f"--advantage_estimator {self.advantage_estimator} builds no value model: drop "
                    "--value_model_path / --value_head_on_policy (or use gae)"
                )
            if self.value_warmup_steps:
                problems.append("--value_warmup_steps needs a value model (--advantage_estimator gae)")
        elif self.reward_model_path is None and self.reward_funcs:
            if not (self.value_model_path or self.value_head_on_policy):
                problems.append(
                    "gae without --reward_model_path needs a critic: give --value_model_path or --value_head_on_policy"
                )
        try:
            check_reward_ensemble(self.reward_ensemble)
            load_reward_functions(self.reward_funcs)
            check_reward_weights(self.reward_weights, self.reward_components)
        except ConfigError as exc:
            problems.append(str(exc))
        return problems

    @property
    def reward_components(self) -> list[str]:
        """Names of the reward components in --reward_weights order: the reward models (reward_model,
        reward_model_2, ...), then the functions."""
        count = len(self.reward_model_paths)
        models = [REWARD_MODEL_COMPONENT] + [f"{REWARD_MODEL_COMPONENT}_{i}" for i in range(2, count + 1)]
        models = models[:count]
        return models + [spec.rpartition(":")[2] for spec in self.reward_funcs]


@dataclass
class PPOState:
    """What a checkpoint needs besides weights and optimiser to continue exactly."""

    iteration: int = 0  # completed iterations
    episodes: int = 0
    optimizer_steps: int = 0
    tokens_generated: int = 0
    bad_steps_in_a_row: int = 0
    bad_steps_total: int = 0
    early_stops: int = 0
    data_epoch: int = 0
    data_position: int = 0


@dataclass
class PPOResult:
    output_dir: str
    stopped_reason: str  # completed | divergence | non_finite
    iterations: int
    episodes: int
    policy_dir: str | None
    value_dir: str | None
    last_checkpoint: str | None
    last_good_checkpoint: str | None
    final_metrics: dict


@dataclass
class BatchGeometry:
    """How one iteration's episodes split over processes, minibatches and micro-batches.

    The three chunk sizes start as configured and are halved after an out-of-memory error; the
    sizes that fitted stay for the rest of the run.
    """

    local_batch: int  # episodes per process per iteration
    local_mini: int  # episodes per process per optimizer step
    micro: int  # episodes per forward/backward (--per_device_train_batch_size)
    accumulation: int  # micro-batches per optimizer step
    forward_batch: int  # episodes per no-grad forward of the rollout
    generation_batch: int  # prompts per generate() call


def batch_geometry(cfg: PPOConfig, world: int) -> BatchGeometry:
    """The batch split on ``world`` processes; a ConfigError names the option that does not divide."""
    mini = cfg.mini_batch_size or cfg.batch_size
    if cfg.batch_size % world or mini % world:
        raise ConfigError(
            f"--batch_size {cfg.batch_size} and --mini_batch_size {mini} must be multiples of the {world} processes"
        )
    local_batch = cfg.batch_size // world
    if local_batch % cfg.num_generations:
        raise ConfigError(
            f"--batch_size {cfg.batch_size} over {world} processes leaves {local_batch} responses per process, "
            f"not whole groups of --num_generations {cfg.num_generations} (each process samples its own prompts)"
        )
    local_mini = mini // world
    micro = cfg.per_device_train_batch_size or local_mini
    if micro < 1 or local_mini % micro:
        raise ConfigError(
            f"--per_device_train_batch_size {micro} must divide the per-process minibatch "
            f"{local_mini} (--mini_batch_size {mini} over {world} processes)"
        )
    accumulation = local_mini // micro
    if cfg.gradient_accumulation_steps not in (1, accumulation):
        raise ConfigError(
            f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} disagrees with "
            f"mini_batch_size / (per_device_train_batch_size × processes) = {accumulation}; "
            "leave it unset"
        )
    return BatchGeometry(
        local_batch=local_batch,
        local_mini=local_mini,
        micro=micro,
        accumulation=accumulation,
        forward_batch=cfg.forward_batch_size or local_batch,
        generation_batch=cfg.generation_batch_size or local_batch,
    )


def count_iterations(cfg: PPOConfig, n_prompts: int) -> int:
    """--num_iterations, else --total_episodes // --batch_size, else ⌈epochs · prompts · k / batch_size⌉."""
    if cfg.num_iterations is not None:
        n = cfg.num_iterations
    elif cfg.total_episodes is not None:
        n = cfg.total_episodes // cfg.batch_size
    else:  # batch_size / num_generations prompts per iteration
        n = math.ceil(cfg.num_train_epochs * n_prompts * cfg.num_generations / cfg.batch_size)
    if n < 1:
        raise ConfigError(
            f"nothing to train: {n} iterations (check --num_iterations / --total_episodes / "
            f"--batch_size {cfg.batch_size})"
        )
    return n


def every(steps: float, num_iterations: int) -> int:
    """An HF-style interval: N iterations, or a fraction of the run when below 1 (0: never)."""
    if not steps:
        return 0
    return int(steps) if steps >= 1 else max(1, math.ceil(steps * num_iterations))
