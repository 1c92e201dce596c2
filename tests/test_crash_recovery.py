"""Issue 8, crash recovery and non-finite steps, on real processes and tiny real models.

* ``tether ppo`` killed with SIGKILL at a random moment, resumed with ``--resume_from_checkpoint
  latest``, ends with the metrics and weights of an uninterrupted run of the same seed.
* A Trainer stage (``tether sft``) killed in the middle of writing a checkpoint leaves no folder that
  resume would pick; resuming continues from the last complete checkpoint, keeps the last
  ``--save_total_limit`` and ends with the uninterrupted run's weights.
* Non-finite losses in the Trainer stages (rm, dpo): the step is skipped (the weights do not move),
  counted and logged with its batch; ``--max_bad_steps`` in a row stop the run with a clear message
  and the last good checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ppo_tiny import one_torch_thread, word_dirs  # noqa: F401  (fixtures)

from tether.tracking import read_jsonl

HERE = Path(__file__).parent
PROMPTS = ["a b c", "d e", "yes no", "x y z w", "good a", "m n o p q", "k", "s t u"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("time", "throughput"))}


def _assert_close_rows(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        ra, rb = _comparable(ra), _comparable(rb)
        assert ra.keys() == rb.keys(), ra["step"]
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=tol, abs=tol), (ra["step"], key)
            else:
                assert rb[key] == value, (ra["step"], key)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---- PPO: SIGKILL at a random moment ---------------------------------------------------------------
def test_ppo_killed_with_sigkill_at_a_random_moment_resumes_to_the_uninterrupted_result(tmp_path, word_dirs, caplog):
    from safetensors.torch import load_file

    from tether.cli import main
    from tether.durable import complete_checkpoints
    from tether.ppo.checkpoint import resolve_checkpoint

    iterations = 24
    data = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    flags = [
        "--model_name_or_path",
        str(word_dirs["policy"]),
        "--reward_model_path",
        str(word_dirs["counting_rm"]),
        "--dataset",
        str(data),
        "--batch_size",
        "4",
        "--mini_batch_size",
        "2",
        "--ppo_epochs",
        "2",
        "--max_new_tokens",
        "4",
        "--num_iterations",
        str(iterations),
        "--save_steps",
        "1",
        "--save_total_limit",
        "2",
        "--target_kl",
        "6",
        "--init_kl_coef",
        "0.2",
        "--learning_rate",
        "1e-2",
        "--seed",
        "3",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
        "--logging_steps",
        "1000",
        "--keep_checkpoints",
        "true",
    ]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "ppo", *flags, "--output_dir", str(killed)],
        cwd=tmp_path,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert main(["ppo", *flags, "--output_dir", str(whole)]) == 0  # the uninterrupted run, meanwhile

        # once the first checkpoint exists: measure the pace, then kill at a random moment of the rest
        rows: list = []
        while process.poll() is None and len(rows) < 2:
            time.sleep(0.02)
            if (killed / "checkpoint-1").is_dir() and (killed / "metrics.jsonl").is_file():
                rows = read_jsonl(killed / "metrics.jsonl")
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        pace = (rows[-1]["time"] - rows[0]["time"]) / (len(rows) - 1)
        delay = random.Random(8).uniform(0.0, (iterations - len(rows) - 3) * pace)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill: raise --num_iterations"

    logged = len(read_jsonl(killed / "metrics.jsonl"))
    complete = complete_checkpoints(killed)
    assert complete and 1 <= logged < iterations
    # every checkpoint-N folder is complete: an interrupted save can only leave a hidden .tmp- folder
    assert all((p / "trainer_state.json").is_file() for p in killed.glob("checkpoint-*"))
    last = int(complete[-1].name.split("-")[1])
    assert logged - last in (0, 1)  # at most the iteration after the last checkpoint is lost
    (killed / "checkpoint-999" / "policy").mkdir(parents=True)  # a half-written folder from elsewhere
    shutil.copy(word_dirs["policy"] / "config.json", killed / "checkpoint-999" / "policy")
    assert resolve_checkpoint(killed, "latest") == complete[-1]

    caplog.set_level("INFO", logger="tether.ppo.trainer")
    assert main(["ppo", *flags, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"]) == 0
    assert f"resumed from {complete[-1]} at iteration {last}" in caplog.text

    _assert_close_rows(read_jsonl(whole / "metrics.jsonl"), read_jsonl(killed / "metrics.jsonl"))
    final_whole = json.loads((whole / "ppo_summary.json").read_text())
    final_killed = json.loads((killed / "ppo_summary.json").read_text())
    assert final_killed["iterations"] == final_whole["iterations"] == iterations
    _assert_close_rows([{"step": 0, **final_whole["final_metrics"]}], [{"step": 0, **final_killed["final_metrics"]}])
    for part in ("policy", "value_model"):
        a = load_file(whole / part / "model.safetensors")
        b = load_file(killed / part / "model.safetensors")
        assert _max_difference(a, b) <= 1e-6, part
    kept = [p.name for p in complete_checkpoints(killed)]
    assert kept == [f"checkpoint-{iterations - 1}", f"checkpoint-{iterations}"]
    assert (killed / "checkpoint-999").is_dir() and not list(killed.glob(".tmp-*"))


# ---- Trainer stages: a kill while a checkpoint is written -------------------------------------------
def test_sft_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from tether.cli import main
    from tether.durable import complete_checkpoints, latest_checkpoint

    rng = random.Random(5)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    data = _write_jsonl(
        tmp_path / "demos.jsonl",
        [
            {
                "prompt": " ".join(rng.choices(words, k=rng.randint(1, 6))),
                "completion": " ".join(rng.choices(words, k=rng.randint(1, 6))),
            }
            for _ in range(16)
        ],
    )
    flags = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--eval_split_ratio",
        "0",
        "--per_device_train_batch_size",
        "4",
        "--num_train_epochs",
        "1",
        "--learning_rate",
        "1e-2",
        "--lr_scheduler_type",
        "constant",
        "--logging_steps",
        "1",
        "--save_steps",
        "1",
        "--save_total_limit",
        "2",
        "--keep_checkpoints",
        "true",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, str(HERE / "kill_during_save_worker.py"), "3", "sft", *flags, "--output_dir", str(killed)],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert main(["sft", *flags, "--output_dir", str(whole)]) == 0  # the uninterrupted run, meanwhile
    output, _ = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, output[-3000:]

    # killed while writing checkpoint-3: its files sit in the hidden staging folder, never under its name
    staged = killed / ".tmp-checkpoint-3" / "checkpoint-3"
    assert (staged / "model.safetensors").is_file() and not (staged / "trainer_state.json").exists()
    assert not (killed / "checkpoint-3").exists()
    assert [p.name for p in complete_checkpoints(killed)] == ["checkpoint-1", "checkpoint-2"]
    (killed / "checkpoint-999").mkdir()  # an unfinished folder left by something else: never picked
    shutil.copy(tiny_model_dir / "config.json", killed / "checkpoint-999")
    assert latest_checkpoint(killed) == killed / "checkpoint-2"
    assert [r["step"] for r in read_jsonl(killed / "metrics.jsonl") if "loss" in r] == [1, 2, 3]

    assert main(["sft", *flags, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"]) == 0
    rows_whole = [r for r in read_jsonl(whole / "metrics.jsonl") if "loss" in r]
    rows_killed = [r for r in read_jsonl(killed / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows_killed] == [1, 2, 3, 4]  # the killed run's step-3 row was replaced
    for a, b in zip(rows_whole, rows_killed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6)
    assert _max_difference(load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")) <= 1e-6
    # --save_total_limit 2: the newest two complete checkpoints; the stray folder is left alone
    for folder in (whole, killed):
        assert [p.name for p in complete_checkpoints(folder)] == ["checkpoint-3", "checkpoint-4"]
    assert (killed / "checkpoint-999").is_dir() and not list(killed.glob(".tmp-*"))
    state = json.loads((killed / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_resume_latest_without_a_checkpoint_starts_from_the_beginning_and_a_bad_path_is_refused(
    tmp_path, tiny_model_dir
):
    from tether.config import ConfigError
    from tether.data.records import Demonstration
    from tether.stages.sft import SFTConfig, train_sft

    demos = [Demonstration(prompt="alpha beta", completion="gamma")] * 4
    config = SFTConfig(
        model_name_or_path=str(tiny_model_dir),
        output_dir=str(tmp_path / "sft"),
        per_device_train_batch_size=2,
        num_train_epochs=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        resume_from_checkpoint="latest",
        eval_split_ratio=0,
    )
    folder = train_sft(config, demos)
    assert json.loads((folder / "training_summary.json").read_text())["global_steps"] == 2
    config = SFTConfig(
        model_name_or_path=str(tiny_model_dir),
        output_dir=str(tmp_path / "sft2"),
        per_device_train_batch_size=2,
        num_train_epochs=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        resume_from_checkpoint=str(tmp_path / "nowhere"),
    )
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        train_sft(config, demos)


# ---- non-finite losses in the Trainer stages --------------------------------------------------------
# A margin of 1e39 is a finite number to Python and passes the data layer, but overflows float32 to
# inf: r_w − r_l − m = −inf, so the Bradley–Terry loss of that batch is +inf.
HUGE_MARGIN = 1e39


def _rm_pairs(n: int, seed: int, margin_at: set[int] = frozenset()) -> list:
    from tether.data.records import PreferencePair

    rng = random.Random(seed)
    words = "the a small old red quick calm open soft warm".split()
    out = []
    for i in range(n):
        text = " ".join(rng.choices(words, k=rng.randint(2, 5)))
        out.append(
            PreferencePair(
                prompt=f"Say something {rng.choice(words)}.",
                chosen=f"banana {text}",
                rejected=f"window {text}",
                margin=HUGE_MARGIN if i in margin_at else None,
            )
        )
    return out


def _rm_config(output_dir: Path, model_dir: Path, **overrides):
    from tether.stages.reward import RewardConfig

    values = dict(
        output_dir=str(output_dir),
        model_name_or_path=str(model_dir),
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        reward_stats_max_pairs=8,
        use_cpu=True,
        train_sampling_strategy="sequential",
        lr_scheduler_type="constant",
    )
    values.update(overrides)
    return RewardConfig(**values)


def test_a_non_finite_rm_step_is_skipped_counted_and_logged_and_the_weights_do_not_move(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from tether.stages.reward import train_reward

    pairs = _rm_pairs(16, seed=2, margin_at={6})  # batches of 4 in order: the second one has the huge margin
    with_bad = train_reward(_rm_config(tmp_path / "with_bad", tiny_model_dir), pairs)
    without = train_reward(_rm_config(tmp_path / "without", tiny_model_dir), pairs[:4] + pairs[8:])
    # skipping a step is as if its batch had not been there: same weights as training on the other three
    # batches (constant learning rate; AdamW's step count moves only on real steps)
    a, b = load_file(with_bad / "model.safetensors"), load_file(without / "model.safetensors")
    assert _max_difference(a, b) <= 1e-7
    assert all(torch.isfinite(t).all() for t in a.values())

    logged = read_jsonl(with_bad / "bad_batches.jsonl")
    assert len(logged) == 1 and logged[0]["step"] == 2 and logged[0]["reason"] == "non-finite loss"
    assert logged[0]["loss"] == "inf" and logged[0]["margin"] == [0.0, 0.0, "inf", 0.0]
    # the logged texts are the batch's model rows (with padding-free rows, several pairs share one)
    assert any(pairs[6].chosen in text for text in logged[0]["texts"])
    rows = [r for r in read_jsonl(with_bad / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r.get("bad_steps", 0) for r in rows] == [0, 1, 1, 1]


def test_max_bad_steps_in_a_row_stop_the_rm_command_and_keep_the_last_good_checkpoint(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    from tether.cli import main
    from tether.durable import complete_checkpoints

    pairs = _rm_pairs(16, seed=4, margin_at=set(range(4, 16)))  # only the first batch of 4 is finite
    data = _write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "prompt": p.prompt,
                "chosen": p.chosen,
                "rejected": p.rejected,
                **({"margin": p.margin} if p.margin is not None else {}),
            }
            for p in pairs
        ],
    )
    out = tmp_path / "rm"
    code = main(
        [
            "rm",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--dataset",
            str(data),
            "--eval_split_ratio",
            "0",
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "3e-3",
            "--logging_steps",
            "1",
            "--save_steps",
            "1",
            "--train_sampling_strategy",
            "sequential",
            "--max_bad_steps",
            "2",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "tether rm: error: stopped at step 3 after 2 consecutive steps with non-finite losses" in err
    assert f"the batches are in {out / 'bad_batches.jsonl'}; last good checkpoint: {out / 'checkpoint-1'}" in err
    assert [r["step"] for r in read_jsonl(out / "bad_batches.jsonl")] == [2, 3]
    # no checkpoint of a skipped step, the good one complete and finite, and no final model published
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    assert not [p for p in out.iterdir() if p.name.startswith("checkpoint-") and p.name != "checkpoint-1"]
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    assert not (out / "model.safetensors").exists() and not (out / "training_summary.json").exists()


def test_dpo_against_a_broken_reference_stops_after_max_bad_steps(tmp_path, tiny_model_dir):
    """A reference model whose weights hold a NaN gives NaN log-ratios, so every DPO loss is NaN."""
    from transformers import AutoModelForCausalLM

    from tether.data.records import PreferencePair
    from tether.errors import NonFiniteError
    from tether.stages.dpo import DPOConfig, train_dpo

    broken = tmp_path / "broken-reference"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(broken)
    config = DPOConfig(
        model_name_or_path=str(tiny_model_dir),
        ref_model_name_or_path=str(broken),
        output_dir=str(tmp_path / "dpo"),
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=1,
        max_bad_steps=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        max_length=64,
    )
    pairs = [PreferencePair(prompt=f"Say {w}.", chosen=f"{w} banana", rejected=f"{w} window") for w in "abcdefgh"]
    with pytest.raises(NonFiniteError, match="2 consecutive steps .* last good checkpoint: none"):
        train_dpo(config, pairs)
    logged = read_jsonl(tmp_path / "dpo" / "bad_batches.jsonl")
    assert [r["step"] for r in logged] == [1, 2] and all(r["loss"] == "nan" for r in logged)
    assert not list((tmp_path / "dpo").glob("checkpoint-*"))
