"""The ``tether`` command line: help, YAML + flags, and clean errors for bad data and bad configs.

The help and one bad-data run go through the installed console script in a real subprocess; the
other runs call ``tether.cli.main`` in-process (the same code path, without re-importing torch).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tether.cli import COMMANDS, main
from tether.config import ConfigError, parse_config

TETHER = Path(sys.executable).parent / "tether"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(TETHER), *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)


needs_script = pytest.mark.skipif(not TETHER.exists(), reason=f"console script {TETHER} not installed")


# ------------------------------------------------------------------------------------------------
# Help


@needs_script
def test_tether_help_lists_every_command():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for name, (_, _, _, description) in COMMANDS.items():
        assert f"  {name}" in result.stdout and description in result.stdout


@needs_script
def test_stage_help_lists_options_with_defaults_and_meaning():
    result = _run("sft", "--help")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())  # argparse wraps lines
    for flag in (
        "--model_name_or_path",
        "--dataset",
        "--dataset_split",
        "--eval_dataset",
        "--output_dir",
        "--learning_rate",
        "--per_device_train_batch_size",
        "--gradient_accumulation_steps",
        "--num_train_epochs",
        "--lr_scheduler_type",
        "--optim",
        "--logging_steps",
        "--save_steps",
        "--report_to",
        "--gradient_checkpointing",
        "--use_peft",
        "--lora_r",
        "--lora_alpha",
        "--lora_dropout",
        "--seed",
        "--config",
    ):
        assert flag in out, flag
    assert "Train LoRA adapters instead of all weights. (default: False)" in out
    assert "Maximum tokens of prompt + response. (default: 512)" in out


def test_unknown_command_exits_2_with_usage(capsys):
    assert main(["no-such-stage"]) == 2
    assert "unknown command 'no-such-stage'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# YAML + flags


@dataclass
class ToyConfig:
    learning_rate: float = field(default=1e-3, metadata={"help": "Step size."})
    steps: int = field(default=10, metadata={"help": "Optimizer steps."})
    name: str = field(default="toy", metadata={"help": "Run name."})
    use_peft: bool = field(default=False, metadata={"help": "LoRA."})
    dataset: str | None = field(default=None, metadata={"help": "Data."})


def test_yaml_sets_values_and_flags_override_it(tmp_path):
    config_file = tmp_path / "toy.yaml"
    # `1e-5` is a string to YAML 1.1 (no dot); argparse converts string defaults with the field type
    config_file.write_text("learning_rate: 1e-5\nsteps: 7\nuse_peft: true\ndataset: data/pairs.jsonl\n")
    config = parse_config(ToyConfig, ["--config", str(config_file), "--steps", "3", "--use_peft", "false"])
    assert config == ToyConfig(learning_rate=1e-5, steps=3, name="toy", use_peft=False, dataset="data/pairs.jsonl")
    assert isinstance(config.learning_rate, float)
    # flags before --config win too, and without --config the defaults hold
    assert parse_config(ToyConfig, ["--name", "x", "--config", str(config_file)]).name == "x"
    assert parse_config(ToyConfig, ["--steps", "2"]) == ToyConfig(steps=2)


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    config_file = tmp_path / "toy.yaml"
    config_file.write_text("steps: 3\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError) as info:
        parse_config(ToyConfig, ["--config", str(config_file)])
    assert str(info.value) == f"{config_file}: unknown option(s) learning_rat for ToyConfig"


@pytest.mark.parametrize(
    "text, line",
    [
        ("steps: 3\nname: [unclosed\nuse_peft: true\n", 3),
        ("steps: 3\n  bad_indent: 1\n", 2),
        ("steps: 3\nname: 'a\n", 3),
    ],
)
def test_malformed_yaml_names_file_and_line(tmp_path, text, line):
    config_file = tmp_path / "broken.yaml"
    config_file.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_config(ToyConfig, ["--config", str(config_file)])
    assert str(info.value).startswith(f"{config_file}:{line}: not valid YAML")


def test_yaml_that_is_not_a_mapping_and_missing_file(tmp_path):
    config_file = tmp_path / "list.yaml"
    config_file.write_text("- steps\n- 3\n")
    with pytest.raises(ConfigError, match="expected a mapping of option names to values, got list"):
        parse_config(ToyConfig, ["--config", str(config_file)])
    with pytest.raises(ConfigError, match="no such config file"):
        parse_config(ToyConfig, ["--config", str(tmp_path / "missing.yaml")])


def test_yaml_and_flags_combine_on_a_real_stage_config(tmp_path):
    from tether.stages.sft import SFTConfig

    config_file = tmp_path / "sft.yaml"
    config_file.write_text(
        f"output_dir: {tmp_path / 'from-yaml'}\nlearning_rate: 1e-5\nnum_train_epochs: 2\n"
        "use_peft: true\nlora_r: 4\ndataset: demos.jsonl\nreport_to: none\n"
    )
    config = parse_config(SFTConfig, ["--config", str(config_file), "--learning_rate", "3e-5", "--lora_r", "8"])
    assert config.learning_rate == 3e-5 and config.lora_r == 8  # flags win
    assert config.num_train_epochs == 2 and config.use_peft is True and config.dataset == "demos.jsonl"  # from YAML
    assert config.output_dir == str(tmp_path / "from-yaml")
    assert config.lora_alpha == 32 and config.dataset_split == "train"  # defaults
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1e-5\nnum_epochs: 2\n")
    assert main(["sft", "--config", str(bad)]) == 2  # unknown key: a clean error, not a traceback


# ------------------------------------------------------------------------------------------------
# Bad data: exit 2, FILE:LINE on stderr, no traceback, no output folder

BAD_DEMOS = [{"prompt": "p", "completion": "ok"}, {"prompt": "p"}, {"prompt": "", "completion": "c"}]


def _write_bad_demos(folder: Path) -> Path:
    path = folder / "bad demos.jsonl"  # a space in the name: paths are quoted nowhere, printed as given
    path.write_text("".join(json.dumps(r) + "\n" for r in BAD_DEMOS))
    return path


def _leftovers(folder: Path, output: Path) -> list[str]:
    """Anything a stage may have written: the output folder or its temporary siblings."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((output.name, f".{output.name}")))


@needs_script
def test_cli_subprocess_bad_data_exits_2_with_file_line_and_writes_nothing(tmp_path):
    bad = _write_bad_demos(tmp_path)  # demonstrations are not preference pairs
    out = tmp_path / "rm-out"
    result = _run("rm", "--dataset", str(bad), "--output_dir", str(out), "--report_to", "none", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert f"tether rm: error: {bad}:1: missing field 'chosen'" in result.stderr
    assert f"{bad}:3: missing field 'rejected'" in result.stderr
    assert _leftovers(tmp_path, out) == []
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "stage, expected",
    [
        ("sft", ["{bad}:2: missing field 'completion'", "{bad}:3: empty text (field prompt)"]),
        ("rm", ["{bad}:1: missing field 'chosen'"]),
        ("dpo", ["{bad}:1: missing field 'chosen'"]),
    ],
)
def test_cli_in_process_bad_data(tmp_path, stage, expected):
    bad = _write_bad_demos(tmp_path)
    out = tmp_path / f"{stage}-out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([stage, "--dataset", str(bad), "--output_dir", str(out), "--report_to", "none"])
    assert code == 2
    for line in expected:
        assert line.format(bad=bad) in err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert _leftovers(tmp_path, out) == []


# ------------------------------------------------------------------------------------------------
# One name per option across commands; the other names (and TRL's) are aliases, in flags and YAML


def test_reward_model_and_prompts_have_one_name_with_aliases_on_every_command():
    from tether.evaluation.evaluate import EvalConfig
    from tether.pipeline import PipelineConfig
    from tether.ppo import PPOConfig
    from tether.serve.app import ServeConfig
    from tether.stages.best_of_n import BestOfNConfig

    for cls in (PPOConfig, EvalConfig, BestOfNConfig, ServeConfig, PipelineConfig):
        for flag in ("--reward_model_path", "--reward_model_name_or_path", "--reward_model"):
            assert parse_config(cls, [flag, "rm-dir"]).reward_model_path == "rm-dir", (cls.__name__, flag)
    for cls in (PPOConfig, EvalConfig, BestOfNConfig):
        for flag in ("--dataset", "--dataset_name"):
            assert parse_config(cls, [flag, "p.jsonl"]).dataset == "p.jsonl", (cls.__name__, flag)
    evaluation = parse_config(EvalConfig, ["--prompts", "held.jsonl", "--prompts_split", "test"])
    assert (evaluation.dataset, evaluation.dataset_split) == ("held.jsonl", "test")


def test_trl_names_set_the_same_ppo_and_data_options(tmp_path):
    from tether.ppo import PPOConfig

    flags = ["--kl_coef", "0.2", "--num_ppo_epochs", "2", "--kl_estimator", "k3", "--dataset_name", "org/prompts"]
    flags += ["--dataset_config", "en", "--dataset_train_split", "tr"]
    config = parse_config(PPOConfig, [*flags, "--output_dir", str(tmp_path / "ppo"), "--report_to", "none"])
    assert (config.init_kl_coef, config.ppo_epochs, config.kl_penalty) == (0.2, 2, "k3")
    assert (config.dataset, config.dataset_config, config.dataset_split) == ("org/prompts", "en", "tr")
    # PPO has no test split; the stages that evaluate on one take TRL's name for it
    from tether.stages.reward import RewardConfig

    rm = parse_config(RewardConfig, ["--dataset_name", "org/pairs", "--dataset_test_split", "te", "--report_to", "no"])
    assert (rm.dataset, rm.dataset_test_split) == ("org/pairs", "te")
    # the same names as YAML keys
    yaml_file = tmp_path / "ppo.yaml"
    yaml_file.write_text("kl_coef: 0.3\nnum_ppo_epochs: 3\nkl_estimator: k1\nreward_model: rm\ndataset_name: d\n")
    config = parse_config(PPOConfig, ["--config", str(yaml_file), "--report_to", "none"])
    assert (config.init_kl_coef, config.ppo_epochs, config.kl_penalty) == (0.3, 3, "k1")
    assert (config.reward_model_path, config.dataset) == ("rm", "d")
    # a flag still wins over the YAML key, whichever of its names either uses
    assert parse_config(PPOConfig, ["--config", str(yaml_file), "--init_kl_coef", "0.1"]).init_kl_coef == 0.1


def test_yaml_giving_one_option_under_two_names_is_refused(tmp_path):
    from tether.ppo import PPOConfig

    yaml_file = tmp_path / "twice.yaml"
    yaml_file.write_text("init_kl_coef: 0.1\nkl_coef: 0.2\n")
    with pytest.raises(ConfigError) as info:
        parse_config(PPOConfig, ["--config", str(yaml_file)])
    assert str(info.value) == f"{yaml_file}: init_kl_coef and kl_coef are the same option (init_kl_coef); give it once"
    assert main(["ppo", "--config", str(yaml_file)]) == 2


def test_pipeline_sections_accept_aliases_and_refuse_unknown_names():
    from tether.pipeline import PipelineConfig, stage_config
    from tether.ppo import PPOConfig

    pipeline = PipelineConfig(ppo={"kl_coef": 0.125, "num_ppo_epochs": 1, "report_to": "none"})
    config = stage_config(PPOConfig, pipeline, "ppo", output_dir="out/ppo")
    assert (config.init_kl_coef, config.ppo_epochs) == (0.125, 1)
    with pytest.raises(ConfigError, match=r"pipeline section `ppo`: unknown option\(s\) kl_coeff for PPOConfig"):
        stage_config(PPOConfig, PipelineConfig(ppo={"kl_coeff": 0.1}), "ppo")


def test_help_says_where_a_trl_name_means_something_else():
    from tether.ppo import PPOConfig

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_config(PPOConfig, ["--help"])
    text = " ".join(out.getvalue().split())
    assert "Not TRL's --response_length, which is a maximum" in text
    assert "Not TRL's --missing_eos_penalty, which is subtracted from the score" in text
    assert "--init-kl-coef INIT_KL_COEF, --kl_coef INIT_KL_COEF" in text


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_trainer_stages_refuse_and_hide_the_training_arguments_the_trainer_never_reads(stage, capsys):
    """do_train/do_eval/do_predict do nothing in transformers' Trainer, and the Trainer would push only the
    checkpoints tether deletes, never tether's final model; every other option works there."""
    with pytest.raises(SystemExit):
        main([stage, "--help"])
    shown = capsys.readouterr().out
    assert "--do_train" not in shown and "--do_predict" not in shown
    assert "--push_to_hub" not in shown and "--hub_model_id" not in shown
    assert "--eval_strategy" in shown and "--save_steps" in shown  # the Trainer implements these
    assert main([stage, "--dataset", "embedded:demo", "--do_eval", "true", "--do_predict", "true"]) == 2
    err = capsys.readouterr().err
    assert "--do_eval True, --do_predict True: not used by" in err and "remove them" in err
    assert main([stage, "--dataset", "embedded:demo", "--push_to_hub", "true", "--hub_model_id", "me/m"]) == 2
    err = capsys.readouterr().err
    assert "--push_to_hub True, --hub_model_id me/m: not used by" in err
