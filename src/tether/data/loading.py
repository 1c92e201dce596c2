"""Load records from files, folders or Hugging Face datasets, reporting every problem as FILE:LINE.

Sources (``source`` is a path or a hub name):

* a file: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects, an object holding
  that list under ``"data"``, one object, or JSON Lines saved as ``.json``), ``.csv`` (a header row;
  cells of ``prompt``/``chosen``/``rejected``/``completion``/``messages``/``responses`` holding a JSON
  list or object are decoded, e.g. ``[{"role": "user", ...}]``; an empty cell is a missing field),
  ``.parquet``; ``.jsonl.gz``, ``.json.gz`` and ``.csv.gz`` are read through gzip. The split is
  ignored for a single file.
* a folder: every data file below it (recursive, sorted by relative path, hidden files and folders
  and other extensions such as README.md skipped). If any file is named after a split (a name
  token such as ``train``, ``test``, ``validation``, ``dev``, ``eval``, ``test_prefs`` or the
  requested split, separated by ``-`` or ``.``: ``train.jsonl``, ``test-00000-of-00001.parquet``,
  ``train/part1.jsonl``), only the files of the requested split are read, and unnamed files count
  as ``train``. A folder written by ``datasets.save_to_disk`` is read with ``load_from_disk``.
* ``embedded:demo``: the embedded demo task's prompts, demonstrations or preference pairs
  (``tether.data.embedded``; split ``train`` or, for prompts, ``test``), logged as such.
* otherwise, a name such as ``org/name`` that is not a local path: ``datasets.load_dataset(name,
  dataset_config, split=split)`` (hub access follows ``HF_HUB_OFFLINE``; tests and the demo never reach a hub).
* with ``dataset_config`` (``--dataset_config``), a local folder's subfolder of that name is read
  as a folder (above); without one, ``datasets.load_dataset(folder, dataset_config, split=split)``
  reads the configurations its README.md declares (rows ``FOLDER(CONFIG)[split]:ROW``).
* in Python, a ``datasets.Dataset`` or ``DatasetDict`` (rows ``NAME[split]:ROW``).

Errors: every problem becomes one ``FILE:LINE: what is wrong (field X)`` line, all of a source's
problems are collected (``DataError`` shows the first ``MAX_REPORTED_PROBLEMS`` and counts the
rest), and nothing is returned if there was any. LINE is 1-based: the line of a ``.jsonl`` record,
the line where an element of a ``.json`` list starts, the physical line where a CSV row starts (the
header is line 1; the message adds ``row N``), the 1-based row of a parquet file (``row N`` too) or
of a hub dataset (``NAME[split]:ROW``). Problems with a whole file (empty, unreadable, unsupported
extension, invalid UTF-8 in a .json/.csv) point at line 1 or at the bad line; problems with a whole
source (no such path, empty folder, hub failure) name the source alone.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import os
import random
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from tether.data import embedded
from tether.data.errors import DataError
from tether.data.formats import KINDS, PARSERS, RecordProblems
from tether.data.records import Demonstration, PreferencePair, PromptRecord

logger = logging.getLogger(__name__)

R = TypeVar("R")

#: File endings read as data, longest first so ``.jsonl.gz`` wins over ``.gz``.
DATA_SUFFIXES = (".jsonl.gz", ".json.gz", ".csv.gz", ".jsonl", ".json", ".csv", ".parquet")
#: Names that mark a file or folder as one split of a dataset (plus the requested split itself).
SPLIT_NAMES = ("train", "training", "test", "testing", "validation", "valid", "val", "dev", "eval", "evaluation")
#: CSV cells of these columns holding a JSON list/object are decoded (CSV has no nested values).
STRUCTURED_COLUMNS = ("prompt", "chosen", "rejected", "completion", "messages", "responses")
#: Problems kept in ``DataError.problems``; beyond that they are only counted.
MAX_KEPT_PROBLEMS = 1000

_JSON = json.JSONDecoder(strict=False)  # raw control characters inside strings are text, not errors
_JSON_WS = re.compile(r"[ \t\n\r]*")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_UTF8_BOM = b"\xef\xbb\xbf"


class _Problems:
    """Keeps the first problems found and counts all of them."""

    def __init__(self):
        self.kept: list[str] = []
        self.total = 0

    def add(self, message: str) -> None:
        self.total += 1
        if len(self.kept) < MAX_KEPT_PROBLEMS:
            self.kept.append(message)


@dataclass(frozen=True)
class _Where:
    source: str
    line: int
    row: int | None = None  # set when LINE is not the row number (CSV) or to say it is one (parquet)

    @property
    def origin(self) -> str:
        return f"{self.source}:{self.line}"

    def say(self, message: str) -> str:
        return f"{self.origin}: row {self.row}: {message}" if self.row is not None else f"{self.origin}: {message}"


# ----------------------------------------------------------------------------------------------
# Public API


def load_records(source: Any, kind: str, split: str = "train", dataset_config: str | None = None) -> list:
    """Records of ``kind`` ("preferences", "demonstrations" or "prompts") from ``source``.

    ``source`` is a path or hub name, a ``datasets.Dataset`` / ``DatasetDict`` already in memory
    (rows ``NAME[split]:ROW``), a list of records of ``kind`` (returned as they are, prompts
    deduplicated), or a list of row dicts, checked like a file's rows (``records:N``).
    ``dataset_config`` picks a configuration (subset) of a hub dataset or of a local folder (see the
    module docstring).

    Raises ``DataError`` listing every problem found (``FILE:LINE: what is wrong (field X)``).
    Each record's ``origin`` is its ``FILE:LINE``. Prompts are deduplicated, first occurrence kept.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(source, (list, tuple)):
        records = list(source)
        if any(isinstance(r, dict) for r in records):  # raw rows, checked like a file's ("records:N")
            problems = _Problems()
            records = _parse_rows(((_Where("records", i), r) for i, r in enumerate(records, 1)), kind, problems)
            if problems.total:
                raise DataError(problems.kept, problems.total)
        return _unique_prompts(records) if kind == "prompts" else records
    if not isinstance(source, (str, os.PathLike)):
        return _in_memory_records(source, kind, split)
    if os.fspath(source) == embedded.DEMO:
        return _embedded_demo_records(kind, split)
    problems = _Problems()
    records = _parse_rows(iter_rows(source, split, problems, dataset_config), kind, problems)
    if problems.total:
        raise DataError(problems.kept, problems.total)
    if not records:
        raise DataError([f"{os.fspath(source)}: no records"])
    if kind == "prompts":
        records = _unique_prompts(records)
    logger.info("read %d %s from %s", len(records), kind, source)
    return records


def _parse_rows(rows: Iterator[tuple[_Where, Any]], kind: str, problems: _Problems) -> list:
    """Records of ``kind`` from ``(where, row)`` pairs, each with its ``FILE:LINE`` origin (problems are collected)."""
    parse = PARSERS[kind]
    records: list = []
    for where, row in rows:
        try:
            parsed = parse(row)
        except RecordProblems as exc:
            for message in exc.problems:
                problems.add(where.say(message))
            continue
        records.extend(replace(record, origin=where.origin) for record in parsed)
    return records


def _in_memory_records(dataset: Any, kind: str, split: str) -> list:
    """Records from a ``datasets.Dataset`` (or the ``split`` of a ``DatasetDict``), parsed and
    checked like a file; origins are ``NAME[split]:ROW`` with NAME the dataset's builder name or
    ``dataset`` (``split`` names a ``Dataset``'s own split when it has none)."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError([f"dataset: no split {split!r} in this DatasetDict (it has: {', '.join(dataset)})"])
        dataset = dataset[split]
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"expected a path, a hub name, a datasets.Dataset or a list of records, got {type(dataset).__name__}"
        )
    name = dataset.info.builder_name or "dataset"
    problems = _Problems()
    records = _parse_rows(_dataset_rows(dataset, f"{name}[{dataset.split or split}]"), kind, problems)
    if problems.total:
        raise DataError(problems.kept, problems.total)
    if not records:
        raise DataError([f"{name}[{dataset.split or split}]: no records"])
    return _unique_prompts(records) if kind == "prompts" else records


def _embedded_demo_records(kind: str, split: str) -> list:
    """``embedded:demo``: the demo task's shipped file for ``kind``, read like any JSONL file; prompts
    are those of ``split`` (``train`` or ``test``, see ``tether.data.embedded``)."""
    if split not in embedded.SPLITS:
        raise DataError(
            [
                f"{embedded.DEMO}: no split {split!r}; --dataset_split train gives the training prompts, "
                "demonstrations and preference pairs, test the held-out prompts"
            ]
        )
    if split != "train" and kind != "prompts":
        raise DataError([f"{embedded.DEMO}: split {split!r} holds prompts only; the {kind} are in split 'train'"])
    name = embedded.FILES[kind]
    problems = _Problems()
    rows = _file_rows(embedded.data_file(kind), f"{embedded.DEMO}/{name}", problems)
    records = _parse_rows(rows, kind, problems)
    if problems.total:  # a broken installation, not a user's mistake; reported the same way
        raise DataError(problems.kept, problems.total)
    if kind == "prompts":
        records = [r for r in records if embedded.split_of(r.prompt) == split]
    logger.info("using the embedded demo task's data (%s, split %s): %d %s", embedded.DEMO, split, len(records), kind)
    return records


def load_preferences(source: Any, split: str = "train", dataset_config: str | None = None) -> list[PreferencePair]:
    """Preference pairs from any accepted pair, conversational or ranked format."""
    return load_records(source, "preferences", split, dataset_config)


def load_demonstrations(source: Any, split: str = "train", dataset_config: str | None = None) -> list[Demonstration]:
    """Demonstrations from ``{"prompt", "completion"}`` or ``{"messages"}`` records."""
    return load_records(source, "demonstrations", split, dataset_config)


def load_prompts(source: Any, split: str = "train", dataset_config: str | None = None) -> list[PromptRecord]:
    """Prompts from prompt-only, demonstration or preference records (deduplicated, order kept)."""
    return load_records(source, "prompts", split, dataset_config)


def split_train_eval(
    records: Sequence[R], ratio: float, seed: int, group_by_prompt: bool = True
) -> tuple[list[R], list[R]]:
    """``(train, eval)``: a deterministic random share ``ratio`` of ``records`` held out.

    ``ratio`` 0 holds nothing out. Otherwise ``ceil(len * ratio)`` records at least go to eval, and
    with ``group_by_prompt`` records sharing a prompt (the pairs of one ranked record, say) stay on
    the same side, so eval never scores a prompt that was trained on. Both lists keep the input
    order. Raises ``DataError`` if nothing would be left to train on.
    """
    if not 0.0 <= ratio < 1.0 or math.isnan(ratio):
        from tether.config import ConfigError

        raise ConfigError(f"eval_split_ratio must be in [0, 1), got {ratio}")
    records = list(records)
    if ratio == 0.0 or not records:
        return records, []
    groups: dict[Any, list[int]] = {}
    for index, record in enumerate(records):
        key = getattr(record, "prompt", None) if group_by_prompt else index
        groups.setdefault(key if key is not None else ("__index__", index), []).append(index)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    wanted = math.ceil(len(records) * ratio)
    held: set[int] = set()
    for group in order:
        if len(held) >= wanted:
            break
        held.update(group)
    if len(held) >= len(records):
        first = getattr(records[0], "origin", "") or "data"
        raise DataError(
            [
                f"{first}: eval_split_ratio {ratio} leaves no training records: only {len(records)} record(s) "
                f"in {len(groups)} prompt group(s); lower the ratio or give --eval_dataset"
            ]
        )
    train = [r for i, r in enumerate(records) if i not in held]
    held_out = [r for i, r in enumerate(records) if i in held]
    return train, held_out


def _unique_prompts(records: list[PromptRecord]) -> list[PromptRecord]:
    seen: set = set()
    unique = []
    for record in records:
        if record.prompt not in seen:
            seen.add(record.prompt)
            unique.append(record)
    if len(unique) < len(records):
        logger.info("dropped %d repeated prompt(s)", len(records) - len(unique))
    return unique


# ----------------------------------------------------------------------------------------------
# Sources -> rows


def iter_rows(
    source: str | os.PathLike, split: str, problems: _Problems, dataset_config: str | None = None
) -> Iterator[tuple[_Where, Any]]:
    """``(where, row)`` for every row of ``source``; problems reading it go to ``problems``."""
    display = os.fspath(source)
    path = Path(display).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (
            (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
        ):
            if dataset_config:
                problems.add(f"{display}: a dataset saved with save_to_disk has no configurations (--dataset_config)")
                return
            yield from _saved_dataset_rows(path, display, split, problems)
            return
        if dataset_config:
            if (path / dataset_config).is_dir():  # one subfolder per configuration: read as a folder
                path, display = path / dataset_config, os.path.join(display, dataset_config)
            else:  # configurations declared in the folder's README.md: datasets resolves them
                yield from _hub_rows(str(path), split, problems, dataset_config, display)
                return
        for file, file_display in _folder_files(path, display, split, problems):
            yield from _file_rows(file, file_display, problems)
        return
        for file, file_display in _folder_files(path, display, split, problems):
            yield from _file_rows(file, file_display, problems)
        return
    if path.exists():
        if path.is_file():
            yield from _file_rows(path, display, problems)
        else:
            problems.add(f"{display}: not a regular file or folder")
        return
    if _HUB_NAME.match(display) and not _data_suffix(display):
        yield from _hub_rows(display, split, problems, dataset_config)
        return
    problems.add(f"{display}: no such file or folder")


def _data_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in DATA_SUFFIXES if lower.endswith(s)), None)


def _split_label(parts: Sequence[str], split: str) -> str | None:
    """The split a file belongs to by its name (``train-0001.parquet``) or folder (``test/``)."""
    split = split.lower()

    def label_of(name: str) -> str | None:
        for token in re.split(r"[-. ]", name.lower()):
            if token == split or token in SPLIT_NAMES or any(token.startswith(k + "_") for k in SPLIT_NAMES):
                return token
        return None

    stem = parts[-1]
    suffix = _data_suffix(stem)
    if suffix:
        stem = stem[: -len(suffix)]
    for name in [stem, *reversed(parts[:-1])]:
        label = label_of(name)
        if label is not None:
            return label
    return None


def _folder_files(folder: Path, display: str, split: str, problems: _Problems) -> list[tuple[Path, str]]:
    found: list[tuple[tuple[str, ...], Path]] = []
    for root, dirs, files in os.walk(folder):  # does not follow symlinked folders
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or not _data_suffix(name):
                continue
            full = Path(root) / name
            found.append((full.relative_to(folder).parts, full))
    found.sort(key=lambda item: item[0])
    if not found:
        problems.add(f"{display}: no data files ({', '.join(DATA_SUFFIXES[::-1])}) in this folder")
        return []
    labels = [_split_label(parts, split) for parts, _ in found]
    if any(label is not None for label in labels):
        wanted = split.lower()
        selected = [item for item, label in zip(found, labels) if (label or "train") == wanted]
        if not selected:
            names = sorted({label or "train" for label in labels})
            problems.add(
                f"{display}: no files for split {split!r} in this folder (its files are named for "
                f"split(s): {', '.join(names)}); choose one with --dataset_split"
            )
            return []
        found = selected
    return [(full, os.path.join(display, *parts)) for parts, full in found]


def _drop_nulls(row: Any) -> Any:
    """Tabular sources fill absent columns with null/NaN: treat those as missing fields."""
    if not isinstance(row, dict):
        return row
    return {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def _file_rows(path: Path, display: str, problems: _Problems) -> Iterator[tuple[_Where, Any]]:
    suffix = _data_suffix(path.name)
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}
    if suffix == ".parquet":
        yield from _parquet_rows(path, display, problems)
        return
    if suffix is None:
        ext = "".join(path.suffixes[-2:]) or "(none)"
        problems.add(
            f"{display}:1: unsupported file type {ext}: expected .jsonl, .json, .csv or .parquet "
            f"(.jsonl.gz, .json.gz, .csv.gz also work)"
        )
        return
    try:
        data = _read_bytes(path, compressed=suffix.endswith(".gz"))
    except (OSError, EOFError, zlib.error) as exc:
        problems.add(f"{display}:1: cannot read the file ({getattr(exc, 'strerror', None) or exc})")
        return
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        problems.add(f"{display}:1: the file is UTF-16 encoded; save it as UTF-8")
        return
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    if not data.strip():
        problems.add(f"{display}:1: the file is empty")
        return
    yield from readers[suffix.removesuffix(".gz")](data, display, problems)


def _read_bytes(path: Path, compressed: bool) -> bytes:
    if compressed:
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _invalid_utf8_lines(data: bytes, display: str, problems: _Problems) -> bool:
    """Report every line holding bytes that are not UTF-8; True if there was one."""
    bad = False
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = True
            problems.add(f"{display}:{lineno}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
    return bad


def _decode_json(text: str, where: _Where, problems: _Problems) -> tuple[bool, Any]:
    try:
        return True, _JSON.decode(text)
    except json.JSONDecodeError as exc:
        problems.add(where.say(f"invalid JSON ({exc.msg} at column {exc.colno})"))
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit conversion limit
        problems.add(where.say(f"invalid JSON ({_first_line(exc)})"))
    except RecursionError:
        problems.add(where.say("invalid JSON (nested too deeply)"))
    return False, None


def _jsonl_rows(data: bytes, display: str, problems: _Problems) -> Iterator[tuple[_Where, Any]]:
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = _Where(display, lineno)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(where.say(f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"))
            continue
        ok, value = _decode_json(text, where, problems)
        if ok:
            yield where, value


class _JsonText:
    """A decoded JSON document with cheap position -> line lookups (positions only move forward)."""

    def __init__(self, text: str):
        self.text = text
        self._pos = 0
        self._line = 1

    def line_at(self, pos: int) -> int:
        if pos < self._pos:
            self._pos, self._line = 0, 1
        self._line += self.text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line

    def skip_ws(self, pos: int) -> int:
        return _JSON_WS.match(self.text, pos).end()


def _json_rows(data: bytes, display: str, problems: _Problems) -> Iterator[tuple[_Where, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _invalid_utf8_lines(data, display, problems)
        return
    doc = _JsonText(text)
    start = doc.skip_ws(0)
    if text[start] == "[":
        yield from _json_array(doc, start, display, problems)
        return
    if text[start] != "{":
        problems.add(f"{display}:{doc.line_at(start)}: expected a JSON list of records (or one record object)")
        return
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) > 1 and all(line.startswith("{") for line in lines):  # JSON Lines saved as .json
        yield from _jsonl_rows(data, display, problems)
        return
    decoded = _decode_json_value(doc, start, display, problems)
    if decoded is None:
        return
    value, end = decoded
    after = doc.skip_ws(end)
    if after < len(text):
        problems.add(f"{display}:{doc.line_at(after)}: invalid JSON (unexpected content after the first object)")
        return
    array_at = _member_array(doc, start, "data") if isinstance(value.get("data"), list) else None
    if array_at is not None:
        yield from _json_array(doc, array_at, display, problems)
    else:
        yield _Where(display, doc.line_at(start)), value


def _decode_json_value(doc: _JsonText, pos: int, display: str, problems: _Problems) -> tuple[Any, int] | None:
    """The JSON value starting at ``pos`` and where it ends, or None with the problem recorded."""
    try:
        return _JSON.raw_decode(doc.text, pos)
    except json.JSONDecodeError as exc:
        problems.add(f"{display}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})")
    except ValueError as exc:
        problems.add(f"{display}:{doc.line_at(pos)}: invalid JSON ({_first_line(exc)})")
    except RecursionError:
        problems.add(f"{display}:{doc.line_at(pos)}: invalid JSON (nested too deeply)")
    return None


def _member_array(doc: _JsonText, start: int, key: str) -> int | None:
    """Position of the list under ``key`` in the (valid) JSON object starting at ``start``."""
    text, found = doc.text, None
    pos = doc.skip_ws(start + 1)
    while text[pos] != "}":
        name, pos = _JSON.raw_decode(text, pos)
        pos = doc.skip_ws(doc.skip_ws(pos) + 1)  # past the colon
        if name == key and text[pos] == "[":
            found = pos
        _, pos = _JSON.raw_decode(text, pos)
        pos = doc.skip_ws(pos)
        if text[pos] == ",":
            pos = doc.skip_ws(pos + 1)
    return found


def _json_array(doc: _JsonText, start: int, display: str, problems: _Problems) -> Iterator[tuple[_Where, Any]]:
    """Elements of the JSON list at ``start``, each with the line it starts on."""
    text = doc.text
    pos = doc.skip_ws(start + 1)
    if pos < len(text) and text[pos] == "]":
        problems.add(f"{display}:{doc.line_at(start)}: no records (an empty list)")
        return
    while True:
        decoded = _decode_json_value(doc, pos, display, problems)
        if decoded is None:
            return
        value, end = decoded
        yield _Where(display, doc.line_at(pos)), value
        pos = doc.skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = doc.skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            after = doc.skip_ws(pos + 1)
            if after < len(text) and start == doc.skip_ws(0):
                problems.add(f"{display}:{doc.line_at(after)}: invalid JSON (unexpected content after the list)")
            return
        where = doc.line_at(min(pos, len(text)))
        problems.add(f"{display}:{where}: invalid JSON (expected ',' or ']' after a list element)")
        return


def _csv_cell(column: str, value: str) -> Any:
    if column in STRUCTURED_COLUMNS and value.lstrip()[:1] in ("[", "{"):
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            return value
        return decoded if isinstance(decoded, (list, dict)) else value
    if column == "margin":
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _csv_rows(data: bytes, display: str, problems: _Problems) -> Iterator[tuple[_Where, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _invalid_utf8_lines(data, display, problems)
        return
    csv.field_size_limit(2**31 - 1)  # huge cells are valid text
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    row_number = 0
    line_before = 0
    try:
        for cells in reader:
            line = line_before + 1
            line_before = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header = [cell.strip() for cell in cells]
                empty = [i + 1 for i, name in enumerate(header) if not name]
                repeated = sorted({name for name in header if name and header.count(name) > 1})
                if empty or repeated:
                    what = (
                        f"empty column name(s) at position {', '.join(map(str, empty))}"
                        if empty
                        else f"repeated column name(s) {', '.join(repeated)}"
                    )
                    problems.add(f"{display}:{line}: bad CSV header: {what}")
                    return
                continue
            row_number += 1
            where = _Where(display, line, row=row_number)
            if len(cells) != len(header):
                problems.add(where.say(f"{len(cells)} cells, but the header has {len(header)} columns"))
                continue
            yield where, {name: _csv_cell(name, cell) for name, cell in zip(header, cells) if cell != ""}
    except csv.Error as exc:
        problems.add(f"{display}:{reader.line_num}: malformed CSV ({exc})")
        return
    if header is None:  # only blank rows (str.strip() also counts \x1c-\x1f as blanks)
        problems.add(f"{display}:1: the file is empty (no header row)")
    elif row_number == 0:
        problems.add(f"{display}:1: no records (only a header row)")


def _parquet_rows(path: Path, display: str, problems: _Problems) -> Iterator[tuple[_Where, Any]]:
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt or foreign bytes
        problems.add(f"{display}:1: not a readable parquet file ({type(exc).__name__}: {_first_line(exc)})")
        return
    row_number = 0
    try:
        for batch in table_file.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_number += 1
                yield _Where(display, row_number, row=row_number), _drop_nulls(row)
    except Exception as exc:
        problems.add(
            f"{display}:{row_number + 1}: row {row_number + 1}: cannot read ({type(exc).__name__}: {_first_line(exc)})"
        )
        return
    if row_number == 0:
        problems.add(f"{display}:1: no records (the table has no rows)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hub_rows(
    name: str, split: str, problems: _Problems, dataset_config: str | None = None, local: str | None = None
) -> Iterator[tuple[_Where, Any]]:
    """Rows of ``datasets.load_dataset(name, dataset_config, split=split)``: a hub dataset, or the
    ``local`` folder whose README.md declares its configurations; origins ``NAME(CONFIG)[split]:ROW``."""
    label = f"{local or name}({dataset_config})" if dataset_config else (local or name)
    try:
        import datasets

        dataset = datasets.load_dataset(name, dataset_config, split=split)
    except Exception as exc:  # datasets raises many types (offline, missing, bad config or split, bad files)
        what = f"configuration {dataset_config!r}, split {split!r}" if dataset_config else f"split {split!r}"
        where = "the local dataset folder" if local else f"not a local path, and the Hugging Face dataset {name!r}"
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        problems.add(f"{local or name}: {where} ({what}) could not be loaded ({reason})")
        return
    yield from _dataset_rows(dataset, f"{label}[{split}]")


def _saved_dataset_rows(path: Path, display: str, split: str, problems: _Problems) -> Iterator[tuple[_Where, Any]]:
    try:
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                problems.add(f"{display}: no split {split!r} in this saved dataset (it has: {', '.join(dataset)})")
                return
            dataset = dataset[split]
    except Exception as exc:
        problems.add(f"{display}: cannot read this saved dataset ({type(exc).__name__}: {_first_line(exc)})")
        return
    yield from _dataset_rows(dataset, f"{display}[{split}]")


def _dataset_rows(dataset, display: str) -> Iterator[tuple[_Where, Any]]:
    for index, row in enumerate(dataset, 1):
        yield _Where(display, index), _drop_nulls(row)
