"""The Python API: names importable from ``tether`` (lazily), and the ``train_*`` functions taking
objects already in memory (models, tokenizers, ``datasets.Dataset``) as a notebook has them; the
README's "From Python" flow (SFT -> reward model) on tiny models: objects in, folders out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from ppo_tiny import one_torch_thread, word_dirs  # noqa: F401  (fixtures: the PPO tests' tiny word-level models)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed

import tether
from tether.config import ConfigError
from tether.data import DataError

TOPICS = ["river", "garden", "violin", "teapot", "lantern", "bicycle", "meadow", "harbour"]
DEMO_ROWS = [{"prompt": f"Tell me about the {t}.", "completion": f"The {t} is lovely."} for t in TOPICS]
PAIR_ROWS = [
    {"prompt": f"Tell me about the {t}.", "chosen": f"The {t} is lovely.", "rejected": f"The {t} is awful."}
    for t in TOPICS
]
COMMON = dict(
    per_device_train_batch_size=4,
    num_train_epochs=1,
    save_strategy="no",
    report_to="none",
    seed=0,
    disable_tqdm=True,
    use_cpu=True,
    eval_split_ratio=0.0,
)


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_import_tether_stays_light_and_exports_the_api():
    code = "import sys, tether; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from tether.ppo import PPOTrainer
    from tether.stages.reward import train_reward
    from tether.stages.sft import SFTConfig

    assert (tether.SFTConfig, tether.train_reward, tether.PPOTrainer) == (SFTConfig, train_reward, PPOTrainer)
    assert {"DPOConfig", "train_dpo", "run_ppo", "create_app", "EvalConfig", "run_pipeline"} <= set(dir(tether))
    with pytest.raises(AttributeError, match="no attribute 'SFTconfig'"):
        tether.SFTConfig_ = tether.SFTconfig


def test_readme_flow_sft_then_reward_model_from_objects_in_memory(tmp_path, tiny_model_dir):
    # the README's "From Python" snippet, with the tiny model in place of SmolLM2
    demos = datasets.Dataset.from_list(DEMO_ROWS)
    pairs = datasets.Dataset.from_list(PAIR_ROWS)
    sft_dir = tether.train_sft(
        tether.SFTConfig(output_dir=str(tmp_path / "sft"), learning_rate=1e-2, **COMMON),
        train_dataset=demos,
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    summary = json.loads((sft_dir / "training_summary.json").read_text())
    assert (summary["train_examples"], summary["eval_examples"]) == (8, 0)
    assert summary["model_name_or_path"] == str(tiny_model_dir)  # where the passed model came from
    assert summary["global_steps"] == 2  # 8 demonstrations / batch 4, one epoch
    rm_dir = tether.train_reward(
        tether.RewardConfig(output_dir=str(tmp_path / "rm"), learning_rate=3e-3, **COMMON),
        train_dataset=pairs,
        eval_dataset=pairs.select(range(2)),
        model=AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1),
        tokenizer=AutoTokenizer.from_pretrained(sft_dir),
    )
    rm_summary = json.loads((rm_dir / "training_summary.json").read_text())
    assert (rm_summary["train_pairs"], rm_summary["eval_pairs"], rm_summary["global_steps"]) == (8, 2, 2)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    assert reward_model.config.num_labels == 1 and (rm_dir / "reward_stats.json").is_file()


def test_objects_in_memory_train_exactly_as_paths_and_files(tmp_path, tiny_model_dir):
    """The same data and starting weights as objects or as files give the same trained weights."""
    from tether.models.loading import load_scalar_model

    demo_file = tmp_path / "demos.jsonl"
    demo_file.write_text("".join(json.dumps(r) + "\n" for r in DEMO_ROWS))
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text("".join(json.dumps(r) + "\n" for r in PAIR_ROWS))

    def sft(name, **kwargs):
        return tether.SFTConfig(output_dir=str(tmp_path / name), learning_rate=1e-2, **COMMON, **kwargs)

    from_files = tether.run_sft(sft("sft-files", model_name_or_path=str(tiny_model_dir), dataset=str(demo_file)))
    from_objects = tether.train_sft(
        sft("sft-objects"),
        datasets.Dataset.from_list(DEMO_ROWS),
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    files_weights, object_weights = _weights(from_files), _weights(from_objects)
    assert files_weights.keys() == object_weights.keys()
    assert all((files_weights[k] == object_weights[k]).all() for k in files_weights)
    start = _weights(tiny_model_dir)
    assert not all((files_weights[k] == start[k]).all() for k in start)  # it trained

    def rm(name, **kwargs):
        return tether.RewardConfig(output_dir=str(tmp_path / name), learning_rate=3e-3, **COMMON, **kwargs)

    rm_files = tether.run_reward(rm("rm-files", model_name_or_path=str(from_files), dataset=str(pair_file)))
    set_seed(0)  # run_reward seeds before it adds the fresh head: do the same for the object
    head_on_sft = load_scalar_model(str(from_files))
    rm_objects = tether.train_reward(rm("rm-objects"), PAIR_ROWS, model=head_on_sft)  # row dicts, tokenizer found
    files_weights, object_weights = _weights(rm_files), _weights(rm_objects)
    assert all((files_weights[k] == object_weights[k]).all() for k in files_weights)


def test_bad_rows_and_wrong_models_in_memory_are_named(tmp_path, tiny_model_dir):
    config = tether.RewardConfig(output_dir=str(tmp_path / "rm"), **COMMON)
    rows = [PAIR_ROWS[0], {"prompt": "p", "chosen": "only chosen"}]
    with pytest.raises(DataError) as info:
        tether.train_reward(config, datasets.Dataset.from_list(rows), model=None)
    assert info.value.problems[0].startswith("dataset[train]:2: ")
    with pytest.raises(ConfigError, match="sequence-classification model with one label, got LlamaForCausalLM"):
        tether.train_reward(config, PAIR_ROWS, model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert not (tmp_path / "rm").exists()  # nothing written


def test_dpo_from_a_model_object_and_a_dataset_equals_from_paths(tmp_path, tiny_model_dir):
    def dpo(name):
        return tether.DPOConfig(
            output_dir=str(tmp_path / name),
            model_name_or_path=str(tiny_model_dir),
            learning_rate=5e-3,
            max_length=48,
            **COMMON,
        )

    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text("".join(json.dumps(r) + "\n" for r in PAIR_ROWS))
    from_paths = tether.train_dpo(dpo("dpo-paths"), str(pair_file))
    from_objects = tether.train_dpo(
        dpo("dpo-objects"),
        datasets.Dataset.from_list(PAIR_ROWS),
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
    )
    assert from_paths["train"]["train_pairs"] == from_objects["train"]["train_pairs"] == 8
    files_weights, object_weights = _weights(tmp_path / "dpo-paths"), _weights(tmp_path / "dpo-objects")
    assert all((files_weights[k] == object_weights[k]).all() for k in files_weights)


def test_dpo_reference_object_trains_as_the_reference_path_does(tmp_path, tiny_model_dir):
    reference_dir = tmp_path / "reference"  # another model than the policy: the reference really matters
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    other.save_pretrained(reference_dir)

    def dpo(name, **extra):
        return tether.DPOConfig(
            output_dir=str(tmp_path / name), model_name_or_path=str(tiny_model_dir), learning_rate=5e-3,
            max_length=48, **extra, **COMMON,
        )  # fmt: skip

    by_path = tether.train_dpo(dpo("by-path", ref_model_name_or_path=str(reference_dir)), PAIR_ROWS)
    by_object = tether.train_dpo(
        dpo("by-object"), PAIR_ROWS, ref_model=AutoModelForCausalLM.from_pretrained(reference_dir)
    )
    copy_of_policy = tether.train_dpo(dpo("copy"), PAIR_ROWS)
    assert by_path["train"]["train_loss"] == by_object["train"]["train_loss"] != copy_of_policy["train"]["train_loss"]
    path_weights, object_weights = _weights(tmp_path / "by-path"), _weights(tmp_path / "by-object")
    assert all((path_weights[k] == object_weights[k]).all() for k in path_weights)
    with pytest.raises(ConfigError, match="give the reference once"):
        tether.train_dpo(dpo("both", ref_model_name_or_path=str(reference_dir)), PAIR_ROWS, ref_model=other)


def test_ppo_prompts_from_a_dataset_are_checked_like_a_file(tmp_path, tiny_model_dir, tiny_rm_dir, tokenizer):
    from tether.ppo.rollout import PromptSampler

    config = tether.PPOConfig(
        output_dir=str(tmp_path / "ppo"),
        model_name_or_path=str(tiny_model_dir),
        reward_model_path=str(tiny_rm_dir),
        batch_size=2,
        report_to="none",
    )
    rows = [{"prompt": "Name a colour."}, {"prompt": "Say hi."}, {"prompt": "Name a colour."}]
    sampler = PromptSampler(config, tokenizer, datasets.Dataset.from_list(rows))
    assert sampler.prompts == ["Name a colour.", "Say hi."]  # the repeat dropped, as from a file
    with pytest.raises(DataError) as info:
        PromptSampler(config, tokenizer, datasets.Dataset.from_list([{"prompt": "ok"}, {"prompt": ""}]))
    assert info.value.problems[0].startswith("dataset[train]:2: ")


def test_ppo_from_model_objects_and_a_dataset_trains_exactly_as_from_paths(tmp_path, word_dirs):
    """PPOTrainer / run_ppo take the policy, the reward model and the tokenizer as objects and the prompts
    as a datasets.Dataset: the same run, to the last bit, as from the folders and a prompt list."""
    prompts = ["a b c", "d e", "yes no", "x y z w", "good a", "m n o p q", "k", "s t u"]

    def config(name, **paths):
        return tether.PPOConfig(
            output_dir=str(tmp_path / name),
            batch_size=4,
            mini_batch_size=2,
            ppo_epochs=1,
            max_new_tokens=5,
            learning_rate=1e-2,
            num_iterations=2,
            save_steps=0,
            disable_tqdm=True,
            report_to="none",
            **paths,
        )

    from_paths = config("paths", model_name_or_path=str(word_dirs["policy"]), reward_model_path=str(word_dirs["rm"]))
    tether.run_ppo(from_paths, prompts)
    policy = AutoModelForCausalLM.from_pretrained(word_dirs["policy"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(word_dirs["rm"])
    result = tether.run_ppo(
        config("objects"),
        datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
        model=policy,
        reward_model=reward_model,
        tokenizer=AutoTokenizer.from_pretrained(word_dirs["tokenizer"]),
    )
    assert result.stopped_reason == "completed" and result.iterations == 2

    def metrics(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith(("time", "throughput"))} for r in rows]

    assert metrics("objects") == metrics("paths")
    for part in ("policy", "value_model"):
        a, b = _weights(tmp_path / "paths" / part), _weights(tmp_path / "objects" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(str(word_dirs["policy"] / "model.safetensors"))
    assert not all(torch.equal(policy.state_dict()[k], start[k]) for k in start)  # trained in place


def test_ppo_refuses_a_wrong_or_doubly_given_reward_model_object_before_writing(tmp_path, word_dirs):
    base = dict(output_dir=str(tmp_path / "ppo"), batch_size=2, report_to="none")
    policy = AutoModelForCausalLM.from_pretrained(word_dirs["policy"])
    with pytest.raises(ConfigError, match="sequence-classification model with one label, got LlamaForCausalLM"):
        tether.PPOTrainer(tether.PPOConfig(**base), ["a b"], model=policy, reward_model=policy)
    reward_model = AutoModelForSequenceClassification.from_pretrained(word_dirs["rm"])
    with pytest.raises(ConfigError, match="as an object or by --reward_model_path"):
        config = tether.PPOConfig(reward_model_path=str(word_dirs["rm"]), **base)
        tether.PPOTrainer(config, ["a b"], model=policy, reward_model=reward_model)
    assert not (tmp_path / "ppo").exists() or not any((tmp_path / "ppo").iterdir())
