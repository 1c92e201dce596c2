"""Checklist item 15: given fixed rollouts, a 2-process update equals a 1-process update at the same
global batch (gradients averaged by DDP, whitening, token counts and metrics reduced over processes),
and each rank samples with its own seed. Two real CPU processes with the gloo backend."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ppo_tiny import one_torch_thread, word_dirs  # noqa: F401  (fixtures)

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["full", "lora", "grpo"])
def test_two_process_update_equals_one_process_update(tmp_path, word_dirs, mode):
    from ppo_multiprocess_worker import main

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    main(str(one), str(word_dirs["policy"]), str(word_dirs["rm"]), mode)  # one process, in this interpreter
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(HERE / "ppo_multiprocess_worker.py"),
            str(two),
            str(word_dirs["policy"]),
            str(word_dirs["rm"]),
            mode,
        ],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (json.loads((d / "result.json").read_text()) for d in (one, two))
    assert (a["world"], b["world"]) == (1, 2)
    ma, mb = a["metrics"], b["metrics"]
    assert ma["response/stopped"] == mb["response/stopped"] == 5 / 8  # the fixed batch, reduced over ranks
    for key, value in ma.items():
        if not isinstance(value, float) or key.startswith("time"):
            continue
        if key.endswith("clipfrac"):  # a share of tokens: a float tie may flip one token of 26
            assert mb[key] == pytest.approx(value, abs=0.05), key
        else:
            assert mb[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    wa, wb = torch.load(one / "policy.pt"), torch.load(two / "policy.pt")
    # Adam divides each gradient by its own root mean square, so a weight whose gradient is ~0 moves by a
    # rounding-sized difference scaled up (CI measured 1.9e-5 for LoRA); a wrong reduction moves weights by
    # ~the learning rate, 1e-2, two orders above this bound
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    if mode == "grpo":  # no critic; the function's component reduced as sums and counts over processes
        assert "loss/value" not in ma and ma["loss/kl"] >= 0 and ma["reward/length_bonus/none"] == 1.0
    if mode != "lora":
        assert not torch.equal(wa["lm_head.weight"], _initial_lm_head(word_dirs["policy"]))  # the policy moved
    else:  # LoRA B matrices start at zero: the adapters moved
        assert any(wa[k].abs().max() > 0 for k in wa if "lora_B" in k)
    # each rank sampled its own responses to the same prompt
    samples = b["samples"]
    assert samples[:4] != samples[4:]
    # the whole loop ran across both processes: metrics once, an atomic checkpoint, the outputs
    run = two / "run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run / "checkpoint-0" / "rng_state_0.pth").is_file() and (run / "checkpoint-0" / "rng_state_1.pth").is_file()
    assert (run / "policy" / "config.json").is_file() and not list(run.glob(".tmp-*"))


def _initial_lm_head(folder):
    from tether.models.loading import load_causal_lm

    return load_causal_lm(str(folder)).lm_head.weight.detach()
