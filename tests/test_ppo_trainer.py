"""The PPO loop end to end on tiny real models (docs/ppo.md checklist items 2, 8-13; learning, resume,
non-finite handling, divergence stop, outputs, CLI)."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from ppo_tiny import GOOD, one_torch_thread, word_dirs, word_tok  # noqa: F401  (fixtures)

from tether.config import ConfigError
from tether.data.errors import DataError
from tether.durable import complete_checkpoints
from tether.tracking import read_jsonl

PROMPTS = ["a b c", "d e", "yes no", "x y z w", "good a", "m n o p q", "k", "s t u"]
DESIGN_METRICS = [
    "reward/score",
    "kl/ref",
    "kl/coef",
    "kl/band",
    "reward/non_score",
    "loss/policy",
    "loss/value",
    "policy/approx_kl",
    "policy/clipfrac",
    "value/clipfrac",
    "policy/entropy",
    "value/explained_var",
    "response/length",
    "response/stopped",
    "time/generate",
    "time/score",
    "time/update",
    "throughput/episodes_per_s",
    "throughput/tokens_per_s",
]


def make_config(tmp_path, dirs, name="run", **overrides):
    from tether.ppo import PPOConfig

    values = dict(
        output_dir=str(tmp_path / name),
        model_name_or_path=str(dirs["policy"]),
        reward_model_path=str(dirs["rm"]),
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        learning_rate=1e-2,
        num_iterations=2,
        save_steps=0,
        disable_tqdm=True,
        logging_steps=1000,
        report_to="none",
        # raw scores (the tiny reward models have no reward_stats.json): these tests compute rewards from
        # the raw score; tests/test_ppo_reward_normalisation.py covers the normalisation
        reward_norm_samples=0,
    )
    values.update(overrides)
    return PPOConfig(**values)


def trainer(config, prompts=PROMPTS, **kwargs):
    from tether.ppo import PPOTrainer

    return PPOTrainer(config, prompts, **kwargs)


def rows(config):
    return read_jsonl(f"{config.output_dir}/metrics.jsonl")


# ---- items 2 and 8 -------------------------------------------------------------------------------
def test_first_minibatch_has_ratio_one_and_old_logprobs_stay_fixed_across_epochs(tmp_path, word_dirs):
    seen = []

    def check_rollout(rollout):
        # called after the PPO epochs: at iteration 1 the old log-probs still equal the reference's
        # (same starting weights), so nothing wrote into them, and no graph hangs on them
        seen.append(
            (
                torch.equal(rollout.logprobs, rollout.ref_logprobs),
                rollout.logprobs.requires_grad,
                rollout.values.requires_grad,
            )
        )
        return {}

    config = make_config(tmp_path, word_dirs, per_device_train_batch_size=2, num_iterations=1, ppo_epochs=3)
    t = trainer(config, extra_metrics=check_rollout)
    t.train()
    assert seen == [(True, False, False)]
    log = t.update_log
    assert len(log) == 3 * 2  # 3 epochs × 2 minibatches
    first = log[0]
    assert first["policy/ratio_max_dev"] <= 1e-6 and first["policy/approx_kl"] <= 1e-12
    assert first["policy/clipfrac"] == 0.0 and first["value/clipfrac"] == 0.0
    assert log[1]["policy/approx_kl"] > 1e-8  # the policy moved after the first step
    for epoch in range(3):  # each epoch is a fresh permutation covering every episode once
        epoch_rows = [r for e in log if e["epoch"] == epoch for r in e["rows"]]
        assert sorted(epoch_rows) == list(range(8))
    orders = [[r for e in log if e["epoch"] == epoch for r in e["rows"]] for epoch in range(3)]
    assert len({tuple(o) for o in orders}) > 1


@pytest.mark.parametrize(
    "options",
    [
        dict(activation_checkpointing=True),
        dict(use_peft=True, value_head_on_policy=True, lora_r=4),
        dict(use_peft=True, lora_r=4, activation_checkpointing=True),
        dict(generation_cache="static", kl_penalty="full"),
    ],
)
def test_ratio_is_exactly_one_on_the_first_minibatch_with_other_options(tmp_path, word_dirs, options):
    t = trainer(make_config(tmp_path, word_dirs, num_iterations=1, **options))
    t.train()
    assert t.update_log[0]["policy/ratio_max_dev"] <= 1e-6 and t.update_log[0]["policy/approx_kl"] <= 1e-12
    assert t.update_log[1]["policy/approx_kl"] > 1e-8


def test_old_logprobs_from_the_sampler_match_the_training_forward_closely(tmp_path, word_dirs):
    """--rollout_logprobs generation (TRL's way, one forward less): ratio 1 to fp32 precision, not bitwise."""
    config = make_config(tmp_path, word_dirs, num_iterations=1, rollout_logprobs="generation")
    t = trainer(config)
    t.train()
    first = t.update_log[0]
    assert first["policy/ratio_max_dev"] <= 1e-5 and first["policy/approx_kl"] <= 1e-10
    assert first["policy/clipfrac"] == 0.0


def _token_rewards_by_hand(kl, scores, mask, beta):
    """r_t = −β·KL_t on every real token, plus the score on the last one."""
    rewards = torch.zeros_like(kl)
    for i in range(kl.shape[0]):
        n = int(mask[i].sum())
        for t in range(n):
            rewards[i, t] = -beta * kl[i, t] + (scores[i] if t == n - 1 else 0.0)
    return rewards


def _gae_by_hand(rewards, values, mask, gamma=1.0, lam=0.95):
    """A_t = δ_t + γλ·A_{t+1}, δ_t = r_t + γ·V_{t+1} − V_t, with V = 0 after the last real token."""
    advantages = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        n, following = int(mask[i].sum()), 0.0
        for t in reversed(range(n)):
            next_value = values[i, t + 1] if t + 1 < n else 0.0
            following = rewards[i, t] + gamma * next_value - values[i, t] + gamma * lam * following
            advantages[i, t] = following
    return advantages


def _whiten_by_hand(x, mask, keep_mean=False):
    real = x[mask].double()
    mean, var = real.mean(), real.var(unbiased=False)
    out = ((x.double() - mean) / (var + 1e-8).sqrt() + (mean if keep_mean else 0.0)).float()
    return torch.where(mask, out, torch.zeros_like(out))


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_learn_takes_returns_before_whitening_and_keeps_the_rollouts_values_fixed(tmp_path, word_dirs, whiten_rewards):
    config = make_config(
        tmp_path, word_dirs, num_iterations=1, ppo_epochs=3, init_kl_coef=0.3, whiten_rewards=whiten_rewards
    )
    t = trainer(config)
    with torch.no_grad():  # a reference that differs, so the KL term of the rewards is not zero
        t.models.reference.model.norm.weight.mul_(1.3)
    batch = t.collect_rollout()
    mask = batch.response_mask.bool()
    assert batch.kl_penalty[mask].abs().min() > 0
    old_values, old_logprobs = batch.values.clone(), batch.logprobs.clone()
    t.learn(batch)  # 3 epochs × 2 minibatches
    assert len(t.update_log) == 6
    assert torch.equal(batch.values, old_values) and torch.equal(batch.logprobs, old_logprobs)  # fixed
    rewards = _token_rewards_by_hand(batch.kl_penalty, batch.scores, mask, beta=0.3)
    if whiten_rewards:  # --whiten_rewards: scaled to unit variance over the real tokens, the mean kept
        rewards = _whiten_by_hand(rewards, mask, keep_mean=True)
    assert torch.allclose(batch.rewards, rewards, atol=1e-5)
    advantages = _gae_by_hand(rewards, old_values, mask)
    # returns from the advantages BEFORE whitening; the advantages then whitened over real tokens
    assert torch.allclose(batch.returns[mask], (advantages + old_values)[mask], atol=1e-5)
    assert torch.allclose(batch.advantages, _whiten_by_hand(advantages, mask), atol=1e-5)
    assert not torch.allclose(batch.returns[mask], (batch.advantages + old_values)[mask], atol=1e-3)


def test_the_entropy_bonus_is_subtracted_from_the_loss_and_raises_the_entropy(tmp_path, word_dirs):
    common = dict(num_iterations=4, init_kl_coef=0.0, learning_rate=3e-2, temperature=1.0, max_new_tokens=8)
    plain = trainer(make_config(tmp_path, word_dirs, name="plain", **common))
    plain.train()
    bonus = trainer(make_config(tmp_path, word_dirs, name="bonus", entropy_coef=2.0, **common))
    bonus.train()
    for step in bonus.update_log:  # loss = pg + vf_coef·vf − c·entropy
        expected = step["loss/policy"] + 0.1 * step["loss/value"] - 2.0 * step["policy/entropy"]
        assert step["loss/total"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    a, b = rows(plain.config), rows(bonus.config)
    # the random policy starts near the maximum, ln 32 = 3.47 nats: without the bonus the entropy falls
    # as the policy learns, with it the entropy still rises
    assert a[-1]["policy/entropy"] < a[0]["policy/entropy"] - 0.3
    assert b[-1]["policy/entropy"] > b[0]["policy/entropy"] and b[-1]["policy/entropy"] > a[-1]["policy/entropy"] + 0.3


def test_the_missing_stop_penalty_replaces_the_normalised_score(tmp_path, word_dirs):
    from tether.models.scoring import RewardStats, save_reward_stats

    rm = tmp_path / "rm-with-stats"
    shutil.copytree(word_dirs["rm"], rm)
    save_reward_stats(RewardStats(mean=0.3, std=0.5, count=256, source="test"), rm)
    seen = []
    config = make_config(
        tmp_path, word_dirs, reward_model_path=str(rm), missing_eos_penalty=-1.0, max_new_tokens=16, num_iterations=1
    )
    trainer(config, extra_metrics=lambda ro: seen.append((ro.raw_scores, ro.scores, ro.stopped)) or {}).train()
    raw, scores, stopped = seen[0]
    assert stopped.any() and not stopped.all()  # both kinds in the batch
    assert torch.allclose(scores[stopped], (raw[stopped] - 0.3) / 0.5, atol=1e-6)  # normalised
    assert scores[~stopped].eq(-1.0).all()  # replaced by the penalty itself, in normalised units
    assert rows(config)[0]["reward/score"] == pytest.approx(scores.mean().item(), abs=1e-6)


# ---- item 9 -------------------------------------------------------------------------------------
def test_value_model_is_a_separate_copy_of_the_whole_reward_model(tmp_path, word_dirs):
    t = trainer(make_config(tmp_path, word_dirs, num_iterations=1))
    value = t.models.policy_and_value.value_model
    rm_params, value_params = dict(t.models.reward_model.named_parameters()), dict(value.named_parameters())
    assert rm_params.keys() == value_params.keys()  # backbone and head
    for name, p in value_params.items():
        assert torch.equal(p, rm_params[name]) and p.data_ptr() != rm_params[name].data_ptr()
        assert p.requires_grad and not rm_params[name].requires_grad
    before = {k: v.clone() for k, v in rm_params.items()}
    t.train()
    assert all(torch.equal(before[k], v) for k, v in t.models.reward_model.named_parameters())  # frozen
    assert not torch.equal(value.score.weight, before["score.weight"])  # the critic trained


def test_with_lora_the_critic_is_adapters_on_the_reward_model_which_still_scores_exactly(tmp_path, word_dirs, word_tok):
    """LoRA: the value model is the reward model plus adapters and a trainable copy of its head; with the
    adapters disabled the same network gives the reward model's exact scores, before and after training."""
    from transformers import AutoModelForSequenceClassification

    from tether.generation import left_pad
    from tether.models.loading import load_scalar_model
    from tether.models.scoring import token_scores
    from tether.models.wrappers import adapters_disabled
    from tether.ppo.rollout import build_sequences

    config = make_config(
        tmp_path,
        word_dirs,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        learning_rate=5e-2,
        num_iterations=2,
        save_steps=1,
        keep_checkpoints=True,
    )
    t = trainer(config)
    value = t.models.policy_and_value.value_model
    assert t.models.reward_model is None and t.models.reference is None  # four roles, two networks
    trained = {n for n, p in value.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "modules_to_save" in n for n in trained)
    assert any("score" in n and "modules_to_save" in n for n in trained)  # the head trains in full

    q, qm = left_pad([word_tok(p)["input_ids"] for p in PROMPTS[:3]], word_tok.pad_token_id)
    r = torch.tensor([[word_tok.convert_tokens_to_ids(w) for w in ("a", GOOD, "b", "<eos>")]] * 3)
    args = build_sequences(q, qm, r, torch.ones_like(r, dtype=torch.bool))
    rm = load_scalar_model(str(word_dirs["rm"]))

    def scores(model):
        with torch.no_grad():
            return token_scores(model, *args)

    assert torch.equal(scores(value), scores(rm))  # the critic starts as the reward model
    t.train()
    with adapters_disabled(value):
        assert torch.equal(scores(value), scores(rm))  # the reward model did not move
    assert not torch.allclose(scores(value), scores(rm), atol=1e-3)  # the critic did
    # outputs: checkpoints hold the adapter, the final value_model/ is a full merged model
    assert (tmp_path / "run" / "checkpoint-2" / "value_model" / "adapter_config.json").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "value_model")
    assert torch.allclose(scores(merged), scores(value), atol=1e-5)


def test_value_head_on_the_policy_starts_at_zero_and_trains(tmp_path, word_dirs):
    values = []
    t = trainer(
        make_config(tmp_path, word_dirs, value_head_on_policy=True, num_iterations=1),
        extra_metrics=lambda ro: values.append(ro.values.clone()) or {},
    )
    head = t.models.policy_and_value.value_head
    assert t.models.policy_and_value.value_model is None and head.weight.eq(0).all()
    t.train()
    assert values[0].eq(0).all()  # zero-initialised head
    assert head.weight.abs().sum() > 0
    assert (tmp_path / "run" / "value_head" / "value_head.safetensors").is_file()


# ---- item 10 -------------------------------------------------------------------------------------
def test_optimizer_defaults_follow_the_references_and_the_schedule_decays_linearly_to_zero(tmp_path, word_dirs):
    from tether.ppo import PPOConfig

    defaults = PPOConfig(reward_model_path="unused")
    assert defaults.adam_epsilon == 1e-5 and defaults.max_grad_norm is None and defaults.warmup_steps == 0
    assert str(getattr(defaults.lr_scheduler_type, "value", defaults.lr_scheduler_type)) == "linear"
    assert defaults.weight_decay == 0.0 and defaults.vf_coef == 0.1 and defaults.cliprange == 0.2
    assert defaults.gamma == 1.0 and defaults.lam == 0.95 and defaults.kl_penalty == "k1"
    assert defaults.temperature == 0.7 and defaults.top_k == 0 and defaults.top_p == 1.0

    config = make_config(tmp_path, word_dirs, num_iterations=4, learning_rate=1e-3)
    t = trainer(config)
    group = t.models.optimizer.param_groups[0]
    assert group["eps"] == 1e-5 and group["weight_decay"] == 0.0
    norms = []
    t.models.optimizer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: norms.append(
            torch.nn.utils.get_total_norm(
                [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            ).item()
        )
    )
    t.train()
    lrs = [r["train/learning_rate"] for r in rows(config)]
    assert lrs == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    assert t.models.optimizer.param_groups[0]["lr"] == 0.0
    # no clipping by default: the optimizer sees the raw gradient norm
    raw = [e["loss/grad_norm"] for e in t.update_log]
    assert norms[-len(raw) :] == pytest.approx(raw, rel=1e-5)


def test_gradient_clipping_is_applied_when_asked(tmp_path, word_dirs):
    config = make_config(tmp_path, word_dirs, num_iterations=1, max_grad_norm=1e-3)
    t = trainer(config)
    norms = []
    t.models.optimizer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: norms.append(
            torch.nn.utils.get_total_norm(
                [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            ).item()
        )
    )
    t.train()
    raw = [e["loss/grad_norm"] for e in t.update_log]
    assert len(norms) == 4 and all(r > 1e-2 for r in raw)  # the gradients were well above the bound
    assert all(n == pytest.approx(1e-3, rel=1e-4) for n in norms)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change; reset it around a
    test that needs another (as accelerate's own tests do)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_fp16_overflow_is_skipped_by_the_grad_scaler_which_lowers_its_scale_and_the_norm_is_unscaled(
    tmp_path, word_dirs, fresh_accelerate_state
):
    from accelerate import Accelerator

    config = make_config(tmp_path, word_dirs, num_iterations=1, ppo_epochs=1)  # 2 minibatches: 2 steps
    acc = Accelerator(mixed_precision="fp16", cpu=True)  # after the config: TrainingArguments resets the state
    # accelerate gives fp16 a GradScaler on GPUs only (on CPU it runs fp32); torch's CPU GradScaler makes
    # the GPU code path run here: fp16 autocast, scaled loss, unscale, skip on overflow, scale update.
    # A scale of 2^60 overflows fp16 on the first step for sure; one backoff (×2^-50) leaves 1024.
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, backoff_factor=2.0**-50)
    acc.native_amp = True
    t = trainer(config, accelerator=acc)
    start = {n: p.detach().clone() for n, p in t.models.policy_and_value.named_parameters()}
    at_step = []

    def before_the_optimizer_step(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        unmoved = all(torch.equal(p, start[n]) for n, p in t.models.policy_and_value.named_parameters())
        at_step.append((torch.nn.utils.get_total_norm(grads).item(), acc.scaler.get_scale(), unmoved))

    t.models.optimizer.optimizer.register_step_pre_hook(before_the_optimizer_step)
    t.train()
    row = rows(config)[0]
    assert row["train/optimizer_steps"] == 1 and row["train/bad_steps"] == 0 and "train/skipped" not in row
    assert acc.scaler.get_scale() == 2.0**10  # the overflow lowered the scale
    first, second = t.update_log
    assert second["loss/grad_norm"] == pytest.approx(at_step[-1][0], rel=1e-6)  # the unscaled norm
    assert first["loss/fp16_overflow"] == 1.0 and not math.isfinite(first["loss/grad_norm"])
    assert first["loss/grad_scale"] == second["loss/grad_scale"] == 2.0**10 == acc.scaler.get_scale()
    # the overflowing step moved no weight (the fused AdamW is called and skips inside, a plain one is not
    # called), the second step is a real one: its logged norm is that of the unscaled gradients it used
    assert at_step[-1][1:] == (2.0**10, True) and len(at_step) in (1, 2)
    assert second["loss/fp16_overflow"] == 0.0
    assert not all(torch.equal(p, start[n]) for n, p in t.models.policy_and_value.named_parameters())
    assert {float(state["step"]) for state in t.models.optimizer.optimizer.state.values()} == {1.0}


def test_fp16_non_finite_loss_is_a_skipped_bad_step_that_still_updates_the_grad_scaler(
    tmp_path, word_dirs, fresh_accelerate_state
):
    from accelerate import Accelerator

    config = make_config(tmp_path, word_dirs, num_iterations=1, ppo_epochs=1)  # 2 minibatches: 2 steps
    acc = Accelerator(mixed_precision="fp16", cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, backoff_factor=0.5)  # see the test above
    acc.native_amp = True
    t = trainer(config, accelerator=acc)
    poisoned = []

    def nan_logits_in_the_first_update(module, args, output):
        if torch.is_grad_enabled() and not poisoned:  # the update's forward, not the rollout's
            poisoned.append(True)
            output.logits = output.logits * float("nan")
        return output

    t.models.policy_and_value.policy.register_forward_hook(nan_logits_in_the_first_update)
    t.train()
    row = rows(config)[0]
    first, second = t.update_log
    assert first["skipped"] == 1.0 and not math.isfinite(first["loss/total"])
    assert row["train/bad_steps"] == 1 and row["train/optimizer_steps"] == 1
    # the skipped step consumed the scaler's inf check (scaler.update(): one backoff); without it the
    # second step's unscale would raise "unscale_() has already been called ... since the last update()"
    assert second["loss/grad_scale"] == 2.0**9 == acc.scaler.get_scale()
    assert second["loss/fp16_overflow"] == 0.0 and math.isfinite(second["loss/grad_norm"])


def test_fp16_on_the_cpu_is_refused_rather_than_run_in_fp32(tmp_path, word_dirs, fresh_accelerate_state):
    with pytest.raises(ConfigError, match="--fp16: on the CPU accelerate applies neither fp16 autocast nor loss"):
        trainer(make_config(tmp_path, word_dirs, fp16=True, use_cpu=True))


# ---- metrics through accelerate's trackers ---------------------------------------------------------
def test_report_to_tensorboard_logs_every_scalar_at_its_iteration_through_accelerate(tmp_path, word_dirs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(tmp_path, word_dirs, num_iterations=2, report_to="tensorboard", project="demo")
    t = trainer(config)
    assert [type(x).__name__ for x in t.accelerator.log_with] == ["LoggerType"]
    t.train()
    logged = rows(config)  # metrics.jsonl is written as before
    # the run's folder (the hyperparameters go to a subfolder of their own)
    events = EventAccumulator(str(tmp_path / "run" / "runs" / "demo"))
    events.Reload()
    for name in ("reward/score", "kl/ref", "kl/coef", "loss/policy", "loss/value", "train/learning_rate"):
        scalars = events.Scalars(name)
        assert [e.step for e in scalars] == [1, 2], name
        assert [e.value for e in scalars] == pytest.approx([r[name] for r in logged], rel=1e-6, abs=1e-7), name
    assert "kl/band" not in events.Tags()["scalars"]  # a word, not a number: metrics.jsonl only


def test_report_to_any_accelerate_tracker_gets_every_scalar_and_the_hyperparameters(tmp_path, word_dirs):
    """mlflow, comet_ml, trackio... reach PPO through accelerate's tracker interface: a tracker registered
    with accelerate (the way a user adds their own) receives what tensorboard does."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, register_tracker_class

    calls = {"config": [], "log": []}

    class RecordingTracker(GeneralTracker):
        name = "recording"
        requires_logging_directory = False

        def __init__(self, run_name, **kwargs):
            super().__init__()
            self.run_name = run_name

        @property
        def tracker(self):
            return calls

        def store_init_configuration(self, values):
            calls["config"].append(dict(values))

        def log(self, values, step=None, **kwargs):
            calls["log"].append((step, dict(values)))

    register_tracker_class(RecordingTracker)
    try:
        config = make_config(tmp_path, word_dirs, num_iterations=2, report_to="recording", project="demo")
        trainer(config).train()
    finally:
        LOGGER_TYPE_TO_CLASS.pop("recording", None)
    logged = rows(config)
    assert [step for step, _ in calls["log"]] == [1, 2]
    for (_, values), row in zip(calls["log"], logged):
        for name in ("reward/score", "kl/ref", "kl/coef", "loss/policy", "train/learning_rate"):
            assert values[name] == pytest.approx(row[name], rel=1e-6, abs=1e-7), name
    (hyperparameters,) = calls["config"]
    assert hyperparameters["learning_rate"] == config.learning_rate
    assert hyperparameters["batch_size"] == config.batch_size == 8


def test_training_arguments_that_ppo_does_not_use_are_refused_and_hidden_from_help(tmp_path, word_dirs, capsys):
    from tether.cli import main

    with pytest.raises(ConfigError, match=r"--push_to_hub True: not used by `tether ppo`"):
        make_config(tmp_path, word_dirs, push_to_hub=True)
    with pytest.raises(ConfigError, match=r"--use_liger_kernel True, --eval_strategy steps: not used by `tether ppo`"):
        make_config(tmp_path, word_dirs, use_liger_kernel=True, eval_strategy="steps")
    with pytest.raises(ConfigError, match="--report_to neptune: accelerate has no tracker of that name"):
        make_config(tmp_path, word_dirs, report_to="neptune")
    with pytest.raises(ConfigError, match=r"--eval_dataset held.jsonl: not used by `tether ppo`"):
        make_config(tmp_path, word_dirs, eval_dataset="held.jsonl")  # PPO trains on prompts only
    assert make_config(tmp_path, word_dirs, push_to_hub=False, eval_steps=None).push_to_hub is False  # defaults
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    shown = capsys.readouterr().out
    hidden_flags = ("--push_to_hub", "--use_liger_kernel", "--eval_strategy", "--torch_compile", "--eval_dataset")

    def listed(flag):  # in the usage line or as an option with its metavar (other help texts may name it)
        return re.search(rf"(\[|^\s+){re.escape(flag)} \[?[A-Z_]+", shown, re.MULTILINE) is not None

    assert not any(listed(hidden) for hidden in hidden_flags)
    assert all(listed(kept) for kept in ("--learning_rate", "--report_to", "--run_name", "--bf16", "--save_steps"))
    assert main(["ppo", "--reward_model_path", "nowhere", "--eval_steps", "5"]) == 2
    assert "--eval_steps 5.0: not used by `tether ppo`" in capsys.readouterr().err


# ---- item 12 -------------------------------------------------------------------------------------
def test_approx_kl_early_stop_decides_before_the_step_that_would_go_past_the_bound(tmp_path, word_dirs):
    config = make_config(tmp_path, word_dirs, num_iterations=1, ppo_epochs=4, approx_kl_stop=1e-9)
    t = trainer(config)
    steps_taken = []
    t.models.optimizer.optimizer.register_step_post_hook(lambda opt, args, kwargs: steps_taken.append(1))
    t.train()
    # minibatch 1 has approx KL 0 (ratio 1) and steps; minibatch 2's forward sees the moved policy past
    # the bound, so its step is not taken and the epochs end
    log = t.update_log
    assert len(log) == 2 and "early_stop" not in log[0] and log[1]["early_stop"] == 1.0
    assert log[0]["policy/approx_kl"] <= 1e-12 < 1e-9 < log[1]["policy/approx_kl"]
    assert len(steps_taken) == 1
    adam_steps = {float(state["step"]) for state in t.models.optimizer.optimizer.state.values()}
    assert adam_steps == {1.0}  # every weight moved exactly once
    row = rows(config)[0]
    assert row["policy/early_stopped"] == 1.0 and row["train/early_stops"] == 1
    assert row["policy/minibatch_steps"] == 1.0 and row["train/optimizer_steps"] == 1
    assert row["policy/approx_kl"] == log[0]["policy/approx_kl"]  # means over the steps taken only
    off = trainer(make_config(tmp_path, word_dirs, name="off", num_iterations=1, ppo_epochs=4))
    off.train()
    assert len(off.update_log) == 8


# ---- item 13 -------------------------------------------------------------------------------------
def test_lora_reference_is_the_adapter_disabled_policy_and_equals_the_starting_policy(tmp_path, word_dirs, word_tok):
    from transformers import AutoModelForCausalLM

    from tether.generation import left_pad
    from tether.models.loading import load_causal_lm
    from tether.models.wrappers import adapters_disabled
    from tether.ppo.losses import logprobs_from_logits
    from tether.ppo.models import response_logits
    from tether.ppo.rollout import build_sequences

    config = make_config(
        tmp_path, word_dirs, use_peft=True, lora_r=4, lora_alpha=8, learning_rate=5e-2, num_iterations=2
    )
    t = trainer(config)
    assert t.models.reference is None  # no second copy of the network
    t.train()
    assert rows(config)[1]["kl/ref"] != 0.0  # the adapters moved the policy

    q, qm = left_pad([word_tok(p)["input_ids"] for p in PROMPTS[:3]], word_tok.pad_token_id)
    r = torch.tensor([[word_tok.convert_tokens_to_ids(w) for w in ("a", GOOD, "b", "<eos>")]] * 3)
    args = build_sequences(q, qm, r, torch.ones_like(r, dtype=torch.bool))
    base = load_causal_lm(str(word_dirs["policy"]))
    policy = t.models.policy_and_value.policy

    def logp(model):
        with torch.no_grad():
            return logprobs_from_logits(response_logits(model, *args, q.shape[1]), r, 0.7)

    with adapters_disabled(policy):
        reference = logp(policy)
    assert torch.allclose(reference, logp(base), atol=1e-6)
    assert not torch.allclose(logp(policy), reference, atol=1e-3)
    # outputs: a merged policy loadable by AutoModelForCausalLM, and the adapter alone
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "policy")
    assert torch.allclose(logp(merged), logp(policy), atol=1e-5)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


# ---- learning ------------------------------------------------------------------------------------
def test_policy_learns_a_known_reward_and_the_kl_term_tethers_it(tmp_path, word_dirs):
    """The counting RM scores the share of the word "good": PPO must raise it. Without the KL term and
    with a high learning rate, the same run moves much further from the reference."""
    prompts = ["a b c", "d e", "yes no", "x y z w", "good a", "m n o p q"]
    common = dict(
        reward_model_path=str(word_dirs["counting_rm"]),
        batch_size=16,
        mini_batch_size=8,
        ppo_epochs=2,
        max_new_tokens=8,
        temperature=1.0,
        missing_eos_penalty=None,
        num_iterations=15,
    )
    tethered = make_config(tmp_path, word_dirs, name="tethered", learning_rate=3e-3, init_kl_coef=0.05, **common)
    trainer(tethered, prompts).train()
    loose = make_config(
        tmp_path, word_dirs, name="loose", learning_rate=3e-2, init_kl_coef=0.0, stop_on_divergence=False, **common
    )
    trainer(loose, prompts).train()
    a, b = rows(tethered), rows(loose)
    score = [r["reward/score"] for r in a]
    kl_a, kl_b = [r["kl/ref"] for r in a], [r["kl/ref"] for r in b]
    assert sum(score[-3:]) / 3 > sum(score[:3]) / 3 + 1.0  # the mean reward rose clearly
    assert max(kl_a) < 10  # finite and moderate with β = 0.05
    assert max(kl_b) > 2.5 * max(kl_a) and max(kl_b) > 12


def test_divergence_stops_the_run_and_writes_no_policy(tmp_path, word_dirs):
    config = make_config(
        tmp_path,
        word_dirs,
        reward_model_path=str(word_dirs["counting_rm"]),
        learning_rate=0.1,
        init_kl_coef=0.0,
        temperature=1.0,
        max_new_tokens=12,
        missing_eos_penalty=None,
        num_iterations=6,
        save_steps=1,
        save_total_limit=5,
    )
    result = trainer(config).train()
    assert result.stopped_reason == "divergence" and result.iterations < 6
    last = rows(config)[-1]
    assert last["kl/band"] == "divergence" and last["kl/ref"] > 20
    assert result.policy_dir is None and not (tmp_path / "run" / "policy").exists()
    # the checkpoint written just before holds the divergent weights: it is not called good
    assert not (tmp_path / "run" / f"checkpoint-{result.iterations}").exists()
    assert (
        result.last_good_checkpoint is None
        or int(result.last_good_checkpoint.rsplit("-", 1)[1]) <= result.iterations - 2
    )
    summary = json.loads((tmp_path / "run" / "ppo_summary.json").read_text())
    assert summary["stopped_reason"] == "divergence"
    # a stopped run keeps its checkpoints: they are what the user resumes from
    assert len(complete_checkpoints(tmp_path / "run")) == result.iterations - 1


def test_checkpoints_are_deleted_after_the_final_save_unless_kept(tmp_path, word_dirs):
    for name, keep in (("dropped", False), ("kept", True)):
        config = make_config(tmp_path, word_dirs, name=name, num_iterations=2, save_steps=1, keep_checkpoints=keep)
        result = trainer(config).train()
        out = tmp_path / name
        assert (out / "policy" / "config.json").is_file() and (out / "value_model" / "config.json").is_file()
        expected = ["checkpoint-1", "checkpoint-2"] if keep else []
        assert [p.name for p in complete_checkpoints(out)] == expected
        assert result.last_checkpoint == (str(out / "checkpoint-2") if keep else None)


# ---- resume -------------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


def crash_in_iteration(n):
    """An extra-metrics hook that kills the run inside iteration ``n`` (after checkpoint n−1 is written)."""
    calls = []

    def hook(rollout):
        calls.append(1)
        if len(calls) == n:
            raise Interrupt
        return {}

    return hook


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(("time", "throughput"))}


@pytest.mark.parametrize("options", [{}, dict(use_peft=True, lora_r=4, lora_alpha=8)], ids=["full", "lora"])
def test_a_stopped_and_resumed_run_gives_the_same_metrics_as_an_uninterrupted_one(tmp_path, word_dirs, options):
    from tether.models.loading import load_causal_lm, load_scalar_model

    base = dict(
        num_iterations=4,
        save_steps=2,
        save_total_limit=1,
        keep_checkpoints=True,
        target_kl=1.0,
        init_kl_coef=0.2,
        reward_model_path=str(word_dirs["counting_rm"]),
        per_device_train_batch_size=2,
        **options,
    )
    whole = make_config(tmp_path, word_dirs, name="whole", **base)
    trainer(whole).train()

    parts = make_config(tmp_path, word_dirs, name="parts", **base)
    with pytest.raises(Interrupt):
        trainer(parts, extra_metrics=crash_in_iteration(3)).train()
    assert [c.name for c in sorted((tmp_path / "parts").glob("checkpoint-*"))] == ["checkpoint-2"]
    resumed = make_config(tmp_path, word_dirs, name="parts", resume_from_checkpoint="latest", **base)
    t = trainer(resumed)
    assert t.state.iteration == 2
    t.train()
    a, b = rows(whole), rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [_comparable(r) for r in b] == [_comparable(r) for r in a]
    # the same final weights, and only the newest checkpoint kept, with no temporary folders left
    w1 = load_causal_lm(str(tmp_path / "whole" / "policy")).state_dict()
    w2 = load_causal_lm(str(tmp_path / "parts" / "policy")).state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    v1 = load_scalar_model(str(tmp_path / "whole" / "value_model")).state_dict()
    v2 = load_scalar_model(str(tmp_path / "parts" / "value_model")).state_dict()
    assert v1.keys() == v2.keys() and all(torch.equal(v1[k], v2[k]) for k in v1)
    assert sorted(p.name for p in (tmp_path / "parts").iterdir() if "checkpoint" in p.name) == ["checkpoint-4"]


def test_only_complete_checkpoints_are_resumed_and_a_used_folder_needs_a_decision(tmp_path, word_dirs):
    from tether.ppo.checkpoint import resolve_checkpoint

    out = tmp_path / "run"
    trainer(
        make_config(tmp_path, word_dirs, num_iterations=2, save_steps=1, save_total_limit=5, keep_checkpoints=True)
    ).train()
    (out / ".tmp-checkpoint-3").mkdir()  # a crash while writing checkpoint 3
    (out / "checkpoint-4").mkdir()  # a folder without the state file written last
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert resolve_checkpoint(out, "latest").name == "checkpoint-2"
    with pytest.raises(ConfigError, match="not empty"):  # a fresh run would mix with the old one
        trainer(make_config(tmp_path, word_dirs, num_iterations=2))
    t = trainer(make_config(tmp_path, word_dirs, num_iterations=2, overwrite_output_dir=True))
    assert t.state.iteration == 0 and not any(out.iterdir())  # the earlier run's files are gone


def test_resume_latest_without_a_checkpoint_starts_fresh(tmp_path, word_dirs):
    config = make_config(tmp_path, word_dirs, num_iterations=1, resume_from_checkpoint="latest")
    t = trainer(config)
    assert t.state.iteration == 0
    with pytest.raises(ConfigError, match="not a complete tether ppo checkpoint"):
        trainer(make_config(tmp_path, word_dirs, resume_from_checkpoint=str(tmp_path / "nowhere")))


# ---- non-finite -----------------------------------------------------------------------------------
def test_non_finite_rewards_are_skipped_counted_logged_and_stop_the_run(tmp_path, word_dirs):
    from transformers import AutoModelForSequenceClassification

    from tether.errors import NonFiniteError

    good = make_config(tmp_path, word_dirs, num_iterations=4, save_steps=2, save_total_limit=3)
    with pytest.raises(Interrupt):
        trainer(good, extra_metrics=crash_in_iteration(3)).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    snapshot = {p.name: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}

    nan_rm = tmp_path / "nan-rm"
    shutil.copytree(word_dirs["rm"], nan_rm)
    model = AutoModelForSequenceClassification.from_pretrained(nan_rm)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(nan_rm)
    bad = make_config(
        tmp_path,
        word_dirs,
        num_iterations=4,
        save_steps=1,
        save_total_limit=3,
        max_bad_steps=2,
        reward_model_path=str(nan_rm),
        resume_from_checkpoint="latest",
    )
    with pytest.raises(NonFiniteError, match="2 consecutive steps with non-finite"):
        trainer(bad).train()
    logged = read_jsonl(tmp_path / "run" / "bad_batches.jsonl")
    assert [r["iteration"] for r in logged] == [3, 4] and len(logged[0]["responses"]) == 8
    assert all(isinstance(p, str) and p for p in logged[0]["prompts"])
    metrics = rows(bad)
    assert [r.get("train/skipped") for r in metrics[2:]] == [1.0, 1.0] and metrics[-1]["train/bad_steps"] == 2
    assert {p.name for p in (tmp_path / "run").glob("checkpoint-*")} == {"checkpoint-2"}
    assert snapshot == {p.name: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}  # intact
    summary = json.loads((tmp_path / "run" / "ppo_summary.json").read_text())
    assert summary["stopped_reason"] == "non_finite" and summary["last_good_checkpoint"].endswith("checkpoint-2")
    assert not (tmp_path / "run" / "policy").exists()


# ---- other options ---------------------------------------------------------------------------------
def test_value_warmup_trains_only_the_critic_first(tmp_path, word_dirs):
    config = make_config(tmp_path, word_dirs, value_warmup_steps=1, num_iterations=3)
    trainer(config).train()
    r = rows(config)
    assert [x["train/policy_updated"] for x in r] == [0.0, 1.0, 1.0]
    assert r[1]["kl/ref"] == 0.0 and r[2]["kl/ref"] != 0.0  # the policy did not move during warm-up
    assert r[0]["loss/value"] > 0


def test_value_warmup_advances_neither_the_kl_controller_nor_the_learning_rate_schedule(tmp_path, word_dirs):
    config = make_config(
        tmp_path, word_dirs, value_warmup_steps=2, num_iterations=4, target_kl=1.0, init_kl_coef=0.2, horizon=10000
    )
    t = trainer(config)
    t.train()
    r = rows(config)
    assert [x["train/policy_updated"] for x in r] == [0.0, 0.0, 1.0, 1.0]
    # the linear schedule spans the 2 policy iterations; the critic warms up at --learning_rate
    assert [x["train/learning_rate"] for x in r] == [1e-2, 1e-2, 1e-2, 0.5e-2]
    assert t.models.optimizer.param_groups[0]["lr"] == 0.0  # and still ends at zero

    def by_hand(beta, kl):  # β·(1 + clip(KL/target − 1, ±0.2)·n/horizon), n = 8 episodes
        return beta * (1 + min(max(kl / 1.0 - 1, -0.2), 0.2) * 8 / 10000)

    assert [x["kl/coef"] for x in r[:3]] == [0.2, 0.2, 0.2]
    assert [x["kl/coef_next"] for x in r[:2]] == [0.2, 0.2]
    assert r[2]["kl/ref"] == 0.0 and r[2]["kl/coef_next"] == by_hand(0.2, 0.0) == 0.2 * (1 - 0.2 * 8 / 10000)
    assert r[3]["kl/coef"] == r[2]["kl/coef_next"] and r[3]["kl/coef_next"] == by_hand(r[3]["kl/coef"], r[3]["kl/ref"])


def test_reward_normalisation_uses_the_stats_saved_with_the_reward_model(tmp_path, word_dirs):
    from tether.models.scoring import RewardStats, save_reward_stats

    rm = tmp_path / "rm-with-stats"
    shutil.copytree(word_dirs["rm"], rm)
    save_reward_stats(RewardStats(mean=0.3, std=0.5, count=256, source="test"), rm)
    config = make_config(tmp_path, word_dirs, reward_model_path=str(rm), missing_eos_penalty=None, num_iterations=1)
    trainer(config).train()
    row = rows(config)[0]
    assert row["reward/score"] == pytest.approx((row["reward/raw_score"] - 0.3) / 0.5, abs=1e-5)


def test_fixed_response_length_for_benchmarks_and_extra_metrics_hook(tmp_path, word_dirs):
    config = make_config(tmp_path, word_dirs, response_length=5, num_iterations=1)
    trainer(config, extra_metrics=lambda ro: {"reward/gold": float(ro.lengths.float().mean())}).train()
    row = rows(config)[0]
    assert row["response/length"] == 5.0 and row["response/stopped"] == 1.0 and row["reward/gold"] == 5.0


@pytest.mark.parametrize("estimator", ["abs", "mse", "k3", "full"])
def test_every_kl_estimator_runs_and_full_kl_is_reported_exactly(tmp_path, word_dirs, estimator):
    config = make_config(
        tmp_path, word_dirs, kl_penalty=estimator, num_iterations=2, batch_size=4, mini_batch_size=4, ppo_epochs=1
    )
    trainer(config).train()
    r = rows(config)
    assert r[0]["kl/ref"] == 0.0 and r[0]["reward/non_score"] == 0.0
    if estimator == "full":
        assert r[1]["kl/ref"] > 0  # the exact KL is never negative
    assert r[1]["reward/non_score"] != 0.0


def test_bad_configurations_fail_with_clear_errors(tmp_path, word_dirs, word_tok):
    with pytest.raises(ConfigError, match="mini_batch_size 3 must divide"):
        make_config(tmp_path, word_dirs, mini_batch_size=3)
    with pytest.raises(ConfigError, match="kl_penalty"):
        make_config(tmp_path, word_dirs, kl_penalty="kl2")
    with pytest.raises(ConfigError, match="per_device_train_batch_size 3 must divide"):
        trainer(make_config(tmp_path, word_dirs, per_device_train_batch_size=3))
    with pytest.raises(ConfigError, match="reward_model_path is required"):
        trainer(make_config(tmp_path, word_dirs, reward_model_path=None))
    with pytest.raises(ConfigError, match="not a reward model"):
        trainer(make_config(tmp_path, word_dirs, reward_model_path=str(word_dirs["policy"])))
    with pytest.raises(DataError, match=r"prompts\[1\]: the prompt renders to no tokens"):
        trainer(make_config(tmp_path, word_dirs), prompts=["a b", "   "])
    with pytest.raises(ConfigError, match="stop_token 'not-a-word' is not a single token"):
        trainer(make_config(tmp_path, word_dirs, stop_token="not-a-word", allow_biased_rollout=True))


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--stop_token", "no"], "--stop_token no: the reward model would score"),
        (["--top_k", "50"], "--top_k 50 / --top_p 1.0: PPO's ratio and KL assume pure sampling"),
        (["--top_p", "0.9"], "--top_k 0 / --top_p 0.9: PPO's ratio and KL assume pure sampling"),
    ],
)
def test_options_that_bias_the_reward_or_the_ratio_are_errors_unless_allowed(tmp_path, word_dirs, flags, named):
    import contextlib
    import io

    from tether.cli import main

    options = dict(zip((f.lstrip("-") for f in flags[::2]), flags[1::2]))
    options = {k: int(v) if k == "top_k" else float(v) if k == "top_p" else v for k, v in options.items()}
    with pytest.raises(ConfigError, match="--allow_biased_rollout true") as info:
        make_config(tmp_path, word_dirs, **options)
    assert named in str(info.value)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "a b"}) + "\n")
    command = ["ppo", "--model_name_or_path", "nowhere/no-model", "--reward_model_path", "nowhere/no-rm"]
    command += ["--dataset", str(data), "--output_dir", str(tmp_path / "cli"), *flags]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(command) == 2  # refused before any model loads: the model paths do not even exist
    assert named in stderr.getvalue() and not (tmp_path / "cli").exists()
    allowed = make_config(tmp_path, word_dirs, allow_biased_rollout=True, **options)
    assert (allowed.stop_token, allowed.top_k, allowed.top_p) == (
        options.get("stop_token"),
        options.get("top_k", 0),
        options.get("top_p", 1.0),
    )


def test_without_a_dataset_or_prompts_the_error_names_the_dataset_option(tmp_path, word_dirs):
    with pytest.raises(ConfigError, match="--dataset is required for `tether ppo`"):
        trainer(make_config(tmp_path, word_dirs), prompts=None)
    assert not (tmp_path / "run").exists()


# ---- the command ---------------------------------------------------------------------------------
def test_tether_ppo_command_writes_policy_value_model_metrics_and_checkpoints(tmp_path, word_dirs):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tether.cli import main

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "cli"
    code = main(
        [
            "ppo",
            "--model_name_or_path",
            str(word_dirs["policy"]),
            "--reward_model_path",
            str(word_dirs["rm"]),
            "--dataset",
            str(data),
            "--output_dir",
            str(out),
            "--batch_size",
            "4",
            "--mini_batch_size",
            "2",
            "--ppo_epochs",
            "1",
            "--max_new_tokens",
            "4",
            "--num_iterations",
            "3",
            "--save_steps",
            "1",
            "--save_total_limit",
            "2",
            "--target_kl",
            "5e-5",
            "--init_kl_coef",
            "0.2",
            "--disable_tqdm",
            "true",
            "--stop_token",
            "no",
            "--allow_biased_rollout",
            "true",
            "--keep_checkpoints",
            "true",
        ]
    )
    assert code == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3]
    for name in DESIGN_METRICS:
        assert all(name in r for r in metrics), name
    # the adaptive controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) from the logged
    # per-response KL of the rollout and the global batch n = 4, target 5e-5, horizon 10000. The target
    # sits near iteration 2's KL (5.5e-5 at this learning rate), so that step's error is not clipped and
    # the controller's input is checked: a per-token KL (4 tokens) or another batch count would differ.
    assert abs(metrics[1]["kl/ref"] / 5e-5 - 1) < 0.2
    beta = 0.2
    for row in metrics:
        assert row["kl/coef"] == beta
        beta = beta * (1 + min(max(row["kl/ref"] / 5e-5 - 1, -0.2), 0.2) * 4 / 10000)
        assert row["kl/coef_next"] == pytest.approx(beta, rel=1e-15)
    assert metrics[1]["kl/coef"] == 0.2 * (1 - 0.2 * 4 / 10000)  # iteration 1: KL 0, error −0.2
    AutoModelForCausalLM.from_pretrained(out / "policy")
    AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-3"]
    ckpt = out / "checkpoint-3"
    for name in (
        "policy/config.json",
        "value_model/config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pth",
        "trainer_state.json",
    ):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["state"]["iteration"] == 3 and state["kl_controller"]["kind"] == "adaptive"
    assert state["state"]["data_position"] == 4 and state["state"]["data_epoch"] == 1
    assert json.loads((out / "ppo_summary.json").read_text())["stopped_reason"] == "completed"


@pytest.mark.slow
def test_one_iteration_on_the_embedded_smollm2_with_lora(tmp_path, embedded_model_dir, tiny_rm_dir):
    """The real default model: chat template, pad == stop token, tied embeddings; LoRA reference."""
    from tether.ppo import PPOConfig, PPOTrainer

    config = PPOConfig(
        output_dir=str(tmp_path / "smol"),
        model_name_or_path=str(embedded_model_dir),
        reward_model_path=str(tiny_rm_dir),
        use_peft=True,
        lora_r=4,
        value_head_on_policy=True,
        batch_size=2,
        mini_batch_size=2,
        ppo_epochs=2,
        max_new_tokens=8,
        learning_rate=1e-4,
        num_iterations=1,
        save_steps=0,
        disable_tqdm=True,
        logging_steps=1000,
        report_to="none",
    )
    t = PPOTrainer(config, ["What is the capital of France?", "Name a colour."])
    result = t.train()
    row = rows(config)[0]
    assert row["kl/ref"] == 0.0 and t.update_log[0]["policy/ratio_max_dev"] <= 1e-6
    assert t.update_log[1]["policy/approx_kl"] > 0
    assert result.stopped_reason == "completed" and (tmp_path / "smol" / "policy" / "config.json").is_file()
