"""Critic-free estimators (--advantage_estimator rloo|grpo|reinforce_pp), --kl_in_loss and programmable
rewards (--reward_funcs) as options of the PPO loop, on tiny real models: the same rollout, KL
handling, checkpoints and metrics; no value model at all."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest
import torch
from ppo_tiny import VOCAB, one_torch_thread, word_dirs, word_tok  # noqa: F401  (fixtures)
from test_ppo_trainer import Interrupt, _comparable, crash_in_iteration, make_config, rows, trainer

from tether.config import ConfigError
from tether.errors import RewardFunctionFailed
from tether.ppo.advantages import grpo_advantages, reinforce_pp_advantages, rloo_advantages, token_advantages
from tether.ppo.config import batch_geometry
from tether.ppo.losses import token_rewards

# 4 prompts × 2 responses = batch 8: every iteration sees every prompt twice, contiguously
PROMPTS = ["a b c", "d e", "yes no", "x y z w"]
ANSWERS = {"a b c": "3", "d e": "2", "yes no": None, "x y z w": "4"}

FUNCTIONS = textwrap.dedent(
    """
    CALLS = []

    def answer_value(prompts, completions, answer, **kwargs):
        '''The row's reference answer as the reward (None where the row has none).'''
        CALLS.append({"prompts": list(prompts), "answer": list(answer), "completions": list(completions)})
        return [None if a is None else float(a) for a in answer]

    def fails_on_yes(prompts, completions, **kwargs):
        if any("yes" in p for p in prompts):
            raise KeyError("no rule for yes")
        return [0.0] * len(prompts)

    def one(prompts, completions, **kwargs):
        return [1.0] * len(prompts)
    """
)


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(FUNCTIONS, encoding="utf-8")
    return path


@pytest.fixture
def answers_dataset(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in ANSWERS.items()))
    return path


def critic_free(tmp_path, dirs, estimator="grpo", **overrides):
    # raw scores: the tiny policy rarely stops within 6 tokens, and equal penalties would leave no advantage
    values = dict(
        advantage_estimator=estimator, num_generations=2, batch_size=8, mini_batch_size=4, missing_eos_penalty=None
    )
    values.update(overrides)
    return make_config(tmp_path, dirs, **values)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_pp"])
def test_each_estimator_runs_two_iterations_without_a_value_model(tmp_path, word_dirs, estimator):
    config = critic_free(tmp_path, word_dirs, estimator, save_steps=1)
    t = trainer(config, PROMPTS)
    models = t.models
    assert models.policy_and_value.value_model is None and models.policy_and_value.value_head is None
    # no value parameters, no optimizer state for one: the optimizer holds exactly the policy's parameters
    policy_params = [p for p in models.policy_and_value.policy.parameters() if p.requires_grad]
    optimised = [p for group in models.optimizer.param_groups for p in group["params"]]
    assert len(optimised) == len(policy_params) and {id(p) for p in optimised} == {id(p) for p in policy_params}
    result = t.train()
    r = rows(config)
    assert len(r) == 2 and result.stopped_reason == "completed" and result.value_dir is None
    assert r[0]["kl/ref"] == 0.0 and r[1]["kl/ref"] != 0.0  # the policy moved
    for row in r:
        assert "loss/value" not in row and "value/explained_var" not in row and "value/clipfrac" not in row
        assert {"reward/score", "kl/ref", "kl/coef", "loss/policy", "policy/clipfrac"} <= set(row)
    assert (tmp_path / "run" / "policy").is_dir() and not (tmp_path / "run" / "value_model").exists()


def test_rollout_repeats_each_prompt_contiguously_and_the_estimate_equals_the_pure_functions(tmp_path, word_dirs):
    t = trainer(critic_free(tmp_path, word_dirs, "rloo", init_kl_coef=0.3), PROMPTS)
    batch = t.collect_rollout()
    assert batch.values is None  # no value forward at all
    queries = batch.query_ids.tolist()
    assert [batch.prompts[i] == batch.prompts[i + 1] for i in range(0, 8, 2)] == [True] * 4
    assert all(queries[i] == queries[i + 1] for i in range(0, 8, 2)) and sorted(set(batch.prompts)) == sorted(PROMPTS)
    # a hand-built batch: known scores and a known per-token KL (nothing of the rollout's own)
    mask = batch.response_mask
    batch.scores = torch.tensor([1.0, 2.0, 6.0, 4.0, 0.0, 2.0, 5.0, 5.0])
    batch.kl_penalty = torch.where(mask, torch.full_like(batch.kl_penalty, 0.5), torch.zeros_like(batch.kl_penalty))
    beta = 0.3
    sequence = batch.scores - beta * 0.5 * mask.sum(1)  # R_i = score_i − β·Σ_t KL_t
    for estimator, expected in (
        ("rloo", token_advantages(rloo_advantages(sequence, 2), mask)),
        ("grpo", token_advantages(grpo_advantages(sequence, 2, "group"), mask)),
        ("reinforce_pp", reinforce_pp_advantages(token_rewards(batch.kl_penalty, batch.scores, mask, beta), mask)),
    ):
        t.config.advantage_estimator = estimator
        t.estimate_advantages(batch, beta)
        assert torch.allclose(batch.advantages, expected, atol=1e-6), estimator
        assert batch.returns is None
    # RLOO by hand on the first group: R = [1 − 0.15·L0, 2 − 0.15·L1], A_0 = R_0 − R_1
    t.config.advantage_estimator = "rloo"
    t.estimate_advantages(batch, beta)
    lengths = mask.sum(1).tolist()
    assert batch.advantages[0, 0].item() == pytest.approx((1 - 0.15 * lengths[0]) - (2 - 0.15 * lengths[1]))


def test_kl_in_loss_adds_beta_k3_to_the_loss_and_leaves_it_out_of_the_rewards(tmp_path, word_dirs):
    config = critic_free(tmp_path, word_dirs, "grpo", kl_in_loss=True, init_kl_coef=0.5, ppo_epochs=2)
    t = trainer(config, PROMPTS)
    t.train()
    r = rows(config)
    assert all("loss/kl" in row for row in r) and all(row["reward/non_score"] == 0.0 for row in r)
    assert r[1]["loss/kl"] > 0 and r[1]["kl/ref"] != 0.0
    # the last iteration's minibatches: total = policy + β·k3 (entropy_coef 0)
    for step in t.update_log:
        assert step["loss/total"] == pytest.approx(step["loss/policy"] + step["loss/kl"], rel=1e-5, abs=1e-7)
    # token rewards carry only the score, on the stop token
    batch = t.collect_rollout()
    t.estimate_advantages(batch, t.kl_ctl.value)
    last = batch.response_mask.sum(1) - 1
    expected = torch.zeros_like(batch.rewards)
    expected[torch.arange(8), last] = batch.scores
    assert torch.equal(batch.rewards, expected)


def test_a_reward_function_gets_the_reference_answer_column_and_none_is_left_out(
    tmp_path, word_dirs, reward_file, answers_dataset
):
    config = critic_free(
        tmp_path,
        word_dirs,
        "grpo",
        reward_model_path=None,
        reward_funcs=[f"{reward_file}:answer_value", f"{reward_file}:one"],
        reward_weights=[2.0, 0.5],
        dataset=str(answers_dataset),
        num_iterations=1,
    )
    t = trainer(config, prompts=None)
    module = t.rewards.functions["answer_value"].__module__
    t.train()
    calls = sys.modules[module].CALLS
    assert len(calls) == 1 and len(calls[0]["prompts"]) == 8
    assert [ANSWERS[p] for p in calls[0]["prompts"]] == calls[0]["answer"]  # each row's own answer
    row = rows(config)[0]
    assert row["reward/answer_value/mean"] == pytest.approx((3 + 2 + 4) / 3)  # sums and counts, not a mean of means
    assert row["reward/answer_value/none"] == 2.0 and row["reward/one/none"] == 0.0 and row["reward/one/mean"] == 1.0
    assert row["reward/none"] == 0.0  # "one" applies everywhere, so no response lacks a reward
    # combined: 2·answer + 0.5·1 (the None component skipped), averaged over the 8 responses
    assert row["reward/score"] == pytest.approx((2 * (2 * (3 + 2 + 4)) + 0.5 * 8) / 8)


def test_a_raising_reward_function_stops_the_run_naming_it_the_example_and_the_last_checkpoint(
    tmp_path, word_dirs, reward_file
):
    prompts = ["yes no", "d e", "a b c", "k"]  # seed 42 draws prompts 2, 3 then 0, 1: "yes no" in iteration 2
    config = critic_free(
        tmp_path,
        word_dirs,
        "rloo",
        reward_funcs=[f"{reward_file}:fails_on_yes"],
        batch_size=4,
        mini_batch_size=4,
        num_iterations=3,
        save_steps=1,
    )
    t = trainer(config, prompts)
    with pytest.raises(RewardFunctionFailed) as caught:
        t.train()
    message = str(caught.value)
    assert "'fails_on_yes' raised on example" in message and "yes no" in message and "KeyError" in message
    assert "last good checkpoint" in message and "checkpoint-" in message
    assert not (tmp_path / "run" / "policy").exists()
    iteration = int(message.split("stopped at iteration ")[1].split()[0])
    assert len(rows(config)) == iteration - 1  # every finished iteration logged, nothing of the failed one
    assert message.rstrip(")").split("last good checkpoint: ")[1].split()[0].endswith(f"checkpoint-{iteration - 1}")


def test_bad_critic_free_and_reward_options_fail_before_the_first_rollout(tmp_path, word_dirs, reward_file):
    with pytest.raises(ConfigError, match="--advantage_estimator grpo .* --num_generations to 2"):
        make_config(tmp_path, word_dirs, advantage_estimator="grpo")
    with pytest.raises(ConfigError, match="--advantage_estimator 'ppo2'"):
        make_config(tmp_path, word_dirs, advantage_estimator="ppo2")
    with pytest.raises(
        ConfigError, match="--batch_size 8 counts responses: it must be a multiple of --num_generations 3"
    ):
        make_config(tmp_path, word_dirs, advantage_estimator="rloo", num_generations=3)
    with pytest.raises(ConfigError, match="--reward_weights: expected 2 weights.*reward_model, one"):
        make_config(tmp_path, word_dirs, reward_funcs=[f"{reward_file}:one"], reward_weights=[1.0])
    with pytest.raises(ConfigError, match="--reward_funcs .*has no 'missing'"):
        make_config(tmp_path, word_dirs, reward_funcs=[f"{reward_file}:missing"])
    with pytest.raises(ConfigError, match="--reward_funcs 'no_such_module:f'"):
        make_config(tmp_path, word_dirs, reward_funcs=["no_such_module:f"])
    with pytest.raises(ConfigError, match="builds no value model"):
        critic_free(tmp_path, word_dirs, value_head_on_policy=True)
    with pytest.raises(ConfigError, match="--scale_rewards 'rank'"):
        critic_free(tmp_path, word_dirs, scale_rewards="rank")
    with pytest.raises(ConfigError, match="reward_model_path is required"):
        trainer(critic_free(tmp_path, word_dirs, reward_model_path=None), PROMPTS)
    with pytest.raises(ConfigError, match="4 responses per process, not whole groups of --num_generations 8"):
        batch_geometry(critic_free(tmp_path, word_dirs, num_generations=8), world=2)
    # a reward model of another vocabulary
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other_rm = tmp_path / "other-vocab-rm"
    shutil.copytree(word_dirs["rm"], other_rm)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB[:-1] + ["bad"])}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>").save_pretrained(other_rm)
    with pytest.raises(ConfigError, match="tokenizer differs from the policy's"):
        trainer(critic_free(tmp_path, word_dirs, reward_model_path=str(other_rm)), PROMPTS)


def test_a_stopped_and_resumed_grpo_run_with_a_reward_function_equals_an_uninterrupted_one(
    tmp_path, word_dirs, reward_file
):
    from tether.models.loading import load_causal_lm

    base = dict(
        num_iterations=4,
        save_steps=2,
        save_total_limit=1,
        keep_checkpoints=True,
        target_kl=1.0,
        init_kl_coef=0.2,
        kl_in_loss=True,
        reward_model_path=str(word_dirs["counting_rm"]),
        reward_funcs=[f"{reward_file}:one"],
        reward_weights=[1.0, 0.5],
    )
    whole = critic_free(tmp_path, word_dirs, "grpo", name="whole", **base)
    trainer(whole, PROMPTS).train()
    parts = critic_free(tmp_path, word_dirs, "grpo", name="parts", **base)
    with pytest.raises(Interrupt):
        trainer(parts, PROMPTS, extra_metrics=crash_in_iteration(3)).train()
    resumed = critic_free(tmp_path, word_dirs, "grpo", name="parts", resume_from_checkpoint="latest", **base)
    t = trainer(resumed, PROMPTS)
    assert t.state.iteration == 2
    t.train()
    a, b = rows(whole), rows(resumed)
    assert [_comparable(r) for r in b] == [_comparable(r) for r in a] and a[-1]["reward/one/mean"] == 1.0
    w1 = load_causal_lm(str(tmp_path / "whole" / "policy")).state_dict()
    w2 = load_causal_lm(str(tmp_path / "parts" / "policy")).state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not list((tmp_path / "parts" / "checkpoint-4").glob("value*"))  # nothing of a critic in a checkpoint


def test_the_command_line_parses_the_new_options(reward_file):
    from tether.config import parse_config
    from tether.ppo import PPOConfig

    flags = "--output_dir o --advantage_estimator rloo --num_generations 4 --batch_size 16 --kl_in_loss true"
    flags += (
        f" --reward_funcs {reward_file}:one {reward_file}:answer_value --reward_weights 1 0.5 2 --reward_model_path rm"
    )
    config = parse_config(PPOConfig, flags.split())
    assert (config.advantage_estimator, config.num_generations, config.kl_in_loss) == ("rloo", 4, True)
    assert config.reward_funcs == [f"{reward_file}:one", f"{reward_file}:answer_value"]
    assert config.reward_weights == [1.0, 0.5, 2.0] and config.scale_rewards == "group" and config.critic_free
    assert config.reward_model_path == "rm"  # one reward model: the plain path, as before
    ensemble = parse_config(PPOConfig, "--output_dir o --reward_model_path a b --reward_ensemble min".split())
    assert ensemble.reward_model_paths == ["a", "b"] and ensemble.reward_components == [
        "reward_model",
        "reward_model_2",
    ]
    with pytest.raises(ConfigError, match="--reward_ensemble 'max'"):
        parse_config(PPOConfig, "--output_dir o --reward_model_path a b --reward_ensemble max".split())


def test_an_ensemble_of_two_reward_models_scores_with_the_worst_case_and_logs_each(tmp_path, word_dirs):
    rm, counting = str(word_dirs["rm"]), str(word_dirs["counting_rm"])
    config = critic_free(
        tmp_path, word_dirs, "rloo", reward_model_path=[rm, counting], reward_ensemble="min", num_iterations=1
    )
    seen = []
    t = trainer(config, PROMPTS, extra_metrics=lambda rollout: seen.append(rollout) or {})
    assert len(t.models.ensemble) == 1 and t.models.reward_model is not None
    t.train()
    batch = seen[0]
    first, second = batch.raw_scores, batch.extras["ensemble_scores"][0]  # raw: no reward_stats.json, no penalty
    assert not torch.allclose(first, second)
    # min ensemble with weights 1, 1: total = (1 + 1)·min(s1, s2)
    assert torch.allclose(batch.scores, 2 * torch.minimum(first, second), atol=1e-6)
    row = rows(config)[0]
    assert row["reward/reward_model/mean"] == pytest.approx(first.double().mean().item(), abs=1e-6)
    assert row["reward/reward_model_2/mean"] == pytest.approx(second.double().mean().item(), abs=1e-6)
    assert row["reward/score"] == pytest.approx(batch.scores.mean().item(), abs=1e-6)


def test_a_reward_function_failing_on_one_of_two_processes_stops_both_with_its_message(tmp_path, word_dirs):
    import os
    import socket
    import subprocess
    import time
    from pathlib import Path

    from tether.ppo import PPOConfig

    # the prompt order of the first pass (the sampler's seeded permutation): iteration 2's second prompt
    # goes to rank 1 only; that one is the prompt the function has no rule for
    order = torch.randperm(4, generator=torch.Generator().manual_seed(PPOConfig.seed))
    prompts = [""] * 4
    for position, text in zip(order.tolist(), ["a b c", "d e", "k", "yes no"]):
        prompts[position] = text
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        + ["--master_port", str(port), str(here / "ppo_reward_failure_worker.py"), str(tmp_path)]
        + [str(word_dirs["policy"]), str(word_dirs["rm"]), json.dumps(prompts)],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,  # a rank waiting forever in a collective would hit this
    )
    elapsed = time.perf_counter() - started
    assert done.returncode != 0
    errors = [json.loads((tmp_path / f"rank{r}.json").read_text())["error"] for r in (0, 1)]
    for message in errors:  # both ranks stopped by the error itself, not killed by the launcher
        assert "stopped at iteration 2 before its update" in message
        assert "reward function 'fails_on_yes' raised on example 0 (prompt" in message and "yes no" in message
        assert "KeyError" in message and "(on process 1)" in message
        assert message.split("last good checkpoint: ")[1].split()[0].endswith("checkpoint-1")
    run = tmp_path / "run"
    assert (run / "checkpoint-1").is_dir() and not (run / "checkpoint-2").exists() and not (run / "policy").exists()
    assert elapsed < 200
