"""tether dpo: the loss equations, sequence log-probs, the reference (live, precomputed, LoRA), a real run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tether.config import ConfigError
from tether.data.records import PreferencePair
from tether.data.templates import Truncation
from tether.stages.common import truncation_rule
from tether.stages.dpo import (
    DPOConfig,
    TokenizedPair,
    collate_pairs,
    dpo_losses,
    implicit_rewards,
    log_ratio_difference,
    response_logps,
    tokenize_pairs,
    train_dpo,
)

# Two pairs: h = (−1 − (−2)) − (−3 − (−2)) = 2 and h = (−2 − (−2)) − (−1 − (−2)) = −1; β = 0.1
POLICY_CHOSEN = torch.tensor([-1.0, -2.0])
POLICY_REJECTED = torch.tensor([-3.0, -1.0])
REF_CHOSEN = torch.tensor([-2.0, -2.0])
REF_REJECTED = torch.tensor([-2.0, -2.0])


def fast_config(tmp_path, model_dir, **overrides) -> DPOConfig:
    kwargs = dict(
        model_name_or_path=str(model_dir),
        output_dir=str(tmp_path / "dpo"),
        learning_rate=5e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=48,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


TOPICS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "music",
    "paper",
    "garden",
    "light",
    "window",
    "story",
    "bread",
    "horse",
    "train",
    "ocean",
    "forest",
    "candle",
    "mirror",
    "violin",
    "desert",
    "bridge",
]


def separable_pairs(n: int, seed: int, topics=TOPICS) -> list[PreferencePair]:
    """Chosen responses are polite, rejected ones rude; the rest of the text is shared."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(topics)
        out.append(
            PreferencePair(
                prompt=f"Tell me about the {topic}.",
                chosen=f"The {topic} is lovely, thank you kindly.",
                rejected=f"The {topic} is stupid, go away now.",
                origin=f"test:{i + 1}",
            )
        )
    return out


def test_log_ratio_difference_and_implicit_rewards_match_hand_computed_values():
    h = log_ratio_difference(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)
    assert h.tolist() == [2.0, -1.0]
    assert implicit_rewards(POLICY_CHOSEN, REF_CHOSEN, 0.1).tolist() == pytest.approx([0.1, 0.0])


@pytest.mark.parametrize(
    "loss_type, smoothing, expected",
    [
        # sigmoid: −log σ(0.2) = log(1 + e^−0.2) = 0.598139; −log σ(−0.1) = log(1 + e^0.1) = 0.744397
        ("sigmoid", 0.0, (0.598139 + 0.744397) / 2),
        # ipo: (2 − 5)² = 9, (−1 − 5)² = 36
        ("ipo", 0.0, 22.5),
        # hinge: max(0, 1 − 0.2) = 0.8, max(0, 1 + 0.1) = 1.1
        ("hinge", 0.0, 0.95),
        # ε = 0.1: 0.9·0.598139 + 0.1·log(1 + e^0.2) = 0.618139;  0.9·0.744397 + 0.1·log(1 + e^−0.1) = 0.734397
        ("sigmoid", 0.1, (0.618139 + 0.734397) / 2),
        # ε = 0.1: 0.9·9 + 0.1·(−2 − 5)² = 13;  0.9·36 + 0.1·(1 − 5)² = 34
        ("ipo", 0.1, 23.5),
        # ε = 0.1: 0.9·0.8 + 0.1·1.2 = 0.84;  0.9·1.1 + 0.1·0.9 = 1.08
        ("hinge", 0.1, 0.96),
    ],
)
def test_loss_equals_hand_computed_value_for_a_two_pair_batch(loss_type, smoothing, expected):
    h = log_ratio_difference(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)
    loss = dpo_losses(h, beta=0.1, loss_type=loss_type, label_smoothing=smoothing).mean()
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_sigmoid_loss_is_log_2_when_policy_equals_reference():
    logps = torch.tensor([-7.0, -3.5, -12.25])
    h = log_ratio_difference(logps, logps - 1.0, logps, logps - 1.0)
    assert dpo_losses(h, 0.1).tolist() == pytest.approx([math.log(2)] * 3)


def test_bad_options_are_config_errors(tmp_path):
    for bad in (dict(loss_type="kto"), dict(beta=0.0), dict(label_smoothing=0.5)):
        with pytest.raises(ConfigError):
            DPOConfig(output_dir=str(tmp_path / "x"), use_cpu=True, **bad)


def manual_logp(model, prompt: list[int], response: list[int]) -> float:
    """Sum of log p(response token | everything before), computed on the unpadded sequence alone."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logps = model(ids).logits[0].float().log_softmax(-1)
    return sum(float(logps[len(prompt) + k - 1, t]) for k, t in enumerate(response))


@pytest.mark.parametrize("share_prompt", [True, False])
def test_response_logps_sum_every_response_token_including_the_stop_token(tiny_model_dir, tokenizer, share_prompt):
    from tether.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir)).eval()
    pairs = [
        PreferencePair("Hi there", "Hello, friend.", "Go away"),
        PreferencePair("A much longer prompt about the weather today", "Sunny.", "It will rain all day long."),
    ]
    items, _, _ = tokenize_pairs(tokenizer, pairs, Truncation(max_length=64))
    for x in items:
        assert x.chosen[-1] == tokenizer.eos_token_id and x.rejected[-1] == tokenizer.eos_token_id
    # SmolLM2 pads with its stop token: padding must not be mistaken for (or hide) the stop token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    batch = collate_pairs(items, tokenizer.pad_token_id, share_prompt=share_prompt)
    assert len(batch["token_target"]) == sum(len(x.chosen) + len(x.rejected) for x in items)
    with torch.no_grad():
        chosen, rejected = response_logps(model, batch)
        chosen_full, rejected_full = response_logps(model, batch, compact_head=False)
    expected_chosen = [manual_logp(model, x.prompt, x.chosen) for x in items]
    expected_rejected = [manual_logp(model, x.prompt, x.rejected) for x in items]
    assert chosen.tolist() == pytest.approx(expected_chosen, abs=1e-4)
    assert rejected.tolist() == pytest.approx(expected_rejected, abs=1e-4)
    assert chosen_full.tolist() == pytest.approx(expected_chosen, abs=1e-4)
    assert rejected_full.tolist() == pytest.approx(expected_rejected, abs=1e-4)


def test_shared_prompt_rejected_tokens_do_not_see_the_chosen_response(tiny_model_dir, tokenizer):
    from tether.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir)).eval()
    base = TokenizedPair(prompt=[10, 11, 12], chosen=[20, 21, 2], rejected=[30, 31, 32, 2])
    other = TokenizedPair(prompt=[10, 11, 12], chosen=[40, 41, 42, 43, 2], rejected=[30, 31, 32, 2])
    with torch.no_grad():
        _, r1 = response_logps(model, collate_pairs([base], 2, share_prompt=True))
        _, r2 = response_logps(model, collate_pairs([other], 2, share_prompt=True))
    assert float(r1[0]) == pytest.approx(float(r2[0]), abs=1e-5)


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_first_loss_is_log_2_and_precomputed_reference_gives_the_live_losses(tmp_path, tiny_model_dir, tokenizer):
    pairs = separable_pairs(24, seed=1)
    losses = {}
    for precompute in (False, True):
        config = fast_config(
            tmp_path / str(precompute), tiny_model_dir, max_steps=3, precompute_ref_log_probs=precompute
        )
        train_dpo(config, pairs, [], tokenizer=tokenizer)
        rows = [r for r in read_metrics(tmp_path / str(precompute) / "dpo") if "loss" in r]
        losses[precompute] = [r["loss"] for r in rows]
        # step 1 is computed before any update: policy == reference, h = 0, L = log 2, rewards 0
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert losses[True][-1] < math.log(2) - 0.01  # and the updates did something


@pytest.mark.parametrize(
    "reference",
    [
        {},  # a live frozen copy of the starting model
        {"precompute_ref_log_probs": True},  # computed once before training
        {"use_peft": True, "lora_r": 4},  # the adapter-disabled policy
    ],
    ids=["live", "precomputed", "lora"],
)
def test_rewards_are_exactly_zero_at_step_0_under_bf16_for_every_reference(
    tmp_path, tiny_model_dir, tokenizer, reference
):
    # Before any update the policy is its reference, so h = 0 exactly, provided the policy and the
    # reference apply the LM head at the same precision (accelerate autocasts only the model's forward).
    config = fast_config(tmp_path, tiny_model_dir, max_steps=1, bf16=True, **reference)
    train_dpo(config, separable_pairs(8, seed=1), [], tokenizer=tokenizer)
    first = next(r for r in read_metrics(tmp_path / "dpo") if "loss" in r)
    assert (first["rewards/chosen"], first["rewards/rejected"], first["rewards/margins"]) == (0.0, 0.0, 0.0)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_held_out_implicit_reward_accuracy_rises_well_above_chance(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    train = separable_pairs(64, seed=2, topics=TOPICS[:14])
    held_out = separable_pairs(24, seed=3, topics=TOPICS[14:])  # topics never seen in training
    config = fast_config(tmp_path, tiny_model_dir, num_train_epochs=1)
    metrics = train_dpo(config, train, held_out, tokenizer=tokenizer)
    out = tmp_path / "dpo"
    assert metrics["eval"]["eval_pairs"] == 24
    assert metrics["train"]["shared_prompt_rows"] is True and metrics["train"]["padding_free_rows"] is True
    assert metrics["eval"]["eval_rewards/accuracies"] >= 0.9
    assert metrics["eval"]["eval_rewards/margins"] > 0
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["eval_rewards/accuracies"] == pytest.approx(metrics["eval"]["eval_rewards/accuracies"])
    rows = read_metrics(out)
    assert any("rewards/accuracies" in r for r in rows) and any("eval_rewards/accuracies" in r for r in rows)
    assert not list(out.parent.glob(".*tmp*"))  # no staging folder left behind
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)


def test_lora_reference_is_the_adapter_disabled_policy(tmp_path, tiny_model_dir, tokenizer):
    from tether.models.loading import load_causal_lm

    train = separable_pairs(16, seed=4)
    held_out = separable_pairs(8, seed=5)
    config = fast_config(
        tmp_path, tiny_model_dir, max_steps=4, use_peft=True, lora_r=4, lora_alpha=8, learning_rate=2e-2
    )
    metrics = train_dpo(config, train, held_out, tokenizer=tokenizer)["eval"]
    out = tmp_path / "dpo"
    assert (out / "adapter_config.json").is_file()

    # Recompute the held-out implicit rewards from the saved adapter and a freshly loaded base model.
    policy = load_causal_lm(str(out)).eval()  # a PeftModel
    base = load_causal_lm(str(tiny_model_dir)).eval()
    items, _, _ = tokenize_pairs(tokenizer, held_out, truncation_rule(config))
    batch = collate_pairs(items, tokenizer.pad_token_id)
    with torch.no_grad():
        pol_c, pol_r = response_logps(policy, batch)
        base_c, base_r = response_logps(base, batch)
        with policy.disable_adapter():
            off_c, off_r = response_logps(policy, batch)
    assert off_c.tolist() == pytest.approx(base_c.tolist(), abs=1e-5)
    assert off_r.tolist() == pytest.approx(base_r.tolist(), abs=1e-5)
    expected = implicit_rewards(pol_c, base_c, config.beta).mean()
    assert abs(float(expected)) > 1e-3  # the adapter moved the policy away from its reference
    assert metrics["eval_rewards/chosen"] == pytest.approx(float(expected), abs=1e-4)
    assert metrics["eval_rewards/rejected"] == pytest.approx(
        float(implicit_rewards(pol_r, base_r, config.beta).mean()), abs=1e-4
    )


def test_bad_data_exits_cleanly_and_leaves_no_output_dir(tmp_path, tiny_model_dir, capsys):
    from tether.cli import main

    data = tmp_path / "prefs.jsonl"
    data.write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
        + "\n"
        + json.dumps({"prompt": "a", "chosen": "b"})
        + "\n"
    )
    out = tmp_path / "out"
    code = main(
        [
            "dpo",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--dataset",
            str(data),
            "--output_dir",
            str(out),
            "--use_cpu",
            "true",
            "--report_to",
            "none",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "prefs.jsonl:2" in err and "rejected" in err
    assert not out.exists()
    code = main(["dpo", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--use_cpu", "true"])
    assert code == 2 and "--dataset is required" in capsys.readouterr().err
    assert not out.exists()


def test_fast_paths_are_checked_and_hold_for_sdpa_and_eager_attention(tiny_model_dir, tokenizer):
    from tether.models.loading import load_causal_lm
    from tether.models.packing import Layout
    from tether.stages.dpo import check_fast_paths

    pair = TokenizedPair(prompt=[10, 11, 12, 13], chosen=[20, 21, 2], rejected=[30, 31, 32, 33, 2])
    for implementation in ("sdpa", "eager"):  # boolean 4-D mask vs additive float mask
        model = load_causal_lm(str(tiny_model_dir), attn_implementation=implementation).eval()
        assert check_fast_paths(model, [pair], pad_id=2) == (Layout(share_prompt=True, padding_free=True), True)
        with torch.no_grad():
            shared = torch.stack(response_logps(model, collate_pairs([pair, pair], 2, share_prompt=True)))
            separate = torch.stack(response_logps(model, collate_pairs([pair, pair], 2, share_prompt=False)))
        assert shared.flatten().tolist() == pytest.approx(separate.flatten().tolist(), abs=1e-4)
