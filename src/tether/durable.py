"""Durable output: everything tether writes appears whole or not at all.

A crash, a kill or a full disk at any moment must never leave a file or folder that a later step
(``from_pretrained``, ``--resume_from_checkpoint``, the pipeline's skip-on-rerun) would take for a
finished one. Every writer in tether goes through this module:

* files: written to a temporary name in the same folder, then renamed over the target
  (``os.replace`` is atomic within one filesystem): :func:`atomic_file`, :func:`write_text_atomic`,
  :func:`write_json_atomic`, :func:`write_jsonl_atomic`;
* output folders: a stage builds its final model in a hidden staging folder beside ``--output_dir``
  and publishes it with two renames (:func:`staged_output`, :func:`publish_folder`);
* checkpoints: ``checkpoint-N/`` folders are complete when they hold their state file (written last
  inside a hidden ``.tmp-checkpoint-N/`` that is renamed into place); listing, rotation, the
  ``metrics.jsonl`` truncation on resume and the clean-up after a successful run live here, shared by
  the Trainer-based stages and PPO.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: ``checkpoint-<step>`` (the Trainer's name; PPO counts iterations); its state file is written last.
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
#: ``--resume_from_checkpoint`` values that mean "the newest complete checkpoint, or a fresh start".
LATEST = ("true", "last", "latest")


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
@contextmanager
def atomic_file(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it is renamed to
    ``path``, otherwise deleted. ``suffix`` keeps the extension for writers that look at it (``.png``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data: Any, default=float) -> Path:
    """Write ``data`` as indented JSON atomically; ``default`` converts what JSON lacks (numpy floats)."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=default) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line atomically (non-ASCII text kept as it is)."""
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


# ---------------------------------------------------------------------------------------------
# output folders
# ---------------------------------------------------------------------------------------------
def staging_folder(output_dir: Path) -> Path:
    """A fresh temporary folder beside ``output_dir`` (same filesystem, so the final rename is atomic)."""
    output_dir = Path(output_dir)
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


@contextmanager
def staged_output(output_dir: str | Path) -> Iterator[Path]:
    """Build a stage's final output in a staging folder and publish it over ``output_dir`` when the
    block succeeds (:func:`publish_folder`); on any error, or an interrupt, the staging folder is deleted
    and ``output_dir`` is left as it was."""
    staged = staging_folder(Path(output_dir))
    try:
        yield staged
        publish_folder(staged, Path(output_dir))
    except BaseException:
        discard_folder(staged)
        raise


def replace_folder(finished: Path, target: Path) -> Path:
    """Move the finished folder ``finished`` to ``target``, replacing whatever was there (two renames)."""
    finished, target = Path(finished), Path(target)
    parked = None
    if target.exists():
        parked = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
        os.replace(target, parked)
    os.replace(finished, target)
    if parked is not None:
        shutil.rmtree(parked, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints ``checkpoint-N`` that hold their ``trainer_state.json``, oldest (lowest N) first.

    Checkpoints are published by a rename, so a folder of that name is complete; the state file
    check also rejects folders left by other tools or older versions.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir() and (path / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (``--resume_from_checkpoint latest``), or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def remove_stale_staging(output_dir: str | Path) -> None:
    """Delete the hidden ``.tmp-checkpoint-N`` folders of saves that a crash interrupted."""
    folder = Path(output_dir)
    if folder.is_dir():
        for stale in folder.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, keep: int | None, protect: str | Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (and ``protect``, e.g. the best one).

    Only complete checkpoints count: a stray folder such as an unfinished ``checkpoint-999`` can
    neither push a good checkpoint out nor be mistaken for the newest. Returns the deleted folders.
    """
    if not keep or keep <= 0:
        return []
    found = complete_checkpoints(output_dir)
    protected = {Path(protect).resolve()} if protect else set()
    doomed = [p for p in found[:-keep] if p.resolve() not in protected]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete every complete checkpoint of a run whose final model is saved (``--keep_checkpoints false``).

    Called only after the final output is in place, so a crash before that still leaves the
    checkpoints to resume from. Returns the deleted folders.
    """
    found = complete_checkpoints(output_dir)
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def truncate_metrics(output_dir: str | Path, step: int, file_name: str = "metrics.jsonl") -> None:
    """Drop the ``metrics.jsonl`` rows written after ``step`` (by a run that crashed later), atomically."""
    path = Path(output_dir) / file_name
    if not path.is_file():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if int(row.get("step", 0) or 0) <= step:
                rows.append(row)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
