"""Metrics out: JSON lines in the output folder, plus the reporter chosen with ``--report_to``.

Trainer-based stages (SFT, RM, DPO) add ``JsonlMetricsCallback`` to the Trainer, which already
reports to the ``--report_to`` integrations; the PPO loop writes through ``MetricsWriter``: the JSON
lines, and accelerate's trackers (tensorboard, wandb, mlflow, comet_ml, trackio, ...).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than dropping the row
    return value


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tracker_names(report_to: Any) -> list[str]:
    """``--report_to`` (TrainingArguments' integration names; "all" is already expanded to the installed
    ones) as names of accelerate's trackers. A ConfigError names one that accelerate has no tracker
    for, or whose package is not installed."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    from tether.config import ConfigError

    items = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [str(getattr(r, "value", r)) for r in items if r and r != "none"]
    installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    built_in = {t.value for t in LoggerType}  # the others were registered with register_tracker_class
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"--report_to {name}: accelerate has no tracker of that name (use one of "
                f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, or none)"
            )
        if name in built_in and name not in installed:
            raise ConfigError(f"--report_to {name}: the {name} package is not installed")
    return names


def _hyperparameter(value: Any) -> Any:
    """A config value as the trackers store hyperparameters: bool, int, float or str."""
    value = getattr(value, "value", value)  # enums
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)


class MetricsWriter:
    """One row per step to ``metrics.jsonl`` (main process) and to accelerate's trackers: the
    ``accelerator`` was made with ``log_with`` (from ``--report_to``, see ``tracker_names``) and
    ``project_dir``; tensorboard writes under ``<project_dir>/runs/<project>``."""

    def __init__(
        self,
        output_dir: str | Path,
        accelerator,
        project: str = "tether",
        run_config: dict | None = None,
        init_kwargs: dict | None = None,
        filename: str = METRICS_FILE,
    ):
        self.path = Path(output_dir) / filename
        self.accelerator = accelerator
        if accelerator.log_with:
            config = {k: _hyperparameter(v) for k, v in (run_config or {}).items() if v is not None}
            accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs or {})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            append_jsonl(self.path, {"step": step, "time": time.time(), **metrics})
        if self.accelerator.trackers:
            numeric = {k: _jsonable(v) for k, v in metrics.items()}
            numeric = {k: float(v) for k, v in numeric.items() if isinstance(v, (int, float))}
            self.accelerator.log(numeric, step=step)

    def close(self) -> None:
        # the trackers' own finish, not Accelerator.end_training: that also ends the process group,
        # which the run still needs to save its outputs (and a later stage in the same process too)
        if self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.accelerator.trackers = []


class JsonlMetricsCallback(TrainerCallback):
    """Mirror every Trainer log (train and eval) into ``OUTPUT_DIR/metrics.jsonl``."""

    def __init__(self, output_dir: str | Path, filename: str = METRICS_FILE):
        self.path = Path(output_dir) / filename

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})
