"""Reductions over processes and the per-iteration metrics of ``tether ppo`` (metrics.jsonl, the
progress bar and the log line)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from tether.ppo.advantages import masked_moments
from tether.ppo.losses import explained_variance
from tether.ppo.rewards import component_metrics
from tether.ppo.rollout import Rollout

logger = logging.getLogger("tether.ppo.trainer")  # the progress line is the loop's output: logged under its name


class Processes:
    """Sums, maxima and means over all processes of a run (identities on one process)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world = accelerator.num_processes

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over processes (identity on one process)."""
        if self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="sum")

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Max over processes (identity on one process)."""
        if self.world == 1:
            return tensor
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def mean(self, values: torch.Tensor) -> float:
        """Mean of a per-episode (or per-item) tensor over all processes."""
        sums = self.sum(torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)]))
        return (sums[0] / sums[1].clamp(min=1)).item()

    def token_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        mean, _ = masked_moments(values.float(), mask, self.sum)
        return mean.item()

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every process."""
        bad = torch.tensor(0.0 if flag else 1.0, device=self.accelerator.device)
        return bool(self.sum(bad).item() == 0)


def iteration_metrics(
    batch: Rollout,
    beta: float,
    kl_ref: float,
    kl_coef_next: float,
    update: dict,
    state,
    skipped: bool,
    processes: Processes,
    kl_in_reward: bool = True,
) -> dict[str, Any]:
    """Rollout and update statistics (and ``state``'s counters), reduced over all processes.

    With ``--reward_funcs``: ``reward/<component>/mean`` and ``/none`` per component, ``reward/none``
    (responses without any reward); ``reward/score`` is then the combined reward over the others.
    """
    mask = batch.response_mask
    beta_in_reward = beta if kl_in_reward else 0.0  # --kl_in_loss: the KL is a loss term (loss/kl)
    non_score = torch.where(mask, -beta_in_reward * batch.kl_penalty, torch.zeros_like(batch.kl_penalty)).sum(1)
    scores = batch.scores if batch.valid is None else batch.scores[batch.valid]
    m: dict[str, Any] = {
        "reward/score": processes.mean(scores),
        "reward/raw_score": processes.mean(batch.raw_scores),
        "reward/non_score": processes.mean(non_score),
        "reward/total": processes.mean(batch.scores + non_score),
        "kl/ref": kl_ref,
        "kl/coef": beta,
        "kl/coef_next": kl_coef_next,
        "response/length": processes.mean(batch.lengths.float()),
        "response/stopped": processes.mean(batch.stopped.float()),
    }
    if "reward_components" in batch.extras:  # sums and counts over every process, then one division
        names, sums = batch.extras["reward_components"]
        m.update(component_metrics(names, processes.sum(sums)))
        m["reward/none"] = processes.sum((~batch.valid).sum().float()).item()
    if not skipped and batch.values is not None:
        m["value/explained_var"] = explained_variance(batch.values, batch.returns, mask, processes.sum).item()
    m.update(update)
    m.update(
        {
            "train/optimizer_steps": state.optimizer_steps,
            "train/bad_steps": state.bad_steps_total,
            "train/early_stops": state.early_stops,
        }
    )
    if skipped:
        m["train/skipped"] = 1.0
    if processes.accelerator.device.type == "cuda":
        m["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return m


def reduce_extra(extra: dict, processes: Processes) -> dict:
    """Numbers from the extra-metrics hook are averaged over processes; other values pass through."""
    device = processes.accelerator.device
    return {
        k: processes.mean(torch.tensor([float(v)], device=device))
        if isinstance(v, (int, float)) and not isinstance(v, bool)
        else v
        for k, v in extra.items()
    }


class Progress:
    """The progress bar (main process, unless --disable_tqdm) and a log line every ``log_every`` iterations."""

    def __init__(self, accelerator, total: int, initial: int, disable: bool, log_every: int):
        self.main = accelerator.is_main_process
        self.total, self.log_every = total, log_every
        self.bar = None
        if self.main and not disable:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="ppo", unit="it", dynamic_ncols=True)

    def show(self, iteration: int, metrics: dict) -> None:
        short = {
            "score": metrics["reward/score"],
            "kl": metrics["kl/ref"],
            "β": metrics["kl/coef"],
            "band": metrics["kl/band"],
            "ep/s": metrics["throughput/episodes_per_s"],
        }
        if self.bar is not None:
            postfix = {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in short.items()}
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        if self.log_every and iteration % self.log_every == 0 and self.main:
            logger.info(
                "tether ppo: iteration %d/%d %s",
                iteration,
                self.total,
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in short.items()),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
