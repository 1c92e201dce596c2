"""Stage 2 (`tether rm`) and `tether.models.scoring`: the equations on hand-computed numbers, the
shared-prompt forward pass against separate sequences, learning a separable preference set (and
not learning shuffled labels), the saved reward model through `transformers.pipeline`, and the
command line (`--eval_only`, bad data)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch

from tether.data.records import Message, PreferencePair
from tether.data.templates import Truncation
from tether.models.packing import Layout, Segment, lay_out_rows
from tether.models.scoring import (
    RewardStats,
    last_token_indices,
    load_reward_stats,
    normalise,
    padded_batch,
    position_ids_from_mask,
    reward_stats,
    save_reward_stats,
    score_at_last_token,
    score_texts,
)
from tether.stages.reward import (
    PreferenceCollator,
    RewardConfig,
    bradley_terry_loss,
    choose_distinct_pad_token,
    choose_reward_layout,
    pair_rewards,
    preference_metrics,
    reward_centering_penalty,
    tokenize_preferences,
    train_reward,
)

LIMITS = Truncation(max_length=512, max_prompt_length=256)  # the stages' defaults

# ------------------------------------------------------------------------------------------------
# the equations, by hand


def test_bradley_terry_loss_matches_hand_computed_values():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    # -log σ(1) = log(1 + e^-1) = 0.3132617; -log σ(-0.5) = log(1 + e^0.5) = 0.9740770
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx((0.3132617 + 0.9740770) / 2, abs=1e-6)
    # margins 0 and 0.5: -log σ(1) and -log σ(-1) = 1.3132617
    loss = bradley_terry_loss(chosen, rejected, torch.tensor([0.0, 0.5]))
    assert loss.item() == pytest.approx((0.3132617 + 1.3132617) / 2, abs=1e-6)
    # far apart rewards do not underflow to inf
    assert bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)


def test_reward_centering_penalty_matches_hand_computed_value():
    # sums 0 and 3 -> mean of squares (0 + 9) / 2 = 4.5 -> times 0.01
    value = reward_centering_penalty(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0]), 0.01)
    assert value.item() == pytest.approx(0.045)


def test_preference_metrics_match_hand_computed_values():
    m = preference_metrics(torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert m["accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # the tie counts half
    assert m["margin"] == pytest.approx((1 + 0 - 1 + 3) / 4)
    assert m["reward_mean"] == pytest.approx(9 / 8)
    assert m["reward_std"] == pytest.approx(math.sqrt(6.875 / 8))  # biased: Σ(x-1.125)² = 6.875
    assert m["chosen_mean"] == pytest.approx(1.5) and m["rejected_mean"] == pytest.approx(0.75)


def test_normalisation_gain_and_bias(tmp_path):
    stats = reward_stats(torch.tensor([1.0, 3.0, 5.0, 7.0]), source="hand")
    assert stats.mean == pytest.approx(4.0) and stats.std == pytest.approx(math.sqrt(5.0))  # biased: 20/4
    assert normalise(torch.tensor([4.0, 4.0 + math.sqrt(5.0)]), stats).tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert stats.gain * 7.0 + stats.bias == pytest.approx(3 / math.sqrt(5.0))
    save_reward_stats(stats, tmp_path)
    assert load_reward_stats(tmp_path) == RewardStats(mean=4.0, std=math.sqrt(5.0), count=4, source="hand")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "reward_stats.json").write_text('{"mean": 1.0, "std": 0.0}')
    with pytest.raises(ValueError, match="std must be > 0"):
        load_reward_stats(tmp_path / "bad")


# ------------------------------------------------------------------------------------------------
# positions and masks


def test_last_token_index_and_positions_for_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_indices(right).tolist() == [2, 3, 0]
    assert last_token_indices(left).tolist() == [3, 3, 3]
    assert position_ids_from_mask(left).tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 0, 0]]


def test_shared_prompt_mask_and_positions_by_hand():
    # row 1: prompt (2 tokens) | chosen (1) | rejected (2) | pad (1); row 0 is one plain 6-token sequence
    rows = lay_out_rows([[1, 2, 3, 4, 5, 6], [4, 5, 6, 7, 8]], [Segment(6), Segment(2, (1, 2))], 0, pack=False)
    allowed = rows.attention()[1, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],  # prompt 0
        [1, 1, 0, 0, 0, 0],  # prompt 1
        [1, 1, 1, 0, 0, 0],  # chosen: prompt + itself
        [1, 1, 0, 1, 0, 0],  # rejected 0: prompt, not chosen
        [1, 1, 0, 1, 1, 0],  # rejected 1
        [0, 0, 0, 0, 0, 1],  # padding: itself only (no all-masked softmax)
    ]
    assert rows.position_ids[1].tolist() == [0, 1, 2, 2, 3, 0]  # the padding's position is never attended to


def _pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud light paper green".split()
    return [
        PreferencePair(
            prompt=" ".join(rng.choices(words, k=rng.randint(1, 6))),
            chosen=" ".join(rng.choices(words, k=rng.randint(1, 7))),
            rejected=" ".join(rng.choices(words, k=rng.randint(1, 7))),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_rows_score_like_separate_sequences(tiny_rm_dir, tokenizer, attn):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir, attn_implementation=attn)
    tokens = tokenize_preferences(tokenizer, _pairs(6), LIMITS)
    shared = pair_rewards(model, PreferenceCollator(0, share_prompt=True)(tokens.pairs))
    separate = pair_rewards(model, PreferenceCollator(0, share_prompt=False)(tokens.pairs))
    # and each sequence alone, unpadded
    alone_c = torch.stack(
        [
            score_at_last_token(model, torch.tensor([p.chosen_ids]), torch.ones(1, len(p.chosen_ids)))[0]
            for p in tokens.pairs
        ]
    )
    for got, want in zip(shared, separate):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[0], alone_c, atol=1e-5, rtol=1e-5)
    assert choose_reward_layout(model, tokens.pairs, 0) == Layout(share_prompt=True, padding_free=True)


def test_score_is_the_same_for_left_and_right_padding(tiny_rm_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    seqs = [[5, 6, 7, 2], [8, 2], [9, 10, 11, 12, 13, 2]]
    right = score_at_last_token(model, *padded_batch(seqs, 2, "right"))
    left = score_at_last_token(model, *padded_batch(seqs, 2, "left"))
    torch.testing.assert_close(right, left, atol=1e-5, rtol=1e-5)
    # the stop token (id 2 == pad id here) is where the score is read: reading one token earlier differs
    early = score_at_last_token(model, *padded_batch([s[:-1] for s in seqs], 2, "right"))
    assert (early - right).abs().min() > 1e-4


def test_pad_token_for_saved_reward_model_differs_from_stop_token(tokenizer):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    assert tok.pad_token_id == tok.eos_token_id == 2  # SmolLM2: the trap
    assert choose_distinct_pad_token(tok) == 0 and tok.pad_token == "<|endoftext|>"
    tok.pad_token = "<|im_start|>"  # a pad that already differs from the stop token is kept
    assert choose_distinct_pad_token(tok) == 1


@pytest.mark.parametrize("embedding_rows", [3, 8])
def test_a_new_pad_token_is_added_when_no_special_token_is_free(embedding_rows):
    from conftest import tiny_llama_config
    from tokenizers import Tokenizer, models
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token=None))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="</s>")
    model = LlamaForSequenceClassification(tiny_llama_config(embedding_rows, 2, 2, None, num_labels=1))
    assert choose_distinct_pad_token(tok, model) == 3 and tok.pad_token == "<|tether_pad|>"
    assert model.config.pad_token_id == 3
    # grown by one row only when the embedding matrix had no unused row for it
    assert model.get_input_embeddings().weight.shape[0] == max(4, embedding_rows)


# ------------------------------------------------------------------------------------------------
# training

MARKER, OTHER = "banana", "window"
FILLER = "the a small old red quick calm open soft warm".split()


def _marker_pairs(n: int, seed: int, shuffle_labels: bool = False) -> list[PreferencePair]:
    """Chosen holds the marker word where rejected holds another word (same length and position).

    With ``shuffle_labels`` a fair coin per pair decides which response is "chosen", so the
    labels carry no information about the text."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(FILLER, k=rng.randint(2, 6))
        at = rng.randint(0, len(words))
        good = " ".join(words[:at] + [MARKER] + words[at:])
        bad = " ".join(words[:at] + [OTHER] + words[at:])
        if shuffle_labels and rng.random() < 0.5:
            good, bad = bad, good
        out.append(PreferencePair(prompt="Say something " + rng.choice(FILLER) + ".", chosen=good, rejected=bad))
    return out


def _rm_config(tmp_path: Path, model_dir: Path, **overrides) -> RewardConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "rm"),
        model_name_or_path=str(model_dir),
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_train_epochs=1,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        reward_stats_max_pairs=64,
        use_cpu=True,
    )
    kwargs.update(overrides)
    return RewardConfig(**kwargs)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_model_dir):
    """A tiny random causal LM turned into a reward model on 240 separable pairs; 80 held out."""
    tmp = tmp_path_factory.mktemp("rm-separable")
    train, held_out = _marker_pairs(240, seed=1), _marker_pairs(80, seed=2)
    folder = train_reward(_rm_config(tmp, tiny_model_dir), train, held_out)
    return folder, train, held_out


def test_separable_preferences_are_learned_on_held_out_pairs(trained_rm):
    folder, _, held_out = trained_rm
    results = json.loads((folder / "eval_results.json").read_text())
    final = results["final"]
    assert final["eval_accuracy"] >= 0.9, final
    assert final["eval_margin"] > 0
    # every evaluation is also in metrics.jsonl, with the training rows
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in rows) and any("loss" in r and "accuracy" in r for r in rows)
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["shared_prompt_rows"] is True and summary["eval_pairs"] == len(held_out) == 80
    assert summary["padding_free_rows"] is True


def test_shuffled_labels_stay_near_chance(tmp_path, tiny_model_dir):
    # Labels are fair coins independent of the text, for training and held-out pairs alike, so any
    # scorer's held-out accuracy is Binomial(80, 1/2)/80 (sd 0.056): |acc - 0.5| >= 0.2 has
    # probability 2·P(Bin(80, .5) >= 56) ≈ 3e-4. Only a leak of which row is "chosen" (e.g. through
    # positions or masks of the shared-prompt rows) could push it out of the band.
    train, held_out = _marker_pairs(240, seed=3, shuffle_labels=True), _marker_pairs(80, seed=4, shuffle_labels=True)
    folder = train_reward(_rm_config(tmp_path, tiny_model_dir), train, held_out)
    final = json.loads((folder / "eval_results.json").read_text())["final"]
    assert abs(final["eval_accuracy"] - 0.5) < 0.2, final


def test_saved_reward_model_scores_the_same_through_pipeline_and_automodel(trained_rm, tokenizer):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    folder, _, held_out = trained_rm
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    saved_tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.pad_token_id == saved_tok.pad_token_id == 0 != saved_tok.eos_token_id
    pairs = held_out[:6]
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ours = score_texts(model, saved_tok, prompts, responses, batch_size=4)

    from tether.data.templates import prompt_response_ids

    texts = [saved_tok.decode(prompt_response_ids(saved_tok, p, r)[0]) for p, r in zip(prompts, responses)]
    assert all(t.endswith("<|im_end|>") for t in texts)
    classifier = pipeline("text-classification", model=str(folder), function_to_apply="none", device="cpu")
    one_by_one = torch.tensor([classifier(t)[0]["score"] for t in texts])
    batched = torch.tensor([o["score"] for o in classifier(texts, batch_size=5)])  # padded with id 0
    torch.testing.assert_close(one_by_one, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(batched, ours, atol=1e-4, rtol=0)

    # plain AutoModel on a right-padded batch pools at the same token
    enc = saved_tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hf = model(**enc).logits.squeeze(-1)
    torch.testing.assert_close(hf, ours, atol=1e-4, rtol=0)


def test_reward_stats_are_saved_with_the_model(trained_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, train, _ = trained_rm
    stats = load_reward_stats(folder)
    assert stats.count == 2 * 64 and stats.std > 0
    # recompute them from the saved model on the same sample of training pairs
    sample = random.Random(0).sample(train, 64)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    scores = score_texts(
        model, tok, [p.prompt for p in sample] * 2, [p.chosen for p in sample] + [p.rejected for p in sample]
    )
    assert stats.mean == pytest.approx(scores.mean().item(), abs=1e-4)
    assert stats.std == pytest.approx(scores.std(unbiased=False).item(), abs=1e-4)
    assert normalise(scores, stats).mean().item() == pytest.approx(0.0, abs=1e-4)


def test_margin_column_reaches_the_loss(tokenizer):
    pairs = [PreferencePair("q", "a", "b", margin=1.5), PreferencePair("q", "c", "d", margin=None)]
    batch = PreferenceCollator(0)(tokenize_preferences(tokenizer, pairs, LIMITS).pairs)
    assert batch["margin"].tolist() == [1.5, 0.0]
    assert "margin" not in PreferenceCollator(0)(tokenize_preferences(tokenizer, pairs[1:], LIMITS).pairs)


# ------------------------------------------------------------------------------------------------
# command line


def _write_jsonl(path: Path, pairs: list[PreferencePair]) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs)
    )
    return path


def test_eval_only_prints_accuracy_and_writes_json(trained_rm, tmp_path):
    from tether.cli import main

    folder, _, held_out = trained_rm
    data = _write_jsonl(tmp_path / "prefs.jsonl", held_out)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "rm",
                "--eval_only",
                "--model_name_or_path",
                str(folder),
                "--dataset",
                str(data),
                "--output_dir",
                str(tmp_path / "eval"),
                "--use_cpu",
                "true",
            ]
        )
    assert code == 0
    written = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert f"accuracy {written['accuracy']:.4f} on 80 pairs" in out.getvalue()
    expected = json.loads((folder / "eval_results.json").read_text())["final"]["eval_accuracy"]
    assert written["accuracy"] == pytest.approx(expected)  # the same pairs scored by training's evaluation


def test_lora_reward_model_is_saved_merged_and_scores_like_during_training(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from tether.stages.reward import evaluate_reward_model

    train, held_out = _marker_pairs(48, seed=5), _marker_pairs(24, seed=6)
    folder = train_reward(
        _rm_config(tmp_path, tiny_model_dir, use_peft=True, lora_r=4, lora_alpha=8, activation_checkpointing=True),
        train,
        held_out,
    )
    assert not (folder / "adapter_config.json").exists()
    assert AutoModelForSequenceClassification.from_pretrained(folder).config.pad_token_id == 0
    during = json.loads((folder / "eval_results.json").read_text())["final"]
    after = evaluate_reward_model(_rm_config(tmp_path, folder, output_dir=None), held_out)
    assert after["accuracy"] == pytest.approx(during["eval_accuracy"])
    assert after["margin"] == pytest.approx(during["eval_margin"], abs=1e-4)


def test_reward_model_starts_from_a_lora_sft_adapter_folder(tmp_path, tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    sft.save_pretrained(tmp_path / "sft-adapter")
    tokenizer.save_pretrained(tmp_path / "sft-adapter")
    merged = sft.merge_and_unload()
    # learning rate 0: the saved backbone is exactly the merged SFT model
    folder = train_reward(
        _rm_config(tmp_path, tmp_path / "sft-adapter", learning_rate=0.0),
        _marker_pairs(16, seed=7),
        _marker_pairs(8, seed=8),
    )
    rm = AutoModelForSequenceClassification.from_pretrained(folder)
    for name in ("layers.0.self_attn.q_proj.weight", "layers.1.self_attn.v_proj.weight", "embed_tokens.weight"):
        torch.testing.assert_close(rm.model.state_dict()[name], merged.model.state_dict()[name])


def test_bad_data_leaves_no_output_folder(tmp_path, tiny_model_dir):
    from tether.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(
            [
                "rm",
                "--model_name_or_path",
                str(tiny_model_dir),
                "--dataset",
                str(bad),
                "--output_dir",
                str(tmp_path / "out"),
                "--use_cpu",
                "true",
            ]
        )
    assert code == 2
    assert f"{bad}:2" in err.getvalue()
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ------------------------------------------------------------------------------------------------
# the embedded model


@pytest.mark.slow
def test_embedded_model_shared_prompt_rows_and_hf_pooling_read_the_stop_token(embedded_model_dir):
    """SmolLM2-135M (30 layers, grouped-query attention): shared-prompt rows score like separate
    sequences, and with the distinct pad token HF's own pooling reads the same (stop) token."""
    from tether.data.templates import prompt_response_ids
    from tether.models.loading import load_scalar_model, load_tokenizer

    tok = load_tokenizer(str(embedded_model_dir))
    model = load_scalar_model(str(embedded_model_dir))
    pad = choose_distinct_pad_token(tok, model)
    pairs = [
        PreferencePair((Message("user", "What is the capital of France?"),), "Paris.", "It is Lyon, I think."),
        PreferencePair("Name two fruits.", "Apple and pear.", "Carrots."),
    ]
    tokens = tokenize_preferences(tok, pairs, Truncation(max_length=256, max_prompt_length=128))
    shared = pair_rewards(model, PreferenceCollator(pad, True)(tokens.pairs))
    separate = pair_rewards(model, PreferenceCollator(pad, False)(tokens.pairs))
    for got, want in zip(shared, separate):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    texts = [tok.decode(prompt_response_ids(tok, p.prompt, r)[0]) for p in pairs for r in (p.chosen, p.rejected)]
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hf = model(**enc).logits.squeeze(-1)
    ours = torch.stack([shared[0][0], shared[1][0], shared[0][1], shared[1][1]])
    torch.testing.assert_close(hf, ours, atol=1e-4, rtol=1e-4)
