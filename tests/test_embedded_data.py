"""The embedded demo task's data (``embedded:demo``): every kind and split through the data layer, the
split rule, and library stages that refuse to run without --dataset."""

from __future__ import annotations

import logging

import pytest

from tether.config import ConfigError
from tether.data import embedded
from tether.data.errors import DataError
from tether.data.loading import load_demonstrations, load_preferences, load_prompts
from tether.data.records import Message, PreferencePair
from tether.data.writing import write_preferences

# the shipped files: 371 prompts (301 train, 70 held out), 52 demonstrations, the fixed pairs
TRAIN_PROMPTS, TEST_PROMPTS, DEMONSTRATIONS, PREFERENCES = 301, 70, 52, 120


def test_embedded_demo_loads_every_kind_and_split_with_its_count():
    assert len(load_prompts("embedded:demo")) == TRAIN_PROMPTS
    assert len(load_prompts("embedded:demo", "train")) == TRAIN_PROMPTS
    assert len(load_prompts("embedded:demo", "test")) == TEST_PROMPTS
    assert len(load_demonstrations("embedded:demo")) == DEMONSTRATIONS
    pairs = load_preferences("embedded:demo")
    assert len(pairs) == PREFERENCES
    train_texts = {r.prompt for r in load_prompts("embedded:demo")}
    assert all(p.prompt in train_texts and p.chosen != p.rejected for p in pairs)  # pairs never use held-out prompts
    first = pairs[0]
    assert first.origin == "embedded:demo/preferences.jsonl:1"


def test_embedded_demo_refuses_other_splits_naming_the_option():
    with pytest.raises(DataError, match="no split 'validation'.*--dataset_split train"):
        load_prompts("embedded:demo", "validation")
    with pytest.raises(DataError, match="split 'test' holds prompts only; the demonstrations are in split 'train'"):
        load_demonstrations("embedded:demo", "test")
    with pytest.raises(DataError, match="the preferences are in split 'train'"):
        load_preferences("embedded:demo", "test")


def test_resolving_embedded_demo_says_so_in_the_log(caplog):
    with caplog.at_level(logging.INFO, logger="tether.data.loading"):
        load_prompts("embedded:demo", "test")
    assert caplog.records[0].getMessage() == (
        "using the embedded demo task's data (embedded:demo, split test): 70 prompts"
    )


def test_demo_task_sizes_and_split():
    train, held = load_prompts("embedded:demo"), load_prompts("embedded:demo", "test")
    demos = load_demonstrations("embedded:demo")
    assert len(train) + len(held) >= 300
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.3
    assert len(demos) >= 40
    train_texts, held_texts = {r.prompt for r in train}, {r.prompt for r in held}
    assert not train_texts & held_texts
    assert {d.prompt for d in demos} <= train_texts  # SFT never sees a held-out prompt
    assert len(set(embedded.prompt_categories().values())) >= 8
    assert all(r.origin.startswith("embedded:demo/prompts.jsonl:") for r in held)
    # deterministic: the same split every call, decided by the text alone
    assert [r.prompt for r in load_prompts("embedded:demo", "test")] == [r.prompt for r in held]
    assert embedded.is_heldout_text("x") == embedded.is_heldout_text("x")
    assert all(embedded.is_demo_prompt(r.prompt) for r in train + held)
    assert not embedded.is_demo_prompt("Not one of the shipped prompts.")


def test_demo_files_load_back_through_the_data_layer(tmp_path):
    files = embedded.write_demo_files(tmp_path)
    held = load_prompts("embedded:demo", "test")
    assert [r.prompt for r in load_prompts(str(files.heldout_prompts))] == [r.prompt for r in held]
    assert len(load_prompts(str(files.train_prompts))) == len(load_prompts("embedded:demo"))
    demos = load_demonstrations(str(files.demonstrations))
    expected = load_demonstrations("embedded:demo")
    assert [(d.prompt, d.completion) for d in demos] == [(d.prompt, d.completion) for d in expected]
    chat = (Message("system", "Be brief."), Message("user", "Hi?"))
    pairs = [PreferencePair("Q?", "good", "bad"), PreferencePair(chat, "yes", "no", margin=1.0)]
    path = write_preferences(pairs, tmp_path / "prefs.jsonl")
    back = load_preferences(str(path))
    assert [(p.prompt, p.chosen, p.rejected, p.margin) for p in back] == [
        ("Q?", "good", "bad", None),
        (chat, "yes", "no", 1.0),
    ]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "bon"])
def test_a_library_stage_without_dataset_fails_naming_the_flag_and_embedded_demo(stage, tmp_path, capsys):
    from tether.cli import main

    extra = ["--reward_model_name_or_path", str(tmp_path)] if stage == "bon" else []
    out = tmp_path / "out"
    code = main([stage, "--output_dir", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--dataset is required for `tether {stage}`" in err and "embedded:demo" in err
    assert not out.exists()


def test_require_dataset_message():
    from tether.stages.common import require_dataset

    with pytest.raises(ConfigError, match=r"--dataset is required for `tether sft`.*embedded:demo for the embedded"):
        require_dataset(None, "sft")
    assert require_dataset("embedded:demo", "sft") == "embedded:demo"


def test_tether_rm_trains_on_the_embedded_demo_pairs(tmp_path, tiny_model_dir):
    import json

    from tether.cli import main

    out = tmp_path / "rm"
    args = ["rm", "--model_name_or_path", str(tiny_model_dir), "--dataset", "embedded:demo", "--output_dir", str(out)]
    args += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none"]
    assert main([*args, "--eval_split_ratio", "0.1"]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["train_pairs"] + summary["eval_pairs"] == PREFERENCES and summary["eval_pairs"] >= 12
