"""`tether ppo`: the four-model RLHF loop (policy, frozen reference, frozen reward model, value model).

``PPOTrainer.train`` (the loop) and ``PPOTrainer.learn`` (one update from one rollout) read like the
method's pseudo-code; each equation lives in a small pure
function of ``tether.ppo.losses`` / ``advantages`` / ``kl_control``, and experience making in
``tether.ppo.rollout``::

    for each iteration:
        rollout   sample one response per prompt (pure sampling at T), cut after the stop token
        score     one no-grad pass each: old log-probs, reference log-probs, values, RM score
        reward    r_t = −β·KL_t, plus the score at the stop token (missing stop: the score is replaced)
        GAE       advantages and returns over response tokens; advantages whitened over real tokens
        update    ppo_epochs × shuffled minibatches (micro-batches by gradient accumulation):
                  clipped surrogate + vf_coef × clipped value loss
        KL ctl    β ← adaptive update from the rollout KL (or fixed)
        metrics   metrics.jsonl / tensorboard / wandb, progress bar
        monitor   KL health band; stop at divergence
        save      atomic checkpoint every --save_steps iterations

Everything runs through ``accelerate``: one process on CPU, data parallel under
``accelerate launch`` (each rank samples its share of the batch with its own seed; whitening, the
controlled KL, token counts of the loss and every metric are reduced over all ranks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainingArguments

from tether.config import ConfigError, DataArguments, ModelArguments, peft_config_from
from tether.data.errors import DataError
from tether.data.records import PromptRecord
from tether.data.templates import pad_token_id, prompt_text
from tether.data.templates import prompt_ids as render_prompt_ids
from tether.evaluation.monitor import KLMonitor
from tether.generation import SamplingSettings, left_pad
from tether.memory import run_fitting_memory
from tether.models.wrappers import unwrap_distributed
from tether.ppo.advantages import gae_advantages, masked_moments, whiten
from tether.ppo.kl_control import make_kl_controller
from tether.ppo.losses import (
    KL_ESTIMATORS,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
)
from tether.ppo.rollout import PolicyAndValue, Rollout, make_rollout, make_value_head
from tether.tracking import METRICS_FILE, MetricsWriter, append_jsonl, read_jsonl

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
BAD_BATCHES_FILE = "bad_batches.jsonl"
SUMMARY_FILE = "ppo_summary.json"
#: what a run writes into its output folder (removed when a fresh run starts there)
RUN_ARTIFACTS = {METRICS_FILE, SUMMARY_FILE, "policy", "adapter", "value_model", "value_head", "runs"}


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class PPOConfig(ModelArguments, DataArguments, TrainingArguments):
    """Options of ``tether ppo``. TrainingArguments supplies the HF-style names; the PPO loop honours
    output_dir, learning_rate, adam_beta1/2, adam_epsilon, weight_decay, lr_scheduler_type(+_kwargs),
    warmup_steps (iterations), max_grad_norm, optim (adamw_torch / adamw_torch_fused), bf16/fp16,
    gradient_checkpointing, seed, full_determinism, report_to, run_name, disable_tqdm, logging_steps,
    save_steps, save_total_limit, resume_from_checkpoint and per_device_train_batch_size (micro-batch).
    Evaluation options of TrainingArguments are not used by PPO.
    """

    output_dir: str = field(
        default="outputs/ppo",
        metadata=_help(
            "Folder for the trained policy (policy/), the value model (value_model/), metrics.jsonl and checkpoints."
        ),
    )
    # models
    reward_model_path: str | None = field(
        default=None,
        metadata=_help(
            "Reward model folder (from `tether rm`, or any sequence-classification model with one label sharing "
            "the policy's tokenizer). Required."
        ),
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
    ppo_epochs: int = field(default=4, metadata=_help("Passes over each rollout batch."))
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
        default=0, metadata=_help("First iterations that train only the value model (the policy does not move).")
    )
    approx_kl_stop: float | None = field(
        default=None,
        metadata=_help(
            "Stop this batch's PPO epochs when ½·mean(Δlogp²) to the rollout policy exceeds this (off by default)."
        ),
    )
    # KL
    init_kl_coef: float = field(default=0.05, metadata=_help("β: initial (or fixed) KL coefficient."))
    target_kl: float | None = field(
        default=None, metadata=_help("Target KL (nats per response) of the adaptive controller; None keeps β fixed.")
    )
    horizon: int = field(default=10000, metadata=_help("Horizon of the adaptive KL controller, in episodes."))
    kl_penalty: str = field(
        default="k1",
        metadata=_help(
            "Per-token KL estimate in the reward: k1 (alias kl) = log-ratio, abs, mse (alias k2) = ½·log-ratio², "
            "k3, full = exact KL over the vocabulary."
        ),
    )
    stop_on_divergence: bool = field(
        default=True, metadata=_help("End training when the KL reaches the divergence band (> 20 nats).")
    )
    # sampling
    temperature: float = field(
        default=0.7,
        metadata=_help("Sampling temperature; part of the policy (every log-prob, the reference's too, uses it)."),
    )
    top_k: int = field(default=0, metadata=_help("Keep 0: PPO assumes pure sampling from softmax(logits/T)."))
    top_p: float = field(default=1.0, metadata=_help("Keep 1.0: PPO assumes pure sampling from softmax(logits/T)."))
    max_new_tokens: int = field(default=64, metadata=_help("Maximum response tokens."))
    stop_token: str | None = field(
        default=None,
        metadata=_help(
            "An extra token that ends a response besides the tokenizer's eos token (token string or id; 'eos' = none)."
        ),
    )
    response_length: int | None = field(
        default=None,
        metadata=_help(
            "Benchmarks only: generate exactly this many tokens, never stopping early (overrides --max_new_tokens)."
        ),
    )
    missing_eos_penalty: float | None = field(
        default=-1.0,
        metadata=_help(
            "Score that REPLACES the reward of a response that never produced its stop token (normalised units); "
            "None keeps the raw score."
        ),
    )
    normalize_reward: bool = field(
        default=True,
        metadata=_help(
            "Normalise scores with reward_stats.json saved beside the reward model (warns and uses raw scores "
            "when the file is missing)."
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

    def __post_init__(self):
        super().__post_init__()
        problems = []
        if self.kl_penalty not in KL_ESTIMATORS:
            problems.append(f"--kl_penalty {self.kl_penalty!r}: use one of {', '.join(KL_ESTIMATORS)}")
        if self.batch_size < 1:
            problems.append("--batch_size must be >= 1")
        mini = self.mini_batch_size or self.batch_size
        if mini < 1 or self.batch_size % mini:
            problems.append(f"--mini_batch_size {mini} must divide --batch_size {self.batch_size}")
        if self.ppo_epochs < 1:
            problems.append("--ppo_epochs must be >= 1")
        if self.temperature <= 0:
            problems.append("--temperature must be > 0 (it is part of the policy)")
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
        if problems:
            raise ConfigError("; ".join(problems))


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


from tether.errors import NonFiniteError  # noqa: E402  (re-exported: raised after --max_bad_steps bad steps)


def default_prompts() -> list:
    """Prompts used when neither --dataset nor Python prompts are given: the embedded demo task's
    training prompts (``tether.demo.task.train_prompts``)."""
    from tether.demo.task import train_prompts

    logger.info("tether ppo: no --dataset given; using the embedded demo task's training prompts")
    return train_prompts()


# ---------------------------------------------------------------------------------------------
# checkpoints on disk
# ---------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-N`` with its state file), oldest first: the same rule as the
    Trainer-based stages, whose folder and state-file names PPO shares."""
    from tether.durable import complete_checkpoints

    return complete_checkpoints(output_dir)


def resolve_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume_from_checkpoint {resume}: not a complete tether ppo checkpoint (no {STATE_FILE})")
    return path


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished temporary folder into place (replacing an older one)."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------
class PPOTrainer:
    """PPO for RLHF. ``PPOTrainer(config, prompts).train()``; models load from the config's paths.

    ``prompts``: strings, chat-message tuples or ``PromptRecord``s (default: ``--dataset``, else the
    demo task's prompts). ``extra_metrics(rollout) -> dict`` adds metrics every iteration (e.g.
    ``reward/gold``). Pieces usable on their own: ``collect_rollout()``, ``learn(rollout)`` (one PPO
    update, returns the metrics), ``save_checkpoint()``; ``update_log`` holds the per-minibatch
    statistics of the last update.
    """

    def __init__(
        self,
        config: PPOConfig,
        prompts: Sequence | None = None,
        *,
        extra_metrics: Callable[[Rollout], dict] | None = None,
        accelerator=None,
        tokenizer=None,
    ):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.config = cfg = config
        self.extra_metrics = extra_metrics
        if accelerator is None:
            mixed = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
            # Warm-up leaves the policy without gradients; DDP must then tolerate unused parameters.
            kwargs = [DistributedDataParallelKwargs(find_unused_parameters=cfg.value_warmup_steps > 0)]
            accelerator = Accelerator(mixed_precision=mixed, cpu=cfg.use_cpu, kwargs_handlers=kwargs)
        self.accelerator = acc = accelerator
        from tether.stages.common import require_joint_processes

        require_joint_processes(acc.num_processes)  # CPU-only machine launched without --use_cpu true
        self.world = acc.num_processes
        self.rank = acc.process_index
        self.output_dir = Path(cfg.output_dir)
        if cfg.full_determinism:
            from transformers import enable_full_determinism

            enable_full_determinism(cfg.seed)
        self._seed_everything()
        self._check_geometry()

        from tether.models.loading import load_tokenizer

        self.tokenizer = tokenizer or load_tokenizer(cfg.model_name_or_path)
        self.prompts, self.prompt_token_ids = self._load_prompts(prompts)
        self.sampling = self._sampling_settings()
        self.resume_dir = resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
        if cfg.resume_from_checkpoint == "latest" and self.resume_dir is None and acc.is_main_process:
            logger.info("tether ppo: no checkpoint in %s yet; starting from the beginning", cfg.output_dir)
        self.num_iterations = self._count_iterations()
        self._prepare_output_dir()

        self._build_models()
        self._build_optimizer()
        self.kl_ctl = make_kl_controller(cfg.init_kl_coef, cfg.target_kl, cfg.horizon)
        self.monitor = KLMonitor(cfg.stop_on_divergence, say=self._say, temperature=cfg.temperature)
        self.state = PPOState()
        self.shuffle_rng = torch.Generator().manual_seed(cfg.seed + 100003 * self.rank + 1)
        self._order: tuple[int, torch.Tensor] | None = None  # (data epoch, prompt order)
        self.update_log: list[dict] = []  # per-minibatch statistics of the last iteration (tests, debugging)
        if self.resume_dir is not None:
            self._load_checkpoint(self.resume_dir)

    # ---- setup -------------------------------------------------------------------------------
    def _say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            logger.warning("tether ppo: %s", message)

    def _seed_everything(self) -> None:
        from transformers import set_seed

        # each rank samples different responses (OpenAI's seed + rank·100003)
        set_seed(self.config.seed + 100003 * self.rank)

    def _prepare_output_dir(self) -> None:
        """Refuse to mix two runs in one folder: checkpoint rotation and metrics.jsonl would interleave."""
        from tether.stages.common import check_output_dir

        cfg, acc = self.config, self.accelerator
        continuing = self.resume_dir is not None or cfg.resume_from_checkpoint == "latest"
        check_output_dir(self.output_dir, cfg.overwrite_output_dir, continuing)
        if acc.is_main_process and self.output_dir.is_dir():
            for path in self.output_dir.iterdir():
                # half-written folders of a crashed run are never complete, and a fresh start keeps
                # nothing of an earlier run that could be mistaken for this one's
                fresh = self.resume_dir is None and (
                    path.name in RUN_ARTIFACTS or path.name.startswith((CHECKPOINT_PREFIX, "bad_batches"))
                )
                if fresh or path.name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        acc.wait_for_everyone()

    def _check_geometry(self) -> None:
        cfg, world = self.config, self.world
        mini = cfg.mini_batch_size or cfg.batch_size
        if cfg.batch_size % world or mini % world:
            raise ConfigError(
                f"--batch_size {cfg.batch_size} and --mini_batch_size {mini} must be multiples of the {world} processes"
            )
        self.local_batch = cfg.batch_size // world
        self.local_mini = mini // world
        self.micro = cfg.per_device_train_batch_size or self.local_mini
        if self.micro < 1 or self.local_mini % self.micro:
            raise ConfigError(
                f"--per_device_train_batch_size {self.micro} must divide the per-process minibatch "
                f"{self.local_mini} (--mini_batch_size {mini} over {world} processes)"
            )
        self.accumulation = self.local_mini // self.micro
        if cfg.gradient_accumulation_steps not in (1, self.accumulation):
            raise ConfigError(
                f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} disagrees with "
                f"mini_batch_size / (per_device_train_batch_size × processes) = {self.accumulation}; "
                "leave it unset"
            )
        self.forward_batch = cfg.forward_batch_size or self.local_batch
        self.generation_batch = cfg.generation_batch_size or self.local_batch

    def _load_prompts(self, prompts: Sequence | None) -> tuple[list, list[list[int]]]:
        cfg = self.config
        if prompts is None:
            if cfg.dataset is None:
                prompts = default_prompts()
            else:
                from tether.data.loading import load_prompts

                prompts = load_prompts(cfg.dataset, cfg.dataset_split)
        records = [
            p if isinstance(p, PromptRecord) else PromptRecord(p, origin=f"prompts[{i}]") for i, p in enumerate(prompts)
        ]
        if not records:
            raise DataError([f"{cfg.dataset or 'prompts'}: no prompts"])
        ids, problems = [], []
        for r in records:
            tokens = render_prompt_ids(self.tokenizer, r.prompt, cfg.max_prompt_length)
            if not tokens:
                problems.append(f"{r.origin}: the prompt renders to no tokens")
            ids.append(tokens)
        if problems:
            raise DataError(problems)
        return [r.prompt for r in records], ids

    def _sampling_settings(self) -> SamplingSettings:
        cfg = self.config
        extra = []
        if cfg.stop_token not in (None, "", "eos"):
            extra.append(self._token_id(cfg.stop_token))
        if cfg.torch_compile:
            self._say(
                "--torch_compile is not used by tether ppo (with --generation_cache static transformers "
                "compiles the decoding step on CUDA)"
            )
        if cfg.top_k or cfg.top_p < 1.0:
            self._say(
                "top_k/top_p change the sampling distribution away from softmax(logits/T): the PPO ratio "
                "and the KL are then biased"
            )
        fixed = cfg.response_length is not None
        return SamplingSettings(
            max_new_tokens=cfg.response_length if fixed else cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            extra_stop_token_ids=extra,
            fixed_length=fixed,
            cache_implementation=cfg.generation_cache if cfg.generation_cache == "static" else None,
        )

    def _token_id(self, token: str) -> int:
        tok = self.tokenizer
        if token.isdigit() and int(token) < len(tok):
            return int(token)
        tid = tok.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tok.unk_token_id:
            return tid
        ids = tok(token, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and (ids[0] != tok.unk_token_id or token == tok.unk_token):
            return ids[0]
        raise ConfigError(f"--stop_token {token!r} is not a single token of this tokenizer (it encodes to {ids})")

    def _count_iterations(self) -> int:
        cfg = self.config
        if cfg.num_iterations is not None:
            n = cfg.num_iterations
        elif cfg.total_episodes is not None:
            n = cfg.total_episodes // cfg.batch_size
        else:
            n = math.ceil(cfg.num_train_epochs * len(self.prompts) / cfg.batch_size)
        if n < 1:
            raise ConfigError(
                f"nothing to train: {n} iterations (check --num_iterations / --total_episodes / "
                f"--batch_size {cfg.batch_size})"
            )
        return n

    def _build_models(self) -> None:
        from tether.models.loading import disable_dropout, load_causal_lm, load_scalar_model

        cfg, acc = self.config, self.accelerator
        if cfg.reward_model_path is None:
            raise ConfigError("--reward_model_path is required (a folder written by `tether rm`)")
        self._check_reward_model(cfg.reward_model_path)
        ckpt = self.resume_dir
        policy = load_causal_lm(cfg.model_name_or_path, cfg.dtype)
        if hasattr(policy, "merge_and_unload"):  # an adapter folder (e.g. LoRA SFT) becomes a plain model
            policy = policy.merge_and_unload()
        reference = None
        if cfg.use_peft:
            from peft import PeftModel, get_peft_model

            if ckpt is not None:
                policy = PeftModel.from_pretrained(policy, ckpt / "policy", is_trainable=True)
            else:
                policy = get_peft_model(policy, peft_config_from(cfg))
            # the reference is the same network with the adapters disabled: no second copy in memory
        else:
            import copy

            reference = copy.deepcopy(policy)
            if ckpt is not None:
                policy = load_causal_lm(str(ckpt / "policy"), cfg.dtype)
        reward_model = load_scalar_model(cfg.reward_model_path, cfg.dtype)
        if cfg.value_head_on_policy:
            value_model = None
            value_head = make_value_head(policy)
            if ckpt is not None:
                from safetensors.torch import load_file

                value_head.load_state_dict(load_file(str(ckpt / "value_head" / "value_head.safetensors")))
        elif cfg.use_peft:
            from peft import PeftModel, get_peft_model

            # A LoRA critic: adapters plus a trainable copy of the score head on a frozen backbone.
            # Started from the reward model (the default), it IS the reward model with its adapters
            # disabled (PEFT keeps the original head for that state), so the two roles share one
            # network, as the reference and the policy do. PEFT freezes the backbone and the original head.
            value_head = None
            base = reward_model if cfg.value_model_path is None else load_scalar_model(cfg.value_model_path, cfg.dtype)
            if ckpt is not None:
                value_model = PeftModel.from_pretrained(base, ckpt / "value_model", is_trainable=True)
            else:
                value_model = get_peft_model(base, peft_config_from(cfg, task_type="SEQ_CLS"))
            if cfg.value_model_path is None:
                reward_model = None  # scored by the value model with its adapters disabled
        else:
            value_head = None
            value_source = (
                str(ckpt / "value_model") if ckpt is not None else (cfg.value_model_path or cfg.reward_model_path)
            )
            value_model = load_scalar_model(value_source, cfg.dtype)
        for model in (policy, reference, value_model, reward_model):
            if model is not None:
                disable_dropout(model)  # ratio 1 and KL 0 at equal weights, in train mode too
        for frozen in (reference, reward_model):
            if frozen is not None:
                frozen.requires_grad_(False)
                frozen.eval()
                frozen.to(acc.device)
        # --gradient_checkpointing is TrainingArguments' older name of --activation_checkpointing
        if getattr(cfg, "activation_checkpointing", None) or cfg.gradient_checkpointing:
            for model in (policy, value_model):
                if model is None:
                    continue
                if hasattr(model, "activation_checkpointing_enable"):
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reference = reference
        self.reward_model = reward_model
        self.models = PolicyAndValue(policy, value_model, value_head).to(acc.device)
        self.models.train()
        self.reward_stats = self._reward_stats()

    def _check_reward_model(self, path: str) -> None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--reward_model_path {path}: cannot read a model config ({exc})") from None
        archs = getattr(config, "architectures", None) or []
        if getattr(config, "num_labels", None) != 1 or not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ConfigError(
                f"--reward_model_path {path}: not a reward model (expected a *ForSequenceClassification "
                "model with one label, as `tether rm` writes)"
            )
        if (Path(path) / "tokenizer_config.json").is_file():
            from tether.models.loading import load_tokenizer

            if load_tokenizer(path).get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError(
                    f"--reward_model_path {path}: its tokenizer differs from the policy's; PPO scores "
                    "the policy's tokens directly, so both must share one vocabulary"
                )

    def _reward_stats(self):
        from tether.models.scoring import load_reward_stats

        cfg = self.config
        if not cfg.normalize_reward:
            return None
        try:
            stats = load_reward_stats(cfg.reward_model_path)
        except FileNotFoundError:
            self._say(
                f"no reward_stats.json in {cfg.reward_model_path}: raw scores are used, so β, the missing-EOS "
                "penalty and the value clip are in the reward model's raw units"
            )
            return None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return stats

    def _build_optimizer(self) -> None:
        from transformers import get_scheduler

        cfg, acc = self.config, self.accelerator
        params = [p for p in self.models.parameters() if p.requires_grad]
        fused = getattr(cfg.optim, "value", cfg.optim) == "adamw_torch_fused" and acc.device.type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            fused=fused or None,
        )
        warmup = cfg.warmup_steps if cfg.warmup_steps >= 1 else math.ceil(cfg.warmup_steps * self.num_iterations)
        # stepped once per iteration: the learning rate is constant within a rollout batch (OpenAI, N+)
        self.scheduler = get_scheduler(
            cfg.lr_scheduler_type,
            optimizer,
            num_warmup_steps=int(warmup),
            num_training_steps=self.num_iterations,
            scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or None,
        )
        self.models, self.optimizer = acc.prepare(self.models, optimizer)
        self.trained_parameters = params

    # ---- distributed helpers ----------------------------------------------------------------
    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over processes (identity on one process)."""
        if self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="sum")

    def _max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Max over processes (identity on one process)."""
        if self.world == 1:
            return tensor
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def _every(self, steps: float) -> int:
        """An HF-style interval: N iterations, or a fraction of the run when below 1 (0: never)."""
        if not steps:
            return 0
        return int(steps) if steps >= 1 else max(1, math.ceil(steps * self.num_iterations))

    def _global_mean(self, values: torch.Tensor) -> float:
        """Mean of a per-episode (or per-item) tensor over all processes."""
        sums = self._sum(torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)]))
        return (sums[0] / sums[1].clamp(min=1)).item()

    def _global_token_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        mean, _ = masked_moments(values.float(), mask, self._sum)
        return mean.item()

    # ---- data -------------------------------------------------------------------------------
    def _next_prompts(self) -> tuple[list, list[list[int]]]:
        """This process's share of the next global batch; every process walks the same shuffled order."""
        cfg, st = self.config, self.state
        n = len(self.prompts)
        chosen = []
        while len(chosen) < cfg.batch_size:
            if st.data_position >= n:
                st.data_epoch, st.data_position = st.data_epoch + 1, 0
            if self._order is None or self._order[0] != st.data_epoch:
                seed = cfg.seed + 7919 * st.data_epoch
                self._order = (st.data_epoch, torch.randperm(n, generator=torch.Generator().manual_seed(seed)))
            order = self._order[1]
            take = min(cfg.batch_size - len(chosen), n - st.data_position)
            chosen += order[st.data_position : st.data_position + take].tolist()
            st.data_position += take
        mine = chosen[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        return [self.prompts[i] for i in mine], [self.prompt_token_ids[i] for i in mine]

    # ---- the loop -----------------------------------------------------------------------------
    def train(self) -> PPOResult:
        cfg, acc, st = self.config, self.accelerator, self.state
        writer = MetricsWriter(cfg.output_dir, cfg.report_to, run_config=cfg.to_dict()) if acc.is_main_process else None
        progress = self._progress_bar()
        stopped_reason, metrics = "completed", {}
        try:
            while st.iteration < self.num_iterations:
                started = time.perf_counter()

                # 1-2. rollout and scoring: sample, then one no-grad pass of each model
                rollout = self.collect_rollout()

                # 3-6. rewards, advantages, PPO epochs, KL control (see `learn`)
                metrics = self.learn(rollout)
                st.iteration += 1
                st.episodes += cfg.batch_size
                generated_tokens = int(self._sum(rollout.lengths.sum()).item())
                st.tokens_generated += generated_tokens

                # 7. metrics
                elapsed = time.perf_counter() - started
                metrics.update(
                    {
                        "time/generate": rollout.time_generate,
                        "time/score": rollout.time_score,
                        "time/total": elapsed,
                        "throughput/episodes_per_s": cfg.batch_size / elapsed,
                        "throughput/tokens_per_s": generated_tokens / elapsed,
                        "train/episodes": st.episodes,
                    }
                )
                if self.extra_metrics is not None:
                    metrics.update(self._reduce_extra(self.extra_metrics(rollout) or {}))
                # 8. KL health
                report = self.monitor.update(metrics["kl/ref"], iteration=st.iteration)
                metrics["kl/band"] = report.band.name
                if writer is not None:
                    writer.log(st.iteration, metrics)
                self._show(progress, metrics)

                if st.bad_steps_in_a_row >= cfg.max_bad_steps:
                    stopped_reason = "non_finite"
                    break
                if report.should_stop:
                    stopped_reason = "divergence"
                    break
                # 9. checkpoint (never of a step that was skipped)
                save_every = self._every(cfg.save_steps)
                if save_every and st.iteration % save_every == 0 and not metrics.get("train/skipped"):
                    self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
            if writer is not None:
                writer.close()
        return self._finish(stopped_reason, metrics)

    def collect_rollout(self) -> Rollout:
        """Responses to this process's share of the next prompts, scored by every model once."""
        cfg, acc = self.config, self.accelerator
        prompts, token_ids = self._next_prompts()
        query_ids, query_mask = left_pad(token_ids, self._pad_id())
        rollout = make_rollout(
            models=unwrap_distributed(self.models),
            reference=self.reference,
            reward_model=self.reward_model,
            tokenizer=self.tokenizer,
            query_ids=query_ids.to(acc.device),
            query_mask=query_mask.to(acc.device),
            settings=self.sampling,
            kl_estimator=cfg.kl_penalty,
            generation_batch_size=self.generation_batch,
            forward_batch_size=self.forward_batch,
            reward_stats=self.reward_stats,
            missing_stop_penalty=cfg.missing_eos_penalty,
            autocast=acc.autocast,
            prompts=prompts,
            synchronize=self._synchronize,
            logprobs_from_sampling=cfg.rollout_logprobs == "generation",
        )
        # chunk sizes that fitted in memory (smaller than asked after an out-of-memory error) stay
        self.generation_batch, self.forward_batch = rollout.generation_batch_size, rollout.forward_batch_size
        return rollout

    def learn(self, rollout: Rollout) -> dict[str, Any]:
        """One PPO update from one rollout batch (this process's share); returns the iteration's metrics."""
        cfg = self.config
        iteration = self.state.iteration
        beta = self.kl_ctl.value
        learning_rate = self.scheduler.get_last_lr()[0]  # constant within the iteration
        mask = rollout.response_mask

        # 3. token rewards: r_t = −β·KL_t, plus the score at the stop token
        rewards = token_rewards(rollout.kl_penalty, rollout.scores, mask, beta)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False, all_reduce=self._sum)

        # 4. advantages: GAE over response tokens; returns before whitening; whiten over real tokens (all processes)
        advantages, returns = gae_advantages(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask, all_reduce=self._sum)

        # 5. PPO epochs over shuffled minibatches (only the critic during warm-up); a batch with
        #    non-finite rewards is skipped, counted and logged
        finite = self._all_finite(rollout, rewards)
        update_started = time.perf_counter()
        if finite:
            update_stats = self._update(rollout, advantages, returns, train_policy=iteration >= cfg.value_warmup_steps)
        else:
            self._record_bad_step(iteration, rollout, "non-finite score, reward, log-prob or value")
            update_stats = {}
        self._synchronize()
        time_update = time.perf_counter() - update_started

        # 6. KL control from the rollout KL (per-response sum, before the update); the learning rate
        #    schedule advances once per iteration
        kl_ref = self._global_mean(rollout.kl.sum(1))
        if finite:
            self.kl_ctl.update(kl_ref, cfg.batch_size)
        self.scheduler.step()

        metrics = self._metrics(rollout, returns, beta, kl_ref, update_stats, skipped=not finite)
        metrics.update(
            {
                "time/update": time_update,
                "train/learning_rate": learning_rate,
                "train/policy_updated": float(iteration >= cfg.value_warmup_steps and finite),
            }
        )
        return metrics

    # ---- one rollout's update ----------------------------------------------------------------
    def _update(
        self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor, train_policy: bool
    ) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches; old log-probs and values stay fixed throughout."""
        cfg = self.config
        n = len(rollout)
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        early_stopped = False
        self.update_log = []
        old_logprobs, old_values = rollout.logprobs.detach(), rollout.values.detach()
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=self.shuffle_rng).to(rollout.input_ids.device)
            for first in range(0, n, self.local_mini):
                minibatch = order[first : first + self.local_mini]
                # the loss is a token mean over the whole (global) minibatch, so micro-batches and
                # processes add up to exactly the same gradient as one big batch
                n_tokens = self._sum(rollout.response_mask[minibatch].sum().float())
                denominator = n_tokens / self.world
                # micro-batches start at the whole minibatch (or the size asked for) and halve after an
                # out-of-memory error; the gradient is the same sum whichever way the rows are split
                stats, self.micro = run_fitting_memory(
                    lambda micro: self._minibatch_step(
                        rollout,
                        minibatch,
                        advantages,
                        returns,
                        old_logprobs,
                        old_values,
                        denominator,
                        train_policy,
                        micro,
                    ),
                    self.micro,
                    "the PPO update (--per_device_train_batch_size)",
                )
                self.update_log.append({"epoch": epoch, "rows": minibatch.tolist(), **stats})
                for key, value in stats.items():
                    sums[key] += value
                steps += 1
                if cfg.approx_kl_stop is not None and stats["policy/approx_kl"] > cfg.approx_kl_stop:
                    early_stopped = True
                    break
            if early_stopped:
                break
        if early_stopped:
            self.state.early_stops += 1
        out = {k: v / max(steps, 1) for k, v in sums.items() if k not in ("policy/ratio_max_dev", "skipped")}
        out["policy/ratio_max_dev"] = max((s["policy/ratio_max_dev"] for s in self.update_log), default=0.0)
        out["policy/early_stopped"] = float(early_stopped)
        out["policy/minibatch_steps"] = float(steps)
        return out

    def _minibatch_step(
        self,
        rollout: Rollout,
        minibatch: torch.Tensor,
        advantages,
        returns,
        old_logprobs,
        old_values,
        denominator,
        train_policy: bool,
        micro: int,
    ) -> dict[str, float]:
        cfg, acc = self.config, self.accelerator
        P = rollout.prompt_width
        totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=acc.device))
        ratio_dev = torch.zeros((), device=acc.device)
        self.optimizer.zero_grad(set_to_none=True)  # a retry after an out-of-memory error starts clean
        micro_batches = [minibatch[i : i + micro] for i in range(0, len(minibatch), micro)]
        for k, idx in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else acc.no_sync(self.models)
            mask = rollout.response_mask[idx]
            with sync:
                with acc.autocast(), contextlib.nullcontext() if train_policy else self._policy_frozen():
                    logits, values = self.models(
                        rollout.input_ids[idx],
                        rollout.attention_mask[idx],
                        rollout.position_ids[idx],
                        prompt_width=P,
                        detach_trunk_for_values=not train_policy,
                    )
                logp = logprobs_from_logits(logits, rollout.responses[idx], cfg.temperature)
                pg = policy_loss(logp, old_logprobs[idx], advantages[idx], mask, cfg.cliprange, denominator)
                vf = value_loss(values, old_values[idx], returns[idx], mask, cfg.cliprange_value, denominator)
                with torch.set_grad_enabled(cfg.entropy_coef > 0 and train_policy):
                    entropy = masked_mean(entropy_from_logits(logits, cfg.temperature), mask, denominator)
                loss = cfg.vf_coef * vf.loss
                if train_policy:
                    loss = loss + pg.loss - cfg.entropy_coef * entropy
                acc.backward(loss)
            totals["loss/total"] += loss.detach()
            totals["loss/policy"] += pg.loss.detach()
            totals["loss/value"] += vf.loss.detach()
            totals["policy/approx_kl"] += pg.approx_kl
            totals["policy/clipfrac"] += pg.clipfrac
            totals["value/clipfrac"] += vf.clipfrac
            totals["policy/entropy"] += entropy.detach()
            ratio_dev = torch.maximum(ratio_dev, pg.ratio_max_abs_dev)
            del logits, values, logp
        # every statistic used the global token count, so the rank sum of per-rank sums is the global mean
        keys = sorted(totals)
        reduced = self._sum(torch.stack([totals[k] for k in keys])) / self.world
        stats = {k: v.item() for k, v in zip(keys, reduced)}
        stats["policy/ratio_max_dev"] = self._max(ratio_dev).item()

        grads = [p.grad for p in self.trained_parameters if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
        stats["loss/grad_norm"] = grad_norm
        if not (math.isfinite(stats["loss/total"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._record_bad_step(
                self.state.iteration,
                rollout.select(minibatch.cpu()),
                f"non-finite loss {stats['loss/total']} or gradient norm {grad_norm}",
            )
            stats["skipped"] = 1.0
            return stats
        if cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(self.trained_parameters, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.optimizer_steps += 1
        self.state.bad_steps_in_a_row = 0
        return stats

    @contextlib.contextmanager
    def _policy_frozen(self):
        """Critic warm-up: the policy's forward runs without building a graph for its weights."""
        policy = unwrap_distributed(self.models).policy
        flags = [(p, p.requires_grad) for p in policy.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    # ---- non-finite handling -------------------------------------------------------------------
    def _all_finite(self, rollout: Rollout, rewards: torch.Tensor) -> bool:
        mask = rollout.response_mask
        ok = (
            torch.isfinite(rollout.scores).all()
            and torch.isfinite(rewards[mask]).all()
            and torch.isfinite(rollout.logprobs[mask]).all()
            and torch.isfinite(rollout.ref_logprobs[mask]).all()
            and torch.isfinite(rollout.values[mask]).all()
        )
        flag = torch.tensor(0.0 if ok else 1.0, device=self.accelerator.device)
        return bool(self._sum(flag).item() == 0)

    def _record_bad_step(self, iteration: int, rollout: Rollout, reason: str) -> None:
        st = self.state
        st.bad_steps_in_a_row += 1
        st.bad_steps_total += 1
        self._say(
            f"iteration {iteration + 1}: skipped a step ({reason}); {st.bad_steps_in_a_row} in a row "
            f"(limit --max_bad_steps {self.config.max_bad_steps}); the batch is logged in "
            f"{self.output_dir / BAD_BATCHES_FILE}"
        )
        texts = rollout.response_texts(self.tokenizer)
        prompts = [prompt_text(self.tokenizer, p) for p in rollout.prompts] if rollout.prompts else None
        name = BAD_BATCHES_FILE if self.rank == 0 else f"bad_batches.rank{self.rank}.jsonl"
        append_jsonl(
            self.output_dir / name,
            {
                "iteration": iteration + 1,
                "reason": reason,
                "prompts": prompts,
                "responses": texts,
                "raw_scores": rollout.raw_scores.float().cpu().tolist(),
                "scores": rollout.scores.float().cpu().tolist(),
            },
        )

    # ---- metrics ------------------------------------------------------------------------------
    def _metrics(
        self, rollout: Rollout, returns, beta: float, kl_ref: float, update: dict, skipped: bool
    ) -> dict[str, Any]:
        """Rollout and update statistics, reduced over all processes."""
        st = self.state
        mask = rollout.response_mask
        non_score = torch.where(mask, -beta * rollout.kl_penalty, torch.zeros_like(rollout.kl_penalty)).sum(1)
        m: dict[str, Any] = {
            "reward/score": self._global_mean(rollout.scores),
            "reward/raw_score": self._global_mean(rollout.raw_scores),
            "reward/non_score": self._global_mean(non_score),
            "reward/total": self._global_mean(rollout.scores + non_score),
            "kl/ref": kl_ref,
            "kl/coef": beta,
            "kl/coef_next": self.kl_ctl.value,
            "response/length": self._global_mean(rollout.lengths.float()),
            "response/stopped": self._global_mean(rollout.stopped.float()),
        }
        if not skipped:
            m["value/explained_var"] = explained_variance(rollout.values, returns, mask, self._sum).item()
        m.update(update)
        m.update(
            {
                "train/optimizer_steps": st.optimizer_steps,
                "train/bad_steps": st.bad_steps_total,
                "train/early_stops": st.early_stops,
            }
        )
        if skipped:
            m["train/skipped"] = 1.0
        if self.accelerator.device.type == "cuda":
            m["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return m

    def _reduce_extra(self, extra: dict) -> dict:
        """Numbers from the extra-metrics hook are averaged over processes; other values pass through."""
        device = self.accelerator.device
        return {
            k: self._global_mean(torch.tensor([float(v)], device=device))
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            else v
            for k, v in extra.items()
        }

    def _progress_bar(self):
        if not self.accelerator.is_main_process or self.config.disable_tqdm:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.num_iterations, initial=self.state.iteration, desc="ppo", unit="it", dynamic_ncols=True)

    def _show(self, progress, metrics: dict) -> None:
        short = {
            "score": metrics["reward/score"],
            "kl": metrics["kl/ref"],
            "β": metrics["kl/coef"],
            "band": metrics["kl/band"],
            "ep/s": metrics["throughput/episodes_per_s"],
        }
        if progress is not None:
            progress.set_postfix(
                {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in short.items()}, refresh=False
            )
            progress.update(1)
        steps = self._every(self.config.logging_steps)
        if steps and self.state.iteration % steps == 0 and self.accelerator.is_main_process:
            logger.info(
                "tether ppo: iteration %d/%d %s",
                self.state.iteration,
                self.num_iterations,
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in short.items()),
            )

    # ---- helpers -------------------------------------------------------------------------------
    def _pad_id(self) -> int:
        tok = self.tokenizer
        return pad_token_id(tok)

    def _synchronize(self) -> None:
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    # ---- saving --------------------------------------------------------------------------------
    def _save_models(self, folder: Path, merged: bool) -> None:
        """policy/ and value_model/ (LoRA adapters, or full models when ``merged``) or value_head/."""
        models = unwrap_distributed(self.models)
        for name, model in (("policy", models.policy), ("value_model", models.value_model)):
            if model is None:
                continue
            if merged and hasattr(model, "merge_and_unload"):
                import copy

                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(folder / name, safe_serialization=True)
            self.tokenizer.save_pretrained(folder / name)
        if models.value_head is not None:
            from safetensors.torch import save_file

            (folder / "value_head").mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in models.value_head.state_dict().items()},
                str(folder / "value_head" / "value_head.safetensors"),
            )

    def save_checkpoint(self) -> Path:
        """Atomic: everything is written into a temporary folder, which is renamed ``checkpoint-N`` last."""
        acc, st = self.accelerator, self.state
        target = self.output_dir / f"{CHECKPOINT_PREFIX}{st.iteration}"
        tmp = self.output_dir / f".tmp-{CHECKPOINT_PREFIX}{st.iteration}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state() | {"shuffle": self.shuffle_rng.get_state()}, tmp / f"rng_state_{self.rank}.pth")
        if acc.is_main_process:
            self._save_models(tmp, merged=False)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "ppo_config.json").write_text(self.config.to_json_string(), encoding="utf-8")
            state = {
                "state": asdict(st),
                "kl_controller": self.kl_ctl.state_dict(),
                "monitor": self.monitor.state_dict(),
                "world_size": self.world,
                "num_iterations": self.num_iterations,
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")  # the completion mark
        acc.wait_for_everyone()
        if acc.is_main_process:
            _replace_dir(tmp, target)
            self._rotate_checkpoints()
        acc.wait_for_everyone()
        return target

    def _rotate_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if not limit:
            return
        for old in list_checkpoints(self.output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, folder: Path) -> None:
        data = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        if data.get("world_size", self.world) != self.world:
            self._say(
                f"resuming a {data['world_size']}-process checkpoint on {self.world} processes: sampling "
                "seeds differ from an uninterrupted run"
            )
        self.state = PPOState(**data["state"])
        self.kl_ctl.load_state_dict(data["kl_controller"])
        self.monitor.load_state_dict(data.get("monitor", {}))
        # loaded on the CPU; load_state_dict moves each state tensor to its parameter's device
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=False))
        rng_file = folder / f"rng_state_{self.rank}.pth"
        if rng_file.is_file():
            rng = torch.load(rng_file, map_location="cpu", weights_only=False)
            _set_rng_state(rng)
            self.shuffle_rng.set_state(rng["shuffle"])
        if self.accelerator.is_main_process:
            self._truncate_metrics(self.state.iteration)
            logger.info("tether ppo: resumed from %s at iteration %d", folder, self.state.iteration)

    def _truncate_metrics(self, iteration: int) -> None:
        """Drop metric rows written after the checkpoint, so the resumed file reads like one run."""
        path = self.output_dir / METRICS_FILE
        if not path.is_file():
            return
        rows = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= iteration]
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)

    def last_good_checkpoint(self, divergent_iteration: int | None = None) -> Path | None:
        """Newest checkpoint whose weights were measured outside the divergence band.

        The weights saved at iteration k are first measured by the rollout of iteration k + 1, so when
        iteration j diverged, checkpoint j − 1 holds the divergent weights and the last good one is ≤ j − 2.
        """
        found = list_checkpoints(self.output_dir)
        if divergent_iteration is None:
            return found[-1] if found else None
        good = [p for p in found if int(p.name[len(CHECKPOINT_PREFIX) :]) <= divergent_iteration - 2]
        return good[-1] if good else None

    def _finish(self, stopped_reason: str, metrics: dict) -> PPOResult:
        acc, st = self.accelerator, self.state
        policy_dir = value_dir = None
        last_good = self.last_good_checkpoint(st.iteration if stopped_reason == "divergence" else None)
        if stopped_reason == "completed":
            policy_dir, value_dir = self.save_final()
        found = list_checkpoints(self.output_dir)
        result = PPOResult(
            output_dir=str(self.output_dir),
            stopped_reason=stopped_reason,
            iterations=st.iteration,
            episodes=st.episodes,
            policy_dir=policy_dir,
            value_dir=value_dir,
            last_checkpoint=str(found[-1]) if found else None,
            last_good_checkpoint=str(last_good) if last_good else None,
            final_metrics={k: v for k, v in metrics.items()},
        )
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            summary = asdict(result) | {
                "state": asdict(st),
                "kl_controller": self.kl_ctl.state_dict(),
                "temperature": self.config.temperature,
            }
            tmp = self.output_dir / f".tmp-{SUMMARY_FILE}"
            tmp.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
            os.replace(tmp, self.output_dir / SUMMARY_FILE)
        acc.wait_for_everyone()
        if stopped_reason == "divergence":
            self._say(
                f"stopped at iteration {st.iteration}: KL {metrics.get('kl/ref', float('nan')):.2f} nats is in "
                f"the divergence band; no final policy written; last good checkpoint: {result.last_good_checkpoint}"
            )
        if stopped_reason == "non_finite":
            message = (
                f"tether ppo: stopped at iteration {st.iteration} after {st.bad_steps_in_a_row} consecutive "
                f"steps with non-finite rewards or losses (--max_bad_steps {self.config.max_bad_steps}); the "
                f"batches are in {self.output_dir / BAD_BATCHES_FILE}; last good checkpoint: "
                f"{result.last_good_checkpoint}"
            )
            logger.error(message)
            raise NonFiniteError(message)
        return result

    def save_final(self) -> tuple[str, str]:
        """Write policy/ and value_model/ (full models, LoRA merged; the policy adapter alone in adapter/)."""
        acc = self.accelerator
        policy_dir = self.output_dir / "policy"
        models = unwrap_distributed(self.models)
        value_name = "value_model" if models.value_model is not None else "value_head"
        value_dir = self.output_dir / value_name
        if acc.is_main_process:
            tmp = self.output_dir / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._save_models(tmp, merged=True)
            if hasattr(models.policy, "merge_and_unload"):
                models.policy.save_pretrained(tmp / "adapter", safe_serialization=True)
                _replace_dir(tmp / "adapter", self.output_dir / "adapter")
            _replace_dir(tmp / "policy", policy_dir)
            _replace_dir(tmp / value_name, value_dir)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        return str(policy_dir), str(value_dir)


def run_ppo(
    config: PPOConfig, prompts: Sequence | None = None, extra_metrics: Callable[[Rollout], dict] | None = None
) -> PPOResult:
    """The ``tether ppo`` command: train, write policy/, value_model/, metrics.jsonl and ppo_summary.json.

    On the embedded demo task (no --dataset, no prompts) the simulated annotator's gold score is
    logged as ``reward/gold`` every iteration unless another hook is given.
    """
    if prompts is None and config.dataset is None and extra_metrics is None:
        from tether.demo.annotator import gold_metrics_hook
        from tether.models.loading import load_tokenizer

        extra_metrics = gold_metrics_hook(load_tokenizer(config.model_name_or_path))
    return PPOTrainer(config, prompts, extra_metrics=extra_metrics).train()
