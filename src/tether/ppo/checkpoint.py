"""What ``tether ppo`` writes into its output folder, on the shared durable layer (``tether.durable``).

* ``checkpoint-N/`` (N = completed iterations): policy/ and value_model/ (or value_head/) and the
  optimizer (under FSDP instead ``pytorch_model_fsdp_0/`` and ``optimizer_0/``, accelerate's sharded
  checkpoint of the trained networks and their optimizer, one shard per process), the scheduler,
  each process's random-number state, ppo_config.json and, written last,
  ``trainer_state.json`` (the PPO counters, KL controller and monitor). The folder is built as
  ``.tmp-checkpoint-N/`` and renamed into place, so a ``checkpoint-N`` is always complete; the same
  folder and state-file names as the Trainer-based stages, so one listing rule serves all.
* the final ``policy/``, ``value_model/`` (or ``value_head/``) and, with LoRA, ``adapter/``;
* ``ppo_summary.json`` (the result), ``bad_batches.jsonl`` (skipped batches); ``metrics.jsonl`` is
  the tracker's (``tether.tracking``).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether.config import ConfigError
from tether.data.templates import prompt_text
from tether.durable import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE_FILE,
    complete_checkpoints,
    latest_checkpoint,
    remove_checkpoints,
    replace_folder,
    rotate_checkpoints,
    truncate_metrics,
    write_json_atomic,
)
from tether.ppo.models import PPOModels, sharded_with_fsdp
from tether.stages.common import BAD_BATCHES_FILE
from tether.tracking import METRICS_FILE, append_jsonl

logger = logging.getLogger(__name__)

SUMMARY_FILE = "ppo_summary.json"
#: what a run writes into its output folder (removed when a fresh run starts there)
RUN_ARTIFACTS = {METRICS_FILE, SUMMARY_FILE, "policy", "adapter", "value_model", "value_head", "runs"}


def resolve_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: 'latest' (None when there is none yet) or a folder."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise ConfigError(
            f"--resume_from_checkpoint {resume}: not a complete tether ppo checkpoint (no {TRAINER_STATE_FILE})"
        )
    return path


# ---------------------------------------------------------------------------------------------
# random-number state
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def last_good_checkpoint(output_dir: Path, divergent_iteration: int | None = None) -> Path | None:
    """Newest checkpoint whose weights were measured outside the divergence band.

    The weights saved at iteration k are first measured by the rollout of iteration k + 1, so when
    iteration j diverged, checkpoint j − 1 holds the divergent weights and the last good one is ≤ j − 2.
    """
    found = complete_checkpoints(output_dir)
    if divergent_iteration is None:
        return found[-1] if found else None
    good = [p for p in found if int(p.name[len(CHECKPOINT_PREFIX) :]) <= divergent_iteration - 2]
    return good[-1] if good else None


def reward_function_failed(error: Exception, iteration: int, output_dir: Path):
    """The error that stops a run whose reward function failed in ``iteration`` (before its update, so
    nothing of the run is half-written): the function's own message and the last checkpoint."""
    from tether.errors import RewardFunctionFailed

    last = last_good_checkpoint(output_dir)
    message = (
        f"tether ppo: stopped at iteration {iteration} before its update: {error}; last good checkpoint: "
        f"{last or 'none yet'} (fix the function, then --resume_from_checkpoint latest)"
    )
    logger.error(message)
    return RewardFunctionFailed(message)


class RunFolder:
    """The output folder of one PPO run, written by the main process (the others wait where needed)."""

    def __init__(self, config, accelerator, tokenizer):
        self.config, self.accelerator, self.tokenizer = config, accelerator, tokenizer
        self.path = Path(config.output_dir)
        self.rank = accelerator.process_index

    def prepare(self, resume_dir: Path | None) -> None:
        """Refuse to mix two runs in one folder: checkpoint rotation and metrics.jsonl would interleave."""
        from tether.stages.common import check_output_dir

        cfg, acc = self.config, self.accelerator
        continuing = resume_dir is not None or cfg.resume_from_checkpoint == "latest"
        check_output_dir(self.path, cfg.overwrite_output_dir, continuing)
        if acc.is_main_process and self.path.is_dir():
            for path in self.path.iterdir():
                # half-written folders of a crashed run are never complete, and a fresh start keeps
                # nothing of an earlier run that could be mistaken for this one's
                fresh = resume_dir is None and (
                    path.name in RUN_ARTIFACTS or path.name.startswith((CHECKPOINT_PREFIX, "bad_batches"))
                )
                if fresh or path.name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        acc.wait_for_everyone()

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(
        self, iteration: int, models: PPOModels, training_state: dict[str, Any], shuffle_rng: torch.Generator
    ) -> Path:
        """Write ``checkpoint-<iteration>`` atomically, then keep the newest ``--save_total_limit``.

        ``training_state`` (the counters, KL controller, monitor...) becomes the state file, written last,
        with the number of processes (each saves its own random-number state).
        """
        acc = self.accelerator
        target = self.path / f"{CHECKPOINT_PREFIX}{iteration}"
        tmp = self.path / f".tmp-{CHECKPOINT_PREFIX}{iteration}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(rng_state() | {"shuffle": shuffle_rng.get_state()}, tmp / f"rng_state_{self.rank}.pth")
        if sharded_with_fsdp(acc):  # every process writes its shards (the config's fsdp_state_dict_type)
            from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

            plugin = acc.state.fsdp_plugin
            save_fsdp_model(plugin, acc, models.policy_and_value, tmp)
            save_fsdp_optimizer(plugin, acc, models.optimizer, models.policy_and_value, tmp)
        elif acc.is_main_process:
            models.save(dict(models.complete_networks(acc)), tmp, self.tokenizer, merged=False)
            torch.save(models.optimizer.state_dict(), tmp / "optimizer.pt")
        if acc.is_main_process:
            torch.save(models.scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "ppo_config.json").write_text(self.config.to_json_string(), encoding="utf-8")
            state = training_state | {"world_size": acc.num_processes}
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        acc.wait_for_everyone()
        if acc.is_main_process:
            replace_folder(tmp, target)
            rotate_checkpoints(self.path, self.config.save_total_limit)
        acc.wait_for_everyone()
        return target

    def load_checkpoint(
        self, folder: Path, models: PPOModels, shuffle_rng: torch.Generator, say: Callable[[str], None] = print
    ) -> dict[str, Any]:
        """Restore the optimizer, scheduler and this process's random-number state from ``folder``; drop
        the metrics.jsonl rows logged after it. Returns the training state of its state file."""
        data = json.loads((folder / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        world = self.accelerator.num_processes
        if data.get("world_size", world) != world:
            say(
                f"resuming a {data['world_size']}-process checkpoint on {world} processes: sampling "
                "seeds differ from an uninterrupted run"
            )
        if sharded_with_fsdp(self.accelerator):  # the trained networks' and optimizer's shards, every process
            from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

            acc, plugin = self.accelerator, self.accelerator.state.fsdp_plugin
            load_fsdp_model(plugin, acc, models.policy_and_value, folder)
            load_fsdp_optimizer(plugin, acc, models.optimizer, models.policy_and_value, folder)
        else:  # loaded on the CPU; load_state_dict moves each state tensor to its parameter's device
            models.optimizer.load_state_dict(
                torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
            )
        models.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=False))
        rng_file = folder / f"rng_state_{self.rank}.pth"
        if rng_file.is_file():
            rng = torch.load(rng_file, map_location="cpu", weights_only=False)
            set_rng_state(rng)
            shuffle_rng.set_state(rng["shuffle"])
        if self.accelerator.is_main_process:  # the resumed metrics.jsonl reads like one run
            truncate_metrics(self.path, data["state"]["iteration"], METRICS_FILE)
        return data

    # ---- the run's outputs ---------------------------------------------------------------------
    def save_final(self, models: PPOModels) -> tuple[str, str | None]:
        """Write policy/ and value_model/ (full models, LoRA merged; the policy adapter alone in adapter/),
        then delete the checkpoints unless --keep_checkpoints (the run needs them no more)."""
        acc, output_dir = self.accelerator, self.path
        policy_dir = output_dir / "policy"
        value_name = "value_model" if models.policy_and_value.value_model is not None else "value_head"
        if models.policy_and_value.value_model is None and models.policy_and_value.value_head is None:
            value_name = None  # critic-free: no value model to write
        value_dir = output_dir / value_name if value_name else None
        tmp = output_dir / ".tmp-final"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        # every process: under FSDP each network is gathered in turn (one whole copy at a time)
        for name, network in models.complete_networks(acc):
            if network is not None:
                models.save({name: network}, tmp, self.tokenizer, merged=True)
                if name == "policy" and hasattr(network, "merge_and_unload"):  # the adapter alone too
                    network.save_pretrained(tmp / "adapter", safe_serialization=True)
            del network
        if acc.is_main_process:
            if (tmp / "adapter").is_dir():
                replace_folder(tmp / "adapter", output_dir / "adapter")
            replace_folder(tmp / "policy", policy_dir)
            if value_name:
                replace_folder(tmp / value_name, value_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            if not self.config.keep_checkpoints:  # only now: a crash before leaves them to resume from
                remove_checkpoints(output_dir)
        acc.wait_for_everyone()
        return str(policy_dir), str(value_dir) if value_dir else None

    def result(self, stopped_reason: str, state, metrics: dict, final: tuple[str, str] | None, extra: dict):
        """The run's :class:`~tether.ppo.config.PPOResult`, also written to ppo_summary.json (with ``extra``)."""
        from tether.ppo.config import PPOResult

        last_good = last_good_checkpoint(self.path, state.iteration if stopped_reason == "divergence" else None)
        found = complete_checkpoints(self.path)
        result = PPOResult(
            output_dir=str(self.path),
            stopped_reason=stopped_reason,
            iterations=state.iteration,
            episodes=state.episodes,
            policy_dir=final[0] if final else None,
            value_dir=final[1] if final else None,
            last_checkpoint=str(found[-1]) if found else None,
            last_good_checkpoint=str(last_good) if last_good else None,
            final_metrics=dict(metrics),
        )
        if self.accelerator.is_main_process:
            write_json_atomic(self.path / SUMMARY_FILE, asdict(result) | {"state": asdict(state)} | extra, default=str)
        self.accelerator.wait_for_everyone()
        return result

    def log_bad_batch(self, state, reason: str, rollout, say: Callable[[str], None] = print) -> Path:
        """Append a skipped batch (prompts, responses, scores) to bad_batches.jsonl (one file per process)."""
        say(
            f"iteration {state.iteration + 1}: skipped a step ({reason}); {state.bad_steps_in_a_row} in a row "
            f"(limit --max_bad_steps {self.config.max_bad_steps}); the batch is logged in "
            f"{self.path / BAD_BATCHES_FILE}"
        )
        tokenizer = self.tokenizer
        texts = rollout.response_texts(tokenizer)
        prompts = [prompt_text(tokenizer, p) for p in rollout.prompts] if rollout.prompts else None
        path = self.path / (BAD_BATCHES_FILE if self.rank == 0 else f"bad_batches.rank{self.rank}.jsonl")
        append_jsonl(
            path,
            {
                "iteration": state.iteration + 1,
                "reason": reason,
                "prompts": prompts,
                "responses": texts,
                "raw_scores": rollout.raw_scores.float().cpu().tolist(),
                "scores": rollout.scores.float().cpu().tolist(),
            },
        )
        return path
