"""Reward functions (--reward_funcs) loaded from a real file and a real module, called with checks, and
combined with reward models (--reward_weights, --reward_ensemble) on hand-computed numbers."""

from __future__ import annotations

import textwrap

import pytest
import torch

from tether.config import ConfigError
from tether.ppo.advantages import rloo_advantages
from tether.ppo.rewards import (
    RewardFunctionError,
    call_reward_function,
    check_reward_weights,
    combine_example,
    combine_rewards,
    load_reward_function,
    load_reward_functions,
    reward_component_metrics,
    rewards_tensor,
)

FUNCTIONS = textwrap.dedent(
    '''
    from dataclasses import dataclass

    @dataclass
    class Limits:  # needs the module registered in sys.modules
        longest: int = 10

    def length_penalty(prompts, completions, **kwargs):
        return [-len(c) / Limits().longest for c in completions]

    def exact_answer(prompts, completions, answer, **kwargs):
        """1 for the right answer, 0 for a wrong one, None where the row has no reference answer."""
        return [None if a is None else c.strip() == a for c, a in zip(completions, answer)]

    def fails_on_empty(prompts, completions, **kwargs):
        return [1.0 / len(c) for c in completions]

    def returns_nan(prompts, completions, **kwargs):
        return [0.0, float("nan"), float("inf")][: len(completions)]

    def returns_string(prompts, completions, **kwargs):
        return ["good" for _ in completions]

    def returns_short(prompts, completions, **kwargs):
        return [1.0]

    def returns_tensor(prompts, completions, **kwargs):
        import torch
        return torch.ones(len(completions))

    THRESHOLD = 0.5
    '''
)

PROMPTS = ["What is 2+2? Answer with a number only, please, and nothing else at all.", "Name a colour.", "3*3?"]
COMPLETIONS = [" 4", "blue, obviously", ""]
COLUMNS = {"answer": ["4", None, "9"]}


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(FUNCTIONS)
    return path


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(FUNCTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mypkg.scoring"


# ---- loading --------------------------------------------------------------------------------------
def test_load_from_a_file_and_from_a_module(reward_file, reward_module):
    for spec in (f"{reward_file}:length_penalty", f"{reward_module}:length_penalty"):
        fn = load_reward_function(spec)
        # lengths 2, 15, 0 over Limits().longest = 10
        assert fn(prompts=PROMPTS, completions=COMPLETIONS) == [-0.2, -1.5, 0.0]
    functions = load_reward_functions([f"{reward_file}:length_penalty", f"{reward_module}:exact_answer"])
    assert list(functions) == ["length_penalty", "exact_answer"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon_here", "expected module.path:function or path/to/file.py:function"),
        ("{dir}/missing.py:f", "no such file .*missing.py"),
        ("{file}:nope", "has no 'nope' \\(its callables: .*exact_answer.*length_penalty"),
        ("{file}:THRESHOLD", "is a float, not a function"),
        ("mypkg.no_such_module:f", "no module named 'mypkg.no_such_module'"),
        ("{module}:nope", "mypkg.scoring has no 'nope'"),
        ("os:sep", "os:sep is a str, not a function"),
    ],
)
def test_bad_specs_name_the_flag_and_the_spec(spec, message, reward_file, reward_module, tmp_path):
    spec = spec.format(dir=tmp_path, file=reward_file, module=reward_module)
    with pytest.raises(ConfigError, match=message) as info:
        load_reward_function(spec)
    assert f"--reward_funcs {spec!r}" in str(info.value)


def test_a_file_that_fails_to_import_is_named(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import numpy_that_does_not_exist\n")
    with pytest.raises(ConfigError, match=r"importing .*broken.py failed: ModuleNotFoundError"):
        load_reward_function(f"{path}:f")


def test_two_functions_with_one_name_are_refused(reward_file, reward_module):
    with pytest.raises(ConfigError, match="two functions are named 'length_penalty'"):
        load_reward_functions([f"{reward_file}:length_penalty", f"{reward_module}:length_penalty"])


# ---- calling --------------------------------------------------------------------------------------
def test_call_checks_and_converts(reward_file):
    exact = load_reward_function(f"{reward_file}:exact_answer")
    # " 4" == "4" → True → 1.0; no answer → None; "" != "9" → False → 0.0
    assert call_reward_function(exact, "exact_answer", PROMPTS, COMPLETIONS, COLUMNS) == [1.0, None, 0.0]
    length = load_reward_function(f"{reward_file}:length_penalty")
    assert call_reward_function(length, "length_penalty", PROMPTS, COMPLETIONS, COLUMNS) == [-0.2, -1.5, 0.0]


@pytest.mark.parametrize(
    "name, message",
    [
        # the batch call raises; one-by-one calls find example 2 (the empty completion)
        ("fails_on_empty", r"'fails_on_empty' raised on example 2 \(prompt '3\*3\?'\): ZeroDivisionError"),
        ("returns_nan", r"'returns_nan' returned nan for example 1 \(prompt 'Name a colour.'\)"),
        (
            "returns_string",
            r"'returns_string' returned a str for example 0 \(prompt 'What is 2\+2\? Answer with a .*…'\)",
        ),
        ("returns_short", r"'returns_short' returned 1 values for 3 completions"),
        ("returns_tensor", r"'returns_tensor' returned a Tensor; it must return a list"),
    ],
)
def test_bad_function_results_name_the_function_and_the_first_failing_example(name, message, reward_file):
    fn = load_reward_function(f"{reward_file}:{name}")
    with pytest.raises(RewardFunctionError, match=message):
        call_reward_function(fn, name, PROMPTS, COMPLETIONS, COLUMNS)


def test_a_function_without_kwargs_is_told_about_the_columns(tmp_path):
    path = tmp_path / "strict.py"
    path.write_text("def strict(prompts, completions):\n    return [0.0 for _ in completions]\n")
    fn = load_reward_function(f"{path}:strict")
    with pytest.raises(RewardFunctionError, match=r"example 0 .*unexpected keyword argument 'answer'.*\['answer'\]"):
        call_reward_function(fn, "strict", PROMPTS, COMPLETIONS, COLUMNS)


# ---- combining ------------------------------------------------------------------------------------
RM = {"rm_a": [1.0, 3.0, -2.0], "rm_b": [2.0, 0.0, -1.0]}


def test_weights_count_is_checked_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--reward_weights: expected 3 weights.*\(rm_a, rm_b, f\), got 2"):
        check_reward_weights([1.0, 2.0], ["rm_a", "rm_b", "f"])
    assert check_reward_weights(None, ["rm_a", "f"]) == [1.0, 1.0]


def test_combine_mean_ensemble_is_trls_weighted_sum():
    components = RM | {"exact": [1.0, None, 0.0], "length": [-0.2, -1.5, 0.0]}
    out = combine_rewards(components, [0.5, 1.5, 2.0, 1.0], "mean", reward_models=("rm_a", "rm_b"))
    # ex 0: 0.5·1 + 1.5·2 + 2·1 + 1·(−0.2)     = 0.5 + 3 + 2 − 0.2 = 5.3
    # ex 1: 0.5·3 + 1.5·0 + (exact None: skipped) + 1·(−1.5) = 1.5 − 1.5 = 0.0
    # ex 2: 0.5·(−2) + 1.5·(−1) + 2·0 + 1·0     = −1 − 1.5 = −2.5
    assert out.total == pytest.approx([5.3, 0.0, -2.5], abs=1e-12)


def test_combine_min_ensemble():
    components = RM | {"exact": [1.0, None, 0.0]}
    out = combine_rewards(components, [0.5, 1.5, 2.0], "min", reward_models=("rm_a", "rm_b"))
    # W = 0.5 + 1.5 = 2;  ex 0: 2·min(1, 2) + 2·1 = 4;  ex 1: 2·min(3, 0) + skipped = 0;  ex 2: 2·min(−2, −1) + 0 = −4
    assert out.total == pytest.approx([4.0, 0.0, -4.0], abs=1e-12)
    # weights 1/M give the plain minimum of the models
    plain = combine_rewards(RM, [0.5, 0.5], "min", reward_models=("rm_a", "rm_b"))
    assert plain.total == pytest.approx([1.0, 0.0, -2.0], abs=1e-12)


def test_none_everywhere_gives_none_and_is_left_out_of_the_advantages():
    components = {"exact": [1.0, None, 0.0, None, 1.0, 0.0], "style": [0.5, None, None, None, 0.5, 0.5]}
    out = combine_rewards(components, [1.0, 2.0])
    # 1+1 = 2;  all None → None;  0 + skipped = 0;  None;  1 + 1 = 2;  0 + 1 = 1
    assert out.total == [2.0, None, 0.0, None, 2.0, 1.0]
    rewards, valid = rewards_tensor(out.total)
    assert valid.tolist() == [True, False, True, False, True, True]
    # RLOO, groups of 3: group 0 valid {2, 0}: 2 − 0 = 2, 0 − 2 = −2; group 1 valid {2, 1}: 2 − 1 = 1, 1 − 2 = −1
    assert rloo_advantages(rewards, 3, valid).tolist() == [2.0, 0.0, -2.0, 0.0, 1.0, -1.0]
    # logging: means over the non-None values, None counts
    assert out.metrics == pytest.approx(
        {
            "reward/exact/mean": 0.5,  # (1 + 0 + 1 + 0) / 4
            "reward/exact/none": 2.0,
            "reward/style/mean": 0.5,  # (0.5 + 0.5 + 0.5) / 3
            "reward/style/none": 3.0,
        }
    )


def test_a_missing_reward_model_score_drops_out_of_the_ensemble():
    # (weight, score) pairs: the None model leaves W and the min
    assert combine_example([(1.0, 4.0), (3.0, None)], [], "min") == 4.0  # W = 1
    assert combine_example([(1.0, 4.0), (3.0, None)], [(2.0, 0.5)], "mean") == 5.0  # 1·4 + 2·0.5


def test_component_metrics_all_none():
    assert reward_component_metrics({"f": [None, None]}) == {"reward/f/none": 2.0}


def test_unknown_ensemble_and_ragged_components_are_refused():
    with pytest.raises(ConfigError, match="--reward_ensemble 'max': use one of mean, min"):
        combine_rewards(RM, None, "max", reward_models=("rm_a", "rm_b"))
    with pytest.raises(ValueError, match="different lengths"):
        combine_rewards({"a": [1.0], "b": [1.0, 2.0]})
    assert torch.equal(rewards_tensor([1.5, None])[0], torch.tensor([1.5, 0.0]))
