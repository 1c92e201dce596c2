"""Sampling: pure temperature sampling, stop handling, left padding."""

from __future__ import annotations

import pytest
import torch

from tether.generation import SamplingSettings, generation_config, left_pad, sample_responses, truncate_after_stop


def test_truncate_after_stop_keeps_the_stop_token_and_drops_the_rest():
    assert truncate_after_stop([5, 6, 2, 7, 2], {2}) == ([5, 6, 2], True)
    assert truncate_after_stop([5, 6, 7], {2}) == ([5, 6, 7], False)
    assert truncate_after_stop([2], {2}) == ([2], True)


def test_left_pad_right_aligns_and_builds_the_mask_from_lengths():
    ids, mask = left_pad([[7, 8, 9], [2]], pad_id=2)  # pad id equal to a real token on purpose
    assert ids.tolist() == [[7, 8, 9], [2, 2, 2]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generation_config_is_pure_sampling(tokenizer):
    config = generation_config(tokenizer, SamplingSettings(max_new_tokens=5, temperature=0.7))
    assert config.do_sample and config.top_k == 0 and config.top_p == 1.0 and config.temperature == 0.7
    assert config.repetition_penalty == 1.0 and config.min_new_tokens == 0
    assert config.eos_token_id == [tokenizer.eos_token_id]


def test_samples_stop_at_the_stop_token_and_respect_max_new_tokens(tiny_model_dir, tokenizer):
    from tether.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    torch.manual_seed(0)
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0)
    out = sample_responses(
        model, tokenizer, ["hello", "a much longer prompt here"], settings, num_return_sequences=3, batch_size=2
    )
    assert len(out) == 2 and all(len(g) == 3 for g in out)
    for group in out:
        for s in group:
            assert 1 <= len(s.response_ids) <= 6
            if s.stopped:
                assert s.response_ids[-1] == tokenizer.eos_token_id
                assert tokenizer.eos_token_id not in s.response_ids[:-1]
            else:
                assert len(s.response_ids) == 6 and tokenizer.eos_token_id not in s.response_ids
    # the same prompt gives the same ids whatever else is in the batch (left padding)
    assert out[0][0].prompt_ids == out[0][1].prompt_ids


@pytest.mark.parametrize("path", ["sample_from_ids", "generate_batch", "generate_groups"])
def test_sampled_frequencies_follow_softmax_of_logits_over_t_in_the_whole_vocabulary(tokenizer, path):
    """A top-k (transformers' default 50), top-p or temperature leak would show in the frequencies.

    A tiny model with SmolLM2's full 49,152-token vocabulary, its output embeddings scaled so that at
    T = 0.7 the next-token distribution puts 39% of its mass on the 10 likeliest tokens and 49% on
    tokens ranked 50 and below (at T = 1 the same buckets hold 8% and 86%). 4,000 first tokens are
    sampled through each of the library's sampling paths (evaluation and best-of-N's
    ``sample_from_ids``, PPO's ``generate_batch``, the critic-free estimators' ``generate_groups``); each
    rank bucket's frequency must match its probability under softmax(logits / T) within 4 binomial
    standard errors.
    """
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from tether.data.templates import prompt_ids
    from tether.generation import sample_from_ids

    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(16.0)
    temperature, n = 0.7, 4000
    ids = prompt_ids(tokenizer, "hello", None)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    probs = torch.softmax(logits / temperature, dim=-1)
    rank_of = torch.empty_like(probs, dtype=torch.long)
    rank_of[probs.argsort(descending=True)] = torch.arange(probs.numel())
    buckets = [(0, 10), (10, 50), (50, 500), (500, probs.numel())]
    ordered = probs.sort(descending=True).values
    expected = [float(ordered[a:b].sum()) for a, b in buckets]
    assert expected[2] + expected[3] > 0.45  # most of the mass lies where a top-k 50 sampler never goes

    torch.manual_seed(1)
    settings = SamplingSettings(max_new_tokens=1, temperature=temperature)
    if path == "sample_from_ids":
        samples = sample_from_ids(model, tokenizer, [ids], settings, num_return_sequences=n, batch_size=1)[0]
        first = torch.tensor([s.response_ids[0] for s in samples])
    else:
        from tether.generation import generate_batch
        from tether.ppo.grouping import generate_groups

        query_ids, query_mask = torch.tensor([ids] * n), torch.ones(n, len(ids), dtype=torch.long)
        if path == "generate_batch":
            generated = generate_batch(model, tokenizer, query_ids, query_mask, settings, batch_size=500)
        else:  # 1000 groups of k = 4 responses to the same prompt
            generated = generate_groups(model, tokenizer, query_ids, query_mask, settings, k=4, batch_size=500)
        first = generated.responses[:, 0]
    ranks = rank_of[first]
    for (a, b), p in zip(buckets, expected):
        freq = float(((ranks >= a) & (ranks < b)).float().mean())
        assert abs(freq - p) <= 4 * (p * (1 - p) / n) ** 0.5, (a, b, freq, p)


def test_several_samples_of_a_prompt_share_its_prefill_and_draw_what_num_return_sequences_draws(
    tiny_model_dir, tokenizer
):
    """Four samples of each of two prompts of different lengths: the model reads each prompt (minus its
    last token) once, then every row's last prompt token; the tokens equal those of transformers' own
    ``num_return_sequences`` path under the same seed (the same distribution and random stream: the
    logits differ by float rounding only), and the recorded log-probs equal a full forward pass."""
    from tether.data.templates import prompt_ids
    from tether.generation import generation_config, left_pad, neutral_model_generation_config, sample_from_ids
    from tether.models.loading import load_causal_lm
    from tether.models.wrappers import strip_peft

    model = load_causal_lm(str(tiny_model_dir)).eval()
    prompts = [prompt_ids(tokenizer, p, None) for p in ["hi", "a much longer prompt than the first one"]]
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0)
    seen = []
    hook = strip_peft(model).get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        torch.manual_seed(3)
        groups = sample_from_ids(model, tokenizer, prompts, settings, 4, batch_size=2, return_logprobs=True)
    finally:
        hook.remove()
    width = max(len(p) for p in prompts)
    assert seen[0] == (2, width - 1)  # the two distinct prompts, not 8 rows
    assert seen[1] == (8, 1)  # every row then continues from the repeated cache with its last prompt token
    assert all(s == (8, 1) for s in seen[1:])

    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    torch.manual_seed(3)
    with neutral_model_generation_config(model), torch.no_grad():
        plain = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=generation_config(tokenizer, settings, 4)
        )
    stop = {tokenizer.eos_token_id}
    for row, sample in enumerate(s for g in groups for s in g):
        expected, _ = truncate_after_stop(plain[row, ids.shape[1] :].tolist(), stop)
        assert sample.response_ids == expected
    assert len({tuple(s.response_ids) for s in groups[1]}) > 1  # samples, not one copied four times

    for sample in (s for g in groups for s in g):
        full = torch.tensor([sample.prompt_ids + sample.response_ids])
        with torch.no_grad():
            logits = model(full).logits[0, len(sample.prompt_ids) - 1 : -1] / settings.temperature
        expected = torch.log_softmax(logits, -1).gather(-1, full[0, len(sample.prompt_ids) :, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=1e-5, rtol=1e-5)


def test_prompt_runs_find_identical_consecutive_rows():
    from tether.generation import prompt_runs

    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9], [0, 5, 6], [0, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])
    first, run = prompt_runs(ids, mask)
    # rows 3 and 4 hold the same ids but a different mask (a pad id that equals a real token): not one run
    assert first.tolist() == [0, 2, 3, 4]
    assert run.tolist() == [0, 0, 1, 2, 3, 3]


def test_repeated_prompts_in_one_call_share_the_prefill_as_the_server_batches_requests(tiny_model_dir, tokenizer):
    """The server sends each request's n rows in one call, one sample per row: runs of the same prompt
    are prefilled once (a, a, b, a: three prefills), and the samples equal plain generation's."""
    from tether.data.templates import prompt_ids
    from tether.generation import generation_config, neutral_model_generation_config, sample_from_ids
    from tether.models.loading import load_causal_lm
    from tether.models.wrappers import strip_peft

    model = load_causal_lm(str(tiny_model_dir)).eval()
    a, b = prompt_ids(tokenizer, "first question", None), prompt_ids(tokenizer, "second", None)
    prompts = [a, a, b, a]
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0)
    seen = []
    hook = strip_peft(model).get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        torch.manual_seed(5)
        out = sample_from_ids(model, tokenizer, prompts, settings, 1, batch_size=4)
    finally:
        hook.remove()
    assert seen[0] == (3, max(len(a), len(b)) - 1) and seen[1] == (4, 1)
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    torch.manual_seed(5)
    with neutral_model_generation_config(model), torch.no_grad():
        plain = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=generation_config(tokenizer, settings)
        )
    for row, group in enumerate(out):
        expected, _ = truncate_after_stop(plain[row, ids.shape[1] :].tolist(), {tokenizer.eos_token_id})
        assert group[0].response_ids == expected
