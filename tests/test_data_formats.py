"""The data layer: every accepted format gives the same records; every bad input a FILE:LINE message.

Golden files live in tests/data/formats/: the same three preference pairs, three conversational
pairs, three demonstrations and their prompts, written in each accepted shape. Parquet, gzip and
saved-dataset copies are written here from the same rows.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from tether.data import (
    DataError,
    Demonstration,
    Message,
    PreferencePair,
    PromptRecord,
    load_demonstrations,
    load_preferences,
    load_prompts,
    load_records,
    split_shared_prefix,
    split_train_eval,
)

FORMATS = Path(__file__).parent / "data" / "formats"


def sys_(text):
    return Message("system", text)


def user(text):
    return Message("user", text)


def bot(text):
    return Message("assistant", text)


PROMPTS = ["What is the capital of France?", "Name a primary colour.\nAnswer briefly.", "Translate 'chat' to English:"]
PAIRS = [
    PreferencePair(PROMPTS[0], " Paris \u2014 of course.", " Lyon.", 2.0),
    PreferencePair(PROMPTS[1], " Red.", " Green, I think.", 0.5),
    PreferencePair(PROMPTS[2], " cat", " chatter", None),
]
CONV_PROMPTS = [
    (sys_("You are terse."), user("Capital of France?")),
    (user("Hi!"), bot("Hello! How can I help?"), user("Name a primary colour.")),
    (user("Translate 'chat' to English."),),
]
CONV_PAIRS = [
    PreferencePair(CONV_PROMPTS[0], "Paris.", "Lyon."),
    PreferencePair(CONV_PROMPTS[1], "Red.", "Green."),
    PreferencePair(CONV_PROMPTS[2], "cat", "chatter"),
]
DEMOS = [Demonstration(p, c) for p, c in zip(PROMPTS, ["Paris \u2014 of course.", "Red.", "cat"])]
CONV_DEMOS = [Demonstration(p, c) for p, c in zip(CONV_PROMPTS, ["Paris.", "Red.", "cat"])]


def _jsonl_rows(name):
    return [json.loads(line) for line in (FORMATS / name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Parquet (written by pandas, as users do), gzip and datasets.save_to_disk copies of the golden rows."""
    import pandas as pd

    folder = tmp_path_factory.mktemp("generated")
    pd.DataFrame(_jsonl_rows("pairs.jsonl")).to_parquet(folder / "pairs.parquet")  # margin NaN -> null
    conv = [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        for r in _jsonl_rows("conv_strings.jsonl")
    ]
    pd.DataFrame(conv).to_parquet(folder / "conv.parquet")  # list<struct<role, content>> column
    pd.DataFrame(_jsonl_rows("demos.jsonl")).to_parquet(folder / "demos.parquet")
    pd.DataFrame(_jsonl_rows("demos_messages.jsonl")).to_parquet(folder / "demos_messages.parquet")
    for name in ("pairs.jsonl", "pairs.csv", "pairs.json"):
        (folder / (name + ".gz")).write_bytes(gzip.compress((FORMATS / name).read_bytes()))
    return folder


# ------------------------------------------------------------------------------------------------
# Every accepted format -> the same records


@pytest.mark.parametrize(
    "name",
    [
        "pairs.jsonl",
        "pairs.json",
        "pairs_data.json",
        "pairs.csv",
        "pairs_implicit.jsonl",
        "pairs_ranked.jsonl",
        "pairs_mixed.jsonl",
    ],
)
def test_every_pair_format_gives_the_same_pairs(name):
    assert load_preferences(FORMATS / name) == PAIRS


@pytest.mark.parametrize("name", ["pairs.parquet", "pairs.jsonl.gz", "pairs.csv.gz", "pairs.json.gz"])
def test_generated_pair_files_give_the_same_pairs(generated, name):
    assert load_preferences(generated / name) == PAIRS


@pytest.mark.parametrize(
    "name",
    [
        "conv_strings.jsonl",
        "conv_dicts.jsonl",
        "conv_lists.jsonl",
        "conv_implicit.jsonl",
        "conv.json",
        "conv.csv",
        "generated:conv.parquet",
    ],
)
def test_every_conversational_pair_format_gives_the_same_pairs(generated, name):
    path = generated / name.split(":")[1] if name.startswith("generated:") else FORMATS / name
    assert load_preferences(path) == CONV_PAIRS


@pytest.mark.parametrize(
    "name", ["demos.jsonl", "demos.json", "demos.csv", "bon_output.jsonl", "generated:demos.parquet"]
)
def test_every_demonstration_format_gives_the_same_demonstrations(generated, name):
    path = generated / name.split(":")[1] if name.startswith("generated:") else FORMATS / name
    assert load_demonstrations(path) == DEMOS


@pytest.mark.parametrize("name", ["demos_messages.jsonl", "demos_conv.jsonl", "generated:demos_messages.parquet"])
def test_every_conversational_demonstration_format_gives_the_same_demonstrations(generated, name):
    path = generated / name.split(":")[1] if name.startswith("generated:") else FORMATS / name
    assert load_demonstrations(path) == CONV_DEMOS


def test_only_a_messages_record_makes_its_earlier_assistant_turns_demonstrations():
    # equal records (the same conversation), but SFT trains "Hello! How can I help?" only from messages
    messages, prompt_completion = (
        load_demonstrations(FORMATS / "demos_messages.jsonl"),
        load_demonstrations(FORMATS / "demos_conv.jsonl"),
    )
    assert [d.prompt_turns_are_demonstrations for d in messages] == [True, True, True]
    assert [d.prompt_turns_are_demonstrations for d in prompt_completion] == [False, False, False]


@pytest.mark.parametrize(
    "name",
    [
        "prompts.jsonl",
        "pairs.jsonl",
        "pairs_implicit.jsonl",
        "pairs_ranked.jsonl",
        "pairs.csv",
        "demos.jsonl",
        "demos.json",
        "bon_output.jsonl",
    ],
)
def test_prompts_come_from_prompt_preference_and_demonstration_files(name):
    # prompts.jsonl repeats its first prompt on line 3: kept once, in first-seen order.
    assert load_prompts(FORMATS / name) == [PromptRecord(p) for p in PROMPTS]


@pytest.mark.parametrize(
    "name",
    ["prompts_messages.jsonl", "demos_messages.jsonl", "conv_strings.jsonl", "conv_implicit.jsonl", "demos_conv.jsonl"],
)
def test_conversational_prompts_drop_the_final_assistant_turn(name):
    assert load_prompts(FORMATS / name) == [PromptRecord(p) for p in CONV_PROMPTS]


def test_origin_is_the_line_where_each_record_starts():
    assert [p.origin for p in load_preferences(FORMATS / "pairs.jsonl")] == [
        f"{FORMATS / 'pairs.jsonl'}:{n}" for n in (1, 2, 3)
    ]
    # pretty-printed list: each element starts 6 lines after the previous (5 or 6 fields + braces)
    assert [p.origin.rsplit(":", 1)[1] for p in load_preferences(FORMATS / "pairs.json")] == ["2", "8", "14"]
    assert [p.origin.rsplit(":", 1)[1] for p in load_preferences(FORMATS / "pairs_data.json")] == ["4", "10", "16"]
    # CSV: the physical line; row 2's prompt holds a newline, so row 3 starts on line 5
    assert [p.origin.rsplit(":", 1)[1] for p in load_preferences(FORMATS / "pairs.csv")] == ["2", "3", "5"]


def test_ranked_record_gives_one_pair_per_disliked_response_in_order(tmp_path):
    path = tmp_path / "ranked.jsonl"
    row = {
        "prompt": "p",
        "responses": [
            {"text": "a", "label": "disliked"},
            {"text": "best", "label": "preferred"},
            {"text": "c", "label": "disliked"},
            {"text": "d", "label": "disliked"},
        ],
    }
    path.write_text("\n" + json.dumps(row) + "\n")
    pairs = load_preferences(path)
    assert pairs == [
        PreferencePair("p", "best", "a"),
        PreferencePair("p", "best", "c"),
        PreferencePair("p", "best", "d"),
    ]
    assert {p.origin for p in pairs} == {f"{path}:2"}


def test_json_file_may_hold_one_record_or_json_lines(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"prompt": "p", "completion": "c"}, indent=2))
    assert load_demonstrations(one) == [Demonstration("p", "c")]
    lines = tmp_path / "lines.json"
    lines.write_text((FORMATS / "demos.jsonl").read_text(encoding="utf-8"))
    assert load_demonstrations(lines) == DEMOS


def test_extra_fields_are_ignored_and_empty_system_messages_dropped(tmp_path):
    path = tmp_path / "d.jsonl"
    row = {
        "id": 7,
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "q", "name": "x"},
            {"role": "assistant", "content": "a"},
        ],
        "meta": {"source": "web"},
    }
    path.write_text(json.dumps(row) + "\n")
    assert load_demonstrations(path) == [Demonstration((user("q"),), "a")]


def test_huge_strings_and_control_characters_are_valid_text(tmp_path):
    big = "word " * 200_000  # 1 MB
    controls = "tab\there, bell\x07, escape\x1b[0m, DEL\x7f, CR\r, form feed\x0c"
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"prompt": big, "completion": controls})
        + "\n"
        # raw (unescaped) control characters inside a JSON string are accepted too
        + '{"prompt": "raw\ttab", "completion": "x\x01y"}\n',
        encoding="utf-8",
    )
    assert load_demonstrations(path) == [Demonstration(big, controls), Demonstration("raw\ttab", "x\x01y")]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,completion\n" + big + "," + "x" * 300_000 + "\n")
    assert load_demonstrations(csv_path) == [Demonstration(big, "x" * 300_000)]


# ------------------------------------------------------------------------------------------------
# Implicit prompts


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("Q: 2+2? A: 4", "Q: 2+2? A: 5", ("Q: 2+2? A:", " 4", " 5")),
        # shared "c" would start both responses mid-word: cut back to the word boundary
        ("English: cat", "English: chatter", ("English:", " cat", " chatter")),
        # "I" vs "I'm": an apostrophe continues the word
        ("Q: I think so", "Q: I'm not sure", ("Q:", " I think so", " I'm not sure")),
        # one text is a prefix of the other: both responses stay non-empty
        ("Say hi. Hello world", "Say hi. Hello world!", ("Say hi. Hello", " world", " world!")),
        # newlines where the texts part go to the responses, as spaces do
        (
            "Human: hi\n\nAssistant: Hello there",
            "Human: hi\n\nAssistant: Go away",
            ("Human: hi\n\nAssistant:", " Hello there", " Go away"),
        ),
    ],
)
def test_split_shared_prefix(chosen, rejected, expected):
    assert split_shared_prefix(chosen, rejected) == expected
    prompt, c, r = expected
    assert prompt + c == chosen and prompt + r == rejected


@pytest.mark.parametrize(
    "chosen, rejected, words",
    [
        ("same text", "same text", "identical"),
        ("cat", "dog", "share no prompt prefix"),
        ("cathedral", "catapult", "share no prompt prefix"),  # the shared "cat" is inside a word
        ("  a", "  b", "share no prompt prefix"),  # only whitespace is shared
    ],
)
def test_split_shared_prefix_refuses(chosen, rejected, words):
    with pytest.raises(ValueError, match=words):
        split_shared_prefix(chosen, rejected)


# ------------------------------------------------------------------------------------------------
# Sources: folders, saved datasets, hub names


def test_folder_reads_data_files_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    shutil.copy(FORMATS / "pairs.jsonl", tmp_path / "b" / "part.jsonl")
    shutil.copy(FORMATS / "pairs.csv", tmp_path / "a.csv")
    (tmp_path / "README.md").write_text("# not data\n")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "junk.jsonl").write_text("not json\n")
    pairs = load_preferences(tmp_path)
    assert pairs == PAIRS + PAIRS
    assert pairs[0].origin == f"{tmp_path / 'a.csv'}:2" and pairs[3].origin == f"{tmp_path / 'b' / 'part.jsonl'}:1"


def test_folder_named_by_split_reads_only_the_requested_split(tmp_path):
    rows = _jsonl_rows("pairs.jsonl")
    (tmp_path / "data").mkdir()
    for split, part in (("train", rows[:2]), ("test", rows[2:])):
        (tmp_path / "data" / f"{split}-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "part.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert load_preferences(tmp_path) == PAIRS[:2]
    assert load_preferences(tmp_path, split="test") == PAIRS[2:]
    assert load_preferences(tmp_path, split="validation") == PAIRS[:1]
    with pytest.raises(DataError) as info:
        load_preferences(tmp_path, split="dev")
    assert info.value.problems == [
        f"{tmp_path}: no files for split 'dev' in this folder (its files are named for "
        f"split(s): test, train, validation); choose one with --dataset_split"
    ]


def test_saved_dataset_folder(tmp_path):
    import datasets

    rows = _jsonl_rows("pairs.jsonl")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows[2:])}
    ).save_to_disk(str(tmp_path / "saved"))
    assert load_preferences(tmp_path / "saved") == PAIRS[:2]
    assert load_preferences(tmp_path / "saved", split="test") == PAIRS[2:]
    assert load_preferences(tmp_path / "saved", split="test")[0].origin == f"{tmp_path / 'saved'}[test]:1"


def test_a_name_that_is_no_local_path_goes_to_the_hub_and_fails_cleanly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_preferences("tether-tests/no-such-dataset", split="train")
    (problem,) = info.value.problems
    assert problem.startswith(
        "tether-tests/no-such-dataset: not a local path, and the Hugging Face dataset "
        "'tether-tests/no-such-dataset' (split 'train') could not be loaded"
    )


def test_a_missing_data_file_is_never_looked_up_on_the_hub(tmp_path):
    with pytest.raises(DataError) as info:
        load_preferences("missing/pairs.jsonl")
    assert info.value.problems == ["missing/pairs.jsonl: no such file or folder"]
    with pytest.raises(DataError) as info:
        load_preferences(tmp_path / "empty-folder-does-not-exist")
    assert info.value.problems == [f"{tmp_path / 'empty-folder-does-not-exist'}: no such file or folder"]


# ------------------------------------------------------------------------------------------------
# Bad records: every problem as FILE:LINE: what is wrong (field X)

BAD_PAIR_LINES = [
    (b'{"prompt": "p", "chosen": "a", "rejected": "b"}', None),
    (b'{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    (
        b'{"prompt": 3, "chosen": "a", "rejected": "b"}',
        "expected a string or a list of messages, got number (field prompt)",
    ),
    (b'{"prompt": "p", "chosen": "   ", "rejected": "b"}', "empty text (field chosen)"),
    (
        b'{"prompt": "p", "responses": [{"text": "a", "label": "preferred"}, {"text": "b", "label": "bad"}]}',
        "label must be 'preferred' or 'disliked', got 'bad' (field responses[1].label)",
    ),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b"', "invalid JSON (Expecting ',' delimiter at column 47)"),
    (b'["p", "a", "b"]', "expected a JSON object (a record), got list"),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "invalid UTF-8 (byte 0xe9 at column 16)"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b\\u0000"}', "text contains a NUL character (field rejected)"),
    (b"   ", None),  # blank lines are skipped
    (
        b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "high"}',
        "expected a number, got string (field margin)",
    ),
    (
        b'{"prompt": [{"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"}',
        "role must be one of system, user, assistant, got 'tool' (field prompt[0].role)",
    ),
    (b'{"prompt": null, "chosen": "a", "rejected": "b"}', "field 'prompt' is null"),
    (
        b'{"prompt": [{"role": "user", "content": "q"}], "chosen": '
        b'[{"role": "user", "content": "a"}], "rejected": "b"}',
        "the last message must be the assistant's response, got role 'user' (field chosen[0].role)",
    ),
    (
        b'{"prompt": "p", "responses": [{"text": "a", "label": "disliked"}]}',
        "a ranked record needs exactly one 'preferred' response, found 0 (field responses)",
    ),
    (
        b'{"chosen": "same", "rejected": "same"}',
        "chosen and rejected are identical, so no prompt can be told apart from the responses (field prompt)",
    ),
    (
        b'{"prompt": "p", "chosen": "a", "rejected": "\\ud800"}',
        "text contains an unpaired surrogate U+D800, which is not valid Unicode (field rejected)",
    ),
    (
        b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}',
        "margin must be a finite number, got nan (field margin)",
    ),
    (
        b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1' + b"0" * 400 + b"}",
        "margin must be a finite number, got 1000000000000000000000000000000000000... (field margin)",
    ),
]


def test_each_kind_of_bad_record_is_reported_with_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_PAIR_LINES) + b"\n")
    with pytest.raises(DataError) as info:
        load_preferences(path)
    expected = [f"{path}:{n}: {message}" for n, (_, message) in enumerate(BAD_PAIR_LINES, 1) if message]
    assert info.value.problems == expected
    assert info.value.total == len(expected) == 17


def test_one_record_with_several_problems_reports_each(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "", "chosen": 1, "margin": True}) + "\n")
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert info.value.problems == [
        f"{path}:1: missing field 'rejected'",
        f"{path}:1: expected a number, got boolean (field margin)",
        f"{path}:1: empty text (field prompt)",
        f"{path}:1: expected a string, an assistant message or a list of messages, got number (field chosen)",
    ]


def test_many_problems_are_all_counted_and_the_first_twenty_shown(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", "completion": ""}) + "\n" for _ in range(50)))
    with pytest.raises(DataError) as info:
        load_demonstrations(path)
    assert info.value.total == 50 and len(info.value.problems) == 50
    assert info.value.problems[49] == f"{path}:50: empty text (field completion)"
    text = str(info.value).splitlines()
    assert len(text) == 21 and text[19] == f"{path}:20: empty text (field completion)"
    assert text[20] == "... and 30 more problem(s)"


def test_problems_in_several_files_of_a_folder_are_all_reported(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p"}\n')
    (tmp_path / "b.csv").write_text("prompt,completion\np,\n")
    with pytest.raises(DataError) as info:
        load_demonstrations(tmp_path)
    assert info.value.problems == [
        f"{tmp_path / 'a.jsonl'}:1: missing field 'completion'",
        f"{tmp_path / 'b.csv'}:2: row 1: missing field 'completion'",
    ]


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("empty.jsonl", b"", "1: the file is empty"),
        ("blank.json", b"  \n\n ", "1: the file is empty"),
        ("empty.csv", b"", "1: the file is empty"),
        ("header.csv", b"prompt,completion\n", "1: no records (only a header row)"),
        ("empty-list.json", b"[\n]\n", "1: no records (an empty list)"),
        (
            "notes.txt",
            b'{"prompt": "p"}\n',
            "1: unsupported file type .txt: expected .jsonl, .json, .csv or .parquet "
            "(.jsonl.gz, .json.gz, .csv.gz also work)",
        ),
        ("utf16.jsonl", '{"prompt": "p"}\n'.encode("utf-16"), "1: the file is UTF-16 encoded; save it as UTF-8"),
        (
            "broken.json",
            b'[\n {"prompt": "a"},\n {"prompt": "b"\n]\n',
            "4: invalid JSON (Expecting ',' delimiter at column 1)",
        ),
        ("trailing.json", b'[{"prompt": "a"}]\nxyz\n', "2: invalid JSON (unexpected content after the list)"),
        ("scalar.json", b'\n"just a string"\n', "2: expected a JSON list of records (or one record object)"),
        ("latin1.json", b'[\n{"prompt": "a"},\n{"prompt": "caf\xe9"}]\n', "3: invalid UTF-8 (byte 0xe9 at column 16)"),
        ("latin1.csv", b"prompt\na\ncaf\xe9\n", "3: invalid UTF-8 (byte 0xe9 at column 4)"),
        (
            "cells.csv",
            b'prompt,completion\n"multi\nline",ok\np,c,extra\n',
            "4: row 2: 3 cells, but the header has 2 columns",
        ),
        ("header-dup.csv", b"prompt,prompt\na,b\n", "1: bad CSV header: repeated column name(s) prompt"),
        ("garbage.parquet", b"PAR1 this is not a parquet file", None),
        ("garbage.jsonl.gz", b"not gzip at all", None),
        ("deep.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "1: invalid JSON (nested too deeply)"),
        (
            "bigint.jsonl",
            b'\n{"prompt": "p", "n": ' + b"9" * 5000 + b"}\n",
            "2: invalid JSON (Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; "
            "use sys.set_int_max_str_digits() to increase the limit)",
        ),
        ("separators.csv", b"\x1c\x1d\n\x1e\n", "1: the file is empty (no header row)"),
    ],
)
def test_bad_files_are_reported_with_file_and_line(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_prompts(path)
    (message,) = info.value.problems
    if problem is None:  # the reader's own words vary by library version; the location does not
        assert message.startswith(f"{path}:1: ")
    else:
        assert message == f"{path}:{problem}"


def test_wrong_kind_of_file_names_the_missing_fields(tmp_path):
    with pytest.raises(DataError) as info:
        load_preferences(FORMATS / "demos.jsonl")
    assert info.value.problems[:2] == [
        f"{FORMATS / 'demos.jsonl'}:1: missing field 'chosen'",
        f"{FORMATS / 'demos.jsonl'}:1: missing field 'rejected'",
    ]
    with pytest.raises(DataError) as info:
        load_demonstrations(FORMATS / "pairs_implicit.jsonl")
    assert info.value.problems[0] == (
        f"{FORMATS / 'pairs_implicit.jsonl'}:1: a preference record is not a "
        "demonstration: missing field 'completion' (or 'messages')"
    )


@pytest.mark.parametrize(
    "row, problem",
    [
        (
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "completion": "b"},
            "the prompt ends with an assistant turn: nothing is left to answer (field prompt)",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}]},
            "the conversation holds only the assistant turn: at least one message must come before it (field messages)",
        ),
        ({"messages": "hello"}, "expected a list of messages, got string (field messages)"),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
            "missing field 'messages[0].content'",
        ),
        (
            {"prompt": "p", "completion": {"role": "user", "content": "a"}},
            "the response must be an assistant message, got role 'user' (field completion.role)",
        ),
    ],
)
def test_bad_demonstrations(tmp_path, row, problem):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        load_demonstrations(path)
    assert info.value.problems == [f"{path}:1: {problem}"]


@pytest.mark.parametrize(
    "row, problem",
    [
        (
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
            },
            "chosen and rejected must share every message but the last (assistant) one (field rejected)",
        ),
        (
            {"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
            "no prompt: the conversations hold only the assistant turn; "
            "add a 'prompt' field or the user turn (field prompt)",
        ),
        (
            {"chosen": "full text a", "rejected": [{"role": "assistant", "content": "b"}]},
            "without a 'prompt' field, chosen and rejected must both "
            "be full texts or both full conversations (field prompt)",
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "responses": []},
            "a record has either 'responses' (ranked) or 'chosen'/'rejected', not both (field responses)",
        ),
        (
            {"prompt": "p", "responses": [{"text": "a", "label": "preferred"}, {"text": "b", "label": "preferred"}]},
            "a ranked record needs exactly one 'preferred' response, found 2 (field responses)",
        ),
        (
            {"prompt": "p", "responses": [{"text": "a", "label": "preferred"}]},
            "a ranked record needs at least one 'disliked' response (field responses)",
        ),
        ({"prompt": "p", "responses": "a"}, "expected a list of {text, label} objects, got string (field responses)"),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [
                    {"role": "assistant", "content": "x"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "chosen and rejected continue different conversations: "
            "the messages before the final assistant turn must be "
            "the same (field rejected)",
        ),
    ],
)
def test_bad_preference_shapes(tmp_path, row, problem):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert info.value.problems == [f"{path}:1: {problem}"]


def test_parquet_rows_are_counted_from_one(tmp_path):
    import pandas as pd

    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["a", "b", "c"], "completion": ["x", "  ", "z"]}).to_parquet(path)
    with pytest.raises(DataError) as info:
        load_demonstrations(path)
    assert info.value.problems == [f"{path}:2: row 2: empty text (field completion)"]


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="kind must be one of"):
        load_records(FORMATS / "pairs.jsonl", "pairs")


# ------------------------------------------------------------------------------------------------
# Train/eval split


def test_split_train_eval_is_deterministic_and_keeps_order():
    records = [Demonstration(f"prompt {i}", "c") for i in range(20)]
    train, held = split_train_eval(records, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(train + held, key=records.index) == records
    assert train == sorted(train, key=records.index) and held == sorted(held, key=records.index)
    assert split_train_eval(records, 0.25, seed=3) == (train, held)
    assert split_train_eval(records, 0.25, seed=4)[1] != held
    assert split_train_eval(records, 0.0, seed=3) == (records, [])
    assert len(split_train_eval(records, 0.01, seed=3)[1]) == 1  # ceil: any positive ratio holds one out


def test_split_train_eval_keeps_pairs_of_one_prompt_together():
    pairs = [PreferencePair(f"p{i // 3}", "a", f"r{i}") for i in range(30)]  # 10 prompts x 3 pairs
    train, held = split_train_eval(pairs, 0.2, seed=0)
    assert len(held) == 6  # two whole prompts
    assert not {p.prompt for p in train} & {p.prompt for p in held}


def test_split_train_eval_refuses_to_leave_nothing_to_train_on():
    from tether.config import ConfigError

    pairs = [PreferencePair("same prompt", "a", f"r{i}", origin=f"x.jsonl:{i + 1}") for i in range(4)]
    with pytest.raises(DataError, match="x.jsonl:1: eval_split_ratio 0.1 leaves no training records"):
        split_train_eval(pairs, 0.1, seed=0)
    assert len(split_train_eval(pairs, 0.1, seed=0, group_by_prompt=False)[1]) == 1
    with pytest.raises(ConfigError, match=r"eval_split_ratio must be in \[0, 1\), got 1.0"):
        split_train_eval(pairs, 1.0, seed=0)


# ------------------------------------------------------------------------------------------------
# The README's examples are real


def _readme_examples() -> list[list[dict]]:
    readme = (Path(__file__).parent.parent / "docs" / "data.md").read_text(encoding="utf-8")
    section = readme.split("## Data formats", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```jsonc\n")[1:]]
    return [[json.loads(line.split("  //")[0]) for line in block.strip().splitlines()] for block in blocks]


def test_readme_data_format_examples_load(tmp_path):
    preference_rows, demonstration_rows = _readme_examples()
    path = tmp_path / "readme.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows))
    pairs = load_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected, p.margin) for p in pairs] == [
        ("2+2?", " 4", " 5", 1.0),
        ("Q: 2+2? A:", " 4", " 5", None),
        ((user("2+2?"),), "4", "5", None),
        ((user("2+2?"),), "4", "5", None),
        ("2+2?", "4", "5", None),
        ("2+2?", "4", "22", None),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in demonstration_rows))
    assert load_demonstrations(path) == [
        Demonstration("2+2?", "4"),
        Demonstration((sys_("Be brief."), user("2+2?")), "4"),
    ]


# ------------------------------------------------------------------------------------------------
# Dataset configurations (--dataset_config), held-out splits (--dataset_test_split), in-memory datasets


def _write_config_folder(root: Path, rows: list[dict]) -> None:
    """A local dataset folder with two configurations, one subfolder each, split files inside."""
    for config, chosen in (("en", rows[:2]), ("fr", rows[2:])):
        (root / config).mkdir(parents=True)
        (root / config / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen[:1]))
        (root / config / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen[1:] or chosen))


def test_dataset_config_picks_a_subfolder_of_a_local_folder(tmp_path):
    _write_config_folder(tmp_path / "ds", _jsonl_rows("pairs.jsonl"))
    assert load_preferences(tmp_path / "ds", split="train", dataset_config="en") == PAIRS[:1]
    assert load_preferences(tmp_path / "ds", split="test", dataset_config="en") == PAIRS[1:2]
    (pair,) = load_preferences(tmp_path / "ds", split="test", dataset_config="fr")
    assert pair == PAIRS[2] and pair.origin == f"{tmp_path / 'ds' / 'fr' / 'test.jsonl'}:1"  # FILE:LINE still


def test_dataset_config_declared_in_a_readme_goes_through_datasets_load_dataset(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rows = _jsonl_rows("pairs.jsonl")
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "a-train.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    (folder / "data" / "b-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: good\n  data_files:\n  - split: train\n    path: data/b-train.jsonl\n"
        "- config_name: broken\n  data_files:\n  - split: train\n    path: data/a-train.jsonl\n---\n"
    )
    pairs = load_preferences(folder, split="train", dataset_config="good")
    assert pairs == PAIRS[1:]
    assert [p.origin for p in pairs] == [f"{folder}(good)[train]:1", f"{folder}(good)[train]:2"]
    with pytest.raises(DataError) as info:  # the rows of a configuration are checked like a file's
        load_preferences(folder, split="train", dataset_config="broken")
    assert info.value.problems[0].startswith(f"{folder}(broken)[train]:2: ")
    with pytest.raises(DataError) as info:
        load_preferences(folder, split="train", dataset_config="nope")
    (problem,) = info.value.problems
    assert problem.startswith(f"{folder}: the local dataset folder (configuration 'nope', split 'train') could not")
    with pytest.raises(DataError, match="has no configurations"):
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
        load_preferences(tmp_path / "saved", dataset_config="good")


def test_held_out_split_of_a_saved_dataset_and_of_an_eval_dataset(tmp_path):
    import datasets

    from tether.config import parse_config
    from tether.stages.common import stage_data
    from tether.stages.reward import RewardConfig

    rows = _jsonl_rows("pairs.jsonl")
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows[2:])}
    ).save_to_disk(str(saved))
    flags = ["--output_dir", str(tmp_path / "rm"), "--report_to", "none", "--dataset_name", str(saved)]
    # TRL's --dataset_test_split: the held-out records are that split of --dataset, not a random share
    config = parse_config(RewardConfig, [*flags, "--dataset_test_split", "test"])
    train, held_out = stage_data(load_preferences, config, "rm")
    assert (train, held_out) == (PAIRS[:2], PAIRS[2:])
    assert held_out[0].origin == f"{saved}[test]:1"
    # --eval_dataset is read at --dataset_test_split (it used to reuse --dataset_split)
    other = tmp_path / "other"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(other))
    config = parse_config(RewardConfig, [*flags, "--eval_dataset", str(other), "--dataset_test_split", "validation"])
    assert stage_data(load_preferences, config, "rm") == (PAIRS[:2], PAIRS[:1])
    # without either, --eval_split_ratio still holds out a share of the training split
    config = parse_config(RewardConfig, [*flags, "--eval_split_ratio", "0.5"])
    train, held_out = stage_data(load_preferences, config, "rm")
    assert sorted(train + held_out, key=PAIRS.index) == PAIRS[:2] and len(held_out) == 1


def test_in_memory_datasets_and_rows_are_checked_like_files():
    import datasets

    rows = _jsonl_rows("pairs.jsonl")
    pairs = load_preferences(datasets.Dataset.from_list(rows))
    assert pairs == PAIRS and pairs[1].origin == "dataset[train]:2"
    dataset_dict = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1])})
    dataset_dict["test"] = datasets.Dataset.from_list(rows[1:])
    assert load_preferences(dataset_dict, split="test") == PAIRS[1:]
    with pytest.raises(DataError) as info:
        load_preferences(datasets.Dataset.from_list([rows[0], {"prompt": "p", "chosen": "c"}]))
    (problem,) = info.value.problems
    assert problem.startswith("dataset[train]:2: ") and "rejected" in problem
    with pytest.raises(DataError) as info:
        load_preferences([rows[0], {"prompt": "p", "chosen": "c"}])  # plain row dicts
    assert info.value.problems[0].startswith("records:2: ")
    assert load_preferences(PAIRS) == PAIRS  # records pass through


def test_truncated_flags_are_read_and_checked():
    from tether.data.formats import RecordProblems, parse_preference

    (pair,) = parse_preference({"prompt": "q", "chosen": "a", "rejected": "b", "rejected_truncated": True})
    assert (pair.chosen_truncated, pair.rejected_truncated) == (False, True)
    with pytest.raises(RecordProblems) as err:
        parse_preference({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_truncated": "yes"})
    assert "expected true or false, got string (field chosen_truncated)" in str(err.value)


def test_a_truncated_response_gets_no_stop_token(tokenizer):
    from tether.data.records import PreferencePair
    from tether.data.templates import Truncation, response_ids
    from tether.stages.dpo import tokenize_pairs
    from tether.stages.reward import tokenize_preferences

    pair = PreferencePair("q", "a finished answer", "an answer cut at the", rejected_truncated=True)
    stop = tokenizer.eos_token_id
    rm = tokenize_preferences(tokenizer, [pair], Truncation()).pairs[0]
    assert list(rm.chosen) == response_ids(tokenizer, "a finished answer") and rm.chosen[-1] == stop
    assert list(rm.rejected) == tokenizer("an answer cut at the", add_special_tokens=False)["input_ids"]
    assert rm.rejected[-1] != stop
    (dpo,), _, _ = tokenize_pairs(tokenizer, [pair], Truncation())
    assert (dpo.chosen, dpo.rejected) == (list(rm.chosen), list(rm.rejected))
