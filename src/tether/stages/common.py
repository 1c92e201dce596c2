"""What the Trainer-based stages (SFT, reward model) share: data loading with a clear error when
nothing was given, the output-folder rules, and the atomic publication of the final model.

Output folder contract
----------------------
* Data are loaded and validated before anything is written: a bad data file leaves no folder.
* During training the Trainer's checkpoints (``checkpoint-N/``) and ``metrics.jsonl`` live in
  ``output_dir`` as usual, so ``--resume_from_checkpoint`` works after a crash.
* The final model is written into a temporary folder beside ``output_dir``; the run's other files
  are moved into it and the folder is then renamed into place. A crash while saving therefore
  never leaves a half-written model that ``from_pretrained`` would load.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from tether.config import ConfigError

logger = logging.getLogger(__name__)

#: Used when --output_dir is not given (``outputs/`` is git-ignored).
DEFAULT_OUTPUT_ROOT = Path("outputs")


def require_dataset(dataset: str | None, stage: str) -> str:
    if dataset is None or str(dataset).strip() == "":
        # TODO(lead): default to the embedded demo task (tether.demo.task.demonstrations() for sft,
        # tether.demo.task.preference_pairs() for rm) once tether.demo lands.
        raise ConfigError(f"--dataset is required for `tether {stage}` (a .jsonl/.json/.parquet/.csv file, "
                          "a folder of them, or a Hugging Face dataset name)")
    return str(dataset)


def load_train_eval(loader: Callable[..., list], dataset: str, split: str, eval_dataset: str | None,
                    eval_split_ratio: float, seed: int) -> tuple[list, list]:
    """Training and held-out records: an explicit ``eval_dataset`` or a seeded split of ``dataset``."""
    from tether.data.loading import split_train_eval

    records = loader(dataset, split=split)
    if not records:
        raise ConfigError(f"--dataset {dataset}: no records found")
    if eval_dataset:
        eval_records = loader(eval_dataset, split=split)
        return list(records), list(eval_records)
    if not 0.0 <= eval_split_ratio < 1.0:
        raise ConfigError(f"--eval_split_ratio must be in [0, 1), got {eval_split_ratio}")
    if eval_split_ratio == 0.0:
        return list(records), []
    train, held_out = split_train_eval(records, eval_split_ratio, seed)
    if not train:
        raise ConfigError(f"--eval_split_ratio {eval_split_ratio} leaves no training records out of {len(records)}")
    return list(train), list(held_out)


def resolve_resume(resume_from_checkpoint: str | None) -> str | bool | None:
    """``--resume_from_checkpoint true`` (or ``last``) means the newest checkpoint in output_dir."""
    if resume_from_checkpoint is None or resume_from_checkpoint == "":
        return None
    if str(resume_from_checkpoint).lower() in ("true", "last", "latest"):
        return True
    return str(resume_from_checkpoint)


def check_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to train into a non-empty folder unless asked to (the old model would be replaced)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output_dir {output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (overwrite or resuming):
        raise ConfigError(f"--output_dir {output_dir}: exists and is not empty; pass --overwrite_output_dir true "
                          "to replace it or --resume_from_checkpoint to continue a run")


def staging_folder(output_dir: Path) -> Path:
    """A fresh temporary folder beside ``output_dir`` (same filesystem, so the final rename is atomic)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))


def publish_folder(staged: Path, output_dir: Path) -> Path:
    """Make the finished ``staged`` folder the new ``output_dir``.

    Entries of the old ``output_dir`` that ``staged`` lacks (checkpoints, metrics.jsonl, runs/)
    are moved into ``staged`` first; entries ``staged`` has replace the old ones. The swap is two
    renames: the old folder is parked under a hidden name and deleted after the new one is in place.
    """
    staged, output_dir = Path(staged), Path(output_dir)
    staged.chmod(0o755)  # mkdtemp makes it 0700
    if not output_dir.exists():
        os.replace(staged, output_dir)
        return output_dir
    for entry in list(output_dir.iterdir()):
        if not (staged / entry.name).exists():
            os.replace(entry, staged / entry.name)
    parked = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(output_dir, parked)
    os.replace(staged, output_dir)
    shutil.rmtree(parked, ignore_errors=True)
    return output_dir


def discard_folder(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def count_message(n_bad: int, n_total: int, what: str) -> str:
    share = 100.0 * n_bad / max(1, n_total)
    return f"{n_bad} of {n_total} {what} ({share:.1f}%)"


def warn_truncation(stage: str, n_total: int, n_prompt_cut: int, n_response_cut: int, max_length: int,
                    max_prompt_length: int, unit: str = "examples") -> None:
    """Say how many examples lost tokens; the response is never dropped entirely."""
    if n_prompt_cut:
        logger.warning("tether %s: %s had prompts longer than --max_prompt_length %d; they were cut from the left "
                       "(the end of the prompt is kept)", stage, count_message(n_prompt_cut, n_total, unit),
                       max_prompt_length)
    if n_response_cut:
        logger.warning("tether %s: %s were longer than --max_length %d; their responses were cut from the right and "
                       "lost the stop token (at least one response token is always kept)", stage,
                       count_message(n_response_cut, n_total, unit), max_length)


def write_json(path: Path, data: Any) -> None:
    import json

    path.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")


def summarise_lengths(lengths: Sequence[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)
    return {"count": len(ordered), "min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1],
            "mean": sum(ordered) / len(ordered)}
