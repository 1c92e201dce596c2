"""Issue 8, scale-out: the same tiny reward-model and DPO runs on 2 CPU processes (gloo, launched with
``accelerate launch --config_file configs/accelerate/multi_cpu.yaml``) and on 1 process with the same
global batch (8 pairs: 2 × 4 against 1 × 8) see the same pairs at every step and give the same
metrics and weights.

Tolerance: 1e-5 (relative and absolute) on every logged number, 1e-4 on every weight. Measured:
weights differ by ~1.5e-7 on a 2-core AMD EPYC; on a 2-core Intel Xeon by at most 2e-6 except one
DPO weight, 1.7e-5 (an element of an MLP projection whose gradient is float noise, which Adam
scales up); log-probabilities (~60 nats) by ~4e-6 absolute. DDP averages two half-batch gradients
where one process takes the mean over the whole batch, so the float sums are ordered differently
and exact equality is not expected. A wrong reduction (one process's half of the gradient, or a
sum instead of a mean) moves weights by about the learning rate, 3e-3 to 5e-3, every step.

Scores of the trained model (held-out ``eval_*`` numbers, the reward model's score statistics) get
5e-5: after 4 Adam steps at learning rate 3e-3 they carry the float noise of the batch layout.
Measured on one process
with the same pairs in the same order, only the layout changed (``share_prompt`` × ``padding_free``,
mathematically the same model): ``eval_chosen_mean`` spans 0.9447352–0.9447480, 1.3e-5; the
two-process run (pairs that share a prompt grouped per process, not per global batch) lands inside
that span. Adam moves a weight whose gradient is float noise by up to the learning rate, which is
why a 1e-7 difference in the gradients becomes ~1e-6 in the weights and ~1e-5 in a score.

Held-out sets: 8 pairs for the reward model (no process gets a padded batch, see below) and 7 for
DPO, whose own evaluation gathers per-pair values with ``gather_for_metrics`` so the pair the
sampler repeats to even out the processes is dropped: its statistics are over exactly 7 pairs.
Trainer's own ``eval_loss`` (the RM's) is a mean of per-batch means; with an uneven split the
padded batch of the last process includes a repeated pair, so that one number would differ.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ppo_tiny import one_torch_thread, word_dirs  # noqa: F401  (fixtures)

HERE = Path(__file__).parent
ROOT = HERE.parent
TOL = dict(rel=1e-5, abs=1e-5)
WEIGHT_TOL = 1e-4  # see the module docstring
EVAL_TOL = dict(rel=5e-5, abs=5e-5)  # held-out numbers after training: see the module docstring
SKIP = ("runtime", "per_second", "total_flos", "epoch")  # timings; FLOPs count padding, which differs with the split
FILLER = "the a small old red quick calm open soft warm".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pairs(n: int, rng: random.Random) -> list[dict]:
    """Chosen holds "banana" where rejected holds "window"; a quarter of the labels are flipped, so the
    statistics stay away from 0 and 1."""
    out = []
    for _ in range(n):
        words = rng.choices(FILLER, k=rng.randint(2, 5))
        at = rng.randint(0, len(words))
        good, bad = (" ".join(words[:at] + [w] + words[at:]) for w in ("banana", "window"))
        if rng.random() < 0.25:
            good, bad = bad, good
        out.append({"prompt": "Say something " + rng.choice(FILLER) + ".", "chosen": good, "rejected": bad})
    return out


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    from stage_multiprocess_worker import main

    root = tmp_path_factory.mktemp("scale-out")
    data = root / "data"
    data.mkdir()
    rng = random.Random(0)
    _write(data / "pairs.jsonl", _pairs(32, rng))
    _write(data / "held_out_rm.jsonl", _pairs(8, rng))
    _write(data / "held_out_dpo.jsonl", _pairs(7, rng))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "multi_cpu.yaml"),
        "--main_process_port",
        str(_free_port()),
        "--num_cpu_threads_per_process",
        "1",
    ]
    # the two processes start first; the one-process run shares the machine with their start-up
    two = subprocess.Popen(
        [*launcher, str(HERE / "stage_multiprocess_worker.py"), str(root / "two"), str(tiny_model_dir), str(data), "4"],
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(str(root / "one"), str(tiny_model_dir), str(data), "8")
    finally:
        torch.set_num_threads(before)
    output, _ = two.communicate(timeout=600)
    assert two.returncode == 0, output[-4000:]
    return root


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _same_numbers(a: dict, b: dict, where: str, trained_scores: bool = False) -> None:
    """``trained_scores``: every number is a score of the trained model (EVAL_TOL); else ``eval_*`` keys are."""
    numbers = {k for k, v in a.items() if isinstance(v, (int, float)) and not any(s in k for s in SKIP)}
    assert numbers == {k for k, v in b.items() if isinstance(v, (int, float)) and not any(s in k for s in SKIP)}, where
    for key in sorted(numbers):
        tol = EVAL_TOL if trained_scores or key.startswith("eval_") else TOL
        assert b[key] == pytest.approx(a[key], **tol), f"{where}: {key}"


def _check_global_batches(root: Path, stage: str, two: str = "two") -> None:
    """Step k of the 2-process run trains on exactly the 8 pairs of step k of the 1-process run, split 4 + 4."""
    one = json.loads((root / "one" / stage / "batches.rank0.json").read_text())
    rank0, rank1 = (json.loads((root / two / stage / f"batches.rank{r}.json").read_text()) for r in (0, 1))
    assert [b["step"] for b in one] == [b["step"] for b in rank0] == [b["step"] for b in rank1] == [1, 2, 3, 4]
    for whole, half0, half1 in zip(one, rank0, rank1):
        assert len(whole["rows"]) == 8 and len(half0["rows"]) == len(half1["rows"]) == 4
        assert sorted(whole["rows"]) == sorted(half0["rows"] + half1["rows"]), f"step {whole['step']}"
    seen = [tuple(r) for b in one for r in b["rows"]]
    assert len(seen) == 32  # one epoch: every training pair once


def _max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _initial_weights_differ(trained: Path, start: Path) -> bool:
    from safetensors.torch import load_file

    wa, ws = load_file(trained / "model.safetensors"), load_file(start / "model.safetensors")
    return any(not torch.equal(wa[k], ws[k]) for k in ws if k in wa)


def test_reward_model_on_two_processes_equals_one_process(runs, tiny_model_dir):
    one, two = runs / "one" / "rm", runs / "two" / "rm"
    _check_global_batches(runs, "rm")
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    train_rows = [r for r in a if "loss" in r]
    assert len(train_rows) == 4 and all("accuracy" in r and "margin" in r for r in train_rows)
    assert any(0.0 < r["accuracy"] < 1.0 for r in train_rows)  # a statistic that could come out differently
    for ra, rb in zip(a, b):
        _same_numbers(ra, rb, f"rm metrics.jsonl step {ra['step']}")
    final_a = json.loads((one / "eval_results.json").read_text())["final"]
    final_b = json.loads((two / "eval_results.json").read_text())["final"]
    _same_numbers(final_a, final_b, "rm eval_results.json")
    stats_a, stats_b = (json.loads((f / "reward_stats.json").read_text()) for f in (one, two))
    _same_numbers(stats_a, stats_b, "rm reward_stats.json", trained_scores=True)
    assert json.loads((two / "training_summary.json").read_text())["eval_pairs"] == 8
    # checkpoints every 2 steps, the last one kept, published whole with both processes' RNG states
    assert [p.name for p in two.glob("checkpoint-*")] == ["checkpoint-4"] and not list(two.glob(".tmp-*"))
    assert {p.name for p in (two / "checkpoint-4").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert (two / "checkpoint-4" / "trainer_state.json").is_file()
    assert (one / "checkpoint-4" / "rng_state.pth").is_file()
    assert _max_weight_difference(one, two) < WEIGHT_TOL
    assert _initial_weights_differ(one, tiny_model_dir)


def test_dpo_on_two_processes_equals_one_process(runs, tiny_model_dir):
    one, two = runs / "one" / "dpo", runs / "two" / "dpo"
    _check_global_batches(runs, "dpo")
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert sum("rewards/accuracies" in r for r in a) == 4
    for ra, rb in zip(a, b):
        _same_numbers(ra, rb, f"dpo metrics.jsonl step {ra['step']}")
    eval_a, eval_b = (json.loads((f / "eval_results.json").read_text()) for f in (one, two))
    assert eval_a["eval_pairs"] == eval_b["eval_pairs"] == 7  # the pair repeated to even out the processes is dropped
    _same_numbers(eval_a, eval_b, "dpo eval_results.json")
    assert _max_weight_difference(one, two) < WEIGHT_TOL
    assert _initial_weights_differ(one, tiny_model_dir)


def test_processes_launched_without_use_cpu_on_a_cpu_machine_are_refused(tmp_path, tiny_model_dir, monkeypatch):
    """Without --use_cpu on a machine without GPUs accelerate leaves every launched process on its own;
    each would train on all the data and write the same folder. The stage refuses with a clear message."""
    from tether.config import ConfigError
    from tether.data.records import PreferencePair
    from tether.stages.dpo import DPOConfig, train_dpo

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the processes do train together")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torch.distributed.run sets in each process it starts
    config = DPOConfig(
        model_name_or_path=str(tiny_model_dir),
        output_dir=str(tmp_path / "dpo"),
        report_to="none",
        save_strategy="no",
        max_length=64,
        disable_tqdm=True,
    )
    pairs = [PreferencePair(prompt="Say a.", chosen="banana", rejected="window")] * 2
    with pytest.raises(ConfigError, match="pass --use_cpu true"):
        train_dpo(config, pairs)
    assert not (tmp_path / "dpo").exists()


def test_ppo_processes_launched_without_use_cpu_on_a_cpu_machine_are_refused(tmp_path, word_dirs, monkeypatch):
    from tether.config import ConfigError
    from tether.ppo import PPOConfig, PPOTrainer

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the processes do train together")
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = PPOConfig(
        output_dir=str(tmp_path / "ppo"),
        model_name_or_path=str(word_dirs["policy"]),
        reward_model_path=str(word_dirs["rm"]),
        batch_size=2,
        report_to="none",
        disable_tqdm=True,
    )
    with pytest.raises(ConfigError, match="pass --use_cpu true"):
        PPOTrainer(config, ["a b", "c d"])
    assert not (tmp_path / "ppo").exists()
