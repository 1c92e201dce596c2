"""The report (Markdown + HTML + PNG plots), its data-driven sentences, and the study's plotting side."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tether.evaluation import report as R
from tether.evaluation.evaluate import points_from_metrics
from tether.evaluation.metrics import r_rl
from tether.sampling import bon_kl_bound
from tether.study import StudyConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval_metrics():
    base = {
        "reward/score": 0.0,
        "reward/gold": 0.4,
        "kl/ref": 0.0,
        "response/length": 60.0,
        "response/words": 45.0,
        "response/stopped": 0.3,
        "diversity/distinct_1": 0.4,
        "diversity/distinct_2": 0.8,
        "response/repetition": 0.02,
        "bias/reward_length_pearson": 0.1,
        "bias/reward_length_spearman": 0.12,
        "bias/gold_length_pearson": -0.2,
        "probe/factual_accuracy": 0.5,
        "probe/harmful_refusal_rate": 0.1,
        "probe/benign_refusal_rate": 0.0,
        "samples": 40,
    }
    ppo = dict(base, **{"reward/score": 1.1, "reward/gold": 0.9, "kl/ref": 3.2, "response/length": 30.0})
    bon = dict(
        base, **{"reward/score": 0.8, "kl/ref": None, "kl/bon_bound": bon_kl_bound(16), "probe/factual_accuracy": None}
    )
    return {"sft": base, "ppo": ppo, "best-of-16": bon}


def _overopt_points():
    # gold follows R_RL with a peak at √KL = e^{1.5} ≈ 4.48... scaled down: α = 1, β = 0.4 on d in [0, 7]
    d = np.array([0.0, 1.0, 2.0, 3.0, 4.5, 6.0, 7.0])
    gold = 0.3 + r_rl(d, 1.0, 0.4)
    proxy = 0.1 + 0.8 * d
    return [
        {"name": f"ckpt-{i}", "kl": float(x * x), "gold": float(g), "proxy": float(p)}
        for i, (x, g, p) in enumerate(zip(d, gold, proxy))
    ]


def _full_inputs():
    rng = np.random.default_rng(0)
    ppo_rows = [
        {"step": i, "reward/score": 0.05 * i, "reward/gold": 0.3 + 0.02 * i, "kl/ref": 0.15 * i} for i in range(1, 31)
    ]
    bon = [
        {"n": n, "kl_bound": bon_kl_bound(n), "proxy": 0.3 * math.log(n), "gold": 0.1 * math.log(n)}
        for n in (1, 2, 4, 8, 16)
    ]
    lengths = rng.integers(5, 64, size=60)
    points = [
        {
            "policy": "sft" if i % 2 else "ppo",
            "length": int(n),
            "reward": 0.03 * n + rng.normal(0, 0.2),
            "gold": rng.normal(0, 0.3),
        }
        for i, n in enumerate(lengths)
    ]
    rounds = [{"round": 1, "gold": 0.5, "proxy": 0.8}, {"round": 2, "gold": 0.7, "proxy": 0.9}]
    side = [
        {
            "prompt": "Why is the sky <blue>?",
            "responses": {
                "sft": {"response": "Scattering & stuff.", "reward": 0.1, "gold": 0.2},
                "ppo": {"response": "Rayleigh scattering.", "reward": None, "gold": None},
            },
        }
    ]
    study = {"β = 0.1": _overopt_points()[:4], "β = 0.001": _overopt_points()}
    return dict(
        eval_results=_eval_metrics(),
        ppo_metrics=ppo_rows,
        overopt_points=_overopt_points(),
        bon_curve=bon,
        length_reward_points=points,
        rounds=rounds,
        temperature=0.7,
        side_by_side=side,
        study_runs=study,
    )


def test_full_report_writes_table_and_every_plot(tmp_path):
    out = R.write_report(tmp_path, **_full_inputs(), notes=["demo run"])
    md, html = out.markdown.read_text(), out.html.read_text()
    expected_plots = {"ppo_curves", "overoptimisation", "best_of_n", "length_vs_reward", "rounds", "study"}
    assert set(out.plots) == expected_plots
    for key, path in out.plots.items():
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, key
        assert f"plots/{path.name}" in html and f"plots/{path.name}" in md
        assert out.sentences[key] and out.sentences[key] in md
    # the table: every policy and every metric row, best-of-N's KL shown as its bound
    for name in ("sft", "ppo", "best-of-16"):
        assert name in md and f"<th>{name}</th>" in html
    for label, _, _ in R.METRIC_ROWS:
        assert label in md
    assert "≤ 1.84 (bound)" in md and "healthy" in md
    assert "T = 0.7" in md
    # user text is escaped in HTML
    assert "Why is the sky &lt;blue&gt;?" in html and "Scattering &amp; stuff." in html
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_report_with_missing_pieces_says_so(tmp_path):
    out = R.write_report(tmp_path, eval_results=_eval_metrics())
    md, html = out.markdown.read_text(), out.html.read_text()
    assert out.plots == {}
    assert "No PPO metrics were given" in md and "No PPO metrics were given" in html
    assert "cannot be drawn" in md and "No best-of-N curve was computed" in md
    assert "temperature was not recorded" in md
    assert not (tmp_path / "plots").exists() or not list((tmp_path / "plots").iterdir())
    empty = R.write_report(tmp_path / "empty")
    assert "No evaluation results were given" in empty.markdown.read_text()


def test_report_accepts_an_eval_json_document(tmp_path):
    out = R.write_report(tmp_path, eval_results={"temperature": 0.7, "metrics": _eval_metrics()})
    assert "best-of-16" in out.markdown.read_text()


def test_metrics_table_formats_and_gaps():
    header, rows = R.metrics_table({"a": {"reward/score": 0.5, "kl/ref": 12.0, "samples": 3}, "b": {}})
    assert header == ["Metric", "a", "b"]
    table = {r[0]: r[1:] for r in rows}
    assert table["Reward-model score (proxy)"] == ["+0.500", "–"]
    assert table["KL health"] == ["drifting", "–"]
    assert table["Responses evaluated"] == ["3", "–"]
    _, rows = R.metrics_table({"sft": {}, "ppo": {"gain/gold": 0.25, "gain/gold_se": 0.05}})
    assert {r[0]: r[1:] for r in rows}["Gold gain over the first policy (paired by prompt, ± s.e.)"] == [
        "–",
        "+0.250 ± 0.050",
    ]


def test_kl_band_names():
    assert R.kl_band(0.5) == "barely changed"
    assert R.kl_band(4.0) == "healthy"
    assert R.kl_band(30.0) == "divergence"
    assert R.kl_band(None) is None


# ---------------------------------------------------------------------------------------------
# sentences from numbers
# ---------------------------------------------------------------------------------------------
def test_overoptimisation_sentence_reports_the_peak_and_the_rising_proxy():
    s = R.describe_overoptimisation(_overopt_points())
    # gold recentred: r_rl(d, 1, .4) is highest at d = 4.5 among the points
    assert "peaks at √KL ≈ 4.50" in s
    assert "keeps rising" in s
    assert "peaks at √KL ≈ 4.48" in s  # the fit recovers e^{1.5}


def test_overoptimisation_sentence_when_the_kl_did_not_grow_with_training():
    """The demo run's six PPO iterations (gold, proxy, KL of each rollout): the second iteration has the
    largest KL and the last the best gold, so the points past the gold peak are earlier iterations and
    the sentence must not call the drop over-optimisation."""
    rows = [(0.675, -0.24, 0.0), (0.852, 0.47, 5.38), (0.973, 0.56, 4.73), (1.053, 0.48, 3.43), (0.963, 0.38, 4.67)]
    rows.append((1.124, 0.37, 4.07))
    pts = [{"name": f"iter {k}", "gold": g, "proxy": p, "kl": kl} for k, (g, p, kl) in enumerate(rows, 1)]
    s = R.describe_overoptimisation(pts)
    # by KL: iter 1 (0), 4 (3.43), 6 (4.07: gold +0.449, the peak), 5 (4.67), 3 (4.73), 2 (5.38)
    assert s.startswith("Gold reward is highest at √KL ≈ 2.02, iter 6 (+0.45 over the start); the points of larger")
    assert "(iter 5, iter 3, iter 2) all came earlier in training" in s and "over-optimises" not in s
    # the same numbers with the KL growing in training order: the drop past the peak is over-optimisation
    grown = [dict(p, name=f"iter {k}") for k, p in enumerate(sorted(pts, key=lambda p: p["kl"]), 1)]
    assert "over-optimises the reward model beyond that point" in R.describe_overoptimisation(grown)


def test_overoptimisation_needs_a_drop_of_two_standard_errors(tmp_path):
    """Gold peaks at the second point (+0.30 over the start) and ends 0.25 lower; with standard errors of
    0.06 and 0.08 the drop's is √(0.0036 + 0.0064) = 0.10, so 0.25 is 2.5 s.e.: over-optimisation.
    With 0.09 and 0.12 it is 0.15, and the same drop (1.7 s.e.) is within noise."""

    def points(se_peak, se_last):
        rows = [(0.0, 0.0, 0.0, 0.05), (1.0, 0.3, 0.5, se_peak), (4.0, 0.05, 0.9, se_last)]
        return [{"kl": kl, "gold": g, "proxy": p, "gold_se": se} for kl, g, p, se in rows]

    shown = R.describe_overoptimisation(points(0.06, 0.08))
    assert "is 0.25 ± 0.10 lower at √KL ≈ 2.00 while the proxy keeps rising" in shown
    assert "over-optimises the reward model beyond that point" in shown
    noise = R.describe_overoptimisation(points(0.09, 0.12))
    assert "is 0.25 ± 0.15 lower at √KL ≈ 2.00, less than two standard errors" in noise
    assert "no over-optimisation is shown" in noise and "over-optimises" not in noise
    assert "(the proxy changed by +0.40 past the gold peak)" in noise
    # without standard errors the sentence is the one it always was
    plain = [{k: v for k, v in p.items() if k != "gold_se"} for p in points(0.09, 0.12)]
    assert "is 0.25 lower at √KL ≈ 2.00 while the proxy keeps rising" in R.describe_overoptimisation(plain)
    # the plot draws the gold points with their error bars (a PNG is written; it is not inspected)
    assert R.plot_overoptimisation(points(0.09, 0.12), tmp_path / "overopt.png").stat().st_size > 0


def test_overoptimisation_sentence_when_gold_still_rises():
    pts = [{"kl": k, "gold": 0.1 * k, "proxy": 0.2 * k} for k in (0.0, 1.0, 2.0, 4.0)]
    s = R.describe_overoptimisation(pts)
    assert "no over-optimisation is visible" in s
    assert "peaks at" not in s.split(";")[0]


def test_overoptimisation_sentence_when_gold_only_falls():
    pts = [{"kl": k, "gold": -0.1 * k, "proxy": 0.2 * k} for k in (0.0, 1.0, 4.0)]
    s = R.describe_overoptimisation(pts)
    assert s.startswith("Gold reward never rises above the starting policy's and is 0.40 lower at √KL ≈ 2.00")
    assert "do not carry over" in s
    assert "never rises above its start" in R.describe_study({"β = 0": pts})


def test_bon_sentence():
    rows = [
        {"n": n, "kl_bound": bon_kl_bound(n), "proxy": float(n), "gold": g}
        for n, g in ((1, 0.0), (2, 0.3), (4, 0.5), (8, 0.4), (16, 0.2))
    ]
    s = R.describe_bon(rows)
    assert "From N = 1 to N = 16" in s and "+15.00" in s and "+0.20" in s
    assert "gold is highest at N = 4" in s


def test_length_sentence_detects_verbosity_bias():
    lengths = list(range(10, 60, 5))
    pts = [{"policy": "p", "length": n, "reward": 0.1 * n, "gold": (-1) ** n * 0.1} for n in lengths]
    s = R.describe_length(pts)
    assert "r = +1.00" in s and "verbosity bias" in s
    fair = [{"policy": "p", "length": n, "reward": 0.1 * n, "gold": 0.2 * n} for n in lengths]
    assert "close to the annotator" in R.describe_length(fair)


def test_ppo_sentence_uses_first_and_last_tenth():
    rows = [{"step": i, "reward/score": float(i), "kl/ref": 0.1 * i} for i in range(1, 21)]
    s = R.describe_ppo(rows)
    # first tenth = steps 1-2 (mean 1.5), last tenth = steps 19-20 (mean 19.5); KL ends at 1.95
    assert "from +1.50 to +19.50" in s and "ended at 1.95 nats" in s
    assert "hold none" in R.describe_ppo([{"step": 1, "loss": 2.0}])


# ---------------------------------------------------------------------------------------------
# the study's plotting side
# ---------------------------------------------------------------------------------------------
def test_points_from_metrics_windows():
    rows = [{"step": i, "kl/ref": float(i), "reward/score": 2.0 * i, "reward/gold": -float(i)} for i in range(1, 8)]
    for row, se in zip(rows, (0.1, 0.2, 0.2, 0.3, 0.0, 0.4, 0.5)):
        row["reward/gold_se"] = se
    rows.insert(3, {"step": 99, "loss/policy": 1.0})  # rows without kl/ref are skipped
    pts = points_from_metrics(rows, window=3)
    assert [p["name"] for p in pts] == ["iter 1-3", "iter 4-6", "iter 7-7"]
    # √(0.01 + 0.04 + 0.04) / 3 = 0.3 / 3
    assert pts[0] == {"name": "iter 1-3", "kl": 2.0, "gold": -2.0, "proxy": 4.0, "gold_se": pytest.approx(0.1)}
    assert pts[1]["gold_se"] == pytest.approx(0.5 / 3)  # √(0.09 + 0 + 0.16) / 3
    assert pts[2]["kl"] == 7.0 and pts[2]["gold_se"] == pytest.approx(0.5)
    no_gold = points_from_metrics([{"step": 1, "kl/ref": 0.5, "reward/score": 1.0}], window=2)
    assert no_gold[0]["gold"] is None and no_gold[0]["gold_se"] is None


def test_study_plot_and_sentence(tmp_path):
    from tether.study import draw_study

    runs = {"β = 0.1": _overopt_points()[:4], "β = 0.001": _overopt_points()}
    out = draw_study(tmp_path, runs, temperature=0.7)
    assert out["study_json"].is_file()
    assert out["report"].plots["study"].read_bytes().startswith(PNG_MAGIC)
    sentence = out["report"].sentences["study"]
    assert sentence.startswith("With β = 0.1 gold is still at its highest at the largest KL (√KL ≈ 3.00)")
    assert "with β = 0.001 gold peaks at √KL ≈ 4.50" in sentence


def test_study_config_and_cli_positional_name(capsys):
    from tether.cli import main

    assert StudyConfig(study="overoptimisation").study == "overoptimization"
    assert main(["study", "nonsense"]) == 2
    assert "unknown study 'nonsense'" in capsys.readouterr().err
    assert main(["study", "overoptimization", "--kl_coefs", "-1"]) == 2
    assert "--kl_coefs must be >= 0" in capsys.readouterr().err


def test_run_study_trains_evaluates_checkpoints_and_skips_finished_runs(tiny_model_dir, tiny_rm_dir, tmp_path):
    """The orchestration against the real PPO trainer, on tiny models (2 iterations, 1 coefficient)."""
    import json

    from tether.study import run_folder, run_study

    config = StudyConfig(
        model_name_or_path=str(tiny_model_dir),
        reward_model_path=str(tiny_rm_dir),
        kl_coefs=[0.05],
        num_iterations=2,
        batch_size=2,
        max_new_tokens=3,
        eval_checkpoints=True,
        save_every=1,
        eval_num_prompts=2,
        output_dir=str(tmp_path),
    )
    out = run_study(config)
    doc = json.loads(out["study_json"].read_text())
    points = doc["runs"]["β = 0.05"]
    # the starting policy, two checkpoints and the final policy, evaluated on held-out prompts with gold
    # (the final policy is checkpoint-2, so it is not evaluated twice)
    assert [p["name"] for p in points] == ["start", "checkpoint-1", "checkpoint-2"]
    assert points[0]["kl"] == 0.0 and all(p["gold"] is not None and p["proxy"] is not None for p in points)
    summary = run_folder(tmp_path, 0.05) / "ppo_summary.json"
    rows = [json.loads(line) for line in (summary.parent / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/gold" in r for r in rows if "kl/ref" in r)  # the gold hook logged every iteration
    stamps = [summary.stat().st_mtime_ns, (summary.parent / "checkpoint_points.json").stat().st_mtime_ns]
    again = run_study(config)  # a finished run is reused, not retrained, and its evaluation is not redone
    assert [summary.stat().st_mtime_ns, (summary.parent / "checkpoint_points.json").stat().st_mtime_ns] == stamps
    assert json.loads(again["study_json"].read_text())["runs"] == doc["runs"]


def test_negative_kl_estimates_count_as_zero_and_the_first_point_is_the_start():
    # per-iteration k1 estimates: slightly negative at iteration 3; the start is iteration 1
    pts = [
        {"kl": 0.0, "gold": 0.5, "proxy": 0.0},
        {"kl": 0.01, "gold": 0.6, "proxy": 0.1},
        {"kl": -0.02, "gold": 0.2, "proxy": 0.0},
        {"kl": 1.0, "gold": 0.9, "proxy": 1.0},
    ]
    s = R.describe_overoptimisation(pts)
    # recentred on iteration 1 (gold 0.5), not on the negative-KL point (gold 0.2)
    assert "√KL ≈ 1.00, +0.40 over the starting policy" in s
