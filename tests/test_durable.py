"""The durable-output layer: files and folders appear whole or not at all; checkpoints are listed,
rotated and removed by one set of rules."""

import json

import pytest

from tether import durable


def test_atomic_file_renames_on_success_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "out.json"
    durable.write_json_atomic(target, {"a": 1.5})
    assert json.loads(target.read_text()) == {"a": 1.5}
    with pytest.raises(RuntimeError), durable.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"a": 1.5}  # the old file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temporary file left


def test_jsonl_keeps_text_verbatim(tmp_path):
    path = durable.write_jsonl_atomic(tmp_path / "rows.jsonl", [{"t": "é"}, {"t": "中"}])
    assert path.read_text(encoding="utf-8") == '{"t": "é"}\n{"t": "中"}\n'


def test_staged_output_publishes_merges_old_entries_and_discards_on_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-1").mkdir()
    (out / "model.txt").write_text("old")
    with durable.staged_output(out) as staged:
        (staged / "model.txt").write_text("new")
        assert not (out / "model.txt").read_text() == "new"  # nothing visible before the block ends
    assert (out / "model.txt").read_text() == "new"
    assert (out / "checkpoint-1").is_dir()  # entries the staged folder lacks are kept
    with pytest.raises(KeyboardInterrupt), durable.staged_output(out) as staged:
        (staged / "model.txt").write_text("broken")
        raise KeyboardInterrupt
    assert (out / "model.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging or parked folder left


def _checkpoint(folder, step, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / durable.TRAINER_STATE_FILE).write_text("{}")
    return path


def test_checkpoints_listed_numerically_rotated_and_removed(tmp_path):
    for step in (10, 2, 9):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 999, complete=False)  # unfinished: never listed, counted or deleted
    (tmp_path / ".tmp-checkpoint-11").mkdir()
    assert [p.name for p in durable.complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert durable.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    deleted = durable.rotate_checkpoints(tmp_path, keep=1, protect=tmp_path / "checkpoint-2")
    assert [p.name for p in deleted] == ["checkpoint-9"]
    durable.remove_stale_staging(tmp_path)
    assert not (tmp_path / ".tmp-checkpoint-11").exists()
    assert [p.name for p in durable.remove_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-999"]
    assert durable.latest_checkpoint(tmp_path / "missing") is None


def test_truncate_metrics_drops_rows_after_the_checkpoint(tmp_path):
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}, {"eval": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    durable.truncate_metrics(tmp_path, 2)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"eval": 1}]  # a row without a step is kept
    durable.truncate_metrics(tmp_path / "missing", 2)  # no file: nothing to do


def test_replace_folder_swaps_whole_folders(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("1")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "stale").write_text("0")
    durable.replace_folder(tmp_path / "new", tmp_path / "target")
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
