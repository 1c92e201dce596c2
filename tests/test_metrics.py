"""Evaluation metrics on hand-made inputs with hand-computed answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from tether.evaluation import metrics as M


# ---------------------------------------------------------------------------------------------
# text statistics
# ---------------------------------------------------------------------------------------------
def test_distinct_n_is_pooled_over_the_corpus():
    texts = ["a b c", "a b d"]
    # unigrams a b c a b d: 4 unique of 6; bigrams ab bc ab bd: 3 unique of 4
    assert M.distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 4)
    # the same answer to every prompt: each is varied, the set is not
    assert M.distinct_n(["one two three"] * 4, 1) == pytest.approx(3 / 12)
    assert M.distinct_n(["", "x"], 2) == 0.0


def test_mean_repetition_rate_averages_over_responses():
    assert M.mean_repetition_rate(["a b c a b c", "x y z"]) == pytest.approx(0.125)
    assert M.mean_repetition_rate([]) == 0.0


def test_length_stats():
    s = M.length_stats([1, 2, 3, 4])
    assert s == pytest.approx({"mean": 2.5, "median": 2.5, "std": math.sqrt(1.25), "min": 1.0, "max": 4.0})
    assert math.isnan(M.length_stats([])["mean"])


# ---------------------------------------------------------------------------------------------
# correlation
# ---------------------------------------------------------------------------------------------
def test_pearson_hand_computed():
    # dx = dy-permuted [-1.5, -.5, .5, 1.5]: Σdxdy = 4, Σdx² = Σdy² = 5
    assert M.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(M.pearson([1], [2]))
    with pytest.raises(ValueError):
        M.pearson([1, 2], [1, 2, 3])


def test_rankdata_averages_ties():
    assert M.rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert M.rankdata([3, 1, 2]).tolist() == [3.0, 1.0, 2.0]


def test_spearman_uses_ranks():
    # ranks [1,2,3,4] vs [1,3,2,4]: the Pearson example above
    assert M.spearman([10, 20, 30, 40], [1, 100, 50, 1000]) == pytest.approx(0.8)
    # monotone but not linear: Spearman 1, Pearson below 1
    x, y = [1, 2, 3, 4, 5], [1, 4, 9, 16, 1000]
    assert M.spearman(x, y) == pytest.approx(1.0)
    assert M.pearson(x, y) < 0.8


# ---------------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------------
def test_kl_k1_sums_log_ratios_per_response():
    # (−1 − (−1.5)) + (−2 − (−1)) = 0.5 − 1
    assert M.kl_k1_per_sequence([[-1.0, -2.0], [-0.5]], [[-1.5, -1.0], [-0.5]]) == pytest.approx([-0.5, 0.0])
    with pytest.raises(ValueError):
        M.kl_k1_per_sequence([[-1.0]], [[-1.0, -2.0]])


class _S:  # what the log-prob code reads from tether.generation.Sample
    def __init__(self, prompt_ids, response_ids):
        self.prompt_ids, self.response_ids = prompt_ids, response_ids


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from tether.models.loading import load_causal_lm

    return load_causal_lm(str(tiny_model_dir)).eval()


def test_response_logprobs_match_an_unpadded_forward_at_temperature(tiny_lm, tokenizer):
    samples = [_S([5, 6, 7, 8, 9], [10, 11, 2]), _S([12, 13], [14, 15, 16, 17, 2]), _S([18], [19])]
    got = M.response_token_logprobs(
        tiny_lm, samples, temperature=0.5, pad_token_id=tokenizer.pad_token_id, batch_size=3
    )
    for s, lp in zip(samples, got):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = tiny_lm(input_ids=ids).logits[0].float() / 0.5
        logp = torch.log_softmax(logits, -1)
        n = len(s.prompt_ids)
        expected = [logp[n - 1 + t, tok].item() for t, tok in enumerate(s.response_ids)]
        assert lp == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError):
        M.response_token_logprobs(tiny_lm, samples, temperature=0.0, pad_token_id=0)


def _unpadded_logprobs(model, sample, temperature):
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, -1)
    n = len(sample.prompt_ids)
    return [logp[n - 1 + t, tok].item() for t, tok in enumerate(sample.response_ids)]


def test_responses_of_one_prompt_are_read_in_one_segment_with_the_logprobs_of_separate_rows(tiny_model_dir, tokenizer):
    """Three prompts (one a multi-turn conversation) with 3, 4 and 1 responses of different lengths, one
    of them empty: each response's log-probs equal an unpadded forward's, the model reads fewer token
    slots than plain rows, and the layout is checked on the first call only."""
    from tether.data.records import Message
    from tether.data.templates import prompt_ids
    from tether.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir)).eval()  # a fresh model: the check runs once per model
    chat = [Message("user", "Name a colour."), Message("assistant", "Red."), Message("user", "Another one?")]
    p1, p2, p3 = (prompt_ids(tokenizer, p, None) for p in ("What is two plus two?", chat, "Say hi."))
    samples = [
        _S(p1, [10, 11, 2]),
        _S(p2, [14, 15, 16, 17, 2]),
        _S(p1, [12, 2]),
        _S(p2, [30]),
        _S(p1, []),
        _S(p2, [31, 32, 33]),
        _S(p3, [40, 41, 2]),
        _S(p2, [50, 51]),
    ]
    slots = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: slots.append(i[0].numel()))
    try:
        first = M.response_token_logprobs(model, samples, 0.5, tokenizer.pad_token_id, batch_size=8)
        slots.clear()
        again = M.response_token_logprobs(model, samples, 0.5, tokenizer.pad_token_id, batch_size=8)
    finally:
        hook.remove()
    assert first == again and first[4] == []
    for sample, got in zip(samples, first):
        assert got == pytest.approx(_unpadded_logprobs(model, sample, 0.5), abs=1e-5)
    plain_slots = sum(1 for s in samples if s.response_ids) * max(
        len(s.prompt_ids) + len(s.response_ids) for s in samples
    )
    assert len(slots) == 1 and slots[0] < plain_slots / 2  # one shared-prompt batch, no check the second time


def test_the_logprob_check_reads_three_prompts_of_the_first_batch(tiny_model_dir):
    """Five prompts in one batch (segments of 4, 5, 10, 6 and 7 tokens): the first call checks the layout
    on the longest prompt and the two shortest (their 6 samples in plain rows, the 3 segments shared),
    then reads the whole batch as shared segments; every log-prob equals an unpadded forward's."""
    from tether.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir)).eval()  # a fresh model: the check runs once per model
    prompts = {1: [11, 12], 2: [21, 22, 23], 3: [31, 32, 33, 34], 4: [41, 42, 43, 44, 45], 5: [51] * 6}
    responses = [(1, [60]), (3, [61]), (2, [62, 63]), (1, [64]), (3, [65, 66]), (4, [67]), (3, [68, 69, 70]), (5, [71])]
    samples = [_S(prompts[p], r) for p, r in responses]
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _m, _a, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    got = M.response_token_logprobs(model, samples, 0.7, pad_token_id=0, batch_size=8)
    assert rows == [6, 3, 5]  # probe plain (2 + 1 + 3 samples of prompts 1, 2, 3), probe shared, the batch shared
    for sample, lp in zip(samples, got):
        assert lp == pytest.approx(_unpadded_logprobs(model, sample, 0.7), abs=1e-5)


def test_logprobs_fall_back_to_separate_rows_when_the_model_breaks_the_mask(caplog):
    """Mistral with a 2-token sliding window: a custom 4-D mask replaces transformers' windowed mask and
    changes its log-probs, so the first batch keeps separate rows, says why, and the values are plain rows'."""
    import logging

    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    model = MistralForCausalLM(config).eval()
    prompt = [5, 6, 7, 8, 9]
    samples = [_S(prompt, [10, 11]), _S(prompt, [12]), _S(prompt, [13, 14, 15])]
    with caplog.at_level(logging.WARNING, logger="tether.models.packing"):
        got = M.response_token_logprobs(model, samples, 1.0, pad_token_id=0, batch_size=3)
    refused = [r.getMessage() for r in caplog.records]
    assert len(refused) == 2 and "log-probs: shared-prompt padded rows differ from plain rows" in refused[0]
    assert refused[1] == "log-probs: using separate padded rows"
    for sample, lp in zip(samples, got):
        assert lp == pytest.approx(_unpadded_logprobs(model, sample, 1.0), abs=1e-5)


def test_sequence_kl_is_zero_against_itself_and_positive_against_another_model(tiny_lm, tiny_model_dir, tokenizer):
    from tether.generation import SamplingSettings, sample_responses
    from tether.models.loading import load_causal_lm

    torch.manual_seed(0)
    groups = sample_responses(
        tiny_lm,
        tokenizer,
        ["hello there", "what is two plus two?"],
        SamplingSettings(max_new_tokens=8, temperature=1.0),
        num_return_sequences=4,
    )
    samples = [s for g in groups for s in g]
    assert M.sequence_kl(tiny_lm, tiny_lm, tokenizer, samples, temperature=1.0) == 0.0
    other = load_causal_lm(str(tiny_model_dir)).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    per = M.per_sequence_kl(tiny_lm, other, tokenizer, samples, temperature=1.0)
    assert len(per) == 8
    # k1 on the policy's own samples estimates KL(π‖π_ref) > 0 (single samples may be negative)
    assert float(np.mean(per)) > 0.1, per


# ---------------------------------------------------------------------------------------------
# best-of-N
# ---------------------------------------------------------------------------------------------
def test_paired_difference_hand_computed():
    # d = [1, 2, 2]: mean 5/3; s_d^2 = ((1-5/3)^2 + 2*(1/3)^2) / 2 = 1/3; SE = sqrt(1/3)/sqrt(3) = 1/3
    mean, se = M.paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
    assert mean == pytest.approx(5 / 3) and se == pytest.approx(1 / 3)
    # a constant shift has no spread: SE 0, whatever the prompt-to-prompt spread of each side
    assert M.paired_difference([5.0, -3.0, 10.0], [4.0, -4.0, 9.0]) == pytest.approx((1.0, 0.0))
    assert math.isnan(M.paired_difference([1.0], [0.0])[1])
    with pytest.raises(ValueError):
        M.paired_difference([1.0, 2.0], [1.0])


def test_best_of_n_expected_hand_computed():
    proxy, values = [0.1, 0.3, 0.2], [10.0, 30.0, 20.0]
    assert M.best_of_n_expected(proxy, values, 1) == pytest.approx(20.0)  # the plain mean
    assert M.best_of_n_expected(proxy, values, 3) == pytest.approx(30.0)  # the proxy's favourite
    # subsets {10,20} -> 20, {10,30} -> 30, {20,30} -> 30
    assert M.best_of_n_expected(proxy, values, 2) == pytest.approx(80 / 3)
    with pytest.raises(ValueError):
        M.best_of_n_expected(proxy, values, 4)


def test_best_of_n_expected_equals_enumeration_of_subsets():
    rng = np.random.default_rng(3)
    proxy, values = rng.normal(size=7).tolist(), rng.normal(size=7).tolist()
    for n in range(1, 8):
        subsets = list(itertools.combinations(range(7), n))
        brute = np.mean([values[max(s, key=lambda i: proxy[i])] for s in subsets])
        assert M.best_of_n_expected(proxy, values, n) == pytest.approx(brute)


# ---------------------------------------------------------------------------------------------
# over-optimisation fits
# ---------------------------------------------------------------------------------------------
def test_fit_bon_recovers_known_coefficients():
    d = np.linspace(0.1, 4.0, 20)
    r = M.r_bon(d, 2.0, 0.5)
    alpha, beta = M.fit_bon(d, r)
    assert (alpha, beta) == pytest.approx((2.0, 0.5), abs=1e-9)
    assert M.bon_peak(alpha, beta) == pytest.approx(2.0)
    noisy = r + np.random.default_rng(0).normal(scale=0.02, size=d.size)
    assert M.fit_bon(d, noisy) == pytest.approx((2.0, 0.5), abs=0.05)


def test_fit_rl_recovers_known_coefficients():
    d = np.concatenate([[0.0], np.linspace(0.2, 6.0, 25)])  # the starting policy at d = 0 is allowed
    r = M.r_rl(d, 1.0, 0.4)
    assert r[0] == 0.0
    alpha, beta = M.fit_rl(d, r)
    assert (alpha, beta) == pytest.approx((1.0, 0.4), abs=1e-9)
    # dR/dd = α − β(log d + 1) = 0  ->  d* = e^{α/β − 1} = e^{1.5}
    assert M.rl_peak(alpha, beta) == pytest.approx(math.exp(1.5))
    grid = np.linspace(0.01, 10, 20001)
    assert grid[np.argmax(M.r_rl(grid, alpha, beta))] == pytest.approx(math.exp(1.5), abs=1e-3)


def test_fits_refuse_too_few_points_and_report_no_peak_for_negative_beta():
    with pytest.raises(ValueError):
        M.fit_rl([0.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError):
        M.fit_bon([1.0, -1.0], [0.0, 1.0])
    assert math.isnan(M.rl_peak(1.0, -0.1))
    assert math.isnan(M.bon_peak(1.0, 0.0))
    assert M.recentre([1.0, 1.5, 0.5], 1.0) == [0.0, 0.5, -0.5]


def test_most_common_response_share():
    assert M.most_common_response_share(["A b", "a b!", "c"]) == pytest.approx(2 / 3)
    assert M.most_common_response_share([]) == 0.0
