"""--truncation: long examples are fitted by cutting the prompt from the left or dropped, never by
cutting a response, so the stop token is the last token of every sequence trained or scored.

The pairs are hand-built with SmolLM2's tokenizer: its chat template puts 30 tokens around a user
turn (system prompt, role headers, the generation prompt), so the prompt "fine" is 31 tokens and
"word " * 40 is 71; a response is its tokens and the stop token (id 2): "yes" 2, "yes yes yes yes"
5, "word " * 38 40 ("word", 37 × " word", " ", stop) and "word " * 50 52.
"""

from __future__ import annotations

import json

import pytest
import torch

from tether.config import ConfigError
from tether.data.records import Demonstration, PreferencePair
from tether.data.templates import PairDoesNotFit, Truncation, prompt_ids, response_ids

STOP = 2
FITS = PreferencePair("fine", "yes", "no")  # 31 + 2: fits as it is
LONG_PROMPT = PreferencePair("word " * 40, "yes yes yes yes", "no")  # 71-token prompt, 5-token response
LONG_RESPONSE = PreferencePair("fine", "word " * 50, "no")  # a 52-token response alone exceeds 48
NEEDS_DEEP_CUT = PreferencePair("fine", "word " * 38, "no")  # 40-token response: only 8 prompt tokens fit
PAIRS = [FITS, LONG_PROMPT, LONG_RESPONSE, NEEDS_DEEP_CUT]


def rule(mode: str = "prompt", min_prompt_length: int = 16) -> Truncation:
    return Truncation(mode, max_length=48, max_prompt_length=64, min_prompt_length=min_prompt_length)


def test_the_token_counts_the_cases_are_built_on(tokenizer):
    assert [len(prompt_ids(tokenizer, p.prompt)) for p in PAIRS] == [31, 71, 31, 31]
    assert [len(response_ids(tokenizer, p.chosen)) for p in PAIRS] == [2, 5, 52, 40]
    assert tokenizer.eos_token_id == STOP


@pytest.mark.parametrize(
    "mode, n_prompt, n_response, limits, kept",
    [
        # prompt: k = min(n_prompt, P, L − n_response), dropped when k < min(n_prompt, P, m)
        ("prompt", 31, 2, (48, 64, 16), 31),  # fits as it is
        ("prompt", 71, 5, (48, 64, 16), 43),  # cut to fit L: 48 − 5
        ("prompt", 71, 2, (512, 64, 16), 64),  # cut to P only
        ("prompt", 31, 40, (48, 64, 16), None),  # would leave 8 < 16 prompt tokens
        ("prompt", 31, 40, (48, 64, 8), 8),  # ... which a floor of 8 allows
        ("prompt", 10, 40, (48, 64, 16), None),  # a short prompt is its own floor: 10 do not fit beside 40
        ("prompt", 31, 52, (48, 64, 16), None),  # the response alone is too long
        ("prompt", 71, 5, (None, None, 16), 71),  # no limits: nothing is cut
        ("prompt", 0, 48, (48, 64, 16), 0),  # an empty prompt fits exactly
        # drop: nothing is cut
        ("drop", 31, 2, (48, 64, 16), 31),
        ("drop", 31, 17, (48, 64, 16), 31),  # exactly 48
        ("drop", 31, 18, (48, 64, 16), None),
        ("drop", 65, 2, (512, 64, 16), None),  # over --max_prompt_length
    ],
)
def test_prompt_tokens_kept(mode, n_prompt, n_response, limits, kept):
    max_length, max_prompt_length, min_prompt_length = limits
    truncation = Truncation(mode, max_length, max_prompt_length, min_prompt_length)
    assert truncation.prompt_tokens_kept(n_prompt, n_response) == kept


def test_unknown_modes_and_floors_are_refused():
    with pytest.raises(ValueError, match="--truncation 'response'"):
        Truncation("response")
    with pytest.raises(ConfigError, match="--truncation 'keep_end': use one of prompt, drop"):
        from tether.stages.reward import RewardConfig

        RewardConfig(output_dir="unused", truncation="keep_end")
    with pytest.raises(ConfigError, match="--min_prompt_length 0"):
        from tether.stages.sft import SFTConfig

        SFTConfig(output_dir="unused", min_prompt_length=0)


# ------------------------------------------------------------------------------------------------
# each stage's tokenisation, on the same hand-built pairs


def _expected(tokenizer, mode: str, min_prompt_length: int = 16) -> list[tuple[PreferencePair, list[int]]]:
    """The pairs a rule keeps, each with the prompt tokens it keeps (computed here by hand)."""
    full = {id(p): prompt_ids(tokenizer, p.prompt) for p in PAIRS}
    if mode == "drop":
        return [(FITS, full[id(FITS)])]
    kept = [(FITS, full[id(FITS)]), (LONG_PROMPT, full[id(LONG_PROMPT)][-43:])]  # 71 → 48 − 5
    if min_prompt_length <= 8:
        kept.append((NEEDS_DEEP_CUT, full[id(NEEDS_DEEP_CUT)][-8:]))  # 31 → 48 − 40
    return kept


@pytest.mark.parametrize("mode, floor, cut, dropped", [("prompt", 16, 1, 2), ("prompt", 8, 2, 1), ("drop", 16, 0, 3)])
def test_reward_pairs_share_one_cut_prompt_and_end_with_the_stop_token(tokenizer, mode, floor, cut, dropped):
    from tether.stages.reward import tokenize_preferences

    tokens = tokenize_preferences(tokenizer, PAIRS, rule(mode, floor))
    assert (tokens.prompts_cut, tokens.pairs_dropped) == (cut, dropped)
    expected = _expected(tokenizer, mode, floor)
    assert len(tokens.pairs) == len(expected)
    for got, (pair, prompt) in zip(tokens.pairs, expected):
        assert list(got.prompt) == prompt
        assert list(got.chosen) == response_ids(tokenizer, pair.chosen)  # whole, stop token last
        assert list(got.rejected) == response_ids(tokenizer, pair.rejected)
        assert got.chosen_ids[-1] == got.rejected_ids[-1] == STOP
        assert max(len(got.chosen_ids), len(got.rejected_ids)) <= 48
    if mode == "prompt":
        assert len(tokens.pairs[1].chosen_ids) == 48  # the long prompt gave exactly what the response needs


@pytest.mark.parametrize("mode, floor, cut, dropped", [("prompt", 16, 1, 2), ("prompt", 8, 2, 1), ("drop", 16, 0, 3)])
def test_dpo_pairs_follow_the_same_rule(tokenizer, mode, floor, cut, dropped):
    from tether.stages.dpo import tokenize_pairs

    items, n_cut, n_dropped = tokenize_pairs(tokenizer, PAIRS, rule(mode, floor))
    assert (n_cut, n_dropped) == (cut, dropped)
    expected = _expected(tokenizer, mode, floor)
    assert [(i.prompt, i.chosen, i.rejected) for i in items] == [
        (prompt, response_ids(tokenizer, p.chosen), response_ids(tokenizer, p.rejected)) for p, prompt in expected
    ]
    assert all(i.chosen[-1] == i.rejected[-1] == STOP for i in items)


@pytest.mark.parametrize("mode, floor, cut, dropped", [("prompt", 16, 1, 2), ("prompt", 8, 2, 1), ("drop", 16, 0, 3)])
def test_sft_demonstrations_follow_the_same_rule(tokenizer, mode, floor, cut, dropped):
    from tether.stages.sft import IGNORE_INDEX, tokenize_demonstrations

    demos = [Demonstration(p.prompt, p.chosen) for p in PAIRS]
    tokens = tokenize_demonstrations(tokenizer, demos, rule(mode, floor))
    assert (tokens.prompts_cut, tokens.dropped) == (cut, dropped)
    expected = _expected(tokenizer, mode, floor)
    assert len(tokens.examples) == len(expected)
    for example, (pair, prompt) in zip(tokens.examples, expected):
        completion = response_ids(tokenizer, pair.chosen)
        assert example["input_ids"] == prompt + completion
        assert example["labels"] == [IGNORE_INDEX] * len(prompt) + completion  # the stop token is the last target
        assert example["input_ids"][-1] == STOP


def test_a_cut_conversation_keeps_its_earlier_turns_targets_aligned(tokenizer):
    from tether.data.formats import parse_demonstration
    from tether.stages.sft import tokenize_demonstrations

    messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    demo = parse_demonstration({"messages": messages})
    full = tokenize_demonstrations(tokenizer, [demo], Truncation(max_length=512)).examples[0]
    n = len(full["input_ids"])
    cut = tokenize_demonstrations(tokenizer, [demo], Truncation(max_length=n - 3, min_prompt_length=8))
    assert cut.prompts_cut == 1
    assert cut.examples[0]["input_ids"] == full["input_ids"][3:]
    assert cut.examples[0]["labels"][1:] == full["labels"][4:]  # the first position never trains
    assert cut.examples[0]["input_ids"][-1] == STOP


def test_the_demo_pairs_and_demonstrations_fit_the_demo_limits_untouched(tokenizer):
    """The pipeline's demo trains with --max_length 256: nothing is cut or dropped, so --truncation
    cannot change its numbers."""
    from tether.data.loading import load_demonstrations, load_preferences
    from tether.stages.reward import tokenize_preferences
    from tether.stages.sft import tokenize_demonstrations

    limits = Truncation(max_length=256, max_prompt_length=256)
    pairs = tokenize_preferences(tokenizer, load_preferences("embedded:demo"), limits)
    demos = tokenize_demonstrations(tokenizer, load_demonstrations("embedded:demo"), limits)
    assert (pairs.prompts_cut, pairs.pairs_dropped, demos.prompts_cut, demos.dropped) == (0, 0, 0, 0)
    assert len(pairs.pairs) == 120 and len(demos.examples) == 52


# ------------------------------------------------------------------------------------------------
# scoring: the prompt is cut for the reward model, a response never is


def test_score_texts_cuts_the_prompt_and_reads_the_score_at_the_stop_token(tiny_rm_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from tether.models.scoring import score_at_last_token, score_texts

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    # the default floor of 64 prompt tokens: the 71-token prompt gives 6 tokens to fit 70
    got = score_texts(model, tokenizer, [LONG_PROMPT.prompt], [LONG_PROMPT.chosen], max_length=70)
    ids = prompt_ids(tokenizer, LONG_PROMPT.prompt)[-65:] + response_ids(tokenizer, LONG_PROMPT.chosen)
    assert len(ids) == 70 and ids[-1] == STOP
    with torch.no_grad():
        want = score_at_last_token(model, torch.tensor([ids]), torch.ones(1, 70, dtype=torch.long))
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(PairDoesNotFit, match="response 1 cannot be scored: a 31-token prompt and a 52-token response"):
        score_texts(model, tokenizer, ["fine"] * 2, ["yes", LONG_RESPONSE.chosen], max_length=48)


def test_a_response_cut_at_sampling_is_scored_at_its_last_token(tiny_rm_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from tether.models.scoring import score_at_last_token, score_texts

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    prompts, responses = ["Name a fruit.", "Name a fruit."], ["An apple is a", "A pear."]
    got = score_texts(model, tokenizer, prompts, responses, stopped=[False, True])
    cut = prompt_ids(tokenizer, prompts[0]) + response_ids(tokenizer, responses[0], add_stop=False)
    whole = prompt_ids(tokenizer, prompts[1]) + response_ids(tokenizer, responses[1])
    assert cut[-1] != STOP and whole[-1] == STOP
    with torch.no_grad():
        want = [
            score_at_last_token(model, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long)) for x in (cut, whole)
        ]
    torch.testing.assert_close(got, torch.cat(want).float(), atol=1e-5, rtol=1e-5)
    # without flags both end with the stop token: the cut one's score moves
    assert abs(float(score_texts(model, tokenizer, prompts, responses)[0]) - float(got[0])) > 1e-4


def test_best_of_n_refuses_a_max_length_that_cannot_hold_its_responses():
    from tether.stages.best_of_n import BestOfNConfig

    BestOfNConfig(max_new_tokens=40, max_length=105, max_prompt_length=256)  # 40 + stop + 64
    with pytest.raises(ConfigError, match="--max_length 104: a response of --max_new_tokens 40 tokens"):
        BestOfNConfig(max_new_tokens=40, max_length=104, max_prompt_length=256)


# ------------------------------------------------------------------------------------------------
# stage runs


def test_reward_stage_reports_what_it_cut_and_dropped(tmp_path, tiny_model_dir, caplog):
    from tether.stages.reward import RewardConfig, train_reward

    config = RewardConfig(
        output_dir=str(tmp_path / "rm"),
        model_name_or_path=str(tiny_model_dir),
        max_length=48,
        max_prompt_length=64,
        min_prompt_length=16,
        per_device_train_batch_size=4,
        num_train_epochs=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        reward_stats_max_pairs=8,
        use_cpu=True,
    )
    with caplog.at_level("WARNING"):
        folder = train_reward(config, PAIRS * 2, [FITS, LONG_RESPONSE])
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["truncation"] == "prompt"
    assert (summary["train_pairs"], summary["prompts_cut"], summary["pairs_dropped"]) == (4, 2, 4)
    assert (summary["eval_pairs"], summary["eval_pairs_dropped"]) == (1, 1)
    assert "tether rm: 4 of 8 pairs (50.0%) were dropped" in caplog.text
    assert "tether rm: 2 of 8 pairs (25.0%) had their prompt cut from the left" in caplog.text


def test_when_everything_is_dropped_the_error_names_the_options(tmp_path, tiny_model_dir):
    from tether.stages.dpo import DPOConfig, train_dpo
    from tether.stages.sft import SFTConfig, train_sft

    common = dict(model_name_or_path=str(tiny_model_dir), max_length=48, report_to="none", use_cpu=True)
    too_long = [LONG_RESPONSE, NEEDS_DEEP_CUT]
    message = r"all 2 \w+ are longer than --max_length 48, --max_prompt_length 64, --truncation drop allows"
    with pytest.raises(ConfigError, match=message):
        train_sft(
            SFTConfig(output_dir=str(tmp_path / "sft"), max_prompt_length=64, truncation="drop", **common),
            [Demonstration(p.prompt, p.chosen) for p in too_long],
        )
    with pytest.raises(ConfigError, match=message.replace("drop", "prompt") + ".*raise --max_length"):
        train_dpo(DPOConfig(output_dir=str(tmp_path / "dpo"), max_prompt_length=64, **common), too_long)
    assert not (tmp_path / "sft").exists() and not (tmp_path / "dpo").exists()
