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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tether.config import ConfigError, peft_config_from
from tether.models.packing import model_attention_mask
from tether.models.scoring import RewardStats, token_scores
from tether.models.wrappers import strip_peft
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
        attention_mask = model_attention_mask(model, attention_mask)
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
        attention_mask = model_attention_mask(value_model, attention_mask)
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

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None:
        """Under FSDP2 (each network sharded on its own): whether the next backward reduce-scatters the
        gradients; ``accelerate``'s ``no_sync`` turns it off for all micro-batches but the last."""
        for network in (self.policy, self.value_model, self.value_head):
            if hasattr(network, "set_requires_gradient_sync"):
                network.set_requires_gradient_sync(requires_gradient_sync)

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


def make_value_head(policy: nn.Module, device: torch.device | None = None) -> nn.Linear:
    """A linear value head on the policy trunk, initialised to zero (OpenAI lm-human-preferences),
    on ``device`` (default: the policy's)."""
    config = strip_peft(policy).config
    hidden = config.get_text_config().hidden_size
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    param = next(policy.parameters())
    return head.to(device=device or param.device, dtype=param.dtype)


def make_accelerator(cfg: PPOConfig):
    """The ``accelerate.Accelerator`` of a PPO run: mixed precision from --bf16/--fp16, CPU with --use_cpu,
    the --report_to trackers (tensorboard writes under --output_dir/runs)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from tether.tracking import tracker_names

    mixed = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    # Warm-up leaves the policy without gradients; DDP must then tolerate unused parameters.
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=cfg.value_warmup_steps > 0)]
    trackers: dict[str, Any] = {}
    if tracker_names(cfg.report_to):
        logs = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "runs"))
        trackers = {"log_with": tracker_names(cfg.report_to), "project_config": logs}
    accelerator = Accelerator(mixed_precision=mixed, cpu=cfg.use_cpu, kwargs_handlers=kwargs, **trackers)
    if cfg.fp16 and accelerator.device.type == "cpu":
        raise ConfigError(
            "--fp16: on the CPU accelerate applies neither fp16 autocast nor loss scaling (the run would be fp32); "
            "use --bf16 there, or drop --fp16"
        )
    return accelerator


# ---------------------------------------------------------------------------------------------
# sharded training (FSDP2)
# ---------------------------------------------------------------------------------------------
def sharded_with_fsdp(accelerator) -> bool:
    """The run shards its networks with FSDP (``accelerate launch`` with an FSDP config, on GPUs)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_distributed_setup(cfg: PPOConfig, accelerator) -> None:
    """A ConfigError naming the option, for a launch ``tether ppo`` cannot run as asked.

    Every process calls it before any collective and reaches the same verdict from the same
    configuration, so all of them stop together and none is left waiting."""
    from accelerate.utils import DistributedType

    from tether.stages.common import fsdp_requested

    kind = accelerator.distributed_type
    if fsdp_requested() and kind != DistributedType.FSDP:
        # e.g. configs/accelerate/fsdp.yaml with use_cpu: true: transformers would leave the weights of
        # processes > 0 on the meta device (fsdp_cpu_ram_efficient_loading) for a plain data-parallel run
        raise ConfigError(
            f"the accelerate config asks for FSDP (distributed_type: FSDP) but accelerate runs it as {kind.value}: "
            "accelerate shards models with FSDP on GPUs only (use_cpu: true / --use_cpu true turn it into plain "
            "data parallel). On CPU processes use configs/accelerate/multi_cpu.yaml; for FSDP run on GPUs with "
            "use_cpu: false"
        )
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError(
            "tether ppo does not run under DeepSpeed (distributed_type: DEEPSPEED in the accelerate config): its "
            "four networks are sharded with FSDP2; use configs/accelerate/fsdp.yaml (or multi_gpu.yaml for data "
            "parallel)"
        )
    if kind != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ConfigError(
            f"tether ppo under FSDP needs fsdp_version: 2 in the accelerate config (got {plugin.fsdp_version}): "
            "each of its networks is sharded with FSDP2's fully_shard"
        )
    if plugin.activation_checkpointing:
        raise ConfigError(
            "fsdp_activation_checkpointing: true in the accelerate config is not applied by tether ppo (it shards "
            "its networks itself); set it to false and pass --gradient_checkpointing true"
        )


def shard(accelerator, module: nn.Module, user_layer_names: list[str] | None) -> nn.Module:
    """``module`` sharded with FSDP2 by accelerate (``fsdp2_prepare_model``: the transformer blocks,
    the embedding and head, the rest at the root; with ``fsdp_cpu_ram_efficient_loading`` the main
    process's weights are sent to the others). Every process must call it, in the same order.

    ``user_layer_names``: ``fsdp_transformer_layer_cls_to_wrap`` as the config gave it; unset, each
    network is split at its own ``_no_split_modules`` (accelerate keeps the first network's otherwise)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    if not hasattr(module, "config"):  # the value head: built whole and alike on every process, one unit
        return fully_shard(module, mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy())
    plugin.transformer_cls_names_to_wrap = user_layer_names
    return fsdp2_prepare_model(accelerator, module)


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

    def complete_networks(self, accelerator) -> Iterator[tuple[str, nn.Module | None]]:
        """The trained networks (``policy``, ``value_model``, ``value_head``; the ones present), one at a
        time, each with all its weights on the main process (None on the others).

        EVERY process must run through it: under FSDP each network's full state dict is gathered with
        accelerate's ``Accelerator.get_state_dict`` (FSDP2: ``get_model_state_dict(full_state_dict=True,
        cpu_offload=True)``), a collective, and the main process loads it into an unsharded copy; one
        network at a time, so that only one whole copy exists at once (drop it before the next)."""
        models = self.policy_and_value
        sharded = sharded_with_fsdp(accelerator)
        for name, model in (
            ("policy", models.policy),
            ("value_model", models.value_model),
            ("value_head", models.value_head),
        ):
            if model is None:
                continue
            if not sharded:
                yield name, model if accelerator.is_main_process else None
                continue
            from tether.stages.common import unsharded_copy

            state_dict = accelerator.get_state_dict(model)
            if not accelerator.is_main_process:
                yield name, None
                continue
            if name == "value_head":
                complete = nn.Linear(model.in_features, 1, dtype=state_dict["weight"].dtype)
                complete.load_state_dict(state_dict)
            else:
                complete = unsharded_copy(model, state_dict)
            del state_dict
            yield name, complete
            del complete

    @staticmethod
    def save(networks: dict[str, nn.Module], folder: Path, tokenizer, merged: bool) -> None:
        """policy/ and value_model/ (LoRA adapters, or full models when ``merged``) or value_head/, of
        the networks given (from :meth:`complete_networks`; main process only)."""
        for name in ("policy", "value_model"):
            model = networks.get(name)
            if model is None:
                continue
            if merged and hasattr(model, "merge_and_unload"):
                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(folder / name, safe_serialization=True)
            tokenizer.save_pretrained(folder / name)
        if networks.get("value_head") is not None:
            from safetensors.torch import save_file

            (folder / "value_head").mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in networks["value_head"].state_dict().items()},
                str(folder / "value_head" / "value_head.safetensors"),
            )


def build_ppo_models(
    cfg: PPOConfig,
    accelerator,
    tokenizer,
    num_iterations: int,
    resume_dir: Path | None = None,
    say: Callable[[str], None] = print,
    *,
    model: nn.Module | None = None,
    reward_model: nn.Module | None = None,
) -> PPOModels:
    """Load the four roles from ``cfg`` (the trained ones from ``resume_dir`` when resuming), then the
    optimizer and schedule; the trained networks are prepared by ``accelerator``.

    ``model`` / ``reward_model``: already-loaded objects used instead of --model_name_or_path /
    --reward_model_path (the policy trains in place; the reference and the default critic are copies).

    Under FSDP every network is sharded (:func:`shard`), the frozen ones too; nothing is moved or run
    before that (with ``fsdp_cpu_ram_efficient_loading`` processes > 0 hold meta tensors until then).
    Its checkpoints are sharded: the networks are built as for a fresh run, and the trainer loads
    their sharded state afterwards (``RunFolder.load_checkpoint``)."""
    from tether.models.loading import disable_dropout, from_pretrained_kwargs, load_causal_lm, load_scalar_model

    acc = accelerator
    sharded = sharded_with_fsdp(acc)
    if sharded:
        resume_dir = None  # the sharded checkpoint is loaded into the sharded networks later
    paths = cfg.reward_model_paths
    if reward_model is not None:
        check_reward_model_object(reward_model, cfg)
    elif not paths and not cfg.reward_funcs:
        raise ConfigError("--reward_model_path is required (a folder written by `tether rm`), or give --reward_funcs")
    for path in paths:
        check_reward_model(path, tokenizer)
    first_rm = paths[0] if paths else None
    ckpt = resume_dir
    if model is None:
        policy = load_causal_lm(cfg.model_name_or_path, cfg.dtype, **from_pretrained_kwargs(cfg))
    else:
        policy = model
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
    if reward_model is not None:  # statistics from the folder it was loaded from, if any
        first_rm = reward_model.name_or_path if Path(reward_model.name_or_path or "-").is_dir() else None
    elif first_rm:
        reward_model = load_scalar_model(first_rm, cfg.dtype, **from_pretrained_kwargs(cfg))
    given_reward_model = reward_model
    if cfg.critic_free:  # no value model: no parameters, no optimizer state, no forward pass
        value_model = value_head = None
    elif cfg.value_head_on_policy:
        value_model = None
        # under FSDP built whole on every process (zeros, identical): nothing to send from the main one
        value_head = make_value_head(policy, acc.device if sharded else None)
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
        )  # (without a reward model the config requires --value_model_path or --value_head_on_policy)
        if ckpt is not None:
            value_model = PeftModel.from_pretrained(base, ckpt / "value_model", is_trainable=True)
        else:
            value_model = get_peft_model(base, peft_config_from(cfg, task_type="SEQ_CLS"))
        if cfg.value_model_path is None and reward_model is not None:
            reward_model = None  # scored by the value model with its adapters disabled
    elif ckpt is None and cfg.value_model_path is None and not paths and given_reward_model is not None:
        value_head = None  # a reward-model object: the critic starts as a copy of it
        value_model = copy.deepcopy(given_reward_model).requires_grad_(True)
    else:
        value_head = None
        value_source = (
            str(ckpt / "value_model") if ckpt is not None else (cfg.value_model_path or first_rm)
        )  # (without a reward model the config requires --value_model_path or --value_head_on_policy)
        value_model = load_scalar_model(value_source, cfg.dtype, **from_pretrained_kwargs(cfg))
    for network in (policy, reference, value_model, reward_model):
        if network is not None:
            disable_dropout(network)  # ratio 1 and KL 0 at equal weights, in train mode too
    for frozen in (reference, reward_model):
        if frozen is not None:
            frozen.requires_grad_(False)
            frozen.eval()
            if not sharded:
                frozen.to(acc.device)
    # --gradient_checkpointing is TrainingArguments' older name of --activation_checkpointing
    if getattr(cfg, "activation_checkpointing", None) or cfg.gradient_checkpointing:
        for network in (policy, value_model):
            if network is None:
                continue
            if hasattr(network, "activation_checkpointing_enable"):
                network.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                network.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ensemble = []
    for path in paths[1:]:
        member = load_scalar_model(path, cfg.dtype, **from_pretrained_kwargs(cfg))
        disable_dropout(member)
        member.requires_grad_(False).eval()
        ensemble.append((member if sharded else member.to(acc.device), reward_stats(cfg, path, say)))
    if sharded:  # each network its own FSDP2 root, in the same order on every process
        names = acc.state.fsdp_plugin.transformer_cls_names_to_wrap
        policy, value_model, value_head, reference, reward_model = (
            None if m is None else shard(acc, m, names)
            for m in (policy, value_model, value_head, reference, reward_model)
        )
        ensemble = [(shard(acc, m, names), stats) for m, stats in ensemble]
        for frozen in (reference, reward_model, *(m for m, _ in ensemble)):
            if frozen is not None:  # no backward ever reshards them: every unit reshards after its forward
                frozen.set_reshard_after_forward(True)
    policy_and_value = PolicyAndValue(policy, value_model, value_head)
    if not sharded:
        policy_and_value.to(acc.device)
    policy_and_value.train()
    models = PPOModels(policy_and_value, reference, reward_model, reward_stats(cfg, first_rm, say))
    models.without_reward_model = given_reward_model is None
    models.ensemble = ensemble
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
    # stepped once per iteration that trains the policy (not during --value_warmup_steps): the
    # learning rate is constant within a rollout batch (OpenAI, N+)
    policy_iterations = max(1, num_iterations - cfg.value_warmup_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 1 else math.ceil(cfg.warmup_steps * policy_iterations)
    models.scheduler = get_scheduler(
        cfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(warmup),
        num_training_steps=policy_iterations,
        scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or None,
    )
    models.trained_parameters = params
    if sharded_with_fsdp(acc):
        # the networks are sharded already and the optimizer was built on their shards (FSDP2's way);
        # the update's forward runs through each network's own FSDP root
        models.trained, models.optimizer = models.policy_and_value, optimizer
        return
    models.trained, models.optimizer = acc.prepare(models.policy_and_value, optimizer)


def clip_grad_norm(accelerator, parameters: list[nn.Parameter], max_norm: float) -> float | None:
    """Scale the gradients of ``parameters`` to a global norm of at most ``max_norm``; the norm before
    clipping (``None`` where accelerate does not report it). Under FSDP2 torch's DTensor-aware clipping
    (accelerate clips only the models it prepared); otherwise accelerate's, which unscales fp16 first."""
    if sharded_with_fsdp(accelerator):
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    norm = accelerator.clip_grad_norm_(parameters, max_norm)
    return None if norm is None else float(norm)


def total_grad_norm(parameters: list[nn.Parameter]) -> float:
    """‖g‖₂ over the gradients of ``parameters`` (under FSDP2 each holds a shard: the norm is reduced)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def check_reward_model_object(model: nn.Module, cfg: PPOConfig) -> None:
    """A ConfigError unless ``model`` is a one-label sequence-classification model given alone (not
    with --reward_model_path, whose first folder it would replace, nor --reward_funcs, which weight
    the reward models by path)."""
    if getattr(model.config, "num_labels", None) != 1 or not type(strip_peft(model)).__name__.endswith(
        "ForSequenceClassification"
    ):
        raise ConfigError(
            f"reward_model: a reward model is a sequence-classification model with one label, got "
            f"{type(model).__name__} (num_labels={getattr(model.config, 'num_labels', None)})"
        )
    if cfg.reward_model_paths or cfg.reward_funcs:
        raise ConfigError(
            "reward_model: give the reward model as an object or by --reward_model_path, and without "
            "--reward_funcs (pass the folder by --reward_model_path to combine it with reward functions)"
        )


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
