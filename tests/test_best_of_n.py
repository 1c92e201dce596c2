"""Best-of-N: the KL bound, ranking by reward-model score, JSONL that `tether sft` accepts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tether.config import ConfigError
from tether.data.records import Message
from tether.generation import SamplingSettings
from tether.sampling import BestOfNResult, ScoredSample, best_of_n, bon_kl_bound, rank
from tether.stages.best_of_n import BestOfNConfig, result_row, reward_gain, run_best_of_n


def test_kl_bound_numbers():
    assert bon_kl_bound(1) == 0.0
    # log 4 − 3/4 = 1.386294 − 0.75
    assert bon_kl_bound(4) == pytest.approx(0.636294, abs=1e-6)
    # log 16 − 15/16 = 2.772589 − 0.9375
    assert bon_kl_bound(16) == pytest.approx(1.835089, abs=1e-6)
    with pytest.raises(ValueError):
        bon_kl_bound(0)
    assert bon_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl_bound(16) == pytest.approx(2.772588722 - 0.9375)


def test_reward_gain_is_best_mean_minus_sample_mean():
    # two prompts, N = 2: samples (1, 3) and (−2, 0); best (3, 0) → mean 1.5; all → mean 0.5
    assert reward_gain([3.0, 0.0], [1.0, 3.0, -2.0, 0.0]) == pytest.approx(1.0)


def test_rank_puts_the_highest_score_first_and_skips_empty_text_for_the_best():
    samples = [
        ScoredSample("a", 0.5, True, 2, 0),
        ScoredSample("  ", 2.0, True, 1, 1),
        ScoredSample("c", 1.0, False, 8, 2),
        ScoredSample("d", 1.0, True, 3, 3),
    ]
    ranked = rank(samples)
    assert [s.index for s in ranked] == [1, 2, 3, 0]  # ties keep sampling order
    result = BestOfNResult("q", ranked)
    assert result.best.text == "c"  # the empty response scored highest but is not usable
    row = result_row(result, n=4, return_all=True)
    assert row["completion"] == "c" and row["score"] == 1.0 and row["n"] == 4
    assert [r["score"] for r in row["ranked"]] == [2.0, 1.0, 1.0, 0.5]
    assert result_row(BestOfNResult("q", [ScoredSample("", 1.0, True, 1, 0)]), 1, False) is None


def unpadded_score(reward_model, tokenizer, prompt, text, stopped: bool = True) -> float:
    """The reward model's head output at the last token of the sequence alone (no padding, no batching):
    the stop token, or the response's own last token when it was cut at the budget (``stopped`` False)."""
    from tether.data.templates import prompt_response_ids
    from tether.models.scoring import token_scores

    ids, _ = prompt_response_ids(tokenizer, prompt, text, stopped=stopped)
    with torch.no_grad():
        return float(token_scores(reward_model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, -1])


def test_best_of_n_ranks_samples_by_the_reward_models_score(tiny_model_dir, tiny_rm_dir, tokenizer):
    from tether.models.loading import load_causal_lm, load_scalar_model

    policy = load_causal_lm(str(tiny_model_dir)).eval()
    reward_model = load_scalar_model(str(tiny_rm_dir)).eval()
    prompts = ["Name a colour.", (Message("system", "Be brief."), Message("user", "Count to three."))]
    torch.manual_seed(0)
    results = best_of_n(
        policy,
        reward_model,
        tokenizer,
        prompts,
        n=4,
        # a seventh of the vocabulary also ends a response, so some stop within the budget and some are cut
        settings=SamplingSettings(
            max_new_tokens=6, temperature=1.0, extra_stop_token_ids=list(range(len(tokenizer) // 7))
        ),
        batch_size=2,
        reward_batch_size=3,
    )
    assert len(results) == 2
    for prompt, result in zip(prompts, results):
        assert result.prompt == prompt and len(result.ranked) == 4
        assert sorted(s.index for s in result.ranked) == [0, 1, 2, 3]
        scores = [s.score for s in result.ranked]
        assert scores == sorted(scores, reverse=True)
        assert len(set(scores)) > 1  # different samples, different scores: the ranking is not vacuous
        for s in result.ranked:  # each score is the reward model's own score of that text
            expected = unpadded_score(reward_model, tokenizer, prompt, s.text, s.stopped)
            assert s.score == pytest.approx(expected, abs=1e-4)
        assert result.best.score == max(scores)
    assert {s.stopped for r in results for s in r.ranked} == {True, False}  # both kinds of response are checked


def write_prompts(path):
    rows = [
        {"prompt": "Say hello."},
        {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say bye."}]},
        {"prompt": "Give me a number."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_bon_output_is_accepted_by_the_demonstration_loader(tmp_path, tiny_model_dir, tiny_rm_dir):
    from tether.data.loading import load_demonstrations
    from tether.tracking import read_jsonl

    prompts_file = tmp_path / "prompts.jsonl"
    write_prompts(prompts_file)
    out = tmp_path / "bon"
    config = BestOfNConfig(
        model_name_or_path=str(tiny_model_dir),
        reward_model_path=str(tiny_rm_dir),
        dataset=str(prompts_file),
        n=4,
        max_new_tokens=6,
        temperature=1.0,
        return_all=True,
        output_dir=str(out),
        use_cpu=True,
    )
    summary = run_best_of_n(config)
    rows = read_jsonl(out / "best_of_n.jsonl")
    assert len(rows) == 3
    assert rows[0]["prompt"] == "Say hello."
    assert rows[1]["prompt"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say bye."},
    ]
    for row in rows:
        assert row["n"] == 4 and len(row["ranked"]) == 4
        assert row["score"] == max(r["score"] for r in row["ranked"])
        assert row["completion"] == next(r["completion"] for r in row["ranked"] if r["completion"].strip())

    demos = load_demonstrations(str(out / "best_of_n.jsonl"))
    assert [d.completion for d in demos] == [r["completion"] for r in rows]
    assert demos[0].prompt == "Say hello."
    assert demos[1].prompt == (Message("system", "You are terse."), Message("user", "Say bye."))

    saved = json.loads((out / "summary.json").read_text())
    assert saved["kl/bon_bound"] == pytest.approx(math.log(4) - 0.75)
    all_scores = [r["score"] for row in rows for r in row["ranked"]]
    best = [row["score"] for row in rows]
    assert saved["reward/gain"] == pytest.approx(sum(best) / 3 - sum(all_scores) / 12, abs=1e-6)
    assert saved["reward/gain"] > 0
    assert summary["samples"] == 12


def test_bon_without_a_reward_model_or_with_bad_prompts_writes_nothing(tmp_path, tiny_model_dir, tiny_rm_dir, capsys):
    from tether.cli import main

    prompts_file = tmp_path / "prompts.jsonl"
    write_prompts(prompts_file)
    out = tmp_path / "bon"
    with pytest.raises(ConfigError, match="reward_model_path"):
        run_best_of_n(
            BestOfNConfig(model_name_or_path=str(tiny_model_dir), dataset=str(prompts_file), output_dir=str(out))
        )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 5}\n')
    code = main(
        [
            "bon",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--reward_model_name_or_path",
            str(tiny_rm_dir),
            "--dataset",
            str(bad),
            "--output_dir",
            str(out),
        ]
    )
    assert code == 2 and "bad.jsonl:2" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ConfigError):
        BestOfNConfig(n=0)
