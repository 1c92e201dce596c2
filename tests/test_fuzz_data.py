"""Hostile input (issue 8): thousands of malformed records and files thrown at the data layer and CLI.

Every case must end in one of two ways: the loader returns records that are correct (equal to
what was written, for inputs built valid) or at least well-formed (non-empty texts, known roles,
an origin FILE:LINE), or it raises ``DataError`` whose every problem starts with ``FILE:LINE: ``.
Any other exception fails the test. Through the CLI: exit code 2, FILE:LINE on stderr, and no
output folder. Examples are bounded so the whole file runs in well under a minute.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tether.data import (
    DataError,
    Demonstration,
    Message,
    PreferencePair,
    PromptRecord,
    load_records,
    split_shared_prefix,
)
from tether.data.formats import ROLES


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


KINDS = ["preferences", "demonstrations", "prompts"]
FIELDS = [
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "messages",
    "responses",
    "margin",
    "role",
    "content",
    "text",
    "label",
    "data",
]

# ------------------------------------------------------------------------------------------------
# Strategies: hostile values

nasty_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            " ",
            "\n\t ",
            "\x00",
            "nul\x00inside",
            "\ud800",
            "esc\x1b[31m",
            "\x7f\x85\u2028",
            "preferred",
            "disliked",
            "assistant",
            "user",
            "system",
            "tool",
            "[",
            "{",
            "[]",
            "{}",
            '[{"role": "user", "content": "hi"}]',
            "1.5",
            "nan",
        ]
    ),
    st.just("h" * 100_000),  # huge strings are valid text
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True), nasty_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=10,
)
message_like = st.dictionaries(
    st.sampled_from(["role", "content", "name"]),
    st.sampled_from(list(ROLES) + ["tool", "User"]) | json_values,
    max_size=3,
)
field_values = st.one_of(
    json_values,
    nasty_text,
    st.lists(message_like, max_size=4),
    message_like,
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "text": nasty_text | json_values,
                "label": st.sampled_from(["preferred", "disliked", "good"]) | json_values,
            },
        ),
        max_size=4,
    ),
)
hostile_record = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=5),
    json_values,
)

# ------------------------------------------------------------------------------------------------
# Strategies: valid records with the records they must give

plain = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from("\n\t"), min_size=1, max_size=24
).filter(lambda s: s.strip() != "" and s.lstrip()[:1] not in "[{")
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def chat_prompt(draw):
    turns = draw(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), plain), min_size=0, max_size=3))
    system = draw(st.none() | plain)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": r, "content": c} for r, c in turns
    ]
    messages.append({"role": "user", "content": draw(plain)})  # a prompt ends with a turn to answer
    return messages, tuple(Message(m["role"], m["content"]) for m in messages)


@st.composite
def valid_preference(draw):
    shape = draw(st.sampled_from(["explicit", "ranked", "conversational"]))
    chosen, rejected = draw(plain), draw(plain)
    if shape == "conversational":
        raw_prompt, prompt = draw(chat_prompt())
        row = {"prompt": raw_prompt, "chosen": chosen, "rejected": {"role": "assistant", "content": rejected}}
        return row, [PreferencePair(prompt, chosen, rejected)]
    prompt = draw(plain)
    margin = draw(st.none() | finite)
    if shape == "explicit":
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        expected = [PreferencePair(prompt, chosen, rejected, margin)]
    else:
        disliked = draw(st.lists(plain, min_size=1, max_size=3))
        at = draw(st.integers(0, len(disliked)))
        responses = [{"text": t, "label": "disliked"} for t in disliked]
        responses.insert(at, {"text": chosen, "label": "preferred"})
        row = {"prompt": prompt, "responses": responses}
        expected = [PreferencePair(prompt, chosen, t, margin) for t in disliked]
    if margin is not None:
        row["margin"] = margin
    return row, expected


@st.composite
def valid_demonstration(draw):
    completion = draw(plain)
    if draw(st.booleans()):
        raw_prompt, prompt = draw(chat_prompt())
        row = {"messages": raw_prompt + [{"role": "assistant", "content": completion}]}
    else:
        prompt = draw(plain)
        row = {"prompt": prompt, "completion": completion, "score": draw(finite), "n": 4}  # best-of-N extras
    return row, [Demonstration(prompt, completion)]


@st.composite
def valid_prompt(draw):
    if draw(st.booleans()):
        raw_prompt, prompt = draw(chat_prompt())
        return {"messages": raw_prompt}, [PromptRecord(prompt)]
    prompt = draw(plain)
    return {"prompt": prompt}, [PromptRecord(prompt)]


VALID = {"preferences": valid_preference(), "demonstrations": valid_demonstration(), "prompts": valid_prompt()}

# ------------------------------------------------------------------------------------------------
# Writing files


def _csv_bytes(rows: list) -> bytes:
    columns = sorted({k for r in rows if isinstance(r, dict) for k in r}) or ["prompt"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for r in rows:
        r = r if isinstance(r, dict) else {"prompt": r}
        writer.writerow(
            [v if isinstance(v, str) else ("" if v is None else json.dumps(v)) for v in (r.get(c) for c in columns)]
        )
    return out.getvalue().encode("utf-8", "surrogatepass")


def _parquet_bytes(rows: list) -> bytes | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist([r if isinstance(r, dict) else {"value": r} for r in rows])
        sink = io.BytesIO()
        pq.write_table(table, sink)
    except Exception:  # mixed types in one column: not writable as parquet
        return None
    return sink.getvalue()


def _jsonl_bytes(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8", "surrogatepass")


def _file_bytes(fmt: str, rows: list) -> bytes | None:
    if fmt == ".jsonl":
        return _jsonl_bytes(rows)
    if fmt == ".json":
        return json.dumps(rows, indent=1).encode("utf-8", "surrogatepass")
    if fmt == ".csv":
        return _csv_bytes(rows)
    if fmt == ".parquet":
        return _parquet_bytes(rows)
    if fmt == ".jsonl.gz":
        return gzip.compress(_jsonl_bytes(rows))
    raise AssertionError(fmt)


#: Lines that have broken JSON readers: each is inserted whole between the lines of a file.
NASTY_LINES = [
    b"\xff\xfe",
    b"\xc3(",
    b"{",
    b"}",
    b"null",
    b"[]",
    b"\x00\x00",
    b"\r",
    b'"just a string"',
    b"1e999",
    b'{"prompt": "p", "margin": ' + b"9" * 5000 + b"}",  # past Python's int-conversion digit limit
    b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": ' + b"9" * 400 + b"}",  # too large for a float
    b"[" * 5000 + b"]" * 5000,  # deeper than the recursion limit
    b'{"prompt": "\\ud800", "completion": "c"}',
    b'{"prompt": "\\u0000", "completion": "c"}',
    b'{"prompt": "p", "completion": "c"}\r',
    b'\xef\xbb\xbf{"prompt": "p"}',
    b'{"prompt": "p", "prompt": 1}',
    b'{"prompt": NaN, "chosen": Infinity, "rejected": -Infinity}',
    b'{"data": [{"prompt": "p"}]}',
    '\u2028{"prompt": "\u2029"}'.encode(),
    b"prompt,completion",
    b'"a","b",',
    b"\x1c\x1d\x1e",
]


@st.composite
def hostile_file(draw):
    """(suffix, bytes): a data file damaged in one of the ways real files are."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".txt", ".JSONL", ""]))
    rows = draw(
        st.lists(
            st.one_of(
                hostile_record, VALID["preferences"].map(lambda v: v[0]), VALID["demonstrations"].map(lambda v: v[0])
            ),
            max_size=5,
        )
    )
    how = draw(st.sampled_from(["rows", "bytes", "empty", "whitespace", "cut", "inserted", "inserted", "utf16"]))
    fmt = suffix.lower() if suffix.lower() in (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz") else ".jsonl"
    if how == "bytes":
        return suffix, draw(st.binary(max_size=300))
    if how == "empty":
        return suffix, b""
    if how == "whitespace":
        return suffix, draw(st.sampled_from([b" ", b"\n\n", b"\r\n\t \n"]))
    data = _file_bytes(fmt if fmt != ".jsonl.gz" else ".jsonl", rows)
    if data is None:
        data = draw(st.binary(max_size=100))
    if how == "utf16":
        data = data.decode("utf-8", "replace").encode("utf-16")
    if how == "cut" and data:
        data = data[: draw(st.integers(0, len(data)))]
    if how == "inserted":
        lines = data.split(b"\n")
        at = draw(st.integers(0, len(lines)))
        data = b"\n".join(lines[:at] + [draw(st.sampled_from(NASTY_LINES))] + lines[at:])
    if fmt == ".jsonl.gz" and draw(st.booleans()):
        data = gzip.compress(data)
    return suffix, data


# ------------------------------------------------------------------------------------------------
# The oracle


def _check_outcome(path: Path, kind: str, expected: list | None = None) -> list | None:
    """Load ``path``; returns the records, or None after checking a clean DataError."""
    location = re.compile(re.escape(str(path)) + r":\d+: \S")
    try:
        records = load_records(str(path), kind)
    except DataError as exc:
        assert exc.problems and exc.total >= len(exc.problems)
        for problem in exc.problems:
            assert location.match(problem), problem
        assert expected is None, f"valid input refused: {exc.problems[:3]}"
        event("refused with FILE:LINE problems")
        return None
    record_type = {"preferences": PreferencePair, "demonstrations": Demonstration, "prompts": PromptRecord}[kind]
    assert records
    for record in records:
        assert type(record) is record_type
        assert re.fullmatch(re.escape(str(path)) + r":\d+", record.origin), record.origin
        texts = [getattr(record, name) for name in ("chosen", "rejected", "completion") if hasattr(record, name)]
        if isinstance(record.prompt, str):
            texts.append(record.prompt)
        else:
            assert record.prompt and record.prompt[-1].role != "assistant"
            for message in record.prompt:
                assert message.role in ROLES
                texts.append(message.content)
        for text in texts:
            assert isinstance(text, str) and text.strip() and "\x00" not in text
            text.encode("utf-8")
    if expected is not None:
        assert records == expected
    event("accepted")
    return records


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------------------------------------
# The fuzz tests


@fuzz(600)
@given(
    rows=st.lists(
        st.one_of(hostile_record, *(v.map(lambda case: case[0]) for v in VALID.values())), min_size=1, max_size=4
    ),
    kind=st.sampled_from(KINDS),
)
def test_hostile_records_give_records_or_file_line_errors(workdir, rows, kind):
    path = workdir / "records.jsonl"
    path.write_bytes(_jsonl_bytes(rows))
    _check_outcome(path, kind)


@fuzz(700)
@given(case=hostile_file(), kind=st.sampled_from(KINDS))
def test_hostile_files_give_records_or_file_line_errors(workdir, case, kind):
    suffix, data = case
    path = workdir / f"file{suffix}"
    path.write_bytes(data)
    try:
        _check_outcome(path, kind)
    finally:
        path.unlink()


@fuzz(400)
@given(
    lines=st.lists(
        st.one_of(st.sampled_from(NASTY_LINES), VALID["demonstrations"].map(lambda case: json.dumps(case[0]).encode())),
        min_size=1,
        max_size=4,
    ),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".jsonl.gz"]),
    kind=st.sampled_from(KINDS),
)
def test_lines_that_break_json_readers_give_file_line_errors(workdir, lines, suffix, kind):
    data = b"\n".join(lines)
    path = workdir / f"nasty{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    _check_outcome(path, kind)


@fuzz(400)
@given(
    data=st.data(),
    kind=st.sampled_from(KINDS),
    fmt=st.sampled_from([".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz"]),
)
def test_valid_records_come_back_exactly_in_every_format(workdir, data, kind, fmt):
    cases = data.draw(st.lists(VALID[kind], min_size=1, max_size=5))
    rows = [row for row, _ in cases]
    if fmt == ".parquet":  # one column type per table: use one record shape
        rows = [rows[0]] * len(rows)
        cases = [cases[0]] * len(cases)
    expected = [record for _, records in cases for record in records]
    if kind == "prompts":
        expected = list(dict.fromkeys(expected))  # deduplicated, first seen kept
    payload = _file_bytes(fmt, rows)
    if payload is None:
        return  # pyarrow cannot write this mix; other formats cover it
    path = workdir / f"valid{fmt}"
    path.write_bytes(payload)
    records = _check_outcome(path, kind, expected)
    if fmt == ".jsonl":  # the origin is the line each record came from
        lines = [n for n, (_, recs) in enumerate(cases, 1) for _ in recs]
        if kind != "prompts":
            assert [r.origin for r in records] == [f"{path}:{n}" for n in lines]


@fuzz(300)
@given(prompt=plain, chosen=plain, rejected=plain, joiner=st.sampled_from(["", " ", "\n", ": "]))
def test_implicit_prompt_split_is_lossless_and_never_cuts_a_word(prompt, chosen, rejected, joiner):
    full_chosen, full_rejected = prompt + joiner + chosen, prompt + joiner + rejected
    try:
        p, c, r = split_shared_prefix(full_chosen, full_rejected)
    except ValueError as exc:
        assert "identical" in str(exc) or "share no prompt prefix" in str(exc)
        return
    assert p + c == full_chosen and p + r == full_rejected
    assert p.strip() and c and r and not p[-1].isspace()
    for response in (c, r):
        assert not (p[-1].isalnum() and response[0].isalnum())


# ------------------------------------------------------------------------------------------------
# Through the CLI entry point, in-process

ALWAYS_BAD_LINES = [b"\xff\xfe not utf-8", b"{", b"[1, 2]", b"{}", b'{"prompt": "", "chosen": 1}', b"null"]


@st.composite
def bad_data_file(draw):
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
    rows = draw(
        st.lists(
            st.one_of(
                hostile_record, VALID["preferences"].map(lambda v: v[0]), VALID["demonstrations"].map(lambda v: v[0])
            ),
            max_size=4,
        )
    )
    body = _jsonl_bytes(rows) if suffix != ".csv" else _csv_bytes(rows)
    lines = body.split(b"\n")
    at = draw(st.integers(0, len(lines)))
    # a CSV header has at most ~20 columns here, so 100 cells never fit it
    bad = draw(st.sampled_from(ALWAYS_BAD_LINES if suffix != ".csv" else [b"\xff", b",".join([b"x"] * 100)]))
    if suffix == ".csv":
        at = max(at, 1)  # keep the header first
    return suffix, b"\n".join(lines[:at] + [bad] + lines[at:])


#: the commands that read data files and must refuse bad ones before writing anything
STAGES = ["sft", "rm", "dpo"]


@fuzz(150)
@given(case=bad_data_file(), stage=st.sampled_from(STAGES))
def test_cli_refuses_bad_data_with_file_line_and_writes_nothing(workdir, case, stage):
    from tether.cli import main

    suffix, data = case
    path = workdir / f"bad{suffix}"
    path.write_bytes(data)
    out = workdir / "cli-out"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([stage, "--dataset", str(path), "--output_dir", str(out), "--report_to", "none"])
            except SystemExit as exc:  # argparse's own exits, should any happen
                code = exc.code
        assert code == 2, err.getvalue()[-500:]
        assert re.search(re.escape(str(path)) + r":\d+: ", err.getvalue()), err.getvalue()[-500:]
        assert "Traceback" not in err.getvalue()
        assert not out.exists()
        assert not [p for p in workdir.iterdir() if p.name.startswith(".cli-out")]
    finally:
        path.unlink()
