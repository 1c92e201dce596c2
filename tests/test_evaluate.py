"""`tether eval` on tiny models: every metric present, KL zero against itself, best-of-N, files and report."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tether.evaluation import evaluate as E
from tether.sampling import bon_kl_bound


@pytest.fixture(scope="module")
def perturbed_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny policy with noise added to its weights: a policy that has moved from the reference."""
    from tether.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    folder = tmp_path_factory.mktemp("tiny-perturbed")
    model.save_pretrained(folder)
    shutil.copy(tiny_model_dir / "tokenizer.json", folder)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", folder)
    return folder


EXPECTED_KEYS = {
    "reward/score",
    "reward/gold",
    "kl/ref",
    "kl/bon_bound",
    "response/length",
    "response/words",
    "response/stopped",
    "response/repetition",
    "diversity/distinct_1",
    "diversity/distinct_2",
    "bias/reward_length_pearson",
    "bias/reward_length_spearman",
    "bias/gold_length_pearson",
    "samples",
}
PROBE_KEYS = {"probe/factual_accuracy", "probe/harmful_refusal_rate", "probe/benign_refusal_rate"}


def test_evaluate_policies_on_tiny_models(tiny_model_dir, perturbed_model_dir, tiny_rm_dir, tokenizer, annotator):
    from tether.data.loading import load_prompts

    prompts = load_prompts("embedded:demo", "test")[:3]
    results = E.evaluate_policies(
        {"ref": str(tiny_model_dir), "moved": str(perturbed_model_dir)},
        str(tiny_model_dir),
        str(tiny_rm_dir),
        tokenizer,
        prompts,
        temperature=1.0,
        max_new_tokens=6,
        samples_per_prompt=2,
        gold=annotator,
        probes=True,
        probe_max_new_tokens=2,
        best_of_n={"best-of-4": ("ref", 4)},
        batch_size=64,
    )
    assert list(results.metrics) == ["ref", "moved", "best-of-4"]
    for name in ("ref", "moved"):
        assert EXPECTED_KEYS | PROBE_KEYS <= set(results.metrics[name])
    ref, moved, bon = (results.metrics[k] for k in ("ref", "moved", "best-of-4"))
    assert ref["kl/ref"] == 0.0  # the reference against itself (same path: loaded once)
    assert moved["kl/ref"] > 0.0
    assert bon["kl/ref"] is None and bon["kl/bon_bound"] == pytest.approx(bon_kl_bound(4))
    assert ref["samples"] == moved["samples"] == 6 and bon["samples"] == 6
    assert 0.0 <= ref["diversity/distinct_1"] <= 1.0 and 0.0 <= ref["response/stopped"] <= 1.0
    # rows carry every response with its scores; the metric means are their means
    rows = [r for r in results.samples if r["policy"] == "moved"]
    assert len(rows) == 6
    assert moved["reward/score"] == pytest.approx(sum(r["reward"] for r in rows) / 6)
    assert moved["reward/gold"] == pytest.approx(sum(r["gold"] for r in rows) / 6)
    assert moved["kl/ref"] == pytest.approx(sum(r["kl"] for r in rows) / 6)
    assert moved["response/length"] == pytest.approx(sum(r["length"] for r in rows) / 6)
    # best-of-N rows carry the reward model's score of the kept response
    bon_rows = [r for r in results.samples if r["policy"] == "best-of-4"]
    rm, rm_tok, _ = E.load_reward(str(tiny_rm_dir))
    rescored = E.rm_scores(
        rm,
        rm_tok,
        [r["prompt"] for r in bon_rows],
        [r["response"] for r in bon_rows],
        stopped=[r["stopped"] for r in bon_rows],
    )
    assert not all(r["stopped"] for r in results.samples)  # some responses are cut: the flags matter
    assert [r["reward"] for r in bon_rows] == pytest.approx(rescored, abs=1e-4)
    assert results.probe_responses["ref"] and "best-of-4" not in results.probe_responses
    side = results.side_by_side(2)
    assert len(side) == 2 and set(side[0]["responses"]) == {"ref", "moved", "best-of-4"}
    assert len(results.length_reward_points()) == 18


def test_rm_scores_apply_the_saved_normalisation(tiny_rm_dir, tokenizer, tmp_path):
    from tether.models.scoring import RewardStats, save_reward_stats

    rm, rm_tok, stats = E.load_reward(str(tiny_rm_dir))
    assert stats is None
    prompts, responses = ["Hi?", "Why?"], ["Hello.", "Because."]
    raw = E.rm_scores(rm, rm_tok, prompts, responses)
    folder = tmp_path / "rm"
    shutil.copytree(tiny_rm_dir, folder)
    save_reward_stats(RewardStats(mean=0.5, std=2.0, count=10), folder)
    rm2, tok2, stats2 = E.load_reward(str(folder))
    assert stats2.mean == 0.5
    normalised = E.rm_scores(rm2, tok2, prompts, responses, stats2)
    assert normalised == pytest.approx([(r - 0.5) / 2.0 for r in raw], abs=1e-5)


def test_text_metrics_hand_computed():
    m = E.text_metrics(["a b c a b c", "x y"], [7, 3], [True, False], [1.0, 0.0], None)
    assert m["response/length"] == 5.0 and m["response/stopped"] == 0.5
    assert m["response/repetition"] == pytest.approx(0.125)
    assert m["bias/reward_length_pearson"] == pytest.approx(1.0)
    assert m["reward/gold"] is None and m["bias/gold_length_pearson"] is None
    assert m["diversity/distinct_1"] == pytest.approx(5 / 8)


def test_paired_gains_average_samples_per_prompt_first():
    rows = [
        {"policy": "sft", "prompt_index": 0, "gold": 1.0, "reward": 0.0},
        {"policy": "sft", "prompt_index": 1, "gold": 0.0, "reward": 0.0},
        {"policy": "sft", "prompt_index": 2, "gold": 2.0, "reward": None},
        # ppo: two samples on prompt 0 (mean 2.0), one each on 1 and 2
        {"policy": "ppo", "prompt_index": 0, "gold": 1.5, "reward": 1.0},
        {"policy": "ppo", "prompt_index": 0, "gold": 2.5, "reward": 1.0},
        {"policy": "ppo", "prompt_index": 1, "gold": 2.0, "reward": 3.0},
        {"policy": "ppo", "prompt_index": 2, "gold": 3.0, "reward": 2.0},
    ]
    metrics = {"sft": {}, "ppo": {}}
    E.add_paired_gains(metrics, rows, baseline="sft")
    # gold differences [1, 2, 1]: mean 4/3, s_d^2 = (1/9 + 4/9 + 1/9)/2 = 1/3, SE = 1/3
    assert metrics["ppo"]["gain/gold"] == pytest.approx(4 / 3)
    assert metrics["ppo"]["gain/gold_se"] == pytest.approx(1 / 3)
    # proxy: prompt 2 has no SFT score, so only prompts 0 and 1: differences [1, 3] -> mean 2, SE 1
    assert metrics["ppo"]["gain/score"] == pytest.approx(2.0)
    assert metrics["ppo"]["gain/score_se"] == pytest.approx(1.0)
    assert metrics["ppo"]["gain/baseline"] == "sft" and "gain/gold" not in metrics["sft"]


def test_parse_policy_specs():
    from tether.config import EMBEDDED_MODEL, ConfigError

    assert E.parse_policy_specs(["sft=out/sft", "out/ppo/", "embedded"]) == {
        "sft": "out/sft",
        "ppo": "out/ppo/",
        "embedded": EMBEDDED_MODEL,
    }
    with pytest.raises(ConfigError):
        E.parse_policy_specs(["a=x", "a=y"])
    with pytest.raises(ConfigError):
        E.parse_policy_specs(["=x"])


def test_bon_curve_on_tiny_models(tiny_model_dir, tiny_rm_dir, tokenizer, annotator):
    from tether.data.loading import load_prompts

    rows = E.bon_curve(
        str(tiny_model_dir),
        tokenizer,
        str(tiny_rm_dir),
        load_prompts("embedded:demo", "test")[:2],
        ns=(1, 2, 4),
        gold=annotator,
        temperature=1.0,
        max_new_tokens=4,
    )
    assert [r["n"] for r in rows] == [1, 2, 4]
    assert [r["kl_bound"] for r in rows] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    # the expected maximum of the proxy can only grow with N
    assert rows[0]["proxy"] <= rows[1]["proxy"] <= rows[2]["proxy"]
    assert all(r["gold"] is not None for r in rows)


def test_best_of_n_entry_and_curve_share_one_set_of_samples(tiny_model_dir, tiny_rm_dir, tokenizer, annotator):
    """The pipeline's evaluation: the curve on the first prompts is the one bon_curve() samples on its own,
    and on those prompts the best-of-2 entry is the reward model's favourite among the curve's first 2 samples."""
    from tether.data.loading import load_prompts
    from tether.generation import SamplingSettings, sample_seeded
    from tether.sampling import score_samples

    prompts = [p.prompt for p in load_prompts("embedded:demo", "test")[:3]]
    common = dict(gold=annotator, temperature=1.0, max_new_tokens=4, batch_size=8, seed=3)
    results = E.evaluate_policies(
        {"sft": str(tiny_model_dir)},
        None,
        str(tiny_rm_dir),
        tokenizer,
        prompts,
        probes=False,
        best_of_n={"bon2": ("sft", 2)},
        bon_curve=(1, 2, 4),
        bon_curve_prompts=2,
        **common,
    )
    alone = E.bon_curve(str(tiny_model_dir), tokenizer, str(tiny_rm_dir), prompts[:2], ns=(1, 2, 4), **common)
    assert [r["n"] for r in results.bon_curve] == [1, 2, 4]
    for merged, own in zip(results.bon_curve, alone):
        assert merged == pytest.approx(own, abs=1e-6)
    from tether.models.loading import load_causal_lm, load_scalar_model

    model, rm = load_causal_lm(str(tiny_model_dir)), load_scalar_model(str(tiny_rm_dir))
    groups = sample_seeded(model, tokenizer, prompts[:2], SamplingSettings(4, 1.0), 4, 2, seed=3)
    for i, ranked in enumerate(score_samples(rm, tokenizer, prompts[:2], [g[:2] for g in groups])):
        row = next(r for r in results.samples if r["policy"] == "bon2" and r["prompt_index"] == i)
        best = next((s for s in ranked if s.usable), ranked[0])
        assert row["response"] == best.text and row["reward"] == pytest.approx(best.score, abs=1e-5)
    assert sorted(r["prompt_index"] for r in results.samples if r["policy"] == "bon2") == [0, 1, 2]


def test_run_eval_writes_files_and_report(tiny_model_dir, tiny_rm_dir, tmp_path):
    from tether.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say hi.", "Count to three.")))
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--policies",
            f"tiny={tiny_model_dir}",
            "--reference",
            str(tiny_model_dir),
            "--reward_model_path",
            str(tiny_rm_dir),
            "--prompts",
            str(prompts),
            "--samples_per_prompt",
            "2",
            "--max_new_tokens",
            "4",
            "--probes",
            "false",
            "--best_of_n",
            "2",
            "--bon_curve",
            "1",
            "2",
            "--output_dir",
            str(out),
        ]
    )
    assert code == 0
    doc = json.loads((out / "eval.json").read_text())
    assert set(doc["metrics"]) == {"tiny", "best-of-2"}
    assert doc["metrics"]["tiny"]["reward/gold"] is None  # gold is auto: off for user prompts
    assert doc["settings"]["temperature"] == 0.7
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # 2 prompts x 2 samples, and best-of-2 picks once per prompt from those 2 samples
    assert len(samples) == 6
    assert (out / "report.md").stat().st_size > 0 and (out / "report.html").stat().st_size > 0
    assert "best-of-2" in (out / "report.md").read_text()
    assert (out / "plots" / "length_vs_reward.png").stat().st_size > 0
    assert [r["n"] for r in doc["bon_curve"]] == [1, 2] and (out / "plots" / "best_of_n.png").stat().st_size > 0
    # max(N) = 2 <= 2 samples per prompt: the curve is the evaluation samples' own
    assert doc["bon_curve"] == E.curve_from_samples(samples, "tiny", 2, (1, 2))
    assert doc["bon_curve"][0]["prompts"] == 2 and doc["bon_curve"][0]["samples_per_prompt"] == 2


def test_run_eval_with_a_reward_model_as_the_gold_judge(tiny_model_dir, tiny_rm_dir, tmp_path, capsys):
    """``--gold_reward_model``: the judge here is the proxy reward model itself (same weights, same saved
    normalisation), so each response's gold score must equal its proxy score, cut responses included."""
    from tether.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say hi.", "Count to three.")))
    out = tmp_path / "eval"
    common = ["eval", "--policies", f"tiny={tiny_model_dir}", "--reward_model_path", str(tiny_rm_dir)]
    common += ["--prompts", str(prompts), "--max_new_tokens", "4", "--probes", "false", "--output_dir", str(out)]
    assert main([*common, "--gold_reward_model", str(tiny_rm_dir), "--samples_per_prompt", "3"]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(r["gold"] is not None for r in samples)
    assert [r["gold"] for r in samples] == pytest.approx([r["reward"] for r in samples], abs=1e-6)
    assert len({round(r["gold"], 6) for r in samples}) > 1  # different responses, different scores
    doc = json.loads((out / "eval.json").read_text())
    assert doc["settings"]["gold"] == str(tiny_rm_dir)
    assert doc["metrics"]["tiny"]["reward/gold"] == pytest.approx(sum(r["gold"] for r in samples) / 6)
    assert f"| Gold score (reward model {tiny_rm_dir.name}) |" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main([*common, "--gold_reward_model", str(tiny_rm_dir), "--gold", "on"]) == 2
    assert "--gold on and --gold_reward_model: choose one gold judge" in capsys.readouterr().err


def test_run_eval_rejects_bad_options(tmp_path, capsys):
    from tether.cli import main

    assert main(["eval", "--output_dir", str(tmp_path)]) == 2
    assert "name at least one policy" in capsys.readouterr().err
    assert main(["eval", "--policies", "a=b", "--best_of_n", "4", "--output_dir", str(tmp_path)]) == 2
    assert "--best_of_n and --bon_curve need --reward_model_path" in capsys.readouterr().err
