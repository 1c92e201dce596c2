"""Metrics out: JSON lines in the output folder, plus the reporter chosen with ``--report_to``.

Trainer-based stages (SFT, RM, DPO) add ``JsonlMetricsCallback`` to the Trainer, which already
handles tensorboard and wandb; the PPO loop writes through ``MetricsWriter``, which does both.
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


def normalise_report_to(report_to: Any) -> list[str]:
    if report_to is None:
        return []
    items = [report_to] if isinstance(report_to, str) else list(report_to)
    out = [r for r in items if r and r != "none"]
    unknown = [r for r in out if r not in ("tensorboard", "wandb")]
    if unknown:
        raise ValueError(f"--report_to {unknown[0]!r}: use tensorboard, wandb or none")
    return out


class MetricsWriter:
    """Writes one row per step to ``metrics.jsonl`` and to tensorboard/wandb when asked."""

    def __init__(
        self,
        output_dir: str | Path,
        report_to: Any = "none",
        run_config: dict | None = None,
        filename: str = METRICS_FILE,
    ):
        self.path = Path(output_dir) / filename
        self.reporters = normalise_report_to(report_to)
        self._tb = None
        self._wandb = None
        if "tensorboard" in self.reporters:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "runs"))
        if "wandb" in self.reporters:
            import wandb  # optional; only imported when asked for

            self._wandb = wandb.init(config=run_config or {}, dir=str(output_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, "time": time.time(), **metrics}
        append_jsonl(self.path, row)
        numeric = {k: float(_jsonable(v)) for k, v in metrics.items() if isinstance(_jsonable(v), (int, float))}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class JsonlMetricsCallback(TrainerCallback):
    """Mirror every Trainer log (train and eval) into ``OUTPUT_DIR/metrics.jsonl``."""

    def __init__(self, output_dir: str | Path, filename: str = METRICS_FILE):
        self.path = Path(output_dir) / filename

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})
