"""`tether ppo`: the four-model RLHF loop (policy, frozen reference, frozen reward model, value model).

``PPOTrainer.train`` (the loop) and ``PPOTrainer.learn`` (one update from one rollout) read like the
method's pseudo-code; each equation lives in a small pure function of ``tether.ppo.losses`` /
``advantages`` / ``kl_control``, experience making in ``tether.ppo.rollout``, the networks in
``tether.ppo.models`` and the output folder in ``tether.ppo.checkpoint``::

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

Critic-free (``--advantage_estimator rloo|grpo|reinforce_pp``): the same loop without a value model;
``--num_generations`` responses per prompt, ``--kl_in_loss`` moves β·k3 from the rewards into the loss,
``--reward_funcs`` add programmable rewards to (or replace) the reward model's score.

Everything runs through ``accelerate``: one process on CPU, data parallel under
``accelerate launch`` (each rank samples its share of the batch with its own seed; whitening, the
controlled KL, token counts of the loss and every metric are reduced over all ranks).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tether.data.templates import pad_token_id
from tether.errors import NonFiniteError
from tether.generation import left_pad
from tether.memory import run_fitting_memory
from tether.ppo import checkpoint
from tether.ppo.advantages import critic_free_advantages, gae_advantages, whiten
from tether.ppo.config import PPOConfig, PPOResult, PPOState, batch_geometry, count_iterations, every
from tether.ppo.kl_control import make_kl_controller
from tether.ppo.losses import (
    entropy_from_logits,
    kl_loss_term,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
)
from tether.ppo.metrics import Processes, Progress, iteration_metrics, reduce_extra
from tether.ppo.models import (
    build_ppo_models,
    check_distributed_setup,
    clip_grad_norm,
    make_accelerator,
    total_grad_norm,
)
from tether.ppo.monitor import KLMonitor
from tether.ppo.reward_scale import set_reward_normalisation
from tether.ppo.rewards import ProgrammableRewards, RewardFunctionError
from tether.ppo.rollout import (
    PromptSampler,
    Rollout,
    RolloutSettings,
    add_programmable_rewards,
    make_rollout,
    synchronize,
)
from tether.tracking import MetricsWriter

logger = logging.getLogger(__name__)


class PPOTrainer:
    """PPO for RLHF. ``PPOTrainer(config, prompts).train()``; models load from the config's paths, or
    come as objects: ``model`` (the policy, trained in place; the reference is a copy), ``reward_model``
    (a one-label sequence-classification model; the critic starts as a copy), ``tokenizer`` (default:
    the one in the folder ``model`` was loaded from).

    ``prompts``: strings, chat-message tuples, ``PromptRecord``s or a ``datasets.Dataset`` with a
    prompt column, checked as a file is (default: ``--dataset``).
    ``extra_metrics(rollout) -> dict`` adds metrics every iteration (e.g. ``reward/gold``). Pieces
    usable on their own: ``collect_rollout()``, ``learn(batch)`` (one PPO update, returns the
    metrics), ``save_checkpoint()``; ``update_log`` holds the per-minibatch statistics of the last update.
    """

    def __init__(
        self,
        config: PPOConfig,
        prompts: Sequence | None = None,
        *,
        extra_metrics: Callable[[Rollout], dict] | None = None,
        accelerator=None,
        tokenizer=None,
        model=None,
        reward_model=None,
    ):
        from transformers import enable_full_determinism, set_seed

        from tether.models.loading import load_tokenizer
        from tether.stages.common import require_joint_processes

        self.config = cfg = config
        self.extra_metrics = extra_metrics
        self.accelerator = acc = accelerator if accelerator is not None else make_accelerator(cfg)
        require_joint_processes(acc.num_processes)  # CPU-only machine launched without --use_cpu true
        check_distributed_setup(cfg, acc)  # on every process, before any collective
        self.world, self.rank = acc.num_processes, acc.process_index
        self.processes = Processes(acc)
        self.output_dir = Path(cfg.output_dir)
        if cfg.full_determinism:
            enable_full_determinism(cfg.seed)
        set_seed(cfg.seed + 100003 * self.rank)  # each rank samples different responses (OpenAI's seed + rank·100003)
        self.geometry = batch_geometry(cfg, self.world)

        source = cfg.model_name_or_path if model is None else model.name_or_path  # a passed model's folder
        self.tokenizer = tokenizer or load_tokenizer(source, trust_remote_code=cfg.trust_remote_code)
        self.prompts = PromptSampler(cfg, self.tokenizer, prompts)
        self.rewards = ProgrammableRewards(cfg)
        self.rollout_settings = RolloutSettings.from_config(cfg, self.tokenizer, self.geometry.local_batch, self._say)
        if self.geometry.local_mini % self.rollout_settings.group_size:  # minibatches must hold whole groups
            self._say(
                f"the per-process minibatch of {self.geometry.local_mini} responses is not whole groups of "
                f"--num_generations {cfg.num_generations}: scoring and training them as separate rows"
            )
            self.rollout_settings.group_size = 1
        self.resume_dir = checkpoint.resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
        if cfg.resume_from_checkpoint == "latest" and self.resume_dir is None and acc.is_main_process:
            logger.info("tether ppo: no checkpoint in %s yet; starting from the beginning", cfg.output_dir)
        self.num_iterations = count_iterations(cfg, len(self.prompts))
        self.folder = checkpoint.RunFolder(cfg, acc, self.tokenizer)
        self.folder.prepare(self.resume_dir)

        self.models = build_ppo_models(
            cfg,
            acc,
            self.tokenizer,
            self.num_iterations,
            self.resume_dir,
            self._say,
            model=model,
            reward_model=reward_model,
        )
        self.reward_normalisation = set_reward_normalisation(
            cfg, acc, self.models, self.tokenizer, self.prompts, self.rollout_settings, self.resume_dir, self._say
        )
        self.kl_ctl = make_kl_controller(cfg.init_kl_coef, cfg.target_kl, cfg.horizon)
        self.monitor = KLMonitor(cfg.stop_on_divergence, say=self._say, temperature=cfg.temperature)
        self.state = PPOState()
        self.shuffle_rng = torch.Generator().manual_seed(cfg.seed + 100003 * self.rank + 1)
        self.update_log: list[dict] = []  # per-minibatch statistics of the last iteration (tests, debugging)
        if self.resume_dir is not None:
            self._resume(self.resume_dir)

    def _say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            logger.warning("tether ppo: %s", message)

    # ---- the loop -----------------------------------------------------------------------------
    def train(self) -> PPOResult:
        cfg, acc, st = self.config, self.accelerator, self.state
        writer = metrics_writer(cfg, acc)
        log_every = every(cfg.logging_steps, self.num_iterations)
        progress = Progress(acc, self.num_iterations, st.iteration, cfg.disable_tqdm, log_every)
        stopped_reason, metrics = "completed", {}
        try:
            while st.iteration < self.num_iterations:
                started = time.perf_counter()

                # 1-2. rollout and scoring: sample, then one no-grad pass of each model
                batch = self.collect_rollout()

                # 3-6. rewards, advantages, PPO epochs, KL control (see `learn`)
                metrics = self.learn(batch)
                st.iteration += 1
                st.episodes += cfg.batch_size
                generated_tokens = int(self.processes.sum(batch.lengths.sum()).item())
                st.tokens_generated += generated_tokens

                # 7. metrics
                elapsed = time.perf_counter() - started
                metrics.update(
                    {
                        "time/generate": batch.time_generate,
                        "time/score": batch.time_score,
                        "time/total": elapsed,
                        "throughput/episodes_per_s": cfg.batch_size / elapsed,
                        "throughput/tokens_per_s": generated_tokens / elapsed,
                        "train/episodes": st.episodes,
                    }
                )
                if self.extra_metrics is not None:
                    metrics.update(reduce_extra(self.extra_metrics(batch) or {}, self.processes))
                # 8. KL health
                report = self.monitor.update(metrics["kl/ref"], iteration=st.iteration)
                metrics["kl/band"] = report.band.name
                writer.log(st.iteration, metrics)
                progress.show(st.iteration, metrics)

                if st.bad_steps_in_a_row >= cfg.max_bad_steps:
                    stopped_reason = "non_finite"
                    break
                if report.should_stop:
                    stopped_reason = "divergence"
                    break
                # 9. checkpoint (never of a step that was skipped)
                save_every = every(cfg.save_steps, self.num_iterations)
                if save_every and st.iteration % save_every == 0 and not metrics.get("train/skipped"):
                    self.save_checkpoint()
        except RewardFunctionError as exc:  # before this iteration's update: the checkpoints are intact
            raise checkpoint.reward_function_failed(exc, st.iteration + 1, self.output_dir) from exc
        finally:
            progress.close()
            writer.close()
        return self._finish(stopped_reason, metrics)

    def collect_rollout(self) -> Rollout:
        """Responses to this process's share of the next prompts, scored by every model once."""
        acc, settings = self.accelerator, self.rollout_settings
        prompts, token_ids, columns = self.prompts.next_batch(self.state, self.rank, self.geometry.local_batch)
        query_ids, query_mask = (t.to(acc.device) for t in left_pad(token_ids, pad_token_id(self.tokenizer)))
        batch = make_rollout(
            self.models,
            self.tokenizer,
            query_ids,
            query_mask,
            settings,
            autocast=acc.autocast,
            prompts=prompts,
            agree=self.processes.all_true,
            say=self._say,
        )
        # chunk sizes that fitted in memory (smaller than asked after an out-of-memory error) stay
        settings.generation_batch_size = batch.generation_batch_size
        settings.forward_batch_size = batch.forward_batch_size
        if self.rewards.needed:  # --reward_funcs / --reward_weights: the score becomes their combination
            add_programmable_rewards(batch, self.rewards, self.tokenizer, columns, self.processes.all_true)
        return batch

    def learn(self, batch: Rollout) -> dict[str, Any]:
        """One PPO update from one rollout batch (this process's share); returns the iteration's metrics."""
        cfg, st = self.config, self.state
        beta = self.kl_ctl.value
        train_policy = st.iteration >= cfg.value_warmup_steps  # only the critic trains during warm-up
        # constant within the iteration; the schedule belongs to the policy's iterations: during the
        # critic's warm-up it waits, and the critic trains at --learning_rate
        learning_rate = self.models.scheduler.get_last_lr()[0] if train_policy else cfg.learning_rate
        for group in self.models.optimizer.param_groups:
            group["lr"] = learning_rate

        # 3-4. token rewards, advantages and returns (set on the batch)
        self.estimate_advantages(batch, beta)

        # 5. PPO epochs over shuffled minibatches; a batch with non-finite rewards is skipped, counted and logged
        finite = self.processes.all_true(batch.all_finite())
        update_started = time.perf_counter()
        if finite:
            stats = self.ppo_epochs(batch, train_policy)
        else:
            self._record_bad_step(batch, "non-finite score, reward, log-prob or value")
            stats = {}
        synchronize(self.accelerator.device)
        time_update = time.perf_counter() - update_started

        # 6. KL control from the rollout KL (per-response sum, before the update); the learning rate
        #    schedule advances once per iteration. Warm-up iterations move neither: the policy did not train.
        kl_ref = self.processes.mean(batch.kl.sum(1))
        if finite and train_policy:
            self.kl_ctl.update(kl_ref, cfg.batch_size)
        if train_policy:
            self.models.scheduler.step()

        args = (beta, kl_ref, self.kl_ctl.value, stats, st, not finite, self.processes)
        metrics = iteration_metrics(batch, *args, kl_in_reward=not cfg.kl_in_loss)
        metrics.update(
            {
                "time/update": time_update,
                "train/learning_rate": learning_rate,
                "train/policy_updated": float(train_policy and finite),
            }
        )
        return metrics

    def estimate_advantages(self, batch: Rollout, beta: float) -> None:
        """``batch.rewards``: r_t = −β·KL_t, plus the score at the stop token (β = 0 with --kl_in_loss;
        whitened with --whiten_rewards); ``batch.advantages`` and ``batch.returns`` by GAE over the
        response tokens (returns before whitening), the advantages then whitened over the real tokens
        of all processes. Critic-free estimators: ``critic_free_advantages``, no returns."""
        cfg, mask = self.config, batch.response_mask
        rewards = token_rewards(batch.kl_penalty, batch.scores, mask, 0.0 if cfg.kl_in_loss else beta)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False, all_reduce=self.processes.sum)
        if cfg.critic_free:
            batch.rewards, batch.returns = rewards, None
            estimator, k, scale = cfg.advantage_estimator, cfg.num_generations, cfg.scale_rewards
            batch.advantages = critic_free_advantages(
                estimator, rewards, mask, k, batch.valid, scale, self.processes.sum
            )
            return
        advantages, returns = gae_advantages(rewards, batch.values, mask, cfg.gamma, cfg.lam)
        batch.rewards, batch.returns = rewards, returns
        batch.advantages = whiten(advantages, mask, all_reduce=self.processes.sum)

    # ---- one batch's update ------------------------------------------------------------------
    def ppo_epochs(self, batch: Rollout, train_policy: bool) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches; the batch's old log-probs and values stay fixed."""
        cfg, mini = self.config, self.geometry.local_mini
        n = len(batch)
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        early_stopped = False
        self.update_log = []
        for epoch in range(cfg.ppo_epochs):
            k = batch.group_size  # grouped rows: shuffle whole groups, each kept in order
            order = torch.randperm(n // k, generator=self.shuffle_rng)
            order = (order.unsqueeze(1) * k + torch.arange(k)).flatten() if k > 1 else order
            order = order.to(batch.input_ids.device)
            for first in range(0, n, mini):
                minibatch = order[first : first + mini]
                stats = self.update(batch, minibatch, train_policy)
                self.update_log.append({"epoch": epoch, "rows": minibatch.tolist(), **stats})
                if stats.get("early_stop"):  # this minibatch's step was not taken: it counts in no mean
                    early_stopped = True
                    break
                for key, value in stats.items():
                    sums[key] += value
                steps += 1
            if early_stopped:
                break
        if early_stopped:
            self.state.early_stops += 1
        out = {k: v / max(steps, 1) for k, v in sums.items() if k not in ("policy/ratio_max_dev", "skipped")}
        out["policy/ratio_max_dev"] = max((s["policy/ratio_max_dev"] for s in self.update_log), default=0.0)
        out["policy/early_stopped"] = float(early_stopped)
        out["policy/minibatch_steps"] = float(steps)
        return out

    def update(self, batch: Rollout, minibatch: torch.Tensor, train_policy: bool) -> dict[str, float]:
        """One optimizer step on the rows ``minibatch`` of ``batch``; returns its statistics."""
        # the loss is a token mean over the whole (global) minibatch, so micro-batches and
        # processes add up to exactly the same gradient as one big batch
        denominator = self.processes.sum(batch.response_mask[minibatch].sum().float()) / self.world
        # micro-batches start at the whole minibatch (or the size asked for) and halve after an
        # out-of-memory error; the gradient is the same sum whichever way the rows are split
        stats, self.geometry.micro = run_fitting_memory(
            lambda micro: self._step(batch, minibatch, denominator, train_policy, micro),
            self.geometry.micro,
            "the PPO update (--per_device_train_batch_size)",
        )
        return stats

    def _step(self, batch: Rollout, minibatch, denominator, train_policy: bool, micro: int) -> dict[str, float]:
        cfg, acc, models = self.config, self.accelerator, self.models
        totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=acc.device))
        ratio_dev = torch.zeros((), device=acc.device)
        models.optimizer.zero_grad(set_to_none=True)  # a retry after an out-of-memory error starts clean
        micro = max(batch.group_size, micro // batch.group_size * batch.group_size)  # whole groups
        micro_batches = [minibatch[i : i + micro] for i in range(0, len(minibatch), micro)]
        for k, idx in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else acc.no_sync(models.trained)
            mask = batch.response_mask[idx]
            with sync:
                with acc.autocast(), contextlib.nullcontext() if train_policy else models.policy_frozen():
                    logits, values = models.trained(
                        **batch.forward_inputs(idx), detach_trunk_for_values=not train_policy
                    )
                logp = logprobs_from_logits(logits, batch.responses[idx], cfg.temperature)
                pg = policy_loss(logp, batch.logprobs[idx], batch.advantages[idx], mask, cfg.cliprange, denominator)
                vf = None  # critic-free: no value model, the policy loss alone
                if values is not None:
                    vf = value_loss(
                        values, batch.values[idx], batch.returns[idx], mask, cfg.cliprange_value, denominator
                    )
                with torch.set_grad_enabled(cfg.entropy_coef > 0 and train_policy):
                    entropy = masked_mean(entropy_from_logits(logits, cfg.temperature), mask, denominator)
                if vf is None:
                    loss = pg.loss - cfg.entropy_coef * entropy
                else:
                    loss = cfg.vf_coef * vf.loss
                    if train_policy:
                        loss = loss + pg.loss - cfg.entropy_coef * entropy
                if cfg.kl_in_loss:  # β·k3 to the reference in the loss (GRPO) instead of in the rewards
                    kl = kl_loss_term(logp, batch.ref_logprobs[idx], mask, self.kl_ctl.value, "k3", denominator)
                    loss = loss + kl
                    totals["loss/kl"] += kl.detach()
                acc.backward(loss)
            totals["loss/total"] += loss.detach()
            totals["loss/policy"] += pg.loss.detach()
            if vf is not None:
                totals["loss/value"] += vf.loss.detach()
                totals["value/clipfrac"] += vf.clipfrac
            totals["policy/approx_kl"] += pg.approx_kl
            totals["policy/clipfrac"] += pg.clipfrac
            totals["policy/entropy"] += entropy.detach()
            ratio_dev = torch.maximum(ratio_dev, pg.ratio_max_abs_dev)
            del logits, values, logp
        # every statistic used the global token count, so the rank sum of per-rank sums is the global mean
        keys = sorted(totals)
        reduced = self.processes.sum(torch.stack([totals[k] for k in keys])) / self.world
        stats = {k: v.item() for k, v in zip(keys, reduced)}
        stats["policy/ratio_max_dev"] = self.processes.max(ratio_dev).item()
        if cfg.approx_kl_stop is not None and train_policy and approx_kl_stop(stats, cfg.approx_kl_stop):
            # the policy is already past the bound: stop before this step (Spinning Up's PPO checks
            # before each step too; the forward that measured it is the step's own)
            models.optimizer.zero_grad(set_to_none=True)
            stats["early_stop"] = 1.0
            return stats

        # fp16: accelerate's GradScaler scaled the loss. Gradients are unscaled before their norm is read
        # (and clipped); an overflow (non-finite gradients from a finite loss) is the scaler's to handle:
        # optimizer.step() skips the update and lowers the scale, which then stops overflowing.
        scaler = acc.scaler
        norm = None  # the norm before clipping, from accelerate (which unscales first)
        if cfg.max_grad_norm is not None:
            norm = clip_grad_norm(acc, models.trained_parameters, cfg.max_grad_norm)
        if norm is None:
            if cfg.max_grad_norm is None:
                acc.unscale_gradients()  # nothing to do unless fp16
            norm = total_grad_norm(models.trained_parameters)
        grad_norm = float(norm)
        stats["loss/grad_norm"] = grad_norm
        overflow = scaler is not None and not math.isfinite(grad_norm)
        if not (math.isfinite(stats["loss/total"]) and (math.isfinite(grad_norm) or overflow)):
            models.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # the unscale above recorded this step's inf check: it must be consumed
            reason = f"non-finite loss {stats['loss/total']} or gradient norm {grad_norm}"
            self._record_bad_step(batch.select(minibatch.cpu()), reason)
            stats["skipped"] = 1.0
            return stats
        models.optimizer.step()  # under fp16 the scaler skips it on overflow and updates its scale
        models.optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            stats["loss/grad_scale"] = scaler.get_scale()  # the scale of the next step
            stats["loss/fp16_overflow"] = float(overflow)
        if overflow:
            return stats
        self.state.optimizer_steps += 1
        self.state.bad_steps_in_a_row = 0
        return stats

    def _record_bad_step(self, batch: Rollout, reason: str) -> None:
        self.state.bad_steps_in_a_row += 1
        self.state.bad_steps_total += 1
        self.folder.log_bad_batch(self.state, reason, batch, self._say)

    # ---- checkpoints and the end of a run -------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """``checkpoint-<iteration>``, atomically (``tether.ppo.checkpoint.save_checkpoint``)."""
        training_state = {
            "state": asdict(self.state),
            "kl_controller": self.kl_ctl.state_dict(),
            "monitor": self.monitor.state_dict(),
            "num_iterations": self.num_iterations,
        }
        return self.folder.save_checkpoint(self.state.iteration, self.models, training_state, self.shuffle_rng)

    def _resume(self, folder: Path) -> None:
        data = self.folder.load_checkpoint(folder, self.models, self.shuffle_rng, self._say)
        self.state = PPOState(**data["state"])
        self.kl_ctl.load_state_dict(data["kl_controller"])
        self.monitor.load_state_dict(data.get("monitor", {}))
        if self.accelerator.is_main_process:
            logger.info("tether ppo: resumed from %s at iteration %d", folder, self.state.iteration)

    def _finish(self, stopped_reason: str, metrics: dict) -> PPOResult:
        st, cfg = self.state, self.config
        final = self.folder.save_final(self.models) if stopped_reason == "completed" else None
        extra = {
            "kl_controller": self.kl_ctl.state_dict(),
            "temperature": cfg.temperature,
            "reward_normalisation": self.reward_normalisation,
        }
        result = self.folder.result(stopped_reason, st, metrics, final, extra)
        if stopped_reason == "divergence":
            self._say(
                f"stopped at iteration {st.iteration}: KL {metrics.get('kl/ref', float('nan')):.2f} nats is in "
                f"the divergence band; no final policy written; last good checkpoint: {result.last_good_checkpoint}"
            )
        if stopped_reason == "non_finite":
            message = (
                f"tether ppo: stopped at iteration {st.iteration} after {st.bad_steps_in_a_row} consecutive "
                f"steps with non-finite rewards or losses (--max_bad_steps {cfg.max_bad_steps}); the "
                f"batches are in {self.output_dir / checkpoint.BAD_BATCHES_FILE}; last good checkpoint: "
                f"{result.last_good_checkpoint}"
            )
            logger.error(message)
            raise NonFiniteError(message)
        return result


def metrics_writer(cfg: PPOConfig, accelerator) -> MetricsWriter:
    """metrics.jsonl, and the --report_to trackers of ``accelerator`` (``make_accelerator``) under the
    project --project and the run name --run_name."""
    names = {"wandb": "name", "trackio": "name", "mlflow": "run_name"}  # each tracker's keyword for it
    init_kwargs = {tracker: {key: cfg.run_name} for tracker, key in names.items()} if cfg.run_name else {}
    return MetricsWriter(cfg.output_dir, accelerator, cfg.project, cfg.to_dict(), init_kwargs)


def approx_kl_stop(stats: dict[str, float], bound: float) -> bool:
    """Early stop: the minibatch's approx KL ½·mean((log π_θ − log π_old)²), from the forward of the
    step about to be taken (the policy as it is now, before that step), exceeds --approx_kl_stop."""
    return stats["policy/approx_kl"] > bound


def run_ppo(
    config: PPOConfig,
    prompts: Sequence | None = None,
    extra_metrics: Callable[[Rollout], dict] | None = None,
    *,
    model=None,
    reward_model=None,
    tokenizer=None,
) -> PPOResult:
    """The ``tether ppo`` command: train, write policy/, value_model/, metrics.jsonl and ppo_summary.json.

    ``prompts`` default to ``--dataset`` (a ``datasets.Dataset`` is accepted); ``extra_metrics(rollout)
    -> dict`` adds metrics every iteration; ``model``, ``reward_model``, ``tokenizer``: already-loaded
    objects instead of the config's paths (see ``PPOTrainer``).
    """
    trainer = PPOTrainer(
        config, prompts, extra_metrics=extra_metrics, model=model, reward_model=reward_model, tokenizer=tokenizer
    )
    return trainer.train()
