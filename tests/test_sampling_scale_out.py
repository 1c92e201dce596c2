"""Issue 15 item 5: generation-only work scales across processes. ``tether bon``, ``tether eval`` and
the demo's pair sampling share their prompts out over 2 CPU processes (gloo, ``accelerate launch``)
and give exactly the outputs of 1 process: every batch of prompts samples with its own seed
(``tether.generation.batch_seed``), and the main process writes each file once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent
PROMPTS = ["Name a fruit.", "Say hello.", "Count to three.", "What colour is the sky?", "Describe a cat."]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_rm_dir):
    from sampling_multiprocess_worker import main

    root = tmp_path_factory.mktemp("sampling-scale-out")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
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
    args = [str(tiny_model_dir), str(tiny_rm_dir), str(prompts)]
    two = subprocess.Popen(
        [*launcher, str(HERE / "sampling_multiprocess_worker.py"), str(root / "two"), *args],
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    before = torch.get_num_threads()
    try:
        main(str(root / "one"), *args)
    finally:
        torch.set_num_threads(before)
    output, _ = two.communicate(timeout=600)
    assert two.returncode == 0, output[-4000:]
    return root


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _without_timings(doc):
    if isinstance(doc, dict):
        return {k: _without_timings(v) for k, v in doc.items() if not k.startswith("time/") and k != "seconds"}
    if isinstance(doc, list):
        return [_without_timings(v) for v in doc]
    return doc


# Texts, rankings and counts must match exactly. Scores may not: each process scores its own share of the
# prompts, so a response sits in a batch of another shape (other padding), and the matmuls of another
# shape round differently in the last bits (measured: 7e-9 on a score of 0.09).
SCORE_TOL = 1e-6


def _close(a, b) -> bool:
    """Equal structures; floats equal within SCORE_TOL (relative or absolute), everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=SCORE_TOL, abs=SCORE_TOL)
    return a == b


def test_close_compares_floats_within_tolerance_and_the_rest_exactly():
    assert _close({"s": 0.09271305799484253, "t": "x"}, {"s": 0.09271305054426193, "t": "x"})
    assert not _close({"s": 0.0927, "t": "x"}, {"s": 0.0928, "t": "x"})
    assert not _close({"s": 0.5, "t": "x"}, {"s": 0.5, "t": "y"})
    assert not _close([1.0, 2.0], [1.0])


def test_best_of_n_on_two_processes_equals_one_process(runs):
    one, two = _jsonl(runs / "one" / "bon" / "best_of_n.jsonl"), _jsonl(runs / "two" / "bon" / "best_of_n.jsonl")
    assert [r["prompt"] for r in one] == PROMPTS  # in prompt order, each prompt once
    assert _close(two, one)  # texts and rankings exactly, scores within SCORE_TOL
    assert len({s["completion"] for r in one for s in r["ranked"]}) > 3  # really sampled, not one fixed answer
    summary = json.loads((runs / "two" / "bon" / "summary.json").read_text())
    summary_one = json.loads((runs / "one" / "bon" / "summary.json").read_text())
    assert _close(_without_timings(summary), _without_timings(summary_one))
    assert sorted(p.name for p in (runs / "two" / "bon").iterdir()) == ["best_of_n.jsonl", "summary.json"]


def test_eval_on_two_processes_equals_one_process(runs):
    one, two = (json.loads((runs / r / "eval" / "eval.json").read_text()) for r in ("one", "two"))
    assert _close(_without_timings(two["metrics"]), _without_timings(one["metrics"]))
    assert _close(two["bon_curve"], one["bon_curve"]) and len(one["bon_curve"]) == 3
    samples_one, samples_two = (_jsonl(runs / r / "eval" / "samples.jsonl") for r in ("one", "two"))
    assert _close(samples_two, samples_one)
    assert [s["prompt_index"] for s in samples_one if s["policy"] == "a"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # the same seed for every policy: identical policies give identical responses
    assert [s["response"] for s in samples_one if s["policy"] == "a"] == [
        s["response"] for s in samples_one if s["policy"] == "b"
    ]


def test_pair_sampling_on_two_processes_equals_one_process(runs):
    one, two = (json.loads((runs / r / "pairs.json").read_text()) for r in ("one", "two"))
    assert _close(two, one) and len(one) >= 3


def test_a_batch_samples_the_same_whatever_the_other_batches(tiny_model_dir):
    """Batch b's responses are those of ``torch.manual_seed(batch_seed(seed, b))`` and one generate call
    on that batch alone: dropping the first batch's prompts leaves the second batch's samples unchanged
    once it is batch 0 with the same seed... i.e. each batch depends on (seed, b, its prompts) only."""
    from tether.generation import SamplingSettings, batch_seed, sample_responses, sample_seeded
    from tether.models.loading import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    settings = SamplingSettings(max_new_tokens=5, temperature=1.0)
    groups = sample_seeded(model, tok, PROMPTS, settings, num_return_sequences=2, batch_size=2, seed=7)
    torch.manual_seed(batch_seed(7, 1))
    alone = sample_responses(model, tok, PROMPTS[2:4], settings, num_return_sequences=2, batch_size=2)
    assert [[s.response_ids for s in g] for g in groups[2:4]] == [[s.response_ids for s in g] for g in alone]
    torch.manual_seed(12345)  # the global RNG's state before the call does not matter
    again = sample_seeded(model, tok, PROMPTS, settings, num_return_sequences=2, batch_size=2, seed=7)
    assert [[s.response_ids for s in g] for g in again] == [[s.response_ids for s in g] for g in groups]
    other = sample_seeded(model, tok, PROMPTS, settings, num_return_sequences=2, batch_size=2, seed=8)
    assert [[s.response_ids for s in g] for g in other] != [[s.response_ids for s in g] for g in groups]


def test_batch_seed_is_a_fixed_function_of_seed_and_batch():
    from tether.generation import batch_seed

    assert batch_seed(7, 1) == batch_seed(7, 1)
    assert len({batch_seed(s, b) for s in range(4) for b in range(4)}) == 16
    assert 0 <= batch_seed(0, 0) < 2**63
    with pytest.raises(ValueError, match="seed"):
        batch_seed(-1, 0)
