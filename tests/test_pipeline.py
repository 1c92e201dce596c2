"""`tether pipeline` end to end on tiny models: every stage, the report, and re-runs that skip work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tether.config import ConfigError, parse_config
from tether.pipeline import PipelineConfig, PipelineState, run_pipeline
from tether.ppo.reward_scale import FROM_FILE

TINY_STAGES = {
    "prompts_per_round": 12,
    "eval_max_prompts": 3,
    "preference_max_new_tokens": 6,
    "bon_n": "1,2",
    "best_of_n": 2,
    "sft": {"max_steps": 2, "per_device_train_batch_size": 4},
    "rm": {"max_steps": 2, "per_device_train_batch_size": 4},
    "ppo": {
        "num_iterations": 2,
        "batch_size": 4,
        "mini_batch_size": 2,
        "ppo_epochs": 1,
        "max_new_tokens": 6,
        "save_steps": 0,
    },
    "dpo": {"max_steps": 2, "per_device_train_batch_size": 4},
    "eval": {"max_new_tokens": 6, "probes": False},
}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("pipeline")
    config_file = folder / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump({**TINY_STAGES, "model_name_or_path": str(tiny_model_dir)}))
    out = folder / "out"
    config = parse_config(PipelineConfig, ["--config", str(config_file), "--output_dir", str(out)])
    summary = run_pipeline(config)
    return config, out, summary


def test_pipeline_runs_every_stage_and_writes_the_report(pipeline_run):
    _, out, summary = pipeline_run
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert set(state) == {"sft", "preferences", "rm", "ppo", "dpo", "eval"}
    for stage in ("sft", "rm", "dpo"):
        assert (out / stage / "config.json").is_file(), stage
    assert (out / "ppo" / "policy" / "config.json").is_file()
    assert (out / "rm" / "reward_stats.json").is_file()
    pairs = [json.loads(line) for line in (out / "data" / "preferences_round1.jsonl").read_text().splitlines()]
    assert 1 <= len(pairs) <= 12 * 6 and all({"prompt", "chosen", "rejected"} <= set(p) for p in pairs)
    # 4 responses per prompt, every pair of them labelled: up to 6 pairs per prompt, in prompt order
    prompts = [json.dumps(p["prompt"]) for p in pairs]
    assert max(prompts.count(x) for x in prompts) <= 6 and len(set(prompts)) <= 12
    assert len(pairs) > len(set(prompts))  # some prompt gave several pairs
    # 6-token budget: responses cut there are marked, so no stop token is appended to them
    samples = [json.loads(x) for x in (out / "data" / "sft_samples_round1.jsonl").read_text().splitlines()]
    cut = {s["response"] for s in samples if not s["stopped"]}
    assert cut and all(p.get("chosen_truncated", False) == (p["chosen"] in cut) for p in pairs)
    # PPO's reward normalisation is measured on those samples of its starting policy, all of them
    norm = state["ppo"]["reward_normalisation"]
    n = len(samples)
    assert norm["source"] == f"{FROM_FILE}: {n} of the {n} responses in sft_samples_round1.jsonl"
    assert norm["count"] == n and norm["std"] > 0
    assert json.loads((out / "ppo" / "ppo_summary.json").read_text())["reward_normalisation"] == norm
    eval_doc = json.loads((out / "eval" / "eval.json").read_text())
    assert set(eval_doc["metrics"]) == {"sft", "ppo", "dpo", "bon2"}
    for name in ("sft", "ppo", "dpo"):
        assert eval_doc["metrics"][name]["reward/gold"] is not None
    report = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "| Gold score" in report and "| sft | ppo | dpo | bon2 |" in report
    plots = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in plots} >= {
        "ppo_curves.png",
        "overoptimisation.png",
        "best_of_n.png",
        "length_vs_reward.png",
    }
    for p in plots:
        assert p.stat().st_size > 1000 and p.name in html
    assert summary["report"] == str(out / "report.html")


def test_rerunning_the_pipeline_skips_finished_stages(pipeline_run, monkeypatch):
    config, out, _ = pipeline_run
    before = json.loads((out / "pipeline_state.json").read_text())

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished stage was run again")

    import tether.ppo
    import tether.ppo.trainer
    import tether.stages.dpo
    import tether.stages.reward
    import tether.stages.sft

    for module, name in (
        (tether.stages.sft, "train_sft"),
        (tether.stages.reward, "train_reward"),
        (tether.ppo.trainer, "run_ppo"),
        (tether.ppo, "run_ppo"),
        (tether.stages.dpo, "train_dpo"),
    ):
        monkeypatch.setattr(module, name, must_not_train)
    summary = run_pipeline(config)
    after = json.loads((out / "pipeline_state.json").read_text())
    assert after == before
    assert summary["ppo"] == str(out / "ppo" / "policy")
    # the report quotes the time each stage took when it ran, not just this (skipping) run's time
    stage_seconds = {name: entry["seconds"] for name, entry in before["stages"].items()}
    assert summary["stage_seconds"] == stage_seconds
    total = sum(stage_seconds.values()) / 60
    assert f"{total:.1f} minutes in all" in (out / "report.md").read_text()


def test_a_deleted_artifact_is_redone(tmp_path):
    state = PipelineState(tmp_path)
    artifact = tmp_path / "sft"
    artifact.mkdir()
    state.record("sft", artifact, 1.0)
    assert PipelineState(tmp_path).done("sft") is not None
    artifact.rmdir()
    assert PipelineState(tmp_path).done("sft") is None


def test_pipeline_config_rejects_bad_combinations(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage"):
        PipelineConfig(skip="sft,typo")
    with pytest.raises(ConfigError, match="label_command"):
        PipelineConfig(rounds=2, preferences="pairs.jsonl")
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"ppo": {"not_an_option": 1}}))
    config = parse_config(PipelineConfig, ["--config", str(bad), "--output_dir", str(tmp_path / "o")])
    from tether.pipeline import stage_config
    from tether.ppo import PPOConfig

    with pytest.raises(ConfigError, match="not_an_option"):
        stage_config(PPOConfig, config, "ppo")
    # every section is checked before the first stage runs: nothing is written
    for section in ({"ppo": {"not_an_option": 1}}, {"eval": {"seed": 3}}, {"eval": {"max_new_tokns": 8}}):
        bad.write_text(yaml.safe_dump(section))
        config = parse_config(PipelineConfig, ["--config", str(bad), "--output_dir", str(tmp_path / "o")])
        key = next(iter(next(iter(section.values()))))
        with pytest.raises(ConfigError, match=f"unknown option\\(s\\) {key}"):
            run_pipeline(config)
        assert not (tmp_path / "o").exists()


def test_the_shipped_demo_yaml_matches_the_defaults_and_every_stage_accepts_its_section():
    from tether.pipeline import DEMO_STAGE_DEFAULTS, stage_config
    from tether.ppo import PPOConfig
    from tether.stages.dpo import DPOConfig
    from tether.stages.reward import RewardConfig
    from tether.stages.sft import SFTConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    from_file = parse_config(PipelineConfig, ["--config", str(path)])
    defaults = PipelineConfig()
    for f in (
        "rounds",
        "prompts_per_round",
        "annotator_tau",
        "eval_max_prompts",
        "bon_n",
        "best_of_n",
        "bon_curve_prompts",
        "preference_max_new_tokens",
        "temperature",
        "rl",
    ):
        assert getattr(from_file, f) == getattr(defaults, f), f
    for stage, cls in (("sft", SFTConfig), ("rm", RewardConfig), ("ppo", PPOConfig), ("dpo", DPOConfig)):
        assert getattr(from_file, stage) == DEMO_STAGE_DEFAULTS[stage]
        built = stage_config(cls, from_file, stage, output_dir="unused")
        for key, value in DEMO_STAGE_DEFAULTS[stage].items():
            assert getattr(built, key) == value, (stage, key)


@pytest.mark.parametrize(
    "name, folder, lengths, iterations",
    [("recipe_qa_feedback", "recipe", (1280, 1536), 30), ("recipe_qa_feedback_cpu", "recipe_cpu", (512, 768), 4)],
)
def test_the_recipe_yaml_builds_every_stage_config_with_its_method(tiny_rm_dir, name, folder, lengths, iterations):
    """configs/recipe_qa_feedback*.yaml (docs/recipe.md): every section is valid for its stage, the reward
    model is judged on the test split, and the RL method it names (rloo) gets its estimator and no value
    model from the shared `ppo:` section."""
    from tether.pipeline import RL_METHODS, check_sections, stage_config
    from tether.ppo import PPOConfig
    from tether.stages.dpo import DPOConfig
    from tether.stages.reward import RewardConfig
    from tether.stages.sft import SFTConfig

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    assert f"gold_reward_model: outputs/{folder}/gold_rm" in path.read_text()  # trained first (docs/recipe.md)
    config = parse_config(PipelineConfig, ["--config", str(path), "--gold_reward_model", str(tiny_rm_dir)])
    check_sections(config)
    assert config.rl_methods() == ["rloo"]
    for stage, cls in (("sft", SFTConfig), ("rm", RewardConfig), ("dpo", DPOConfig)):
        built = stage_config(cls, config, stage, output_dir="unused")
        assert (built.max_prompt_length, built.max_length) == lengths, stage
    assert stage_config(RewardConfig, config, "rm", output_dir="u").eval_dataset == "data/qa_feedback/test.jsonl.gz"
    rloo = stage_config(
        PPOConfig, config, "ppo", {"advantage_estimator": "rloo", "value_head_on_policy": False}, output_dir="u",
        **RL_METHODS["rloo"],
    )  # fmt: skip
    assert (rloo.advantage_estimator, rloo.num_generations, rloo.batch_size, rloo.value_head_on_policy) == (
        "rloo", 4, 32, False,
    )  # fmt: skip
    assert rloo.num_iterations == iterations


def test_tether_ppo_on_embedded_demo_logs_gold_every_iteration(tmp_path, tiny_model_dir, tiny_rm_dir, annotator):
    from tether.cli import main
    from tether.tracking import read_jsonl

    out = tmp_path / "ppo"
    args = ["--model_name_or_path", str(tiny_model_dir), "--reward_model_path", str(tiny_rm_dir)]
    args += ["--dataset", "embedded:demo", "--output_dir", str(out), "--batch_size", "4", "--mini_batch_size", "2"]
    args += ["--ppo_epochs", "1", "--max_new_tokens", "4", "--num_iterations", "2", "--save_steps", "0"]
    assert main(["ppo", *args, "--disable_tqdm", "true", "--report_to", "none"]) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2]
    assert all(isinstance(r["reward/gold"], float) and -12.0 < r["reward/gold"] < 3.0 for r in metrics)


def test_pipeline_rl_trains_each_method_and_reports_one_column_each(tmp_path, tiny_model_dir, tiny_rm_dir):
    """Also the gold judge of Gao et al.'s setup: ``--gold_reward_model`` (here the tiny reward model)
    replaces the simulated annotator in PPO's rollouts and in the evaluation."""
    # the `ppo:` section is shared: its value head (as configs/demo.yaml has) is PPO's, never a
    # critic-free method's
    stages = {**TINY_STAGES, "ppo": {**TINY_STAGES["ppo"], "mini_batch_size": 4, "value_head_on_policy": True}}
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(
        yaml.safe_dump({**stages, "model_name_or_path": str(tiny_model_dir), "gold_reward_model": str(tiny_rm_dir)})
    )
    out = tmp_path / "out"
    args = ["--config", str(config_file), "--output_dir", str(out), "--rl", "ppo,rloo,grpo", "--skip", "dpo,bon"]
    config = parse_config(PipelineConfig, args)
    assert config.rl_methods() == ["ppo", "rloo", "grpo"]
    summary = run_pipeline(config)
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert set(state) == {"sft", "preferences", "rm", "ppo", "rloo", "grpo", "eval"}
    assert summary["ppo"] == str(out / "ppo" / "policy")
    for method in ("rloo", "grpo"):
        assert state[method]["artifact"] == str(out / method / "policy")
        assert state[method]["iterations"] == 2 and state[method]["stopped_reason"] == "completed"
        rows = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and "loss/value" not in rows[0]  # critic-free: no value model
        assert ("loss/kl" in rows[0]) == (method == "grpo")  # GRPO's β·k3 in the loss
    assert not (out / "rloo" / "value_model").exists() and (out / "ppo" / "policy").is_dir()
    assert "loss/value" in json.loads((out / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    doc = json.loads((out / "eval" / "eval.json").read_text())
    metrics = doc["metrics"]
    assert list(metrics) == ["sft", "ppo", "rloo", "grpo"]
    assert doc["settings"]["gold"] == str(tiny_rm_dir)
    from tether.evaluation.evaluate import RewardModelJudge

    judge = RewardModelJudge(tiny_rm_dir)
    rows = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()][:4]
    by_hand = judge.scores([r["prompt"] for r in rows], [r["response"] for r in rows], [r["stopped"] for r in rows])
    assert [r["gold"] for r in rows] == pytest.approx(by_hand, abs=1e-5)
    ppo_rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["reward/gold"], float) for r in ppo_rows)
    for name in ("ppo", "rloo", "grpo"):  # the same held-out prompts; KL and gold gain for each
        assert metrics[name]["samples"] == metrics["sft"]["samples"] == 3 * 4  # 3 prompts, 4 samples each
        assert metrics[name]["kl/ref"] is not None and metrics[name]["gain/gold"] is not None
    report = (out / "report.md").read_text()
    assert "| Metric | sft | ppo | rloo | grpo |" in report
    kl_row = next(line for line in report.splitlines() if line.startswith("| KL to reference"))
    gain_row = next(line for line in report.splitlines() if line.startswith("| Gold gain"))
    assert kl_row.count("|") == 6 and "–" not in kl_row.split("|", 3)[3]
    assert gain_row.count("±") >= 3


def test_pipeline_rejects_a_gold_reward_model_that_is_not_a_saved_model(tmp_path):
    with pytest.raises(ConfigError, match=f"--gold_reward_model {tmp_path}: not a saved reward model"):
        parse_config(PipelineConfig, ["--gold_reward_model", str(tmp_path)])


def test_pipeline_rl_rejects_unknown_methods_and_rounds():
    with pytest.raises(ConfigError, match="--rl ppo,dqn: expected distinct methods from ppo, rloo, grpo"):
        PipelineConfig(rl="ppo,dqn")
    with pytest.raises(ConfigError, match="--rl ppo,ppo"):
        PipelineConfig(rl="ppo,ppo")
    with pytest.raises(ConfigError, match="needs --rounds 1"):
        PipelineConfig(rl="ppo,rloo", rounds=2)


def test_a_section_names_its_held_out_data_and_may_not_replace_the_pipelines(tmp_path, tiny_model_dir, caplog):
    """`rm: eval_dataset: FILE` evaluates the reward model on FILE and trains it on every pipeline pair
    (no share held out); `sft:` / `dpo:` take it the same way. `dataset` in a section is refused before
    anything is written: the pipeline trains each stage on its own inputs."""
    import logging

    from tether.pipeline import training_and_held_out
    from tether.stages.reward import RewardConfig

    held_out = tmp_path / "held_out.jsonl"
    rows = [{"prompt": f"Say {w}.", "chosen": w, "rejected": f"{w} {w} {w}"} for w in ("yes", "no", "maybe")]
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {**TINY_STAGES, "model_name_or_path": str(tiny_model_dir), "skip": "ppo,dpo,bon,eval,report"}
    config["rm"] = {**TINY_STAGES["rm"], "eval_dataset": str(held_out)}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="tether"):
        run_pipeline(parse_config(PipelineConfig, ["--config", str(tmp_path / "p.yaml"), "--output_dir", str(out)]))
    assert f"read 3 preferences from {held_out}" in caplog.text
    accuracy = json.loads((out / "rm" / "eval_results.json").read_text())["final"]["eval_accuracy"]
    assert abs(3 * accuracy - round(3 * accuracy)) < 1e-6  # a share of the file's 3 pairs

    # the rule itself: the named data, else a seeded share (the split's sizes), else nothing held out
    class Run:
        config = PipelineConfig()

    records = list(range(20))
    assert training_and_held_out(Run, RewardConfig(eval_dataset=str(held_out)), records) == (records, str(held_out))
    train, held = training_and_held_out(Run, RewardConfig(eval_split_ratio=0.25), records)
    assert (len(train), len(held), sorted(train + held)) == (15, 5, records)
    assert training_and_held_out(Run, RewardConfig(eval_split_ratio=0.0), records) == (records, [])

    for stage in ("sft", "rm", "dpo", "ppo"):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({stage: {"dataset": "other.jsonl"}}))
        argv = ["--config", str(tmp_path / "bad.yaml"), "--output_dir", str(tmp_path / "o")]
        bad = parse_config(PipelineConfig, argv)
        with pytest.raises(ConfigError, match=f"pipeline section `{stage}`: dataset is set by the pipeline"):
            run_pipeline(bad)
        assert not (tmp_path / "o").exists()


def test_the_gold_judge_reads_prompts_cut_as_the_policy_read_them(tiny_rm_dir):
    """The pipeline's gold reward model scores with the max_prompt_length of the stage it judges (PPO's
    or the evaluation's), one loaded model shared by both: a prompt within the cut scores as uncut, a
    longer one as its last tokens only."""
    from tether.pipeline import gold_judge

    config = parse_config(PipelineConfig, ["--gold_reward_model", str(tiny_rm_dir)])
    whole, cut = gold_judge(config), gold_judge(config, 64, 4)
    assert (whole.max_prompt_length, whole.batch_size, cut.max_prompt_length, cut.batch_size) == (None, 8, 64, 4)
    assert cut.model is whole.model
    short, long = "Name a colour.", "Read this first. " * 30 + "Name a colour."
    responses = ["Blue.", "Green, like grass."]
    assert cut.scores([short] * 2, responses) == pytest.approx(whole.scores([short] * 2, responses), abs=1e-6)
    assert cut.scores([long] * 2, responses) != pytest.approx(whole.scores([long] * 2, responses), abs=1e-6)
