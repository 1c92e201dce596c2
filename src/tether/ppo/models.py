"""The four roles of PPO for RLHF and the networks that play them.

* **policy**: the causal LM being trained (a full model, or LoRA adapters on it);
* **reference**: the frozen starting policy (a copy; with LoRA, the policy with its adapters disabled);
* **reward model**: a frozen scalar model scoring each response at its stop token;
* **critic** (value model): a separate scalar model (by default a copy of the whole reward model;
  ``--value_model_path`` for another one), LoRA adapters with a trainable head copy on the reward
  model itself (which then scores with its adapters disabled), or a zero-initialised value head on
  the policy's last hidden state (``--value_head_on_policy``).

:func:`build_ppo_models` loads them from a :class:`~tether.ppo.config.PPOConfig` (or a checkpoint)
into one :class:`PPOModels`, together with the AdamW optimizer and the learning-rate schedule of the
trained parameters. :class:`PolicyAndValue` holds the two trained networks as one module, whose
forward gives the response logits and values the rollout and the update both read.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tether.config import ConfigError, peft_config_from
from tether.models.scoring import RewardStats, token_scores
from tether.models.shared_prompt import attention_mask_for
from tether.models.wrappers import strip_peft, unwrap_distributed
from tether.ppo.config import PPOConfig
from tether.ppo.grouping import take_responses


# ---------------------------------------------------------------------------------------------
# forwards over [query | response]
# ---------------------------------------------------------------------------------------------
@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def response_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_width: int,
    response_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits that predict each response token, ``[B, R, V]`` (position ``P − 1 + t`` predicts token ``t``).

    ``response_index``: grouped rows ``[prompt | k responses]`` (``tether.ppo.grouping``) with a boolean
    4-D ``attention_mask``; the result is then ``[G·k, R, V]`` in the plain rows' order."""
    n_response = input_ids.shape[1] - prompt_width
    kwargs: dict[str, Any] = {}
    if _accepts_logits_to_keep(type(strip_peft(model))):
        kwargs["logits_to_keep"] = n_response + 1  # skip the LM head on the prompt
    if response_index is not None:
        attention_mask = attention_mask_for(model, attention_mask)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    )
    logits = out.logits[:, -(n_response + 1) :]
    return logits[:, :-1] if response_index is None else take_responses(logits, response_index)


def response_values(
    value_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_width: int,
    response_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar head output at the positions that predict each response token, ``[B, R]`` (float32)."""
    if response_index is not None:
        attention_mask = attention_mask_for(value_model, attention_mask)
    scores = token_scores(value_model, input_ids, attention_mask, position_ids)[:, prompt_width - 1 :]
    return (scores[:, :-1] if response_index is None else take_responses(scores, response_index)).float()


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
        if value_model is not None and value_head is not None:
            raise ValueError("give at most one of value_model and value_head (neither: critic-free, values None)")
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
        response_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        args = (input_ids, attention_mask, position_ids, prompt_width, response_index)
        if self.value_head is None:
            with_values = with_values and self.value_model is not None  # critic-free: no value forward at all
            logits = response_logits(self.policy, *args) if with_logits else None
            values = response_values(self.value_model, *args) if with_values else None
            return logits, values
        captured: list[torch.Tensor] = []

        def keep_hidden(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = strip_peft(self.policy).get_decoder().register_forward_hook(keep_hidden)
        try:
            logits = response_logits(self.policy, *args)
        finally:
            handle.remove()
        hidden = captured[-1][:, prompt_width - 1 :]
        hidden = hidden[:, :-1] if response_index is None else take_responses(hidden, response_index)
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


def make_accelerator(cfg: PPOConfig):
    """The ``accelerate.Accelerator`` of a PPO run: mixed precision from --bf16/--fp16, CPU with --use_cpu."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    mixed = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    # Warm-up leaves the policy without gradients; DDP must then tolerate unused parameters.
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=cfg.value_warmup_steps > 0)]
    return Accelerator(mixed_precision=mixed, cpu=cfg.use_cpu, kwargs_handlers=kwargs)


# ---------------------------------------------------------------------------------------------
# the four roles
# ---------------------------------------------------------------------------------------------
@dataclass
class RolloutModels:
    """What a rollout reads: the trained networks, the reference (None: the LoRA policy with its
    adapters disabled), the reward model (None: the LoRA critic with its adapters disabled) and the
    statistics that normalise its scores (None: raw scores). ``without_reward_model``: no reward
    model at all (only ``--reward_funcs`` score; the model scores are 0)."""

    policy_and_value: PolicyAndValue
    reference: nn.Module | None = None
    reward_model: nn.Module | None = None
    reward_stats: RewardStats | None = None
    without_reward_model: bool = False
    #: the other reward models of an ensemble (--reward_model_path A B ...), each with its score statistics
    ensemble: list[tuple[nn.Module, RewardStats | None]] = field(default_factory=list)


@dataclass
class PPOModels(RolloutModels):
    """The four roles of a PPO run, plus what trains two of them.

    ``trained`` is ``policy_and_value`` as ``accelerate`` prepared it (DDP-wrapped on several
    processes): the update runs its forward through it, so gradients are averaged over processes.
    """

    trained: nn.Module | None = None
    optimizer: Any = None
    scheduler: Any = None
    trained_parameters: list[nn.Parameter] = field(default_factory=list)

    @contextlib.contextmanager
    def policy_frozen(self):
        """Critic warm-up: the policy's forward runs without building a graph for its weights."""
        policy = self.policy_and_value.policy
        flags = [(p, p.requires_grad) for p in policy.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def save(self, folder: Path, tokenizer, merged: bool) -> None:
        """policy/ and value_model/ (LoRA adapters, or full models when ``merged``) or value_head/."""
        models = self.policy_and_value
        for name, model in (("policy", models.policy), ("value_model", models.value_model)):
            if model is None:
                continue
            if merged and hasattr(model, "merge_and_unload"):
                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(folder / name, safe_serialization=True)
            tokenizer.save_pretrained(folder / name)
        if models.value_head is not None:
            from safetensors.torch import save_file

            (folder / "value_head").mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in models.value_head.state_dict().items()},
                str(folder / "value_head" / "value_head.safetensors"),
            )


def build_ppo_models(
    cfg: PPOConfig,
    accelerator,
    tokenizer,
    num_iterations: int,
    resume_dir: Path | None = None,
    say: Callable[[str], None] = print,
) -> PPOModels:
    """Load the four roles from ``cfg`` (the trained ones from ``resume_dir`` when resuming), then the
    optimizer and schedule; the trained networks are prepared by ``accelerator``."""
    from tether.models.loading import disable_dropout, from_pretrained_kwargs, load_causal_lm, load_scalar_model

    acc = accelerator
    paths = cfg.reward_model_paths
    if not paths and not cfg.reward_funcs:
        raise ConfigError("--reward_model_path is required (a folder written by `tether rm`), or give --reward_funcs")
    for path in paths:
        check_reward_model(path, tokenizer)
    first_rm = paths[0] if paths else None
    ckpt = resume_dir
    policy = load_causal_lm(cfg.model_name_or_path, cfg.dtype, **from_pretrained_kwargs(cfg))
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
        reference = copy.deepcopy(policy)
        if ckpt is not None:
            policy = load_causal_lm(str(ckpt / "policy"), cfg.dtype)
    reward_model = load_scalar_model(first_rm, cfg.dtype, **from_pretrained_kwargs(cfg)) if first_rm else None
    if cfg.critic_free:  # no value model: no parameters, no optimizer state, no forward pass
        value_model = value_head = None
    elif cfg.value_head_on_policy:
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
        base = (
            reward_model
            if cfg.value_model_path is None
            else load_scalar_model(cfg.value_model_path, cfg.dtype, **from_pretrained_kwargs(cfg))
        )
        if ckpt is not None:
            value_model = PeftModel.from_pretrained(base, ckpt / "value_model", is_trainable=True)
        else:
            value_model = get_peft_model(base, peft_config_from(cfg, task_type="SEQ_CLS"))
        if cfg.value_model_path is None and reward_model is not None:
            reward_model = None  # scored by the value model with its adapters disabled
    else:
        value_head = None
        value_source = (
            str(ckpt / "value_model") if ckpt is not None else (cfg.value_model_path or first_rm)
        )  # (without a reward model the config requires --value_model_path or --value_head_on_policy)
        value_model = load_scalar_model(value_source, cfg.dtype, **from_pretrained_kwargs(cfg))
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
    policy_and_value = PolicyAndValue(policy, value_model, value_head).to(acc.device)
    policy_and_value.train()
    models = PPOModels(policy_and_value, reference, reward_model, reward_stats(cfg, first_rm, say))
    models.without_reward_model = first_rm is None
    for path in paths[1:]:
        member = load_scalar_model(path, cfg.dtype, **from_pretrained_kwargs(cfg))
        disable_dropout(member)
        models.ensemble.append((member.requires_grad_(False).eval().to(acc.device), reward_stats(cfg, path, say)))
    _add_optimizer(models, cfg, acc, num_iterations)
    return models


def _add_optimizer(models: PPOModels, cfg: PPOConfig, acc, num_iterations: int) -> None:
    """AdamW over the trainable parameters, the schedule (one step per iteration), and ``accelerate.prepare``."""
    from transformers import get_scheduler

    params = [p for p in models.policy_and_value.parameters() if p.requires_grad]
    fused = getattr(cfg.optim, "value", cfg.optim) == "adamw_torch_fused" and acc.device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 1 else math.ceil(cfg.warmup_steps * num_iterations)
    # stepped once per iteration: the learning rate is constant within a rollout batch (OpenAI, N+)
    models.scheduler = get_scheduler(
        cfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(warmup),
        num_training_steps=num_iterations,
        scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or None,
    )
    models.trained, models.optimizer = acc.prepare(models.policy_and_value, optimizer)
    models.trained_parameters = params


def check_reward_model(path: str, tokenizer) -> None:
    """A ConfigError unless ``path`` is a one-label sequence-classification model of the policy's vocabulary."""
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

        if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                f"--reward_model_path {path}: its tokenizer differs from the policy's; PPO scores "
                "the policy's tokens directly, so both must share one vocabulary"
            )


def reward_stats(cfg: PPOConfig, path: str | None, say: Callable[[str], None]) -> RewardStats | None:
    """The score statistics (reward_stats.json) of the reward model at ``path`` when --normalize_reward, else None."""
    from tether.models.scoring import load_reward_stats

    if not cfg.normalize_reward or path is None:
        return None
    try:
        stats = load_reward_stats(path)
    except FileNotFoundError:
        say(
            f"no reward_stats.json in {path}: raw scores are used, so β, the missing-EOS "
            "penalty and the value clip are in the reward model's raw units"
        )
        return None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return stats
